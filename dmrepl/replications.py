"""Replications and their status machine (SPEC §3): PAUSED → ACTIVE only through a passing connectivity check,
ERROR only left by `recreate` or `delete`, every transition appended to the history."""

from __future__ import annotations

import re
import secrets as _random
from dataclasses import dataclass, field
from typing import Any

from dmrepl import datamarts, destinations, secrets
from dmrepl.credentials import (
    Binding,
    read_credentials_file,
    validate_eventhubs,
    validate_file,
    validate_pubsub,
)
from dmrepl.destinations.base import CheckStep
from dmrepl.errors import CheckFailedError, InvalidInputError, NotFoundError, RefusedError, UsageError
from dmrepl.processes import running_execution
from dmrepl.registry import Registry, now_iso

TYPES = tuple(destinations.TYPES)
STATUSES = ("PAUSED", "ACTIVE", "ERROR")
DEFAULT_CHECK_TIMEOUT_S = 20.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID = re.compile(r"^rep-[0-9a-f]{8}$")


@dataclass
class BindingOptions:
    """Everything `create`/`recreate` accept besides type and name; None means 'not given'."""

    credentials: str | None = None
    project_id: str | None = None
    topic_id: str | None = None
    endpoint: str | None = None
    ordering: bool | None = None
    event_hub: str | None = None
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve(data: dict[str, Any], ref: str) -> dict[str, Any]:
    reps = data["replications"]
    if ref in reps:
        return reps[ref]
    named = [r for r in reps.values() if r.get("name") == ref]
    if len(named) == 1:
        return named[0]
    if named:
        raise UsageError(f"name {ref!r} is ambiguous: use an id ({', '.join(sorted(r['id'] for r in named))})")
    raise NotFoundError(f"replication {ref!r} not found (see dmrepl list)")


def bind(
    type_name: str,
    options: BindingOptions,
    *,
    previous: dict[str, Any] | None = None,
    stored_secret: str | None = None,
) -> Binding:
    """Validate offline. With `previous` (recreate), options not given keep their old values, and without
    --credentials the stored secret is re-validated against the new settings."""
    old = previous or {}
    if type_name == "file":
        return validate_file(options.path or old.get("path"))
    if options.credentials:
        raw = read_credentials_file(options.credentials)
        source = str(options.credentials)
    elif stored_secret is not None:
        raw, source = stored_secret.encode("utf-8"), "stored credentials"
    else:
        raise InvalidInputError(f"--credentials: a credentials file is required for {type_name}", code="USAGE")
    if type_name == "google-pubsub":
        ordering = options.ordering if options.ordering is not None else old.get("ordering", True)
        return validate_pubsub(
            raw,
            source,
            project_id=options.project_id or old.get("project_id"),
            topic_id=options.topic_id or old.get("topic_id"),
            endpoint=options.endpoint or old.get("endpoint"),
            ordering=bool(ordering),
        )
    if type_name == "azure-event-hubs":
        return validate_eventhubs(raw, source, event_hub=options.event_hub or old.get("event_hub"))
    raise UsageError(f"--type: {type_name!r} is not one of {', '.join(TYPES)}")


def run_check(type_name: str, settings: dict[str, Any], secret: str | None, timeout_s: float) -> list[CheckStep]:
    dest = destinations.create(type_name, settings, secret)
    try:
        return dest.check(timeout_s)
    except Exception as exc:  # a destination bug must still produce a failed step, never a traceback with secrets
        return [CheckStep("check", status="failed", code="UNEXPECTED", detail=type(exc).__name__)]


def check_passed(steps: list[CheckStep]) -> bool:
    return not any(s.status == "failed" for s in steps)


def _check_record(steps: list[CheckStep]) -> dict[str, Any]:
    return {"at": now_iso(), "ok": check_passed(steps), "steps": [s.to_dict() for s in steps]}


def _failed_summary(steps: list[CheckStep]) -> str:
    failed = next(s for s in steps if s.status == "failed")
    text = f"connectivity check failed at step '{failed.name}'"
    if failed.code:
        text += f" ({failed.code})"
    if failed.detail:
        text += f": {failed.detail}"
    return text


def _transition(rep: dict[str, Any], to: str, reason: str) -> None:
    rep.setdefault("history", []).append({"at": now_iso(), "from": rep.get("status"), "to": to, "reason": reason})
    rep["status"] = to
    rep["updated_at"] = now_iso()


def _refuse_if_sync_running(data: dict[str, Any], rep: dict[str, Any], action: str) -> None:
    running = running_execution(data, rep["datamart"])
    if running:
        progress = running.get("progress", {})
        raise RefusedError(
            f"cannot {action} {rep['name']} ({rep['id']}): initial synchronization {running['id']} is RUNNING on "
            f"datamart {rep['datamart']} (pid {running.get('pid')}, {progress.get('lines_read', 0)} lines, "
            f"{progress.get('percent', 0):.0f}% read); wait for it or stop it first",
            code="SYNC_RUNNING",
        )


