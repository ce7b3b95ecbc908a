"""Replication commands: create, list, show, check, history, activate, pause, delete, recreate, rotate,
support-bundle.

`create` and `recreate` take the options every destination type declares (`DestinationType.options`), `rotate` those
of them that are credentials (`OptionSpec.credential`): a new type brings its flags with it, and `--help` lists each
with the type it belongs to.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from dmrepl import destinations, replications, secrets, support
from dmrepl.cli.render import Col, escape, key_values, registry_of, state_of, steps_table, table
from dmrepl.destinations.base import CheckStep
from dmrepl.errors import RefusedError, UsageError
from dmrepl.models import DEFAULT_CHECK_TIMEOUT_S, Replication, Status

DestinationTypeName = enum.StrEnum("DestinationTypeName", {name: name for name in destinations.TYPES})  # type: ignore[misc]
SecretStore = enum.StrEnum("SecretStore", {name: name for name in secrets.STORES})  # type: ignore[misc]

TypeOpt = Annotated[
    DestinationTypeName,  # type: ignore[valid-type]
    typer.Option("--type", help="Destination type.", show_default=False),
]
CredentialsOpt = Annotated[
    Path | None,
    typer.Option(help="credentials.json (google-pubsub) or credentials.txt (azure-event-hubs).", show_default=False),
]
StoreOpt = Annotated[
    SecretStore | None,  # type: ignore[valid-type]
    typer.Option("--secret-store", help="Where to keep the secret (also DMREPL_SECRET_STORE).", show_default=False),
]


def finite(value: float | None) -> float | None:
    """`nan` and `inf` parse as floats but are no time limit anyone means."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number of seconds")
    return value


TimeoutOpt = Annotated[
    float, typer.Option("--timeout", help="Connectivity check time limit, seconds.", min=0.1, callback=finite)
]
RefArg = Annotated[str, typer.Argument(metavar="ID", help="Replication id or unique name.")]


ExpiresOpt = Annotated[
    str | None,
    typer.Option(
        "--expires",
        metavar="DATE",
        help="When the credentials expire, if they do not say so themselves (e.g. an Entra ID client secret): "
        "YYYY-MM-DD (00:00 UTC) or an ISO 8601 date and time. list, show and check warn 14 days before.",
        show_default=False,
    ),
]


