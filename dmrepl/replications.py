"""Replications and their status machine (docs/statuses.md): PAUSED → ACTIVE only through a passing connectivity
check, ERROR only left by `recreate` or `delete`, every transition appended to the history."""

from __future__ import annotations

import re
import secrets as _random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmrepl import datamarts, destinations, secrets
from dmrepl.credentials import read_credentials_file
from dmrepl.delivery import Failure, ReplicationBinding
from dmrepl.destinations.base import Binding, CheckStep
from dmrepl.errors import CheckFailedError, DmreplError, InvalidInputError, NotFoundError, RefusedError, UsageError
from dmrepl.models import (
    DEFAULT_CHECK_TIMEOUT_S,
    CheckRecord,
    HistoryEntry,
    RegistryData,
    Replication,
    ReplicationError,
    SecretRef,
    Status,
    now_iso,
)
from dmrepl.processes import running_execution
from dmrepl.registry import Registry

__all__ = ["DEFAULT_CHECK_TIMEOUT_S", "Status"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID = re.compile(r"^rep-[0-9a-f]{8}$")


def resolve(data: RegistryData, ref: str) -> Replication:
    reps = data.replications
    if ref in reps:
        return reps[ref]
    named = [r for r in reps.values() if r.name == ref]
    if len(named) == 1:
        return named[0]
    if named:
        raise UsageError(f"name {ref!r} is ambiguous: use an id ({', '.join(sorted(r.id for r in named))})")
    raise NotFoundError(f"replication {ref!r} not found (see dmrepl list)")


def describe(rep: Replication) -> str:
    """The target in one line, as the destination type words it."""
    return destinations.get_type(rep.type).describe(rep.settings)


def bind(
    type_name: str,
    options: Mapping[str, Any],
    *,
    previous: Mapping[str, Any] | None = None,
    stored_secret: str | None = None,
) -> Binding:
    """Validate offline. `options` holds `credentials` and the type's own options (None: not given). With
    `previous` (recreate), options not given keep their old values, and without credentials the stored secret is
    re-validated against the new settings."""
    kind = destinations.get_type(type_name)
    raw: bytes | None = None
    source = ""
    credentials = options.get("credentials")
    if credentials and kind.needs_credentials:
        raw, source = read_credentials_file(Path(credentials)), str(credentials)
    elif stored_secret is not None:
        raw, source = stored_secret.encode("utf-8"), "stored credentials"
    elif kind.credentials_required():
        raise InvalidInputError(
            f"--credentials: {kind.credentials_help or 'a credentials file'} is required for {type_name}",
            code="USAGE",
        )
    return kind.bind(options, raw, source, previous)


def run_check(type_name: str, settings: Mapping[str, Any], secret: str | None, timeout_s: float) -> list[CheckStep]:
    dest = destinations.create(type_name, settings, secret)
    try:
        return dest.check(timeout_s)
    except Exception as exc:  # a destination bug must still produce a failed step, never a traceback with secrets
        return [CheckStep("check", status="failed", code="UNEXPECTED", detail=type(exc).__name__)]


def check_passed(steps: list[CheckStep]) -> bool:
    return not any(s.status == "failed" for s in steps)


def _check_record(steps: list[CheckStep]) -> CheckRecord:
    return CheckRecord(at=now_iso(), ok=check_passed(steps), steps=[s.to_dict() for s in steps])


def _failed(steps: list[CheckStep], outcome: str) -> CheckFailedError:
    failed = next(s for s in steps if s.status == "failed")
    text = f"connectivity check failed at step '{failed.name}'"
    if failed.code:
        text += f" ({failed.code})"
    if failed.detail:
        text += f": {failed.detail}"
    return CheckFailedError(f"{text}; {outcome}", details=steps)


def _refuse_if_sync_running(data: RegistryData, rep: Replication, action: str) -> None:
    running = running_execution(data, rep.datamart)
    if running:
        raise RefusedError(
            f"cannot {action} {rep.name} ({rep.id}): initial synchronization {running.id} is RUNNING on "
            f"datamart {rep.datamart} (pid {running.pid}, {running.progress.lines_read} lines, "
            f"{running.progress.percent:.0f}% read); wait for it or stop it first",
            code="SYNC_RUNNING",
        )


def _check_name(data: RegistryData, name: str, *, exclude: str | None = None) -> None:
    if not _NAME.match(name) or _ID.match(name):
        raise InvalidInputError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (64 at most), not an id like rep-1a2b3c4d",
            code="INVALID_NAME",
        )
    if any(r.name == name and r.id != exclude for r in data.replications.values()):
        raise RefusedError(f"a replication named {name!r} already exists", code="ALREADY_EXISTS")


