"""`azure-event-hubs` end to end: the dmrepl CLI against the real AMQP 1.0 peer, over sockets, no mocks.

The destination tests prove `EventHubsDestination` on its own; these prove what an operator sees: `create` →
`activate` → `sync start` / `sync resume` → `recreate`, with the registry, execution records, rejects file and exit
codes that come out of it, and that the peer received exactly the operations a `file` replication running alongside
wrote (same bytes, same per-user-point order, one partition per user point).

Faults are injected while the sync runs: the sync is then a real process (`python -m dmrepl`) and the peer a thread
of the test, so a watcher can act on the peer's own transfer count. Every flow ends by searching everything dmrepl
printed and wrote under DMREPL_HOME for the secrets it was given.

Each test has its own peer on an ephemeral port and its own home and keyring (conftest), so the file runs under
`pytest -n 2`.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import stat
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from tests import generate
from tests.conftest import Cli, spawn_dmrepl
from tests.factories import sas_key
from tests.peers.eventhubs import EventHubsPeer, RecordedEvent, unique

pytest.importorskip("azure.eventhub")

HUB = "hub1"
USERS = 2000
#: The fault tests replay a smaller export (decoding what the peer recorded costs ~0.1 ms an event) into a hub with a
#: small link limit: ~100 transfers (instead of 4 at 1 MiB), so a fault injected after a few of them lands well inside
#: the sync rather than racing its end.
FAULT_USERS = 600
FAULT_PEER_MAX_MESSAGE_SIZE = 32 * 1024
FAULT_AFTER_TRANSFERS = 3
REVOKE_AFTER_TRANSFERS = 30
CHECK_STEPS = ["connection-string", "cbs-auth", "event-hub"]

Key = tuple[str, str, str]


# -- helpers -----------------------------------------------------------------------------------------------------------


class Transcript:
    """Runs dmrepl (in-process through the `cli` fixture, or as a real process) and keeps everything it printed, so a
    test can end by proving that no secret was ever printed."""

    def __init__(self, cli: Cli) -> None:
        self.cli = cli
        self.printed: list[str] = []

    def __call__(self, *args: Any, expect: int | None = 0) -> Any:
        result = self.cli(*args, expect=expect)
        self.printed += [result.stdout, result.stderr]
        return result

    def json(self, *args: Any) -> Any:
        return json.loads(self("--json", *args).stdout)

    def spawn(self, *args: Any) -> subprocess.Popen[str]:
        """dmrepl as its own process (inheriting the test's DMREPL_HOME, keyring and PYTHONPATH)."""
        return spawn_dmrepl(*args)

    def finish(self, proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(f"dmrepl did not finish within {timeout} s\nstderr: {stderr[-3000:]}") from None
        self.printed += [stdout, stderr]
        return proc.returncode, stdout, stderr

    def assert_no_secret(
        self, secrets: Iterable[str], *, store: Path | None = None, held: Iterable[str] | None = None
    ) -> None:
        """No secret (nor its URL- or JSON-escaped form) in any output, nor in any file under DMREPL_HOME but the
        secret store. The store (`store`, a file store under the home, else the test keyring) must hold `held` (by
        default every secret): a positive control showing that the secrets are really there to be leaked."""
        secrets = list(secrets)
        home = Path(os.environ["DMREPL_HOME"])
        needles = {form for s in secrets for form in (s, quote_plus(s), json.dumps(s)[1:-1])}
        assert needles
        for text in self.printed:
            for needle in needles:
                if needle in text:
                    at = text.find(needle)
                    context = text[max(0, at - 200) : at + len(needle) + 100].replace(needle, "[THE SECRET]")
                    raise AssertionError(f"a secret was printed: ...{context}...")
        files = [p for p in home.rglob("*") if p.is_file() and (store is None or store not in p.parents)]
        assert any(p.name == "registry.toml" for p in files)
        for path in files:
            data = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in data, f"a secret was written to {path}"
        stored = (
            "".join(p.read_text() for p in store.iterdir())
            if store is not None
            else Path(os.environ["DMREPL_TEST_KEYRING"]).read_text()
        )
        assert all(s in stored for s in (secrets if held is None else held)), (
            "the secret store does not hold the secrets this test gave dmrepl"
        )


class OnTransfers(threading.Thread):
    """Runs `action` once the peer has accepted `after` transfers, noting that the sync process was still running:
    the proof that a fault really hit the sync mid-way."""

    def __init__(self, peer: EventHubsPeer, after: int, action: Callable[[], Any], proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True, name="fault-on-transfers")
        self.peer, self.after, self.action, self.proc = peer, after, action, proc
        self.fired = False
        self.sync_was_running = False
        self.transfers_at_fault = 0
        self.result: Any = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.peer.transfers() >= self.after:
                self.sync_was_running = self.proc.poll() is None
                self.result = self.action()
                self.transfers_at_fault = self.peer.transfers()
                self.fired = True
                return
            time.sleep(0.002)


def credentials(tmp_path: Path, conn_str: str, name: str = "credentials.txt") -> Path:
    path = tmp_path / name
    path.write_text(conn_str + "\n", encoding="utf-8")
    return path


def key_of(op: dict[str, Any]) -> Key:
    return op["doc_type"], op["doc_id"], op["op"]


def upid_of(body: bytes) -> str:
    return json.loads(body)["doc_id"].split(":", 1)[0]


def assert_replicated(peer: EventHubsPeer, out: Path, expected: Counter[Key]) -> list[RecordedEvent]:
    """The file replication holds exactly the expected operations; the hub holds, deduplicated, the same bytes, each
    event shaped as the README says and routed by its user point; per user point, the hub's order is the file's."""
    lines = out.read_bytes().splitlines()
    assert Counter(key_of(json.loads(line)) for line in lines) == expected
    assert len(set(lines)) == len(lines)
    events = unique(peer.events(HUB))
    assert sorted(e.body for e in events) == sorted(lines)
    partition_of = functools.cache(functools.partial(peer.partition_for_key, HUB))
    for ev in events:
        op = json.loads(ev.body)
        upid = op["doc_id"].split(":", 1)[0]
        assert ev.content_type == "application/json"
        assert ev.properties == {"doc_type": op["doc_type"], "op": op["op"]}
        assert ev.partition_key == upid
        assert ev.partition_id == partition_of(upid), f"{upid} routed to the wrong partition"
    by_key_file: dict[str, list[bytes]] = defaultdict(list)
    for line in lines:
        by_key_file[upid_of(line)].append(line)
    by_key_hub: dict[str, list[RecordedEvent]] = defaultdict(list)
    for ev in events:
        by_key_hub[ev.partition_key or ""].append(ev)
    assert by_key_hub.keys() == by_key_file.keys()
    for upid, evs in by_key_hub.items():
        assert len({e.partition_id for e in evs}) == 1, f"operations of {upid} spread over partitions"
        assert [e.body for e in evs] == by_key_file[upid], f"operations of {upid} not in the file's order"
    assert len({e.partition_id for e in events}) == 4
    return events


def file_keys(path: Path) -> Counter[Key]:
    return Counter(key_of(json.loads(line)) for line in path.read_bytes().splitlines())


def by_name(execution: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r | {"id": rid} for rid, r in execution["replications"].items()}


# -- fixtures ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def start_peer() -> Iterator[Callable[..., EventHubsPeer]]:
    """Peers of this test only (ephemeral ports), stopped at teardown."""
    peers: list[EventHubsPeer] = []

    def start(max_message_size: int = 1024 * 1024) -> EventHubsPeer:
        peers.append(EventHubsPeer(hubs={HUB: 4}, max_message_size=max_message_size).start())
        return peers[-1]

    yield start
    for peer in peers:
        peer.stop()


@pytest.fixture
def peer(start_peer: Callable[..., EventHubsPeer]) -> EventHubsPeer:
    """Hub `hub1`, 4 partitions, the service's 1 MiB limit."""
    return start_peer()


@pytest.fixture
def fault_peer(start_peer: Callable[..., EventHubsPeer]) -> EventHubsPeer:
    """The same hub with a 32 KiB link limit (see FAULT_PEER_MAX_MESSAGE_SIZE)."""
    return start_peer(FAULT_PEER_MAX_MESSAGE_SIZE)


@pytest.fixture
def session(cli: Cli) -> Transcript:
    return Transcript(cli)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter[Key]]:
    """2,000 generated user points (~26,000 operations, every doc type of a v202205 datamart), read-only."""
    path = tmp_path_factory.mktemp("export") / "userpoints.ndjson"
    expected, _ = generate.write(path, USERS)
    return path, expected


@pytest.fixture(scope="module")
def fault_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter[Key]]:
    """600 generated user points (~7,800 operations), read-only."""
    path = tmp_path_factory.mktemp("export") / "userpoints.ndjson"
    expected, _ = generate.write(path, FAULT_USERS, seed=5)
    return path, expected