def _check_name(data: dict[str, Any], name: str, *, exclude: str | None = None) -> None:
    if not _NAME.match(name) or _ID.match(name):
        raise InvalidInputError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (64 at most), not an id like rep-1a2b3c4d",
            code="INVALID_NAME",
        )
    if any(r.get("name") == name and r["id"] != exclude for r in data["replications"].values()):
        raise RefusedError(f"a replication named {name!r} already exists", code="ALREADY_EXISTS")


def create(
    registry: Registry,
    *,
    type_name: str,
    name: str,
    datamart: str | None,
    options: BindingOptions,
    check: bool = False,
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: str | None = None,
) -> tuple[dict[str, Any], list[CheckStep]]:
    if type_name not in TYPES:
        raise UsageError(f"--type: {type_name!r} is not one of {', '.join(TYPES)}")
    data = registry.load()
    _check_name(data, name)
    datamart_id = datamarts.resolve(data, datamart)
    binding = bind(type_name, options)
    store = secrets.resolve_store(secret_store) if binding.secret is not None else None
    steps: list[CheckStep] = []
    if check:
        steps = run_check(type_name, binding.settings, binding.secret, timeout_s)
        if not check_passed(steps):
            raise CheckFailedError(_failed_summary(steps) + "; nothing was saved", details=steps)
    rep_id = f"rep-{_random.token_hex(4)}"
    credentials = None
    if binding.secret is not None and store:
        credentials = secrets.store_secret(f"{rep_id}-{_random.token_hex(4)}", binding.secret, store)
        credentials["fingerprint"] = binding.fingerprint
    try:
        with registry.transaction() as data:
            _check_name(data, name)
            datamarts.get(data, datamart_id)
            while rep_id in data["replications"]:  # pragma: no cover - 32-bit collision
                rep_id = f"rep-{_random.token_hex(4)}"
            rep: dict[str, Any] = {
                "id": rep_id,
                "name": name,
                "type": type_name,
                "datamart": datamart_id,
                "status": "PAUSED",
                "created_at": now_iso(),
                "updated_at": now_iso(),
                "settings": binding.settings,
                "credentials": credentials,
                "last_check": _check_record(steps) if steps else None,
                "history": [{"at": now_iso(), "from": None, "to": "PAUSED", "reason": "created"}],
            }
            data["replications"][rep_id] = rep
    except BaseException:
        if credentials:
            secrets.delete_secret(credentials)
        raise
    return rep, steps


def get(registry: Registry, ref: str) -> dict[str, Any]:
    return resolve(registry.load(), ref)


