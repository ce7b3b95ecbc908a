"""The Spark engine (`dmrepl sync start|resume --engine spark`): the shards of an execution run as Spark tasks, while
this process, the Spark driver, stays the coordinator (registry, checkpoints, rejects, the weekly rule) exactly as
with the local engine. `SparkExecutor` is one more `Executor` (`dmrepl.sync.pool`): the coordinator plans shards and
merges results in line order without knowing where they ran.

The job uses the DataFrame API only (no RDD, no SparkContext), so that a Spark Connect master (`sc://…`, Databricks)
runs it too: a range of shard indexes, one per partition, mapped with `mapInArrow` by a function whose closure holds
the shard descriptors and the replications' bindings. The bindings carry the secrets the driver resolved: they travel
inside the job's serialized function, never in the Spark conf, the work dir or a log line.

Each task runs one shard with the engine core (`ShardRunner`): framed in chunks of `CHECKPOINT_LINES` lines; after
each chunk, everything offered is flushed (acknowledged) and the shard's checkpoint is written to the work dir
(`dmrepl.sync.workdir`). A retried attempt, or a task of a resumed execution, continues from that checkpoint, so what
a failure can have sent twice is at most one chunk: the retry counts that chunk's operations and reports them as
possible duplicates. A finished shard's result is written there too, and a resumed execution does not run it again.
Speculative execution is forced off: a speculative copy of a task would publish its shard twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from dmrepl.delivery import Failure, ReplicationBinding
from dmrepl.errors import DmreplError, Interrupted, InvalidInputError, SystemFailure
from dmrepl.exports import frame_lines
from dmrepl.storage import MissingExtraError, describe, is_url, open_source
from dmrepl.sync.shard import (
    Acks,
    Frame,
    LineChunk,
    LineReject,
    Oversize,
    Resume,
    Shard,
    ShardOptions,
    ShardResult,
    ShardRunner,
    Work,
)
from dmrepl.sync.workdir import WorkDir

#: Lines per chunk of a task: its checkpoint interval, hence the most a task failure can send twice.
CHECKPOINT_LINES = 5000
#: Byte ranges of plain exports: large enough to amortize a task's start, small enough to balance the cores.
SHARD_MAX_BYTES = 64 << 20
SHARD_MIN_BYTES = 256 << 10
#: Test-only: "<marker path>:<lines>" makes the first task attempt that reads that many lines fail once (the marker
#: file says it did), after offering a chunk it did not acknowledge.
FAIL_HOOK_ENV = "DMREPL_TEST_SPARK_FAIL"
EXTRA_HINT = "--engine spark needs the spark extra: pip install 'dmrepl[spark]' (and a Java runtime)"
ENGINES = ("local", "spark")
LOCAL_DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"


@dataclass
class SparkSettings:
    """What `--master`, `--spark-conf` and `--work-dir` say; `on_shards(done, total)` is called while a job runs."""

    master: str = "local[*]"
    conf: dict[str, str] = field(default_factory=dict)
    work_dir: str | None = None
    on_shards: Callable[[int, int], None] | None = None

    def recorded(self) -> dict[str, Any]:
        """What a resume reuses by default. Not the conf, nor a Spark Connect URL: they may hold a credential."""
        master = None if self.master.startswith("sc://") else self.master
        return {"engine": "spark", "master": master, "work_dir": self.work_dir}


def shown(master: str) -> str:
    """A master as messages show it: a Spark Connect URL without its parameters (`;token=…`)."""
    if master.startswith("sc://"):
        return "sc://" + master[5:].split("/", 1)[0].split(";", 1)[0]
    return master


def parse_conf(items: Sequence[str]) -> dict[str, str]:
    conf: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"--spark-conf {item.split('=', 1)[0]!r}: expected KEY=VALUE", code="USAGE")
        conf[key.strip()] = value
    return conf


def is_local_master(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def require_pyspark() -> Any:
    """pyspark, imported here only: `dmrepl --help` and the local engine never load it."""
    try:
        import pyspark.sql
    except ImportError:
        raise MissingExtraError(EXTRA_HINT) from None
    return pyspark.sql


def session_conf(settings: SparkSettings) -> dict[str, str]:
    """The conf dmrepl starts a session with: the user's `--spark-conf`, speculation forced off, and for a local
    master, whose JVM only schedules tasks and passes their small results, a quicker start (no web UI, the quick JIT
    compiler alone: 2-3 s of a sync's start-up on 2 cores; docs/scale-out.md). The user's values win but for
    speculation."""
    conf = dict(settings.conf)
    if settings.master.startswith("sc://"):
        return conf
    conf["spark.speculation"] = "false"
    conf.setdefault("spark.ui.showConsoleProgress", "false")  # dmrepl draws its own progress
    conf.setdefault("spark.log.level", "ERROR")
    if is_local_master(settings.master):
        conf.setdefault("spark.ui.enabled", "false")
        conf.setdefault("spark.driver.extraJavaOptions", LOCAL_DRIVER_JAVA_OPTIONS)
    return conf


def session(settings: SparkSettings) -> Any:
    """The SparkSession of this driver (an existing one is reused: a test session, a notebook's)."""
    sql = require_pyspark()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"pyspark\.")  # pandas-version notices
    builder = sql.SparkSession.builder.appName("dmrepl sync")
    master = settings.master
    if master.startswith("sc://"):
        builder = builder.remote(master)
    else:
        builder = builder.master(master)
        if is_local_master(master):
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the local executors need this dmrepl
    for key, value in session_conf(settings).items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:
        raise SystemFailure(f"cannot start Spark with --master {shown(master)}: {_first_line(exc)}") from None
    try:
        speculation = str(spark.conf.get("spark.speculation", "false")).lower()
    except Exception:
        speculation = "false"
    if speculation == "true":
        raise InvalidInputError(
            "the Spark session has spark.speculation=true: a speculative task would publish its shard twice; "
            "turn it off for dmrepl's jobs",
            code="SPARK_SPECULATION",
        )
    return spark


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for marker in ("dmrepl.", "Exception:", "Error:"):
        for line in reversed(text.splitlines()):
            if marker in line and line.strip():
                return line.strip()[:300]
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# --- the task: runs on an executor, with no registry, keyring or Spark API ----------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """One shard as the driver planned it; `key` names its records in the work dir, and changes with anything that
    changes what the shard does (its range, what a resume skips, the replications it delivers to)."""

    key: str
    shard: Shard
    resume: Resume | None
    budget: int | None


@dataclass(frozen=True)
class TaskSpec:
    """The whole job, in the mapped function's closure (bindings included: see the module docstring)."""

    bindings: list[ReplicationBinding]
    options: ShardOptions
    work_dir: WorkDir
    prefix: str
    descriptors: list[Descriptor]
    checkpoint_lines: int = CHECKPOINT_LINES
    fail_hook: str | None = None


def _fresh(shard: Shard) -> dict[str, Any]:
    return {
        "offset": shard.start,
        "line": 0,
        "lines": 0,
        "counts": {},
        "rejects": [],  # [line, reason, end offset]
        "oversize": [],
        "delivered": {},
        "rejected": {},
        "failures": {},
        "attempts": 0,
        "duplicates": 0,
        "stopped": None,
    }


def _shard_frames(shard: Shard, offset: int, line: int, max_bytes: int, state: list[int]) -> Iterator[Frame]:
    """The shard's lines from `offset` (a line boundary; in the decompressed stream for gzip), numbered on from
    `line`, relative to the shard's start as `ShardRunner` numbers them."""
    source = open_source(shard.url, size=shard.size or None, version=shard.version)
    if shard.compressed:
        import gzip

        with source.open() as raw:
            stream = io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20)  # type: ignore[arg-type]
            remaining = offset
            while remaining > 0:
                chunk = stream.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            yield from frame_lines(stream.readline, offset, line, max_bytes, state)
        return
    end = shard.end if shard.end is not None else source.size
    f: IO[bytes]
    with source.open(end=end) as f:
        f.seek(offset)
        yield from frame_lines(f.readline, offset, line, max_bytes, state, end)