def replications(
    session: Transcript, peer: EventHubsPeer, tmp_path: Path, conn_str: str | None = None
) -> tuple[str, Path]:
    """An ACTIVE azure-event-hubs replication `eh` and an ACTIVE file replication `local`; returns (eh's id, file)."""
    creds = credentials(tmp_path, conn_str or peer.connection_string("send", HUB))
    rep = session.json("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", creds)
    session("activate", "eh")
    out = tmp_path / "local.ndjson"
    session("create", "--type", "file", "--name", "local", "--path", out)
    session("activate", "local")
    return rep["id"], out


# -- connectivity check ------------------------------------------------------------------------------------------------


def test_create_then_activate_shows_the_three_steps_and_sends_nothing(
    session: Transcript, datamart: str, peer: EventHubsPeer, tmp_path: Path
) -> None:
    conn_str = peer.connection_string("send", HUB)
    created = session.json(
        "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", credentials(tmp_path, conn_str)
    )
    assert created["status"] == "PAUSED" and created["settings"]["event_hub"] == HUB
    assert created["credentials"]["fingerprint"]["shared_access_key_name"] == "send"

    shown = session("activate", "eh").stdout
    for step in CHECK_STEPS:
        assert re.search(rf"^{step}\s+ok\s+\d+ ms", shown, re.MULTILINE), shown
    assert "4 partitions (0, 1, 2, 3)" in shown and "eh (" in shown and "is ACTIVE" in shown

    rep = session.json("show", "eh")
    assert rep["status"] == "ACTIVE"
    assert rep["last_check"]["ok"] is True
    assert [(s["name"], s["status"]) for s in rep["last_check"]["steps"]] == [(s, "ok") for s in CHECK_STEPS]
    assert [(h.get("from"), h["to"]) for h in rep["history"]] == [(None, "PAUSED"), ("PAUSED", "ACTIVE")]
    assert peer.event_count() == 0 and peer.transfers() == 0  # a check never publishes
    session.assert_no_secret([conn_str, peer.policies["send"]])


