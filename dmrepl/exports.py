"""Reading datamart exports and turning user points into operations (docs/operations.md), for `sync`.

Exports are untrusted and can be many GB: they are streamed (memory stays flat in the file size), lines are
bounded without ever buffering an over-long one whole, and a bad line becomes one reject rather than an abort.
The user-point transformation itself is `dmrepl.transform`.

Decisions:
- gzip is recognized by its magic bytes, never by the file name; multi-member gzip (pigz, bgzip) is supported.
- A UTF-8 BOM is tolerated at the start of the file only.
- Blank (whitespace-only) lines are skipped silently but counted, so line numbers match `sed -n Np`.
- A list given as `null` counts as empty, a timestamp given as `null` as absent; any other wrong type rejects the
  line. Numeric ids (`"compartment_id": 3`) are accepted and rendered as strings.
- An empty file (no data line) yields nothing; in auto mode its format is reported as "user-points".
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

from dmrepl.models import DEFAULT_MAX_LINE_BYTES
from dmrepl.operations import (
    Message,
    Rejected,
    json_error_reason,
    parse_operation_line,
)
from dmrepl.storage import ExportError, LocalSource, Source, open_source
from dmrepl.transform import NEW_DEVICE_MODEL, InvalidLine, transform

FORMATS: tuple[str, ...] = ("operations", "user-points")

_BUF = 1 << 20
_DISCARD_CHUNK = 1 << 16
_BOM = b"\xef\xbb\xbf"
_LBRACE = 0x7B
_NEWLINE = 0x0A

_VERSION_RE = re.compile(r"v[0-9]{6}")
_loads = orjson.loads


@dataclass(slots=True)
class ExportLine:
    """One non-blank line: either its operations, or the reason it was rejected (then `messages` is empty).

    `end_offset` is in the decompressed stream, so it is the checkpoint to pass back to `ExportReader.lines`.
    """

    line_no: int
    end_offset: int
    messages: list[Message]
    reject: str | None = None


# --- reading export files --------------------------------------------------------------------------------------


def make_converter(fmt: str, system_version: str, start_ts: int) -> Callable[[bytes], list[Message]]:
    """Line → messages for one export format; module-level so worker processes can build their own."""
    if fmt == "operations":
        parse = parse_operation_line

        def convert_operation(line: bytes) -> list[Message]:
            return [parse(line)]

        return convert_operation
    new_model = system_version >= NEW_DEVICE_MODEL

    def convert_user_point(line: bytes) -> list[Message]:
        try:
            obj = _loads(line)
        except orjson.JSONDecodeError as exc:
            raise InvalidLine(json_error_reason(exc)) from None
        try:
            return transform(obj, new_model, system_version, start_ts)
        except orjson.JSONEncodeError as exc:
            raise InvalidLine(f"cannot be serialized ({exc})") from None

    return convert_user_point


#: What converting a line raises when the line is a reject.
REJECTED = Rejected


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file as stored on disk, recorded per source file so a resume can refuse a changed export."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ExportError(f"export file {path}: cannot read it ({exc.strerror or exc})") from None


class ExportReader:
    """One export file: its format, whether it is gzip, and a resumable stream of its lines as operations.

    `lines()` opens the file afresh on every call, so one reader can serve `plan` and then `start`, or a resume.
    """

    def __init__(
        self,
        path: str | Path | Source,
        *,
        fmt: str = "auto",
        system_version: str = "v202205",
        start_ts: int,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"format must be auto, {' or '.join(FORMATS)}, not {fmt!r}")
        if _VERSION_RE.fullmatch(system_version) is None:
            raise ValueError(f"system_version must look like v202205, not {system_version!r}")
        if type(start_ts) is not int or start_ts < 0:
            raise ValueError(f"start_ts must be a non-negative integer (ms), not {start_ts!r}")
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        #: Where the bytes come from (`dmrepl.storage`): a local file or an object.
        self.source: Source = path if isinstance(path, Source) else open_source(str(path))
        #: As the user named it: a local path, or the object's URL.
        self.path: Path | str = self.source.path if isinstance(self.source, LocalSource) else self.source.name
        self.system_version = system_version
        self.start_ts = start_ts
        self.max_line_bytes = max_line_bytes
        self._fileio: IO[bytes] | None = None
        self._last_raw = 0
        self.size: int = self.source.size
        self.compressed: bool = self.source.compressed()
        self.format: str = self._detect() if fmt == "auto" else fmt

    def __repr__(self) -> str:
        return f"ExportReader({str(self.path)!r}, format={self.format!r}, compressed={self.compressed})"

    @property
    def raw_position(self) -> int:
        """Bytes of the file on disk consumed so far (compressed bytes for gzip), for a progress bar.

        Approximate by up to one read buffer; safe to call from another thread.
        """
        f = self._fileio
        if f is not None:
            try:
                return f.tell()
            except (OSError, ValueError):
                pass
        return self._last_raw

    def _open(self) -> tuple[IO[bytes], IO[bytes]]:
        """Return (line stream, on-disk file): the stream decompresses when needed, the file measures progress."""
        if not self.compressed:
            f = self.source.open()
            return f, f
        raw = self.source.open()
        try:
            stream = io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), _BUF)  # type: ignore[arg-type]
        except BaseException:
            raw.close()
            raise
        return stream, raw

    def _error(self, exc: BaseException, line_no: int | None = None) -> ExportError:
        at = f" after line {line_no}" if line_no is not None else ""
        if isinstance(exc, EOFError):
            what = "the gzip stream is truncated"
        elif isinstance(exc, (zlib.error, gzip.BadGzipFile)):
            what = f"corrupt gzip data ({exc})"
        elif isinstance(exc, OSError):
            what = f"cannot read it ({exc.strerror or exc})"
        else:
            what = str(exc)
        return ExportError(f"export file {self.path}: {what}{at}")

    def _detect(self) -> str:
        hint = "use --format operations or --format user-points"
        limit = self.max_line_bytes + 1
        try:
            stream, raw = self._open()
            try:
                line_no = 0
                while True:
                    line = stream.readline(limit)
                    if not line:
                        return "user-points"
                    line_no += 1
                    if len(line) == limit and line[-1] != _NEWLINE:
                        raise ExportError(
                            f"export file {self.path}: cannot detect its format, line {line_no} is over "
                            f"{self.max_line_bytes} bytes; {hint}"
                        )
                    if line_no == 1 and line[:3] == _BOM:
                        line = line[3:]
                    if line.strip():
                        break
            finally:
                stream.close()
                raw.close()
        except (OSError, EOFError, zlib.error) as exc:
            raise self._error(exc) from None
        try:
            obj = _loads(line)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict:
            if "doc_type" in obj or "op" in obj:
                return "operations"
            if "user_point_id" in obj:
                return "user-points"
        raise ExportError(
            f"export file {self.path}: cannot detect its format, line {line_no} is neither an operation "
            f"(doc_type, op) nor a user point (user_point_id); {hint}"
        )

    def _converter(self) -> Callable[[bytes], list[Message]]:
        return make_converter(self.format, self.system_version, self.start_ts)

    def _seek(self, stream: IO[bytes], start_offset: int) -> None:
        """Position at a checkpoint, refusing one that is not a line boundary (the file changed since)."""
        if self.compressed:
            remaining = start_offset - 1
            while remaining > 0:
                chunk = stream.read(min(remaining, _BUF))
                if not chunk:
                    break
                remaining -= len(chunk)
        else:
            stream.seek(start_offset - 1)
        before = stream.read(1)
        if not before:
            raise ExportError(
                f"export file {self.path}: cannot resume at byte {start_offset}, past the end of the data"
            )
        if before[0] != _NEWLINE and stream.peek(1)[:1]:  # type: ignore[attr-defined]
            raise ExportError(
                f"export file {self.path}: cannot resume at byte {start_offset}, not a line boundary "
                "(was the file modified?)"
            )

    def __iter__(self) -> Iterator[ExportLine]:
        return self.lines()

    def lines(self, start_offset: int = 0, start_line_no: int = 0) -> Iterator[ExportLine]:
        """Yield every non-blank line from `start_offset` (a previous ExportLine.end_offset) on.

        Line numbers continue after `start_line_no`. Iterating raises ExportError for file-level failures (corrupt
        or truncated gzip, a resume offset that is not a line boundary).
        """
        if start_offset < 0 or start_line_no < 0:
            raise ValueError("start_offset and start_line_no must be non-negative")
        return self._lines(start_offset, start_line_no)

    def _lines(self, start_offset: int, start_line_no: int) -> Iterator[ExportLine]:
        convert = self._converter()
        for line_no, offset, line, reason in self.frames(start_offset, start_line_no):
            if reason is not None:
                yield ExportLine(line_no, offset, [], reason)
                continue
            try:
                messages = convert(line)
            except REJECTED as exc:
                yield ExportLine(line_no, offset, [], exc.reason)
                continue
            yield ExportLine(line_no, offset, messages, None)

    def frames(self, start_offset: int = 0, start_line_no: int = 0) -> Iterator[tuple[int, int, bytes, str | None]]:
        """The framing half of `lines`: (line number, end offset, line, reject reason) of each non-blank line,
        without converting it, so conversion can be timed or replaced on its own."""
        try:
            stream, raw = self._open()
        except OSError as exc:
            raise self._error(exc) from None
        self._fileio = raw
        state = [start_offset, start_line_no]
        try:
            try:
                if start_offset:
                    self._seek(stream, start_offset)
                yield from frame_lines(stream.readline, start_offset, start_line_no, self.max_line_bytes, state)
            except (OSError, EOFError, zlib.error) as exc:
                raise self._error(exc, state[1]) from None
        finally:
            try:
                self._last_raw = raw.tell()
            except (OSError, ValueError):
                self._last_raw = self.size
            self._fileio = None
            stream.close()
            raw.close()

    def ranges(self, start_offset: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        """Split an uncompressed file into byte ranges of about `chunk_bytes` that end on line boundaries, so worker
        processes can read and frame their part themselves; reading here is only a short scan per range."""
        if self.compressed:
            raise ValueError("byte ranges need an uncompressed file")
        try:
            with self.source.open(buffer=_DISCARD_CHUNK) as f:  # a short read at each boundary
                size = self.size
                if start_offset:
                    self._seek(f, start_offset)
                pos = start_offset
                while pos < size:
                    end = pos + chunk_bytes
                    if end >= size:
                        end = size
                    else:
                        f.seek(end - 1)
                        while True:
                            block = f.read(_DISCARD_CHUNK)
                            if not block:
                                end = size
                                break
                            nl = block.find(b"\n")
                            if nl >= 0:
                                end += nl
                                break
                            end += len(block)
                    self._last_raw = end
                    yield pos, end
                    pos = end
        except OSError as exc:
            raise self._error(exc) from None


def frame_lines(
    readline: Callable[[int], bytes],
    offset: int,
    line_no: int,
    max_bytes: int,
    state: list[int],
    end: int | None = None,
) -> Iterator[tuple[int, int, bytes, str | None]]:
    """Frame lines from `readline` (positioned at `offset`, a line boundary) up to `end` or the end of the stream.

    Yields (line number, end offset, line, reject reason) for each non-blank line: an over-long line is consumed
    in bounded pieces and yields reason "line too long" with no bytes. `state` ends as [offset, line number] after
    the last line read, blank ones included, which a caller framing a byte range needs to continue numbering.
    """
    limit = max_bytes + 1
    try:
        while end is None or offset < end:
            line = readline(limit)
            if not line:
                break
            line_no += 1
            n = len(line)
            if n == limit and line[-1] != _NEWLINE:
                total = n
                ended = False
                while True:
                    chunk = readline(_DISCARD_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if chunk[-1] == _NEWLINE:
                        ended = True
                        break
                offset += total
                reason = f"line too long: {total - ended} bytes, over the {max_bytes}-byte limit (--max-line-bytes)"
                yield line_no, offset, b"", reason
                continue
            if offset == 0 and line[:3] == _BOM:
                line = line[3:]
            offset += n
            if (not line or line[0] != _LBRACE) and not line.strip():
                continue
            yield line_no, offset, line, None
    finally:
        state[0], state[1] = offset, line_no


def frame_range(
    f: IO[bytes], start: int, end: int, max_bytes: int, state: list[int]
) -> Iterator[tuple[int, int, bytes, str | None]]:
    """`frame_lines` over one byte range of an uncompressed export, numbering its lines from 1."""
    f.seek(start)
    yield from frame_lines(f.readline, start, 0, max_bytes, state, end)
