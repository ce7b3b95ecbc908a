"""Where a sync's work runs: in this process, or in worker processes on the other cores. Both take the same pieces of
work (`dmrepl.sync.shard`), hand their results back in the order the pieces were submitted, and report what the
destinations acknowledged at each `flush`; the coordinator chooses one executor and never knows which.

Turning user points into operations is pure-Python CPU work, so one process cannot keep up with the machine. Worker
processes run a `ShardRunner` of their own (every destination tolerates several producers: the file destination
appends whole batches under a lock, the clouds are network services). They read and frame byte ranges of plain
exports themselves, so the coordinator only scans for a newline every CHUNK_BYTES; a gzip stream cannot be entered
mid-way, so its lines are framed by the coordinator and shipped in chunks. Workers never touch the registry.

The protocol is typed messages on one duplex pipe per worker, in order, as `concurrent.futures.process` does:
`_Call` → `_Done` | `_Failed`; `_Flush` → `_Flushed`; `_Drop`; `_Exit` → `_Bye`. A flush is sent to every worker
after its last call, so once every `_Flushed` is in, everything submitted so far is acknowledged.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from dmrepl import processes
from dmrepl.delivery import ReplicationBinding, Target
from dmrepl.errors import SystemFailure
from dmrepl.exports import ExportError
from dmrepl.sync.shard import Acks, Frame, Resume, ShardOptions, ShardResult, ShardRunner, Work

CHUNK_LINES = 1000
CHUNK_BYTES = 2 << 20
MIN_RANGE_BYTES = 64 << 10
MAX_OUTSTANDING = 3
#: Below this an export is synchronized in-process: starting workers would cost more than it saves.
MIN_BYTES = 16 << 20

OnResult = Callable[[Work, ShardResult], None]


class Executor(Protocol):
    """Runs pieces of work and hands each result to `on_result`, in submission order."""

    def submit(self, work: Work, resume: Resume | None = None, reject_budget: int | None = None) -> None:
        """`reject_budget`: the rejects still allowed before this piece (exact only inline, see the coordinator)."""
        ...

    def flush(self) -> Acks:
        """Every piece submitted so far run, its result handed on, and its operations acknowledged (or their
        replication failed). Counts are this executor's, from zero."""
        ...

    def drop(self, rep_id: str) -> None: ...

    def range_bytes(self, size: int) -> int: ...

    def close(self) -> None: ...

    def kill(self) -> None: ...


class WorkerDied(SystemFailure):
    """A worker process ended without being asked to: killed (the OOM killer sends SIGKILL) or crashed. Everything
    it had not acknowledged is re-sent by a resume from the last checkpoint."""

    code = "WORKER_DIED"

    def __init__(self, number: int, exitcode: int | None) -> None:
        if exitcode is not None and exitcode < 0:
            try:
                name = signal.Signals(-exitcode).name
            except ValueError:
                name = f"signal {-exitcode}"
            how = f"was killed by signal {-exitcode} ({name})"
            if -exitcode == signal.SIGKILL:
                how += " — out of memory? (see dmesg)"
        else:
            how = f"exited unexpectedly (exit code {exitcode})"
        super().__init__(f"sync worker {number} {how}")


def read_error(path: str, exc: OSError) -> ExportError:
    return ExportError(f"export file {path}: cannot read it ({exc.strerror or exc})")


class InlineExecutor:
    def __init__(
        self,
        bindings: Sequence[ReplicationBinding],
        options: ShardOptions,
        on_result: OnResult,
        on_fail: Callable[[Target], None],
    ) -> None:
        self.runner = ShardRunner(bindings, options, on_fail=on_fail)
        self.runner.open()
        self.on_result = on_result

    def submit(self, work: Work, resume: Resume | None = None, reject_budget: int | None = None) -> None:
        try:
            result = self.runner.run(work, resume, reject_budget)
        except OSError as exc:
            raise read_error(getattr(work, "url", "?"), exc) from None
        self.on_result(work, result)

    def flush(self) -> Acks:
        return self.runner.flush()

    def drop(self, rep_id: str) -> None:
        self.runner.drop(rep_id)

    def range_bytes(self, size: int) -> int:
        """Small enough that a stop or a checkpoint waits for little, large enough to amortize the framing."""
        return max(MIN_RANGE_BYTES, min(1 << 20, size))

    def close(self) -> None:
        self.runner.close()

    def kill(self) -> None:
        self.runner.close()


# --- worker processes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    work: Work
    resume: Resume | None


@dataclass(frozen=True)
class _Flush:
    pass


@dataclass(frozen=True)
class _Drop:
    rep_id: str


@dataclass(frozen=True)
class _Exit:
    pass


@dataclass(frozen=True)
class _Done:
    seq: int
    result: ShardResult


@dataclass(frozen=True)
class _Failed:
    seq: int
    message: str


@dataclass(frozen=True)
class _Flushed:
    acks: Acks


@dataclass(frozen=True)
class _Bye:
    pass


