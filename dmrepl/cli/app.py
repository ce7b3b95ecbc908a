"""The `dmrepl` command: global options, error handling and exit codes, and the command groups."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dmrepl import __version__
from dmrepl.cli import datamart, replicate, replication, signals, sync
from dmrepl.cli.render import debug_enabled, state_of
from dmrepl.errors import EXIT_CODE_HELP, DmreplError, ExitCode, Interrupted, InterruptedError_, os_error
from dmrepl.registry import home as registry_home


class DmreplGroup(TyperGroup):
    """Turns expected errors into their documented exit code and a one-line message, never a traceback."""

    def main(
        self,
        args: Any = None,
        prog_name: Any = None,
        complete_var: Any = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Usage errors follow --json too (one JSON error on stderr), and Ctrl-C anywhere exits 130."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except typer.TyperException as exc:
            code = getattr(exc, "exit_code", 2)
            if "--json" in argv:
                message = exc.format_message()
                sys.stderr.write(json.dumps({"error": {"code": "USAGE", "message": message, "exit_code": code}}) + "\n")
            else:
                exc.show()  # type: ignore[attr-defined]
            sys.exit(code)
        except typer.Abort:
            sys.stderr.write("error: interrupted\n")
            sys.exit(int(ExitCode.INTERRUPTED))
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except DmreplError as exc:
            state_of(ctx).error(exc)
            raise typer.Exit(int(exc.exit_code)) from None
        except (KeyboardInterrupt, Interrupted):
            state_of(ctx).error(InterruptedError_("interrupted"))
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except OSError as exc:
            state_of(ctx).error(os_error(exc))
            raise typer.Exit(int(ExitCode.SYSTEM)) from None
        except Exception as exc:
            state = state_of(ctx)
            state.unexpected(exc)
            raise typer.Exit(int(ExitCode.UNEXPECTED)) from None


app = typer.Typer(
    cls=DmreplGroup,
    name="dmrepl",
    help=(
        "Replicate every datamart operation to Google Pub/Sub, Azure Event Hubs or a local NDJSON file.\n\n"
        f"Exit codes:\n\n\b\n{EXIT_CODE_HELP}"
    ),
    epilog="Registry: $DMREPL_HOME, else the user config dir (see dmrepl home). Docs: README.md.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        # Eager: it runs before --json is parsed, so look at the command line itself.
        if "--json" in sys.argv[1:] or ctx.params.get("json_output"):
            typer.echo(json.dumps({"version": __version__}))
        else:
            typer.echo(f"dmrepl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[
        Path | None, typer.Option("--home", help="Registry directory (overrides DMREPL_HOME).", show_default=False)
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only data and errors; no progress.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks (also DMREPL_DEBUG=1).")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="On a terminal, show every table column whole (lines may wrap).")
    ] = False,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the registry lock before exit 6.", min=0)
    ] = 30.0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    state = state_of(ctx)
    state.json, state.quiet, state.verbose = json_output, quiet, verbose or debug_enabled()
    state.wide = wide
    state.wait_s = wait
    state.home = home.expanduser().absolute() if home is not None else None
    _quiet_sdk_loggers(state.verbose)


def _quiet_sdk_loggers(verbose: bool) -> None:
    """The cloud SDKs log retries as WARNINGs on stderr, and at DEBUG they log tokens: keep them to errors
    (warnings with -v), never DEBUG, whatever the user's logging setup."""
    for name in ("azure", "uamqp", "google", "grpc", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)


def home_cmd(ctx: typer.Context) -> None:
    """Print the registry directory."""
    path = str(state_of(ctx).home or registry_home())
    state_of(ctx).emit({"home": path}, lambda: state_of(ctx).out.print(path, markup=False))


# Every command, in the order `dmrepl --help` lists them.
app.command("home")(home_cmd)
app.add_typer(datamart.app, name="datamart")
app.command("create")(replication.create)
app.command("list")(replication.list_cmd)
app.command("show")(replication.show)
app.command("check")(replication.check)
app.command("history")(replication.history)
app.command("activate")(replication.activate)
app.command("pause")(replication.pause)
app.command("delete")(replication.delete)
app.command("recreate")(replication.recreate)
app.command("rotate")(replication.rotate)
app.command("support-bundle")(replication.support_bundle)
app.add_typer(sync.app, name="sync")
app.command("replicate")(replicate.replicate)


def main() -> None:
    signals.install()
    try:
        app(prog_name="dmrepl")
    except Interrupted:
        sys.exit(int(ExitCode.INTERRUPTED))
