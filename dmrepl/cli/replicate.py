"""`dmrepl replicate`: forward a live stream of operations to every ACTIVE replication."""

from __future__ import annotations

from typing import Annotated

import typer

from dmrepl.cli.render import key_values, registry_of, state_of, table
from dmrepl.cli.signals import graceful_stop
from dmrepl.errors import DeliveryFailedError, InterruptedError_
from dmrepl.models import DEFAULT_MAX_LINE_BYTES, DEFAULT_RETRY_BUDGET_S


def replicate(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="FILE|-", help="Operations NDJSON; - for stdin.")] = "-",
    datamart: Annotated[str | None, typer.Option(help="Datamart id (default: the only one).")] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep reading a growing file by name, like tail -F: rotation (rename or copytruncate) is followed, "
            "and a restarted run continues after the last acknowledged line (positions in <home>/live).",
        ),
    ] = False,
    from_end: Annotated[
        bool | None,
        typer.Option(
            "--from-end/--from-start",
            help="Where a first --follow of FILE starts (no saved position yet): at its end (new lines only) or at "
            "its start (the default). A saved position always wins.",
            show_default=False,
        ),
    ] = None,
    retry_budget: Annotated[
        float, typer.Option("--retry-budget", help="Seconds of retries of transient failures before ERROR.", min=0)
    ] = DEFAULT_RETRY_BUDGET_S,
    max_line_bytes: Annotated[
        int, typer.Option("--max-line-bytes", help="Longer lines are rejected.", min=1024)
    ] = DEFAULT_MAX_LINE_BYTES,
) -> None:
    """Deliver each operation to every replication ACTIVE at that moment (pause, activate and recreate apply within
    seconds)."""
    from dmrepl import live  # only for this command: `dmrepl --help` and `list` do not pay for it

    state = state_of(ctx)
    with graceful_stop(
        lambda: state.info("stopping replication at the next checkpoint (interrupt again to abort)")
    ) as stop:
        outcome = live.run(
            registry_of(ctx),
            source,
            datamart=datamart,
            follow=follow,
            start=None if from_end is None else ("end" if from_end else "start"),
            retry_budget_s=retry_budget,
            max_line_bytes=max_line_bytes,
            stop=stop.is_set,
            log=state.info,
        )
    result = outcome.to_dict()

    def human() -> None:
        state.out.print(
            key_values(
                [
                    ("lines", outcome.lines),
                    ("operations", sum(outcome.operations.values())),
                    ("rejected", outcome.rejects),
                    ("rejects file", result["rejects_file"]),
                ]
            )
        )
        if outcome.delivered:
            state.out.print(table(["REPLICATION", "DELIVERED"], sorted(outcome.delivered.items())))

    state.emit(result, human)
    if outcome.errored:
        names = ", ".join(f"{v['name']} ({v.get('code')})" for v in outcome.errored.values())
        raise DeliveryFailedError(f"replication(s) went to ERROR: {names}", code="REPLICATION_ERROR")
    if stop.is_set():
        raise InterruptedError_("interrupted: everything read so far was delivered")
