"""google-pubsub end to end through the dmrepl command line, against Google's pstest over sockets.

Nothing is mocked: dmrepl runs in-process through its Typer app (`cli`) or as a real process, publishes to a pstest
server with the real client library, and every message is read back with a real SubscriberClient. Where a test
needs an independent oracle it gets one from outside dmrepl: `tests/generate.py` works out the expected operations
without dmrepl's transform, a `file` replication in the same run records the order dmrepl emitted them in, pstest
numbers message ids in arrival order (so it tells us the order the *server* saw), and the ordering-key bucket is
recomputed here from its documented formula rather than imported.

Every test has its own topics on the session server (or a private server), so `pytest -n 2` is safe.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dmrepl.registry import Registry
from tests import generate
from tests.conftest import spawn_dmrepl
from tests.peers.fixtures_pubsub import PROJECT, PubSubTopic
from tests.peers.pubsub import (
    PstestServer,
    Pulled,
    TcpProxy,
    create_subscription,
    create_topic,
    delete_topic,
    make_service_account,
    pstest,
    unique_id,
)
from tests.peers.token_server import TokenServer

OpKey = tuple[str, str, str]

#: With PUBSUB_EMULATOR_HOST the token step is skipped, so the key's token_uri is never called.
UNUSED_TOKEN_URI = "https://oauth2.googleapis.com/token"
#: Documented in dmrepl/destinations/pubsub.py and the README: 64 buckets, `b<crc32(upid) mod 64>`.
DOCUMENTED_BUCKETS = 64
#: ~65,000 operations: with `--checkpoint-every 0.1` a sync into Pub/Sub + file runs ~4 s, and its first message
#: reaches the server after ~0.7 s (mostly interpreter start-up), which leaves seconds to act mid-sync.
MID_SYNC_USERS = 5_000
#: Messages per pull from pstest (see Collector).
PULL_BATCH = 25_000


# ------------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Key:
    """A service-account key file written for one test, and what is needed to look for it in output."""

    path: Path
    pem: str
    kid: str
    email: str


def write_key(directory: Path, token_uri: str = UNUSED_TOKEN_URI, name: str = "credentials.json") -> Key:
    """A fresh RSA key per test, so a leak found in one test cannot come from another."""
    kid = uuid.uuid4().hex
    info, pem = make_service_account(token_uri, kid)
    path = directory / name
    path.write_text(json.dumps(info, indent=2))
    return Key(path, pem, kid, info["client_email"])


def documented_bucket(user_point_id: str) -> str:
    """Recomputed from the documentation, not imported: if dmrepl's formula drifts, the test notices."""
    return f"b{zlib.crc32(user_point_id.encode('utf-8')) % DOCUMENTED_BUCKETS}"


def op_key(data: bytes) -> OpKey:
    doc = json.loads(data)
    return doc["doc_type"], doc["doc_id"], doc["op"]


def user_point_of(data: bytes) -> str:
    return str(json.loads(data)["doc_id"]).split(":", 1)[0]


def file_lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def ops_by_line(n_users: int) -> list[list[OpKey]]:
    """The expected operations of each export line (index 0 = line 1), from the generator, not from dmrepl."""
    return [exp for _, exp in generate.lines(n_users)]


def key_lines(pem: str) -> list[str]:
    """The base64 body lines of a PEM: what a leak of the key (raw or JSON-escaped) necessarily contains."""
    return [line for line in pem.splitlines() if line and "PRIVATE KEY" not in line]


def leaked(text: str | bytes, pems: Iterable[str]) -> bool:
    blob = text.encode() if isinstance(text, str) else text
    return any(line.encode() in blob for pem in pems for line in key_lines(pem))


def assert_no_key_material(outputs: Iterable[str], home: Path, pems: Iterable[str]) -> None:
    """Search every output and every file under the dmrepl home except the opt-in secret store."""
    pems = list(pems)
    assert pems and all(key_lines(p) for p in pems)
    for i, text in enumerate(outputs):
        assert not leaked(text, pems), f"private key material in output #{i}"
    store = home / "secrets"
    scanned = 0
    for path in home.rglob("*"):
        if path.is_file() and store not in path.parents:
            scanned += 1
            assert not leaked(path.read_bytes(), pems), f"private key material in {path}"
    assert scanned, f"nothing under {home} was scanned"