def _chunks(frames: Iterator[Frame], lines: int) -> Iterator[list[Frame]]:
    chunk: list[Frame] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) >= lines:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fail_hook(spec: TaskSpec, lines_this_attempt: int) -> None:
    if not spec.fail_hook:
        return
    marker, _, n = spec.fail_hook.rpartition(":")
    if lines_this_attempt >= int(n) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("failed once\n")
        raise RuntimeError("dmrepl test hook: this task attempt fails once")


def run_task(spec: TaskSpec, d: Descriptor) -> dict[str, Any]:
    """Run one shard from its checkpoint, checkpointing after every chunk; its final record, also written to the
    work dir. An export or work dir that cannot be read is returned as `error` (a retry would fail the same way);
    anything else raises, and Spark retries the task."""
    wd = spec.work_dir
    done_name, cp_name = f"{spec.prefix}/done/{d.key}.json", f"{spec.prefix}/checkpoints/{d.key}.json"
    try:
        done = wd.read(done_name)
        if done is not None:
            return done
        st = wd.read(cp_name) or _fresh(d.shard)
        retried = st["attempts"] > 0
        st["attempts"] += 1
        wd.write(cp_name, st)  # a later attempt knows it is a retry
        return _run(spec, d, st, retried, cp_name, done_name)
    except (DmreplError, OSError) as exc:
        message = exc.message if isinstance(exc, DmreplError) else describe(exc)
        return {"error": message}


