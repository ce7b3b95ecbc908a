"""Replications and their status machine (docs/statuses.md): PAUSED → ACTIVE only through a passing connectivity
check, ERROR only left by `recreate` or `delete`, every transition appended to the history."""

from __future__ import annotations

import re
import secrets as _random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
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
    iso,
    now_iso,
    parse_iso,
)
from dmrepl.processes import running_execution
from dmrepl.registry import Registry

__all__ = ["DEFAULT_CHECK_TIMEOUT_S", "EXPIRY_WARNING_DAYS", "Status"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID = re.compile(r"^rep-[0-9a-f]{8}$")
#: `list`, `show` and `check` warn this long before the credentials expire.
EXPIRY_WARNING_DAYS = 14
#: At most this long is spent asking an issuer when credentials expire (a certificate), after a passing check.
EXPIRY_FETCH_TIMEOUT_S = 5.0


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
    if credentials and kind.needs_credentials and kind.reads_credentials_file(options):
        raw, source = read_credentials_file(Path(credentials)), str(credentials)
    elif stored_secret is not None and not credentials:
        raw, source = stored_secret.encode("utf-8"), "stored credentials"
    elif not credentials and kind.credentials_required(options):
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


Expiry = tuple[datetime, str] | None  # when credentials stop working, and what says so


def parse_expires(value: str | None, *, now: datetime | None = None) -> datetime | None:
    """`--expires`: an ISO 8601 date (00:00 UTC that day: warn early rather than late) or date and time (UTC unless
    it says otherwise); one in the past is a mistake, not credentials anyone means to save."""
    if value is None:
        return None
    text = value.strip()
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            f"--expires: {text[:40]!r} is not a date (YYYY-MM-DD, or YYYY-MM-DDTHH:MM[:SS][Z|±HH:MM])",
            code="INVALID_EXPIRES",
        ) from None
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    if at <= (now or datetime.now(UTC)):
        raise InvalidInputError(f"--expires: {iso(at)} is in the past", code="INVALID_EXPIRES")
    return at


def _earliest(*candidates: Expiry) -> Expiry:
    known = [c for c in candidates if c is not None]
    return min(known, key=lambda c: c[0]) if known else None


def _expiry(type_name: str, settings: Mapping[str, Any], secret: str | None, more: list[Any]) -> Expiry:
    """What the credentials themselves say offline (a signature's `se=`), `--expires`, and what was known before:
    the earliest wins, since a warning too early costs nothing and one too late costs a gap."""
    try:
        own = destinations.get_type(type_name).expires_at(settings, secret)
    except Exception:  # a destination bug must not make a valid binding fail
        own = None
    extra = [(m, "--expires") if isinstance(m, datetime) else m for m in more]
    return _earliest(own, *extra)


def stored_expiry(rep: Replication) -> Expiry:
    """The recorded expiry; a hand-edited one that is no date is refused like any other bad registry field."""
    if not rep.credentials_expire_at:
        return None
    try:
        at = parse_iso(rep.credentials_expire_at)
    except ValueError:
        raise InvalidInputError(
            f"replications.{rep.id}.credentials_expire_at: {rep.credentials_expire_at[:40]!r} is not an ISO 8601 "
            "date and time",
            code="REGISTRY_INVALID",
        ) from None
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at, rep.credentials_expiry_source or "recorded"


def _set_expiry(rep: Replication, expiry: Expiry) -> None:
    rep.credentials_expire_at = iso(expiry[0]) if expiry else None
    rep.credentials_expiry_source = expiry[1] if expiry else None


def expiry_status(rep: Replication, *, now: datetime | None = None) -> tuple[str, datetime] | None:
    """("expired" | "expiring", when) for credentials expired or expiring within EXPIRY_WARNING_DAYS; None otherwise."""
    expiry = stored_expiry(rep)
    if expiry is None:
        return None
    now = now or datetime.now(UTC)
    if expiry[0] <= now:
        return "expired", expiry[0]
    if expiry[0] - now <= timedelta(days=EXPIRY_WARNING_DAYS):
        return "expiring", expiry[0]
    return None


