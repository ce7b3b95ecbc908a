"""Initial synchronizations (SPEC §7): replay an export into every ACTIVE replication, with checkpoints.

Positions are (file index, byte offset after a line) in the decompressed stream. A checkpoint is taken only after
every live destination acknowledged everything sent (`Fanout.flush`), so resuming from it re-sends at most what
was in flight. Each replication keeps its own acknowledged position: one rebound after an ERROR catches up from
where it stopped while the others continue from theirs.
"""

from __future__ import annotations

import json
import os
import secrets as _random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any

from dmrepl import datamarts, processes
from dmrepl.delivery import Fanout, Target
from dmrepl.destinations.base import DOC_TYPE, Message
from dmrepl.errors import Interrupted, InvalidInputError, NotFoundError, RefusedError
from dmrepl.exports import ExportError, ExportReader, file_sha256
from dmrepl.operations import max_operation_bytes
from dmrepl.registry import Registry, atomic_write, now_iso, parse_iso
from dmrepl.replications import add_undelivered
from dmrepl.shards import MIN_BYTES, Done, Shards, chunks, default_workers, env_workers

WEEKLY = timedelta(days=7)
CHECKPOINT_INTERVAL_S = 5.0
PROGRESS_INTERVAL_S = 0.25
DEFAULT_RETRY_BUDGET_S = 300.0
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
RESUMABLE = ("RUNNING", "FAILED", "CANCELED")

Progress = Callable[[int, int, int], None]


@dataclass
class SyncOptions:
    fmt: str = "auto"
    max_rejects: int | None = None
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S
    workers: int = 0  # 0: automatic (several for large user-point exports, see dmrepl.shards)


@dataclass
class Outcome:
    execution: dict[str, Any]
    errored: list[str] = field(default_factory=list)
    aborted: str | None = None


def execution_dir(registry: Registry, exec_id: str) -> Path:
    return registry.root / "executions" / exec_id


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _find(data: dict[str, Any], exec_id: str) -> dict[str, Any]:
    try:
        return data["executions"][exec_id]
    except KeyError:
        raise NotFoundError(f"execution {exec_id} not found (see dmrepl sync list)") from None


def effective_status(execution: dict[str, Any]) -> str:
    """RUNNING whose process is gone is shown as STALE: resumable, and it no longer blocks the datamart."""
    if execution["status"] == "RUNNING" and not processes.is_alive(execution.get("pid"), execution.get("pid_start")):
        return "STALE"
    return execution["status"]


def next_allowed(data: dict[str, Any], datamart: str) -> datetime | None:
    """The weekly rule: a SUCCEEDED execution that started less than 7 days ago blocks a new start."""
    starts = [
        parse_iso(e["started_at"])
        for e in data["executions"].values()
        if e["datamart"] == datamart and e["status"] == "SUCCEEDED" and e.get("started_at")
    ]
    if not starts:
        return None
    allowed = max(starts) + WEEKLY
    return allowed if allowed > datetime.now(UTC) else None


def _active(data: dict[str, Any], datamart: str) -> list[dict[str, Any]]:
    return sorted(
        (r for r in data["replications"].values() if r["datamart"] == datamart and r["status"] == "ACTIVE"),
        key=lambda r: r["name"],
    )


def _refusals(data: dict[str, Any], datamart: str) -> list[tuple[str, str]]:
    out = []
    running = processes.running_execution(data, datamart)
    if running:
        out.append(
            (
                "SYNC_RUNNING",
                f"execution {running['id']} is RUNNING on datamart {datamart} (pid {running.get('pid')}, "
                f"{running.get('progress', {}).get('percent', 0):.0f}% read)",
            )
        )
    allowed = next_allowed(data, datamart)
    if allowed:
        out.append(
            (
                "WEEKLY_RULE",
                f"an initial synchronization of datamart {datamart} succeeded less than 7 days ago; the next one "
                f"is allowed from {allowed.isoformat(timespec='seconds').replace('+00:00', 'Z')}",
            )
        )
    if not _active(data, datamart):
        out.append(("NO_ACTIVE_REPLICATION", f"datamart {datamart} has no ACTIVE replication (dmrepl activate ID)"))
    return out


