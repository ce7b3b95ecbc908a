"""Initial synchronizations on several cores.

Turning user points into operations is pure-Python CPU work (measured: ~5× the cost of the parse-and-dump baseline),
so one process cannot keep up with the machine. Here the main process only frames lines and hands chunks of them
to worker processes; each worker converts its chunks and delivers them through destinations of its own (every
destination tolerates several producers: the file destination appends whole batches under a lock, the clouds are
network services). The main process keeps the single source of truth: counts, rejects, checkpoints and the
registry's execution record.

A chunk holds whole user-point lines, and one line carries every operation of its user point, so per-user-point
order needs nothing more. Files of operations lines (where one user point spans many lines) stay on the in-process
path, as does a resume where replications stand at different positions.

Protocol, one duplex pipe per worker, messages in order:
  main → worker: ("chunk", seq, lines) · ("flush",) · ("drop", rep_id) · ("exit",)
  worker → main: ("done", seq, counts, rejects, oversize) · ("flushed", delivered, rejected, failures) · ("bye",)
A checkpoint sends "flush" to every worker after its last chunk and waits for every "flushed": all chunks dispatched
so far are then acknowledged, exactly as Fanout.flush guarantees in-process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from operator import itemgetter
from pathlib import Path
from typing import Any

from dmrepl.delivery import Fanout, Target
from dmrepl.destinations.base import Message
from dmrepl.exports import REJECTED, ExportReader, make_converter
from dmrepl.registry import Registry

CHUNK_LINES = 1000
CHUNK_BYTES = 2 << 20
MAX_OUTSTANDING = 3
#: Below this an export is synchronized in-process: starting workers would cost more than it saves.
MIN_BYTES = 16 << 20


def env_workers() -> int:
    """DMREPL_SYNC_WORKERS forces a worker count (1: in-process) like --workers; 0 when unset or not a number."""
    env = os.environ.get("DMREPL_SYNC_WORKERS", "")
    return max(1, int(env)) if env.isdigit() else 0


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _worker(
    conn: Connection,
    root: str,
    replications: list[dict[str, Any]],
    retry_budget_s: float,
    fmt: str,
    system_version: str,
    start_ts: int,
    reason: str,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process decides
    convert = make_converter(fmt, system_version, start_ts)
    oversize: list[tuple[int, str, str, str]] = []
    index = [0]

    def on_reject(target: Target, message: Message, why: str) -> None:
        oversize.append((index[0], target.rep_id, message.doc_type, why))

    fanout = Fanout(
        Registry(Path(root)), replications, retry_budget_s=retry_budget_s, on_reject=on_reject, reason=reason
    )
    fanout.open_all()
    doc_type_of = itemgetter(1)
    offer = fanout.offer
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the main process is gone (killed): stop; its last checkpoint stands
                return
            kind = msg[0]
            if kind == "chunk":
                counts: Counter[str] = Counter()
                rejects: list[tuple[int, str]] = []
                oversize.clear()
                live = fanout.live
                for i, line in enumerate(msg[2]):
                    try:
                        messages = convert(line)
                    except REJECTED as exc:
                        rejects.append((i, exc.reason))
                        continue
                    counts.update(map(doc_type_of, messages))
                    index[0] = i
                    for t in live:
                        offer(t, messages)
                conn.send(("done", msg[1], dict(counts), rejects, list(oversize)))
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
        fanout.close_all()


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
        on_done: Callable[[int, Any, list[tuple[int, int, str | None]]], None],
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.view = view
        self.on_done = on_done
        self.base_delivered = {t.rep_id: t.delivered for t in view.targets.values()}
        self.base_rejected = {t.rep_id: t.rejected for t in view.targets.values()}
        self.delivered: list[dict[str, int]] = [{} for _ in range(workers)]
        self.rejected: list[dict[str, int]] = [{} for _ in range(workers)]
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.order: deque[tuple[int, int, list[tuple[int, int, str | None]]]] = deque()
        self.next = 0
        for _ in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(
                    there,
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

    def dispatch(self, file_idx: int, lines: list[bytes], meta: list[tuple[int, int, str | None]]) -> None:
        """Send a chunk round-robin; results are taken strictly in dispatch order, so counts and rejects come out
        in line order whatever worker finishes first."""
        while len(self.order) >= MAX_OUTSTANDING * len(self.conns):
            self._receive_oldest()
        w = self.next
        self.next = (w + 1) % len(self.conns)
        self.conns[w].send(("chunk", len(self.order), lines))
        self.order.append((w, file_idx, meta))

    def _recv(self, w: int) -> Any:
        try:
            return self.conns[w].recv()
        except EOFError:
            raise RuntimeError(f"sync worker {w} died (exit code {self.procs[w].exitcode})") from None

    def _receive_oldest(self) -> None:
        w, file_idx, meta = self.order.popleft()
        msg = self._recv(w)
        assert msg[0] == "done", msg[0]
        self.on_done(file_idx, msg, meta)

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
        while self.order:
            self._receive_oldest()
        for w in range(len(self.conns)):
            _, delivered, rejected, failures = self._recv(w)
            self.delivered[w], self.rejected[w] = delivered, rejected
            for rep_id, error in failures.items():
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