def _in(at: datetime, now: datetime) -> str:
    left = at - now
    if left >= timedelta(days=1):
        return f"in {left.days} day{'s' if left.days > 1 else ''}"
    hours = int(left.total_seconds() // 3600)
    return f"in {hours} hour{'s' if hours != 1 else ''}" if hours else "in less than an hour"


def _expiry_text(expiry: Expiry, now: datetime) -> str | None:
    if expiry is None:
        return None
    at, source = expiry
    if at <= now:
        return f"the credentials expired at {iso(at)} ({source})"
    if at - now <= timedelta(days=EXPIRY_WARNING_DAYS):
        return f"the credentials expire at {iso(at)} ({source}), {_in(at, now)}"
    return None


def expiry_warning(rep: Replication, *, now: datetime | None = None) -> str | None:
    """The `warning:` line of `list`, `show` and `check`, naming the command that fixes it."""
    text = _expiry_text(stored_expiry(rep), now or datetime.now(UTC))
    if text is None:
        return None
    return f"{rep.name} ({rep.id}): {text}: rotate them with dmrepl rotate {rep.id} --credentials FILE"


def _expiry_warnings(expiry: Expiry) -> list[str]:
    text = _expiry_text(expiry, datetime.now(UTC))
    return [text] if text else []


def _expired_step(expiry: Expiry, *, now: datetime | None = None) -> CheckStep | None:
    if expiry is None or expiry[0] > (now or datetime.now(UTC)):
        return None
    return CheckStep(
        "credentials-expiry",
        status="failed",
        code="CREDENTIALS_EXPIRED",
        detail=f"the credentials expired at {iso(expiry[0])} ({expiry[1]})",
        fix="give new credentials: dmrepl rotate ID --credentials FILE (or dmrepl recreate ID when in ERROR)",
    )


def _checked(
    type_name: str, settings: Mapping[str, Any], secret: str | None, timeout_s: float, expiry: Expiry
) -> tuple[list[CheckStep], Expiry]:
    """The connectivity check, except that credentials known to have expired fail at once, before any network call
    (the service would only say "unauthorized"); after a passing check, the issuer may tell when they expire."""
    expired = _expired_step(expiry)
    if expired is not None:
        return [expired], expiry
    steps = run_check(type_name, settings, secret, timeout_s)
    if check_passed(steps) and secret is not None:
        try:
            fetched = destinations.get_type(type_name).expires_at(
                settings, secret, fetch_timeout_s=min(timeout_s, EXPIRY_FETCH_TIMEOUT_S)
            )
        except Exception:  # the expiry is a courtesy: never a failed check
            fetched = None
        expiry = _earliest(expiry, fetched)
    return steps, expiry


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
    expires: str | None = None,
) -> tuple[Replication, list[CheckStep], list[str]]:
    """A PAUSED replication, its check's steps (with `check`), and the binding's warnings."""
    if type_name not in destinations.TYPES:
        raise UsageError(f"--type: {type_name!r} is not one of {', '.join(destinations.TYPES)}")
    given = parse_expires(expires)
    data = registry.load()
    _check_name(data, name)
    datamart_id = datamarts.resolve(data, datamart)
    binding = bind(type_name, options)
    store = secrets.resolve_store(secret_store) if binding.secret is not None else None
    expiry = _expiry(type_name, binding.settings, binding.secret, [given])
    steps: list[CheckStep] = []
    if check:
        steps, expiry = _checked(type_name, binding.settings, binding.secret, timeout_s, expiry)
        if not check_passed(steps):
            raise _failed(steps, "nothing was saved")
    warnings = binding.warnings + _expiry_warnings(expiry)
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
            _set_expiry(rep, expiry)
            rep.history.append(HistoryEntry(at=now, from_=None, to=Status.PAUSED, reason="created"))
            data.replications[rep_id] = rep
    except BaseException:
        if credentials:
            secrets.delete_secret(credentials, registry.root)
        raise
    return rep, steps, warnings


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
    expiry = stored_expiry(rep)
    if _expired_step(expiry) is None:  # expired credentials fail before their secret is even read
        steps, expiry = _checked(rep.type, rep.settings, secret_of(registry, rep), timeout_s, expiry)
    else:
        steps, expiry = _checked(rep.type, rep.settings, None, timeout_s, expiry)
    with registry.transaction() as data:
        if rep.id in data.replications:
            current = data.replications[rep.id]
            current.last_check = _check_record(steps)
            if current.credentials == rep.credentials:
                _set_expiry(current, expiry)
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
    expiry = stored_expiry(rep)
    secret = secret_of(registry, rep) if _expired_step(expiry) is None else None
    steps, expiry = _checked(rep.type, rep.settings, secret, timeout_s, expiry)
    passed = check_passed(steps)
    with registry.transaction() as data:
        current = resolve(data, rep.id)
        current.last_check = _check_record(steps)
        if current.credentials == rep.credentials:
            _set_expiry(current, expiry)
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
    expires: str | None = None,
) -> tuple[Replication, list[CheckStep], list[str]]:
    """Rebind with new credentials/settings: validated offline and checked before the old binding is replaced."""
    given = parse_expires(expires)
    data = registry.load()
    rep = resolve(data, ref)
    if rep.status is Status.ACTIVE:
        raise RefusedError(f"{rep.name} is ACTIVE: pause it before rebinding it", code="WRONG_STATUS")
    _refuse_if_sync_running(data, rep, "recreate")
    new_file = bool(options.get("credentials"))
    stored = secret_of(registry, rep) if not new_file and rep.credentials else None
    binding = bind(rep.type, options, previous=rep.settings, stored_secret=stored)
    store = secrets.resolve_store(secret_store) if new_file and binding.secret is not None else None
    # The same secret keeps what was learnt of its expiry (unless --expires says otherwise); a new one starts afresh.
    kept = stored_expiry(rep) if not new_file and given is None else None
    expiry = _expiry(rep.type, binding.settings, binding.secret, [given, kept])
    steps, expiry = _checked(rep.type, binding.settings, binding.secret, timeout_s, expiry)
    if not check_passed(steps):
        raise _failed(steps, f"{rep.name} keeps its old binding")
    if store:
        new_credentials = _store(registry, rep.id, binding, store)
    else:  # the stored secret re-validated, or a binding with none (a keyless identity, the emulator)
        new_credentials = rep.credentials if binding.secret is not None else None
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
            _set_expiry(current, expiry)
            current.last_check = _check_record(steps)
            current.transition(Status.PAUSED, "recreated with a new binding (connectivity check passed)")
            rep = current
    except BaseException:
        if store and new_credentials:
            secrets.delete_secret(new_credentials, registry.root)
        raise
    if old_credentials and old_credentials.ref != (new_credentials.ref if new_credentials else None):
        secrets.delete_secret(old_credentials, registry.root)
    return rep, steps, binding.warnings + _expiry_warnings(expiry)


