"""Replication commands: create, list, show, check, history, activate, pause, delete, recreate, support-bundle."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dmrepl import replications, support
from dmrepl.cli.render import key_values, registry_of, state_of, steps_table, table
from dmrepl.destinations.base import CheckStep
from dmrepl.errors import UsageError
from dmrepl.replications import BindingOptions

TypeOpt = Annotated[str, typer.Option("--type", help="google-pubsub | azure-event-hubs | file", show_default=False)]
CredentialsOpt = Annotated[
    Path | None,
    typer.Option(help="credentials.json (google-pubsub) or credentials.txt (azure-event-hubs).", show_default=False),
]
ProjectOpt = Annotated[str | None, typer.Option("--project-id", help="Pub/Sub project (default: credentials').")]
TopicOpt = Annotated[str | None, typer.Option("--topic-id", help="Pub/Sub topic id.")]
EndpointOpt = Annotated[str | None, typer.Option(help="Pub/Sub regional or private endpoint, host:port.")]
OrderingOpt = Annotated[
    bool | None,
    typer.Option("--ordering/--no-ordering", help="Pub/Sub ordering keys (default on).", show_default=False),
]
HubOpt = Annotated[str | None, typer.Option("--event-hub", help="Event hub name (default: EntityPath).")]
PathOpt = Annotated[Path | None, typer.Option("--path", help="NDJSON file to append to (file type).")]
StoreOpt = Annotated[
    str | None,
    typer.Option("--secret-store", help="auto | keyring | file (also DMREPL_SECRET_STORE).", show_default=False),
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Connectivity check time limit, seconds.", min=0.1)]
RefArg = Annotated[str, typer.Argument(metavar="ID", help="Replication id or unique name.")]


def _options(
    credentials: Path | None,
    project_id: str | None,
    topic_id: str | None,
    endpoint: str | None,
    ordering: bool | None,
    event_hub: str | None,
    path: Path | None,
) -> BindingOptions:
    return BindingOptions(
        credentials=str(credentials) if credentials else None,
        project_id=project_id,
        topic_id=topic_id,
        endpoint=endpoint,
        ordering=ordering,
        event_hub=event_hub,
        path=str(path) if path else None,
    )


def target(rep: dict[str, Any]) -> str:
    s = rep.get("settings", {})
    if rep["type"] == "google-pubsub":
        return f"projects/{s.get('project_id')}/topics/{s.get('topic_id')}"
    if rep["type"] == "azure-event-hubs":
        return f"{s.get('namespace', '')}/{s.get('event_hub')}"
    return str(s.get("path", ""))


def _show_steps(ctx: typer.Context, steps: list[CheckStep]) -> None:
    if steps:
        state_of(ctx).out.print(steps_table(steps))


def create(
    ctx: typer.Context,
    type_name: TypeOpt,
    name: Annotated[str, typer.Option("--name", help="Unique name.", show_default=False)],
    datamart: Annotated[str | None, typer.Option(help="Datamart id (default: the only one).")] = None,
    credentials: CredentialsOpt = None,
    project_id: ProjectOpt = None,
    topic_id: TopicOpt = None,
    endpoint: EndpointOpt = None,
    ordering: OrderingOpt = None,
    event_hub: HubOpt = None,
    path: PathOpt = None,
    check: Annotated[bool, typer.Option("--check", help="Also run the connectivity check before saving.")] = False,
    timeout: TimeoutOpt = replications.DEFAULT_CHECK_TIMEOUT_S,
    secret_store: StoreOpt = None,
) -> None:
    """Create a PAUSED replication; credentials are validated (and with --check, tested) before anything is saved."""
    rep, steps = replications.create(
        registry_of(ctx),
        type_name=type_name,
        name=name,
        datamart=datamart,
        options=_options(credentials, project_id, topic_id, endpoint, ordering, event_hub, path),
        check=check,
        timeout_s=timeout,
        secret_store=secret_store,
    )
    state = state_of(ctx)

    def human() -> None:
        _show_steps(ctx, steps)
        state.out.print(f"created {rep['id']} ({rep['name']}, {rep['type']}): PAUSED", markup=False)
        state.info(f"next: dmrepl activate {rep['id']}")

    state.emit(rep, human)


def list_cmd(
    ctx: typer.Context,
    datamart: Annotated[str | None, typer.Option(help="Only this datamart.")] = None,
    status: Annotated[str | None, typer.Option(help="Only PAUSED, ACTIVE or ERROR.")] = None,
) -> None:
    """List replications."""
    reps = replications.list_(registry_of(ctx), datamart=datamart, status=status)
    state = state_of(ctx)

    def human() -> None:
        if not reps:
            state.info("no replication (create one with dmrepl create)")
            return
        rows = [
            (
                r["id"],
                r["name"],
                r["type"],
                r["datamart"],
                r["status"] + (f" ({r['error']['code']})" if r.get("error") else ""),
                target(r),
                ("ok " if r["last_check"]["ok"] else "failed ") + r["last_check"]["at"] if r.get("last_check") else "",
            )
            for r in reps
        ]
        state.out.print(table(["ID", "NAME", "TYPE", "DATAMART", "STATUS", "TARGET", "LAST CHECK"], rows))

    state.emit(reps, human)


def show(ctx: typer.Context, ref: RefArg) -> None:
    """Show a replication: settings, credential fingerprint, last check, error."""
    rep = replications.get(registry_of(ctx), ref)
    state = state_of(ctx)

    def human() -> None:
        creds = rep.get("credentials") or {}
        fp = creds.get("fingerprint") or {}
        pairs: list[tuple[str, Any]] = [
            ("id", rep["id"]),
            ("name", rep["name"]),
            ("type", rep["type"]),
            ("datamart", rep["datamart"]),
            ("status", rep["status"]),
            ("target", target(rep)),
            *((f"setting {k}", v) for k, v in rep.get("settings", {}).items()),
            ("secret store", creds.get("store")),
            *((f"credentials {k}", v) for k, v in fp.items()),
            ("created", rep.get("created_at")),
        ]
        if rep.get("error"):
            e = rep["error"]
            pairs += [
                ("error", f"{e['code']}: {e['message']}"),
                ("error seen", f"{e.get('first_seen')} .. {e.get('last_seen')} ({e.get('attempts')} attempts)"),
                ("undelivered", e.get("undelivered")),
            ]
        state.out.print(key_values(pairs))
        if rep.get("last_check"):
            lc = rep["last_check"]
            state.out.print(f"\nlast check {lc['at']}: {'ok' if lc['ok'] else 'FAILED'}", markup=False)
            state.out.print(steps_table([CheckStep(**s) for s in lc["steps"]]))

    state.emit(rep, human)


def check(ctx: typer.Context, ref: RefArg, timeout: TimeoutOpt = replications.DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Run the connectivity check (never publishes); exit 5 when a step fails. The status does not change."""
    steps = replications.check(registry_of(ctx), ref, timeout_s=timeout)
    state = state_of(ctx)
    ok = replications.check_passed(steps)
    state.emit({"ok": ok, "steps": [s.to_dict() for s in steps]}, lambda: _show_steps(ctx, steps))
    if not ok:
        state.info("connectivity check failed")
        raise typer.Exit(5)


