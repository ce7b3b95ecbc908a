"""Output rules in one place: data on stdout, everything else on stderr, one JSON document with --json."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from rich.cells import cell_len, get_character_cell_size
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

from dmrepl.destinations.base import CheckStep
from dmrepl.errors import DmreplError, ExitCode, hint_for
from dmrepl.models import Record
from dmrepl.registry import Registry


class Output(Console):
    """stdout or stderr. Every plain string printed on it is escaped (a name, a path or a server's message must not
    drive the terminal), whoever prints it; tables ask it whether --wide was given. Never folds a line itself: in a
    pipe a line stays whole, on a terminal the terminal wraps it."""

    def __init__(self, file: IO[str]) -> None:
        super().__init__(file=file, highlight=False, soft_wrap=True)
        self.wide = False

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        from rich.text import Text

        super().print(*(Text(escape(o)) if isinstance(o, str) else o for o in objects), **kwargs)


@dataclass
class State:
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    wide: bool = False
    wait_s: float | None = None
    home: Path | None = None
    _out: Output | None = field(default=None, repr=False)
    _err: Output | None = field(default=None, repr=False)

    @property
    def out(self) -> Output:
        if self._out is None:
            self._out = Output(sys.stdout)
        self._out.wide = self.wide
        return self._out

    @property
    def err(self) -> Output:
        if self._err is None:
            self._err = Output(sys.stderr)
        self._err.wide = self.wide
        return self._err

    def emit(self, data: Any, human: Callable[[], None] | None = None) -> None:
        """Print the command's result: JSON, or the human rendering (which defaults to the JSON)."""
        if self.json or human is None:
            sys.stdout.write(_json_text(data, indent=2) + "\n")
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
            sys.stderr.write(_json_text({"error": payload}) + "\n")
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


Kind = Literal["id", "number", "text", "prose"]
GAP = 2  # spaces between columns, as gh and kubectl
MIN_TEXT = 20  # a text column is never shortened below this (or its header), so a path keeps a recognisable end


@dataclass(frozen=True, slots=True)
class Col:
    """How a column gives way on a narrow terminal, declared once per table instead of special cases per command.

    `kind`: "id" is always whole (ids, names, statuses, and timestamps, which mean nothing cut: whole or dropped);
    "number" is whole and right-aligned; "text" is shortened in the middle, so a path keeps its file name
    (`/var/lib/…/ops.ndjson`); "prose" wraps instead, for a cause and its fix, which are useless half read.
    `priority`: 0 is always shown; when the table does not fit even shortened, the columns with the highest
    priority numbers are dropped first.
    """

    name: str
    kind: Kind = "text"
    priority: int = 0


Cell = str | int | float | Sequence[str] | None  # a sequence is a cell of several lines (joined by "; " in TSV)


def escape(value: object) -> str:
    """Control characters from a name, a path, an export file name or a server's message would drive the terminal
    (retitle it, recolour it, fake a line); they are shown as escapes instead. Tabs and newlines too, so a TSV row
    stays one row. The one place human output is made safe: tables, key/values and every printed string."""
    text = value if isinstance(value, str) else str(value)
    return text if text.isprintable() else text.translate(_ESCAPES)


_C0_C1 = [*range(0x20), 0x7F, *range(0x80, 0xA0)]
_BIDI = [0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: f"\\x{c:02x}" for c in _C0_C1} | {9: "\\t", 10: "\\n", 13: "\\r"} | {c: f"\\u{c:04x}" for c in _BIDI}
# json.dumps escapes C0 but, with ensure_ascii=False, leaves DEL, C1 (0x9b is a CSI) and bidi controls raw: the same
# JSON value with those as \u escapes is safe to print.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in [0x7F, *range(0x80, 0xA0), *_BIDI]}


def _json_text(data: Any, indent: int | None = None) -> str:
    return json.dumps(_jsonable(data), ensure_ascii=False, indent=indent, default=str).translate(_JSON_ESCAPES)


def _lines(value: Cell) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, str | int | float):
        return [escape(value)]
    return [escape(v) for v in value] or [""]


def _faces_a_person(console: Console) -> bool:
    """gh's rule: aligned, fitted tables for a terminal; for a pipe, cron or a file, one whole row per line. Asked of
    the stream itself: Rich's is_terminal says yes to FORCE_COLOR, which CI sets, and `| cut -f1` must still work."""
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def _ellipsis(console: Console) -> str:
    return "…" if (console.encoding or "").lower().startswith("utf") else "~"


def _take(text: str, width: int) -> str:
    """The longest prefix of `text` that fits in `width` cells."""
    used = 0
    for i, ch in enumerate(text):
        used += get_character_cell_size(ch)
        if used > width:
            return text[:i]
    return text


