"""The initial synchronizations' API: `plan` reads and counts without sending; `start` and `resume` hand an
execution to a `Coordinator`, which splits the exports into shards (`dmrepl.sync.shard`) and runs them in this process
or in worker processes (`dmrepl.sync.pool`). See ARCHITECTURE.md for the data path."""

from __future__ import annotations

import json
import os
import secrets as _random
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmrepl import datamarts, executions, storage
from dmrepl.errors import InvalidInputError
from dmrepl.executions import list_executions, show
from dmrepl.exports import ExportError, ExportReader
from dmrepl.files import atomic_write, private_dir
from dmrepl.models import Checkpoint, Execution, Replication, SourceFile, Status
from dmrepl.operations import DOC_TYPE
from dmrepl.registry import Registry
from dmrepl.sync.coordinator import Coordinator, Hasher, load_checkpoint
from dmrepl.sync.options import CHECKPOINT_INTERVAL_S, FORMATS, Outcome, ProgressHook, SyncOptions

if TYPE_CHECKING:
    from dmrepl.sync.spark import SparkSettings

__all__ = [
    "CHECKPOINT_INTERVAL_S",
    "FORMATS",
    "Outcome",
    "ProgressHook",
    "SyncOptions",
    "list_executions",
    "plan",
    "resume",
    "show",
    "start",
]


def open_readers(
    paths: Sequence[str | Path],
    system_version: str,
    start_ts: int,
    opts: SyncOptions,
    *,
    expand: bool = True,
) -> list[ExportReader]:
    """`paths`: local paths and object URLs; with `expand`, URL glob patterns are expanded (the shell expands local
    ones). A resume passes the names recorded at the start, expand=False: an object named `a[1].ndjson` is itself."""
    readers = []
    try:
        sources = storage.resolve(paths, expand=expand)
    except ExportError as exc:
        raise InvalidInputError(str(exc), code=exc.code) from None
    for source in sources:
        try:
            readers.append(
                ExportReader(
                    source,
                    fmt=opts.fmt,
                    system_version=system_version,
                    start_ts=start_ts,
                    max_line_bytes=opts.max_line_bytes,
                )
            )
        except ExportError as exc:
            raise InvalidInputError(str(exc), code="INVALID_EXPORT") from None
    return readers


def describe_files(readers: Sequence[ExportReader], *, hashes: bool = True) -> list[SourceFile]:
    """What each export is now: its size, and what identifies its content (an object's generation or ETag, else a
    sha256), for a resume to refuse an export that changed."""
    return [
        SourceFile(
            name=r.source.name,
            size=r.size,
            mtime_ns=r.source.mtime_ns,
            format=r.format,
            compressed=r.compressed,
            sha256=r.source.sha256() if hashes and r.source.version is None else None,
            version=r.source.version,
        )
        for r in readers
    ]


def refuse_exports_as_destinations(readers: Sequence[ExportReader], replications: Sequence[Replication]) -> None:
    """A file replication writing into one of the exports would append to its own input as it reads it."""
    for rep in replications:
        path = rep.settings.get("path") if rep.type == "file" else None
        if not path or not os.path.exists(path):
            continue
        for reader in readers:
            if not reader.source.remote and os.path.samefile(path, reader.path):
                raise InvalidInputError(
                    f"{reader.path}: this export is the file replication {rep.name}'s --path ({path}); "
                    "a sync would append to its own input: recreate the replication with another --path",
                    code="DESTINATION_IS_EXPORT",
                )


def changed(reader: ExportReader, recorded: SourceFile) -> bool:
    """Whether an export is no longer what the execution started from: by its version when the service gives one,
    else by sha256 (an execution stopped before its hasher finished has only the size and mtime to go by)."""
    source = reader.source
    if reader.size != recorded.size:
        return True
    if recorded.version is not None:
        return source.version != recorded.version
    if recorded.sha256 is not None:
        return source.sha256() != recorded.sha256
    return source.stamp() != (recorded.size, recorded.mtime_ns)


def _iso_or_now(allowed: datetime | None) -> str:
    return allowed.isoformat(timespec="seconds").replace("+00:00", "Z") if allowed else "now"


