"""PubSubDestination against Google's own fake server (pstest) and a loopback OAuth2 token endpoint, over sockets.

Nothing of the SDK is mocked: messages are published by the destination and read back with a real SubscriberClient.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dmrepl.destinations import pubsub as pubsub_mod
from dmrepl.destinations.base import CheckStep, DestinationError
from dmrepl.destinations.pubsub import ORDERING_BUCKETS, PubSubDestination, ordering_key
from dmrepl.operations import DATA, DOC_TYPE, OP, Message
from tests.peers.fixtures_pubsub import PROJECT, PubSubTopic
from tests.peers.pubsub import PstestServer, TcpProxy, delete_topic, make_service_account
from tests.peers.token_server import TokenServer

STEP_NAMES = ["credentials", "token", "topic", "publish-permission"]


def statuses(steps: list[CheckStep]) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in steps]


def key_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and "PRIVATE KEY" not in line]


def assert_no_key_material(text: str, pem: str) -> None:
    leaked = [line for line in key_lines(pem) if line in text]
    assert not leaked, "private key material in output"


def operations(n_users: int, per_user: int, *, seed: int = 7) -> list[Message]:
    """Interleaved operations of many user points; `doc_id` carries the per-user sequence number."""
    rng = random.Random(seed)
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n_users)]
    todo = [u for u in users for _ in range(per_user)]
    rng.shuffle(todo)
    counters: dict[str, int] = defaultdict(int)
    out = []
    for upid in todo:
        n = counters[upid]
        counters[upid] += 1
        doc_type, op = rng.choice([("UserActivity", "UPDATE"), ("UserProfile", "UPDATE"), ("UserSegment", "DELETE")])
        value = {} if op == "DELETE" else {"$ts": 1676627112685 + n, "pad": "x" * rng.randrange(0, 200)}
        data = json.dumps(
            {"ts": 1676627112685 + n, "doc_type": doc_type, "doc_id": f"{upid}:{n}", "op": op, "value": value},
            separators=(",", ":"),
        ).encode()
        out.append((data, doc_type, op, upid))
    return out


def assert_in_order_per_user_point(pulled: list[Any]) -> None:
    """Each user point's sequence numbers (in `doc_id`) arrived in order, duplicates of at-least-once aside."""
    arrival: dict[str, list[int]] = defaultdict(list)
    for p in pulled:
        upid, n = json.loads(p.data)["doc_id"].rsplit(":", 1)
        if int(n) not in arrival[upid]:  # at-least-once: a retried request may arrive twice
            arrival[upid].append(int(n))
    assert all(seq == sorted(seq) for seq in arrival.values())


def send_in_chunks(dest: PubSubDestination, msgs: list[Message], chunk: int = 250) -> None:
    for i in range(0, len(msgs), chunk):
        dest.send(msgs[i : i + chunk])


@pytest.fixture
def credentials(token_server: TokenServer) -> tuple[str, str, str]:
    """(credentials.json text, private PEM, client_email) for a key the token server knows."""
    kid = uuid.uuid4().hex
    info, pem = make_service_account(token_server.url, kid)
    token_server.register(kid, pem)
    return json.dumps(info), pem, info["client_email"]


@pytest.fixture
def destinations() -> Iterator[Callable[..., PubSubDestination]]:
    """Build destinations that are always closed, and prove close() never hangs."""
    made: list[PubSubDestination] = []

    def make(settings: dict[str, object], secret: str | None = None, **kw: float) -> PubSubDestination:
        dest = PubSubDestination(settings, secret, **kw)
        made.append(dest)
        return dest

    yield make
    for dest in made:
        start = time.monotonic()
        dest.close()
        assert time.monotonic() - start < 8, "close() hung"


# --------------------------------------------------------------------------------------------------- check


def test_check_ok_on_existing_topic(pubsub_emulator: str, pubsub_topic: PubSubTopic, credentials) -> None:
    secret, pem, email = credentials
    steps = PubSubDestination(pubsub_topic.settings(), secret).check(timeout_s=10)
    assert statuses(steps) == [
        ("credentials", "ok"),
        ("token", "skipped"),
        ("topic", "ok"),
        ("publish-permission", "skipped"),
    ]
    assert email in steps[0].detail
    assert "PUBSUB_EMULATOR_HOST" in steps[1].detail
    assert "TestIamPermissions" in steps[3].detail
    assert all(s.code is None for s in steps)
    assert_no_key_material(json.dumps([s.to_dict() for s in steps]), pem)


