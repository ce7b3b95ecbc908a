"""Google's own Pub/Sub fake (pstest, Go) as a test peer, plus helpers that talk to it with the real SDK.

The binary is built once from `tests/peers/pstest/main.go` against Debian's packaged Go client library and cached
under `tests/peers/.build/`; each server is a subprocess listening on a random loopback port, which it prints on
stdout. Helpers take the address explicitly (they never read PUBSUB_EMULATOR_HOST), so a test can point the code
under test at one server, or at a dead port, while it inspects another.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
MAIN_GO = PEERS_DIR / "pstest" / "main.go"
BUILD_DIR = PEERS_DIR / ".build"
BINARY = BUILD_DIR / "pstest"
GOPATH = "/usr/share/gocode"
INSTALL_HINT = "apt-get install golang-go golang-google-cloud-dev"
PUBSUB_SCOPE = "https://www.googleapis.com/auth/pubsub"


class PeerUnavailable(RuntimeError):
    """The peer cannot be built or started on this machine; the message says what to install."""


def build_pstest(*, force: bool = False) -> Path:
    """Build the pstest binary unless a cached one is newer than main.go; return its path."""
    if not force and BINARY.exists() and BINARY.stat().st_mtime >= MAIN_GO.stat().st_mtime:
        return BINARY
    go = shutil.which("go")
    if go is None:
        raise PeerUnavailable(f"the Pub/Sub test peer needs Go and Google's Go client library: {INSTALL_HINT}")
    if not (Path(GOPATH) / "src/cloud.google.com/go/pubsub/pstest").is_dir():
        raise PeerUnavailable(f"{GOPATH} has no cloud.google.com/go/pubsub/pstest: {INSTALL_HINT}")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": ""}
    if not any(env.get(v) for v in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(BUILD_DIR / "gocache")
    tmp = BUILD_DIR / f"pstest.{os.getpid()}.tmp"
    proc = subprocess.run(
        [go, "build", "-o", str(tmp), "main.go"],
        cwd=MAIN_GO.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PeerUnavailable(f"go build of {MAIN_GO} failed ({INSTALL_HINT}?):\n{proc.stderr.strip()}")
    os.replace(tmp, BINARY)  # atomic: concurrent xdist workers never run a half-written binary
    return BINARY


@dataclass
class PstestServer:
    """One pstest process. `addr` is `127.0.0.1:PORT`; `stop()` is SIGTERM then SIGKILL, `kill()` is SIGKILL."""

    proc: subprocess.Popen[str]
    addr: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """Die abruptly, as a crashed or partitioned server does."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout: float = 5.0) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self.proc.wait(timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.proc.wait(timeout=5)

    def __enter__(self) -> PstestServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_pstest(startup_timeout: float = 30.0) -> PstestServer:
    """Build if needed, start, and wait for the address line."""
    binary = build_pstest()
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + startup_timeout
    line = ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        proc.wait()
        raise PeerUnavailable(f"{binary} printed no address (exit code {proc.returncode})")
    return PstestServer(proc, line)


@contextmanager
def pstest() -> Iterator[PstestServer]:
    server = start_pstest()
    try:
        yield server
    finally:
        server.stop()


def _channel(addr: str) -> Any:
    import grpc

    return grpc.insecure_channel(addr)


def publisher_admin(addr: str) -> Any:
    """A GAPIC publisher bound to `addr` whatever PUBSUB_EMULATOR_HOST says."""
    from google.pubsub_v1 import PublisherClient
    from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport

    return PublisherClient(transport=PublisherGrpcTransport(channel=_channel(addr)))


def subscriber(addr: str) -> Any:
    """The real high-level SubscriberClient, bound to `addr`."""
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=_channel(addr)))


def unique_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_topic(addr: str, project: str, topic_id: str) -> str:
    client = publisher_admin(addr)
    try:
        return str(client.create_topic(name=f"projects/{project}/topics/{topic_id}", timeout=10).name)
    finally:
        client.transport.close()


def delete_topic(addr: str, project: str, topic_id: str) -> None:
    client = publisher_admin(addr)
    try:
        client.delete_topic(topic=f"projects/{project}/topics/{topic_id}", timeout=10)
    finally:
        client.transport.close()


def create_subscription(
    addr: str, project: str, topic_id: str, subscription_id: str, *, ack_deadline_seconds: int = 60
) -> str:
    """pstest refuses ack deadlines under 10 s."""
    if ack_deadline_seconds < 10:
        raise ValueError("pstest needs ack_deadline_seconds >= 10")
    client = subscriber(addr)
    try:
        sub = client.create_subscription(
            request={
                "name": f"projects/{project}/subscriptions/{subscription_id}",
                "topic": f"projects/{project}/topics/{topic_id}",
                "ack_deadline_seconds": ack_deadline_seconds,
                "enable_message_ordering": True,
            },
            timeout=10,
        )
        return str(sub.name)
    finally:
        client.close()


@dataclass(frozen=True)
class Pulled:
    """A received message, reduced to what tests compare. `seq` is pstest's arrival number (`m123` -> 123)."""

    message_id: str
    data: bytes
    attributes: dict[str, str]
    ordering_key: str

    @property
    def seq(self) -> int:
        return int(self.message_id.lstrip("m"))


def pull_all(
    addr: str, project: str, subscription_id: str, *, expected: int | None = None, timeout: float = 30.0
) -> list[Pulled]:
    """Pull and ack until `expected` messages arrived (or, without `expected`, until a pull comes back empty)."""
    client = subscriber(addr)
    path = f"projects/{project}/subscriptions/{subscription_id}"
    seen: dict[str, Pulled] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            resp = client.pull(request={"subscription": path, "max_messages": 1000}, timeout=10)
            if not resp.received_messages:
                if expected is None or len(seen) >= expected:
                    break
                continue
            for rm in resp.received_messages:
                m = rm.message
                seen.setdefault(m.message_id, Pulled(m.message_id, bytes(m.data), dict(m.attributes), m.ordering_key))
            client.acknowledge(
                request={"subscription": path, "ack_ids": [rm.ack_id for rm in resp.received_messages]}, timeout=10
            )
            if expected is not None and len(seen) >= expected:
                break
    finally:
        client.close()
    return sorted(seen.values(), key=lambda p: p.seq)


def make_service_account(
    token_uri: str,
    kid: str,
    *,
    project_id: str = "dmrepl-test",
    client_email: str | None = None,
    key_size: int = 2048,
) -> tuple[dict[str, str], str]:
    """A syntactically real service-account `credentials.json` with a fresh RSA key; returns (info, private_pem)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    email = client_email or f"dmrepl-sa@{project_id}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": kid,
        "private_key": pem,
        "client_email": email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
        "universe_domain": "googleapis.com",
    }
    return info, pem


class TcpProxy:
    """A loopback TCP forwarder that can cut the line: `block()` resets every connection and refuses new ones,
    `unblock()` forwards again. It makes a transient outage that the server survives (its topics stay)."""

    def __init__(self, target: str) -> None:
        import socket
        import threading

        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._blocked = False
        self._closed = False
        self.addr = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def block(self) -> None:
        with self._lock:
            self._blocked = True
            conns, self._conns = self._conns, []
        for c in conns:
            self._reset(c)

    def unblock(self) -> None:
        with self._lock:
            self._blocked = False

    def close(self) -> None:
        self._closed = True
        self.block()
        self._listener.close()

    @staticmethod
    def _reset(sock: Any) -> None:
        import socket
        import struct

        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, like a crash
            sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                blocked = self._blocked
            if blocked:
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._reset(dst)