def shorten(text: str, width: int, ellipsis: str = "…") -> str:
    """Cut the middle out: both ends of a path, a target or a reason say more than its middle, and the end (a file
    name) a little more than the start."""
    if cell_len(text) <= width:
        return text
    room = max(width - cell_len(ellipsis), 0)
    tail = _take(text[::-1], room - room * 2 // 5)[::-1]
    return _take(text, room - cell_len(tail)) + ellipsis + tail


def _floor(col: Col, natural: int) -> int:
    if col.kind in ("id", "number"):
        return natural
    return min(natural, max(cell_len(col.name), MIN_TEXT))


def fit(columns: Sequence[Col], natural: Sequence[int], width: int) -> dict[int, int]:
    """Which columns to show, and how wide: shorten before dropping, drop (highest priority number first) only when
    even the shortest layout is too wide, and never cut an id. Returns {column index: width}, in column order."""
    shown = list(range(len(columns)))

    def total(widths: Iterable[int]) -> int:
        ws = list(widths)
        return sum(ws) + GAP * max(len(ws) - 1, 0)

    while total(_floor(columns[i], natural[i]) for i in shown) > width:
        droppable = [i for i in shown if columns[i].priority > 0]
        if not droppable:
            break
        shown.remove(max(droppable, key=lambda i: (columns[i].priority, i)))
    widths = {i: natural[i] for i in shown}
    excess = total(widths.values()) - width
    shrinkable = [i for i in shown if columns[i].kind in ("text", "prose")]
    for i in sorted(shrinkable, key=lambda i: (-columns[i].priority, -i)):  # the least valuable gives way first
        if excess <= 0:
            break
        cut = min(excess, widths[i] - _floor(columns[i], natural[i]))
        widths[i] -= cut
        excess -= cut
    return widths


def _pad(text: str, width: int, right: bool = False) -> str:
    space = " " * max(width - cell_len(text), 0)
    return space + text if right else text + space


class Grid:
    """A table that lays itself out for the console it is printed on (see `table`)."""

    def __init__(self, columns: Sequence[Col | str], rows: Iterable[Sequence[Cell]]) -> None:
        self.columns = [c if isinstance(c, Col) else Col(c, "id") for c in columns]
        self.rows = [[_lines(v) for v in row] for row in rows]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not _faces_a_person(console):
            yield Segment("\t".join(escape(c.name) for c in self.columns) + "\n")
            for row in self.rows:
                yield Segment("\t".join("; ".join(lines) for lines in row) + "\n")
            return
        natural = [
            max([cell_len(c.name)] + [cell_len(line) for row in self.rows for line in row[i]])
            for i, c in enumerate(self.columns)
        ]
        wide = getattr(console, "wide", False)
        widths = dict(enumerate(natural)) if wide else fit(self.columns, natural, options.max_width)
        header = [_pad(self.columns[i].name, w, self.columns[i].kind == "number") for i, w in widths.items()]
        yield Segment((" " * GAP).join(header).rstrip(), Style(bold=True))
        yield Segment.line()
        ellipsis = _ellipsis(console)
        for row in self.rows:
            cells: dict[int, list[str]] = {}
            for i, w in widths.items():
                kind, lines = self.columns[i].kind, row[i]
                if wide or w >= natural[i]:
                    cells[i] = lines
                elif kind == "text":
                    cells[i] = [shorten(line, w, ellipsis) for line in lines]
                elif kind == "prose":
                    cells[i] = [piece for line in lines for piece in _wrap(console, line, w)]
                else:
                    cells[i] = lines
            for k in range(max(len(c) for c in cells.values())):
                parts = [
                    _pad(cells[i][k] if k < len(cells[i]) else "", w, self.columns[i].kind == "number")
                    for i, w in widths.items()
                ]
                yield Segment((" " * GAP).join(parts).rstrip())
                yield Segment.line()


def _wrap(console: Console, text: str, width: int) -> list[str]:
    from rich.text import Text

    return [line.plain.rstrip() for line in Text(text).wrap(console, max(width, 1), overflow="fold")] or [""]


def table(columns: Sequence[Col | str], rows: Iterable[Sequence[Cell]]) -> Grid:
    """Rows for people and for programs. On a terminal: aligned, fitted to its width by each column's `Col` (ids
    never cut, long text shortened in the middle, low-priority columns dropped; --wide shows everything). Anywhere
    else: a header line and tab-separated rows, nothing cut or folded, one row per line. A bare string column is an
    id. Every cell is escaped."""
    return Grid(columns, rows)


STATUS_MARK = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}


def steps_table(steps: Sequence[CheckStep]) -> Grid:
    return table(
        [Col("STEP", "id"), Col("RESULT", "id"), Col("TIME", "number", 1), Col("DETAIL", "prose")],
        (
            (
                s.name,
                STATUS_MARK.get(s.status, s.status) + (f" ({s.code})" if s.code else ""),
                f"{s.duration_ms} ms",
                [s.detail, f"fix: {s.fix}"] if s.fix else s.detail,
            )
            for s in steps
        ),
    )


class KeyValues:
    """`key  value` lines for `show`; `key<TAB>value` when not on a terminal. Values are never cut: on a terminal
    they wrap under themselves (unless --wide)."""

    def __init__(self, pairs: Iterable[tuple[str, Any]]) -> None:
        self.pairs = [(escape(k), escape(v)) for k, v in pairs if v not in (None, "", {}, [])]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not _faces_a_person(console):
            for k, v in self.pairs:
                yield Segment(f"{k}\t{v}\n")
            return
        key_width = max((cell_len(k) for k, _ in self.pairs), default=0) + GAP
        room = options.max_width - key_width
        wrap = not getattr(console, "wide", False) and room >= MIN_TEXT
        for k, v in self.pairs:
            lines = _wrap(console, v, room) if wrap else [v]
            yield Segment(k, Style(bold=True))
            yield Segment(" " * (key_width - cell_len(k)) + lines[0])
            yield Segment.line()
            for line in lines[1:]:
                yield Segment(" " * key_width + line)
                yield Segment.line()


def key_values(pairs: Iterable[tuple[str, Any]]) -> KeyValues:
    return KeyValues(pairs)