def plan(registry: Registry, paths: Sequence[str | Path], *, datamart: str | None, opts: SyncOptions) -> dict:
    """Dry run: read everything, send nothing."""
    data = registry.load()
    dm_id = datamarts.resolve(data, datamart)
    dm = data.datamarts[dm_id]
    start_ts = int(datetime.now(UTC).timestamp() * 1000)
    readers = open_readers(paths, dm.user_point_system_version, start_ts, opts)
    refuse_exports_as_destinations(readers, executions.active_replications(data, dm_id))
    counts: Counter[str] = Counter()
    rejects: list[dict[str, Any]] = []
    reject_count = lines = 0
    for reader in readers:
        for line in reader.lines():
            lines += 1
            if line.reject is not None:
                if len(rejects) < 100:
                    rejects.append({"file": str(reader.path), "line": line.line_no, "reason": line.reject})
                reject_count += 1
                continue
            counts.update(m[DOC_TYPE] for m in line.messages)
    receiving, not_receiving = [], []
    for rep in sorted(data.replications.values(), key=lambda r: r.name):
        if rep.datamart != dm_id:
            continue
        entry = {"id": rep.id, "name": rep.name, "type": rep.type, "status": str(rep.status)}
        if rep.status is Status.ACTIVE:
            receiving.append(entry)
        else:
            why = "PAUSED: activate it to include it" if rep.status is Status.PAUSED else "ERROR: recreate it first"
            not_receiving.append(entry | {"why": why})
    return {
        "datamart": dm_id,
        "user_point_system_version": dm.user_point_system_version,
        "files": [f.to_dict() for f in describe_files(readers)],
        "lines": lines,
        "operations": dict(sorted(counts.items())),
        "operations_total": sum(counts.values()),
        "rejects": reject_count,
        "reject_samples": rejects,
        "would_receive": receiving,
        "would_not_receive": not_receiving,
        "refusals": [{"code": c, "message": m} for c, m in executions.refusals(data, dm_id)],
        "next_allowed": _iso_or_now(executions.next_allowed(data, dm_id)),
    }


def start(
    registry: Registry,
    paths: Sequence[str | Path],
    *,
    datamart: str | None,
    opts: SyncOptions,
    progress: ProgressHook | None = None,
    on_started: Callable[[Execution], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    data = registry.load()
    dm_id = datamarts.resolve(data, datamart)
    started = datetime.now(UTC)
    start_ts = int(started.timestamp() * 1000)
    # Invalid input is named first (exit 4), whatever the datamart's state.
    readers = open_readers(paths, data.datamarts[dm_id].user_point_system_version, start_ts, opts)
    refuse_exports_as_destinations(readers, executions.active_replications(data, dm_id))
    executions.refuse_if_any(data, dm_id)
    files = describe_files(readers, hashes=False)
    hasher = Hasher([r.source for r in readers])  # started by the coordinator once worker processes are forked
    execution, active = executions.begin(
        registry,
        exec_id=f"sync-{started.strftime('%Y%m%d-%H%M%S')}-{_random.token_hex(2)}",
        datamart=dm_id,
        started=started,
        files=files,
        options=opts.recorded(),
    )
    if opts.spark is not None:
        record_engine(registry, execution.id, opts.spark.recorded())
    if on_started:
        on_started(execution)
    cp = Checkpoint.fresh(execution.replications)
    return Coordinator(
        registry, execution, readers, cp, active, opts, progress=progress, stop=stop, hasher=hasher
    ).run()


ENGINE_FILE = "engine.json"


def record_engine(registry: Registry, exec_id: str, engine: dict[str, Any]) -> None:
    """Beside the checkpoint: the engine a resume uses by default (never the Spark conf, which may hold a key)."""
    directory = private_dir(executions.execution_dir(registry, exec_id))
    atomic_write(directory / ENGINE_FILE, json.dumps(engine).encode("utf-8"))


def recorded_engine(registry: Registry, exec_id: str) -> dict[str, Any]:
    """The engine an execution last ran on: {"engine": "local"} when none was recorded."""
    path = executions.execution_dir(registry, exec_id) / ENGINE_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"engine": "local"}
    return recorded if isinstance(recorded, dict) else {"engine": "local"}


def resume(
    registry: Registry,
    exec_id: str,
    *,
    spark: SparkSettings | None = None,
    progress: ProgressHook | None = None,
    retry_budget_s: float | None = None,
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    on_started: Callable[[Execution], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    data = registry.load()
    execution = executions.find(data, exec_id)
    executions.check_resumable(data, execution)
    saved = execution.options
    opts = SyncOptions(
        fmt=saved.format,
        max_rejects=saved.max_rejects,
        max_line_bytes=saved.max_line_bytes,
        retry_budget_s=retry_budget_s if retry_budget_s is not None else saved.retry_budget_s,
        checkpoint_interval_s=checkpoint_interval_s,
        spark=spark,
    )
    readers = open_readers(
        [f.name for f in execution.files],
        execution.user_point_system_version,
        execution.start_ts,
        opts,
        expand=False,
    )
    for reader, f in zip(readers, execution.files, strict=True):
        if changed(reader, f):
            what = "generation" if f.version and f.version.startswith("generation:") else "ETag" if f.version else ""
            raise InvalidInputError(
                f"{f.name}: the export changed since the execution started (size or {what or 'sha256'} differs); "
                "start a new synchronization instead",
                code="EXPORT_CHANGED",
            )
    cp = load_checkpoint(executions.execution_dir(registry, exec_id), list(execution.replications))
    refuse_exports_as_destinations(readers, list(registry.load().replications.values()))
    execution, active = executions.reopen(registry, exec_id)
    record_engine(registry, exec_id, spark.recorded() if spark is not None else {"engine": "local"})
    if on_started:
        on_started(execution)
    return Coordinator(registry, execution, readers, cp, active, opts, progress=progress, stop=stop).run()
