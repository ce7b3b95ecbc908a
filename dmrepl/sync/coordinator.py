"""The owner of one execution while it runs: it plans the work, dispatches it (inline or to worker processes), merges
results in line order, writes checkpoints, records ERROR transitions in the registry, and finishes the execution.
Nothing else writes the registry during a sync (ARCHITECTURE.md, "Who writes the registry").

Positions are (file index, byte offset after a line, line number) in the decompressed stream. A checkpoint is taken
only after every piece dispatched so far was merged and acknowledged (`Executor.flush`), so resuming from it re-sends
at most what was in flight. Each replication keeps its own acknowledged position: one rebound after an ERROR catches
up from where it stopped while the others continue from theirs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from dmrepl import processes
from dmrepl.delivery import Failure, ReplicationBinding, Target
from dmrepl.errors import DmreplError, Interrupted, InvalidInputError, describe_os_error
from dmrepl.executions import execution_dir
from dmrepl.exports import ExportReader, file_sha256
from dmrepl.files import atomic_write, open_append, private_dir
from dmrepl.models import (
    Checkpoint,
    Execution,
    ExecutionStatus,
    Position,
    Progress,
    Replication,
    RepPosition,
    SourceFile,
    iso,
    now_iso,
    parse_iso,
)
from dmrepl.registry import Registry
from dmrepl.replications import add_undelivered, mark_error, resolve_binding
from dmrepl.storage import REMOTE_MIN_RANGE, Source
from dmrepl.sync.options import CHECKPOINT_FILE, PROGRESS_INTERVAL_S, Outcome, ProgressHook, SyncOptions
from dmrepl.sync.pool import (
    MIN_BYTES,
    Executor,
    InlineExecutor,
    WorkerPool,
    chunks,
    default_workers,
    env_workers,
)
from dmrepl.sync.shard import LineChunk, Resume, Shard, ShardOptions, ShardResult, Work


class _MaxRejects(Exception):
    pass


class _StopRequested(Exception):
    """A graceful stop, raised only between pieces of work, where a checkpoint is exact."""


class Hasher(threading.Thread):
    """sha256 of the exports while the sync runs: hashlib releases the GIL, so on a second core it is free, instead
    of a full extra read of every file before the first operation is sent. An object whose service gives it a
    version (generation, ETag) is not hashed: the version is what a resume compares."""

    def __init__(self, paths: Sequence[str | Source]) -> None:
        super().__init__(name="dmrepl-sha256", daemon=True)
        self.paths = list(paths)
        self.digests: list[str | None] | None = None

    def run(self) -> None:
        self.digests = [
            file_sha256(p) if not isinstance(p, Source) else None if p.version is not None else p.sha256()
            for p in self.paths
        ]

    def fill(self, files: list[SourceFile]) -> None:
        if self.digests is not None:
            for f, digest in zip(files, self.digests, strict=True):
                if f.sha256 is None:
                    f.sha256 = digest


@dataclass
class RepState:
    """The coordinator's view of one replication: what it acknowledged (base: from the checkpoint it resumed)."""

    rep: Replication
    base_delivered: int = 0
    base_rejected: int = 0
    delivered: int = 0
    rejected: int = 0
    alive: bool = True
    error: Failure | None = None


def load_checkpoint(directory: Path, rep_ids: Sequence[str]) -> Checkpoint:
    from dmrepl.models import RecordError, from_dict

    path = directory / CHECKPOINT_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        cp = from_dict(Checkpoint, raw, "checkpoint")
    except FileNotFoundError:
        return Checkpoint.fresh(rep_ids)
    except (ValueError, OSError, RecordError) as exc:
        raise InvalidInputError(f"{path}: unreadable checkpoint ({exc})") from None
    for r in rep_ids:
        cp.reps.setdefault(r, RepPosition())
    return cp