def _open_readers(
    paths: Sequence[str | Path], system_version: str, start_ts: int, opts: SyncOptions
) -> list[ExportReader]:
    readers = []
    for p in paths:
        try:
            readers.append(
                ExportReader(
                    p,
                    fmt=opts.fmt,
                    system_version=system_version,
                    start_ts=start_ts,
                    max_line_bytes=opts.max_line_bytes,
                )
            )
        except ExportError as exc:
            raise InvalidInputError(str(exc), code="INVALID_EXPORT") from None
    return readers


def _describe_files(readers: Sequence[ExportReader], *, hashes: bool = True) -> list[dict[str, Any]]:
    return [
        {
            "name": str(Path(r.path).absolute()),
            "size": r.size,
            "mtime_ns": Path(r.path).stat().st_mtime_ns,
            "format": r.format,
            "compressed": r.compressed,
        }
        | ({"sha256": file_sha256(r.path)} if hashes else {})
        for r in readers
    ]


class _Hasher(threading.Thread):
    """sha256 of the exports while the sync runs: hashlib releases the GIL, so on a second core it is free,
    instead of a full extra read of every file before the first operation is sent."""

    def __init__(self, paths: Sequence[str]) -> None:
        super().__init__(name="dmrepl-sha256", daemon=True)
        self.paths = list(paths)
        self.digests: list[str] | None = None

    def run(self) -> None:
        self.digests = [file_sha256(p) for p in self.paths]

    def fill(self, files: list[dict[str, Any]]) -> None:
        if self.digests is not None:
            for f, digest in zip(files, self.digests, strict=True):
                f.setdefault("sha256", digest)


def plan(registry: Registry, paths: Sequence[str | Path], *, datamart: str | None, opts: SyncOptions) -> dict:
    """Dry run: read everything, send nothing."""
    data = registry.load()
    dm_id = datamarts.resolve(data, datamart)
    dm = data["datamarts"][dm_id]
    start_ts = _ms(datetime.now(UTC))
    readers = _open_readers(paths, dm["user_point_system_version"], start_ts, opts)
    counts: Counter[str] = Counter()
    rejects: list[dict[str, Any]] = []
    lines = 0
    for reader in readers:
        for line in reader.lines():
            lines += 1
            if line.reject is not None:
                if len(rejects) < 100:
                    rejects.append({"file": str(reader.path), "line": line.line_no, "reason": line.reject})
                counts["__rejects__"] += 1
                continue
            counts.update(m[DOC_TYPE] for m in line.messages)
    reject_count = counts.pop("__rejects__", 0)
    receiving, not_receiving = [], []
    for rep in sorted(data["replications"].values(), key=lambda r: r["name"]):
        if rep["datamart"] != dm_id:
            continue
        entry = {"id": rep["id"], "name": rep["name"], "type": rep["type"], "status": rep["status"]}
        if rep["status"] == "ACTIVE":
            receiving.append(entry)
        else:
            why = "PAUSED: activate it to include it" if rep["status"] == "PAUSED" else "ERROR: recreate it first"
            not_receiving.append(entry | {"why": why})
    allowed = next_allowed(data, dm_id)
    return {
        "datamart": dm_id,
        "user_point_system_version": dm["user_point_system_version"],
        "files": _describe_files(readers),
        "lines": lines,
        "operations": dict(sorted(counts.items())),
        "operations_total": sum(counts.values()),
        "rejects": reject_count,
        "reject_samples": rejects,
        "would_receive": receiving,
        "would_not_receive": not_receiving,
        "refusals": [{"code": c, "message": m} for c, m in _refusals(data, dm_id)],
        "next_allowed": allowed.isoformat(timespec="seconds").replace("+00:00", "Z") if allowed else "now",
    }


