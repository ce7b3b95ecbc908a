"""`dmrepl rotate`: new credentials without a gap, against the real AMQP Event Hubs peer.

The replication keeps its status; the new secret is stored before the registry commits and the old one deleted
after; a failed check, bad credentials, a running sync or an ERROR status change nothing, byte for byte. The first
test proves the point of it all: a `replicate --follow` process keeps delivering across a rotation whose old key is
revoked right after, and every operation arrives.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from dmrepl import replications
from dmrepl.registry import Registry
from tests.conftest import Cli
from tests.factories import fake_running_sync, sas_key
from tests.peers.eventhubs import EventHubsPeer, unique

pytest.importorskip("azure.eventhub")

HUB = "hub1"


# -- helpers -----------------------------------------------------------------------------------------------------------


class Session:
    """Runs dmrepl in-process and keeps everything it printed, for the final search for secrets."""

    def __init__(self, cli: Cli) -> None:
        self.cli = cli
        self.printed: list[str] = []

    def __call__(self, *args: Any, expect: int | None = 0) -> Any:
        result = self.cli(*args, expect=expect)
        self.printed += [result.stdout, result.stderr]
        return result

    def json(self, *args: Any) -> Any:
        return json.loads(self("--json", *args).stdout)


@pytest.fixture
def session(cli: Cli) -> Session:
    return Session(cli)


def home() -> Path:
    return Path(os.environ["DMREPL_HOME"])


def secret_files() -> dict[str, str]:
    directory = home() / "secrets"
    return {p.name: p.read_text() for p in directory.iterdir()} if directory.exists() else {}


def snapshot() -> dict[str, bytes]:
    """Every file under the home (registry, secret store) and the test keyring, as bytes."""
    files = {str(p): p.read_bytes() for p in home().rglob("*") if p.is_file()}
    keyring_file = Path(os.environ["DMREPL_TEST_KEYRING"])
    if keyring_file.exists():
        files["keyring"] = keyring_file.read_bytes()
    return files


def assert_no_secret(printed: Iterable[str], secrets: Iterable[str], *, held: Iterable[str] = ()) -> None:
    """No secret (nor its URL- or JSON-escaped form) printed, nor written anywhere under the home but the secret
    store; the store holds `held` (a positive control: the secrets were there to leak)."""
    needles = {form for s in secrets for form in (s, quote_plus(s), json.dumps(s)[1:-1])}
    for text in printed:
        for needle in needles:
            assert needle not in text, "a secret was printed"
    files = [p for p in home().rglob("*") if p.is_file() and p.parent.name != "secrets"]
    assert any(p.name == "registry.toml" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(n.encode() in data for n in needles), f"a secret was written to {path}"
    stored = "".join(secret_files().values()) + (
        Path(os.environ["DMREPL_TEST_KEYRING"]).read_text() if Path(os.environ["DMREPL_TEST_KEYRING"]).exists() else ""
    )
    assert all(s in stored for s in held)


def write_credentials(path: Path, conn_str: str) -> Path:
    path.write_text(conn_str + "\n", encoding="utf-8")
    return path


def create_eh(session: Session, tmp_path: Path, conn_str: str, *extra: Any) -> dict[str, Any]:
    creds = write_credentials(tmp_path / "old.txt", conn_str)
    created: dict[str, Any] = session.json(
        "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", creds, *extra
    )
    return created


def op_line(seq: int) -> bytes:
    doc_id = f"00000000-0000-4000-8000-{seq:012d}"
    op = {"ts": 1_700_000_000_000 + seq, "doc_type": "UserPoint", "doc_id": doc_id, "op": "UPDATE", "value": {}}
    return json.dumps(op).encode() + b"\n"


def seqs_at(peer: EventHubsPeer) -> list[int]:
    return [int(json.loads(ev.body)["doc_id"][-12:]) for ev in unique(peer.events(HUB))]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Writer(threading.Thread):
    """Appends one operation line every few milliseconds to a followed file until stopped: live traffic."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True, name="live-writer")
        self.path = path
        self.written = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.path.open("ab") as f:
            while not self.stopping.is_set():
                f.write(b"".join(op_line(self.written + i) for i in range(5)))
                f.flush()
                self.written += 5
                time.sleep(0.02)

    def stop(self) -> int:
        self.stopping.set()
        self.join(timeout=10)
        return self.written


@pytest.fixture
def second_policy(eventhubs_peer: EventHubsPeer) -> str:
    """A second policy on the peer, `rotated`, with a key of its own: what an operator rotates to."""
    key = sas_key()
    eventhubs_peer.set_policy("rotated", key)
    return key


