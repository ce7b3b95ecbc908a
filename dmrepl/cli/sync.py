"""`dmrepl sync …`: initial synchronizations (start, resume, plan, list, show)."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from dmrepl import executions
from dmrepl.cli.render import Col, State, key_values, registry_of, state_of, table
from dmrepl.cli.replication import finite
from dmrepl.cli.signals import graceful_stop
from dmrepl.errors import DeliveryFailedError, InvalidInputError
from dmrepl.models import DEFAULT_MAX_LINE_BYTES, DEFAULT_RETRY_BUDGET_S, Execution
from dmrepl.sync import options as sync_options

app = typer.Typer(
    help="Initial synchronizations: replay a datamart export into every ACTIVE replication.", no_args_is_help=True
)

# str, not Path: a Path would fold the // of gs://bucket/key.
ExportsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="EXPORT...",
        help="NDJSON export files, plain or gzip: local paths, or gs://, abfs://, az://, s3:// URLs and patterns "
        "(gs://bucket/exports/*.ndjson.gz).",
        show_default=False,
    ),
]
DatamartOpt = Annotated[str | None, typer.Option(help="Datamart id (default: the only one).")]
ExportFormat = enum.StrEnum("ExportFormat", {name: name for name in sync_options.FORMATS})  # type: ignore[misc]
FormatOpt = Annotated[
    ExportFormat,  # type: ignore[valid-type]
    typer.Option("--format", help="Line format (auto: detected per file)."),
]
MaxLineOpt = Annotated[int, typer.Option("--max-line-bytes", help="Longer lines are rejected.", min=1024)]
RetryOpt = Annotated[
    float | None,
    typer.Option(
        "--retry-budget",
        help=f"Seconds of retries of transient failures before ERROR (default {DEFAULT_RETRY_BUDGET_S:g}).",
        min=0,
    ),
]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bar (automatic when not a TTY).")]
CheckpointOpt = Annotated[
    float,
    typer.Option(
        "--checkpoint-every",
        help="Seconds between checkpoints (at most that much is re-sent on resume).",
        min=0.05,
        callback=finite,
    ),
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", help="Processes converting user points (default: automatic, up to 4 on large exports).", min=0
    ),
]
ExecArg = Annotated[str, typer.Argument(metavar="EXEC", help="Execution id (see dmrepl sync list).")]
Engine = enum.StrEnum("Engine", {"local": "local", "spark": "spark"})  # type: ignore[misc]
EngineOpt = Annotated[
    Engine | None,  # type: ignore[valid-type]
    typer.Option(
        "--engine",
        help="Where shards run: local (this machine; default) or spark (this process is the Spark driver).",
        show_default=False,
    ),
]
MasterOpt = Annotated[
    str | None,
    typer.Option(
        "--master",
        metavar="URL",
        help="Spark master: local[N], spark://…, yarn, k8s://…, or sc://… (Spark Connect). Default: $SPARK_REMOTE, "
        "else local[*].",
        show_default=False,
    ),
]
SparkConfOpt = Annotated[
    list[str] | None,
    typer.Option("--spark-conf", metavar="KEY=VALUE", help="Spark setting (repeatable).", show_default=False),
]
WorkDirOpt = Annotated[
    str | None,
    typer.Option(
        "--work-dir",
        metavar="URL",
        help="Where Spark tasks keep shard checkpoints: a path or gs://, abfs://, s3:// prefix every executor "
        "reaches (default: the execution's directory, local masters only).",
        show_default=False,
    ),
]


def _spark_settings(
    state: State, engine: str, master: str | None, conf: list[str] | None, work_dir: str | None, *, recorded: Any = None
) -> Any:
    """The Spark engine's settings, checked before anything is recorded (a missing extra: exit 4); None for the
    local engine. `recorded`: what the execution last ran with, for a resume's defaults."""
    recorded = recorded or {}
    if engine != "spark":
        if master or conf or work_dir:
            raise InvalidInputError("--master, --spark-conf and --work-dir need --engine spark", code="USAGE")
        return None
    from dmrepl.sync import spark

    spark.require_pyspark()
    settings = spark.SparkSettings(
        master=master or recorded.get("master") or os.environ.get("SPARK_REMOTE") or "local[*]",
        conf=spark.parse_conf(conf or []),
        work_dir=work_dir or recorded.get("work_dir"),
    )
    spark.work_dir_for(settings, "")  # a non-local master without --work-dir: said now
    spark.check_work_dir(settings.work_dir)
    return settings