def test_activate_with_a_wrong_key_fails_cbs_auth_quickly_and_stays_paused(
    session: Transcript, datamart: str, peer: EventHubsPeer, tmp_path: Path
) -> None:
    wrong = sas_key()
    conn_str = peer.connection_string("send", HUB, key=wrong)
    session("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", credentials(tmp_path, conn_str))
    start = time.monotonic()
    result = session("--json", "activate", "eh", expect=5)
    elapsed = time.monotonic() - start
    assert elapsed < 3, f"a refused key took {elapsed:.1f} s to report"  # not the SDK's ~13 s of retries

    error = json.loads(result.stderr)["error"]
    assert error["code"] == "CHECK_FAILED" and "cbs-auth" in error["message"] and "PAUSED" in error["message"]
    steps = {s["name"]: s for s in error["details"]}
    assert list(steps) == CHECK_STEPS
    assert steps["connection-string"]["status"] == "ok"
    assert (steps["cbs-auth"]["status"], steps["cbs-auth"]["code"]) == ("failed", "AUTH_FAILED")
    assert "recreate" in steps["cbs-auth"]["fix"]
    assert steps["event-hub"]["status"] == "skipped"

    human = session("activate", "eh", expect=5).stderr
    assert re.search(r"^cbs-auth\s+FAILED \(AUTH_FAILED\)", human, re.MULTILINE), human

    rep = session.json("show", "eh")
    assert rep["status"] == "PAUSED"
    assert rep["last_check"]["ok"] is False and rep["last_check"]["at"]
    recorded = {s["name"]: s for s in rep["last_check"]["steps"]}
    assert (recorded["cbs-auth"]["status"], recorded["cbs-auth"]["code"]) == ("failed", "AUTH_FAILED")
    assert all(h["to"] != "ACTIVE" for h in rep["history"])
    session.assert_no_secret([conn_str, wrong])