def start(
    registry: Registry,
    paths: Sequence[str | Path],
    *,
    datamart: str | None,
    opts: SyncOptions,
    progress: Progress | None = None,
    on_started: Callable[[dict[str, Any]], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    data = registry.load()
    dm_id = datamarts.resolve(data, datamart)
    dm = data["datamarts"][dm_id]
    for code, message in _refusals(data, dm_id):
        raise RefusedError(f"sync refused: {message}", code=code)
    started = datetime.now(UTC)
    start_ts = _ms(started)
    readers = _open_readers(paths, dm["user_point_system_version"], start_ts, opts)
    files = _describe_files(readers, hashes=False)
    hasher = _Hasher([f["name"] for f in files])  # started by _run once worker processes are forked
    exec_id = f"sync-{started.strftime('%Y%m%d-%H%M%S')}-{_random.token_hex(2)}"
    with registry.transaction() as data:
        _mark_stale_failed(data, dm_id)
        for code, message in _refusals(data, dm_id):
            raise RefusedError(f"sync refused: {message}", code=code)
        active = _active(data, dm_id)
        execution = {
            "id": exec_id,
            "datamart": dm_id,
            "user_point_system_version": dm["user_point_system_version"],
            "status": "RUNNING",
            "created_at": now_iso(),
            "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "start_ts": start_ts,
            **processes.owner(),
            "files": files,
            "options": {
                "format": opts.fmt,
                "max_rejects": opts.max_rejects,
                "max_line_bytes": opts.max_line_bytes,
                "retry_budget_s": opts.retry_budget_s,
            },
            "replications": {
                r["id"]: {"name": r["name"], "type": r["type"], "delivered": 0, "failed": 0, "rejected": 0}
                for r in active
            },
            "lines_read": 0,
            "operations": {},
            "rejects": 0,
            "progress": {"bytes_read": 0, "bytes_total": sum(f["size"] for f in files), "percent": 0.0},
        }
        data["executions"][exec_id] = execution
    execution_dir(registry, exec_id).mkdir(parents=True, exist_ok=True)
    if on_started:
        on_started(execution)
    state = Checkpoint.fresh(list(execution["replications"]))
    return _run(registry, execution, readers, state, active, opts, progress, hasher, stop)


def resume(
    registry: Registry,
    exec_id: str,
    *,
    progress: Progress | None = None,
    retry_budget_s: float | None = None,
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    on_started: Callable[[dict[str, Any]], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    data = registry.load()
    execution = _find(data, exec_id)
    status = effective_status(execution)
    if status == "RUNNING":
        raise RefusedError(
            f"execution {exec_id} is RUNNING (pid {execution.get('pid')}): it cannot be resumed twice",
            code="SYNC_RUNNING",
        )
    if status not in (*RESUMABLE, "STALE"):
        raise RefusedError(f"execution {exec_id} is {status}: nothing to resume", code="WRONG_STATUS")
    saved = execution.get("options", {})
    opts = SyncOptions(
        fmt=saved.get("format", "auto"),
        max_rejects=saved.get("max_rejects"),
        max_line_bytes=saved.get("max_line_bytes", DEFAULT_MAX_LINE_BYTES),
        retry_budget_s=retry_budget_s if retry_budget_s is not None else saved.get("retry_budget_s", 300.0),
        checkpoint_interval_s=checkpoint_interval_s,
    )
    paths = [f["name"] for f in execution["files"]]
    readers = _open_readers(paths, execution["user_point_system_version"], execution["start_ts"], opts)
    for reader, f in zip(readers, execution["files"], strict=True):
        if (  # an execution stopped before its hasher finished has only the size and mtime to go by
            (reader.size != f["size"] or file_sha256(reader.path) != f["sha256"])
            if "sha256" in f
            else _stat(reader.path) != (f["size"], f.get("mtime_ns"))
        ):
            raise InvalidInputError(
                f"{f['name']}: the export changed since the execution started (size or sha256 differs); "
                "start a new synchronization instead",
                code="EXPORT_CHANGED",
            )
    state = Checkpoint.load(execution_dir(registry, exec_id), list(execution["replications"]))
    with registry.transaction() as data:
        current = _find(data, exec_id)
        if effective_status(current) == "RUNNING" or processes.running_execution(data, current["datamart"]):
            raise RefusedError(f"an execution is RUNNING on datamart {current['datamart']}", code="SYNC_RUNNING")
        active = [
            data["replications"][rid]
            for rid in current["replications"]
            if rid in data["replications"] and data["replications"][rid]["status"] == "ACTIVE"
        ]
        if not active:
            raise RefusedError(
                f"no replication of {exec_id} is ACTIVE now (recreate and activate those in ERROR first)",
                code="NO_ACTIVE_REPLICATION",
            )
        current.update(status="RUNNING", error=None, finished_at=None, **processes.owner())
        current.setdefault("resumes", []).append(now_iso())
        execution = current
    if on_started:
        on_started(execution)
    return _run(registry, execution, readers, state, active, opts, progress, None, stop)


def _mark_stale_failed(data: dict[str, Any], datamart: str) -> None:
    for e in data["executions"].values():
        if e["datamart"] == datamart and effective_status(e) == "STALE":
            e["status"] = "FAILED"
            e["error"] = f"process {e.get('pid')} is gone (killed or crashed); resume with dmrepl sync resume {e['id']}"


@dataclass
class Checkpoint:
    """Everything needed to continue exactly: read position, per-replication positions, and the counters."""

    read: tuple[int, int, int]  # file index, offset after the last line, line number
    reps: dict[str, dict[str, Any]]
    lines_read: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    rejects: int = 0
    rejects_bytes: int = 0

    @classmethod
    def fresh(cls, rep_ids: Sequence[str]) -> Checkpoint:
        return cls((0, 0, 0), {r: {"pos": [0, 0, 0], "delivered": 0, "rejected": 0} for r in rep_ids})

    @classmethod
    def load(cls, directory: Path, rep_ids: Sequence[str]) -> Checkpoint:
        try:
            raw = json.loads((directory / "checkpoint.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls.fresh(rep_ids)
        except (ValueError, OSError) as exc:
            raise InvalidInputError(f"{directory / 'checkpoint.json'}: unreadable checkpoint ({exc})") from None
        cp = cls(
            tuple(raw["read"]),  # type: ignore[arg-type]
            raw["reps"],
            raw["lines_read"],
            Counter(raw["operations"]),
            raw["rejects"],
            raw["rejects_bytes"],
        )
        for r in rep_ids:
            cp.reps.setdefault(r, {"pos": [0, 0, 0], "delivered": 0, "rejected": 0})
        return cp

    def save(self, directory: Path) -> None:
        payload = {
            "read": list(self.read),
            "reps": self.reps,
            "lines_read": self.lines_read,
            "operations": dict(self.operations),
            "rejects": self.rejects,
            "rejects_bytes": self.rejects_bytes,
            "saved_at": now_iso(),
        }
        atomic_write(directory / "checkpoint.json", json.dumps(payload).encode("utf-8"))


class _MaxRejects(Exception):
    pass


class _StopRequested(Exception):
    """A graceful stop, raised only at a line boundary, where a checkpoint is exact."""


def _run(
    registry: Registry,
    execution: dict[str, Any],
    readers: Sequence[ExportReader],
    cp: Checkpoint,
    active: Sequence[dict[str, Any]],
    opts: SyncOptions,
    progress: Progress | None,
    hasher: _Hasher | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    """`stop` is polled at line boundaries: a graceful stop (Ctrl-C, SIGTERM) flushes and checkpoints exactly
    where it is, so resuming re-sends nothing; only a hard kill re-sends what was in flight."""
    processes.tune_malloc()
    exec_id = execution["id"]
    directory = execution_dir(registry, exec_id)
    directory.mkdir(parents=True, exist_ok=True)
    rejects_path = directory / "rejects.ndjson"
    rejects_file = open(rejects_path, "ab")  # noqa: SIM115 - closed in finally
    rejects_file.truncate(cp.rejects_bytes)
    rejects_file.seek(cp.rejects_bytes)
    file_names = [f["name"] for f in execution["files"]]
    stats = [_stat(r.path) for r in readers]
    current_file = [0]
    current_line = [0]

    def write_reject(record: dict[str, Any]) -> None:
        rejects_file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    def on_reject(target: Target, message: Message, reason: str) -> None:
        pos = cp.reps[target.rep_id]["pos"]
        if (current_file[0], current_line[0]) > (pos[0], pos[2]):
            write_reject(
                {
                    "file": file_names[current_file[0]],
                    "line": current_line[0],
                    "replication": target.rep_id,
                    "doc_type": message[DOC_TYPE],
                    "reason": reason,
                }
            )

    fanout = Fanout(registry, active, retry_budget_s=opts.retry_budget_s, on_reject=on_reject, reason=f"sync {exec_id}")
    for target in fanout.targets.values():
        target.delivered = cp.reps[target.rep_id]["delivered"]
        target.rejected = cp.reps[target.rep_id]["rejected"]
    aborted: str | None = None
    total_bytes = sum(r.size for r in readers)
    done_bytes = sum(r.size for r in readers[: cp.read[0]])
    interrupted: BaseException | None = None

    flush_all = fanout.flush

    def checkpoint() -> None:
        flush_all()
        for t in fanout.live:
            cp.reps[t.rep_id].update(pos=list(position), delivered=t.delivered, rejected=t.rejected)
        if position > cp.read:
            cp.read = position
        rejects_file.flush()
        os.fsync(rejects_file.fileno())
        cp.rejects_bytes = rejects_file.tell()
        cp.save(directory)
        _save_progress(registry, exec_id, cp, fanout, done_bytes + readers_pos(), total_bytes, hasher)

    reader_ref: list[ExportReader | None] = [None]

    def readers_pos() -> int:
        r = reader_ref[0]
        return r.raw_position if r is not None else 0

    position = cp.read
    operations = cp.operations
    doc_type_of = itemgetter(DOC_TYPE)
    last_cp = last_progress = time.monotonic()
    too_many: list[str] = []

    def count_reject(file_idx: int, line_no: int, reason: str) -> None:
        cp.rejects += 1
        write_reject({"file": file_names[file_idx], "line": line_no, "reason": reason})
        if opts.max_rejects is not None and cp.rejects > opts.max_rejects and not too_many:
            too_many.append(
                f"more than --max-rejects {opts.max_rejects} rejected lines "
                f"(last: {file_names[file_idx]} line {line_no})"
            )

    def tick(reader: ExportReader) -> None:
        """Between lines or chunks: stop, progress, checkpoint. Reading goes on when every replication has failed,
        so the execution still counts exactly the operations they did not receive."""
        nonlocal last_cp, last_progress
        if too_many:
            raise _MaxRejects(too_many[0])
        if stop():
            raise _StopRequested()
        now = time.monotonic()
        if progress is not None and now - last_progress >= PROGRESS_INTERVAL_S:
            progress(done_bytes + reader.raw_position, total_bytes, sum(operations.values()))
            last_progress = now
        if now - last_cp >= opts.checkpoint_interval_s:
            checkpoint()
            last_cp = time.monotonic()

    def inline_file(file_idx: int, reader: ExportReader, offset: int, line_no: int) -> None:
        nonlocal position
        offer = fanout.offer
        read_key = (cp.read[0], cp.read[1])
        targets = [(t, (cp.reps[t.rep_id]["pos"][0], cp.reps[t.rep_id]["pos"][1])) for t in fanout.live]
        previous_end = offset
        for count, line in enumerate(reader.lines(offset, line_no), start=1):
            end = line.end_offset
            bound = max_operation_bytes(end - previous_end)
            previous_end = end
            key = (file_idx, end)
            current_file[0], current_line[0] = file_idx, line.line_no
            if line.reject is None:
                messages = line.messages
                if key > read_key:
                    cp.lines_read += 1
                    operations.update(map(doc_type_of, messages))
                for t, t_pos in targets:
                    if key > t_pos:
                        offer(t, messages, bound)
            elif key > read_key:
                cp.lines_read += 1
                count_reject(file_idx, line.line_no, line.reject)
            position = (file_idx, end, line.line_no)
            if count & 63 == 0 or too_many:
                tick(reader)
                read_key = (cp.read[0], cp.read[1])
                targets = [(t, t_pos) for t, t_pos in targets if t.alive]

    def sharded_file(file_idx: int, reader: ExportReader, offset: int, line_no: int) -> None:
        """`position` moves as results come back (on_chunk_done), so a checkpoint, which waits for every result
        first, records exactly the end of the last chunk dispatched."""
        assert shards is not None
        if reader.compressed:
            for lines, meta in chunks(reader.frames(offset, line_no)):
                shards.dispatch(file_idx, lines, meta)
                tick(reader)
        else:
            first: int | None = line_no
            for start, end in reader.ranges(offset, shards.range_bytes(reader)):
                shards.dispatch_range(file_idx, reader, start, end, first)
                first = None
                tick(reader)
        flush_all()

    def on_chunk_done(done: Done) -> None:
        """Results arrive in dispatch order, so counts and rejects are recorded in line order."""
        nonlocal position
        cp.lines_read += done.lines
        operations.update(done.counts)
        for line_no, reason in done.rejects:
            count_reject(done.file_idx, line_no, reason)
        for line_no, rep_id, doc_type, why in done.oversize:
            write_reject(
                {
                    "file": file_names[done.file_idx],
                    "line": line_no,
                    "replication": rep_id,
                    "doc_type": doc_type,
                    "reason": why,
                }
            )
        position = (done.file_idx, done.end_offset, done.line_no)

    shards: Shards | None = None
    workers = _shard_workers(readers, cp, fanout, opts) if fanout.live else 0
    if workers:
        shards = Shards(
            registry,
            fanout,
            active,
            workers=workers,
            retry_budget_s=opts.retry_budget_s,
            reader=readers[0],
            start_ts=execution["start_ts"],
            reason=f"sync {exec_id}",
            on_done=on_chunk_done,
        )
        flush_all = shards.flush
    else:
        fanout.open_all()
    if hasher is not None:
        hasher.start()
    try:
        live_positions = [tuple(cp.reps[t.rep_id]["pos"]) for t in fanout.live]
        start_pos = min(live_positions) if live_positions else cp.read
        loop_file = sharded_file if shards is not None else inline_file
        for file_idx in range(start_pos[0], len(readers)):
            reader = readers[file_idx]
            reader_ref[0] = reader
            offset, line_no = (start_pos[1], start_pos[2]) if file_idx == start_pos[0] else (0, 0)
            loop_file(file_idx, reader, offset, line_no)
            _check_unchanged(file_names[file_idx], reader.path, stats[file_idx])
            done_bytes += reader.size
            reader_ref[0] = None
            position = (file_idx + 1, 0, 0)
            checkpoint()
            if too_many:  # workers report rejects late: a whole chunk after the one that crossed the limit
                raise _MaxRejects(too_many[0])
        checkpoint()
    except _MaxRejects as exc:
        aborted = str(exc)
        checkpoint()
    except _StopRequested:
        interrupted = Interrupted()
        checkpoint()
    except BaseException as exc:  # raised anywhere, even mid-batch: only the previous checkpoint is safe
        interrupted = exc
        if shards is not None:
            shards.kill()
            shards = None
    finally:
        if shards is not None:
            shards.close()
        fanout.close_all()
        rejects_file.close()
    if progress is not None:
        progress(done_bytes, total_bytes, sum(cp.operations.values()))
    if hasher is not None:
        hasher.join()
    return _finish(registry, execution, cp, fanout, aborted, interrupted, hasher)


def _stat(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _check_unchanged(name: str, path: str | Path, before: tuple[int, int] | None) -> None:
    """An export rewritten while it was read (truncated, appended to, replaced) gave a mix of old and new lines:
    the execution fails rather than report a success no export matches."""
    if _stat(path) != before:
        raise InvalidInputError(
            f"{name}: the export changed while it was read (size or modification time); "
            "start a new synchronization once it is complete",
            code="EXPORT_CHANGED",
        )


def _shard_workers(readers: Sequence[ExportReader], cp: Checkpoint, fanout: Fanout, opts: SyncOptions) -> int:
    """How many worker processes to start; 0 to stay in-process. Workers pay off for large user-point exports when
    every replication continues from one position.

    Measured on 2 cores: ×1.3–1.45 into a file, but −40 % into a Pub/Sub server on the same machine (whose CPU the
    workers take); so without --workers they start only for file destinations, or with 4 cores or more."""
    forced = opts.workers or env_workers()
    workers = forced or default_workers()
    if workers < 2 or any(r.format != "user-points" for r in readers):
        return 0
    if not forced:
        if sum(r.size for r in readers) < MIN_BYTES:
            return 0
        if (os.cpu_count() or 1) < 4 and any(t.type != "file" for t in fanout.targets.values()):
            return 0
    return workers if len({tuple(cp.reps[t.rep_id]["pos"]) for t in fanout.live}) == 1 else 0


def _save_progress(
    registry: Registry,
    exec_id: str,
    cp: Checkpoint,
    fanout: Fanout,
    bytes_read: int,
    total: int,
    hasher: _Hasher | None,
) -> None:
    with registry.transaction() as data:
        e = data["executions"].get(exec_id)
        if e is None:
            return
        if hasher is not None:
            hasher.fill(e["files"])
        e["progress"] = {
            "bytes_read": bytes_read,
            "bytes_total": total,
            "percent": round(100.0 * bytes_read / total, 1) if total else 100.0,
            "lines_read": cp.lines_read,
            "updated_at": now_iso(),
        }
        e["lines_read"] = cp.lines_read
        e["operations"] = dict(sorted(cp.operations.items()))
        e["rejects"] = cp.rejects
        for t in fanout.targets.values():
            e["replications"][t.rep_id].update(delivered=t.delivered, rejected=t.rejected)


def _finish(
    registry: Registry,
    execution: dict[str, Any],
    cp: Checkpoint,
    fanout: Fanout,
    aborted: str | None,
    interrupted: BaseException | None,
    hasher: _Hasher | None = None,
) -> Outcome:
    exec_id = execution["id"]
    total_ops = sum(cp.operations.values())
    errored = [t.rep_id for t in fanout.targets.values() if not t.alive]
    finished = datetime.now(UTC)
    with registry.transaction() as data:
        e = data["executions"][exec_id]
        if hasher is not None:
            hasher.fill(e["files"])
        e["lines_read"] = cp.lines_read
        e["operations"] = dict(sorted(cp.operations.items()))
        e["rejects"] = cp.rejects
        e["rejects_file"] = str(execution_dir(registry, exec_id) / "rejects.ndjson")
        for t in fanout.targets.values():
            entry = e["replications"][t.rep_id]
            entry.update(delivered=t.delivered, rejected=t.rejected)
            entry["failed"] = max(0, total_ops - t.delivered - t.rejected) if not t.alive else 0
            entry["status"] = "ERROR" if not t.alive else "OK"
            if t.error:
                entry["error"] = t.error
            elif t.alive:
                entry.pop("error", None)  # a resume after recreate delivered what an earlier run could not
        if isinstance(interrupted, InvalidInputError):  # the export itself (unreadable, changed): resuming won't help
            e["status"] = "FAILED"
            e["error"] = interrupted.message
        elif interrupted is not None:
            e["status"] = "CANCELED" if isinstance(interrupted, KeyboardInterrupt | Interrupted) else "FAILED"
            e["error"] = f"interrupted ({type(interrupted).__name__}); resume with dmrepl sync resume {exec_id}"
        elif aborted:
            e["status"] = "FAILED"
            e["error"] = aborted
        elif errored:
            e["status"] = "FAILED"
            e["error"] = "replication(s) in ERROR: " + ", ".join(
                f"{fanout.targets[r].name} ({fanout.targets[r].error['code']})"  # type: ignore[index]
                for r in errored
            )
        else:
            e["status"] = "SUCCEEDED"
            e["error"] = None
        e["finished_at"] = finished.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        e["duration_s"] = round((finished - parse_iso(e["started_at"])).total_seconds(), 3)
        if e["progress"].get("bytes_total") and e["status"] == "SUCCEEDED":
            e["progress"].update(bytes_read=e["progress"]["bytes_total"], percent=100.0)
        execution = e
    for t in fanout.targets.values():
        if not t.alive:
            add_undelivered(registry, t.rep_id, execution["replications"][t.rep_id]["failed"])
    if interrupted is not None:
        raise interrupted
    return Outcome(execution, errored, aborted)


def list_executions(registry: Registry, *, datamart: str | None = None) -> list[dict[str, Any]]:
    data = registry.load()
    out = []
    for e in data["executions"].values():
        if datamart and e["datamart"] != datamart:
            continue
        out.append(e | {"status": effective_status(e)})
    return sorted(out, key=lambda e: e.get("started_at") or "", reverse=True)


def show(registry: Registry, exec_id: str) -> dict[str, Any]:
    e = _find(registry.load(), exec_id)
    return e | {"status": effective_status(e)}