def env_workers() -> int:
    """DMREPL_SYNC_WORKERS forces a worker count (1: in-process) like --workers; 0 when unset or not a number."""
    env = os.environ.get("DMREPL_SYNC_WORKERS", "")
    return max(1, int(env)) if env.isdigit() else 0


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def start_method() -> str:
    """fork where it is safe: a spawned worker re-imports dmrepl before its first piece of work. Safe means Linux
    and no other thread yet, which the coordinator arranges (the hasher starts after the workers, the progress bar
    refreshes without a thread); otherwise, as in a test process running peers in threads, spawn."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _worker(
    conn: Connection, inherited: list[Connection], bindings: list[ReplicationBinding], options: ShardOptions
) -> None:
    # Ctrl-C (and a service manager's SIGTERM) reach the whole process group: the coordinator decides, and a forked
    # worker must not run its handlers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    processes.tune_malloc()
    for other in inherited:  # a forked worker holding the main side of a pipe would never see the main process die
        other.close()
    runner = ShardRunner(bindings, options)
    runner.open()
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the coordinator is gone (killed): stop; its last checkpoint stands
                return
            if isinstance(msg, _Call):
                try:
                    result = runner.run(msg.work, msg.resume)
                except OSError as exc:
                    conn.send(_Failed(msg.work.seq, str(read_error(getattr(msg.work, "url", "?"), exc))))
                    continue
                except ExportError as exc:
                    conn.send(_Failed(msg.work.seq, exc.message))
                    continue
                conn.send(_Done(msg.work.seq, result))
            elif isinstance(msg, _Flush):
                conn.send(_Flushed(runner.flush()))
            elif isinstance(msg, _Drop):
                runner.drop(msg.rep_id)
            else:
                runner.close()
                conn.send(_Bye())
                return
    finally:
        runner.close()


class WorkerPool:
    """The coordinator's side of the workers: dispatch, collect, and add up what each worker acknowledged."""

    def __init__(
        self, bindings: Sequence[ReplicationBinding], options: ShardOptions, on_result: OnResult, *, workers: int
    ) -> None:
        method = start_method()
        ctx = multiprocessing.get_context(method)
        self.on_result = on_result
        self.workers = workers
        self.acks: list[Acks] = [Acks() for _ in range(workers)]
        self.dropped: set[str] = set()
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.order: deque[Work] = deque()  # in submission order
        self.pending = [0] * workers  # calls sent to each worker and not answered yet
        self.results: dict[int, _Done | _Failed] = {}  # answers that came before an older call's
        self.flushed: dict[int, _Flushed] = {}
        for _ in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(there, [*self.conns, here] if method == "fork" else [], list(bindings), options),
                daemon=True,
            )
            proc.start()
            there.close()
            self.conns.append(here)
            self.procs.append(proc)

    def range_bytes(self, size: int) -> int:
        """CHUNK_BYTES, or less for a smaller file, so that every worker gets several ranges: the work stays
        balanced to the end, and checkpoints (which wait for every range in flight) still come regularly."""
        return max(MIN_RANGE_BYTES, min(CHUNK_BYTES, size // (8 * self.workers)))

    def submit(self, work: Work, resume: Resume | None = None, reject_budget: int | None = None) -> None:
        """To the least busy worker, so that one on a slower or busier core simply gets fewer pieces (round-robin
        held both to the slower one's pace). Results are still handed on in submission order."""
        while min(self.pending) >= MAX_OUTSTANDING:
            self._receive()
        w = self.pending.index(min(self.pending))
        self._send(w, _Call(work, resume))
        self.pending[w] += 1
        self.order.append(work)

    def _recv(self, w: int) -> Any:
        try:
            return self.conns[w].recv()
        except (EOFError, OSError):
            raise self._died(w) from None

    def _send(self, w: int, message: object) -> None:
        try:
            self.conns[w].send(message)
        except OSError:
            raise self._died(w) from None

    def _died(self, w: int) -> WorkerDied:
        proc = self.procs[w]
        proc.join(timeout=2)  # reap it, to learn how it ended
        return WorkerDied(w + 1, proc.exitcode)

    def _receive(self) -> None:
        """Take what any worker has sent, then hand on every result whose turn has come."""
        for conn in wait(self.conns):
            w = self.conns.index(conn)  # type: ignore[arg-type]
            msg = self._recv(w)
            if isinstance(msg, _Flushed):
                self.flushed[w] = msg
            else:
                self.pending[w] -= 1
                self.results[msg.seq] = msg
        while self.order and self.order[0].seq in self.results:
            work = self.order.popleft()
            answer = self.results.pop(work.seq)
            if isinstance(answer, _Failed):
                raise ExportError(answer.message)
            self.on_result(work, answer.result)

    def flush(self) -> Acks:
        for w in range(len(self.conns)):
            self._send(w, _Flush())
        self.flushed = {}
        while self.order or len(self.flushed) < len(self.conns):
            self._receive()
        now = [self.flushed[w].acks for w in range(len(self.conns))]
        failed = {rep_id: f for a in now for rep_id, f in a.failures.items()}
        for w, a in enumerate(now):
            # What each worker's destinations acknowledged, a replication that failed now included (up to its
            # failure); one dropped earlier keeps the counts it had then.
            for rep_id in a.delivered:
                if rep_id not in self.dropped:
                    self.acks[w].delivered[rep_id] = a.delivered[rep_id]
                    self.acks[w].rejected[rep_id] = a.rejected[rep_id]
        for rep_id in failed:
            self.drop(rep_id)
        total = Acks(failures=failed)
        for a in self.acks:
            for rep_id, n in a.delivered.items():
                total.delivered[rep_id] = total.delivered.get(rep_id, 0) + n
            for rep_id, n in a.rejected.items():
                total.rejected[rep_id] = total.rejected.get(rep_id, 0) + n
        return total

    def drop(self, rep_id: str) -> None:
        if rep_id not in self.dropped:
            self.dropped.add(rep_id)
            for w in range(len(self.conns)):
                self._send(w, _Drop(rep_id))

    def close(self) -> None:
        for w, conn in enumerate(self.conns):
            try:
                conn.send(_Exit())
                while not isinstance(self._recv(w), _Bye):
                    pass
            except (OSError, WorkerDied):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()


def chunks(frames: Iterator[Frame]) -> Iterator[list[Frame]]:
    """Group framed lines into chunks of at most CHUNK_LINES lines or CHUNK_BYTES."""
    chunk: list[Frame] = []
    size = 0
    for frame in frames:
        chunk.append(frame)
        size += len(frame[2])
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
