"""Output rules in one place: data on stdout, everything else on stderr, one JSON document with --json."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from dmrepl.destinations.base import CheckStep
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.registry import Registry


@dataclass
class State:
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    wait_s: float | None = None
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = Console(file=sys.stdout, highlight=False, soft_wrap=False)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = Console(file=sys.stderr, highlight=False, soft_wrap=True)
        return self._err

    def emit(self, data: Any, human: Callable[[], None] | None = None) -> None:
        """Print the command's result: JSON, or the human rendering (which defaults to the JSON)."""
        if self.json or human is None:
            sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
            sys.stdout.flush()
        else:
            human()

    def info(self, message: str) -> None:
        if not self.quiet and not self.json:
            self.err.print(message, markup=False)

    def error(self, exc: DmreplError, extra: dict[str, Any] | None = None) -> None:
        if self.json:
            payload: dict[str, Any] = {"code": exc.code, "message": exc.message, "exit_code": int(exc.exit_code)}
            if exc.details is not None:
                payload["details"] = _jsonable(exc.details)
            if extra:
                payload.update(extra)
            sys.stderr.write(json.dumps({"error": payload}, ensure_ascii=False, default=str) + "\n")
        else:
            if isinstance(exc.details, list) and exc.details and isinstance(exc.details[0], CheckStep):
                self.err.print(steps_table(exc.details))
            self.err.print(f"error: {exc.message}", markup=False, soft_wrap=True)
        if self.verbose:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()

    def unexpected(self, exc: BaseException) -> None:
        err = DmreplError(
            f"unexpected error: {type(exc).__name__}: {exc} (run with -v or DMREPL_DEBUG=1 for a traceback)",
            code="UNEXPECTED",
        )
        err.exit_code = ExitCode.UNEXPECTED
        self.error(err)


def state_of(ctx: Any) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State(verbose=debug_enabled())
    return root.obj


def registry_of(ctx: Any) -> Registry:
    return Registry(wait_s=state_of(ctx).wait_s)


def _jsonable(value: Any) -> Any:
    if isinstance(value, CheckStep):
        return value.to_dict()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def debug_enabled() -> bool:
    return os.environ.get("DMREPL_DEBUG", "") not in ("", "0", "false")


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> Table:
    """Whitespace-aligned columns like kubectl and gh. Only the widest column folds, so ids, names and statuses
    are never cut, whatever the terminal width."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(c)] + [max(map(len, r[i].splitlines() or [""])) for r in cells]) for i, c in enumerate(columns)]
    widest = max(range(len(columns)), key=lambda i: widths[i]) if columns else -1
    t = Table(title=title, box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    for i, c in enumerate(columns):
        if i == widest:
            t.add_column(c, overflow="fold")
        else:
            t.add_column(c, no_wrap=True, min_width=min(widths[i], 48))
    for row in cells:
        t.add_row(*row)
    return t


STATUS_MARK = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}


def steps_table(steps: Sequence[CheckStep]) -> Table:
    return table(
        ["STEP", "RESULT", "TIME", "DETAIL"],
        (
            (
                s.name,
                STATUS_MARK.get(s.status, s.status) + (f" ({s.code})" if s.code else ""),
                f"{s.duration_ms} ms",
                s.detail + (f"\nfix: {s.fix}" if s.fix else ""),
            )
            for s in steps
        ),
    )


def key_values(pairs: Iterable[tuple[str, Any]]) -> Table:
    t = Table(show_header=False, show_edge=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in pairs:
        if v not in (None, "", {}, []):
            t.add_row(k, str(v))
    return t


@contextlib.contextmanager
def graceful_stop(state: State, what: str) -> Iterator[threading.Event]:
    """First Ctrl-C or SIGTERM asks the run to stop at the next line and checkpoint; a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        state.info(f"stopping {what} at the next checkpoint (interrupt again to abort at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
