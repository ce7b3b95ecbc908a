"""The benchmark's delay proxy (tests/bench/delay_proxy.py): a latency benchmark is only as good as its link.

These checks would catch a proxy that reorders or drops bytes, that adds no delay (or only one way), that serializes
its sleeps (and so caps bandwidth at one chunk per delay, the failure that would make every high-latency figure
meaningless), that swallows a half-close, or that would forward off loopback.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.bench.delay_proxy import DelayProxy, ProxyProcess, main, parse_hostport

DELAY_MS = 50
DELAY = DELAY_MS / 1000


@pytest.fixture
def echo_server() -> Iterator[str]:
    """A loopback echo server (one thread per connection); half-closes its side when the client does."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def connect(addr: str) -> socket.socket:
    host, port = parse_hostport(addr)
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def round_trip(sock: socket.socket, payload: bytes) -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.perf_counter() - start


def test_bytes_arrive_intact_and_in_order(echo_server: str) -> None:
    rng = random.Random(7)
    # Chunks of varied sizes, each numbered, so a dropped, duplicated or swapped chunk shows.
    chunks = [i.to_bytes(4, "big") + rng.randbytes(rng.randrange(1, 40_000)) for i in range(200)]
    payload = b"".join(chunks)
    with DelayProxy(echo_server, delay_ms=DELAY_MS) as proxy, connect(proxy.addr) as sock:

        def send() -> None:
            for c in chunks:
                sock.sendall(c)
            sock.shutdown(socket.SHUT_WR)  # the half-close must travel too: the echo server answers it with EOF

        sender = threading.Thread(target=send)
        sender.start()
        got = recv_exactly(sock, len(payload) + 1)  # one byte more than sent: returns at EOF, or fails on extra
        sender.join()
        assert got == payload
        assert proxy.counters.bytes_up == proxy.counters.bytes_down == len(payload)


def test_round_trip_takes_twice_the_one_way_delay(echo_server: str) -> None:
    with DelayProxy(echo_server, delay_ms=DELAY_MS) as proxy, connect(proxy.addr) as sock:
        first = round_trip(sock, b"hello")  # also pays the modelled TCP handshake: one more round trip
        assert first >= 4 * DELAY
        for _ in range(3):
            rtt = round_trip(sock, b"ping")
            assert 2 * DELAY <= rtt < 2 * DELAY + 0.1


def test_zero_delay_adds_no_delay(echo_server: str) -> None:
    with DelayProxy(echo_server, delay_ms=0) as proxy, connect(proxy.addr) as sock:
        round_trip(sock, b"warm-up")
        assert min(round_trip(sock, b"ping") for _ in range(5)) < 0.02


def test_chunks_are_pipelined_not_delayed_one_after_another(echo_server: str) -> None:
    """Twenty small writes 5 ms apart: a pipelined link returns them all ~2 delays after the last one; a proxy that
    sleeps the delay per chunk in turn would take 20 × 2 delays."""
    count, gap = 20, 0.005
    with DelayProxy(echo_server, delay_ms=DELAY_MS) as proxy, connect(proxy.addr) as sock:
        round_trip(sock, b"warm-up")
        start = time.perf_counter()
        for i in range(count):
            sock.sendall(b"%04d" % i)
            time.sleep(gap)
        got = recv_exactly(sock, 4 * count)
        elapsed = time.perf_counter() - start
    assert got == b"".join(b"%04d" % i for i in range(count))
    assert elapsed < count * gap + 2 * DELAY + 0.15


def test_refuses_anything_but_loopback() -> None:
    for target in ("10.0.0.1:80", "example.com:443", "0.0.0.0:80"):
        with pytest.raises(ValueError, match="loopback"):
            DelayProxy(target, delay_ms=1)
    with pytest.raises(ValueError, match="loopback"):
        DelayProxy("127.0.0.1:80", delay_ms=1, listen="0.0.0.0:0")
    assert parse_hostport("[::1]:80") == ("::1", 80)
    with pytest.raises(SystemExit) as exit_info:
        main(["--listen", "0", "--target", "192.168.1.1:8085", "--delay-ms", "75"])
    assert exit_info.value.code == 2


def test_close_stops_listening(echo_server: str) -> None:
    proxy = DelayProxy(echo_server, delay_ms=1).start()
    addr = proxy.addr
    proxy.close()
    with pytest.raises(OSError):
        connect(addr).close()


def test_standalone_process_forwards_and_reports(echo_server: str) -> None:
    with ProxyProcess(echo_server, delay_ms=DELAY_MS) as proxy, connect(proxy.addr) as sock:
        round_trip(sock, b"warm-up")
        assert round_trip(sock, b"ping") >= 2 * DELAY
    assert proxy.counters["connections"] == 1
    assert proxy.counters["bytes_up"] == len(b"warm-upping")


def test_reset_breaks_open_connections_and_keeps_listening(echo_server: str) -> None:
    with DelayProxy(echo_server, delay_ms=1) as proxy:
        with connect(proxy.addr) as first, connect(proxy.addr) as second:
            round_trip(first, b"a")
            round_trip(second, b"b")
            assert proxy.reset() == 2
            for sock in (first, second):
                with pytest.raises(OSError):  # RST: the peer reset, or a write into a reset connection
                    sock.sendall(b"x")
                    if not sock.recv(1):
                        raise ConnectionResetError("closed")
        with connect(proxy.addr) as third:
            assert round_trip(third, b"c") < 1
        assert proxy.counters.connections == 3