def test_activate_with_an_unknown_event_hub_fails_the_event_hub_step(
    session: Transcript, datamart: str, peer: EventHubsPeer, tmp_path: Path
) -> None:
    conn_str = peer.connection_string("send")  # no EntityPath: the hub comes from --event-hub
    creds = credentials(tmp_path, conn_str)
    session("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", creds, "--event-hub", "nope")
    error = json.loads(session("--json", "activate", "eh", expect=5).stderr)["error"]
    steps = {s["name"]: s for s in error["details"]}
    assert (steps["connection-string"]["status"], steps["cbs-auth"]["status"]) == ("ok", "ok")
    assert (steps["event-hub"]["status"], steps["event-hub"]["code"]) == ("failed", "EVENT_HUB_NOT_FOUND")
    assert "nope" in steps["event-hub"]["detail"] and "nope" in steps["event-hub"]["fix"]
    assert session.json("show", "eh")["status"] == "PAUSED"
    session.assert_no_secret([conn_str, peer.policies["send"]])


@pytest.mark.parametrize("defect", ["wrong-key", "unknown-hub"])
def test_create_with_a_failing_check_saves_nothing(
    session: Transcript, datamart: str, peer: EventHubsPeer, tmp_path: Path, defect: str
) -> None:
    wrong = sas_key()
    conn_str = peer.connection_string("send", key=wrong if defect == "wrong-key" else None)
    hub = "nope" if defect == "unknown-hub" else HUB
    args = ["create", "--type", "azure-event-hubs", "--name", "eh", "--event-hub", hub, "--check"]
    result = session(*args, "--credentials", credentials(tmp_path, conn_str), expect=5)
    assert "nothing was saved" in result.stderr
    assert session.json("list") == []
    keyring_file = Path(os.environ["DMREPL_TEST_KEYRING"])
    assert not keyring_file.exists() or json.loads(keyring_file.read_text() or "{}") == {}
    assert not (Path(os.environ["DMREPL_HOME"]) / "secrets").exists()

    # The same command with a binding that passes does save (so the checks above can tell the difference).
    good_conn = peer.connection_string("send")
    good = credentials(tmp_path, good_conn, "good.txt")
    saved = session.json(*args[:5], "--event-hub", HUB, "--check", "--credentials", good)
    assert saved["status"] == "PAUSED" and saved["last_check"]["ok"] is True
    assert [r["name"] for r in session.json("list")] == ["eh"]
    session.assert_no_secret([conn_str, wrong, good_conn], held=[good_conn])


# -- initial synchronization -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sync_into_event_hubs_and_a_file_delivers_the_same_operations_in_the_same_order(
    session: Transcript,
    datamart: str,
    peer: EventHubsPeer,
    tmp_path: Path,
    export: tuple[Path, Counter[Key]],
    workers: str,
) -> None:
    """With `--workers 2`, worker processes convert and deliver chunks of lines, each with its own Event Hubs
    connections: a user point is one line, so its operations must still reach one partition in order."""
    path, expected = export
    total = sum(expected.values())
    _, out = replications(session, peer, tmp_path)
    code, stdout, stderr = session.finish(session.spawn("--json", "sync", "start", path, "--workers", workers))
    assert code == 0, stderr
    execution = json.loads(stdout)
    assert execution["status"] == "SUCCEEDED" and sum(execution["operations"].values()) == total
    for name, rep in by_name(execution).items():
        assert (rep["delivered"], rep["failed"], rep["rejected"], rep["status"]) == (total, 0, 0, "OK"), name
    assert_replicated(peer, out, expected)
    assert peer.event_count(HUB) == total  # no fault, so not a single duplicate
    # Full batches per partition: ~26,000 events in tens of transfers, not one per user point or per operation.
    assert peer.transfers(HUB) < total // 100
    session.assert_no_secret([peer.connection_string("send", HUB), peer.policies["send"]])