def _announce_duplicates(state: State, outcome: sync_options.Outcome) -> None:
    if outcome.possible_duplicates:
        state.info(
            f"{outcome.execution.id}: Spark retried shard tasks: up to {outcome.possible_duplicates} operation(s) "
            "may have been delivered twice (delivery is at-least-once)"
        )


def _api() -> Any:
    """The sync engine, imported by the commands that run it only: `dmrepl --help` and `sync list` stay fast."""
    from dmrepl.sync import api

    return api


@contextlib.contextmanager
def _progress(state: State, disabled: bool, spark: Any = None) -> Iterator[sync_options.ProgressHook | None]:
    """A Rich bar on stderr for people at a terminal; nothing for cron, pipes, --quiet or --json. With the Spark
    engine, it shows the shards done while the job runs."""
    if disabled or state.quiet or state.json or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.monotonic()
    with Progress(
        TextColumn("sync"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[shards]}"),
        TimeRemainingColumn(),
        console=state.err,
        transient=True,
        auto_refresh=False,  # no refresh thread: the engine calls back often enough, and it can fork its workers
    ) as bar:
        task = bar.add_task("sync", total=None, rate="", shards="")

        if spark is not None:

            def shards(done: int, total: int) -> None:
                bar.update(task, shards=f"{done}/{total} shards")
                bar.refresh()

            spark.on_shards = shards

        def update(done: int, total: int, operations: int) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(task, completed=done, total=total, rate=f"{operations / elapsed:,.0f} ops/s")
            bar.refresh()

        yield update


DOC_TYPE_COLUMNS = [Col("DOC TYPE", "id"), Col("OPERATIONS", "number")]


def _summary(state: State, e: Execution) -> None:
    state.out.print(
        key_values(
            [
                ("execution", e.id),
                ("datamart", e.datamart),
                ("status", e.status),
                ("started", e.started_at),
                ("finished", e.finished_at),
                ("duration", f"{e.duration_s} s" if e.duration_s is not None else None),
                ("files", ", ".join(f"{Path(f.name).name} ({f.size} B)" for f in e.files)),
                ("lines read", e.lines_read),
                ("operations", sum(e.operations.values())),
                ("rejected lines", e.rejects),
                ("rejects file", e.rejects_file if e.rejects else None),
                ("error", e.error),
            ]
        )
    )
    if e.operations:
        state.out.print(table(DOC_TYPE_COLUMNS, sorted(e.operations.items())))
    if e.replications:
        rows = [
            (rid, r.name, r.type, r.status or "", r.delivered, r.failed, r.rejected)
            for rid, r in e.replications.items()
        ]
        columns = [
            Col("REPLICATION", "id"),
            Col("NAME", "id"),
            Col("TYPE", "id", 1),
            Col("RESULT", "id"),
            Col("DELIVERED", "number"),
            Col("FAILED", "number"),
            Col("REJECTED", "number"),
        ]
        state.out.print(table(columns, rows))


