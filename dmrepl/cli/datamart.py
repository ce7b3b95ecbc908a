"""`dmrepl datamart …`: the datamarts whose operations are replicated."""

from __future__ import annotations

from typing import Annotated

import typer

from dmrepl import datamarts
from dmrepl.cli.render import Col, key_values, registry_of, state_of, table

app = typer.Typer(help="Add, list and show datamarts, and set their user point system version.", no_args_is_help=True)


@app.command("add")
def add(
    ctx: typer.Context,
    datamart_id: Annotated[str, typer.Argument(metavar="ID", help="Datamart id.")],
    name: Annotated[str | None, typer.Option(help="Display name (defaults to the id).")] = None,
    system_version: Annotated[
        str, typer.Option("--system-version", help="user_point_system_version, e.g. v201901 or v202205.")
    ] = datamarts.DEFAULT_SYSTEM_VERSION,
) -> None:
    """Register a datamart."""
    entry = datamarts.add(registry_of(ctx), datamart_id, name=name, system_version=system_version)
    state = state_of(ctx)
    state.emit(entry, lambda: state.out.print(f"datamart {entry.id} added ({system_version})", markup=False))


@app.command("list")
def list_cmd(ctx: typer.Context) -> None:
    """List datamarts."""
    entries = datamarts.list_(registry_of(ctx))
    state = state_of(ctx)

    def human() -> None:
        if not entries:
            state.info("no datamart yet: dmrepl datamart add ID --system-version V")
            return
        rows = [(d.id, d.name, d.user_point_system_version, count) for d, count in entries]
        columns = [Col("ID", "id"), Col("NAME", "id"), Col("SYSTEM VERSION", "id", 1), Col("REPLICATIONS", "number", 2)]
        state.out.print(table(columns, rows))

    state.emit([d for d, _ in entries], human)


@app.command("show")
def show(ctx: typer.Context, datamart_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show a datamart."""
    entry = datamarts.get(registry_of(ctx).load(), datamart_id)
    state = state_of(ctx)
    state.emit(entry, lambda: state.out.print(key_values(entry.to_dict().items())))


@app.command("set-version")
def set_version(
    ctx: typer.Context,
    datamart_id: Annotated[str, typer.Argument(metavar="ID")],
    version: Annotated[str, typer.Argument(metavar="V", help="e.g. v202205")],
) -> None:
    """Change a datamart's user point system version (e.g. after its migration to v202205)."""
    entry = datamarts.set_version(registry_of(ctx), datamart_id, version)
    state = state_of(ctx)
    state.emit(entry, lambda: state.out.print(f"datamart {datamart_id} is now {version}", markup=False))