def _binding_parameters(credential_only: bool = False) -> list[inspect.Parameter]:
    """One keyword parameter per option declared by a destination type (an option two types share, once); with
    `credential_only`, only the options that are part of the credentials (what `rotate` may change)."""
    seen: dict[str, inspect.Parameter] = {}
    for kind in destinations.all_types():
        for spec in kind.options:
            if spec.name in seen or (credential_only and not spec.credential):
                continue
            flags = spec.flags
            if spec.kind is bool:
                option: Any = typer.Option(flags, help=f"{spec.help} [{kind.name}]", show_default=False)
            else:
                option = typer.Option(flags, help=f"{spec.help} [{kind.name}]", show_default=False)
            annotation = Annotated[spec.kind | None, option]  # type: ignore[name-defined]
            seen[spec.name] = inspect.Parameter(
                spec.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
    return list(seen.values())


def with_binding_options(command: Callable[..., None], *, credential_only: bool = False) -> Callable[..., None]:
    """Give `command` the destination types' options; it receives them as one `binding` dict."""
    extra = _binding_parameters(credential_only)
    names = [p.name for p in extra]
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "binding"]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        binding = {name: kwargs.pop(name, None) for name in names}
        binding["credentials"] = kwargs.pop("credentials", None)
        command(*args, binding=binding, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


def target(rep: Replication) -> str:
    return replications.describe(rep)


def _show_warnings(ctx: typer.Context, warnings: list[str]) -> None:
    for warning in warnings:
        state_of(ctx).err.print(f"warning: {warning}", markup=False)


def _show_steps(ctx: typer.Context, steps: list[CheckStep]) -> None:
    if steps:
        state_of(ctx).out.print(steps_table(steps))


def _store(store: Any) -> str | None:
    return str(store.value) if store is not None else None


@with_binding_options
def create(
    ctx: typer.Context,
    type_name: TypeOpt,
    name: Annotated[str, typer.Option("--name", help="Unique name.", show_default=False)],
    datamart: Annotated[str | None, typer.Option(help="Datamart id (default: the only one).")] = None,
    credentials: CredentialsOpt = None,
    check: Annotated[bool, typer.Option("--check", help="Also run the connectivity check before saving.")] = False,
    timeout: TimeoutOpt = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: StoreOpt = None,
    expires: ExpiresOpt = None,
    *,
    binding: dict[str, Any],
) -> None:
    """Create a PAUSED replication; credentials are validated (and with --check, tested) before anything is saved."""
    rep, steps, warnings = replications.create(
        registry_of(ctx),
        type_name=str(type_name.value),
        name=name,
        datamart=datamart,
        options=binding,
        check=check,
        timeout_s=timeout,
        secret_store=_store(secret_store),
        expires=expires,
    )
    state = state_of(ctx)

    def human() -> None:
        _show_warnings(ctx, warnings)
        _show_steps(ctx, steps)
        state.out.print(f"created {rep.id} ({rep.name}, {rep.type}): PAUSED", markup=False)
        state.info(f"next: dmrepl activate {rep.id}")

    state.emit(rep.to_dict() | {"warnings": warnings}, human)


def list_cmd(
    ctx: typer.Context,
    datamart: Annotated[str | None, typer.Option(help="Only this datamart.")] = None,
    status: Annotated[
        Status | None, typer.Option(help="Only replications with this status.", case_sensitive=False)
    ] = None,
) -> None:
    """List replications."""
    reps = replications.list_(registry_of(ctx), datamart=datamart, status=status)
    state = state_of(ctx)
    now = datetime.now(UTC)

    def human() -> None:
        for r in reps:
            _warn_expiry(ctx, r, now)
        if not reps:
            state.info("no replication (create one with dmrepl create)")
            return
        rows = [
            (
                r.id,
                r.name,
                r.type,
                r.datamart,
                r.status + (f" ({r.error.code})" if r.error else "") + _expiry_marker(r, now),
                target(r),
                ("ok " if r.last_check.ok else "failed ") + r.last_check.at if r.last_check else "",
            )
            for r in reps
        ]
        columns = [
            Col("ID", "id"),
            Col("NAME", "id"),
            Col("TYPE", "id", 1),
            Col("DATAMART", "id", 2),
            Col("STATUS", "id"),
            Col("TARGET", "text"),
            Col("LAST CHECK", "id", 3),
        ]
        state.out.print(table(columns, rows))

    state.emit(reps, human)


def show(ctx: typer.Context, ref: RefArg) -> None:
    """Show a replication: settings, credential fingerprint, last check, error."""
    rep = replications.get(registry_of(ctx), ref)
    state = state_of(ctx)

    def human() -> None:
        _warn_expiry(ctx, rep, datetime.now(UTC))
        creds = rep.credentials
        pairs: list[tuple[str, Any]] = [
            ("id", rep.id),
            ("name", rep.name),
            ("type", rep.type),
            ("datamart", rep.datamart),
            ("status", rep.status),
            ("target", target(rep)),
            *((f"setting {k}", v) for k, v in rep.settings.items()),
            ("secret store", creds.store if creds else None),
            *((f"credentials {k}", v) for k, v in (creds.fingerprint if creds else {}).items()),
            ("credentials expire", _expiry_value(rep)),
            ("created", rep.created_at),
        ]
        if rep.error:
            e = rep.error
            pairs += [
                ("error", f"{e.code}: {e.message}"),
                ("error seen", f"{e.first_seen} .. {e.last_seen} ({e.attempts} attempts)"),
                ("undelivered", e.undelivered),
            ]
        state.out.print(key_values(pairs))
        if rep.last_check:
            lc = rep.last_check
            state.out.print()
            state.out.print(f"last check {lc.at}: {'ok' if lc.ok else 'FAILED'}", markup=False)
            state.out.print(steps_table([CheckStep(**s) for s in lc.steps]))

    state.emit(rep, human)


def check(ctx: typer.Context, ref: RefArg, timeout: TimeoutOpt = DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Run the connectivity check (never publishes); exit 5 when a step fails. The status does not change."""
    registry = registry_of(ctx)
    state = state_of(ctx)
    if not state.json:  # before the steps: a check that fails on expired credentials still shows why first
        _warn_expiry(ctx, replications.get(registry, ref), datetime.now(UTC))
    steps = replications.check(registry, ref, timeout_s=timeout)
    rep = replications.get(registry, ref)
    warning = replications.expiry_warning(rep)
    state.emit(
        {
            "ok": True,
            "steps": steps,
            "credentials_expire_at": rep.credentials_expire_at,
            "warnings": [warning] if warning else [],
        },
        lambda: _show_steps(ctx, steps),
    )


def history(ctx: typer.Context, ref: RefArg) -> None:
    """Show every status transition of a replication."""
    entries = replications.history(registry_of(ctx), ref)
    state = state_of(ctx)
    state.emit(
        entries,
        lambda: state.out.print(
            table(
                [Col("AT", "id"), Col("FROM", "id"), Col("TO", "id"), Col("REASON", "text")],
                ((h["at"], h.get("from", ""), h["to"], h["reason"]) for h in entries),
            )
        ),
    )


def activate(ctx: typer.Context, ref: RefArg, timeout: TimeoutOpt = DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Run the connectivity check and make the replication ACTIVE when it passes (exit 5 otherwise)."""
    rep, steps = replications.activate(registry_of(ctx), ref, timeout_s=timeout)
    state = state_of(ctx)

    def human() -> None:
        _show_steps(ctx, steps)
        state.out.print(f"{rep.name} ({rep.id}) is ACTIVE", markup=False)

    state.emit(rep.to_dict() | {"check": [s.to_dict() for s in steps]}, human)


def pause(ctx: typer.Context, ref: RefArg) -> None:
    """Pause a replication: nothing is sent to it (nor queued for it) until it is activated again."""
    rep = replications.pause(registry_of(ctx), ref)
    state = state_of(ctx)
    state.emit(rep, lambda: state.out.print(f"{rep.name} ({rep.id}) is PAUSED", markup=False))


def delete(
    ctx: typer.Context,
    ref: RefArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a replication and its stored credentials (asks first on a terminal; exit 6 when declined)."""
    registry = registry_of(ctx)
    rep = replications.get(registry, ref)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {rep.name} without --yes (stdin is not a terminal)")
        if not typer.confirm(escape(f"Delete {rep.name} ({rep.id}, {rep.type}, {rep.status})?")):
            raise RefusedError(f"{rep.name} was not deleted (declined)", code="DECLINED")
    replications.delete(registry, rep.id)
    state = state_of(ctx)
    state.emit(
        {"deleted": rep.id, "name": rep.name},
        lambda: state.out.print(f"deleted {rep.name} ({rep.id})", markup=False),
    )


@with_binding_options
def recreate(
    ctx: typer.Context,
    ref: RefArg,
    credentials: CredentialsOpt = None,
    timeout: TimeoutOpt = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: StoreOpt = None,
    expires: ExpiresOpt = None,
    *,
    binding: dict[str, Any],
) -> None:
    """Rebind a replication (the way out of ERROR): the new binding is validated and checked, then replaces the
    old one, keeping id, name and history. The replication is left PAUSED."""
    rep, steps, warnings = replications.recreate(
        registry_of(ctx), ref, options=binding, timeout_s=timeout, secret_store=_store(secret_store), expires=expires
    )
    state = state_of(ctx)

    def human() -> None:
        _show_warnings(ctx, warnings)
        _show_steps(ctx, steps)
        state.out.print(f"{rep.name} ({rep.id}) rebound: PAUSED", markup=False)
        state.info(f"next: dmrepl activate {rep.id}")

    state.emit(rep.to_dict() | {"warnings": warnings}, human)


def rotate(
    ctx: typer.Context,
    ref: RefArg,
    credentials: CredentialsOpt = None,
    timeout: TimeoutOpt = DEFAULT_CHECK_TIMEOUT_S,
    secret_store: StoreOpt = None,
    expires: ExpiresOpt = None,
    *,
    binding: dict[str, Any],
) -> None:
    """Replace a replication's credentials without a gap: the new ones are validated and checked (exit 5 when the
    check fails: nothing changes), then swapped in one step; the status stays (ACTIVE stays ACTIVE) and a running
    replicate switches within seconds. The old secret is deleted last. Settings do not change (that is recreate,
    which is also the way out of ERROR)."""
    rep, steps, warnings = replications.rotate(
        registry_of(ctx), ref, options=binding, timeout_s=timeout, secret_store=_store(secret_store), expires=expires
    )
    state = state_of(ctx)

    def human() -> None:
        _show_warnings(ctx, warnings)
        _show_steps(ctx, steps)
        state.out.print(f"{rep.name} ({rep.id}): credentials rotated, still {rep.status}", markup=False)

    state.emit(rep.to_dict() | {"warnings": warnings}, human)


rotate = with_binding_options(rotate, credential_only=True)


def _expiry_marker(rep: Replication, now: datetime) -> str:
    """Kept inside STATUS, a column never cut nor dropped, so it survives an 80-column terminal and a pipe."""
    status = replications.expiry_status(rep, now=now)
    if status is None:
        return ""
    kind, at = status
    return " (EXPIRED)" if kind == "expired" else f" (expires {at.strftime('%Y-%m-%d')})"


def _expiry_value(rep: Replication) -> str | None:
    if not rep.credentials_expire_at:
        return None
    return f"{rep.credentials_expire_at} ({rep.credentials_expiry_source or 'recorded'})"


def _warn_expiry(ctx: typer.Context, rep: Replication, now: datetime) -> None:
    warning = replications.expiry_warning(rep, now=now)
    if warning:
        _show_warnings(ctx, [warning])


def support_bundle(ctx: typer.Context, ref: RefArg) -> None:
    """Print a redacted JSON bundle for a support ticket: entry, fingerprints, checks, errors, history, versions."""
    state_of(ctx).emit(support.bundle(registry_of(ctx), ref))