def test_check_without_credentials_on_the_emulator(pubsub_emulator: str, pubsub_topic: PubSubTopic) -> None:
    steps = PubSubDestination(pubsub_topic.settings(), None).check(timeout_s=10)
    assert statuses(steps) == [
        ("credentials", "skipped"),
        ("token", "skipped"),
        ("topic", "ok"),
        ("publish-permission", "skipped"),
    ]


def test_check_missing_topic(pubsub_emulator: str) -> None:
    steps = PubSubDestination({"project_id": PROJECT, "topic_id": "no-such-topic"}, None).check(timeout_s=10)
    assert statuses(steps)[2:] == [("topic", "failed"), ("publish-permission", "skipped")]
    topic = steps[2]
    assert topic.code == "TOPIC_NOT_FOUND"
    assert "projects/dmrepl-test/topics/no-such-topic" in topic.detail
    assert "gcloud pubsub topics create no-such-topic --project=dmrepl-test" in topic.fix


def test_check_unreachable_emulator_fails_within_timeout(monkeypatch: pytest.MonkeyPatch, closed_port: int) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{closed_port}")
    start = time.monotonic()
    steps = PubSubDestination({"project_id": PROJECT, "topic_id": "t"}, None).check(timeout_s=3)
    assert time.monotonic() - start < 3 + 2
    assert statuses(steps)[2:] == [("topic", "failed"), ("publish-permission", "skipped")]
    assert steps[2].code == "UNREACHABLE"
    assert f"127.0.0.1:{closed_port}" in steps[2].detail + steps[2].fix


def test_check_silent_endpoint_fails_within_timeout(monkeypatch: pytest.MonkeyPatch, silent_port: int) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{silent_port}")
    start = time.monotonic()
    steps = PubSubDestination({"project_id": PROJECT, "topic_id": "t"}, None).check(timeout_s=2)
    elapsed = time.monotonic() - start
    assert 1.0 < elapsed < 2 + 2, elapsed
    assert steps[2].status == "failed"
    assert steps[2].code == "UNREACHABLE"


def test_check_real_credentials_token_and_topic(
    pstest_server: PstestServer, pubsub_topic: PubSubTopic, token_server: TokenServer, credentials
) -> None:
    """No emulator: the key is exchanged for a token at token_uri, then GetTopic goes with that token."""
    secret, pem, email = credentials
    dest = PubSubDestination(pubsub_topic.settings(endpoint=pstest_server.addr), secret)
    steps = dest.check(timeout_s=10)
    assert statuses(steps) == [
        ("credentials", "ok"),
        ("token", "ok"),
        ("topic", "ok"),
        ("publish-permission", "skipped"),
    ]
    assert [(r.status, r.iss, r.scope) for r in token_server.requests] == [
        (200, email, "https://www.googleapis.com/auth/pubsub")
    ]
    assert_no_key_material(json.dumps([s.to_dict() for s in steps]), pem)


def test_check_unknown_key_is_auth_failed(
    pstest_server: PstestServer, pubsub_topic: PubSubTopic, token_server: TokenServer
) -> None:
    info, pem = make_service_account(token_server.url, "deleted-key")  # never registered: a deleted key
    start = time.monotonic()
    steps = PubSubDestination(pubsub_topic.settings(endpoint=pstest_server.addr), json.dumps(info)).check()
    assert time.monotonic() - start < 3
    assert statuses(steps) == [
        ("credentials", "ok"),
        ("token", "failed"),
        ("topic", "skipped"),
        ("publish-permission", "skipped"),
    ]
    token = steps[1]
    assert token.code == "AUTH_FAILED"
    assert "Invalid JWT Signature" in token.detail
    assert f"create a new key for {info['client_email']}" in token.fix
    assert "dmrepl recreate" in token.fix
    assert [r.status for r in token_server.requests] == [400]
    assert_no_key_material(json.dumps([s.to_dict() for s in steps]), pem)


def test_check_token_endpoint_unreachable(pubsub_topic: PubSubTopic, closed_port: int) -> None:
    info, _ = make_service_account(f"http://127.0.0.1:{closed_port}/token", "k")
    start = time.monotonic()
    steps = PubSubDestination(pubsub_topic.settings(), json.dumps(info)).check(timeout_s=5)
    assert time.monotonic() - start < 5 + 2
    assert steps[1].status == "failed"
    assert steps[1].code == "UNREACHABLE"