@pytest.mark.parametrize("fault", ["reset", "close", "drop"])
def test_connection_lost_mid_sync_still_delivers_everything(
    session: Transcript,
    datamart: str,
    fault_peer: EventHubsPeer,
    tmp_path: Path,
    fault_export: tuple[Path, Counter[Key]],
    fault: str,
) -> None:
    """reset: the TCP connection carrying a transfer is reset (network fault); close: it gets an AMQP close
    `amqp:connection:forced` (service restart); drop: every connection, those of two worker processes, is reset at
    once, mid-sync. In each case the transfer caught in it is not recorded by the peer, so only a re-send can make the
    count whole."""
    peer = fault_peer
    path, expected = fault_export
    total = sum(expected.values())
    _, out = replications(session, peer, tmp_path)
    if fault != "drop":
        peer.fail_after_transfers(FAULT_AFTER_TRANSFERS, abrupt=fault == "reset")
    # drop: with worker processes, so that the connections of several processes are cut at once.
    workers = "2" if fault == "drop" else "1"
    proc = session.spawn(
        "--json", "sync", "start", path, "--checkpoint-every", "0.5", "--retry-budget", "60", "--workers", workers
    )
    # For reset/close the peer fires the fault itself; the watcher then only notes that the sync was running.
    action = peer.drop_connections if fault == "drop" else lambda: None
    watcher = OnTransfers(peer, FAULT_AFTER_TRANSFERS, action, proc)
    watcher.start()
    code, stdout, stderr = session.finish(proc)
    watcher.join(5)
    assert code == 0, stderr
    execution = json.loads(stdout)
    assert execution["status"] == "SUCCEEDED"
    assert by_name(execution)["eh"]["delivered"] == total

    fired = peer.faults_fired()
    assert fired == [f"drop:{watcher.result}" if fault == "drop" else fault], fired
    assert watcher.fired and watcher.sync_was_running
    if fault == "drop":
        assert watcher.result >= 1
    # Transfers went on after the fault: it hit the sync mid-way, not after its last send.
    assert peer.transfers(HUB) > max(watcher.transfers_at_fault, FAULT_AFTER_TRANSFERS + 1) + 5
    assert_replicated(peer, out, expected)
    session.assert_no_secret([peer.connection_string("send", HUB), peer.policies["send"]])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_key_revoked_mid_sync_then_recreate_and_resume_catches_up(
    session: Transcript,
    datamart: str,
    fault_peer: EventHubsPeer,
    tmp_path: Path,
    fault_export: tuple[Path, Counter[Key]],
    workers: str,
) -> None:
    peer = fault_peer
    path, expected = fault_export
    total = sum(expected.values())
    old_key, old_conn = peer.policies["send"], peer.connection_string("send", HUB)
    eh_id, out = replications(session, peer, tmp_path, old_conn)

    proc = session.spawn("--json", "sync", "start", path, "--checkpoint-every", "0.2", "--workers", workers)
    # Late enough that a checkpoint has usually recorded a position for eh, so the resume starts mid-export.
    watcher = OnTransfers(peer, REVOKE_AFTER_TRANSFERS, lambda: peer.set_auth_failure(True), proc)
    watcher.start()
    code, stdout, stderr = session.finish(proc)
    watcher.join(5)
    assert watcher.fired and watcher.sync_was_running
    assert code == 7, stderr
    error = json.loads(stderr)["error"]
    assert error["code"] == "REPLICATION_ERROR" and "AUTH_FAILED" in error["message"]
    execution = json.loads(stdout)
    exec_id = execution["id"]
    assert execution["status"] == "FAILED" and "eh (AUTH_FAILED)" in execution["error"]
    reps = by_name(execution)
    eh = reps["eh"]
    assert (eh["status"], eh["error"]["code"]) == ("ERROR", "AUTH_FAILED")
    assert eh["delivered"] < total and eh["failed"] == total - eh["delivered"] - eh["rejected"] > 0
    assert (reps["local"]["status"], reps["local"]["delivered"], reps["local"]["failed"]) == ("OK", total, 0)
    assert file_keys(out) == expected  # the file replication completed regardless
    assert session.json("sync", "show", exec_id)["replications"][eh_id]["failed"] == eh["failed"]
    first_run = peer.event_count(HUB)
    assert len(unique(peer.events(HUB))) < total
    # What the hub acknowledged before the key was revoked counts as delivered, checkpointed or not.
    assert eh["delivered"] == first_run > 0

    rep = session.json("show", "eh")
    assert (rep["status"], rep["error"]["code"]) == ("ERROR", "AUTH_FAILED")
    assert rep["error"]["undelivered"] == eh["failed"]
    session("activate", "eh", expect=6)  # ERROR is left only through recreate

    # The key is rotated on the service; the operator rebinds with the new one.
    new_key = sas_key()
    peer.set_policy("send", new_key)
    peer.set_auth_failure(False)
    new_conn = peer.connection_string("send", HUB)
    session("recreate", "eh", "--credentials", credentials(tmp_path, new_conn, "rotated.txt"))
    rebound = session.json("show", "eh")
    assert (
        rebound["status"] == "PAUSED"
        and rebound["error"] is None
        and rebound["past_errors"][0]["code"] == "AUTH_FAILED"
    )
    session("activate", "eh")
    file_size_before = out.stat().st_size

    resumed = session.json("sync", "resume", exec_id)
    assert resumed["status"] == "SUCCEEDED", resumed
    reps = by_name(resumed)
    assert (reps["eh"]["status"], reps["eh"]["delivered"], reps["eh"]["failed"]) == ("OK", total, 0)
    assert out.stat().st_size == file_size_before  # the file replication was complete: nothing re-sent to it
    # eh resumed from its last checkpoint: everything it had not acknowledged is sent again, and at most what it had
    # acknowledged since that checkpoint twice (at least once).
    assert total - eh["delivered"] <= peer.event_count(HUB) - first_run <= total
    assert_replicated(peer, out, expected)  # the union of both runs covers every operation, in order per user point
    session.assert_no_secret([old_conn, old_key, new_conn, new_key], held=[new_conn])  # recreate deleted the old


