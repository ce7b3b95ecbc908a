"""A local Azure Event Hubs peer: an AMQP 1.0 server on python-qpid-proton that the real `azure-eventhub` SDK sends to.

Why a peer and not mocks: the destination's behaviour that matters (CBS authentication, management reads, batch
sizing from the link's `max_message_size`, partition routing, what the SDK does when a connection dies or a token is
refused) only shows up when the real SDK speaks real AMQP over a socket.

Point the SDK at it with `peer.connection_string(policy, hub)`:
`Endpoint=sb://127.0.0.1:PORT/;SharedAccessKeyName=...;SharedAccessKey=...;UseDevelopmentEmulator=true` (plain TCP).

What it does, as the service does:
- SASL ANONYMOUS, then per-entity authentication on `$cbs`: put-token whose SAS signature is checked for real
  (HMAC-SHA256 with the policy's key); 401 for a wrong key, an unknown policy, an expired token or an audience the
  token does not cover. A producer link needs a valid token for its hub on its connection.
- `$management` READ of a hub (`com.microsoft:eventhub`) and of a partition (`com.microsoft:partition`); 404 for an
  unknown hub or partition.
- Producer links to `<hub>` or `<hub>/Partitions/<n>`; an unknown hub is attached then detached with `amqp:not-found`.
  The peer's attach carries `max_message_size` (configurable; the SDK's `create_batch` sizes batches from it).
- Single messages (format 0) and batches (format 0x80013700, an outer message whose data sections are encoded
  messages) are recorded as `RecordedEvent`s. A key without a partition is routed with the service's own hash
  (Jenkins lookup3 over the key's UTF-8 bytes, ported here independently of dmrepl and checked against the JavaScript
  SDK's golden file), so one key always lands in the partition Azure would choose.

How it is built: proton's protocol engine (Transport/Connection/Collector) driven by our own selector loop in one
thread, rather than proton's reactor. Owning the socket I/O lets us (1) rewrite every outgoing frame so that each
performative list has its full arity (the SDK reads fields by position and fails on proton's legal shortened lists),
(2) read each incoming transfer's message-format (proton's Python API does not expose it), and (3) inject faults:
close or drop connections, refuse tokens, delete hubs. Control methods are thread-safe: they run inside the loop
thread and return once applied.

Subprocess mode (for benchmarks that need the peer on its own core):
    python -m tests.peers.eventhubs --port 0 [--hub hub1=4 ...] [--policy send=KEY ...] [--max-message-size N]
                                    [--events-file PATH]
prints one JSON line `{"port": N, "connection_string": ...}` on stdout once listening; on SIGUSR1 prints a JSON line
of counters (`{"events": N, "transfers": M, "by_hub": {...}}`); on SIGTERM/SIGINT writes every recorded event to
`--events-file` as NDJSON (body as UTF-8 text with `errors="replace"`) if given, prints the counters, and exits 0.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import math
import os
import queue
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import quote_plus, unquote_plus, urlsplit

from proton import (
    Collector,
    Condition,
    Connection,
    Data,
    Delivery,
    Event,
    Link,
    Message,
    Receiver,
    Sender,
    Transport,
    symbol,
    timestamp,
)

DEFAULT_POLICIES: dict[str, str] = {"send": "dGVzdC1vbmx5LWtleS1mb3ItdGhlLWxvY2FsLXBlZXI="}
DEFAULT_HUBS: dict[str, int] = {"hub1": 4}
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
BATCH_FORMAT = 0x80013700
PARTITION_KEY = "x-opt-partition-key"

# Full arity of each performative, by descriptor code. Frames are padded with nulls up to these counts.
_ARITY = {0x10: 10, 0x11: 8, 0x12: 14, 0x13: 11, 0x14: 11, 0x15: 6, 0x16: 3, 0x17: 1, 0x18: 1, 0x40: 1, 0x44: 2}
_CREDIT = 1000


class RecordedEvent(NamedTuple):
    """One event as the service would have stored it. `seq` is the peer-wide arrival order."""

    hub: str
    partition_id: str
    partition_key: str | None
    body: bytes
    properties: dict[str, Any]
    content_type: str | None
    message_id: Any
    seq: int


def unique(events: Iterable[RecordedEvent]) -> list[RecordedEvent]:
    """First arrival of each event body: delivery is at-least-once, and a batch whose acknowledgement was lost
    arrives twice."""
    seen: set[bytes] = set()
    out = []
    for ev in sorted(events, key=lambda e: e.seq):
        if ev.body not in seen:
            seen.add(ev.body)
            out.append(ev)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Minimal AMQP type walking: enough to pad performatives, read transfer headers and split message sections, without
# decoding payload bytes we never need.


def _value_end(buf: bytes | memoryview, pos: int) -> int:
    """Index just after the AMQP-encoded value starting at `pos`."""
    code = buf[pos]
    if code == 0x00:
        return _value_end(buf, _value_end(buf, pos + 1))
    high = code >> 4
    if high == 0x4:
        return pos + 1
    if high in (0x5, 0x6, 0x7, 0x8, 0x9):
        return pos + 1 + {0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}[high]
    if high in (0xA, 0xC, 0xE):
        return pos + 2 + buf[pos + 1]
    if high in (0xB, 0xD, 0xF):
        return pos + 5 + struct.unpack_from(">I", buf, pos + 1)[0]
    raise ValueError(f"unknown AMQP constructor 0x{code:02x}")


def _read_scalar(buf: bytes | memoryview, pos: int) -> tuple[Any, int]:
    """Decode the small scalar types found in performative headers; other types are skipped and read as None."""
    code = buf[pos]
    if code == 0x40:
        return None, pos + 1
    if code == 0x41:
        return True, pos + 1
    if code == 0x42:
        return False, pos + 1
    if code in (0x43, 0x44):
        return 0, pos + 1
    if code == 0x56:
        return buf[pos + 1] == 1, pos + 2
    if code in (0x50, 0x52, 0x53):
        return buf[pos + 1], pos + 2
    if code == 0x70:
        return struct.unpack_from(">I", buf, pos + 1)[0], pos + 5
    if code == 0x80:
        return struct.unpack_from(">Q", buf, pos + 1)[0], pos + 9
    if code in (0xA0, 0xA1, 0xA3):
        n = buf[pos + 1]
        return bytes(buf[pos + 2 : pos + 2 + n]), pos + 2 + n
    if code in (0xB0, 0xB1, 0xB3):
        n = struct.unpack_from(">I", buf, pos + 1)[0]
        return bytes(buf[pos + 5 : pos + 5 + n]), pos + 5 + n
    return None, _value_end(buf, pos)


def _performative(body: bytes | memoryview) -> tuple[int, int, int, int, int]:
    """(descriptor code, list constructor position, first field position, field count, end of fields)."""
    if body[0] != 0x00:
        raise ValueError("performative is not a described type")
    descriptor, pos = _read_scalar(body, 1)
    code = body[pos]
    if code == 0x45:
        return descriptor, pos, pos + 1, 0, pos + 1
    if code == 0xC0:
        size, count = body[pos + 1], body[pos + 2]
        return descriptor, pos, pos + 3, count, pos + 2 + size
    if code == 0xD0:
        size, count = struct.unpack_from(">II", body, pos + 1)
        return descriptor, pos, pos + 9, count, pos + 5 + size
    raise ValueError(f"performative body is not a list (0x{code:02x})")


def _fields(body: bytes | memoryview, first: int, count: int, wanted: int) -> list[Any]:
    values: list[Any] = []
    pos = first
    for _ in range(min(count, wanted)):
        value, pos = _read_scalar(body, pos)
        values.append(value)
    return values + [None] * (wanted - len(values))


def pad_frame(frame: bytes) -> bytes:
    """Return `frame` with its performative list padded with nulls to the full arity of its type.

    The SDK (azure.eventhub._pyamqp) indexes performative fields by position, e.g. `frame[10]` for an attach's
    max_message_size, and fails on the shorter (legal) lists proton writes. Payload bytes after the performative
    (a transfer's message) are kept as they are.
    """
    doff = frame[4]
    body = memoryview(frame)[doff * 4 :]
    if not body:
        return frame
    descriptor, list_pos, first, count, end = _performative(body)
    arity = _ARITY.get(descriptor, count)
    if count >= arity:
        return frame
    items = bytes(body[first:end]) + b"\x40" * (arity - count)
    if len(items) + 1 <= 255:
        encoded = bytes((0xC0, len(items) + 1, arity)) + items
    else:
        encoded = b"\xd0" + struct.pack(">II", len(items) + 4, arity) + items
    new_body = bytes(body[:list_pos]) + encoded + bytes(body[end:])
    header = bytearray(frame[: doff * 4])
    struct.pack_into(">I", header, 0, len(header) + len(new_body))
    return bytes(header) + new_body


class _FrameSplitter:
    """Cuts a byte stream into protocol headers (`AMQP....`) and whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterable[bytes]:
        self._buf += data
        buf = self._buf
        pos = 0
        while True:
            if len(buf) - pos >= 8 and buf[pos : pos + 4] == b"AMQP":
                yield bytes(buf[pos : pos + 8])
                pos += 8
                continue
            if len(buf) - pos < 4:
                break
            size = struct.unpack_from(">I", buf, pos)[0]
            if size < 8 or len(buf) - pos < size:
                break
            yield bytes(buf[pos : pos + size])
            pos += size
        del buf[:pos]


def _sections(buf: bytes | memoryview) -> list[tuple[int, int, int]]:
    """Walk a bare message: (section descriptor, value start, value end) for each section, in order."""
    out = []
    pos = 0
    n = len(buf)
    while pos < n:
        if buf[pos] != 0x00:
            raise ValueError("message section is not a described type")
        descriptor, vpos = _read_scalar(buf, pos + 1)
        end = _value_end(buf, vpos)
        out.append((descriptor, vpos, end))
        pos = end
    return out


def _data_bytes(buf: bytes | memoryview, start: int) -> bytes:
    code = buf[start]
    if code == 0xA0:
        return bytes(buf[start + 2 : start + 2 + buf[start + 1]])
    if code == 0xB0:
        n = struct.unpack_from(">I", buf, start + 1)[0]
        return bytes(buf[start + 5 : start + 5 + n])
    raise ValueError("data section does not hold binary")


def _decode_value(buf: bytes | memoryview, start: int, end: int) -> Any:
    data = Data()
    data.decode(bytes(buf[start:end]))
    return _plain(data.get_object())


def _plain(value: Any) -> Any:
    """Detach decoded values from proton's buffers and wrapper types (views, symbols, property dicts)."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def _annotation(buf: bytes | memoryview, sections: list[tuple[int, int, int]], name: str) -> Any:
    for descriptor, start, end in sections:
        if descriptor == 0x72:
            return _decode_value(buf, start, end).get(name)
    return None


def decode_event(raw: bytes) -> dict[str, Any]:
    """Decode one encoded (inner) message into body, application properties, content type, id and annotations."""
    sections = _sections(raw)
    body = b""
    out: dict[str, Any] = {"properties": {}, "content_type": None, "message_id": None, "annotations": {}}
    for descriptor, start, end in sections:
        if descriptor == 0x75:
            body += _data_bytes(raw, start)
        elif descriptor == 0x77:
            value = _decode_value(raw, start, end)
            body = value if isinstance(value, bytes) else str(value).encode()
        elif descriptor == 0x74:
            out["properties"] = _decode_value(raw, start, end) or {}
        elif descriptor == 0x72:
            out["annotations"] = _decode_value(raw, start, end) or {}
        elif descriptor == 0x73:
            props = _decode_value(raw, start, end) or []
            props = list(props) + [None] * (7 - len(props))
            out["message_id"] = props[0]
            out["content_type"] = props[6]
    out["body"] = body
    return out


# --------------------------------------------------------------------------------------------------------------------
# SAS tokens


def verify_sas_token(token: str, audience: str, policies: Mapping[str, str], now: float | None = None) -> str | None:
    """None when `token` is a valid SAS token for `audience`; otherwise why not (never echoing secret material)."""
    if not token.startswith("SharedAccessSignature "):
        return "not a SharedAccessSignature token"
    raw: dict[str, str] = {}
    for part in token[len("SharedAccessSignature ") :].split("&"):
        key, _, value = part.partition("=")
        raw[key.strip().lower()] = value.strip()
    if not {"sr", "sig", "se", "skn"} <= raw.keys():
        return "token lacks sr, sig, se or skn"
    policy = unquote_plus(raw["skn"])
    key = policies.get(policy)
    if key is None:
        return f"unknown policy {policy!r}"
    try:
        expiry = int(raw["se"])
    except ValueError:
        return "bad expiry"
    sig = base64.b64decode(unquote_plus(raw["sig"]) + "==")
    resource = unquote_plus(raw["sr"])
    candidates = {raw["sr"], quote_plus(resource)}
    if not any(
        hmac.compare_digest(sig, hmac.new(key.encode(), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest())
        for sr in candidates
    ):
        return "invalid signature"
    if expiry <= (time.time() if now is None else now):
        return "token expired"
    if not _covers(resource, audience):
        return "token does not cover the audience"
    return None


#: The resource Entra ID tokens for Event Hubs are issued for (their `aud`), with or without a trailing slash.
ENTRA_AUDIENCES = ("https://eventhubs.azure.net", "https://eventhubs.azure.net/")


def verify_jwt_token(token: str, key: bytes | None, now: float | None = None) -> tuple[str | None, str | None]:
    """(principal, None) when `token` is an Entra ID-style JWT signed with `key` (HS256: the loopback identity
    endpoint's key) for Event Hubs and not expired; (principal or None, why not) otherwise."""
    try:
        header_b64, claims_b64, sig_b64 = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
        claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
        signature = base64.urlsafe_b64decode(sig_b64 + "=" * (-len(sig_b64) % 4))
    except ValueError:
        return None, "InvalidToken: not a JWT"
    principal = str(claims.get("appid") or claims.get("oid") or "") or None
    if key is None or header.get("alg") != "HS256":
        return principal, "InvalidIssuer: the token was not issued by this tenant"
    expected = hmac.new(key, f"{header_b64}.{claims_b64}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        return principal, "InvalidSignature: the token's signature does not verify"
    if claims.get("aud") not in ENTRA_AUDIENCES:
        return principal, f"InvalidAudience: the token is for {claims.get('aud')!r}, not Event Hubs"
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] <= (time.time() if now is None else now):
        return principal, "ExpiredToken: the token has expired"
    return principal, None


def _entity_path(uri: str) -> str:
    """`sb://host:port/hub/x` → `hub/x`, lower-cased. The host is ignored: the peer is one namespace, reachable
    under several names (127.0.0.1, localhost)."""
    parts = urlsplit(uri.lower())
    path = parts.path if parts.netloc else parts.path.partition("/")[2]
    return path.strip("/")


def _covers(resource: str, audience: str) -> bool:
    """True when a token for `resource` grants `audience`: the same entity, one below it, or the namespace."""
    res, aud = _entity_path(resource), _entity_path(audience)
    return not res or aud == res or aud.startswith(res + "/")


def _rot32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def _hashlittle2(data: bytes) -> tuple[int, int]:
    """Bob Jenkins' lookup3 `hashlittle2` with zero seeds, returning (c, b), read straight off the C reference.

    Written apart from dmrepl.partitions (and byte by byte where that one pads words) so that the peer is a second,
    independent oracle for the destination: a bug shared by both would have to be made twice.
    """
    mask = 0xFFFFFFFF
    a = b = c = (0xDEADBEEF + len(data)) & mask
    pos, left = 0, len(data)
    while left > 12:
        a = (a + int.from_bytes(data[pos : pos + 4], "little")) & mask
        b = (b + int.from_bytes(data[pos + 4 : pos + 8], "little")) & mask
        c = (c + int.from_bytes(data[pos + 8 : pos + 12], "little")) & mask
        a = ((a - c) & mask) ^ _rot32(c, 4)
        c = (c + b) & mask
        b = ((b - a) & mask) ^ _rot32(a, 6)
        a = (a + c) & mask
        c = ((c - b) & mask) ^ _rot32(b, 8)
        b = (b + a) & mask
        a = ((a - c) & mask) ^ _rot32(c, 16)
        c = (c + b) & mask
        b = ((b - a) & mask) ^ _rot32(a, 19)
        a = (a + c) & mask
        c = ((c - b) & mask) ^ _rot32(b, 4)
        b = (b + a) & mask
        pos += 12
        left -= 12
    if left == 0:
        return c, b
    # The reference's fall-through switch: tail bytes 0-3 go to a, 4-7 to b, 8-11 to c, little-endian.
    abc = [a, b, c]
    for i, byte in enumerate(data[pos:]):
        abc[i // 4] += byte << (8 * (i % 4))
    a, b, c = (v & mask for v in abc)
    c = ((c ^ b) - _rot32(b, 14)) & mask
    a = ((a ^ c) - _rot32(c, 11)) & mask
    b = ((b ^ a) - _rot32(a, 25)) & mask
    c = ((c ^ b) - _rot32(b, 16)) & mask
    a = ((a ^ c) - _rot32(c, 4)) & mask
    b = ((b ^ a) - _rot32(a, 14)) & mask
    c = ((c ^ b) - _rot32(b, 24)) & mask
    return c, b


def _stable_partition(key: str, partition_ids: list[str]) -> str:
    """The service's key → partition mapping, so a key lands where Azure would put it: lookup3 over the key's UTF-8
    bytes, the low 16 bits of c ^ b as a signed short, then C#'s `Math.Abs(hash % count)`. azure-eventhub's private
    port is not used: it hashes code points and takes Python's floored `%`, and so disagrees with the service."""
    c, b = _hashlittle2(key.encode("utf-8"))
    short = (c ^ b) & 0xFFFF
    signed = short - 0x10000 if short >= 0x8000 else short
    truncated_remainder = int(math.fmod(signed, len(partition_ids)))
    return partition_ids[abs(truncated_remainder)]


# --------------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class _LinkState:
    kind: str  # "cbs" | "management" | "producer"
    hub: str | None = None
    partition: str | None = None
    reply_queue: deque[Message] = field(default_factory=deque)


def _links(conn: _Conn) -> list[Link]:
    out = []
    link = conn.connection.link_head(0)
    while link is not None:
        out.append(link)
        link = link.next(0)
    return out


@dataclass
class _Conn:
    sock: socket.socket
    transport: Transport
    connection: Connection
    collector: Collector
    splitter_in: _FrameSplitter = field(default_factory=_FrameSplitter)
    splitter_out: _FrameSplitter = field(default_factory=_FrameSplitter)
    outbuf: bytearray = field(default_factory=bytearray)
    link_names: dict[tuple[int, int], str] = field(default_factory=dict)
    formats: dict[str, deque[int]] = field(default_factory=dict)
    in_delivery: dict[str, bool] = field(default_factory=dict)
    tokens: list[tuple[str, float]] = field(default_factory=list)  # (audience, expiry)
    closing_at: float | None = None
    dead: bool = False


class EventHubsPeer:
    """An Event Hubs namespace on loopback. `start()` returns once listening; `stop()` closes everything."""

    def __init__(
        self,
        *,
        hubs: Mapping[str, int] | None = None,
        policies: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        jwt_key: bytes | None = None,
        local_auth: bool = True,
    ) -> None:
        self.host = host
        #: Entra ID tokens (CBS type `jwt`) are accepted when signed with this key (tests/peers/identity.py's).
        self.jwt_key = jwt_key
        #: False: the namespace refuses SAS ("local") authentication, as Azure policy often requires.
        self.local_auth = local_auth
        self._requested_port = port
        self.max_message_size = max_message_size
        self._hubs: dict[str, list[str]] = {h: [str(i) for i in range(n)] for h, n in (hubs or DEFAULT_HUBS).items()}
        self._hub_created: dict[str, int] = {h: int(time.time() * 1000) for h in self._hubs}
        self.policies: dict[str, str] = dict(policies or DEFAULT_POLICIES)
        self._lock = threading.Lock()
        self._raw: list[tuple[str, str, str | None, bytes, int]] = []
        self._decoded: list[RecordedEvent] = []
        self._transfers: dict[str, int] = {}
        self._seq = itertools.count()
        self._round_robin = itertools.count()
        self._commands: queue.Queue[tuple[Callable[[], Any], threading.Event, list[Any]]] = queue.Queue()
        self._conns: dict[int, _Conn] = {}
        self._auth_failing = False
        self._fail_after: tuple[int, bool] | None = None
        self._busy_left = 0
        self._busy_refused = 0
        self._stalled = False
        self._fault_log: list[str] = []
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.port = 0

    # -- life cycle ---------------------------------------------------------------------------------------------------

    def start(self) -> EventHubsPeer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"eventhubs-peer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> EventHubsPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read ----------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"sb://{self.host}:{self.port}/"

    def connection_string(self, policy: str = "send", hub: str | None = None, *, key: str | None = None) -> str:
        """A connection string for `policy` (its real key unless `key` is given), optionally with EntityPath."""
        secret = self.policies[policy] if key is None else key
        text = f"Endpoint={self.endpoint};SharedAccessKeyName={policy};SharedAccessKey={secret}"
        if hub:
            text += f";EntityPath={hub}"
        return text + ";UseDevelopmentEmulator=true"

    def partition_ids(self, hub: str) -> list[str]:
        return list(self._hubs[hub])

    def partition_for_key(self, hub: str, key: str) -> str:
        return _stable_partition(key, self._hubs[hub])

    def events(self, hub: str | None = None) -> list[RecordedEvent]:
        """Every event recorded so far (of `hub`, or of all hubs), in arrival order. Decoded lazily, then cached."""
        with self._lock:
            raw = self._raw[len(self._decoded) :]
            decoded_upto = len(self._decoded)
        new = []
        for hub_name, partition, outer_key, payload, seq in raw:
            ev = decode_event(payload)
            key = ev["annotations"].get(PARTITION_KEY, outer_key)
            new.append(
                RecordedEvent(
                    hub_name,
                    partition,
                    None if key is None else str(key),
                    ev["body"],
                    ev["properties"],
                    None if ev["content_type"] is None else str(ev["content_type"]),
                    ev["message_id"],
                    seq,
                )
            )
        with self._lock:
            if len(self._decoded) == decoded_upto:
                self._decoded.extend(new)
            out = list(self._decoded)
        return [e for e in out if hub is None or e.hub == hub]

    def event_count(self, hub: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._raw if hub is None or r[0] == hub)

    def transfers(self, hub: str | None = None) -> int:
        """Number of accepted producer deliveries (one per `send_batch`/`send_event`)."""
        with self._lock:
            return sum(n for h, n in self._transfers.items() if hub is None or h == hub)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_hub: dict[str, int] = {}
            for r in self._raw:
                by_hub[r[0]] = by_hub.get(r[0], 0) + 1
            return {"events": len(self._raw), "transfers": sum(self._transfers.values()), "by_hub": by_hub}

    def faults_fired(self) -> list[str]:
        """Faults that took effect, in order: `close`/`reset` (fail_after_transfers), `drop:N` (drop_connections)."""
        return self._call(lambda: list(self._fault_log))

    def connection_count(self) -> int:
        return self._call(lambda: sum(1 for c in self._conns.values() if not c.dead))

    def producer_links(self, hub: str) -> dict[str, int]:
        """Open producer links to each partition of `hub` (partition id → count), on live connections."""

        def count() -> dict[str, int]:
            links: dict[str, int] = {}
            for _, link in self._producer_links(hub):
                partition = link.eh_state.partition  # type: ignore[attr-defined]
                if partition is not None:
                    links[partition] = links.get(partition, 0) + 1
            return links

        return self._call(count)

    # -- faults and configuration (thread-safe) --------------------------------------------------------------------

    def fail_after_transfers(self, n: int, *, abrupt: bool = False) -> None:
        """Accept `n` more producer transfers, then on the next one close its connection without settling it.

        `abrupt=False`: an AMQP close with `amqp:connection:forced` (a service-side restart); `abrupt=True`: the TCP
        connection is reset with no AMQP close (a network fault). One-shot. The unsettled transfer is not recorded,
        so the sender must resend it.
        """
        self._call(lambda: setattr(self, "_fail_after", (n, abrupt)))

    def throttle(self, n: int) -> None:
        """Refuse the next `n` producer transfers as a throttled namespace does: a `rejected` outcome with
        `com.microsoft:server-busy` (the link stays attached; the event is not recorded, so the sender must resend)."""
        self._call(lambda: setattr(self, "_busy_left", n))

    def throttled(self) -> int:
        """Transfers refused by `throttle` so far."""
        return self._call(lambda: self._busy_refused)

    def drop_connections(self) -> int:
        """Reset every open TCP connection now (RST, no AMQP close). Returns how many were dropped."""
        return self._call(self._drop_all)

    def stall(self, stalled: bool = True) -> None:
        """Stop (or resume) reading and writing every connection, new ones included: a service that hangs with its
        TCP connections open. Clients see no error, only silence."""
        self._call(lambda: self._apply_stall(stalled))

    def set_auth_failure(self, failing: bool = True) -> None:
        """From now on answer 401 to put-token and management requests; detach every attached producer link with
        `amqp:unauthorized-access`, so a running sender fails and its reconnection is refused (a revoked key)."""
        self._call(lambda: self._apply_auth_failure(failing))

    def delete_hub(self, hub: str) -> None:
        """Remove `hub`: its producer links are detached with `amqp:not-found`, and reads/attaches then get 404."""
        self._call(lambda: self._apply_delete_hub(hub))

    def add_hub(self, hub: str, partitions: int) -> None:
        def apply() -> None:
            self._hubs[hub] = [str(i) for i in range(partitions)]
            self._hub_created[hub] = int(time.time() * 1000)

        self._call(apply)

    def set_policy(self, name: str, key: str | None) -> None:
        """Add or change a policy's key (None removes it); tokens already accepted stay valid until they expire."""
        self._call(lambda: self.policies.pop(name, None) if key is None else self.policies.__setitem__(name, key))

    # -- loop ----------------------------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        result: list[Any] = []
        self._commands.put((fn, done, result))
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError("event hubs peer did not answer")
        if result and isinstance(result[0], BaseException):
            raise result[0]
        return result[0] if result else None

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                timeout = self._next_timeout()
                for key, mask in self._selector.select(timeout):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)  # type: ignore[union-attr]
                    else:
                        conn = self._conns.get(key.fd)
                        if conn is None:
                            continue
                        try:
                            if mask & selectors.EVENT_READ:
                                self._read(conn)
                            if mask & selectors.EVENT_WRITE and not conn.dead:
                                self._write(conn)
                        except Exception:
                            # A bug or a malformed frame costs that connection, never the peer (and shows in -s).
                            traceback.print_exc()
                            self._kill(conn, abrupt=True)
                self._run_commands()
                now = time.monotonic()
                for conn in list(self._conns.values()):
                    if conn.dead or self._stalled:
                        continue
                    try:
                        conn.transport.tick(now)
                        self._pump(conn)
                    except Exception:
                        traceback.print_exc()
                        self._kill(conn, abrupt=True)
                        continue
                    if conn.closing_at is not None and (now >= conn.closing_at or not conn.outbuf):
                        self._kill(conn, abrupt=False)
        finally:
            for conn in list(self._conns.values()):
                self._kill(conn, abrupt=True)
            self._run_commands()
            for s in (self._listener, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            self._selector.close()

    def _next_timeout(self) -> float:
        return 0.0 if not self._commands.empty() else 0.2

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done, result = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result.append(fn())
            except BaseException as exc:
                result.append(exc)
            done.set()

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = Transport(Transport.SERVER)
            transport.sasl().allowed_mechs("ANONYMOUS")
            connection = Connection()
            collector = Collector()
            connection.collect(collector)
            transport.bind(connection)
            conn = _Conn(sock, transport, connection, collector)
            self._conns[sock.fileno()] = conn
            if not self._stalled:
                self._selector.register(sock, selectors.EVENT_READ, "conn")

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(Exception):
                conn.transport.close_tail()
            self._pump(conn)
            self._kill(conn, abrupt=False)
            return
        for frame in conn.splitter_in.feed(data):
            self._inspect_incoming(conn, frame)
        view = memoryview(data)
        while view:
            capacity = conn.transport.capacity()
            if capacity <= 0:
                self._pump(conn)
                capacity = conn.transport.capacity()
                if capacity <= 0:
                    self._kill(conn, abrupt=True)
                    return
            chunk = view[:capacity]
            conn.transport.push(bytes(chunk))
            view = view[len(chunk) :]
            self._pump(conn)

    def _inspect_incoming(self, conn: _Conn, frame: bytes) -> None:
        """Track link names by (channel, handle) and each delivery's message-format, which proton does not expose."""
        if frame[:4] == b"AMQP" or frame[5] != 0:
            return
        doff = frame[4]
        body = memoryview(frame)[doff * 4 :]
        if not body:
            return
        channel = struct.unpack_from(">H", frame, 6)[0]
        descriptor, _, first, count, _ = _performative(body)
        if descriptor == 0x12:
            name, handle = _fields(body, first, count, 2)
            conn.link_names[(channel, handle)] = name.decode() if isinstance(name, bytes) else str(name)
        elif descriptor == 0x14:
            handle, _, _, fmt, _, more = _fields(body, first, count, 6)
            name = conn.link_names.get((channel, handle))
            if name is None:
                return
            if not conn.in_delivery.get(name):
                conn.formats.setdefault(name, deque()).append(fmt or 0)
            conn.in_delivery[name] = bool(more)

    def _pump(self, conn: _Conn) -> None:
        """Process proton's events, then move its output (padded) to the socket."""
        while not conn.dead:
            ev = conn.collector.peek()
            if ev is None:
                break
            self._on_event(conn, ev)
            if not conn.dead:
                conn.collector.pop()
        while not conn.dead:
            try:
                pending = conn.transport.pending()
            except Exception:
                break
            if pending <= 0:
                break
            out = conn.transport.peek(pending)
            conn.transport.pop(pending)
            if out:
                for frame in conn.splitter_out.feed(out):
                    conn.outbuf += frame if frame[:4] == b"AMQP" else pad_frame(frame)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        if conn.dead or self._stalled:
            return
        while conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._kill(conn, abrupt=True)
                return
            del conn.outbuf[:n]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        with contextlib.suppress(KeyError, ValueError):
            assert self._selector is not None
            self._selector.modify(conn.sock, events, "conn")

    def _kill(self, conn: _Conn, *, abrupt: bool) -> None:
        if conn.dead:
            return
        conn.dead = True
        if abrupt:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(KeyError, ValueError):
            assert self._selector is not None
            self._selector.unregister(conn.sock)
        self._conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        with contextlib.suppress(Exception):
            conn.transport.unbind()
        conn.collector.release()

    def _drop_all(self) -> int:
        conns = [c for c in self._conns.values() if not c.dead]
        for conn in conns:
            self._kill(conn, abrupt=True)
        self._fault_log.append(f"drop:{len(conns)}")
        return len(conns)

    def _close_connection(self, conn: _Conn, condition: str, description: str) -> None:
        conn.connection.condition = Condition(condition, description)
        conn.connection.close()
        conn.closing_at = time.monotonic() + 1.0
        self._pump(conn)

    # -- protocol ------------------------------------------------------------------------------------------------------

    def _on_event(self, conn: _Conn, ev: Event) -> None:
        t = ev.type
        if t == Event.CONNECTION_REMOTE_OPEN:
            conn.connection.container = "eventhubs-peer"
            conn.connection.open()
        elif t == Event.SESSION_REMOTE_OPEN:
            ev.session.open()
        elif t == Event.LINK_REMOTE_OPEN:
            self._on_link_open(conn, ev.link)
        elif t == Event.LINK_REMOTE_CLOSE or t == Event.LINK_REMOTE_DETACH:
            ev.link.close()
        elif t == Event.SESSION_REMOTE_CLOSE:
            ev.session.close()
        elif t == Event.CONNECTION_REMOTE_CLOSE:
            conn.connection.close()
            conn.closing_at = time.monotonic() + 1.0
        elif t == Event.LINK_FLOW:
            if isinstance(ev.link, Sender):
                self._send_replies(ev.link)
        elif t == Event.DELIVERY:
            self._on_delivery(conn, ev.delivery)

    def _on_link_open(self, conn: _Conn, link: Link) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        address = (link.remote_target.address if isinstance(link, Receiver) else link.remote_source.address) or ""
        node = address.split("/", 3)[-1] if address.startswith(("amqp://", "amqps://", "sb://")) else address
        node = node.strip("/")
        if node in ("$cbs", "$management"):
            link.eh_state = _LinkState("cbs" if node == "$cbs" else "management")
            if isinstance(link, Receiver):
                link.open()
                link.flow(_CREDIT)
            else:
                link.snd_settle_mode = link.remote_snd_settle_mode
                link.open()
            return
        if not isinstance(link, Receiver):
            return self._refuse(link, "amqp:not-implemented", "this peer only accepts producers")
        parts = node.split("/")
        hub = parts[0]
        partition = None
        if len(parts) == 3 and parts[1].lower() == "partitions":
            partition = parts[2]
        elif len(parts) != 1:
            return self._refuse(link, "amqp:not-found", f"The messaging entity '{node}' could not be found.")
        if hub not in self._hubs or (partition is not None and partition not in self._hubs[hub]):
            return self._refuse(link, "amqp:not-found", f"The messaging entity '{node}' could not be found.")
        if self._auth_failing or not self._authorized(conn, hub):
            return self._refuse(link, "amqp:unauthorized-access", f"Unauthorized access to '{hub}'.")
        link.eh_state = _LinkState("producer", hub, partition)
        link.max_message_size = self.max_message_size
        link.open()
        link.flow(_CREDIT)

    def _refuse(self, link: Link, condition: str, description: str) -> None:
        """Attach then detach with an error: the SDK drops a link attached with a null terminus before reading why."""
        link.open()
        link.condition = Condition(condition, description)
        link.close()

    def _authorized(self, conn: _Conn, hub: str) -> bool:
        now = time.time()
        return any(exp > now and _covers(aud, f"sb://namespace/{hub}") for aud, exp in conn.tokens)

    def _on_delivery(self, conn: _Conn, delivery: Delivery) -> None:
        link = delivery.link
        state: _LinkState | None = getattr(link, "eh_state", None)
        if isinstance(link, Sender):
            if delivery.updated and not delivery.settled:
                delivery.settle()
            return
        if not delivery.readable or delivery.partial:
            return
        payload = link.recv(delivery.pending) or b""
        link.advance()
        formats = conn.formats.get(link.name)
        fmt = formats.popleft() if formats else 0
        if state is None:
            delivery.settle()
            return
        if state.kind == "producer":
            self._on_event_delivery(conn, link, delivery, state, bytes(payload), fmt)
            if conn.dead:
                return
        else:
            self._on_request(conn, state, bytes(payload))
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()
        if link.credit < _CREDIT // 2:
            link.flow(_CREDIT - link.credit)

    def _on_event_delivery(
        self, conn: _Conn, link: Link, delivery: Delivery, state: _LinkState, payload: bytes, fmt: int
    ) -> None:
        hub = state.hub or ""
        if not link.state & Link.LOCAL_ACTIVE:
            delivery.settle()  # arrived after we detached the link: the sender sees the detach, not an outcome
            return
        if self._auth_failing:
            link.condition = Condition("amqp:unauthorized-access", "Unauthorized: the key was revoked.")
            link.close()
            return
        if self._fail_after is not None:
            remaining, abrupt = self._fail_after
            if remaining <= 0:
                self._fail_after = None
                self._fault_log.append("reset" if abrupt else "close")
                if abrupt:
                    self._kill(conn, abrupt=True)
                else:
                    self._close_connection(conn, "amqp:connection:forced", "The connection was closed by the peer.")
                return
            self._fail_after = (remaining - 1, abrupt)
        if self._busy_left > 0:
            self._busy_left -= 1
            self._busy_refused += 1
            delivery.local.condition = Condition(
                "com.microsoft:server-busy",
                "The request was terminated because the entity is being throttled. Error code : 50002.",
                {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())},  # as the service sends it: all 3 fields
            )
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        if len(payload) > self.max_message_size:
            # As the service does: the link is detached (a rejected outcome's nested error is not padded for the SDK).
            link.condition = Condition(
                "amqp:link:message-size-exceeded",
                f"The received message ({len(payload)} bytes) exceeds the limit ({self.max_message_size} bytes).",
            )
            link.close()
            return
        try:
            sections = _sections(payload)
            if fmt == BATCH_FORMAT:
                outer_key = _annotation(payload, sections, PARTITION_KEY)
                inner = [_data_bytes(payload, start) for d, start, _ in sections if d == 0x75]
            else:
                outer_key = _annotation(payload, sections, PARTITION_KEY)
                inner = [payload]
        except (ValueError, IndexError, struct.error):
            link.condition = Condition("amqp:decode-error", "The message could not be decoded.")
            link.close()
            return
        key = None if outer_key is None else str(outer_key)
        if state.partition is not None:
            partition = state.partition
        elif key is not None:
            partition = _stable_partition(key, self._hubs[hub])
        else:
            partition = self._hubs[hub][next(self._round_robin) % len(self._hubs[hub])]
        with self._lock:
            for raw in inner:
                self._raw.append((hub, partition, key, raw, next(self._seq)))
            self._transfers[hub] = self._transfers.get(hub, 0) + 1
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()

    def _on_request(self, conn: _Conn, state: _LinkState, payload: bytes) -> None:
        request = Message()
        request.decode(payload)
        props = {str(k): _plain(v) for k, v in (request.properties or {}).items()}
        if state.kind == "cbs":
            status, description = self._put_token(conn, props, request.body)
            reply = Message(properties={"status-code": status, "status-description": description})
        else:
            status, description, body = self._management(props)
            reply = Message(body=body, properties={"status-code": status, "status-description": description})
        reply.correlation_id = request.id
        for link in _links(conn):
            other: _LinkState | None = getattr(link, "eh_state", None)
            if isinstance(link, Sender) and other is not None and other.kind == state.kind:
                other.reply_queue.append(reply)
                self._send_replies(link)
                return

    def _send_replies(self, sender: Sender) -> None:
        state: _LinkState | None = getattr(sender, "eh_state", None)
        if state is None:
            return
        while state.reply_queue and sender.credit > 0:
            message = state.reply_queue.popleft()
            delivery = sender.send(message)
            if sender.snd_settle_mode == Link.SND_SETTLED and isinstance(delivery, Delivery):
                delivery.settle()

    def _put_token(self, conn: _Conn, props: dict[str, Any], body: Any) -> tuple[int, str]:
        if props.get("operation") != "put-token":
            return 400, "Unsupported operation."
        audience = str(props.get("name") or "")
        token = body.decode() if isinstance(body, bytes | memoryview) else str(body or "")
        if self._auth_failing:
            return 401, "Unauthorized: the key was revoked."
        why = self._token_problem(token, audience, props.get("type"))
        if why is not None:
            return 401, f"Unauthorized: {why}."
        if props.get("type") == "jwt":
            expiry = float(json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["exp"])
        else:
            expiry = float(token.split("se=", 1)[1].split("&", 1)[0])
        conn.tokens.append((audience, expiry))
        return 200, "OK"

    def _token_problem(self, token: str, audience: str, kind: Any) -> str | None:
        """Why a CBS or management token is refused (None: accepted): a `jwt` by `verify_jwt_token`, a SAS token
        by `verify_sas_token` unless the namespace disables local authentication."""
        if kind == "jwt" or (kind is None and not token.startswith("SharedAccessSignature ")):
            return verify_jwt_token(token, self.jwt_key)[1]
        if not self.local_auth:
            return "LocalAuthDisabled: local (SAS) authentication is disabled for this namespace, use Entra ID"
        return verify_sas_token(token, audience, self.policies)

    def _management(self, props: dict[str, Any]) -> tuple[int, str, Any]:
        if props.get("operation") != "READ":
            return 400, "Unsupported operation.", None
        hub = str(props.get("name") or "")
        token = props.get("security_token")
        if self._auth_failing:
            return 401, "Unauthorized: the key was revoked.", None
        if token is not None:
            token = token.decode() if isinstance(token, bytes) else str(token)
            why = self._token_problem(token, f"sb://namespace/{hub}", None)
            if why is not None:
                return 401, f"Unauthorized: {why}.", None
        if hub not in self._hubs:
            return 404, f"The messaging entity '{hub}' could not be found.", None
        kind = props.get("type")
        if kind == "com.microsoft:eventhub":
            return (
                200,
                "OK",
                {
                    "name": hub,
                    "type": "com.microsoft:eventhub",
                    "created_at": timestamp(self._hub_created[hub]),
                    "partition_count": len(self._hubs[hub]),
                    "partition_ids": list(self._hubs[hub]),
                },
            )
        if kind == "com.microsoft:partition":
            partition = str(props.get("partition"))
            if partition not in self._hubs[hub]:
                return 404, f"Partition '{partition}' of '{hub}' could not be found.", None
            with self._lock:
                mine = [r for r in self._raw if r[0] == hub and r[1] == partition]
            last = len(mine) - 1
            return (
                200,
                "OK",
                {
                    "name": hub,
                    "type": "com.microsoft:partition",
                    "partition": partition,
                    "begin_sequence_number": 0,
                    "last_enqueued_sequence_number": last,
                    "last_enqueued_offset": str(max(last, 0)),
                    "last_enqueued_time_utc": timestamp(int(time.time() * 1000)),
                    "is_partition_empty": not mine,
                },
            )
        return 400, f"Unknown type {kind!r}.", None

    # -- faults, run in the loop thread ---------------------------------------------------------------------------

    def _producer_links(self, hub: str | None = None) -> Iterable[tuple[_Conn, Link]]:
        for conn in list(self._conns.values()):
            if conn.dead:
                continue
            for link in _links(conn):
                state: _LinkState | None = getattr(link, "eh_state", None)
                if (
                    state is not None
                    and state.kind == "producer"
                    and (hub is None or state.hub == hub)
                    and link.state & Link.LOCAL_ACTIVE
                ):
                    yield conn, link

    def _apply_auth_failure(self, failing: bool) -> None:
        self._auth_failing = failing
        if failing:
            for conn, link in list(self._producer_links()):
                link.condition = Condition("amqp:unauthorized-access", "Unauthorized: the key was revoked.")
                link.close()
                conn.tokens.clear()
                self._pump(conn)

    def _apply_stall(self, stalled: bool) -> None:
        assert self._selector is not None
        self._stalled = stalled
        for conn in self._conns.values():
            if conn.dead:
                continue
            if stalled:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(conn.sock)
            else:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.register(conn.sock, selectors.EVENT_READ, "conn")
                self._pump(conn)

    def _apply_delete_hub(self, hub: str) -> None:
        self._hubs.pop(hub, None)
        for conn, link in list(self._producer_links(hub)):
            link.condition = Condition("amqp:not-found", f"The messaging entity '{hub}' could not be found.")
            link.close()
            self._pump(conn)


# --------------------------------------------------------------------------------------------------------------------
# Subprocess mode


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.eventhubs", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hub", action="append", type=_pair, default=[], help="NAME=PARTITIONS (repeatable)")
    parser.add_argument("--policy", action="append", type=_pair, default=[], help="NAME=KEY (repeatable)")
    parser.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE)
    parser.add_argument("--events-file", help="write recorded events as NDJSON here on exit")
    args = parser.parse_args(argv)

    hubs = {name: int(n) for name, n in args.hub} or None
    policies = dict(args.policy) or None
    peer = EventHubsPeer(
        hubs=hubs, policies=policies, host=args.host, port=args.port, max_message_size=args.max_message_size
    ).start()
    hub = next(iter(peer._hubs))
    policy = next(iter(peer.policies))

    # Handlers first: the line below tells the parent it may signal us, and SIGUSR1's default action is to terminate.
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: print(json.dumps(peer.stats()), flush=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"port": peer.port, "connection_string": peer.connection_string(policy, hub)}), flush=True)
    while not stop.wait(0.5):
        pass
    stats = peer.stats()
    peer.stop()
    if args.events_file:
        with open(args.events_file, "w", encoding="utf-8") as out:
            for ev in peer.events():
                row = ev._asdict()
                row["body"] = ev.body.decode("utf-8", errors="replace")
                row["message_id"] = None if ev.message_id is None else str(ev.message_id)
                row["properties"] = {k: v.decode() if isinstance(v, bytes) else v for k, v in ev.properties.items()}
                out.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