# ------------------------------------------------------------------------------------------------ delivery


def test_ordering_key_is_stable() -> None:
    """The bucket of a user point must never change between versions: pinned values."""
    assert ordering_key("d95bafc8-f2a4-427b-9cf4-bb99f4bea973") == "b43"
    assert ordering_key("4700c85f-17e3-4304-aa7f-dc140173b08d") == "b42"
    assert ORDERING_BUCKETS == 64


def test_module_import_does_not_load_grpc() -> None:
    code = "import sys, dmrepl.destinations.pubsub; sys.exit(any(m.split('.')[0] == 'grpc' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_send_5000_unordered(pubsub_emulator: str, pubsub_topic: PubSubTopic, destinations) -> None:
    msgs = operations(200, 25)
    dest = destinations(pubsub_topic.settings(ordering=False), None)
    send_in_chunks(dest, msgs)
    dest.flush()
    assert dest.acked == len(msgs)
    pulled = pubsub_topic.pull(expected=len(msgs))
    assert sorted((p.data, p.attributes["doc_type"], p.attributes["op"]) for p in pulled) == sorted(
        (m[DATA], m[DOC_TYPE], m[OP]) for m in msgs
    )
    assert all(set(p.attributes) == {"doc_type", "op"} and p.ordering_key == "" for p in pulled)


@pytest.mark.parametrize("batch_size", [1000, 2], ids=["batch1000", "batch2"])
def test_send_5000_ordered_keeps_per_user_point_order(
    batch_size: int, pubsub_emulator: str, pubsub_topic: PubSubTopic, destinations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small batches put many requests of one bucket in the queues at once: only sequencing keeps them in order."""
    monkeypatch.setattr(pubsub_mod, "BATCH_MAX_MESSAGES", batch_size)
    msgs = operations(200, 25)
    dest = destinations(pubsub_topic.settings(ordering=True), None)
    send_in_chunks(dest, msgs[:2500], chunk=1)  # one message per call, as a live stream sends them
    send_in_chunks(dest, msgs[2500:], chunk=500)
    dest.flush()
    pulled = pubsub_topic.pull(expected=len(msgs))
    assert sorted(p.data for p in pulled) == sorted(m[DATA] for m in msgs)
    arrival: dict[str, list[int]] = defaultdict(list)
    for p in pulled:  # already sorted by server arrival number
        upid, n = json.loads(p.data)["doc_id"].rsplit(":", 1)
        assert p.ordering_key == ordering_key(upid)
        arrival[upid].append(int(n))
    assert len(arrival) == 200
    out_of_order = [u for u, seq in arrival.items() if seq != sorted(seq)]
    assert not out_of_order


def test_trickle_goes_out_without_flush(pubsub_emulator: str, pubsub_topic: PubSubTopic, destinations) -> None:
    """A live stream's lone operation must not wait for a full batch."""
    dest = destinations(pubsub_topic.settings(ordering=True), None)
    dest.send(operations(1, 1))
    assert len(pubsub_topic.pull(expected=1, timeout=3)) == 1


def test_send_with_real_credentials(
    pstest_server: PstestServer, pubsub_topic: PubSubTopic, token_server: TokenServer, credentials, destinations
) -> None:
    secret, _, _ = credentials
    dest = destinations(pubsub_topic.settings(endpoint=pstest_server.addr, ordering=True), secret)
    dest.send(operations(10, 10))
    dest.flush()
    assert len(pubsub_topic.pull(expected=100)) == 100
    assert [r.status for r in token_server.requests] == [200]


def test_send_with_deleted_key_fails_at_once(
    pstest_server: PstestServer, pubsub_topic: PubSubTopic, token_server: TokenServer, destinations
) -> None:
    info, pem = make_service_account(token_server.url, "deleted-key")
    dest = destinations(pubsub_topic.settings(endpoint=pstest_server.addr), json.dumps(info), retry_budget_s=60)
    dest.send(operations(10, 10))
    start = time.monotonic()
    with pytest.raises(DestinationError) as err:
        dest.flush()
    assert time.monotonic() - start < 5, "an auth rejection must not be retried"
    assert err.value.code == "AUTH_FAILED"
    assert_no_key_material(str(err.value), pem)


@pytest.mark.parametrize("ordering", [False, True], ids=["unordered", "ordered"])
def test_topic_deleted_mid_stream(
    ordering: bool, pubsub_emulator: str, pubsub_topic: PubSubTopic, destinations
) -> None:
    msgs = operations(100, 40)
    dest = destinations(pubsub_topic.settings(ordering=ordering), None, retry_budget_s=60)
    send_in_chunks(dest, msgs[:2000])
    dest.flush()
    delete_topic(pubsub_topic.addr, pubsub_topic.project_id, pubsub_topic.topic_id)
    start = time.monotonic()
    with pytest.raises(DestinationError) as err:
        send_in_chunks(dest, msgs[2000:])
        dest.flush()
    assert time.monotonic() - start < 5, "NotFound must not be retried"
    assert err.value.code == "TOPIC_NOT_FOUND"
    assert pubsub_topic.topic_id in err.value.message
    assert dest.acked == 2000
    with pytest.raises(DestinationError):  # the failure stays: nothing after it is silently accepted
        dest.send(msgs[:1])
        dest.flush()


@pytest.mark.parametrize("ordering", [False, True], ids=["unordered", "ordered"])
def test_server_killed_mid_stream(
    ordering: bool, pstest_private: PstestServer, make_pubsub_topic, monkeypatch: pytest.MonkeyPatch, destinations
) -> None:
    topic = make_pubsub_topic(pstest_private)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pstest_private.addr)
    msgs = operations(100, 40)
    dest = destinations(topic.settings(ordering=ordering), None, retry_budget_s=3)
    send_in_chunks(dest, msgs[:2000])
    dest.flush()
    pstest_private.kill()
    start = time.monotonic()
    with pytest.raises(DestinationError) as err:
        send_in_chunks(dest, msgs[2000:])
        dest.flush()
    elapsed = time.monotonic() - start
    assert 2.5 < elapsed < 3 + 5, elapsed
    assert err.value.code == "UNREACHABLE"
    assert "retry budget of 3 s" in err.value.message
    assert dest.acked == 2000