# -- the point: no gap -------------------------------------------------------------------------------------------------


def test_replicate_follow_switches_to_rotated_credentials_and_every_operation_arrives(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, second_policy: str, tmp_path: Path
) -> None:
    peer = eventhubs_peer
    old_key = peer.policies["send"]
    old_conn, new_conn = peer.connection_string("send", HUB), peer.connection_string("rotated", HUB)
    rep = create_eh(session, tmp_path, old_conn, "--secret-store", "file")
    session("activate", "eh")

    source, log = tmp_path / "live.ndjson", tmp_path / "replicate.log"
    source.write_bytes(b"")
    writer = Writer(source)
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dmrepl", "replicate", "--follow", str(source)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        writer.start()
        wait_for(lambda: len(seqs_at(peer)) >= 100, 30, "live operations at the peer before the rotation")

        rotated = session.json("rotate", "eh", "--credentials", write_credentials(tmp_path / "new.txt", new_conn))
        peer.set_policy("send", None)  # the old key is revoked right after the rotation
        assert rotated["status"] == "ACTIVE"
        assert rotated["credentials"]["fingerprint"]["shared_access_key_name"] == "rotated"

        # Tokens already accepted stay valid until they expire, as at Azure: only once `replicate` has had time to
        # reopen (2 s refresh) does cutting every connection prove that it holds the new key, not the revoked one.
        wait_for(lambda: "was rebound" in log.read_text(), 15, "replicate to reopen on the new binding")
        before_cut = len(seqs_at(peer))
        assert peer.drop_connections() > 0
        time.sleep(1.0)  # traffic keeps coming across the cut
        written = writer.stop()
        assert written > before_cut
        wait_for(lambda: len(seqs_at(peer)) >= written, 60, f"all {written} operations at the peer")
    finally:
        writer.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    text = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text
    assert "went to ERROR" not in text, text

    assert sorted(seqs_at(peer)) == list(range(written))  # every operation, none foreign
    shown = session.json("show", "eh")
    assert shown["status"] == "ACTIVE" and shown["error"] is None
    assert [(h.get("from"), h["to"]) for h in shown["history"]][-1] == ("ACTIVE", "ACTIVE")
    assert list(secret_files().values()) == [new_conn]  # the old secret is gone
    session.printed.append(text)
    assert_no_secret(session.printed, [old_conn, new_conn, old_key, second_policy], held=[new_conn])
    assert rep["id"] == shown["id"]


# -- what rotate records -----------------------------------------------------------------------------------------------


def test_rotate_keeps_the_status_records_both_fingerprints_and_deletes_the_old_secret_last(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, second_policy: str, tmp_path: Path
) -> None:
    old_conn, new_conn = eventhubs_peer.connection_string("send", HUB), eventhubs_peer.connection_string("rotated", HUB)
    created = create_eh(session, tmp_path, old_conn, "--secret-store", "file")
    old_ref = created["credentials"]["ref"]
    assert secret_files() == {old_ref: old_conn}

    # PAUSED stays PAUSED: rotate never changes the status.
    new_file = write_credentials(tmp_path / "new.txt", new_conn)
    result = session("rotate", "eh", "--credentials", new_file)
    assert re.search(r"^cbs-auth\s+ok", result.stdout, re.MULTILINE), result.stdout
    assert "credentials rotated, still PAUSED" in result.stdout
    rep = session.json("show", "eh")
    assert rep["status"] == "PAUSED"
    new_ref = rep["credentials"]["ref"]
    assert new_ref != old_ref and rep["credentials"]["store"] == "file"
    assert secret_files() == {new_ref: new_conn}
    assert stat.S_IMODE((home() / "secrets" / new_ref).stat().st_mode) == 0o600
    assert rep["last_check"]["ok"] is True

    last = rep["history"][-1]
    assert (last["from"], last["to"]) == ("PAUSED", "PAUSED")
    assert last["old_fingerprint"] == created["credentials"]["fingerprint"]
    assert last["new_fingerprint"] == rep["credentials"]["fingerprint"]
    assert last["old_fingerprint"]["shared_access_key_name"] == "send"
    assert last["new_fingerprint"]["shared_access_key_name"] == "rotated"
    assert last["old_fingerprint"]["sha256"] != last["new_fingerprint"]["sha256"]
    assert "send" in last["reason"] and "rotated" in last["reason"]
    history = session("history", "eh").stdout
    assert "credentials rotated" in history

    # ACTIVE stays ACTIVE, and --json prints the replication as create/recreate do.
    session("activate", "eh")
    back = session.json("rotate", "eh", "--credentials", write_credentials(tmp_path / "back.txt", old_conn))
    assert back["status"] == "ACTIVE" and back["warnings"] == [] and back["id"] == created["id"]
    assert back["credentials"]["fingerprint"]["shared_access_key_name"] == "send"
    assert list(secret_files().values()) == [old_conn]
    assert_no_secret(session.printed, [old_conn, new_conn, second_policy], held=[old_conn])


