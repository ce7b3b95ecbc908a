"""Converting and delivering one piece of an export, with no registry, keyring or global state behind it.

A `Shard` is a planned, serializable piece of work: a line-aligned byte range of an uncompressed export, or a whole
gzip file (a gzip stream cannot be entered mid-way). A `LineChunk` is the same work for lines another process
already framed (the coordinator decompresses a gzip export and ships its lines to local workers). Either is run by a
`ShardRunner`, which holds the open destinations of every replication it delivers to and can run many pieces in a
row; `run_shard` is the one-shot form, which also flushes and reports what every replication acknowledged.

Line numbers. A byte range does not know how many lines come before it, so a result numbers its lines from the
shard's `first_line` when the shard knows it (the first shard of a file, or one planned from a checkpoint), and
otherwise from 0, for the coordinator to rebase in shard order (`ShardResult.rebased`). One export line carries every
operation of its user point, so per-user-point order needs nothing more across shards.
"""

from __future__ import annotations

import gzip
import io
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import IO, NamedTuple

from dmrepl.delivery import Failure, Fanout, ReplicationBinding, Target
from dmrepl.exports import REJECTED, frame_lines, frame_range, make_converter
from dmrepl.models import DEFAULT_MAX_LINE_BYTES, DEFAULT_RETRY_BUDGET_S
from dmrepl.operations import DOC_TYPE, Message, max_operation_bytes
from dmrepl.storage import is_url, open_source

Frame = tuple[int, int, bytes, str | None]  # line number, end offset, line, framing reject reason
_doc_type_of = itemgetter(DOC_TYPE)


@dataclass(frozen=True)
class ShardOptions:
    """What every shard of one execution shares."""

    system_version: str
    start_ts: int
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S


@dataclass(frozen=True)
class Shard:
    """`end` None: to the end of the stream (a whole gzip file). `first_line`: the number of the line before
    `start` when known. `size` and `sha256` are what the export was when planned (sha256 when known). `url`: a local
    path or an object's URL (`dmrepl.storage`)."""

    seq: int
    file_index: int
    url: str
    format: str
    start: int = 0
    end: int | None = None
    first_line: int | None = 0
    compressed: bool = False
    size: int = 0
    sha256: str | None = None
    #: An object's generation or ETag as planned (`dmrepl.storage`); None for a local file.
    version: str | None = None


@dataclass(frozen=True)
class LineChunk:
    """Lines framed elsewhere, with their absolute line numbers (so `first_line` is 0)."""

    seq: int
    file_index: int
    format: str
    frames: list[Frame]
    first_line: int | None = 0


Work = Shard | LineChunk


@dataclass(frozen=True)
class Resume:
    """Where a resumed execution stands within one file: lines ending at or before `counted_until` were counted
    already, and lines ending at or before `delivered_until[rep]` were acknowledged by that replication."""

    counted_until: int = -1
    delivered_until: Mapping[str, int] = field(default_factory=dict)


class LineReject(NamedTuple):
    line: int
    reason: str


class Oversize(NamedTuple):
    """An operation over one destination's size limit: rejected for that replication only."""

    line: int
    rep_id: str
    doc_type: str
    reason: str


@dataclass
class Acks:
    """What every replication acknowledged so far (cumulative for a runner's life), and those that failed."""

    delivered: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)


@dataclass
class ShardResult:
    seq: int
    file_index: int
    end_offset: int  # after the last line read (the decompressed stream's offset for gzip)
    last_line: int  # number of the last line read, blank ones included (see the module docstring)
    lines: int  # non-blank lines counted, rejected ones included
    counts: dict[str, int]
    rejects: list[LineReject]
    oversize: list[Oversize]
    acks: Acks | None = None
    #: (line, end offset) of the reject that exceeded the run's reject budget, where the piece stopped.
    stopped: tuple[int, int] | None = None

    def rebased(self, base: int) -> ShardResult:
        """Line numbers made absolute, `base` being the number of the line before the shard."""
        if base == 0:
            return self
        return ShardResult(
            self.seq,
            self.file_index,
            self.end_offset,
            base + self.last_line,
            self.lines,
            self.counts,
            [LineReject(base + r.line, r.reason) for r in self.rejects],
            [o._replace(line=base + o.line) for o in self.oversize],
            self.acks,
            None if self.stopped is None else (base + self.stopped[0], self.stopped[1]),
        )