def list_(registry: Registry, *, datamart: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
    if status and status.upper() not in STATUSES:
        raise UsageError(f"--status: {status!r} is not one of {', '.join(STATUSES)}")
    reps = registry.load()["replications"].values()
    return sorted(
        (
            r
            for r in reps
            if (not datamart or r["datamart"] == datamart) and (not status or r["status"] == status.upper())
        ),
        key=lambda r: (r["datamart"], r["name"]),
    )


def _secret_of(rep: dict[str, Any]) -> str | None:
    return secrets.load_secret(rep["credentials"]) if rep.get("credentials") else None


def check(registry: Registry, ref: str, *, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> list[CheckStep]:
    """Run the check and record it, without changing the status."""
    rep = get(registry, ref)
    steps = run_check(rep["type"], rep["settings"], _secret_of(rep), timeout_s)
    with registry.transaction() as data:
        if rep["id"] in data["replications"]:
            data["replications"][rep["id"]]["last_check"] = _check_record(steps)
    return steps


def activate(
    registry: Registry, ref: str, *, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S
) -> tuple[dict[str, Any], list[CheckStep]]:
    data = registry.load()
    rep = resolve(data, ref)
    if rep["status"] == "ERROR":
        raise RefusedError(
            f"{rep['name']} ({rep['id']}) is in ERROR ({rep.get('error', {}).get('code', '?')}): it cannot be "
            f"activated; rebind it with dmrepl recreate {rep['id']} --credentials FILE, or delete it",
            code="WRONG_STATUS",
        )
    if rep["status"] == "ACTIVE":
        return rep, []
    _refuse_if_sync_running(data, rep, "activate")
    steps = run_check(rep["type"], rep["settings"], _secret_of(rep), timeout_s)
    passed = check_passed(steps)
    with registry.transaction() as data:
        current = resolve(data, rep["id"])
        current["last_check"] = _check_record(steps)
        if passed:
            _refuse_if_sync_running(data, current, "activate")
            if current["status"] != "PAUSED":
                raise RefusedError(
                    f"{current['name']} changed to {current['status']} meanwhile; nothing done", code="WRONG_STATUS"
                )
            _transition(current, "ACTIVE", "activated: connectivity check passed")
        rep = current
    if not passed:
        raise CheckFailedError(_failed_summary(steps) + f"; {rep['name']} stays PAUSED", details=steps)
    return rep, steps


def pause(registry: Registry, ref: str) -> dict[str, Any]:
    with registry.transaction() as data:
        rep = resolve(data, ref)
        if rep["status"] == "PAUSED":
            return rep
        if rep["status"] == "ERROR":
            raise RefusedError(
                f"{rep['name']} ({rep['id']}) is in ERROR: rebind it with dmrepl recreate, or delete it",
                code="WRONG_STATUS",
            )
        _refuse_if_sync_running(data, rep, "pause")
        _transition(rep, "PAUSED", "paused by user")
    return rep


def delete(registry: Registry, ref: str) -> dict[str, Any]:
    with registry.transaction() as data:
        rep = resolve(data, ref)
        _refuse_if_sync_running(data, rep, "delete")
        del data["replications"][rep["id"]]
    if rep.get("credentials"):
        secrets.delete_secret(rep["credentials"])
    return rep


def recreate(
    registry: Registry,
    ref: str,
    *,
    options: BindingOptions,
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: str | None = None,
) -> tuple[dict[str, Any], list[CheckStep]]:
    """Rebind with new credentials/settings: validated offline and checked before the old binding is replaced."""
    data = registry.load()
    rep = resolve(data, ref)
    if rep["status"] == "ACTIVE":
        raise RefusedError(f"{rep['name']} is ACTIVE: pause it before rebinding it", code="WRONG_STATUS")
    _refuse_if_sync_running(data, rep, "recreate")
    stored = _secret_of(rep) if options.credentials is None and rep.get("credentials") else None
    binding = bind(rep["type"], options, previous=rep["settings"], stored_secret=stored)
    store = secrets.resolve_store(secret_store) if options.credentials and binding.secret is not None else None
    steps = run_check(rep["type"], binding.settings, binding.secret, timeout_s)
    if not check_passed(steps):
        raise CheckFailedError(_failed_summary(steps) + f"; {rep['name']} keeps its old binding", details=steps)
    new_credentials = rep.get("credentials")
    if store and binding.secret is not None:
        new_credentials = secrets.store_secret(f"{rep['id']}-{_random.token_hex(4)}", binding.secret, store)
        new_credentials["fingerprint"] = binding.fingerprint
    try:
        with registry.transaction() as data:
            current = resolve(data, rep["id"])
            _refuse_if_sync_running(data, current, "recreate")
            old_credentials = current.get("credentials")
            if current.get("error"):
                current.setdefault("past_errors", []).append(current.pop("error"))
            current["settings"] = binding.settings
            current["credentials"] = new_credentials
            current["last_check"] = _check_record(steps)
            _transition(current, "PAUSED", "recreated with a new binding (connectivity check passed)")
            rep = current
    except BaseException:
        if new_credentials is not rep.get("credentials") and new_credentials:
            secrets.delete_secret(new_credentials)
        raise
    if old_credentials and new_credentials is not old_credentials and old_credentials != new_credentials:
        secrets.delete_secret(old_credentials)
    return rep, steps


def mark_error(registry: Registry, rep_id: str, *, code: str, message: str, undelivered: int, reason: str) -> None:
    """Called by the delivery paths: a replication that can no longer deliver goes to ERROR with what was lost."""
    with registry.transaction() as data:
        rep = data["replications"].get(rep_id)
        if rep is None:
            return
        now = now_iso()
        err = rep.get("error")
        if rep["status"] == "ERROR" and err:
            err.update(last_seen=now, message=message, code=code)
            err["attempts"] = err.get("attempts", 1) + 1
            err["undelivered"] = err.get("undelivered", 0) + undelivered
        else:
            rep["error"] = {
                "code": code,
                "message": message,
                "first_seen": now,
                "last_seen": now,
                "attempts": 1,
                "undelivered": undelivered,
            }
            _transition(rep, "ERROR", f"{reason}: {code}")


def history(registry: Registry, ref: str) -> list[dict[str, Any]]:
    return list(get(registry, ref).get("history", []))


def add_undelivered(registry: Registry, rep_id: str, count: int) -> None:
    """Once a run knows how many operations an ERROR replication missed, record them with its error."""
    if count <= 0:
        return
    with registry.transaction() as data:
        rep = data["replications"].get(rep_id)
        if rep and rep.get("error"):
            rep["error"]["undelivered"] = rep["error"].get("undelivered", 0) + count