def _store(registry: Registry, rep_id: str, binding: Binding, store: str) -> SecretRef:
    assert binding.secret is not None
    ref = secrets.store_secret(f"{rep_id}-{_random.token_hex(4)}", binding.secret, store, registry.root)
    ref.fingerprint = binding.fingerprint
    return ref


def create(
    registry: Registry,
    *,
    type_name: str,
    name: str,
    datamart: str | None,
    options: Mapping[str, Any],
    check: bool = False,
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: str | None = None,
) -> tuple[Replication, list[CheckStep], list[str]]:
    """A PAUSED replication, its check's steps (with `check`), and the binding's warnings."""
    if type_name not in destinations.TYPES:
        raise UsageError(f"--type: {type_name!r} is not one of {', '.join(destinations.TYPES)}")
    data = registry.load()
    _check_name(data, name)
    datamart_id = datamarts.resolve(data, datamart)
    binding = bind(type_name, options)
    store = secrets.resolve_store(secret_store) if binding.secret is not None else None
    steps: list[CheckStep] = []
    if check:
        steps = run_check(type_name, binding.settings, binding.secret, timeout_s)
        if not check_passed(steps):
            raise _failed(steps, "nothing was saved")
    rep_id = f"rep-{_random.token_hex(4)}"
    credentials = _store(registry, rep_id, binding, store) if store else None
    try:
        with registry.transaction() as data:
            _check_name(data, name)
            datamarts.get(data, datamart_id)
            while rep_id in data.replications:  # pragma: no cover - 32-bit collision
                rep_id = f"rep-{_random.token_hex(4)}"
            now = now_iso()
            rep = Replication(
                id=rep_id,
                name=name,
                type=type_name,
                datamart=datamart_id,
                status=Status.PAUSED,
                created_at=now,
                updated_at=now,
                settings=binding.settings,
                credentials=credentials,
                last_check=_check_record(steps) if steps else None,
            )
            rep.history.append(HistoryEntry(at=now, from_=None, to=Status.PAUSED, reason="created"))
            data.replications[rep_id] = rep
    except BaseException:
        if credentials:
            secrets.delete_secret(credentials, registry.root)
        raise
    return rep, steps, binding.warnings


def get(registry: Registry, ref: str) -> Replication:
    return resolve(registry.load(), ref)


def list_(registry: Registry, *, datamart: str | None = None, status: Status | None = None) -> list[Replication]:
    reps = registry.load().replications.values()
    return sorted(
        (r for r in reps if (not datamart or r.datamart == datamart) and (not status or r.status == status)),
        key=lambda r: (r.datamart, r.name),
    )


def secret_of(registry: Registry, rep: Replication) -> str | None:
    return secrets.load_secret(rep.credentials, registry.root) if rep.credentials else None


def resolve_binding(registry: Registry, rep: Replication) -> tuple[ReplicationBinding, Failure | None]:
    """What the registry-free core delivers with: the replication's settings and its secret, read once by the owner of
    a run; or, when the secret cannot be read (gone, swapped, unsafe store), why."""
    try:
        secret = secret_of(registry, rep)
    except DmreplError as exc:
        return ReplicationBinding(rep.id, rep.name, rep.type, dict(rep.settings)), Failure(exc.code, exc.message)
    return ReplicationBinding(rep.id, rep.name, rep.type, dict(rep.settings), secret), None


