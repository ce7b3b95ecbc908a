"""Initial synchronizations on several cores.

Turning user points into operations is pure-Python CPU work (measured: ~2.4× the CPU of the parse-and-dump baseline),
so one process cannot keep up with the machine. Worker processes convert chunks of the export and deliver them
through destinations of their own (every destination tolerates several producers: the file destination appends
whole batches under a lock, the clouds are network services). The main process keeps the single source of truth:
counts, rejects, checkpoints and the registry's execution record.

A chunk of an uncompressed file is a byte range ending on a line boundary: the worker reads and frames it itself,
so the main process only scans for a newline every CHUNK_BYTES and stays nearly idle (measured: shipping the lines
through pipes cost the main process about a quarter of a core). A gzip stream cannot be entered mid-way, so for
those the main process decompresses and frames, and ships the lines.

A chunk holds whole user-point lines, and one line carries every operation of its user point, so per-user-point
order needs nothing more. Files of operations lines (where one user point spans many lines) stay on the in-process
path, as does a resume where replications stand at different positions.

Protocol, one duplex pipe per worker, messages in order:
  main → worker: ("chunk", seq, lines) · ("range", seq, path, start, end, max_line_bytes) · ("flush",)
                 · ("drop", rep_id) · ("exit",)
  worker → main: ("done", seq, counts, rejects, oversize, last_line, lines) · ("failed", seq, message)
                 · ("flushed", delivered, rejected, failures) · ("bye",)
For a "chunk", rejects and oversize name lines by their index in the chunk; for a "range", by their line number
counted from the range's start, and last_line and lines (non-blank lines) let the main process number the next one.
A checkpoint sends "flush" to every worker after its last chunk and waits for every "flushed": all chunks dispatched
so far are then acknowledged, exactly as Fanout.flush guarantees in-process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, NamedTuple

from dmrepl import processes
from dmrepl.delivery import Fanout, Target
from dmrepl.destinations.base import DOC_TYPE, Message
from dmrepl.exports import REJECTED, ExportError, ExportReader, frame_range, make_converter
from dmrepl.operations import max_operation_bytes
from dmrepl.registry import Registry

CHUNK_LINES = 1000
CHUNK_BYTES = 2 << 20
MIN_RANGE_BYTES = 64 << 10
MAX_OUTSTANDING = 3
#: Below this an export is synchronized in-process: starting workers would cost more than it saves.
MIN_BYTES = 16 << 20


def env_workers() -> int:
    """DMREPL_SYNC_WORKERS forces a worker count (1: in-process) like --workers; 0 when unset or not a number."""
    env = os.environ.get("DMREPL_SYNC_WORKERS", "")
    return max(1, int(env)) if env.isdigit() else 0


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def start_method() -> str:
    """fork where it is safe: a spawned worker re-imports dmrepl (measured: 0.15 s of CPU each, before its first
    chunk). Safe means Linux and no other thread yet, which the engine arranges (the hasher starts after the
    workers, the progress bar refreshes without a thread); otherwise, as in a test process running peers in
    threads, spawn."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _worker(
    conn: Connection,
    inherited: list[Connection],
    root: str,
    replications: list[dict[str, Any]],
    retry_budget_s: float,
    fmt: str,
    system_version: str,
    start_ts: int,
    reason: str,
) -> None:
    # Ctrl-C (and a service manager's SIGTERM) reach the whole process group: the main process decides, and a forked
    # worker must not run the main process's handlers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    processes.tune_malloc()
    for other in inherited:  # a forked worker holding the main side of a pipe would never see the main process die
        other.close()
    convert = make_converter(fmt, system_version, start_ts)
    oversize: list[tuple[int, str, str, str]] = []
    index = [0]

    def on_reject(target: Target, message: Message, why: str) -> None:
        oversize.append((index[0], target.rep_id, message[DOC_TYPE], why))

    fanout = Fanout(
        Registry(Path(root)), replications, retry_budget_s=retry_budget_s, on_reject=on_reject, reason=reason
    )
    fanout.open_all()
    doc_type_of = itemgetter(DOC_TYPE)
    offer = fanout.offer
    types: list[str] = []  # counted once per chunk: Counter.update per line costs an isinstance(Mapping) each time
    add_types = types.extend

    def count() -> dict[str, int]:
        counts = dict(Counter(types))
        types.clear()
        return counts

    def take(line: bytes, where: int, live: list[Target]) -> str | None:
        """Convert one line and offer it to the live destinations; its reject reason when it is rejected."""
        try:
            messages = convert(line)
        except REJECTED as exc:
            return exc.reason
        add_types(map(doc_type_of, messages))
        index[0] = where
        bound = max_operation_bytes(len(line))
        for t in live:
            offer(t, messages, bound)
        return None

    export: IO[bytes] | None = None  # open across ranges: an export moved away mid-sync can still be read
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the main process is gone (killed): stop; its last checkpoint stands
                return
            kind = msg[0]
            if kind == "chunk":
                rejects: list[tuple[int, str]] = []
                oversize.clear()
                live = fanout.live
                for i, line in enumerate(msg[2]):
                    why = take(line, i, live)
                    if why is not None:
                        rejects.append((i, why))
                conn.send(("done", msg[1], count(), rejects, list(oversize), 0, 0))
            elif kind == "range":
                rejects = []
                oversize.clear()
                live = fanout.live
                state = [0, 0]
                lines = 0
                try:
                    if export is None or export.name != msg[2]:
                        if export is not None:
                            export.close()
                        export = open(msg[2], "rb", buffering=1 << 20)  # noqa: SIM115 - kept across ranges
                    for line_no, _, line, reason in frame_range(export, msg[3], msg[4], msg[5], state):
                        lines += 1
                        why = reason if reason is not None else take(line, line_no, live)
                        if why is not None:
                            rejects.append((line_no, why))
                except OSError as exc:
                    conn.send(("failed", msg[1], f"export file {msg[2]}: cannot read it ({exc.strerror or exc})"))
                    continue
                conn.send(("done", msg[1], count(), rejects, list(oversize), state[1], lines))
            elif kind == "flush":
                fanout.flush()
                conn.send(
                    (
                        "flushed",
                        {t.rep_id: t.delivered for t in fanout.targets.values()},
                        {t.rep_id: t.rejected for t in fanout.targets.values()},
                        {t.rep_id: t.error for t in fanout.targets.values() if not t.alive},
                    )
                )
            elif kind == "drop":
                target = fanout.targets.get(msg[1])
                if target is not None and target.alive:
                    target.alive = False
                    fanout.close(target)
            else:
                fanout.close_all()
                conn.send(("bye",))
                return
    finally:
        if export is not None:
            export.close()
        fanout.close_all()


