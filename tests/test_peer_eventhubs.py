"""The Event Hubs peer, exercised with the real azure-eventhub SDK over loopback sockets.

These pin down what the destination tests rely on: that the SDK accepts the peer (padding, SASL, CBS, management),
that the peer records what was sent and routes keys like the service, and that each fault mode fails the SDK the way
the service would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_plus, urlencode

import pytest

from tests.peers.eventhubs import EventHubsPeer, pad_frame, verify_sas_token

eh = pytest.importorskip("azure.eventhub")
from azure.eventhub import EventData, EventHubProducerClient  # noqa: E402
from azure.eventhub.exceptions import AuthenticationError, ConnectError, EventHubError  # noqa: E402

FAST = {"retry_total": 0, "retry_backoff_factor": 0.01}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def producer(eventhubs_peer: EventHubsPeer) -> Iterator[EventHubProducerClient]:
    client = EventHubProducerClient.from_connection_string(
        eventhubs_peer.connection_string("send", "hub1"), retry_total=2, retry_backoff_factor=0.05
    )
    try:
        yield client
    finally:
        client.close()


def _event(body: bytes, **props: str) -> EventData:
    event = EventData(body)
    event.content_type = "application/json"
    event.properties = props
    event.message_id = hashlib.sha1(body).hexdigest()
    return event


def _sas(resource: str, policy: str, key: str, expiry: int) -> str:
    sig = base64.b64encode(hmac.new(key.encode(), f"{quote_plus(resource)}\n{expiry}".encode(), "sha256").digest())
    return "SharedAccessSignature " + urlencode({"sr": resource, "sig": sig, "se": str(expiry), "skn": policy})


# -- codec and token units ---------------------------------------------------------------------------------------------


def test_pad_frame_fills_a_short_performative_and_keeps_the_payload() -> None:
    fields = b"\xa1\x02ab\x52\x07"  # name "ab", handle 7: an attach cut after 2 of its 14 fields
    body = b"\x00\x53\x12\xc0" + bytes((len(fields) + 1, 2)) + fields + b"PAYLOAD"
    frame = (8 + len(body)).to_bytes(4, "big") + b"\x02\x00\x00\x01" + body
    padded = pad_frame(frame)
    assert int.from_bytes(padded[:4], "big") == len(padded)
    assert padded[4:8] == b"\x02\x00\x00\x01"
    assert padded[8:11] == b"\x00\x53\x12" and padded[11] == 0xC0 and padded[13] == 14
    assert padded[14 : 14 + len(fields)] == fields
    assert padded[14 + len(fields) : 14 + len(fields) + 12] == b"\x40" * 12
    assert padded.endswith(b"PAYLOAD")
    empty_end = b"\x00\x53\x17\x45"  # end with list0
    assert (
        pad_frame((12 + 0).to_bytes(4, "big") + b"\x02\x00\x00\x00" + empty_end)[8:] == b"\x00\x53\x17\xc0\x02\x01\x40"
    )
    heartbeat = b"\x00\x00\x00\x08\x02\x00\x00\x00"
    assert pad_frame(heartbeat) == heartbeat


def test_sas_tokens_are_verified_for_real() -> None:
    policies = {"send": "a2V5"}
    aud = "sb://127.0.0.1:5672/hub1"
    later = int(time.time()) + 600
    assert verify_sas_token(_sas(aud, "send", "a2V5", later), aud, policies) is None
    assert verify_sas_token(_sas("sb://127.0.0.1:5672/", "send", "a2V5", later), aud, policies) is None
    assert verify_sas_token(_sas(aud, "send", "d3Jvbmc=", later), aud, policies) == "invalid signature"
    assert "unknown policy" in (verify_sas_token(_sas(aud, "other", "a2V5", later), aud, policies) or "")
    assert verify_sas_token(_sas(aud, "send", "a2V5", int(time.time()) - 5), aud, policies) == "token expired"
    other = "sb://127.0.0.1:5672/hub2"
    assert verify_sas_token(_sas(other, "send", "a2V5", later), aud, policies) == "token does not cover the audience"


# -- with the SDK ------------------------------------------------------------------------------------------------------


def test_management_reads_hub_and_partitions(producer: EventHubProducerClient) -> None:
    props = producer.get_eventhub_properties()
    assert props["eventhub_name"] == "hub1"
    assert props["partition_ids"] == ["0", "1", "2", "3"]
    part = producer.get_partition_properties("2")
    assert part["id"] == "2" and part["is_empty"] is True


def test_single_event_is_recorded(eventhubs_peer: EventHubsPeer, producer: EventHubProducerClient) -> None:
    producer.send_event(_event(b'{"a":1}', doc_type="UserPoint", op="UPDATE"))
    [ev] = eventhubs_peer.events("hub1")
    assert ev.body == b'{"a":1}'
    assert ev.properties == {"doc_type": "UserPoint", "op": "UPDATE"}
    assert ev.content_type == "application/json"
    assert ev.message_id == hashlib.sha1(b'{"a":1}').hexdigest()
    assert ev.partition_key is None and ev.partition_id in {"0", "1", "2", "3"}
    assert eventhubs_peer.transfers("hub1") == 1


def test_batch_is_one_transfer_of_many_events(eventhubs_peer: EventHubsPeer, producer: EventHubProducerClient) -> None:
    batch = producer.create_batch(partition_id="1")
    bodies = [b'{"n":%d}' % i for i in range(500)]
    for body in bodies:
        batch.add(_event(body, doc_type="UserActivity", op="UPDATE"))
    producer.send_batch(batch)
    events = eventhubs_peer.events("hub1")
    assert [e.body for e in events] == bodies
    assert {e.partition_id for e in events} == {"1"}
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert eventhubs_peer.transfers("hub1") == 1


def test_partition_key_routes_each_key_to_one_partition(
    eventhubs_peer: EventHubsPeer, producer: EventHubProducerClient
) -> None:
    keys = [str(uuid.UUID(int=i)) for i in range(40)]
    for round_ in range(2):
        for key in keys:
            batch = producer.create_batch(partition_key=key)
            batch.add(EventData(f"{key}:{round_}".encode()))
            producer.send_batch(batch)
    by_key: dict[str, set[str]] = {}
    for ev in eventhubs_peer.events("hub1"):
        assert ev.body.decode().startswith(ev.partition_key or "?")
        by_key.setdefault(ev.partition_key or "", set()).add(ev.partition_id)
    assert set(by_key) == set(keys)
    assert all(len(parts) == 1 for parts in by_key.values())
    assert all(by_key[k] == {eventhubs_peer.partition_for_key("hub1", k)} for k in keys)
    assert len(set().union(*by_key.values())) > 1


def test_wrong_key_unknown_policy_and_expired_token_are_refused(eventhubs_peer: EventHubsPeer) -> None:
    wrong = eventhubs_peer.connection_string("send", "hub1", key=base64.b64encode(b"wrong").decode())
    unknown = f"Endpoint={eventhubs_peer.endpoint};SharedAccessKeyName=nobody;SharedAccessKey=a2V5;EntityPath=hub1"
    expired_sas = _sas(f"sb://127.0.0.1:{eventhubs_peer.port}/hub1", "send", eventhubs_peer.policies["send"], 1000)
    expired = f"Endpoint={eventhubs_peer.endpoint};SharedAccessSignature={expired_sas};EntityPath=hub1"
    for conn_str in (wrong, unknown + ";UseDevelopmentEmulator=true", expired + ";UseDevelopmentEmulator=true"):
        client = EventHubProducerClient.from_connection_string(conn_str, **FAST)
        start = time.monotonic()
        with pytest.raises(AuthenticationError, match="401"):
            client.get_eventhub_properties()
        with pytest.raises(AuthenticationError):
            client.send_batch([EventData(b"x")])
        client.close()
        assert time.monotonic() - start < 3
    assert eventhubs_peer.events() == []


def test_valid_shared_access_signature_is_accepted(eventhubs_peer: EventHubsPeer) -> None:
    sas = _sas(eventhubs_peer.endpoint, "send", eventhubs_peer.policies["send"], int(time.time()) + 600)
    conn_str = f"Endpoint={eventhubs_peer.endpoint};SharedAccessSignature={sas};EntityPath=hub1"
    client = EventHubProducerClient.from_connection_string(conn_str + ";UseDevelopmentEmulator=true", **FAST)
    client.send_batch([EventData(b"signed")])
    client.close()
    assert [e.body for e in eventhubs_peer.events("hub1")] == [b"signed"]


def test_unknown_hub_is_not_found(eventhubs_peer: EventHubsPeer) -> None:
    client = EventHubProducerClient.from_connection_string(eventhubs_peer.connection_string("send", "nohub"), **FAST)
    with pytest.raises(ConnectError, match="404"):
        client.get_eventhub_properties()
    with pytest.raises(EventHubError):
        client.send_batch([EventData(b"x")])
    client.close()


def test_producer_link_to_unknown_hub_is_detached_not_found(eventhubs_peer: EventHubsPeer) -> None:
    client = EventHubProducerClient.from_connection_string(eventhubs_peer.connection_string("send", "hub1"), **FAST)
    _send_numbered(client, 0, 1)
    eventhubs_peer.delete_hub("hub1")
    # The SDK reports the detach of its idle link as `unknown-error` on the next send, then `not-found` on re-attach.
    for _ in range(2):
        with pytest.raises(EventHubError) as failure:
            _send_numbered(client, 1, 1)
        if "not-found" in str(failure.value):
            break
    assert "not-found" in str(failure.value)
    with pytest.raises(ConnectError, match="404"):
        client.get_eventhub_properties()
    client.close()


def test_max_message_size_sizes_batches_and_is_enforced() -> None:
    with EventHubsPeer(max_message_size=8192) as peer:
        client = EventHubProducerClient.from_connection_string(peer.connection_string("send", "hub1"), **FAST)
        batch = client.create_batch()
        assert batch.max_size_in_bytes == 8192
        added = 0
        with pytest.raises(ValueError):
            while True:
                batch.add(EventData(b"x" * 100))
                added += 1
        client.send_batch(batch)
        assert peer.event_count("hub1") == added > 50
        with pytest.raises(EventHubError, match="message-size-exceeded"):
            client.send_event(EventData(b"x" * 9000))
        client.close()


# -- faults ------------------------------------------------------------------------------------------------------------


def _send_numbered(client: EventHubProducerClient, start: int, count: int, partition: str = "0") -> None:
    batch = client.create_batch(partition_id=partition)
    for i in range(start, start + count):
        batch.add(EventData(b"%d" % i))
    client.send_batch(batch)


@pytest.mark.parametrize("abrupt", [False, True], ids=["amqp-close", "tcp-reset"])
def test_connection_closed_mid_stream_then_sdk_resends(
    eventhubs_peer: EventHubsPeer, producer: EventHubProducerClient, abrupt: bool
) -> None:
    _send_numbered(producer, 0, 10)
    eventhubs_peer.fail_after_transfers(1, abrupt=abrupt)
    for start in range(10, 50, 10):
        _send_numbered(producer, start, 10)
    bodies = [int(e.body) for e in eventhubs_peer.events("hub1")]
    assert sorted(set(bodies)) == list(range(50))
    assert eventhubs_peer.transfers("hub1") == 5


def test_drop_connections_resets_every_connection(
    eventhubs_peer: EventHubsPeer, producer: EventHubProducerClient
) -> None:
    _send_numbered(producer, 0, 5)
    assert eventhubs_peer.drop_connections() >= 1
    _send_numbered(producer, 5, 5)
    assert sorted({int(e.body) for e in eventhubs_peer.events("hub1")}) == list(range(10))


def test_auth_failure_mid_stream_fails_a_running_sender(
    eventhubs_peer: EventHubsPeer, producer: EventHubProducerClient
) -> None:
    _send_numbered(producer, 0, 5)
    eventhubs_peer.set_auth_failure(True)
    start = time.monotonic()
    with pytest.raises(AuthenticationError):
        _send_numbered(producer, 5, 5)
    assert time.monotonic() - start < 5
    assert eventhubs_peer.event_count("hub1") == 5
    eventhubs_peer.set_auth_failure(False)
    _send_numbered(producer, 5, 5)
    assert eventhubs_peer.event_count("hub1") == 10


# -- subprocess mode ---------------------------------------------------------------------------------------------------


def test_subprocess_mode_reports_counts_and_writes_events(tmp_path: Path) -> None:
    events_file = tmp_path / "events.ndjson"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.peers.eventhubs", "--port", "0", "--hub", "bench=2", "--policy", "p=a2V5"),
            *("--events-file", str(events_file)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert "EntityPath=bench" in info["connection_string"]
        client = EventHubProducerClient.from_connection_string(info["connection_string"], **FAST)
        client.send_batch([EventData(b'{"x":1}'), EventData(b'{"x":2}')])
        client.close()
        proc.send_signal(signal.SIGUSR1)
        assert json.loads(proc.stdout.readline()) == {"events": 2, "transfers": 1, "by_hub": {"bench": 2}}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [r["body"] for r in rows] == ['{"x":1}', '{"x":2}']
    assert {r["hub"] for r in rows} == {"bench"}


# -- key routing against the JavaScript SDK's golden file --------------------------------------------------------------

GOLDEN = ROOT / "tests" / "data" / "eventhubs-partitions.golden.ndjson"


def _golden_rows() -> tuple[list[int], list[tuple[str, int, list[int]]]]:
    """Rows whose key AMQP can carry: a lone surrogate is not valid UTF-8, so no client could send it."""
    header, *lines = GOLDEN.read_text(encoding="utf-8").splitlines()
    rows = []
    for key, hash_, partitions in map(json.loads, lines):
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            continue
        rows.append((key, hash_, partitions))
    return json.loads(header)["partition_counts"], rows


def test_peer_routes_every_golden_key_like_the_sdk(eventhubs_peer: EventHubsPeer) -> None:
    """The peer's own lookup3 port is the destination tests' oracle: it must agree with the SDK on every row."""
    counts, rows = _golden_rows()
    for n in counts:
        eventhubs_peer.add_hub(f"golden{n}", n)
    wrong = [
        (key[:40], partitions)
        for key, _, partitions in rows
        if [int(eventhubs_peer.partition_for_key(f"golden{n}", key)) for n in counts] != partitions
    ]
    assert len(rows) >= 10_000
    assert not wrong, f"{len(wrong)} golden rows routed differently, e.g. {wrong[:5]}"


def test_keyed_send_to_the_hub_lands_where_the_golden_file_says(eventhubs_peer: EventHubsPeer) -> None:
    """Keys picked where the usual mistakes (Python's floored `%`, hashing code points) would pick another partition,
    sent by the real SDK to the hub itself, so the peer, not the client, places them."""
    counts, rows = _golden_rows()
    n = 32
    column = counts.index(n)
    floored_differs = [r for r in rows if abs(r[1] % n) != r[2][column] and len(r[0]) == 36][:20]
    non_ascii = [r for r in rows if not r[0].isascii() and len(r[0]) <= 128][:20]
    chosen = {key: partitions[column] for key, _, partitions in floored_differs + non_ascii}
    assert len(chosen) == 40
    eventhubs_peer.add_hub("hub32", n)
    client = EventHubProducerClient.from_connection_string(eventhubs_peer.connection_string("send", "hub32"), **FAST)
    try:
        for key in chosen:
            batch = client.create_batch(partition_key=key)
            batch.add(EventData(key.encode()))
            client.send_batch(batch)
    finally:
        client.close()
    landed = {ev.partition_key: int(ev.partition_id) for ev in eventhubs_peer.events("hub32")}
    assert landed == chosen