def rep_id(cli: Any, name: str) -> str:
    return str(json.loads(cli("--json", "show", name).stdout)["id"])


def create_pubsub(cli: Any, name: str, key: Key, topic_id: str, *extra: object, expect: int | None = 0) -> Any:
    return cli(
        "--json",
        "create",
        "--type",
        "google-pubsub",
        "--name",
        name,
        "--credentials",
        key.path,
        "--topic-id",
        topic_id,
        *extra,
        expect=expect,
    )


def create_file(cli: Any, name: str, path: Path) -> None:
    cli("create", "--type", "file", "--name", name, "--path", path)
    cli("activate", name)


def error_of(stderr: str) -> dict[str, Any]:
    """The one JSON error document `--json` prints on stderr."""
    return json.loads(stderr.strip().splitlines()[-1])["error"]


def steps_of(doc: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["name"], s["status"]) for s in doc]


def wait_until_checkpointed(proc: subprocess.Popen[str], replication_id: str, timeout: float = 60) -> None:
    """Wait until the running sync has recorded some operations as delivered to the replication (a checkpoint
    after the server acknowledged them), so a failure injected now has a non-empty past to be checked against."""
    deadline = time.monotonic() + timeout
    while True:
        executions = Registry().load().to_dict()["executions"].values()  # atomic replaces: safe to read while it runs
        if any(e["replications"].get(replication_id, {}).get("delivered", 0) > 0 for e in executions):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            _, err = proc.communicate()
            pytest.fail(f"the sync recorded no delivery while it ran (exit {proc.returncode}): {err}")
        time.sleep(0.02)


class Collector:
    """Pulls and acks one subscription with the real SubscriberClient, keeping every distinct message by id.

    Pulls ask pstest to return at once (`return_immediately`), so the empty pull that ends a drain does not wait
    pstest's 500 ms. They also ask for far more than
    Pub/Sub's 1,000 (pstest has no cap), over a channel without gRPC's 4 MB receive limit: pstest walks every
    message of the subscription on each pull, so 1,000 at a time makes draining 150,000 messages take half a minute.
    """

    def __init__(self, addr: str, project: str, subscription_id: str) -> None:
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

        channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", -1)])
        self.client = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
        self.path = f"projects/{project}/subscriptions/{subscription_id}"
        self.seen: dict[str, Pulled] = {}

    @classmethod
    def of(cls, topic: PubSubTopic) -> Collector:
        return cls(topic.addr, topic.project_id, topic.subscription_id)

    def pull_once(self) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            resp = self.client.pull(
                request={"subscription": self.path, "max_messages": PULL_BATCH, "return_immediately": True}, timeout=30
            )
        received = type(resp).pb(resp).received_messages  # the raw protobuf: proto-plus costs ~50 µs a message
        for rm in received:
            m = rm.message
            self.seen.setdefault(m.message_id, Pulled(m.message_id, m.data, dict(m.attributes), m.ordering_key))
        if received:
            self.client.acknowledge(
                request={"subscription": self.path, "ack_ids": [rm.ack_id for rm in received]}, timeout=30
            )
        return len(received)

    def drain(self) -> list[Pulled]:
        """Everything left; call once nothing publishes any more. Sorted by pstest's arrival number."""
        while self.pull_once():
            pass
        return sorted(self.seen.values(), key=lambda p: p.seq)

    def close(self) -> None:
        self.client.close()


