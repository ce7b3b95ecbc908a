"""A loopback TCP proxy that adds a fixed one-way delay to every chunk, in both directions, without limiting bandwidth.

Why: dmrepl's throughput over a WAN round trip is bounded by how many requests it keeps in flight, and this kernel
has no netem to show it. A chunk read at time t is written at t + delay; chunks are pipelined (each one has its own
due time, nothing waits for the previous chunk's delay), and order is kept per direction. So the proxy behaves like
a long fat pipe: latency, not a bandwidth cap. Backpressure still holds end to end: past `max_queued` bytes waiting
in one direction (or a destination socket that stops draining), the proxy stops reading from the source.

The client's first bytes are also held until one round trip after its connection was accepted, as a real TCP
handshake over the link would make the client wait before it could send (TLS handshakes are not modelled: peers
here speak plain text).

Only loopback addresses are accepted, for both the listening side and the target.

From Python (an event loop in a thread of this process):

    with DelayProxy("127.0.0.1:8085", delay_ms=75) as proxy:
        use(proxy.addr)  # "127.0.0.1:PORT"

in a process of its own (so it does not share the caller's GIL or cores' time slice with it):

    with ProxyProcess("127.0.0.1:8085", delay_ms=75) as proxy: ...

or standalone (stops on SIGINT/SIGTERM, or at end of stdin with --until-stdin-eof):

    python tests/bench/delay_proxy.py --listen 0 --target 127.0.0.1:8085 --delay-ms 75

which prints `{"addr": "127.0.0.1:PORT", ...}` on one line once listening, its counters on SIGUSR1, and its
counters again on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

#: Bytes held in one direction (queued for their due time plus unsent in the destination socket's buffer) before the
#: proxy stops reading from the source. A link of 100 MB/s and 150 ms holds 15 MB: this does not cap the benchmarks.
DEFAULT_MAX_QUEUED = 64 * 1024 * 1024
READ_SIZE = 256 * 1024


def is_loopback_host(host: str) -> bool:
    """True for a literal loopback address (127.0.0.0/8, ::1) or `localhost`: the proxy never talks to anything else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[V6]:PORT`, refusing any non-loopback host."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    if not is_loopback_host(host):
        raise ValueError(f"{host!r} is not a loopback address: the delay proxy only works on loopback")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= number < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, number


@dataclass
class Counters:
    """What went through, for the benchmark's report (a few integers: cheap to keep)."""

    connections: int = 0
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    chunks_up: int = 0
    chunks_down: int = 0
    max_queued: int = 0  # the most bytes ever held in one direction
    read_pauses: int = 0  # times a source was paused because its direction held too much


_EOF = object()  # marker: half-close the destination
_CLOSE = object()  # marker: the source went away; close the destination once everything before it is written


class _Lane:
    """One direction of one connection: chunks held until their due time, then written in order."""

    def __init__(self, conn: _Connection, up: bool) -> None:
        self.conn = conn
        self.up = up
        self.loop = conn.loop
        self.delay = conn.proxy.delay
        self.max_queued = conn.proxy.max_queued
        self.counters = conn.proxy.counters
        self.queue: deque[tuple[float, Any]] = deque()
        self.queued = 0
        self.not_before = 0.0
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.dst_paused = False
        self.src_paused = False
        self.done = False  # EOF or close written: nothing more goes this way

    def push(self, item: Any) -> None:
        """Take a chunk (or a marker) read now; it is written `delay` later."""
        if self.done:
            return
        now = self.loop.time()
        due = max(now, self.not_before) + self.delay
        if isinstance(item, bytes):
            if self.up:
                self.counters.bytes_up += len(item)
                self.counters.chunks_up += 1
            else:
                self.counters.bytes_down += len(item)
                self.counters.chunks_down += 1
            if not self.queue and due <= now and self.dst is not None:
                self.dst.write(item)  # zero delay and nothing ahead of it: no detour through the timer
                self._pressure()
                return
            self.queued += len(item)
            self.counters.max_queued = max(self.counters.max_queued, self.queued)
        self.queue.append((due, item))
        if len(self.queue) == 1:
            self._schedule()
        self._pressure()

    def _schedule(self) -> None:
        if self.timer is not None or not self.queue or self.dst is None:
            return
        self.timer = self.loop.call_at(self.queue[0][0], self.release)

    def release(self) -> None:
        """Write every chunk now due, in order; re-arm the timer for the next one."""
        self.timer = None
        dst = self.dst
        if dst is None:
            return
        now = self.loop.time()
        out: list[bytes] = []
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if isinstance(item, bytes):
                out.append(item)
                self.queued -= len(item)
                continue
            if out:
                dst.writelines(out)
                out = []
            self.done = True
            self.queue.clear()
            self.queued = 0
            if item is _EOF and dst.can_write_eof() and not dst.is_closing():
                try:
                    dst.write_eof()
                except OSError:  # the destination went away meanwhile (its own connection_lost follows)
                    dst.abort()
                    return
                self.conn.half_closed()
            else:
                dst.close()
            return
        if out:
            dst.writelines(out)
        self._schedule()
        self._pressure()

    def _pressure(self) -> None:
        """Stop reading from the source while this direction holds too much; read again below half of it."""
        src = self.src
        if src is None or src.is_closing():
            return
        held = self.queued + (self.dst.get_write_buffer_size() if self.dst is not None else 0)
        if not self.src_paused and (self.dst_paused or held > self.max_queued):
            self.src_paused = True
            self.counters.read_pauses += 1
            src.pause_reading()
        elif self.src_paused and not self.dst_paused and held <= self.max_queued // 2:
            self.src_paused = False
            src.resume_reading()

    def set_dst(self, transport: asyncio.Transport) -> None:
        self.dst = transport
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        self._schedule()

    def dst_writable(self, writable: bool) -> None:
        self.dst_paused = not writable
        self._pressure()

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0
        self.done = True


class _Side(asyncio.Protocol):
    """The protocol of one socket (client side or target side); everything goes to its connection."""

    def __init__(self, conn: _Connection, client: bool) -> None:
        self.conn = conn
        self.client = client

    @property
    def reading(self) -> _Lane:
        return self.conn.up if self.client else self.conn.down

    @property
    def writing(self) -> _Lane:
        return self.conn.down if self.client else self.conn.up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn.made(self, transport)

    def data_received(self, data: bytes) -> None:
        self.reading.push(data)

    def eof_received(self) -> bool:
        self.reading.push(_EOF)
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self.reading.push(_CLOSE)
        self.writing.abort()  # nothing can be written to a socket that is gone
        self.conn.lost(self)

    def pause_writing(self) -> None:
        self.writing.dst_writable(False)

    def resume_writing(self) -> None:
        self.writing.dst_writable(True)


class _Connection:
    """One accepted client and its connection to the target."""

    def __init__(self, proxy: _Server) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.up = _Lane(self, up=True)
        self.down = _Lane(self, up=False)
        self.client: asyncio.Transport | None = None
        self.target: asyncio.Transport | None = None
        self.accepted = self.loop.time()
        # The client may send at once, but over a real link its first bytes leave one round trip later (handshake).
        self.up.not_before = self.accepted + 2 * proxy.delay
        self.gone = 0

    def made(self, side: _Side, transport: asyncio.Transport) -> None:
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        if side.client:
            self.client = transport
            self.up.src = transport
            self.down.set_dst(transport)
            self.proxy.connections.add(self)
            self.proxy.counters.connections += 1
            self.proxy.tasks.add(task := self.loop.create_task(self._connect()))
            task.add_done_callback(self.proxy.tasks.discard)
        else:
            self.target = transport
            self.down.src = transport
            self.up.set_dst(transport)

    async def _connect(self) -> None:
        host, port = self.proxy.target
        try:
            await self.loop.create_connection(lambda: _Side(self, client=False), host, port)
        except OSError:
            self.proxy.connections.discard(self)
            if self.client is not None:
                self.client.abort()

    def half_closed(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def lost(self, side: _Side) -> None:
        self.gone += 1
        if self.gone == 2:
            self.proxy.connections.discard(self)

    def close(self, abort: bool = False) -> None:
        for t in (self.client, self.target):
            if t is not None:
                t.abort() if abort else t.close()


class _Server:
    """The listening socket and its connections, all on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int], delay: float, max_queued: int) -> None:
        self.loop = loop
        self.target = target
        self.delay = delay
        self.max_queued = max_queued
        self.counters = Counters()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self, listen: tuple[str, int]) -> tuple[str, int]:
        def factory() -> _Side:
            return _Side(_Connection(self), client=True)

        self.server = await self.loop.create_server(factory, listen[0], listen[1], reuse_address=True)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close(abort=True)
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


class DelayProxy:
    """The proxy on an event loop in a daemon thread of this process; `close()` (or leaving the `with`) stops it and
    resets every connection still open."""

    def __init__(
        self, target: str, delay_ms: float, listen: str = "0", *, max_queued: int = DEFAULT_MAX_QUEUED
    ) -> None:
        self.target = parse_hostport(target)
        self.listen = parse_hostport(listen)
        self.delay_ms = delay_ms
        self.max_queued = max_queued
        self.addr = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: _Server | None = None

    def start(self) -> DelayProxy:
        if delay_ms_invalid(self.delay_ms):
            raise ValueError(f"bad delay {self.delay_ms!r} ms")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = _Server(loop, self.target, self.delay_ms / 1000, self.max_queued)
        self._thread = threading.Thread(target=loop.run_forever, name="delay-proxy", daemon=True)
        self._thread.start()
        host, port = asyncio.run_coroutine_threadsafe(self._server.start(self.listen), loop).result(10)
        self.addr = f"{host}:{port}"
        return self

    @property
    def counters(self) -> Counters:
        assert self._server is not None
        return self._server.counters

    def reset(self) -> int:
        """Reset (RST) every connection open now, both sides, and keep listening: a fault in the middle of a long
        link while requests are in flight. Returns how many connections were reset."""
        loop, server = self._loop, self._server
        assert loop is not None and server is not None

        async def reset_all() -> int:
            conns = list(server.connections)
            for conn in conns:
                conn.close(abort=True)
            return len(conns)

        return asyncio.run_coroutine_threadsafe(reset_all(), loop).result(5)

    def close(self) -> None:
        loop, thread, server = self._loop, self._thread, self._server
        if loop is None or thread is None or server is None:
            return
        self._loop = self._thread = None
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def delay_ms_invalid(delay_ms: float) -> bool:
    return not (0 <= delay_ms < 60_000)


class ProxyProcess:
    """The standalone proxy as a child process, so its work does not compete for the caller's GIL. It exits when
    its stdin closes, so it cannot outlive its parent; `counters` holds its final figures after `close()`."""

    def __init__(self, target: str, delay_ms: float, *, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        parse_hostport(target)
        self.cmd = [
            *(sys.executable, str(Path(__file__).resolve()), "--listen", "0", "--target", target),
            *("--delay-ms", str(delay_ms), "--max-queued", str(max_queued), "--until-stdin-eof"),
        ]
        self.addr = ""
        self.counters: dict[str, int] = {}
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> ProxyProcess:
        proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"the delay proxy did not start (exit code {proc.returncode})")
        self.addr = json.loads(line)["addr"]
        return self

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            out, _ = proc.communicate(timeout=10)  # closes its stdin: the proxy's signal to stop
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if lines:
            self.counters = json.loads(lines[-1])

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _serve(args: argparse.Namespace, out: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    server = _Server(loop, parse_hostport(args.target), args.delay_ms / 1000, args.max_queued)
    host, port = await server.start(parse_hostport(args.listen))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps(asdict(server.counters)), file=out, flush=True))
    if args.until_stdin_eof:

        def watch_stdin() -> None:
            with contextlib.suppress(OSError, ValueError):
                while sys.stdin.buffer.read1(65536):
                    pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()
    hello = {"addr": f"{host}:{port}", "target": args.target, "delay_ms": args.delay_ms}
    print(json.dumps(hello), file=out, flush=True)
    started = time.monotonic()
    await stop.wait()
    await server.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    final = {
        **asdict(server.counters),
        "seconds": round(time.monotonic() - started, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),  # what the proxy took from the machine's cores
    }
    print(json.dumps(final), file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="0", help="PORT or HOST:PORT on loopback (default 0: an ephemeral port)")
    ap.add_argument("--target", required=True, help="HOST:PORT on loopback")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    ap.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED, help="bytes held per direction at most")
    ap.add_argument("--until-stdin-eof", action="store_true", help="also stop when stdin is closed")
    args = ap.parse_args(argv)
    try:
        parse_hostport(args.target)
        parse_hostport(args.listen)
    except ValueError as exc:
        ap.error(str(exc))
    if delay_ms_invalid(args.delay_ms):
        ap.error("--delay-ms must be in [0, 60000)")
    asyncio.run(_serve(args, sys.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
