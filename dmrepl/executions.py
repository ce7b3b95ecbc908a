"""Initial-synchronization executions as the registry keeps them: the weekly rule, the refusals, the status lock, and
the dashboard's list and show. The sync engine (`dmrepl.sync`) creates and updates executions through here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dmrepl import processes
from dmrepl.errors import NotFoundError, RefusedError
from dmrepl.files import private_dir
from dmrepl.models import (
    RESUMABLE,
    Execution,
    ExecutionOptions,
    ExecutionStatus,
    Progress,
    RegistryData,
    Replication,
    ReplicationResult,
    SourceFile,
    Status,
    iso,
    now_iso,
    parse_iso,
)
from dmrepl.registry import Registry

WEEKLY = timedelta(days=7)


def execution_dir(registry: Registry, exec_id: str) -> Path:
    """Large per-execution state (checkpoint, rejects) lives beside the registry, not in it."""
    return registry.root / "executions" / exec_id


def find(data: RegistryData, exec_id: str) -> Execution:
    try:
        return data.executions[exec_id]
    except KeyError:
        raise NotFoundError(f"execution {exec_id} not found (see dmrepl sync list)") from None


def effective_status(execution: Execution) -> ExecutionStatus:
    """RUNNING whose process is gone is shown as STALE: resumable, and it no longer blocks the datamart."""
    if execution.status is ExecutionStatus.RUNNING and not processes.is_alive(execution.pid, execution.pid_start):
        return ExecutionStatus.STALE
    return execution.status


def _last_success(data: RegistryData, datamart: str) -> datetime | None:
    starts = [
        parse_iso(e.started_at)
        for e in data.executions.values()
        if e.datamart == datamart and e.status is ExecutionStatus.SUCCEEDED and e.started_at
    ]
    return max(starts) if starts else None


def next_allowed(data: RegistryData, datamart: str) -> datetime | None:
    """The weekly rule: a SUCCEEDED execution that started less than 7 days ago blocks a new start. A start dated
    in the future (clock skew, a hand edit) blocks for 7 days from now at most, never longer."""
    last = _last_success(data, datamart)
    if last is None:
        return None
    now = datetime.now(UTC)
    allowed = min(last, now) + WEEKLY
    return allowed if allowed > now else None


def active_replications(data: RegistryData, datamart: str) -> list[Replication]:
    return sorted(
        (r for r in data.replications.values() if r.datamart == datamart and r.status is Status.ACTIVE),
        key=lambda r: r.name,
    )


def refusals(data: RegistryData, datamart: str) -> list[tuple[str, str]]:
    """Every reason a start would be refused now, as (code, message)."""
    out = []
    running = processes.running_execution(data, datamart)
    if running:
        out.append(
            (
                "SYNC_RUNNING",
                f"execution {running.id} is RUNNING on datamart {datamart} (pid {running.pid}, "
                f"{running.progress.percent:.0f}% read)",
            )
        )
    allowed = next_allowed(data, datamart)
    if allowed:
        last = _last_success(data, datamart)
        seen = ""
        if last is not None and last > datetime.now(UTC):
            seen = (
                f" (its recorded start, {iso(last)}, is in the future: a clock was wrong or the registry was edited; "
                "counting 7 days from now)"
            )
        out.append(
            (
                "WEEKLY_RULE",
                f"an initial synchronization of datamart {datamart} succeeded less than 7 days ago{seen}; the next one "
                f"is allowed from {allowed.isoformat(timespec='seconds').replace('+00:00', 'Z')}",
            )
        )
    if not active_replications(data, datamart):
        out.append(("NO_ACTIVE_REPLICATION", f"datamart {datamart} has no ACTIVE replication (dmrepl activate ID)"))
    return out


def refuse_if_any(data: RegistryData, datamart: str) -> None:
    for code, message in refusals(data, datamart):
        raise RefusedError(f"sync refused: {message}", code=code)


def mark_stale_failed(data: RegistryData, datamart: str) -> None:
    for e in data.executions.values():
        if e.datamart == datamart and effective_status(e) is ExecutionStatus.STALE:
            e.status = ExecutionStatus.FAILED
            e.error = f"process {e.pid} is gone (killed or crashed); resume with dmrepl sync resume {e.id}"


def begin(
    registry: Registry,
    *,
    exec_id: str,
    datamart: str,
    started: datetime,
    files: Sequence[SourceFile],
    options: ExecutionOptions,
) -> tuple[Execution, list[Replication]]:
    """Record a new RUNNING execution for the replications ACTIVE now, under the lock, refusals checked again."""
    with registry.transaction() as data:
        mark_stale_failed(data, datamart)
        refuse_if_any(data, datamart)
        active = active_replications(data, datamart)
        owner = processes.owner()
        execution = Execution(
            id=exec_id,
            datamart=datamart,
            user_point_system_version=data.datamarts[datamart].user_point_system_version,
            status=ExecutionStatus.RUNNING,
            created_at=now_iso(),
            started_at=iso(started),
            start_ts=int(started.timestamp() * 1000),
            pid=owner["pid"],
            pid_start=owner["pid_start"],
            files=list(files),
            options=options,
            replications={r.id: ReplicationResult(name=r.name, type=r.type) for r in active},
            progress=Progress(bytes_total=sum(f.size for f in files)),
        )
        data.executions[exec_id] = execution
    private_dir(execution_dir(registry, exec_id))
    return execution, active


def check_resumable(data: RegistryData, execution: Execution) -> None:
    status = effective_status(execution)
    if status is ExecutionStatus.RUNNING:
        raise RefusedError(
            f"execution {execution.id} is RUNNING (pid {execution.pid}): it cannot be resumed twice",
            code="SYNC_RUNNING",
        )
    if status not in RESUMABLE and status is not ExecutionStatus.STALE:
        raise RefusedError(f"execution {execution.id} is {status}: nothing to resume", code="WRONG_STATUS")
    newer = [
        e
        for e in data.executions.values()
        if e.datamart == execution.datamart
        and e.status is ExecutionStatus.SUCCEEDED
        and parse_iso(e.started_at) > parse_iso(execution.started_at)
    ]
    if newer:
        raise RefusedError(
            f"execution {execution.id} is older than {newer[0].id}, which SUCCEEDED since: resuming it would replay "
            "an older export over a newer one (and bypass the weekly rule); start a new synchronization when the "
            "weekly rule allows one",
            code="SUPERSEDED",
        )


def reopen(registry: Registry, exec_id: str) -> tuple[Execution, list[Replication]]:
    """Mark an execution RUNNING again for this process, with those of its replications that are ACTIVE now."""
    with registry.transaction() as data:
        current = find(data, exec_id)
        if effective_status(current) is ExecutionStatus.RUNNING or processes.running_execution(data, current.datamart):
            raise RefusedError(f"an execution is RUNNING on datamart {current.datamart}", code="SYNC_RUNNING")
        active = [
            data.replications[rid]
            for rid in current.replications
            if rid in data.replications and data.replications[rid].status is Status.ACTIVE
        ]
        if not active:
            raise RefusedError(
                f"no replication of {exec_id} is ACTIVE now (recreate and activate those in ERROR first)",
                code="NO_ACTIVE_REPLICATION",
            )
        owner = processes.owner()
        current.status = ExecutionStatus.RUNNING
        current.error = None
        current.finished_at = None
        current.pid, current.pid_start = owner["pid"], owner["pid_start"]
        current.resumes.append(now_iso())
    return current, active


def list_executions(registry: Registry, *, datamart: str | None = None) -> list[Execution]:
    """Newest first, each with its effective status (STALE shown as such)."""
    out = []
    for e in registry.load().executions.values():
        if datamart and e.datamart != datamart:
            continue
        e.status = effective_status(e)
        out.append(e)
    return sorted(out, key=lambda e: e.started_at or "", reverse=True)


def show(registry: Registry, exec_id: str) -> Execution:
    e = find(registry.load(), exec_id)
    e.status = effective_status(e)
    return e