@pytest.fixture(params=[1, 2], ids=["in-process", "2-workers"])
def sync_workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The in-process engine, and worker processes (each with Pub/Sub publishers of its own), forced even for these
    small exports through the documented DMREPL_SYNC_WORKERS (inherited by dmrepl subprocesses too)."""
    monkeypatch.setenv("DMREPL_SYNC_WORKERS", str(request.param))
    return int(request.param)


@pytest.fixture
def shard_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The worker counts of the in-process syncs that ran on worker processes: proves a "2-workers" case really
    used them (a spy only: the engine is unchanged)."""
    from dmrepl.sync import coordinator

    runs: list[int] = []
    real = coordinator.WorkerPool

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            runs.append(int(kwargs["workers"]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(coordinator, "WorkerPool", Spy)
    return runs


def child_pids(pid: int) -> list[int]:
    """The live children of a process (Linux /proc), to prove a dmrepl subprocess runs worker processes."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in children.read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


@pytest.fixture
def home(isolated: Path) -> Path:
    return isolated


@pytest.fixture
def mid_sync_export(tmp_path: Path) -> tuple[Path, Counter[OpKey]]:
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, MID_SYNC_USERS)
    return export, expected


# --------------------------------------------------------------------------------------- §3, §5: activation


def test_create_and_activate_on_the_emulator(
    cli: Any, datamart: str, pubsub_emulator: str, pubsub_topic: PubSubTopic, tmp_path: Path, home: Path
) -> None:
    """The happy path an operator takes first: create PAUSED, activate runs the check, ACTIVE."""
    key = write_key(tmp_path)
    created = json.loads(create_pubsub(cli, "ps", key, pubsub_topic.topic_id).stdout)
    assert created["status"] == "PAUSED"
    assert created["settings"] == {"project_id": PROJECT, "topic_id": pubsub_topic.topic_id, "ordering": True}
    activated = cli("--json", "activate", "ps")
    doc = json.loads(activated.stdout)
    assert doc["status"] == "ACTIVE"
    assert steps_of(doc["check"]) == [
        ("credentials", "ok"),
        ("token", "skipped"),
        ("topic", "ok"),
        ("publish-permission", "skipped"),
    ]
    shown = json.loads(cli("--json", "show", "ps").stdout)
    assert shown["status"] == "ACTIVE" and shown["last_check"]["ok"] is True
    assert [(h.get("from"), h["to"]) for h in shown["history"]] == [(None, "PAUSED"), ("PAUSED", "ACTIVE")]
    assert_no_key_material([activated.stdout, activated.stderr, json.dumps(created)], home, [key.pem])


def test_activate_missing_topic_stays_paused(
    cli: Any, datamart: str, pubsub_emulator: str, tmp_path: Path, home: Path
) -> None:
    missing = unique_id("missing")
    key = write_key(tmp_path)
    create_pubsub(cli, "ps", key, missing)
    failed = cli("--json", "activate", "ps", expect=5)
    error = error_of(failed.stderr)
    assert error["exit_code"] == 5
    assert steps_of(error["details"]) == [
        ("credentials", "ok"),
        ("token", "skipped"),
        ("topic", "failed"),
        ("publish-permission", "skipped"),
    ]
    topic_step = error["details"][2]
    assert topic_step["code"] == "TOPIC_NOT_FOUND"
    assert f"projects/{PROJECT}/topics/{missing}" in topic_step["detail"]
    assert f"gcloud pubsub topics create {missing}" in topic_step["fix"]
    human = cli("activate", "ps", expect=5).stderr  # what an operator at a terminal reads
    assert "topic" in human and "FAILED" in human and "TOPIC_NOT_FOUND" in human and "stays PAUSED" in human
    shown = json.loads(cli("--json", "show", "ps").stdout)
    assert shown["status"] == "PAUSED"
    last = shown["last_check"]
    assert last["ok"] is False and last["at"]
    assert [(s["name"], s["status"], s.get("code")) for s in last["steps"]][2] == ("topic", "failed", "TOPIC_NOT_FOUND")
    assert [h["to"] for h in shown["history"]] == ["PAUSED"]
    assert_no_key_material([failed.stderr, human], home, [key.pem])


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_activate_unreachable_endpoint_fails_within_the_timeout(
    kind: str,
    cli: Any,
    run_dmrepl: Any,
    datamart: str,
    closed_port: int,
    silent_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timed as a shell sees it (a whole process): `--timeout 2` must bound a refused and a hung endpoint alike.

    With the default 20 s a refused port would take the check's 5 s retry window, and a silent one 20 s: both exceed
    the step duration asserted here (and the silent one the wall time), so an ignored `--timeout` fails the test.
    """
    port = closed_port if kind == "closed" else silent_port
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    key = write_key(tmp_path)
    create_pubsub(cli, "ps", key, "some-topic")  # offline: no connection before activate
    timeout = 2.0
    start = time.monotonic()
    proc = run_dmrepl("--json", "activate", "ps", "--timeout", timeout, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 5, proc.stderr
    assert elapsed < timeout + 3, f"{elapsed:.1f} s for --timeout {timeout}"  # + interpreter start-up under load
    error = error_of(proc.stderr)
    topic_step = error["details"][2]
    assert (topic_step["name"], topic_step["status"], topic_step["code"]) == ("topic", "failed", "UNREACHABLE")
    assert topic_step["duration_ms"] <= timeout * 1000 + 500
    assert f"127.0.0.1:{port}" in topic_step["detail"] + topic_step["fix"]
    assert json.loads(cli("--json", "show", "ps").stdout)["status"] == "PAUSED"


def test_activate_with_unknown_key_is_auth_failed(
    cli: Any,
    datamart: str,
    pstest_server: PstestServer,
    pubsub_topic: PubSubTopic,
    token_server: TokenServer,
    tmp_path: Path,
    home: Path,
) -> None:
    """No emulator: the key is exchanged at its token_uri (a real RS256 verifier) and the topic reached through
    `--endpoint`. An unknown key id (a deleted key) is AUTH_FAILED at the token step; once the same key is known,
    the very same replication activates, so the failure is the key's and nothing else's."""
    assert "PUBSUB_EMULATOR_HOST" not in os.environ
    key = write_key(tmp_path, token_server.url)
    create_pubsub(cli, "ps", key, pubsub_topic.topic_id, "--endpoint", pstest_server.addr)
    failed = cli("--json", "activate", "ps", expect=5)
    error = error_of(failed.stderr)
    assert steps_of(error["details"]) == [
        ("credentials", "ok"),
        ("token", "failed"),
        ("topic", "skipped"),
        ("publish-permission", "skipped"),
    ]
    token = error["details"][1]
    assert token["code"] == "AUTH_FAILED"
    assert "Invalid JWT Signature" in token["detail"]
    assert key.email in token["fix"] and "dmrepl recreate" in token["fix"]
    assert [(r.status, r.error, r.kid) for r in token_server.requests] == [(400, "invalid_grant", key.kid)]
    assert json.loads(cli("--json", "show", "ps").stdout)["status"] == "PAUSED"

    token_server.register(key.kid, key.pem)
    ok = json.loads(cli("--json", "activate", "ps").stdout)
    assert ok["status"] == "ACTIVE"
    assert steps_of(ok["check"])[:3] == [("credentials", "ok"), ("token", "ok"), ("topic", "ok")]
    assert_no_key_material([failed.stdout, failed.stderr, json.dumps(ok)], home, [key.pem])


@pytest.mark.parametrize("store", ["keyring", "file"])
def test_create_check_failing_saves_nothing(
    store: str, cli: Any, datamart: str, pubsub_emulator: str, tmp_path: Path, home: Path
) -> None:
    """Neither the registry nor the secret store (keyring or opt-in files) keeps anything from a failed
    `create --check`; the same command passes once the topic exists, proving the check was what refused it."""
    topic_id = unique_id("later")
    key = write_key(tmp_path)
    keyring_file = Path(os.environ["DMREPL_TEST_KEYRING"])

    def stored_secrets() -> list[str]:
        in_keyring = list(json.loads(keyring_file.read_text() or "{}")) if keyring_file.exists() else []
        in_files = [p.name for p in (home / "secrets").iterdir()] if (home / "secrets").exists() else []
        return in_keyring + in_files

    failed = create_pubsub(cli, "ps", key, topic_id, "--check", "--secret-store", store, expect=5)
    error = error_of(failed.stderr)
    assert "nothing was saved" in error["message"]
    assert error["details"][2]["code"] == "TOPIC_NOT_FOUND"
    assert json.loads(cli("--json", "list").stdout) == []
    assert stored_secrets() == []

    create_topic(pubsub_emulator, PROJECT, topic_id)
    created = json.loads(create_pubsub(cli, "ps", key, topic_id, "--check", "--secret-store", store).stdout)
    assert created["status"] == "PAUSED" and created["last_check"]["ok"] is True
    assert created["credentials"]["store"] == store
    assert [r["name"] for r in json.loads(cli("--json", "list").stdout)] == ["ps"]
    assert len(stored_secrets()) == 1


# ------------------------------------------------------------------------------------------ §6, §7: delivery


@pytest.mark.parametrize("ordering", [True, False], ids=["ordering", "no-ordering"])
def test_sync_into_pubsub_matches_the_file_replication(
    ordering: bool,
    sync_workers: int,
    shard_runs: list[int],
    cli: Any,
    datamart: str,
    pubsub_emulator: str,
    pubsub_topic: PubSubTopic,
    tmp_path: Path,
    home: Path,
) -> None:
    """One `sync start` into a google-pubsub and a file replication: Pub/Sub gets exactly the generator's expected
    operations, byte for byte what the file got, with the documented attributes and ordering keys; with ordering on,
    each user point's operations reached the server in the order dmrepl emitted them (the file's order). With worker
    processes a user point's operations are converted and published by one worker, so the same must hold."""
    export = tmp_path / "export.ndjson"
    expected, bad = generate.write(export, 2000, bad_every=250)
    total = sum(expected.values())
    key = write_key(tmp_path)
    create_pubsub(cli, "ps", key, pubsub_topic.topic_id, "--ordering" if ordering else "--no-ordering")
    cli("activate", "ps")
    out = tmp_path / "file.ndjson"
    create_file(cli, "local", out)

    run = cli("--json", "sync", "start", export)
    result = json.loads(run.stdout)
    assert result["status"] == "SUCCEEDED" and result["rejects"] == len(bad)
    by_name = {r["name"]: r for r in result["replications"].values()}
    assert by_name["ps"]["delivered"] == by_name["local"]["delivered"] == total
    assert by_name["ps"]["failed"] == 0
    assert shard_runs == ([sync_workers] if sync_workers > 1 else [])

    collector = Collector.of(pubsub_topic)
    try:
        pulled = collector.drain()
    finally:
        collector.close()
    lines = file_lines(out)
    assert Counter(op_key(p.data) for p in pulled) == expected  # exactly once each: no loss, no duplicate
    assert Counter(p.data for p in pulled) == Counter(lines)
    wrong_attributes = [p for p in pulled if (p.attributes["doc_type"], p.attributes["op"]) != op_key(p.data)[::2]]
    assert not wrong_attributes, wrong_attributes[:3]
    if not ordering:
        assert {p.ordering_key for p in pulled} == {""}
    else:
        wrong_keys = [p for p in pulled if p.ordering_key != documented_bucket(user_point_of(p.data))]
        assert not wrong_keys, wrong_keys[:3]
        assert len({p.ordering_key for p in pulled}) == DOCUMENTED_BUCKETS  # 2000 user points fill every bucket
        emitted: dict[str, list[bytes]] = defaultdict(list)
        for line in lines:
            emitted[user_point_of(line)].append(line)
        arrived: dict[str, list[bytes]] = defaultdict(list)
        for p in pulled:  # sorted by pstest's arrival number
            arrived[user_point_of(p.data)].append(p.data)
        reordered = [u for u in emitted if arrived[u] != emitted[u]]
        assert not reordered, f"{len(reordered)} user points arrived out of order, e.g. {reordered[0]}"
    assert_no_key_material([run.stdout, run.stderr], home, [key.pem])


def test_topic_deleted_mid_sync(
    sync_workers: int,
    cli: Any,
    datamart: str,
    pubsub_emulator: str,
    pubsub_topic: PubSubTopic,
    mid_sync_export: tuple[Path, Counter[OpKey]],
    tmp_path: Path,
    home: Path,
) -> None:
    """The topic disappears while the sync publishes: that replication goes to ERROR at once (TOPIC_NOT_FOUND is
    not retried), the file replication beside it still gets every operation, the run is FAILED with exit 7, and
    what Pub/Sub missed is counted in the execution and in the replication's error.

    What was counted delivered must really be on the server: the subscription (which outlives its topic in pstest)
    is drained and must hold every operation of the lines up to the replication's checkpoint, and nothing else."""
    export, expected = mid_sync_export
    total = sum(expected.values())
    key = write_key(tmp_path)
    create_pubsub(cli, "ps", key, pubsub_topic.topic_id)
    cli("activate", "ps")
    ps_id = rep_id(cli, "ps")
    out = tmp_path / "file.ndjson"
    create_file(cli, "local", out)

    collector = Collector.of(pubsub_topic)
    try:
        proc = spawn_dmrepl("--json", "sync", "start", export, "--checkpoint-every", "0.1")
        wait_until_checkpointed(proc, ps_id)
        assert len(child_pids(proc.pid)) >= (sync_workers if sync_workers > 1 else 0)
        assert proc.poll() is None, "the sync ended before the topic could be deleted: use a bigger export"
        delete_topic(pubsub_topic.addr, PROJECT, pubsub_topic.topic_id)
        stdout, stderr = proc.communicate(timeout=120)
        pulled = collector.drain()
    finally:
        collector.close()

    assert proc.returncode == 7, stderr
    error = error_of(stderr)
    assert error["code"] == "REPLICATION_ERROR" and "TOPIC_NOT_FOUND" in error["message"]
    assert Counter(op_key(line) for line in file_lines(out)) == expected
    result = json.loads(stdout)
    assert result["status"] == "FAILED"
    by_name = {r["name"]: r for r in result["replications"].values()}
    assert (by_name["local"]["status"], by_name["local"]["delivered"], by_name["local"]["failed"]) == ("OK", total, 0)
    ps = by_name["ps"]
    assert ps["status"] == "ERROR" and ps["error"]["code"] == "TOPIC_NOT_FOUND"
    assert ps["delivered"] > 0 and ps["failed"] > 0 and ps["delivered"] + ps["failed"] == total
    shown = json.loads(cli("--json", "show", "ps").stdout)
    assert shown["status"] == "ERROR"
    assert shown["error"]["code"] == "TOPIC_NOT_FOUND" and pubsub_topic.topic_id in shown["error"]["message"]
    assert shown["error"]["undelivered"] == ps["failed"]
    recorded = json.loads(cli("--json", "sync", "show", result["id"]).stdout)
    assert recorded["status"] == "FAILED" and recorded["replications"][ps_id]["failed"] == ps["failed"]

    checkpoint = json.loads((home / "executions" / result["id"] / "checkpoint.json").read_text())
    acked_lines = checkpoint["reps"][ps_id]["pos"][2]
    claimed = Counter(op for ops in ops_by_line(MID_SYNC_USERS)[:acked_lines] for op in ops)
    on_server = Counter(op_key(p.data) for p in pulled)
    assert not (claimed - on_server), "operations counted as delivered are missing from the server"
    assert not (on_server - expected), "the server holds operations that were not expected, or duplicates"
    # `delivered` counts what the service acknowledged up to the failure, which may run past the last checkpoint
    # (a resume re-sends from the checkpoint): never less than the checkpoint claims, never more than the server has.
    assert sum(claimed.values()) <= ps["delivered"] <= sum(on_server.values())
    assert_no_key_material([stdout, stderr, json.dumps(shown)], home, [key.pem])


@pytest.fixture
def replacement_pstest() -> Iterator[PstestServer]:
    """The server that takes over after `pstest_private` is killed."""
    with pstest() as server:
        yield server


def test_server_killed_mid_sync_then_recreate_and_resume(
    sync_workers: int,
    cli: Any,
    datamart: str,
    pstest_private: PstestServer,
    replacement_pstest: PstestServer,
    make_pubsub_topic: Any,
    token_server: TokenServer,
    mid_sync_export: tuple[Path, Counter[OpKey]],
    tmp_path: Path,
    home: Path,
) -> None:
    """The Pub/Sub server dies mid-sync: ERROR UNREACHABLE after `--retry-budget 2`, exit 7; the operator points
    the replication at a new server (`recreate --endpoint`, the topic re-created there), activates it, and
    `sync resume` delivers the rest. Every expected operation must then be on one server or the other.

    Making the union checkable: a dead server cannot be pulled from, and pulling from it while it runs would always
    miss what arrived between the last pull and the kill. So dmrepl reaches the old server through a TCP proxy (its
    `--endpoint`): mid-sync the proxy resets every connection and refuses new ones, which freezes the server's
    content; the test then drains it completely, and only then SIGKILLs it and closes the proxy port. dmrepl sees
    what a crash shows (connections reset, then refused) and gives up after its retry budget; the test knows exactly
    what the old server acknowledged. That lets it check the execution record too: the lines up to the Pub/Sub
    replication's checkpoint were all on the old server, and the resume delivered exactly the lines after it.

    No emulator variable: the key is exchanged at the token endpoint, so the rebind is a real settings change.
    A file replication runs alongside; it completes in the first run and must get nothing more from the resume
    (which, the two replications standing at different positions, runs in-process even when the first run had
    worker processes).
    """
    export, expected = mid_sync_export
    total = sum(expected.values())
    key = write_key(tmp_path, token_server.url)
    token_server.register(key.kid, key.pem)
    old_topic = make_pubsub_topic(pstest_private)
    proxy = TcpProxy(pstest_private.addr)
    try:
        create_pubsub(cli, "ps", key, old_topic.topic_id, "--endpoint", proxy.addr)
        cli("activate", "ps")
        ps_id = rep_id(cli, "ps")
        out = tmp_path / "file.ndjson"
        create_file(cli, "local", out)

        old = Collector.of(old_topic)
        try:
            proc = spawn_dmrepl("--json", "sync", "start", export, "--checkpoint-every", "0.1", "--retry-budget", "2")
            wait_until_checkpointed(proc, ps_id)
            assert len(child_pids(proc.pid)) >= (sync_workers if sync_workers > 1 else 0)
            assert proc.poll() is None, "the sync ended before the server could be killed: use a bigger export"
            proxy.block()
            time.sleep(0.3)  # a request the server had fully read before the reset is processed meanwhile
            old_pulled = old.drain()
        finally:
            old.close()
        assert proc.poll() is None, "dmrepl gave up before the server was killed"
        pstest_private.kill()
    finally:
        proxy.close()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 7, stderr
    first = json.loads(stdout)
    exec_id = first["id"]
    ps = first["replications"][ps_id]
    assert ps["status"] == "ERROR" and ps["error"]["code"] == "UNREACHABLE"
    assert "retry budget of 2 s" in ps["error"]["message"]
    assert ps["delivered"] > 0 and ps["failed"] > 0 and ps["delivered"] + ps["failed"] == total
    assert Counter(op_key(line) for line in file_lines(out)) == expected
    shown = json.loads(cli("--json", "show", "ps").stdout)
    assert shown["status"] == "ERROR" and shown["error"]["undelivered"] == ps["failed"]
    cli("activate", "ps", expect=6)  # ERROR is left only by recreate

    checkpoint = json.loads((home / "executions" / exec_id / "checkpoint.json").read_text())
    acked_lines = checkpoint["reps"][ps_id]["pos"][2]
    per_line = ops_by_line(MID_SYNC_USERS)
    before = Counter(op for ops in per_line[:acked_lines] for op in ops)
    after = Counter(op for ops in per_line[acked_lines:] for op in ops)
    assert sum(before.values()) == ps["delivered"]
    on_old = Counter(op_key(p.data) for p in old_pulled)
    assert not (before - on_old), "operations counted as delivered are missing from the old server"

    create_topic(replacement_pstest.addr, PROJECT, old_topic.topic_id)
    new_sub = unique_id("sub")
    create_subscription(replacement_pstest.addr, PROJECT, old_topic.topic_id, new_sub)
    rebound = json.loads(cli("--json", "recreate", "ps", "--endpoint", replacement_pstest.addr).stdout)
    assert rebound["status"] == "PAUSED" and rebound["settings"]["endpoint"] == replacement_pstest.addr
    assert rebound["past_errors"][-1]["code"] == "UNREACHABLE"
    cli("activate", "ps")
    resumed = cli("--json", "sync", "resume", exec_id)
    final = json.loads(resumed.stdout)
    assert final["status"] == "SUCCEEDED"
    caught_up = final["replications"][ps_id]
    assert (caught_up["status"], caught_up["delivered"], caught_up["failed"]) == ("OK", total, 0)
    assert caught_up["error"] is None  # the first run's error was about the old binding

    new = Collector(replacement_pstest.addr, PROJECT, new_sub)
    try:
        on_new = Counter(op_key(p.data) for p in new.drain())
    finally:
        new.close()
    assert on_new == after, "the resume must send exactly the lines after the replication's checkpoint"
    assert not (on_old - expected), "the old server holds unexpected operations, or duplicates"
    assert set(on_old) | set(on_new) == set(expected)  # every operation at least once across both servers
    assert Counter(op_key(line) for line in file_lines(out)) == expected  # the file got nothing twice
    assert_no_key_material([stdout, stderr, resumed.stdout, resumed.stderr], home, [key.pem])


# ---------------------------------------------------------------------------------------------- §10: secrets


def test_private_key_never_leaves_the_secret_store(
    cli: Any,
    run_dmrepl: Any,
    datamart: str,
    pstest_server: PstestServer,
    token_server: TokenServer,
    tmp_path: Path,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every command that handles a key, on success and on failure, with tracebacks on: no line of either private
    key in any stdout/stderr, nor in any file under the dmrepl home but the opt-in secret store.

    The search is shown to work on the places where the keys must be (the 0600 secret file, the keyring), so a
    scanner that found nothing because it looked wrongly cannot pass.
    """
    monkeypatch.setenv("DMREPL_DEBUG", "1")
    topic_id = unique_id("topic")
    create_topic(pstest_server.addr, PROJECT, topic_id)
    good = write_key(tmp_path, token_server.url, "good.json")
    token_server.register(good.kid, good.pem)
    deleted = write_key(tmp_path, token_server.url, "deleted.json")  # never registered
    export = tmp_path / "export.ndjson"
    generate.write(export, 200)
    endpoint = ("--endpoint", pstest_server.addr)
    outputs: list[str] = []

    def dmrepl(*args: object, expect: int) -> None:
        """Commands that talk to a server run as real processes, so output from the C gRPC core is searched too."""
        proc = run_dmrepl(*args, timeout=60)
        outputs.extend((proc.stdout, proc.stderr))
        assert proc.returncode == expect, f"dmrepl {args}: {proc.returncode}\n{proc.stderr}"

    def offline(*args: object) -> None:
        result = cli(*args)
        outputs.extend((result.stdout, result.stderr))

    base = ("create", "--type", "google-pubsub", "--topic-id", topic_id, *endpoint)
    dmrepl(*base, "--name", "bad-sa", "--credentials", deleted.path, "--check", expect=5)
    offline("--json", *base, "--name", "bad-sa", "--credentials", deleted.path)
    dmrepl("-v", "activate", "bad-sa", expect=5)
    dmrepl("--json", "check", "bad-sa", expect=5)
    dmrepl(*base, "--name", "good-sa", "--credentials", good.path, "--check", "--secret-store", "file", expect=0)
    dmrepl("activate", "good-sa", expect=0)
    dmrepl("recreate", "bad-sa", "--credentials", deleted.path, expect=5)
    create_file(cli, "local", tmp_path / "file.ndjson")
    token_server.revoke(good.kid)  # the key is deleted while the replication is ACTIVE
    dmrepl("-v", "--json", "sync", "start", export, "--retry-budget", "1", expect=7)
    for name in ("good-sa", "bad-sa"):
        for json_flag in ((), ("--json",)):
            offline(*json_flag, "show", name)
            offline(*json_flag, "history", name)
        offline("support-bundle", name)
    offline("list")
    offline("--json", "sync", "list")

    shown = json.loads(cli("--json", "show", "good-sa").stdout)
    assert shown["status"] == "ERROR" and shown["error"]["code"] == "AUTH_FAILED"
    assert any(r.status == 400 and r.kid == good.kid for r in token_server.requests)
    store = home / "secrets"
    (secret_file,) = store.iterdir()
    assert leaked(secret_file.read_bytes(), [good.pem]) and secret_file.stat().st_mode & 0o777 == 0o600
    assert leaked(Path(os.environ["DMREPL_TEST_KEYRING"]).read_bytes(), [deleted.pem])
    assert_no_key_material(outputs, home, [good.pem, deleted.pem])