#: Raw JSON given to one profile property of a user point. "long": a 100,000-character string (the line is as big as the
#: operation). "grows": 8,000 numbers written `1e9`, which re-serialize as `1000000000.0`: a ~34 KB line whose operation
#: is ~104 KB. "fits": a 40,000-character string, under a 64 KiB hub's limit.
BIG_VALUES = {
    "long": json.dumps("x" * 100_000).encode(),
    "grows": b"[" + b",".join([b"1e9"] * 8000) + b"]",
    "fits": json.dumps("y" * 40_000).encode(),
}


def _export_with_big_profiles(path: Path, users: int, big: dict[int, bytes]) -> tuple[Counter[Key], dict[int, Key]]:
    """A generated export in which user point `i` gets a profile property whose JSON is `big[i]`; returns the expected
    operations and the key of each of those profiles."""
    rng = random.Random(11)
    expected: Counter[Key] = Counter()
    profiles: dict[int, Key] = {}
    with open(path, "wb") as f:
        for i in range(users):
            up, exp = generate.user_point(rng, i)
            line = json.dumps(up).encode()
            if i in big:
                up["profiles"][0]["big"] = "BIG-VALUE"
                line = json.dumps(up).encode().replace(b'"BIG-VALUE"', big[i])
                profiles[i] = next(k for k in exp if k[0] == "UserProfile")
            f.write(line + b"\n")
            expected.update(exp)
    return expected, profiles