def credential_options(type_name: str) -> set[str]:
    return {spec.name for spec in destinations.get_type(type_name).options if spec.credential}


def rotate(
    registry: Registry,
    ref: str,
    *,
    options: Mapping[str, Any],
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: str | None = None,
    expires: str | None = None,
) -> tuple[Replication, list[CheckStep], list[str]]:
    """Replace the credentials of a replication without a gap: validated offline, checked, then swapped in one
    transaction, the status unchanged (a running `replicate` reopens on the new binding at its next refresh).

    Order is what makes a crash harmless: the new secret is stored under a new reference first, the registry is
    committed, and only then is the old secret deleted; a crash in between leaves an orphan secret, never a
    replication without its own. ERROR is left to `recreate` (docs/statuses.md), and the target and the options that are
    not credentials (`OptionSpec.credential`) must come out unchanged: changing those is `recreate` too."""
    given = parse_expires(expires)
    data = registry.load()
    rep = resolve(data, ref)
    kind = destinations.get_type(rep.type)
    allowed = credential_options(rep.type)
    if not kind.needs_credentials and not allowed:
        raise UsageError(f"{rep.name} ({rep.id}) is a {rep.type} replication: it has no credentials to rotate")
    if rep.status is Status.ERROR:
        code = rep.error.code if rep.error else "?"
        raise RefusedError(
            f"{rep.name} ({rep.id}) is in ERROR ({code}): rotate keeps the status, and ERROR is left only by a "
            f"rebind: dmrepl recreate {rep.id} --credentials FILE, then dmrepl activate {rep.id}",
            code="WRONG_STATUS",
        )
    foreign = sorted(n for n, v in options.items() if v is not None and n != "credentials" and n not in allowed)
    if foreign:
        raise UsageError(
            f"--{foreign[0].replace('_', '-')}: rotate changes only the credentials of {rep.name} ({rep.type}); "
            f"change settings with dmrepl recreate {rep.id}"
        )
    if not options.get("credentials") and not any(options.get(n) is not None for n in allowed):
        raise UsageError(f"--credentials: give the new credentials of {rep.name} ({rep.type})")
    _refuse_if_sync_running(data, rep, "rotate the credentials of")
    binding = bind(rep.type, options, previous=rep.settings)
    # What the identity brings along (a tenant, a client id) may change; where operations go may not: the type's
    # other options, and the target itself (a namespace taken from a connection string, say).
    before: dict[str, Any] = {s.name: rep.settings.get(s.name) for s in kind.options if not s.credential}
    after: dict[str, Any] = {s.name: binding.settings.get(s.name) for s in kind.options if not s.credential}
    before["target"], after["target"] = kind.describe(rep.settings), kind.describe(binding.settings)
    changed = [k for k in before if before[k] != after[k]]
    if changed:
        raise InvalidInputError(
            f"{changed[0]}: the new credentials would change it ({str(before[changed[0]])[:80]!r} → "
            f"{str(after[changed[0]])[:80]!r}); rotate keeps every setting: give credentials for the same target, or "
            f"rebind with dmrepl recreate {rep.id}",
            code="SETTINGS_CHANGED",
        )
    old = rep.credentials
    store = secrets.resolve_store(secret_store or (old.store if old else None)) if binding.secret is not None else None
    expiry = _expiry(rep.type, binding.settings, binding.secret, [given])
    steps, expiry = _checked(rep.type, binding.settings, binding.secret, timeout_s, expiry)
    if not check_passed(steps):
        raise _failed(steps, f"{rep.name} keeps its old credentials; fix the step, then dmrepl rotate again")
    new = _store(registry, rep.id, binding, store) if store else None
    try:
        with registry.transaction() as data:
            current = resolve(data, rep.id)
            _refuse_if_sync_running(data, current, "rotate the credentials of")
            if current.status is Status.ERROR or current.credentials != old:
                raise RefusedError(
                    f"{current.name} changed meanwhile ({current.status}, credentials "
                    f"{'replaced' if current.credentials != old else 'unchanged'}); nothing done: see dmrepl show "
                    f"{current.id}",
                    code="WRONG_STATUS",
                )
            now = now_iso()
            old_fp = dict(old.fingerprint) if old else None
            new_fp = dict(binding.fingerprint)
            current.settings = binding.settings
            current.credentials = new
            _set_expiry(current, expiry)
            current.last_check = _check_record(steps)
            current.updated_at = now
            current.history.append(
                HistoryEntry(
                    at=now,
                    from_=current.status,
                    to=current.status,
                    reason=f"credentials rotated: {_label(old_fp)} → {_label(new_fp)} (connectivity check passed)",
                    old_fingerprint=old_fp,
                    new_fingerprint=new_fp,
                )
            )
            rep = current
    except BaseException:
        if new:
            secrets.delete_secret(new, registry.root)
        raise
    if old and (new is None or old.ref != new.ref):
        secrets.delete_secret(old, registry.root)
    return rep, steps, binding.warnings + _expiry_warnings(expiry)


def _label(fingerprint: Mapping[str, Any] | None) -> str:
    """Which credentials, in a few words a support engineer can match: who they are and the start of their sha256."""
    if not fingerprint:
        return "none"
    who = next((str(v) for k, v in fingerprint.items() if k != "sha256" and k != "namespace" and v), "")
    digest = str(fingerprint.get("sha256", ""))[:12]
    return " ".join(p for p in (who, f"sha256:{digest}" if digest else "") if p) or "unnamed"


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