def test_rotate_in_the_keyring_stores_the_new_secret_and_deletes_the_old(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, second_policy: str, tmp_path: Path
) -> None:
    old_conn, new_conn = eventhubs_peer.connection_string("send", HUB), eventhubs_peer.connection_string("rotated", HUB)
    create_eh(session, tmp_path, old_conn)
    session("rotate", "eh", "--credentials", write_credentials(tmp_path / "new.txt", new_conn))
    keyring_text = Path(os.environ["DMREPL_TEST_KEYRING"]).read_text()
    assert new_conn in keyring_text and old_conn not in keyring_text
    assert session.json("show", "eh")["credentials"]["store"] == "keyring"


def test_a_crash_after_the_commit_leaves_an_orphan_never_a_replication_without_its_secret(
    session: Session,
    datamart: str,
    eventhubs_peer: EventHubsPeer,
    second_policy: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old secret is deleted only after the registry committed: dying in between strands the old secret, while
    the replication already points at the new one, which is stored and works."""
    old_conn, new_conn = eventhubs_peer.connection_string("send", HUB), eventhubs_peer.connection_string("rotated", HUB)
    create_eh(session, tmp_path, old_conn, "--secret-store", "file")

    class Crash(BaseException):
        pass

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(replications.secrets, "delete_secret", crash)
        replications.rotate(Registry(), "eh", options={"credentials": write_credentials(tmp_path / "n.txt", new_conn)})
    rep = session.json("show", "eh")
    assert sorted(secret_files().values()) == sorted([old_conn, new_conn])  # the orphan, and the one in use
    assert secret_files()[rep["credentials"]["ref"]] == new_conn
    session("check", "eh")


# -- what rotate refuses, changing nothing -----------------------------------------------------------------------------


def test_a_failed_check_changes_nothing_and_exits_5(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, tmp_path: Path
) -> None:
    old_conn = eventhubs_peer.connection_string("send", HUB)
    create_eh(session, tmp_path, old_conn, "--secret-store", "file")
    session("activate", "eh")
    wrong_key = sas_key()
    wrong = write_credentials(tmp_path / "wrong.txt", eventhubs_peer.connection_string("send", HUB, key=wrong_key))
    before = snapshot()

    human = session("rotate", "eh", "--credentials", wrong, expect=5).stderr
    assert re.search(r"^cbs-auth\s+FAILED \(AUTH_FAILED\)", human, re.MULTILINE), human
    assert "eh keeps its old credentials" in human and "dmrepl rotate again" in human
    error = json.loads(session("--json", "rotate", "eh", "--credentials", wrong, expect=5).stderr)["error"]
    assert error["code"] == "CHECK_FAILED" and error["exit_code"] == 5
    assert [s["name"] for s in error["details"]] == ["connection-string", "cbs-auth", "event-hub"]

    assert snapshot() == before  # registry, secret store and keyring, byte for byte
    assert session.json("show", "eh")["status"] == "ACTIVE"
    assert_no_secret(session.printed, [old_conn, wrong_key], held=[old_conn])


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("Endpoint=sb://ns1.servicebus.windows.net/;SharedAccessKey={key};EntityPath=hub1", "SharedAccessKeyName"),
        ("Endpoint=sb://ns1.servicebus.windows.net/;SharedAccessKeyName=send;EntityPath=hub1", "SharedAccessKey"),
        ("SharedAccessKeyName=send;SharedAccessKey={key};EntityPath=hub1", "Endpoint"),
    ],
)
def test_bad_credentials_exit_4_naming_the_field_and_the_file_and_save_nothing(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, tmp_path: Path, content: str, field: str
) -> None:
    create_eh(session, tmp_path, eventhubs_peer.connection_string("send", HUB), "--secret-store", "file")
    key = sas_key()
    bad = write_credentials(tmp_path / "bad.txt", content.format(key=key))
    before = snapshot()
    result = session("rotate", "eh", "--credentials", bad, expect=4)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0] and f"{field}:" in lines[0], lines[0]
    assert key not in result.stderr + result.stdout
    missing = session("rotate", "eh", "--credentials", tmp_path / "missing.txt", expect=4).stderr
    assert f"{tmp_path / 'missing.txt'}: credentials file not found" in missing
    assert snapshot() == before


def test_settings_do_not_change_with_rotate(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, tmp_path: Path
) -> None:
    create_eh(session, tmp_path, eventhubs_peer.connection_string("send", HUB))
    before = snapshot()
    # A target option is not a rotate option at all...
    assert "--event-hub" in session("rotate", "eh", "--event-hub", "other", expect=2).stderr
    # ... and credentials for another namespace would move the replication: that is recreate.
    elsewhere = write_credentials(
        tmp_path / "other.txt",
        f"Endpoint=sb://other.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={sas_key()};"
        "EntityPath=hub1",
    )
    err = session("rotate", "eh", "--credentials", elsewhere, expect=4).stderr
    assert re.search(r"error: (target|namespace): .*other\.servicebus\.windows\.net", err), err
    assert "dmrepl recreate" in err
    # Nothing given at all is a usage error.
    assert "--credentials" in session("rotate", "eh", expect=2).stderr
    assert snapshot() == before
    # A file replication has no credentials to rotate.
    session("create", "--type", "file", "--name", "local", "--path", tmp_path / "out.ndjson")
    assert "no credentials" in session("rotate", "local", "--credentials", elsewhere, expect=2).stderr


def test_rotate_is_refused_while_a_sync_runs_on_the_datamart(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, second_policy: str, tmp_path: Path
) -> None:
    create_eh(session, tmp_path, eventhubs_peer.connection_string("send", HUB))
    new = write_credentials(tmp_path / "new.txt", eventhubs_peer.connection_string("rotated", HUB))
    proc = fake_running_sync(datamart)
    try:
        before = snapshot()
        err = session("rotate", "eh", "--credentials", new, expect=6).stderr
        assert "sync-running" in err and f"pid {proc.pid}" in err and "rotate the credentials of eh" in err
        error = json.loads(session("--json", "rotate", "eh", "--credentials", new, expect=6).stderr)["error"]
        assert error["code"] == "SYNC_RUNNING"
        assert snapshot() == before
    finally:
        proc.kill()
        proc.wait()
    session("rotate", "eh", "--credentials", new)  # STALE once its process is gone: no longer blocking


def test_rotate_of_a_replication_in_error_is_refused_with_recreate_as_the_way_out(
    session: Session, datamart: str, eventhubs_peer: EventHubsPeer, second_policy: str, tmp_path: Path
) -> None:
    created = create_eh(session, tmp_path, eventhubs_peer.connection_string("send", HUB))
    replications.mark_error(
        Registry(), created["id"], code="AUTH_FAILED", message="refused", undelivered=3, reason="live replication"
    )
    new = write_credentials(tmp_path / "new.txt", eventhubs_peer.connection_string("rotated", HUB))
    before = snapshot()
    error = json.loads(session("--json", "rotate", "eh", "--credentials", new, expect=6).stderr)["error"]
    assert error["code"] == "WRONG_STATUS" and "ERROR (AUTH_FAILED)" in error["message"]
    assert f"dmrepl recreate {created['id']}" in error["message"]
    assert snapshot() == before
    session("recreate", "eh", "--credentials", new)
    assert session.json("show", "eh")["status"] == "PAUSED"


# -- the command line --------------------------------------------------------------------------------------------------


def test_rotate_offers_exactly_the_credential_options_of_every_type(cli: Cli) -> None:
    """Built from the types' OptionSpecs as recreate's flags are: a credential option added to a type shows up here,
    a setting (topic, hub, path) never does."""
    from dmrepl import destinations

    shown = cli("rotate", "--help").stdout
    assert "--credentials" in shown and "--expires" in shown and "--secret-store" in shown
    specs = [spec for kind in destinations.all_types() for spec in kind.options]
    assert any(not spec.credential for spec in specs)
    for spec in specs:
        first = spec.flags.split("/")[0]
        assert (re.search(rf"{re.escape(first)}\b", shown) is not None) == spec.credential, first


def test_bash_completion_knows_rotate_and_its_options() -> None:
    from tests.test_completions import _dmrepl

    def complete(words: str) -> list[str]:
        env = {"_DMREPL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return _dmrepl(env).split()

    assert "rotate" in complete("dmrepl rot")
    assert "--expires" in complete("dmrepl rotate eh --exp")
    assert "--expires" in complete("dmrepl create --exp")