def _run(spec: TaskSpec, d: Descriptor, st: dict[str, Any], retried: bool, cp_name: str, done_name: str) -> dict:
    shard = d.shard
    failed = set(st["failures"])
    bindings = [b for b in spec.bindings if b.rep_id not in failed]
    base_delivered = dict(st["delivered"])
    base_rejected = dict(st["rejected"])
    attempt_lines = 0
    first_chunk = True
    fstate = [st["offset"], st["line"]]
    with ShardRunner(bindings, spec.options) as runner:
        frames = _shard_frames(shard, st["offset"], st["line"], spec.options.max_line_bytes, fstate)
        try:
            for chunk in _chunks(frames, spec.checkpoint_lines):
                budget = None if d.budget is None else max(0, d.budget - len(st["rejects"]))
                result = runner.run(LineChunk(shard.seq, shard.file_index, shard.format, chunk), d.resume, budget)
                attempt_lines += len(chunk)
                _fail_hook(spec, attempt_lines)
                acks = runner.flush()
                ends = {f[0]: f[1] for f in chunk}
                st["lines"] += result.lines
                for k, v in result.counts.items():
                    st["counts"][k] = st["counts"].get(k, 0) + v
                st["rejects"] += [[r.line, r.reason, ends.get(r.line, 0)] for r in result.rejects]
                st["oversize"] += [list(o) for o in result.oversize]
                for rep_id in acks.delivered:
                    st["delivered"][rep_id] = base_delivered.get(rep_id, 0) + acks.delivered[rep_id]
                    st["rejected"][rep_id] = base_rejected.get(rep_id, 0) + acks.rejected.get(rep_id, 0)
                for rep_id, failure in acks.failures.items():
                    st["failures"][rep_id] = failure.to_dict()
                if retried and first_chunk:  # what the failed attempt may have sent beyond its checkpoint
                    st["duplicates"] += sum(result.counts.values())
                first_chunk = False
                if result.stopped is not None:
                    st["stopped"] = list(result.stopped)
                    st["line"], st["offset"] = result.stopped
                    break
                st["line"], st["offset"] = chunk[-1][0], chunk[-1][1]
                spec.work_dir.write(cp_name, st)
        finally:
            frames.close()  # type: ignore[attr-defined]
    if st["stopped"] is None:
        st["offset"], st["line"] = fstate
    spec.work_dir.write(done_name, st)
    return st