class ShardRunner:
    """Converts and delivers pieces of exports for a set of replications, keeping their destinations open across
    pieces (opening an Event Hubs connection costs about a second). Not thread-safe; one per process."""

    def __init__(
        self,
        bindings: Sequence[ReplicationBinding],
        options: ShardOptions,
        *,
        on_fail: Callable[[Target], None] | None = None,
    ) -> None:
        self.options = options
        self._oversize: list[Oversize] = []
        self._line = 0
        self.fanout = Fanout(
            bindings, retry_budget_s=options.retry_budget_s, on_reject=self._on_reject, on_fail=on_fail
        )
        self._converters: dict[str, Callable[[bytes], list[Message]]] = {}
        self._export: IO[bytes] | None = None  # kept open across ranges: an export moved away can still be read
        self._export_url: str | None = None

    def __enter__(self) -> ShardRunner:
        self.fanout.open_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.fanout.open_all()

    def close(self) -> None:
        if self._export is not None:
            self._export.close()
            self._export = self._export_url = None
        self.fanout.close_all()

    def _on_reject(self, target: Target, message: Message, reason: str) -> None:
        self._oversize.append(Oversize(self._line, target.rep_id, message[DOC_TYPE], reason))

    def _converter(self, fmt: str) -> Callable[[bytes], list[Message]]:
        convert = self._converters.get(fmt)
        if convert is None:
            o = self.options
            convert = self._converters[fmt] = make_converter(fmt, o.system_version, o.start_ts)
        return convert

    def run(self, work: Work, resume: Resume | None = None, reject_budget: int | None = None) -> ShardResult:
        """Convert every line of `work` and offer its operations to the live destinations (not flushed: see
        `flush`). With `reject_budget`, stop right after the reject that exceeds it: no line after that one is
        offered, and the result ends there (`stopped`). Raises OSError (or ExportError) when the export cannot be
        read."""
        if isinstance(work, LineChunk):
            result = self._convert(work.seq, work.file_index, work.format, work.frames, resume, reject_budget)
            if result.stopped is None and work.frames:
                result.last_line, result.end_offset = work.frames[-1][0], work.frames[-1][1]
            return result
        state = [work.start, 0]
        frames = self._frames(work, state)
        try:
            result = self._convert(work.seq, work.file_index, work.format, frames, resume, reject_budget)
        finally:
            frames.close()  # type: ignore[attr-defined]
        if result.stopped is None:
            result.end_offset, result.last_line = state[0], state[1]
        return result

    def _frames(self, shard: Shard, state: list[int]) -> Iterator[Frame]:
        max_bytes = self.options.max_line_bytes
        if shard.compressed:
            return self._gzip_frames(shard, state)
        if is_url(shard.url):  # a stream per range, which asks the service for that range and no more
            source = open_source(shard.url, size=shard.size or None, version=shard.version)
            end = shard.end if shard.end is not None else source.size
            return _closing(source.open(end=end), lambda f: frame_range(f, shard.start, end, max_bytes, state))
        if self._export is None or self._export_url != shard.url:
            if self._export is not None:
                self._export.close()
            self._export = open(shard.url, "rb", buffering=1 << 20)  # noqa: SIM115 - kept across ranges
            self._export_url = shard.url
        end = shard.end if shard.end is not None else os.fstat(self._export.fileno()).st_size
        return frame_range(self._export, shard.start, end, max_bytes, state)

    def _gzip_frames(self, shard: Shard, state: list[int]) -> Iterator[Frame]:
        with open_source(shard.url, size=shard.size or None, version=shard.version).open() as raw:
            stream = io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20)  # type: ignore[arg-type]
            if shard.start:
                _skip(stream, shard.start)
            yield from frame_lines(stream.readline, shard.start, 0, self.options.max_line_bytes, state)

    def _convert(
        self,
        seq: int,
        file_index: int,
        fmt: str,
        frames: Iterable[Frame],
        resume: Resume | None,
        budget: int | None = None,
    ) -> ShardResult:
        convert = self._converter(fmt)
        fanout = self.fanout
        offer = fanout.offer
        live = fanout.live
        types: list[str] = []  # counted once per piece: Counter.update per line costs an isinstance check each time
        add_types = types.extend
        rejects: list[LineReject] = []
        oversize = self._oversize
        oversize.clear()
        lines = 0
        stopped: tuple[int, int] | None = None
        if resume is None:
            for line_no, end, line, reason in frames:
                lines += 1
                if reason is None:
                    try:
                        messages = convert(line)
                    except REJECTED as exc:
                        reason = exc.reason
                    else:
                        add_types(map(_doc_type_of, messages))
                        self._line = line_no
                        bound = max_operation_bytes(len(line))
                        for t in live:
                            offer(t, messages, bound)
                        continue
                rejects.append(LineReject(line_no, reason))
                if budget is not None and len(rejects) > budget:
                    stopped = (line_no, end)
                    break
        else:
            skip = [(t, resume.delivered_until.get(t.rep_id, -1)) for t in live]
            counted = resume.counted_until
            for line_no, end, line, reason in frames:
                if end > counted:
                    lines += 1
                if reason is None:
                    try:
                        messages = convert(line)
                    except REJECTED as exc:
                        reason = exc.reason
                    else:
                        if end > counted:
                            add_types(map(_doc_type_of, messages))
                        self._line = line_no
                        bound = max_operation_bytes(len(line))
                        for t, until in skip:
                            if end > until:
                                offer(t, messages, bound)
                        continue
                if end > counted:
                    rejects.append(LineReject(line_no, reason))
                    if budget is not None and len(rejects) > budget:
                        stopped = (line_no, end)
                        break
        result = ShardResult(seq, file_index, 0, 0, lines, dict(Counter(types)), rejects, list(oversize))
        if stopped is not None:
            result.last_line, result.end_offset = stopped
            result.stopped = stopped
        return result

    def flush(self) -> Acks:
        """Everything offered so far sent and acknowledged, or its replication failed."""
        self.fanout.flush()
        return self.acks()

    def acks(self) -> Acks:
        targets = self.fanout.targets.values()
        return Acks(
            {t.rep_id: t.delivered for t in targets},
            {t.rep_id: t.rejected for t in targets},
            {t.rep_id: t.error for t in targets if not t.alive and t.error is not None},
        )

    def drop(self, rep_id: str) -> None:
        self.fanout.drop(rep_id)


def _skip(stream: IO[bytes], offset: int) -> None:
    remaining = offset
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            break
        remaining -= len(chunk)


def _closing(f: IO[bytes], frames: Callable[[IO[bytes]], Iterator[Frame]]) -> Iterator[Frame]:
    with f:
        yield from frames(f)


def run_shard(
    shard: Shard,
    bindings: Sequence[ReplicationBinding],
    options: ShardOptions,
    resume_from: Resume | None = None,
) -> ShardResult:
    """Convert and deliver one shard, wait for every acknowledgement, and report: the unit of work a process with
    no registry (a Spark executor, a worker on another machine) runs. `result.acks` says what each replication
    acknowledged; a replication that failed is in `acks.failures` and acknowledged nothing past `resume_from`."""
    with ShardRunner(bindings, options) as runner:
        result = runner.run(shard, resume_from)
        result.acks = runner.flush()
    return result


__all__ = [
    "Acks",
    "LineChunk",
    "LineReject",
    "Oversize",
    "Resume",
    "Shard",
    "ShardOptions",
    "ShardResult",
    "ShardRunner",
    "Work",
    "run_shard",
]