class Done(NamedTuple):
    """A chunk's outcome in the main process's terms: absolute line numbers, in line order."""

    file_idx: int
    end_offset: int
    line_no: int  # of the chunk's last line, blank ones included
    lines: int  # non-blank lines, rejected ones included
    counts: dict[str, int]
    rejects: list[tuple[int, str]]
    oversize: list[tuple[int, str, str, str]]  # line, replication, doc_type, reason


class Shards:
    """The main side: dispatch chunks, collect results, and aggregate the workers' view of each replication."""

    def __init__(
        self,
        registry: Registry,
        view: Fanout,
        replications: Sequence[dict[str, Any]],
        *,
        workers: int,
        retry_budget_s: float,
        reader: ExportReader,
        start_ts: int,
        reason: str,
        on_done: Callable[[Done], None],
    ) -> None:
        method = start_method()
        ctx = multiprocessing.get_context(method)
        self.view = view
        self.on_done = on_done
        self.base_delivered = {t.rep_id: t.delivered for t in view.targets.values()}
        self.base_rejected = {t.rep_id: t.rejected for t in view.targets.values()}
        self.delivered: list[dict[str, int]] = [{} for _ in range(workers)]
        self.rejected: list[dict[str, int]] = [{} for _ in range(workers)]
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.order: deque[tuple[int, int, Any]] = deque()  # (seq, file_idx, context) in dispatch order
        self.pending = [0] * workers  # chunks sent to each worker and not answered yet
        self.results: dict[int, Any] = {}  # answers that came before an older chunk's
        self.flushed: dict[int, Any] = {}
        self.sent = 0
        self.line_no = 0
        self.workers = workers
        for _ in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(
                    there,
                    [*self.conns, here] if method == "fork" else [],
                    str(registry.root),
                    list(replications),
                    retry_budget_s,
                    reader.format,
                    reader.system_version,
                    start_ts,
                    reason,
                ),
                daemon=True,
            )
            proc.start()
            there.close()
            self.conns.append(here)
            self.procs.append(proc)

    def _send(self, message: tuple[Any, ...], file_idx: int, context: Any) -> None:
        """To the least busy worker, so that one on a slower or busier core simply gets fewer chunks (round-robin
        held both to the slower one's pace). Results are still handed on in dispatch order, so counts and rejects
        come out in line order and line numbers carry over from one range to the next."""
        while min(self.pending) >= MAX_OUTSTANDING:
            self._receive()
        w = self.pending.index(min(self.pending))
        self.conns[w].send(message)
        self.pending[w] += 1
        self.order.append((message[1], file_idx, context))

    def dispatch(self, file_idx: int, lines: list[bytes], meta: list[tuple[int, int, str | None]]) -> None:
        """Framed lines (gzip): `meta` is every line's (line_no, end_offset, framing reject) in file order; lines
        rejected while framing are not sent."""
        self._send(("chunk", self._seq(), lines), file_idx, meta)

    def range_bytes(self, reader: ExportReader) -> int:
        """CHUNK_BYTES, or less for a smaller file, so that every worker gets several ranges: the work stays
        balanced to the end, and checkpoints (which wait for every range in flight) still come regularly."""
        return max(MIN_RANGE_BYTES, min(CHUNK_BYTES, reader.size // (8 * self.workers)))

    def dispatch_range(self, file_idx: int, reader: ExportReader, start: int, end: int, line_no: int | None) -> None:
        """A byte range the worker frames itself; `line_no` is the line number before `start` when known (the
        first range of a file), else it follows from the previous range's result."""
        message = ("range", self._seq(), os.path.abspath(reader.path), start, end, reader.max_line_bytes)
        self._send(message, file_idx, (end, line_no))

    def _seq(self) -> int:
        self.sent += 1
        return self.sent

    def _recv(self, w: int) -> Any:
        try:
            return self.conns[w].recv()
        except EOFError:
            raise RuntimeError(f"sync worker {w} died (exit code {self.procs[w].exitcode})") from None

    def _receive(self) -> None:
        """Take what any worker has sent, then hand on every result whose turn has come."""
        for conn in wait(self.conns):
            w = self.conns.index(conn)  # type: ignore[arg-type]
            msg = self._recv(w)
            if msg[0] == "flushed":
                self.flushed[w] = msg
            else:
                self.pending[w] -= 1
                self.results[msg[1]] = msg
        while self.order and self.order[0][0] in self.results:
            seq, file_idx, context = self.order.popleft()
            self._done(file_idx, context, self.results.pop(seq))

    def _done(self, file_idx: int, context: Any, msg: Any) -> None:
        if msg[0] == "failed":
            raise ExportError(msg[2])
        assert msg[0] == "done", msg[0]
        _, _, counts, rejects, oversize, last_line, lines = msg
        if type(context) is tuple:
            end, base = context
            if base is None:
                base = self.line_no
            self.line_no = base + last_line
            done = Done(
                file_idx,
                end,
                self.line_no,
                lines,
                counts,
                [(base + n, why) for n, why in rejects],
                [(base + n, rep_id, doc_type, why) for n, rep_id, doc_type, why in oversize],
            )
        else:
            meta = context
            converted = [m[0] for m in meta if m[2] is None]
            framing = [(line_no, why) for line_no, _, why in meta if why is not None]
            done = Done(
                file_idx,
                meta[-1][1],
                meta[-1][0],
                len(meta),
                counts,
                sorted(framing + [(converted[i], why) for i, why in rejects]),
                [(converted[i], rep_id, doc_type, why) for i, rep_id, doc_type, why in oversize],
            )
        self.on_done(done)

    def _fail(self, rep_id: str, error: dict[str, Any] | None) -> None:
        target = self.view.targets[rep_id]
        if target.alive:
            target.alive = False
            target.error = error
            for conn in self.conns:
                conn.send(("drop", rep_id))

    def flush(self) -> None:
        """Every chunk dispatched so far converted, delivered and acknowledged by every live destination."""
        for conn in self.conns:
            conn.send(("flush",))
        self.flushed = {}
        while self.order or len(self.flushed) < len(self.conns):
            self._receive()
        results = [self.flushed[w] for w in range(len(self.conns))]
        failed = {rep_id: error for _, _, _, failures in results for rep_id, error in failures.items()}
        for w, (_, delivered, rejected, _) in enumerate(results):
            # A replication that failed now keeps the counts of its last checkpoint, as in-process: what other
            # workers delivered since is re-sent by a resume from that checkpoint, so it is not counted twice.
            for rep_id in delivered:
                if rep_id not in failed and self.view.targets[rep_id].alive:
                    self.delivered[w][rep_id] = delivered[rep_id]
                    self.rejected[w][rep_id] = rejected[rep_id]
        for rep_id, error in failed.items():
            self._fail(rep_id, error)
        for t in self.view.targets.values():
            t.delivered = self.base_delivered[t.rep_id] + sum(d.get(t.rep_id, 0) for d in self.delivered)
            t.rejected = self.base_rejected[t.rep_id] + sum(r.get(t.rep_id, 0) for r in self.rejected)

    def close(self) -> None:
        for w, conn in enumerate(self.conns):
            try:
                conn.send(("exit",))
                while self._recv(w)[0] != "bye":
                    pass
            except (OSError, RuntimeError):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()


def chunks(
    frames: Iterator[tuple[int, int, bytes, str | None]],
) -> Iterator[tuple[list[bytes], list[tuple[int, int, str | None]]]]:
    """Group framed lines into chunks: the lines to convert, and every line's (line_no, end_offset, framing reject)
    in file order (lines rejected while framing, e.g. too long, are not sent to workers)."""
    lines: list[bytes] = []
    meta: list[tuple[int, int, str | None]] = []
    size = 0
    for line_no, offset, line, reason in frames:
        meta.append((line_no, offset, reason))
        if reason is None:
            lines.append(line)
            size += len(line)
        if len(meta) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield lines, meta
            lines, meta, size = [], [], 0
    if meta:
        yield lines, meta