def stat_of(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class Coordinator:
    def __init__(
        self,
        registry: Registry,
        execution: Execution,
        readers: Sequence[ExportReader],
        cp: Checkpoint,
        replications: Sequence[Replication],
        opts: SyncOptions,
        *,
        progress: ProgressHook | None = None,
        stop: Callable[[], bool] = lambda: False,
        hasher: Hasher | None = None,
    ) -> None:
        self.registry = registry
        self.execution = execution
        self.readers = readers
        self.cp = cp
        self.opts = opts
        self.progress = progress
        self.stop = stop
        self.hasher = hasher
        self.directory = execution_dir(registry, execution.id)
        self.file_names = [f.name for f in execution.files]
        self.operations: Counter[str] = cp.counter()
        self.states: dict[str, RepState] = {}
        for rep in replications:
            at = cp.reps.setdefault(rep.id, RepPosition())
            self.states[rep.id] = RepState(rep, at.delivered, at.rejected, at.delivered, at.rejected)
        self.position: Position = cp.read_position
        self.line_no = 0
        self.seq = 0
        self.too_many: str | None = None
        self.total_bytes = sum(r.size for r in readers)
        self.done_bytes = 0
        self.reader: ExportReader | None = None
        self.executor: Executor | None = None
        self.rejects: IO[bytes] | None = None
        self.last_cp = self.last_progress = time.monotonic()
        #: What retried tasks may have delivered twice (an executor on other machines reports it; 0 here).
        self.possible_duplicates = 0

    # -- the run ----------------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        """`stop` is polled between pieces of work: a graceful stop (Ctrl-C, SIGTERM) flushes and checkpoints exactly
        where it is, so resuming re-sends nothing; only a hard kill re-sends what was in flight."""
        processes.tune_malloc()
        private_dir(self.directory)
        self.rejects = os.fdopen(open_append(self.directory / "rejects.ndjson"), "ab")
        self.rejects.truncate(self.cp.rejects_bytes)
        self.rejects.seek(self.cp.rejects_bytes)
        stats = [r.source.stamp() for r in self.readers]
        self.done_bytes = sum(r.size for r in self.readers[: self.cp.read[0]])
        aborted: str | None = None
        interrupted: BaseException | None = None
        try:
            bindings = self._bindings()
            self.executor = self._executor(bindings)
            if self.hasher is not None:
                self.hasher.start()
            positions = [self.cp.reps[r].position for r, s in self.states.items() if s.alive]
            start = min(positions) if positions else self.cp.read_position
            deferred = getattr(self.executor, "deferred", False)
            for file_idx in range(start[0], len(self.readers)):
                reader = self.readers[file_idx]
                self.reader = reader
                offset, line_no = (start[1], start[2]) if file_idx == start[0] else (0, 0)
                self._read_file(file_idx, reader, offset, line_no)
                if deferred:  # every file planned first, then run as one job (Spark: parallel across files)
                    self.reader = None
                    continue
                self._check_unchanged(file_idx, reader, stats[file_idx])
                self.done_bytes += reader.size
                self.reader = None
                self.position = (file_idx + 1, 0, 0)
                self.checkpoint()
                if self.too_many:  # workers report rejects late: a whole piece after the one that crossed the limit
                    raise _MaxRejects(self.too_many)
            if deferred:
                self.checkpoint()
                if self.too_many:
                    raise _MaxRejects(self.too_many)
                for file_idx in range(start[0], len(self.readers)):
                    self._check_unchanged(file_idx, self.readers[file_idx], stats[file_idx])
                    self.done_bytes += self.readers[file_idx].size
                self.position = (len(self.readers), 0, 0)
            self.checkpoint()
        except _MaxRejects as exc:
            aborted = str(exc)
            self.checkpoint()
        except _StopRequested:
            interrupted = Interrupted()
            self.checkpoint()
        except BaseException as exc:  # raised anywhere, even mid-batch: only the previous checkpoint is safe
            interrupted = exc
            if self.executor is not None:
                self.executor.kill()
                self.executor = None
        finally:
            if self.executor is not None:
                self.possible_duplicates = getattr(self.executor, "possible_duplicates", 0)
                self.executor.close()
            self.rejects.close()
        if self.progress is not None:
            self.progress(self.done_bytes, self.total_bytes, sum(self.operations.values()))
        if self.hasher is not None and self.hasher.is_alive():
            self.hasher.join()
        return self._finish(aborted, interrupted)

    def _bindings(self) -> list[ReplicationBinding]:
        """Secrets are resolved here, once: shards and workers get them in their bindings and never read a store."""
        out = []
        for rep_id, state in self.states.items():
            binding, failure = resolve_binding(self.registry, state.rep)
            if failure is not None:
                self._fail(rep_id, failure)
            else:
                out.append(binding)
        return out

    def _executor(self, bindings: list[ReplicationBinding]) -> Executor:
        options = ShardOptions(
            system_version=self.execution.user_point_system_version,
            start_ts=self.execution.start_ts,
            max_line_bytes=self.opts.max_line_bytes,
            retry_budget_s=self.opts.retry_budget_s,
        )
        if self.opts.spark is not None:
            from dmrepl.sync import spark

            return spark.SparkExecutor(
                bindings,
                options,
                self._merge,
                self.opts.spark,
                spark.work_dir_for(self.opts.spark, str(self.directory / "spark-work")),
                self.execution.id,
                progress=self._job_progress(),
                stop=self.stop,
            )
        workers = self._workers(bindings)
        if workers:
            return WorkerPool(bindings, options, self._merge, workers=workers)
        return InlineExecutor(bindings, options, self._merge, self._on_fail)

    def _job_progress(self) -> Callable[[int, int], None]:
        """While an executor elsewhere runs the shards: bytes and operations of those done, added to where this
        run started, for the progress bar, and in the registry every checkpoint interval (`sync list`)."""
        hook = self.progress
        bytes_base, ops_base = self.done_bytes, sum(self.operations.values())

        def report(done_bytes: int, operations: int) -> None:
            done = min(self.total_bytes, bytes_base + done_bytes)
            if hook is not None:
                hook(done, self.total_bytes, ops_base + operations)
            now = time.monotonic()
            if now - self.last_cp >= self.opts.checkpoint_interval_s:
                self.last_cp = now
                with self.registry.transaction() as data:
                    e = data.executions.get(self.execution.id)
                    if e is not None:
                        e.progress.bytes_read = max(e.progress.bytes_read, done)
                        total = e.progress.bytes_total
                        e.progress.percent = round(100.0 * e.progress.bytes_read / total, 1) if total else 100.0
                        e.progress.updated_at = now_iso()

        return report

    def _workers(self, bindings: Sequence[ReplicationBinding]) -> int:
        """How many worker processes to start; 0 to stay in-process. Workers pay off for large user-point exports
        when every replication continues from one position; on fewer than 4 cores they compete with a cloud
        destination's own threads for the CPU, so without --workers they start only for file destinations there
        (measurements: CHANGELOG)."""
        if not bindings:
            return 0
        if self.opts.max_rejects is not None:
            return 0  # exact only in one process: no line after the limit's is delivered (see README)
        forced = self.opts.workers or env_workers()
        workers = forced or default_workers()
        if workers < 2 or any(r.format != "user-points" for r in self.readers):
            return 0
        if not forced:
            if self.total_bytes < MIN_BYTES:
                return 0
            if (os.cpu_count() or 1) < 4 and any(b.type != "file" for b in bindings):
                return 0
        live = {self.cp.reps[b.rep_id].position for b in bindings}
        return workers if len(live) == 1 else 0

    def _resume_for(self, file_idx: int, offset: int) -> Resume | None:
        """What to skip in this file for a resume where replications stand at different positions."""

        def until(pos: Position) -> int:
            return pos[1] if pos[0] == file_idx else (-1 if pos[0] < file_idx else 1 << 62)

        counted = until(self.cp.read_position)
        delivered = {r: until(self.cp.reps[r].position) for r, s in self.states.items() if s.alive}
        if counted <= offset and all(v <= offset for v in delivered.values()):
            return None
        return Resume(counted, delivered)

    def _read_file(self, file_idx: int, reader: ExportReader, offset: int, line_no: int) -> None:
        assert self.executor is not None
        resume = self._resume_for(file_idx, offset)
        self.line_no = line_no
        if reader.compressed and getattr(self.executor, "whole_gzip", False):  # read by the task itself
            source = reader.source
            shard = Shard(
                self._next_seq(),
                file_idx,
                source.name,
                reader.format,
                offset,
                None,
                line_no,
                compressed=True,
                size=reader.size,
                version=source.version,
            )
            self._submit(shard, resume, reader)
        elif reader.compressed:
            for frames in chunks(reader.frames(offset, line_no)):
                self._submit(LineChunk(self._next_seq(), file_idx, reader.format, frames), resume, reader)
        else:
            first: int | None = line_no
            source = reader.source
            size = self.executor.range_bytes(reader.size)
            if source.remote:  # each range costs a request or two
                size = max(size, min(reader.size, REMOTE_MIN_RANGE))
            for start, end in reader.ranges(offset, size):
                shard = Shard(
                    self._next_seq(),
                    file_idx,
                    source.name,
                    reader.format,
                    start,
                    end,
                    first,
                    size=reader.size,
                    version=source.version,
                )
                self._submit(shard, resume, reader)
                first = None

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _submit(self, work: Work, resume: Resume | None, reader: ExportReader) -> None:
        assert self.executor is not None
        limit = self.opts.max_rejects
        self.executor.submit(work, resume, None if limit is None else max(0, limit - self.cp.rejects))
        self._tick(reader)

    def _merge(self, work: Work, result: ShardResult) -> None:
        """Results arrive in submission order, so counts and rejects are recorded in line order."""
        base = work.first_line if work.first_line is not None else self.line_no
        r = result.rebased(base)
        self.line_no = r.last_line
        self.cp.lines_read += r.lines
        self.operations.update(r.counts)
        for line, reason in r.rejects:
            self._count_reject(r.file_index, line, reason)
        for o in r.oversize:
            self._write_reject(
                {
                    "file": self.file_names[r.file_index],
                    "line": o.line,
                    "replication": o.rep_id,
                    "doc_type": o.doc_type,
                    "reason": o.reason,
                }
            )
        self.position = (r.file_index, r.end_offset, r.last_line)

    def _tick(self, reader: ExportReader) -> None:
        """Between pieces of work: stop, progress, checkpoint. Reading goes on when every replication has failed,
        so the execution still counts exactly the operations they did not receive."""
        if self.too_many:
            raise _MaxRejects(self.too_many)
        if self.stop():
            raise _StopRequested()
        if getattr(self.executor, "deferred", False):  # planning only: progress and checkpoints come with the job
            return
        now = time.monotonic()
        if self.progress is not None and now - self.last_progress >= PROGRESS_INTERVAL_S:
            self.progress(self.done_bytes + reader.raw_position, self.total_bytes, sum(self.operations.values()))
            self.last_progress = now
        if now - self.last_cp >= self.opts.checkpoint_interval_s:
            self.checkpoint()
            self.last_cp = time.monotonic()

    # -- rejects ----------------------------------------------------------------------------------------------------

    def _write_reject(self, record: dict[str, Any]) -> None:
        assert self.rejects is not None
        self.rejects.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    def _count_reject(self, file_idx: int, line_no: int, reason: str) -> None:
        self.cp.rejects += 1
        self._write_reject({"file": self.file_names[file_idx], "line": line_no, "reason": reason})
        limit = self.opts.max_rejects
        if limit is not None and self.cp.rejects > limit and not self.too_many:
            self.too_many = (
                f"more than --max-rejects {limit} rejected lines (last: {self.file_names[file_idx]} line {line_no})"
            )

    # -- failures: the one place a sync puts a replication in ERROR -------------------------------------------------

    def _on_fail(self, target: Target) -> None:
        if target.error is not None:
            self._fail(target.rep_id, target.error, target.delivered, target.rejected)

    def _fail(self, rep_id: str, failure: Failure, delivered: int | None = None, rejected: int | None = None) -> None:
        """`delivered`/`rejected`: what the executor counted for it in this run, acknowledged up to the failure;
        None when it never delivered (its secret could not be read)."""
        state = self.states[rep_id]
        if not state.alive:
            return
        state.alive = False
        state.error = failure
        if delivered is None:
            state.delivered, state.rejected = self._acked(rep_id)
        else:
            state.delivered = state.base_delivered + delivered
            state.rejected = state.base_rejected + (rejected or 0)
        mark_error(
            self.registry,
            rep_id,
            code=failure.code,
            message=failure.message,
            undelivered=0,
            reason=f"sync {self.execution.id}",
        )
        if self.executor is not None:
            self.executor.drop(rep_id)

    def _acked(self, rep_id: str) -> tuple[int, int]:
        """A replication that fails keeps the counts of its last checkpoint: a resume re-sends from there."""
        at = self.cp.reps[rep_id]
        return at.delivered, at.rejected

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        assert self.rejects is not None
        if self.executor is not None:
            acks = self.executor.flush()
            for rep_id, failure in acks.failures.items():
                self._fail(rep_id, failure, acks.delivered.get(rep_id, 0), acks.rejected.get(rep_id, 0))
            for rep_id, state in self.states.items():
                if state.alive:
                    state.delivered = state.base_delivered + acks.delivered.get(rep_id, 0)
                    state.rejected = state.base_rejected + acks.rejected.get(rep_id, 0)
        for rep_id, state in self.states.items():
            if state.alive:
                self.cp.reps[rep_id] = RepPosition(list(self.position), state.delivered, state.rejected)
        if self.position > self.cp.read_position:
            self.cp.read = list(self.position)
        self.cp.operations = dict(self.operations)
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        self.cp.rejects_bytes = self.rejects.tell()
        self.cp.saved_at = now_iso()
        atomic_write(self.directory / CHECKPOINT_FILE, json.dumps(self.cp.to_dict()).encode("utf-8"))
        self._save_progress()

    def _bytes_read(self) -> int:
        return self.done_bytes + (self.reader.raw_position if self.reader is not None else 0)

    def _save_progress(self) -> None:
        bytes_read, total = self._bytes_read(), self.total_bytes
        with self.registry.transaction() as data:
            e = data.executions.get(self.execution.id)
            if e is None:
                return
            if self.hasher is not None:
                self.hasher.fill(e.files)
            e.progress = Progress(
                bytes_read=bytes_read,
                bytes_total=total,
                percent=round(100.0 * bytes_read / total, 1) if total else 100.0,
                lines_read=self.cp.lines_read,
                updated_at=now_iso(),
            )
            self._record_counts(e)

    def _record_counts(self, e: Execution) -> None:
        e.lines_read = self.cp.lines_read
        e.operations = dict(sorted(self.operations.items()))
        e.rejects = self.cp.rejects
        for rep_id, state in self.states.items():
            e.replications[rep_id].delivered = state.delivered
            e.replications[rep_id].rejected = state.rejected

    def _check_unchanged(self, file_idx: int, reader: ExportReader, before: tuple[int, Any] | None) -> None:
        """An export rewritten while it was read (truncated, appended to, replaced) gave a mix of old and new lines:
        the execution fails rather than report a success no export matches."""
        if reader.source.stamp() != before:
            what = "size or modification time" if not reader.source.remote else f"size or {reader.source.identity}"
            raise InvalidInputError(
                f"{self.file_names[file_idx]}: the export changed while it was read ({what}); "
                "start a new synchronization once it is complete",
                code="EXPORT_CHANGED",
            )

    # -- the end ----------------------------------------------------------------------------------------------------

    def _finish(self, aborted: str | None, interrupted: BaseException | None) -> Outcome:
        exec_id = self.execution.id
        total_ops = sum(self.operations.values())
        errored = [r for r, s in self.states.items() if not s.alive]
        finished = datetime.now(UTC)
        with self.registry.transaction() as data:
            e = data.executions[exec_id]
            if self.hasher is not None:
                self.hasher.fill(e.files)
            self._record_counts(e)
            e.rejects_file = str(self.directory / "rejects.ndjson")
            for rep_id, state in self.states.items():
                entry = e.replications[rep_id]
                entry.failed = max(0, total_ops - state.delivered - state.rejected) if not state.alive else 0
                entry.status = "ERROR" if not state.alive else "OK"
                if state.error:
                    entry.error = state.error.to_dict()
                elif state.alive:
                    entry.error = None  # a resume after recreate delivered what an earlier run could not
            if isinstance(interrupted, InvalidInputError):  # the export itself: resuming won't help
                e.status, e.error = ExecutionStatus.FAILED, interrupted.message
            elif isinstance(interrupted, OSError):
                e.status = ExecutionStatus.FAILED
                e.error = f"{describe_os_error(interrupted)}; then dmrepl sync resume {exec_id}"
            elif isinstance(interrupted, DmreplError):
                e.status = ExecutionStatus.FAILED
                e.error = f"{interrupted.message}; resume with dmrepl sync resume {exec_id}"
            elif interrupted is not None:
                canceled = isinstance(interrupted, KeyboardInterrupt | Interrupted)
                e.status = ExecutionStatus.CANCELED if canceled else ExecutionStatus.FAILED
                e.error = f"interrupted ({type(interrupted).__name__}); resume with dmrepl sync resume {exec_id}"
            elif aborted:
                e.status, e.error = ExecutionStatus.FAILED, aborted
            elif errored:
                e.status = ExecutionStatus.FAILED
                e.error = "replication(s) in ERROR: " + ", ".join(
                    f"{self.states[r].rep.name} ({self.states[r].error.code})"  # type: ignore[union-attr]
                    for r in errored
                )
            else:
                e.status, e.error = ExecutionStatus.SUCCEEDED, None
            e.finished_at = iso(finished)
            e.duration_s = round((finished - parse_iso(e.started_at)).total_seconds(), 3)
            if e.status is ExecutionStatus.SUCCEEDED:
                e.progress.bytes_read = e.progress.bytes_total
            elif interrupted is None:  # what was read, even when the run ends before its first checkpoint
                e.progress.bytes_read = max(e.progress.bytes_read, self._bytes_read())
            total = e.progress.bytes_total
            e.progress.percent = round(100.0 * e.progress.bytes_read / total, 1) if total else 100.0
            e.progress.lines_read = self.cp.lines_read
            execution = e
        for rep_id in errored:
            add_undelivered(self.registry, rep_id, execution.replications[rep_id].failed)
        if interrupted is not None:
            raise interrupted
        return Outcome(execution, errored, aborted, self.possible_duplicates)