def _conclude(state: State, outcome: sync_options.Outcome) -> None:
    e = outcome.execution
    state.emit(e, lambda: _summary(state, e))
    if outcome.aborted:
        raise InvalidInputError(f"{e.id} aborted: {outcome.aborted}", code="MAX_REJECTS")
    if outcome.errored:
        others = len(e.replications) - len(outcome.errored)
        completed = f"; the {others} other replication(s) completed" if others else ""
        raise DeliveryFailedError(
            f"{e.id} FAILED: {e.error}{completed} (after dmrepl recreate + activate, dmrepl sync resume {e.id} "
            "catches up)",
            code="REPLICATION_ERROR",
        )


def _announce(state: State, action: str) -> Callable[[Execution], None]:
    def started(e: Execution) -> None:
        state.info(
            f"{action} {e.id} on datamart {e.datamart} (pid {e.pid}) → {len(e.replications)} "
            f"replication(s); interrupt safely with Ctrl-C, continue with dmrepl sync resume {e.id}"
        )

    return started


def _stopping(state: State) -> Callable[[], None]:
    return lambda: state.info("stopping the synchronization at the next checkpoint (interrupt again to abort at once)")


@app.command("start")
def start(
    ctx: typer.Context,
    exports: ExportsArg,
    datamart: DatamartOpt = None,
    fmt: FormatOpt = ExportFormat.auto,  # type: ignore[attr-defined]
    max_rejects: Annotated[
        int | None, typer.Option("--max-rejects", help="Abort when more than N lines are rejected.", min=0)
    ] = None,
    max_line_bytes: MaxLineOpt = DEFAULT_MAX_LINE_BYTES,
    retry_budget: RetryOpt = None,
    checkpoint_every: CheckpointOpt = sync_options.CHECKPOINT_INTERVAL_S,
    workers: WorkersOpt = 0,
    engine: EngineOpt = None,
    master: MasterOpt = None,
    spark_conf: SparkConfOpt = None,
    work_dir: WorkDirOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Replay EXPORT... into every replication of the datamart that is ACTIVE now (at most once a week)."""
    state = state_of(ctx)
    spark = _spark_settings(state, str(engine.value) if engine else "local", master, spark_conf, work_dir)
    opts = sync_options.SyncOptions(
        fmt=str(fmt.value),
        max_rejects=max_rejects,
        max_line_bytes=max_line_bytes,
        retry_budget_s=DEFAULT_RETRY_BUDGET_S if retry_budget is None else retry_budget,
        checkpoint_interval_s=checkpoint_every,
        workers=workers,
        spark=spark,
    )
    with graceful_stop(_stopping(state)) as stop, _progress(state, no_progress, spark) as progress:
        outcome = _api().start(
            registry_of(ctx),
            exports,
            datamart=datamart,
            opts=opts,
            progress=progress,
            on_started=_announce(state, "started"),
            stop=stop.is_set,
        )
    _announce_duplicates(state, outcome)
    _conclude(state, outcome)


@app.command("resume")
def resume(
    ctx: typer.Context,
    exec_id: ExecArg,
    retry_budget: RetryOpt = None,
    checkpoint_every: CheckpointOpt = sync_options.CHECKPOINT_INTERVAL_S,
    engine: Annotated[
        Engine | None,  # type: ignore[valid-type]
        typer.Option(
            "--engine",
            help="Where shards run: local or spark (default: the engine the execution last ran on).",
            show_default=False,
        ),
    ] = None,
    master: MasterOpt = None,
    spark_conf: SparkConfOpt = None,
    work_dir: WorkDirOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Continue an interrupted, failed or stale execution from its last checkpoint (nothing is lost)."""
    state = state_of(ctx)
    registry = registry_of(ctx)
    recorded = _api().recorded_engine(registry, exec_id)
    chosen = str(engine.value) if engine else str(recorded.get("engine", "local"))
    spark = _spark_settings(
        state, chosen, master, spark_conf, work_dir, recorded=recorded if chosen == recorded.get("engine") else None
    )
    with graceful_stop(_stopping(state)) as stop, _progress(state, no_progress, spark) as progress:
        outcome = _api().resume(
            registry,
            exec_id,
            spark=spark,
            progress=progress,
            retry_budget_s=retry_budget,
            checkpoint_interval_s=checkpoint_every,
            on_started=_announce(state, "resumed"),
            stop=stop.is_set,
        )
    _announce_duplicates(state, outcome)
    _conclude(state, outcome)


@app.command("plan")
def plan(
    ctx: typer.Context,
    exports: ExportsArg,
    datamart: DatamartOpt = None,
    fmt: FormatOpt = ExportFormat.auto,  # type: ignore[attr-defined]
    max_line_bytes: MaxLineOpt = DEFAULT_MAX_LINE_BYTES,
) -> None:
    """Dry run: who would receive what, rejects, and when the weekly rule allows a run. Sends nothing."""
    state = state_of(ctx)
    result = _api().plan(
        registry_of(ctx),
        exports,
        datamart=datamart,
        opts=sync_options.SyncOptions(fmt=str(fmt.value), max_line_bytes=max_line_bytes),
    )

    def human() -> None:
        state.out.print(
            key_values(
                [
                    ("datamart", f"{result['datamart']} ({result['user_point_system_version']})"),
                    ("files", ", ".join(f"{Path(f['name']).name} ({f['format']})" for f in result["files"])),
                    ("lines", result["lines"]),
                    ("operations", result["operations_total"]),
                    ("rejected lines", result["rejects"]),
                    ("next run allowed", result["next_allowed"]),
                ]
            )
        )
        if result["operations"]:
            state.out.print(table(DOC_TYPE_COLUMNS, sorted(result["operations"].items())))
        rows = [(r["id"], r["name"], r["type"], "yes", "ACTIVE") for r in result["would_receive"]]
        rows += [(r["id"], r["name"], r["type"], "no", r["why"]) for r in result["would_not_receive"]]
        if rows:
            columns = [
                Col("REPLICATION", "id"),
                Col("NAME", "id"),
                Col("TYPE", "id", 1),
                Col("RECEIVES", "id"),
                Col("WHY", "text"),
            ]
            state.out.print(table(columns, rows))
        for s in result["reject_samples"][:10]:
            state.out.print(f"reject: {s['file']}:{s['line']}: {s['reason']}", markup=False)
        for r in result["refusals"]:
            state.out.print(f"a start would be refused now: {r['message']}", markup=False)

    state.emit(result, human)


@app.command("list")
def list_cmd(ctx: typer.Context, datamart: DatamartOpt = None) -> None:
    """The dashboard: every execution, newest first."""
    state = state_of(ctx)
    listed = executions.list_executions(registry_of(ctx), datamart=datamart)

    def human() -> None:
        if not listed:
            state.info("no initial synchronization yet (dmrepl sync start EXPORT...)")
            return
        rows = [
            (
                e.id,
                e.datamart,
                e.status,
                e.started_at,
                f"{e.duration_s} s" if e.duration_s is not None else "",
                f"{e.progress.percent:.0f}%",
                sum(e.operations.values()),
                e.rejects,
                " ".join(f"{r.name}:{r.delivered}" for r in e.replications.values()),
            )
            for e in listed
        ]
        columns = [
            Col("EXECUTION", "id"),
            Col("DATAMART", "id", 5),
            Col("STATUS", "id"),
            Col("STARTED", "id"),
            Col("DURATION", "number", 4),
            Col("READ", "number"),
            Col("OPS", "number", 3),
            Col("REJECTS", "number", 2),
            Col("DELIVERED", "text", 1),
        ]
        state.out.print(table(columns, rows))

    state.emit(listed, human)


@app.command("show")
def show(ctx: typer.Context, exec_id: ExecArg) -> None:
    """One execution: files, counts by doc type, delivered and failed per replication, rejects, error."""
    state = state_of(ctx)
    e = executions.show(registry_of(ctx), exec_id)
    state.emit(e, lambda: _summary(state, e))