def history(ctx: typer.Context, ref: RefArg) -> None:
    """Show every status transition of a replication."""
    entries = replications.history(registry_of(ctx), ref)
    state = state_of(ctx)
    state.emit(
        entries,
        lambda: state.out.print(
            table(["AT", "FROM", "TO", "REASON"], ((h["at"], h.get("from", ""), h["to"], h["reason"]) for h in entries))
        ),
    )


def activate(ctx: typer.Context, ref: RefArg, timeout: TimeoutOpt = replications.DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Run the connectivity check and make the replication ACTIVE when it passes (exit 5 otherwise)."""
    rep, steps = replications.activate(registry_of(ctx), ref, timeout_s=timeout)
    state = state_of(ctx)

    def human() -> None:
        _show_steps(ctx, steps)
        state.out.print(f"{rep['name']} ({rep['id']}) is ACTIVE", markup=False)

    state.emit(rep | {"check": [s.to_dict() for s in steps]}, human)


def pause(ctx: typer.Context, ref: RefArg) -> None:
    """Pause a replication: nothing is sent to it (nor queued for it) until it is activated again."""
    rep = replications.pause(registry_of(ctx), ref)
    state = state_of(ctx)
    state.emit(rep, lambda: state.out.print(f"{rep['name']} ({rep['id']}) is PAUSED", markup=False))


def delete(
    ctx: typer.Context,
    ref: RefArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a replication and its stored credentials."""
    registry = registry_of(ctx)
    rep = replications.get(registry, ref)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {rep['name']} without --yes (stdin is not a terminal)")
        if not typer.confirm(f"Delete {rep['name']} ({rep['id']}, {rep['type']}, {rep['status']})?"):
            raise typer.Exit(1)
    replications.delete(registry, rep["id"])
    state = state_of(ctx)
    state.emit(
        {"deleted": rep["id"], "name": rep["name"]},
        lambda: state.out.print(f"deleted {rep['name']} ({rep['id']})", markup=False),
    )


def recreate(
    ctx: typer.Context,
    ref: RefArg,
    credentials: CredentialsOpt = None,
    project_id: ProjectOpt = None,
    topic_id: TopicOpt = None,
    endpoint: EndpointOpt = None,
    ordering: OrderingOpt = None,
    event_hub: HubOpt = None,
    path: PathOpt = None,
    timeout: TimeoutOpt = replications.DEFAULT_CHECK_TIMEOUT_S,
    secret_store: StoreOpt = None,
) -> None:
    """Rebind a replication (the way out of ERROR): the new binding is validated and checked, then replaces the
    old one, keeping id, name and history. The replication is left PAUSED."""
    rep, steps = replications.recreate(
        registry_of(ctx),
        ref,
        options=_options(credentials, project_id, topic_id, endpoint, ordering, event_hub, path),
        timeout_s=timeout,
        secret_store=secret_store,
    )
    state = state_of(ctx)

    def human() -> None:
        _show_steps(ctx, steps)
        state.out.print(f"{rep['name']} ({rep['id']}) rebound: PAUSED", markup=False)
        state.info(f"next: dmrepl activate {rep['id']}")

    state.emit(rep, human)


def support_bundle(ctx: typer.Context, ref: RefArg) -> None:
    """Print a redacted JSON bundle for a support ticket: entry, fingerprints, checks, errors, history, versions."""
    state_of(ctx).emit(support.bundle(registry_of(ctx), ref))


def register(app: typer.Typer) -> None:
    app.command("create")(create)
    app.command("list")(list_cmd)
    app.command("show")(show)
    app.command("check")(check)
    app.command("history")(history)
    app.command("activate")(activate)
    app.command("pause")(pause)
    app.command("delete")(delete)
    app.command("recreate")(recreate)
    app.command("support-bundle")(support_bundle)
