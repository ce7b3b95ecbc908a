"""EventHubsDestination against the local Event Hubs peer, through the real azure-eventhub SDK (no mocks)."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl.destinations import create
from dmrepl.destinations.base import DestinationError
from dmrepl.destinations.eventhubs import MAX_LANES, EventHubsDestination
from dmrepl.operations import DATA, DOC_TYPE, KEY, OP, Message
from tests.peers.eventhubs import EventHubsPeer, RecordedEvent, unique

pytest.importorskip("azure.eventhub")

ROOT = Path(__file__).resolve().parents[1]
DOC_TYPES = ["UserPoint", "UserActivity", "UserProfile", "UserSegment", "UserDevicePoint", "UserDeviceTechnicalId"]


def operations(count: int, users: int, *, seed: int = 0) -> list[Message]:
    """`count` §1 operations spread round-robin over `users` user points; each carries its sequence number."""
    upids = [str(uuid.UUID(int=(seed << 64) + i * 7919 + 1)) for i in range(users)]
    out = []
    for i in range(count):
        upid = upids[i % users]
        doc_type = DOC_TYPES[i % len(DOC_TYPES)]
        op = "DELETE" if i % 11 == 0 else "UPDATE"
        value = {} if op == "DELETE" else {"$ts": 1676627112685 + i, "$type": "SITE_VISIT", "n": i}
        data = {"ts": 1676627112685 + i, "doc_type": doc_type, "doc_id": f"{upid}:{i}", "op": op, "value": value}
        out.append((json.dumps(data, separators=(",", ":")).encode(), doc_type, op, upid))
    return out


def destination(peer: EventHubsPeer, hub: str = "hub1", *, budget: float = 30.0, **kw: str) -> EventHubsDestination:
    dest = create(
        "azure-event-hubs", {"event_hub": hub}, peer.connection_string("send", hub, **kw), retry_budget_s=budget
    )
    assert isinstance(dest, EventHubsDestination)
    return dest


def assert_delivered_in_order(peer: EventHubsPeer, hub: str, sent: list[Message]) -> list[RecordedEvent]:
    got = unique(peer.events(hub))
    assert sorted(e.body for e in got) == sorted(m[DATA] for m in sent)
    by_key: dict[str, list[RecordedEvent]] = defaultdict(list)
    for ev in got:
        by_key[ev.partition_key or ""].append(ev)
    sent_by_key: dict[str, list[bytes]] = defaultdict(list)
    for m in sent:
        sent_by_key[m[KEY]].append(m[DATA])
    assert set(by_key) == set(sent_by_key)
    for key, evs in by_key.items():
        assert {e.partition_id for e in evs} == {peer.partition_for_key(hub, key)}, key
        assert [e.body for e in evs] == sent_by_key[key], f"operations of {key} out of order"
    return got


@pytest.fixture
def opened(eventhubs_peer: EventHubsPeer) -> Iterator[EventHubsDestination]:
    dest = destination(eventhubs_peer)
    dest.open()
    try:
        yield dest
    finally:
        dest.close()


# -- check -------------------------------------------------------------------------------------------------------------


def test_check_ok_lists_partitions_and_sends_nothing(eventhubs_peer: EventHubsPeer) -> None:
    steps = destination(eventhubs_peer).check(timeout_s=10)
    assert [(s.name, s.status) for s in steps] == [("connection-string", "ok"), ("cbs-auth", "ok"), ("event-hub", "ok")]
    assert "0, 1, 2, 3" in steps[2].detail and "4 partitions" in steps[2].detail
    assert eventhubs_peer.event_count() == 0 and eventhubs_peer.transfers() == 0


def test_check_wrong_key_fails_cbs_auth_quickly(eventhubs_peer: EventHubsPeer) -> None:
    wrong = base64.b64encode(b"not-the-key").decode()
    start = time.monotonic()
    steps = destination(eventhubs_peer, key=wrong).check(timeout_s=20)
    assert time.monotonic() - start < 3
    assert [(s.name, s.status) for s in steps] == [
        ("connection-string", "ok"),
        ("cbs-auth", "failed"),
        ("event-hub", "skipped"),
    ]
    assert steps[1].code == "AUTH_FAILED" and "recreate" in steps[1].fix and "401" in steps[1].detail
    assert wrong not in json.dumps([s.to_dict() for s in steps])


def test_check_unknown_hub_fails_event_hub_step(eventhubs_peer: EventHubsPeer) -> None:
    steps = destination(eventhubs_peer, hub="nohub").check(timeout_s=10)
    assert [(s.name, s.status) for s in steps] == [
        ("connection-string", "ok"),
        ("cbs-auth", "ok"),
        ("event-hub", "failed"),
    ]
    assert steps[2].code == "EVENT_HUB_NOT_FOUND" and "nohub" in steps[2].detail and "nohub" in steps[2].fix


def test_check_unreachable_fails_within_timeout() -> None:
    with EventHubsPeer() as peer:
        conn_str = peer.connection_string("send", "hub1")
    dest = EventHubsDestination({"event_hub": "hub1"}, conn_str, retry_budget_s=5)
    start = time.monotonic()
    steps = dest.check(timeout_s=3)
    assert time.monotonic() - start < 4
    assert (steps[1].status, steps[1].code, steps[2].status) == ("failed", "UNREACHABLE", "skipped")


def test_check_bad_connection_string_stops_at_parse() -> None:
    dest = EventHubsDestination(
        {"event_hub": "hub1"}, "Endpoint=sb://x.example/;SharedAccessKeyName=k", retry_budget_s=5
    )
    steps = dest.check(timeout_s=3)
    assert [(s.name, s.status) for s in steps] == [
        ("connection-string", "failed"),
        ("cbs-auth", "skipped"),
        ("event-hub", "skipped"),
    ]
    assert "SharedAccessKey" in steps[0].detail


def test_check_takes_hub_from_entity_path_and_tolerates_bom(eventhubs_peer: EventHubsPeer) -> None:
    secret = "\ufeff " + eventhubs_peer.connection_string("send", "hub1") + "\n"
    steps = EventHubsDestination({}, secret, retry_budget_s=5).check(timeout_s=10)
    assert [s.status for s in steps] == ["ok", "ok", "ok"]


# -- delivery ----------------------------------------------------------------------------------------------------------


def test_send_delivers_everything_in_order_per_user_point_in_full_batches(
    eventhubs_peer: EventHubsPeer, opened: EventHubsDestination
) -> None:
    sent = operations(5000, 500)
    for i in range(0, len(sent), 700):
        opened.send(sent[i : i + 700])
    opened.flush()
    got = assert_delivered_in_order(eventhubs_peer, "hub1", sent)
    assert {e.content_type for e in got} == {"application/json"}
    by_body = {m[DATA]: m for m in sent}
    assert all(e.properties == {"doc_type": by_body[e.body][DOC_TYPE], "op": by_body[e.body][OP]} for e in got)
    assert len({e.partition_id for e in got}) == 4
    # ~1.2 MB over 4 partitions of a 1 MiB hub, each with its lanes: a handful of transfers per lane (the partial
    # batches of the flush), not one per user point or per event.
    assert eventhubs_peer.transfers("hub1") <= 2 * 4 * opened._lanes


def test_fast_encoding_is_what_the_sdk_would_send(eventhubs_peer: EventHubsPeer) -> None:
    sent = operations(300, 30)
    recorded = []
    for fast in (True, False):
        eventhubs_peer.add_hub(f"h{fast}", 4)
        dest = destination(eventhubs_peer, f"h{fast}")
        dest.open()
        assert dest._fast is True
        dest._fast = fast
        dest.send(sent)
        dest.flush()
        dest.close()
        recorded.append(
            [
                (e.partition_id, e.partition_key, e.body, e.properties, e.content_type)
                for e in sorted(eventhubs_peer.events(f"h{fast}"), key=lambda e: e.seq)
            ]
        )
    assert sorted(recorded[0]) == sorted(recorded[1])
    assert len(recorded[0]) == 300


def test_an_sdk_that_encodes_differently_turns_the_fast_path_off(
    eventhubs_peer: EventHubsPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast encoder relies on EventDataBatch's private fields and encoding: if a new SDK encodes events otherwise
    (simulated: `add` now also sets a property), the self-check at open() must see it and every event must go
    through the SDK's own `add`, as that SDK would send it."""
    from azure.eventhub import EventDataBatch

    real_add = EventDataBatch.add

    def add(self: EventDataBatch, event: object) -> None:
        event.properties = {**(event.properties or {}), "sdk": "v-next"}  # type: ignore[attr-defined]
        real_add(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(EventDataBatch, "add", add)
    eventhubs_peer.add_hub("changed", 4)
    dest = destination(eventhubs_peer, "changed")
    dest.open()
    assert dest._fast is False
    sent = operations(50, 5)
    dest.send(sent)
    dest.flush()
    dest.close()
    got = eventhubs_peer.events("changed")
    assert sorted(e.body for e in got) == sorted(m[DATA] for m in sent)
    assert all(e.properties.get("sdk") == "v-next" for e in got)


def test_max_message_bytes_follows_the_link_and_fits_an_op_at_the_limit() -> None:
    with EventHubsPeer(max_message_size=64 * 1024) as peer:
        dest = destination(peer)
        dest.open()
        try:
            limit = dest.max_message_bytes
            assert dest._fast
            assert 64 * 1024 - 400 < limit < 64 * 1024
            upid = str(uuid.uuid4())
            prefix = (
                b'{"ts":1,"doc_type":"UserProfile","doc_id":"' + upid.encode() + b':1:2","op":"UPDATE","value":{"p":"'
            )
            big = prefix + b"x" * (limit - len(prefix) - 3) + b'"}}'
            assert len(big) == limit
            small = operations(50, 5)
            sent = [
                *small[:25],
                (big, "UserProfile", "UPDATE", upid),
                *small[25:],
                (big, "UserProfile", "UPDATE", upid),
            ]
            dest.send(sent)
            dest.flush()
        finally:
            dest.close()
        bodies = [e.body for e in peer.events("hub1")]
        assert bodies.count(big) == 2 and len(bodies) == 52


def test_connection_lost_mid_stream_still_delivers_everything(eventhubs_peer: EventHubsPeer) -> None:
    dest = destination(eventhubs_peer)
    dest.open()
    try:
        sent = operations(6000, 500, seed=1)
        dest.send(sent[:2000])
        dest.flush()
        eventhubs_peer.fail_after_transfers(1, abrupt=True)  # the 2nd of the next 4 transfers: TCP reset
        dest.send(sent[2000:4000])
        dest.flush()
        eventhubs_peer.drop_connections()  # between sends: every connection is reset while idle
        eventhubs_peer.fail_after_transfers(0, abrupt=False)  # the very next transfer: AMQP close
        dest.send(sent[4000:])
        dest.flush()
    finally:
        dest.close()
    fired = eventhubs_peer.faults_fired()
    assert fired[0] == "reset" and fired[1].startswith("drop:") and fired[2] == "close", fired
    assert_delivered_in_order(eventhubs_peer, "hub1", sent)


def test_auth_revoked_mid_stream_fails_flush_promptly(eventhubs_peer: EventHubsPeer) -> None:
    dest = destination(eventhubs_peer, budget=120)
    dest.open()
    try:
        sent = operations(2000, 100)
        dest.send(sent[:1000])
        dest.flush()
        eventhubs_peer.set_auth_failure(True)
        start = time.monotonic()
        with pytest.raises(DestinationError) as failure:
            dest.send(sent[1000:])
            dest.flush()
        assert time.monotonic() - start < 5
        assert failure.value.code == "AUTH_FAILED"
        assert eventhubs_peer.policies["send"] not in str(failure.value)
        with pytest.raises(DestinationError):
            dest.flush()
    finally:
        dest.close()


def test_hub_deleted_mid_stream_is_event_hub_not_found(eventhubs_peer: EventHubsPeer) -> None:
    dest = destination(eventhubs_peer, budget=120)
    dest.open()
    try:
        dest.send(operations(100, 10))
        dest.flush()
        eventhubs_peer.delete_hub("hub1")
        start = time.monotonic()
        with pytest.raises(DestinationError) as failure:
            dest.send(operations(100, 10, seed=2))
            dest.flush()
        assert failure.value.code == "EVENT_HUB_NOT_FOUND"
        assert time.monotonic() - start < 10
    finally:
        dest.close()


def test_retry_budget_exhausted_is_unreachable(eventhubs_peer: EventHubsPeer) -> None:
    dest = destination(eventhubs_peer, budget=2)
    dest.open()
    try:
        eventhubs_peer.stop()
        start = time.monotonic()
        with pytest.raises(DestinationError) as failure:
            dest.send(operations(50, 5))
            dest.flush()
        assert failure.value.code == "UNREACHABLE" and failure.value.retryable
        assert time.monotonic() - start < 10
    finally:
        dest.close()


def test_a_service_that_stops_answering_fails_within_the_budget_instead_of_hanging(
    eventhubs_peer: EventHubsPeer,
) -> None:
    dest = destination(eventhubs_peer, budget=3)
    dest.open()
    try:
        dest.send(operations(100, 10))
        dest.flush()
        eventhubs_peer.stall()
        start = time.monotonic()
        with pytest.raises(DestinationError) as failure:
            dest.send(operations(100, 10, seed=3))
            dest.flush()
        assert failure.value.code == "UNREACHABLE"
        assert time.monotonic() - start < 10
    finally:
        dest.close()


def test_open_against_a_silent_listener_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        conn_str = (
            f"Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=send;SharedAccessKey=a2V5;UseDevelopmentEmulator=true"
        )
        dest = EventHubsDestination({"event_hub": "hub1"}, conn_str, retry_budget_s=2)
        start = time.monotonic()
        steps = dest.check(timeout_s=2)
        assert (steps[1].code, steps[2].status) == ("UNREACHABLE", "skipped")
        with pytest.raises(DestinationError) as failure:
            dest.open()
        assert failure.value.code == "UNREACHABLE"
        assert time.monotonic() - start < 8
        dest.close()


def test_open_with_wrong_key_is_auth_failed_without_the_secret(eventhubs_peer: EventHubsPeer) -> None:
    wrong = base64.b64encode(b"not-the-key").decode()
    dest = destination(eventhubs_peer, key=wrong)
    start = time.monotonic()
    with pytest.raises(DestinationError) as failure:
        dest.open()
    assert failure.value.code == "AUTH_FAILED" and time.monotonic() - start < 3
    assert wrong not in str(failure.value)
    dest.close()


def test_module_does_not_import_the_sdk() -> None:
    code = "import sys, dmrepl.destinations.eventhubs; assert 'azure.eventhub' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -- lanes: more than one batch in flight per partition ---------------------------------------------------------------


@pytest.mark.parametrize(("budget_mb", "lanes"), [(None, MAX_LANES), ("24", 2), ("6", 1)])
def test_open_attaches_every_lane_to_every_partition_before_the_first_send(
    eventhubs_peer: EventHubsPeer, monkeypatch: pytest.MonkeyPatch, budget_mb: str | None, lanes: int
) -> None:
    """Lanes are bounded by the memory budget (three 1 MiB batches per lane of each of 4 partitions), and all of
    their links are attached by open(), not one by one at the first send of each."""
    if budget_mb is None:
        monkeypatch.delenv("DMREPL_MEMORY_BUDGET_MB", raising=False)
    else:
        monkeypatch.setenv("DMREPL_MEMORY_BUDGET_MB", budget_mb)
    dest = destination(eventhubs_peer)
    dest.open()
    try:
        assert dest._lanes == lanes
        assert eventhubs_peer.producer_links("hub1") == dict.fromkeys(["0", "1", "2", "3"], lanes)
        assert eventhubs_peer.event_count() == 0
        sent = operations(3000, 300, seed=5)
        dest.send(sent)
        dest.flush()
    finally:
        dest.close()
    assert dest.acknowledged == len(sent)
    assert_delivered_in_order(eventhubs_peer, "hub1", sent)


@contextlib.contextmanager
def over_a_delayed_link(one_way_ms: float) -> Iterator[tuple[EventHubsPeer, Any, EventHubsDestination]]:
    """A 4-partition peer (64 KiB messages: many batches) behind a delaying proxy, and an opened destination to it."""
    from tests.bench.delay_proxy import DelayProxy

    with EventHubsPeer(hubs={"hub1": 4}, max_message_size=64 * 1024) as peer:
        host_port = peer.endpoint.split("//", 1)[1].strip("/")
        with DelayProxy(host_port, one_way_ms) as proxy:
            secret = peer.connection_string("send", "hub1").replace(host_port, proxy.addr)
            dest = create("azure-event-hubs", {"event_hub": "hub1"}, secret, retry_budget_s=60)
            assert isinstance(dest, EventHubsDestination)
            dest.open()
            try:
                yield peer, proxy, dest
            finally:
                dest.close()


def test_connections_reset_while_every_lane_has_a_batch_in_flight() -> None:
    """Every connection reset at the far end of a 100 ms link while each lane of each partition waits for a batch's
    acknowledgement: each batch is sent again on a new connection, counted once, per-key order kept."""
    with over_a_delayed_link(50) as (peer, proxy, dest):
        sent = operations(30_000, 3000, seed=9)
        sender = threading.Thread(target=lambda: [dest.send(sent[i : i + 500]) for i in range(0, len(sent), 500)])
        sender.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            senders = list(dest._senders.values())
            if len(senders) == 4 * dest._lanes and all(s.queue.unfinished_tasks for s in senders):
                break
            time.sleep(0.005)
        else:
            pytest.fail("the lanes never all had a batch in flight")
        assert proxy.reset() >= 4 * dest._lanes
        sender.join(60)
        dest.flush()
        assert dest.acknowledged == len(sent)
        assert_delivered_in_order(peer, "hub1", sent)


def test_throttling_shrinks_the_window_and_loses_nothing(eventhubs_peer: EventHubsPeer) -> None:
    """A throttled namespace refuses transfers with `com.microsoft:server-busy`: each refused batch is sent again (in
    its place, so per-key order holds), counted once, and the window of batches in flight halves instead of pressing
    on at full width."""
    dest = destination(eventhubs_peer, budget=60)
    dest.open()
    try:
        sent = operations(8000, 800, seed=3)
        dest.send(sent[:4000])
        dest.flush()
        before = dest._window.limit
        eventhubs_peer.throttle(40)
        dest.send(sent[4000:])
        dest.flush()
    finally:
        dest.close()
    assert eventhubs_peer.throttled() == 40
    assert dest._window.shrinks >= 1 and dest._window.limit < before
    assert dest.acknowledged == len(sent)
    assert_delivered_in_order(eventhubs_peer, "hub1", sent)


def test_the_window_grows_to_the_lanes_over_a_long_round_trip() -> None:
    """Over a 100 ms round trip one batch in flight per partition leaves the link idle: the window grows, up to
    every lane of every partition, and no further."""
    with over_a_delayed_link(50) as (peer, _, dest):
        assert dest._window.limit == 4 and dest._lanes == MAX_LANES
        sent = operations(20_000, 2000, seed=4)
        for i in range(0, len(sent), 1000):
            dest.send(sent[i : i + 1000])
        dest.flush()
        assert 4 < dest._window.peak <= 4 * MAX_LANES
        assert dest.acknowledged == len(sent)
        assert_delivered_in_order(peer, "hub1", sent)