def check(registry: Registry, ref: str, *, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> list[CheckStep]:
    """Run the check and record it, without changing the status; CheckFailedError when a step failed."""
    rep = get(registry, ref)
    steps = run_check(rep.type, rep.settings, secret_of(registry, rep), timeout_s)
    with registry.transaction() as data:
        if rep.id in data.replications:
            data.replications[rep.id].last_check = _check_record(steps)
    if not check_passed(steps):
        raise _failed(steps, f"{rep.name} stays {rep.status}")
    return steps


def activate(
    registry: Registry, ref: str, *, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S
) -> tuple[Replication, list[CheckStep]]:
    data = registry.load()
    rep = resolve(data, ref)
    if rep.status is Status.ERROR:
        code = rep.error.code if rep.error else "?"
        raise RefusedError(
            f"{rep.name} ({rep.id}) is in ERROR ({code}): it cannot be activated; rebind it with "
            f"dmrepl recreate {rep.id} --credentials FILE, or delete it",
            code="WRONG_STATUS",
        )
    if rep.status is Status.ACTIVE:
        return rep, []
    _refuse_if_sync_running(data, rep, "activate")
    steps = run_check(rep.type, rep.settings, secret_of(registry, rep), timeout_s)
    passed = check_passed(steps)
    with registry.transaction() as data:
        current = resolve(data, rep.id)
        current.last_check = _check_record(steps)
        if passed:
            _refuse_if_sync_running(data, current, "activate")
            if current.status is not Status.PAUSED:
                raise RefusedError(
                    f"{current.name} changed to {current.status} meanwhile; nothing done", code="WRONG_STATUS"
                )
            current.transition(Status.ACTIVE, "activated: connectivity check passed")
        rep = current
    if not passed:
        raise _failed(steps, f"{rep.name} stays PAUSED")
    return rep, steps


def pause(registry: Registry, ref: str) -> Replication:
    with registry.transaction() as data:
        rep = resolve(data, ref)
        if rep.status is Status.PAUSED:
            return rep
        if rep.status is Status.ERROR:
            raise RefusedError(
                f"{rep.name} ({rep.id}) is in ERROR: rebind it with dmrepl recreate, or delete it",
                code="WRONG_STATUS",
            )
        _refuse_if_sync_running(data, rep, "pause")
        rep.transition(Status.PAUSED, "paused by user")
    return rep


def delete(registry: Registry, ref: str) -> Replication:
    with registry.transaction() as data:
        rep = resolve(data, ref)
        _refuse_if_sync_running(data, rep, "delete")
        del data.replications[rep.id]
    if rep.credentials:
        secrets.delete_secret(rep.credentials, registry.root)
    return rep


def recreate(
    registry: Registry,
    ref: str,
    *,
    options: Mapping[str, Any],
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: str | None = None,
) -> tuple[Replication, list[CheckStep], list[str]]:
    """Rebind with new credentials/settings: validated offline and checked before the old binding is replaced."""
    data = registry.load()
    rep = resolve(data, ref)
    if rep.status is Status.ACTIVE:
        raise RefusedError(f"{rep.name} is ACTIVE: pause it before rebinding it", code="WRONG_STATUS")
    _refuse_if_sync_running(data, rep, "recreate")
    new_file = bool(options.get("credentials"))
    stored = secret_of(registry, rep) if not new_file and rep.credentials else None
    binding = bind(rep.type, options, previous=rep.settings, stored_secret=stored)
    store = secrets.resolve_store(secret_store) if new_file and binding.secret is not None else None
    steps = run_check(rep.type, binding.settings, binding.secret, timeout_s)
    if not check_passed(steps):
        raise _failed(steps, f"{rep.name} keeps its old binding")
    new_credentials = _store(registry, rep.id, binding, store) if store else rep.credentials
    try:
        with registry.transaction() as data:
            current = resolve(data, rep.id)
            _refuse_if_sync_running(data, current, "recreate")
            old_credentials = current.credentials
            if current.error:
                current.past_errors.append(current.error)
                current.error = None
            current.settings = binding.settings
            current.credentials = new_credentials
            current.last_check = _check_record(steps)
            current.transition(Status.PAUSED, "recreated with a new binding (connectivity check passed)")
            rep = current
    except BaseException:
        if store and new_credentials:
            secrets.delete_secret(new_credentials, registry.root)
        raise
    if store and old_credentials and old_credentials.ref != (new_credentials.ref if new_credentials else None):
        secrets.delete_secret(old_credentials, registry.root)
    return rep, steps, binding.warnings


def mark_error(registry: Registry, rep_id: str, *, code: str, message: str, undelivered: int, reason: str) -> None:
    """Called by the owner of a run (the sync coordinator, live replication), never by a worker: a replication
    that can no longer deliver goes to ERROR with what was lost."""
    with registry.transaction() as data:
        rep = data.replications.get(rep_id)
        if rep is None:
            return
        now = now_iso()
        err = rep.error
        if rep.status is Status.ERROR and err:
            err.last_seen, err.message, err.code = now, message, code
            err.attempts += 1
            err.undelivered += undelivered
        else:
            rep.error = ReplicationError(
                code=code, message=message, first_seen=now, last_seen=now, attempts=1, undelivered=undelivered
            )
            rep.transition(Status.ERROR, f"{reason}: {code}")


def history(registry: Registry, ref: str) -> list[dict[str, Any]]:
    return [h.to_dict() for h in get(registry, ref).history]


def add_undelivered(registry: Registry, rep_id: str, count: int) -> None:
    """Once a run knows how many operations an ERROR replication missed, record them with its error."""
    if count <= 0:
        return
    with registry.transaction() as data:
        rep = data.replications.get(rep_id)
        if rep and rep.error:
            rep.error.undelivered += count