def _partition_function(spec: TaskSpec) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def run_partition(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        for batch in batches:
            for i in batch.column(0).to_pylist():
                record = run_task(spec, spec.descriptors[i])
                yield pa.RecordBatch.from_pylist([{"i": i, "record": json.dumps(record)}])

    return run_partition


# --- the driver's side --------------------------------------------------------------------------------------------


class SparkJobError(SystemFailure):
    code = "SPARK_JOB_FAILED"


def shard_key(shard: Shard, resume: Resume | None, rep_ids: Sequence[str], budget: int | None) -> str:
    what = {
        "file": shard.file_index,
        "url": shard.url,
        "start": shard.start,
        "end": shard.end,
        "first_line": shard.first_line,
        "compressed": shard.compressed,
        "resume": None if resume is None else [resume.counted_until, sorted(resume.delivered_until.items())],
        "reps": sorted(rep_ids),
        "budget": budget,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


class SparkExecutor:
    """Collects the coordinator's shards and runs them as one Spark job at each `flush` (the coordinator flushes
    once, after planning every file: `deferred`). Gzip files are whole shards, read by their task (`whole_gzip`)."""

    deferred = True
    whole_gzip = True

    def __init__(
        self,
        bindings: Sequence[ReplicationBinding],
        options: ShardOptions,
        on_result: Callable[[Work, ShardResult], None],
        settings: SparkSettings,
        work_dir: WorkDir,
        prefix: str,
        *,
        progress: Callable[[int, int], None] | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """`progress(bytes, operations)`: of the shards done, while a job runs. `stop`: polled meanwhile; when it
        says so, the job is cancelled and `Interrupted` raised (every shard keeps its checkpoint in the work dir)."""
        self.bindings = list(bindings)
        self.options = options
        self.on_result = on_result
        self.settings = settings
        self.work_dir = work_dir
        self.prefix = prefix
        self.progress = progress
        self.stop = stop
        self.seen: dict[str, tuple[int, int]] = {}  # shard key → (bytes, operations), for progress
        self.spark = session(settings)
        self.pending: list[tuple[Shard, Resume | None, int | None]] = []
        self.totals = Acks()
        self.dropped: set[str] = set()
        self.possible_duplicates = 0
        self.stop_merging = False
        self.rejects_seen = 0
        #: Shards sent to Spark (not those an earlier run of the execution finished).
        self.submitted = 0

    def range_bytes(self, size: int) -> int:
        """Depends on the size only: a resumed execution plans the same shards, and finds their records."""
        return max(SHARD_MIN_BYTES, min(SHARD_MAX_BYTES, size // 8))

    def submit(self, work: Work, resume: Resume | None = None, reject_budget: int | None = None) -> None:
        if not isinstance(work, Shard):
            raise TypeError("the Spark engine runs shards, not framed lines")
        self.pending.append((work, resume, reject_budget))

    def drop(self, rep_id: str) -> None:
        self.dropped.add(rep_id)
        self.bindings = [b for b in self.bindings if b.rep_id != rep_id]

    def close(self) -> None:
        self.pending = []

    def kill(self) -> None:
        self.pending = []
        with contextlib.suppress(Exception):
            self.spark.interruptAll()

    def flush(self) -> Acks:
        if self.pending:
            pending, self.pending = self.pending, []
            if pending[0][2] is not None:
                pending = self._within_budget(pending, pending[0][2])
            records = self._run_job(pending)
            for (shard, _resume, budget), record in zip(pending, records, strict=True):
                if "error" in record:
                    raise InvalidInputError(record["error"], code="INVALID_EXPORT")
                self._account(record)
                if not self.stop_merging:
                    self.on_result(shard, self._result(shard, record, budget))
        return Acks(dict(self.totals.delivered), dict(self.totals.rejected), dict(self.totals.failures))

    def _account(self, record: dict[str, Any]) -> None:
        self.possible_duplicates += record.get("duplicates", 0)
        for rep_id, n in record["delivered"].items():
            if rep_id not in self.dropped:
                self.totals.delivered[rep_id] = self.totals.delivered.get(rep_id, 0) + n
                self.totals.rejected[rep_id] = self.totals.rejected.get(rep_id, 0) + record["rejected"].get(rep_id, 0)
        for rep_id, failure in record["failures"].items():
            if rep_id not in self.totals.failures and rep_id not in self.dropped:
                self.totals.failures[rep_id] = Failure(failure["code"], failure["message"])

    def _result(self, shard: Shard, record: dict[str, Any], budget: int | None) -> ShardResult:
        """The task's record as the coordinator merges it. With --max-rejects only the crossing shard has a budget
        (`_within_budget`), and its result ends at the reject that crosses the limit."""
        rejects = record["rejects"]
        end_offset, last_line = record["offset"], record["line"]
        stopped = tuple(record["stopped"]) if record["stopped"] else None
        if budget is not None:
            allowed = budget - self.rejects_seen
            if len(rejects) > allowed:
                crossing = rejects[allowed]
                rejects = rejects[: allowed + 1]
                stopped = (crossing[0], crossing[2])
                last_line, end_offset = stopped
                self.stop_merging = True
            self.rejects_seen += len(rejects)
        return ShardResult(
            shard.seq,
            shard.file_index,
            end_offset,
            last_line,
            record["lines"],
            dict(record["counts"]),
            [LineReject(r[0], r[1]) for r in rejects],
            [Oversize(*o) for o in record["oversize"] if stopped is None or o[0] <= stopped[0]],
            None,
            stopped,  # type: ignore[arg-type]
        )

    def _within_budget(
        self, pending: list[tuple[Shard, Resume | None, int | None]], budget: int
    ) -> list[tuple[Shard, Resume | None, int | None]]:
        """--max-rejects, exactly as on one machine: no line after the reject that crosses the limit is delivered.
        Shards run in parallel, so a first job only converts (no replication) and counts each shard's rejects; then
        only the shards up to the crossing one are delivered, that one stopping right after its crossing reject."""
        dry = self._run_job(pending, bindings=[], prefix=f"{self.prefix}/rejects-pass")
        seen = 0
        for i, record in enumerate(dry):
            if "error" in record:
                return pending[: i + 1]  # the delivery job meets the same error, in its place
            n = len(record["rejects"])
            if seen + n > budget:
                shard, resume, _ = pending[i]
                return [(s, r, None) for s, r, _ in pending[:i]] + [(shard, resume, budget - seen)]
            seen += n
        return [(s, r, None) for s, r, _ in pending]

    def _run_job(
        self,
        pending: list[tuple[Shard, Resume | None, int | None]],
        *,
        bindings: list[ReplicationBinding] | None = None,
        prefix: str | None = None,
    ) -> list[dict[str, Any]]:
        bindings = self.bindings if bindings is None else bindings
        prefix = self.prefix if prefix is None else prefix
        rep_ids = [b.rep_id for b in bindings]
        planned = [Descriptor(shard_key(s, r, rep_ids, b), s, r, b) for s, r, b in pending]
        records: list[dict[str, Any] | None] = [
            self.work_dir.read(f"{prefix}/done/{d.key}.json") for d in planned
        ]  # done by an earlier run of this execution (a driver killed after they finished): not submitted again
        todo = [i for i, r in enumerate(records) if r is None]
        if todo:
            submitted = self._submit_job([planned[i] for i in todo], len(planned), bindings, prefix)
            for i, record in zip(todo, submitted, strict=True):
                records[i] = record
        return records  # type: ignore[return-value]

    def _submit_job(
        self, descriptors: list[Descriptor], planned: int, bindings: list[ReplicationBinding], prefix: str
    ) -> list[dict[str, Any]]:
        report = prefix == self.prefix  # the conversion-only pass of --max-rejects shows no progress
        spec = TaskSpec(
            bindings,
            self.options,
            self.work_dir,
            prefix,
            descriptors,
            checkpoint_lines=CHECKPOINT_LINES,
            fail_hook=os.environ.get(FAIL_HOOK_ENV) or None,
        )
        n = len(descriptors)
        self.submitted += n
        df = self.spark.range(0, n, 1, numPartitions=n).mapInArrow(_partition_function(spec), "i long, record string")
        outcome: dict[str, Any] = {}

        def collect() -> None:
            try:
                outcome["rows"] = df.collect()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=collect, name="dmrepl-spark-job", daemon=True)
        thread.start()
        keys = {d.key: d for d in descriptors}
        interval = 2.0 if self.work_dir.remote else 0.25
        try:
            while thread.is_alive():
                thread.join(interval)
                if self.stop():
                    raise Interrupted()
                if report:
                    self._report(keys, n, planned)
        except BaseException:
            self.kill()
            raise
        if "error" in outcome:
            raise SparkJobError(f"the Spark job failed: {_first_line(outcome['error'])}")
        by_index: dict[int, dict[str, Any]] = {}
        for row in outcome["rows"]:
            by_index[row["i"]] = json.loads(row["record"])
        if len(by_index) != n:
            raise SparkJobError("the Spark job returned fewer shard results than it had shards")
        if report:
            self._report(keys, n, planned)
        return [by_index[i] for i in range(n)]

    def _report(self, keys: dict[str, Descriptor], n: int, planned: int) -> None:
        """Shards done out of those planned (those an earlier run finished count as done), their bytes and
        operations: read from the work dir, each shard's record once."""
        try:
            names = self.work_dir.names(f"{self.prefix}/done")
            for name in names:
                key = name.removesuffix(".json")
                d = keys.get(key)
                if d is None or key in self.seen:
                    continue
                record = self.work_dir.read(f"{self.prefix}/done/{name}") or {}
                shard = d.shard
                size = shard.size if shard.compressed else (shard.end or shard.size) - shard.start
                self.seen[key] = (size, sum(record.get("counts", {}).values()))
        except (OSError, ValueError):
            return
        done = [v for k, v in self.seen.items() if k in keys]
        if self.settings.on_shards is not None:
            self.settings.on_shards(planned - n + len(done), planned)
        if self.progress is not None:
            self.progress(sum(b for b, _ in done), sum(o for _, o in done))


def work_dir_for(settings: SparkSettings, default: str) -> WorkDir:
    """--work-dir, else the execution's own directory, which only a local master's executors can reach."""
    if settings.work_dir:
        return WorkDir(settings.work_dir)
    if not is_local_master(settings.master):
        raise InvalidInputError(
            f"--master {shown(settings.master)} needs --work-dir URL: a directory or bucket prefix every executor can "
            "write (gs://, abfs://, s3://, or a shared file system)",
            code="USAGE",
        )
    return WorkDir(default)


def check_work_dir(url: str | None) -> None:
    if url and is_url(url):
        WorkDir(url).names("")  # the extra and the credentials, before anything is recorded


__all__ = [
    "ENGINES",
    "EXTRA_HINT",
    "SparkExecutor",
    "SparkSettings",
    "parse_conf",
    "require_pyspark",
    "run_task",
    "session",
]