def test_flow_control_blocked_send_fails_instead_of_hanging(
    pstest_private: PstestServer, make_pubsub_topic, monkeypatch: pytest.MonkeyPatch, destinations
) -> None:
    """With the server gone, send() stops taking messages past the limit and fails within the budget."""
    monkeypatch.setattr(pubsub_mod, "MAX_OUTSTANDING_MESSAGES", 1000)
    topic = make_pubsub_topic(pstest_private)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pstest_private.addr)
    dest = destinations(topic.settings(ordering=True), None, retry_budget_s=2)
    pstest_private.kill()
    start = time.monotonic()
    with pytest.raises(DestinationError) as err:
        send_in_chunks(dest, operations(100, 100))
    assert time.monotonic() - start < 2 + 5
    assert err.value.code == "UNREACHABLE"
    assert dest._outstanding <= 1000 + 250


@pytest.mark.parametrize("ordering", [False, True], ids=["unordered", "ordered"])
def test_transient_outage_is_retried_without_loss_or_reordering(
    ordering: bool,
    pubsub_topic: PubSubTopic,
    monkeypatch: pytest.MonkeyPatch,
    destinations,
) -> None:
    """Connections reset for a second, then back: flush waits it out and every message arrives, in order."""
    monkeypatch.setattr(pubsub_mod, "BATCH_MAX_MESSAGES", 50)
    proxy = TcpProxy(pubsub_topic.addr)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.addr)
    msgs = operations(100, 40)
    dest = destinations(pubsub_topic.settings(ordering=ordering), None, retry_budget_s=30)
    try:
        send_in_chunks(dest, msgs[:2000])
        dest.flush()
        proxy.block()
        timer = threading.Timer(1.5, proxy.unblock)
        timer.start()
        start = time.monotonic()
        send_in_chunks(dest, msgs[2000:])
        dest.flush()
        assert time.monotonic() - start > 1.0, "the outage was not noticed"
        timer.join()
    finally:
        proxy.close()
    assert dest.acked == len(msgs)
    pulled = pubsub_topic.pull(expected=len(msgs))
    assert {p.data for p in pulled} == {m[DATA] for m in msgs}
    if ordering:
        assert_in_order_per_user_point(pulled)


# ----------------------------------------------------------------------------------------------- the window


