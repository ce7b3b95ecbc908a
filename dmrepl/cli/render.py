"""Output rules in one place: data on stdout, everything else on stderr, one JSON document with --json."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dmrepl.destinations.base import CheckStep
from dmrepl.errors import DmreplError, ExitCode, hint_for
from dmrepl.models import Record
from dmrepl.registry import Registry


@dataclass
class State:
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    wait_s: float | None = None
    home: Path | None = None
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
            sys.stdout.write(json.dumps(_jsonable(data), ensure_ascii=False, indent=2, default=str) + "\n")
            sys.stdout.flush()
        else:
            human()

    def info(self, message: str) -> None:
        if not self.quiet and not self.json:
            self.err.print(message, markup=False)

    def error(self, exc: DmreplError) -> None:
        """Every expected failure, whatever the command: one line (its hint included), or one JSON document."""
        hint = hint_for(exc.code, exc.message)
        if self.json:
            payload: dict[str, Any] = {"code": exc.code, "message": exc.message, "exit_code": int(exc.exit_code)}
            if hint:
                payload["hint"] = hint
            if exc.details is not None:
                payload["details"] = _jsonable(exc.details)
            sys.stderr.write(json.dumps({"error": payload}, ensure_ascii=False, default=str) + "\n")
        else:
            if isinstance(exc.details, list) and exc.details and isinstance(exc.details[0], CheckStep):
                self.err.print(steps_table(exc.details))
            text = f"error: {exc.message}" + (f" (next: {hint})" if hint else "")
            self.err.print(text, markup=False, soft_wrap=True)
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
    state = state_of(ctx)
    return Registry(state.home, wait_s=state.wait_s)


def _jsonable(value: Any) -> Any:
    if isinstance(value, CheckStep | Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
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