@pytest.mark.parametrize("kind", ["long", "grows"])
def test_an_operation_over_the_hubs_max_size_is_rejected_for_event_hubs_only(
    session: Transcript, datamart: str, start_peer: Callable[..., EventHubsPeer], tmp_path: Path, kind: str
) -> None:
    peer = start_peer(max_message_size=64 * 1024)
    export = tmp_path / "export.ndjson"
    big, fits = 60, 140
    expected, profiles = _export_with_big_profiles(export, 200, {big: BIG_VALUES[kind], fits: BIG_VALUES["fits"]})
    total = sum(expected.values())
    eh_id, out = replications(session, peer, tmp_path)

    result = session("--json", "sync", "start", export, expect=None)
    assert result.exit_code == 0, result.stderr  # 7 would mean the oversized operation failed the replication
    execution = json.loads(result.stdout)
    assert execution["status"] == "SUCCEEDED" and execution["rejects"] == 0  # no line was bad
    reps = by_name(execution)
    assert (reps["eh"]["delivered"], reps["eh"]["rejected"], reps["eh"]["status"]) == (total - 1, 1, "OK")
    assert (reps["local"]["delivered"], reps["local"]["rejected"]) == (total, 0)
    assert file_keys(out) == expected  # the file replication receives it
    hub_keys = Counter(key_of(json.loads(e.body)) for e in unique(peer.events(HUB)))
    assert hub_keys == expected - Counter([profiles[big]])
    assert hub_keys[profiles[fits]] == 1  # 40 KB fits a 64 KiB hub: the limit is the hub's, not a guess

    rejects = [json.loads(line) for line in Path(execution["rejects_file"]).read_text().splitlines()]
    wanted = {"file": str(export), "line": big + 1, "replication": eh_id, "doc_type": "UserProfile"}
    assert len(rejects) == 1, rejects
    assert {k: rejects[0].get(k) for k in wanted} == wanted, rejects
    assert rejects[0]["reason"].startswith("PAYLOAD_TOO_LARGE"), rejects
    session.assert_no_secret([peer.connection_string("send", HUB), peer.policies["send"]])


# -- secrets -----------------------------------------------------------------------------------------------------------


def test_secrets_never_leave_the_secret_store(
    session: Transcript, datamart: str, peer: EventHubsPeer, tmp_path: Path
) -> None:
    """Every command that prints a replication, a check, an error or a traceback (-v), including a sync whose
    destination fails on the SDK's own error text, run with the file secret store so the store is under the home."""
    good_conn, good_key = peer.connection_string("send", HUB), peer.policies["send"]
    wrong_key = sas_key()
    wrong_conn = peer.connection_string("send", HUB, key=wrong_key)
    store = ["--secret-store", "file"]
    session(
        "create",
        "--type",
        "azure-event-hubs",
        "--name",
        "eh",
        *store,
        "--credentials",
        credentials(tmp_path, good_conn),
    )
    bad_creds = credentials(tmp_path, wrong_conn, "wrong.txt")
    session("create", "--type", "azure-event-hubs", "--name", "bad", *store, "--credentials", bad_creds)
    session(
        "-v", "create", "--type", "azure-event-hubs", "--name", "bad2", "--check", "--credentials", bad_creds, expect=5
    )
    session("check", "eh")
    session("activate", "eh")
    session("-v", "activate", "bad", expect=5)
    session("--json", "activate", "bad", expect=5)
    session("-v", "check", "bad", expect=5)
    for args in (["show", "eh"], ["show", "bad"], ["list"], ["history", "bad"]):
        session(*args)
        session("--json", *args)
    session("support-bundle", "eh")
    session("support-bundle", "bad")

    export = tmp_path / "export.ndjson"
    generate.write(export, 300)
    peer.set_auth_failure(True)  # the key is refused when the sync opens the destination
    code, _, stderr = session.finish(session.spawn("-v", "sync", "start", export))
    assert code == 7, stderr
    for args in (["sync", "list"], ["show", "eh"], ["support-bundle", "eh"]):
        session(*args)
        session("--json", *args)
    assert "AUTH_FAILED" in session.json("show", "eh")["error"]["code"]

    secrets_dir = Path(os.environ["DMREPL_HOME"]) / "secrets"
    for secret_file in secrets_dir.iterdir():
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    session.assert_no_secret([good_conn, good_key, wrong_conn, wrong_key], store=secrets_dir)