def test_the_window_grows_over_a_long_round_trip_and_delivers_in_order(
    pstest_server: PstestServer, monkeypatch: pytest.MonkeyPatch, destinations, pubsub_topic: PubSubTopic
) -> None:
    """Over a 100 ms round trip, 8 requests in flight cap the rate at 80 requests/s: the window must grow past its
    start while every message still arrives, in order per user point."""
    from tests.bench.delay_proxy import DelayProxy

    with DelayProxy(pstest_server.addr, 50) as proxy:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.addr)
        dest = destinations(pubsub_topic.settings(ordering=True))
        dest.open()
        sent = operations(2000, 30)
        monkeypatch.setattr(pubsub_mod, "BATCH_MAX_MESSAGES", 100)  # many small requests: the window is the limit
        for i in range(0, len(sent), 1000):
            dest.send(sent[i : i + 1000])
        dest.flush()
        assert dest._window.peak > pubsub_mod.INITIAL_WINDOW
        assert dest._window.limit <= pubsub_mod.WORKERS
    got = pubsub_topic.pull(len(sent), timeout=120)
    assert sorted(p.data for p in got) == sorted(m[DATA] for m in sent)


def test_the_window_halves_when_the_server_fails_and_recovers(
    pstest_server: PstestServer, monkeypatch: pytest.MonkeyPatch, destinations, pubsub_topic: PubSubTopic
) -> None:
    """A retryable failure (connections reset: UNAVAILABLE) shrinks the window, as throttling would."""
    proxy = TcpProxy(pstest_server.addr)
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.addr)
        dest = destinations(pubsub_topic.settings(ordering=False), retry_budget_s=30)
        dest.open()
        dest._window.limit = 32
        sent = operations(200, 5)
        proxy.block()
        dest.send(sent)
        threading.Timer(1.0, proxy.unblock).start()
        dest.flush()
        assert pubsub_mod.MIN_WINDOW <= dest._window.limit < 32
    finally:
        proxy.close()
    got = pubsub_topic.pull(len(sent), timeout=120)
    assert {p.data for p in got} == {m[DATA] for m in sent}


def test_each_channel_is_a_connection_of_its_own(
    pstest_server: PstestServer, monkeypatch: pytest.MonkeyPatch, destinations, pubsub_topic: PubSubTopic
) -> None:
    """gRPC pools subchannels process-wide: channels to one target with the same arguments would share one TCP
    connection, and its one flow-control window, which is what several channels are there to avoid."""
    from tests.bench.delay_proxy import DelayProxy

    with DelayProxy(pstest_server.addr, 2) as proxy:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.addr)
        monkeypatch.setattr(pubsub_mod, "BATCH_MAX_MESSAGES", 20)  # 100 requests: every worker, so every channel
        dest = destinations(pubsub_topic.settings(ordering=False))
        sent = operations(500, 4)
        send_in_chunks(dest, sent)
        dest.flush()
        assert proxy.counters.connections == pubsub_mod.CHANNELS
    assert dest.acked == len(sent)


@pytest.mark.parametrize("ordering", [False, True], ids=["unordered", "ordered"])
def test_connections_reset_while_a_full_window_is_in_flight(
    ordering: bool,
    pstest_server: PstestServer,
    monkeypatch: pytest.MonkeyPatch,
    destinations,
    pubsub_topic: PubSubTopic,
) -> None:
    """Every connection reset at the far end of a 100 ms link while the whole window is unacknowledged: every
    request in flight is retried, each message counted once as acknowledged, per-key order kept."""
    from tests.bench.delay_proxy import DelayProxy

    with DelayProxy(pstest_server.addr, 50) as proxy:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.addr)
        monkeypatch.setattr(pubsub_mod, "BATCH_MAX_MESSAGES", 50)
        dest = destinations(pubsub_topic.settings(ordering=ordering), retry_budget_s=30)
        dest.open()
        sent = operations(400, 15)
        send_in_chunks(dest, sent, chunk=1000)
        deadline = time.monotonic() + 15
        while dest._window.in_flight < dest._window.limit and time.monotonic() < deadline:
            time.sleep(0.002)
        in_flight = dest._window.in_flight
        assert in_flight >= pubsub_mod.INITIAL_WINDOW, "the window never filled"
        assert proxy.reset() >= 1
        dest.flush()
    assert dest.acked == len(sent)
    pulled = pubsub_topic.pull(expected=len(sent))
    assert {p.data for p in pulled} == {m[DATA] for m in sent}
    if ordering:
        assert_in_order_per_user_point(pulled)
