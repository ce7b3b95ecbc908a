"""`dmrepl replicate` forwards operations to what is ACTIVE at each moment, with the same rejects."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from dmrepl import live
from dmrepl.delivery import SEND_BATCH
from dmrepl.registry import Registry
from tests.conftest import DATA_DIR, spawn_dmrepl

OPS = (DATA_DIR / "userpoints-v202205.operations.ndjson").read_bytes()


def test_replicate_from_stdin_and_file(cli, file_replication, tmp_path: Path) -> None:
    _, out = file_replication
    bad = b'{"ts": 1, "doc_type": "Nope", "doc_id": "x", "op": "UPDATE", "value": {}}\nnot json\n'
    result = json.loads(cli("--json", "replicate", "-", input=(OPS + bad).decode()).stdout)
    assert out.read_bytes().splitlines() == OPS.splitlines()
    assert result["rejects"] == 2 and sum(result["operations"].values()) == 64
    rejects = [json.loads(line) for line in Path(result["rejects_file"]).read_text().splitlines()]
    assert [r["line"] for r in rejects] == [65, 66] and "doc_type" in rejects[0]["reason"]
    source = tmp_path / "ops.ndjson"
    source.write_bytes(OPS)
    cli("replicate", source)
    assert len(out.read_bytes().splitlines()) == 128


def test_paused_replications_receive_nothing(cli, datamart, tmp_path: Path) -> None:
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    cli("create", "--type", "file", "--name", "a", "--path", a)
    cli("create", "--type", "file", "--name", "b", "--path", b)
    cli("activate", "a")
    cli("replicate", "-", input=OPS.decode())
    assert len(a.read_bytes().splitlines()) == 64 and not b.exists()


def test_follow_picks_up_pause_while_running(cli, datamart, tmp_path: Path) -> None:
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    cli("create", "--type", "file", "--name", "a", "--path", a)
    cli("create", "--type", "file", "--name", "b", "--path", b)
    cli("activate", "a")
    cli("activate", "b")
    source = tmp_path / "live.ndjson"
    lines = OPS.splitlines(keepends=True)
    source.write_bytes(b"".join(lines[:10]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmrepl", "replicate", str(source), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (b.exists() and len(b.read_bytes().splitlines()) == 10):
            time.sleep(0.05)
        assert len(b.read_bytes().splitlines()) == 10
        cli("pause", "b")
        time.sleep(2.5)  # the registry is re-read every 2 s
        with source.open("ab") as f:
            f.write(b"".join(lines[10:]))
        while time.monotonic() < deadline + 20 and len(a.read_bytes().splitlines()) < 64:
            time.sleep(0.05)
        assert len(a.read_bytes().splitlines()) == 64
        assert len(b.read_bytes().splitlines()) == 10
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err


def test_replicate_exit_7_when_a_replication_fails(cli, datamart, tmp_path: Path) -> None:
    good = tmp_path / "good.ndjson"
    cli("create", "--type", "file", "--name", "good", "--path", good)
    cli("create", "--type", "file", "--name", "full", "--path", "/dev/full")
    cli("activate", "good")
    cli("activate", "full")
    result = cli("replicate", "-", input=OPS.decode(), expect=7)
    assert "full" in result.stderr
    assert len(good.read_bytes().splitlines()) == 64
    assert json.loads(cli("--json", "show", "full").stdout)["status"] == "ERROR"


# --------------------------------------------------------------------------------------------------------------
# --follow: rotation, restart positions, where a first run starts, recovery of a replication


def op_line(seq: int) -> bytes:
    """One valid operation whose doc_id carries `seq`, so every line can be counted where it arrives."""
    doc_id = f"00000000-0000-4000-8000-{seq:012d}"
    op = {"ts": 1_700_000_000_000 + seq, "doc_type": "UserPoint", "doc_id": doc_id, "op": "UPDATE", "value": {}}
    return json.dumps(op).encode() + b"\n"


def op_lines(start: int, stop: int) -> bytes:
    return b"".join(op_line(seq) for seq in range(start, stop))


def arrived(path: Path, *, lenient: bool = False) -> Counter[int]:
    """How many times each operation arrived; a torn line fails, unless `lenient` (a destination that failed)."""
    counts: Counter[int] = Counter()
    if not path.exists():
        return counts
    for line in path.read_bytes().splitlines():
        try:
            counts[int(json.loads(line)["doc_id"][-12:])] += 1
        except (ValueError, KeyError, TypeError):
            if not lenient:
                raise AssertionError(f"{path}: torn or foreign line {line[:80]!r}") from None
    return counts


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def wait_arrived(path: Path, seqs: Iterable[int], timeout: float = 15, *, lenient: bool = False) -> None:
    wanted = set(seqs)
    wait_for(lambda: wanted <= set(arrived(path, lenient=lenient)), timeout, f"{len(wanted)} operations in {path}")


def spawn_follower(log: Path, *args: Any) -> subprocess.Popen[bytes]:
    """`dmrepl replicate ARGS` with stderr in `log`, readable while it runs."""
    command = [sys.executable, "-m", "dmrepl", "replicate", *map(str, args)]
    with log.open("ab") as err:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def stop_follower(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=30)


def logged(log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text()


def _copytruncate(source: Path, rotated: Path) -> None:
    shutil.copyfile(source, rotated)
    with source.open("r+b") as f:
        f.truncate(0)
    with source.open("ab") as f:  # at once: the file grows past the old offset before the follower looks again
        f.write(op_lines(200, 700))


def _rename(source: Path, rotated: Path) -> None:
    with source.open("ab") as writer:  # a logger's descriptor, kept across the rename until it reopens
        writer.write(op_lines(200, 300))
        writer.flush()
        os.rename(source, rotated)
        writer.write(op_lines(300, 350))
    source.write_bytes(op_lines(350, 700))


@pytest.mark.parametrize(
    ("rotate", "message"),
    [
        (_copytruncate, "truncated, reading from the start"),
        (_rename, "replaced (new inode), reading the new file from the start"),
    ],
    ids=["copytruncate", "rename"],
)
def test_follow_survives_rotation(
    rotate: Callable[[Path, Path], None], message: str, file_replication, tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 200))
    proc = spawn_dmrepl("replicate", source, "--follow")
    try:
        wait_arrived(out, range(200))
        rotate(source, tmp_path / "live.ndjson.1")
        wait_arrived(out, range(700))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert arrived(out) == Counter(range(700)), "every line once, none torn"
    assert f"{source}: {message}" in err
    assert not list((isolated / "live").glob("rejects-*")), "a line was cut"
    assert proc.returncode == 130 and "Traceback" not in err


def test_follow_restart_continues_after_the_last_acknowledged_line(
    file_replication, tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(b"")
    log = tmp_path / "follower.log"
    written = 0
    stop_producing = threading.Event()

    def produce() -> None:  # 5,000 lines/s: the kill lands mid-stream
        nonlocal written
        while not stop_producing.is_set():
            with source.open("ab") as f:
                f.write(op_lines(written, written + 100))
            written += 100
            time.sleep(0.02)

    proc = spawn_follower(log, source, "--follow")
    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 3000, 30, "3,000 delivered lines")
        proc.kill()
        proc.wait(timeout=10)
    finally:
        stop_producing.set()
        producer.join()
    with source.open("ab") as f:
        f.write(op_lines(written, written + 500))
    written += 500
    proc = spawn_follower(log, source, "--follow")
    try:
        wait_arrived(out, range(written), timeout=30)
    finally:
        assert stop_follower(proc) == 130
    counts = arrived(out)
    duplicates = sum(counts.values()) - len(counts)
    assert set(counts) == set(range(written))
    assert duplicates < 2 * SEND_BATCH, f"{duplicates} operations sent twice after kill -9"
    position = json.loads((isolated / "live" / "positions.json").read_text())["files"][str(source)]["dm1"]
    assert (position["inode"], position["device"]) == (source.stat().st_ino, source.stat().st_dev)
    assert position["offset"] == position["size"] == source.stat().st_size and position["line"] == written

    delivered = out.read_bytes()
    proc = spawn_follower(log, source, "--follow")
    try:
        wait_for(logged(log, f"continuing after line {written} (saved position)"), 15, "the resume")
        time.sleep(1.5)
    finally:
        assert stop_follower(proc) == 130
    assert out.read_bytes() == delivered, "a restart after a clean stop sent lines again"


def test_first_follow_from_end_or_from_start(cli, file_replication, tmp_path: Path) -> None:
    _, out = file_replication
    log = tmp_path / "follower.log"
    old = tmp_path / "old.ndjson"
    old.write_bytes(op_lines(0, 100) + op_line(100)[:30])  # a line being written is a new line
    proc = spawn_follower(log, old, "--follow", "--from-end")
    try:
        wait_for(logged(log, f"{old}: no saved position, starting at its end (after line 100)"), 15, "the start")
        with old.open("ab") as f:
            f.write(op_line(100)[30:] + op_lines(101, 150))
        wait_arrived(out, range(100, 150))
    finally:
        assert stop_follower(proc) == 130
    assert arrived(out) == Counter(range(100, 150))

    other = tmp_path / "other.ndjson"
    other.write_bytes(op_lines(1000, 1100))
    proc = spawn_follower(log, other, "--follow", "--from-start")
    try:
        wait_arrived(out, range(1000, 1100))
    finally:
        assert stop_follower(proc) == 130
    proc = spawn_follower(log, other, "--follow", "--from-end")  # a saved position wins
    try:
        wait_for(logged(log, f"{other}: continuing after line 100 (saved position)"), 15, "the resume")
        with other.open("ab") as f:
            f.write(op_lines(1100, 1110))
        wait_arrived(out, range(1100, 1110))
    finally:
        assert stop_follower(proc) == 130
    assert arrived(out) == Counter([*range(100, 150), *range(1000, 1110)])
    assert cli("replicate", "-", "--from-end", input="", expect=2).exit_code == 2
    assert cli("replicate", other, "--from-start", expect=2).exit_code == 2


def test_follow_picks_up_a_replication_recreated_after_error(cli, datamart, tmp_path: Path) -> None:
    """The only replication goes to ERROR (its directory is removed: the next flush cannot write), is recreated
    with a new --path and activated: the follower reopens it within a refresh interval, and since nothing could
    receive meanwhile, it sends again everything after the last acknowledged line."""
    first = tmp_path / "gone" / "ops.ndjson"
    first.parent.mkdir()
    cli("create", "--type", "file", "--name", "a", "--path", first)
    cli("activate", "a")
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    log = tmp_path / "follower.log"
    proc = spawn_follower(log, source, "--follow")
    second = tmp_path / "elsewhere" / "ops.ndjson"
    second.parent.mkdir()
    try:
        wait_arrived(first, range(5))
        shutil.rmtree(first.parent)
        with source.open("ab") as f:
            f.write(op_lines(5, 60))
        wait_for(lambda: json.loads(cli("--json", "show", "a").stdout)["status"] == "ERROR", 15, "ERROR")
        assert json.loads(cli("--json", "show", "a").stdout)["error"]["code"] == "UNWRITABLE"
        cli("recreate", "a", "--path", second)
        cli("activate", "a")
        with source.open("ab") as f:
            f.write(op_lines(60, 100))
        wait_arrived(second, range(60, 100), timeout=live.REFRESH_INTERVAL_S + 5)
    finally:
        assert stop_follower(proc) == 130
    assert set(arrived(second)) == set(range(5, 100)), "the lines read while nothing could receive were lost"
    text = log.read_text()
    assert "a (rep-" in text and "went to ERROR (UNWRITABLE)" in text and "is ACTIVE again" in text


def test_follow_keeps_waiting_for_a_failed_replication_across_a_restart(cli, datamart, tmp_path: Path) -> None:
    """Stopped while it waits for the only replication, recreated while stopped, started again before `activate`:
    the lines after the last acknowledged one are still sent once it is ACTIVE, not read and dropped while it is
    PAUSED."""
    first = tmp_path / "gone" / "ops.ndjson"
    first.parent.mkdir()
    cli("create", "--type", "file", "--name", "a", "--path", first)
    cli("activate", "a")
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    log = tmp_path / "follower.log"
    proc = spawn_follower(log, source, "--follow")
    try:
        wait_arrived(first, range(5))
        shutil.rmtree(first.parent)
        with source.open("ab") as f:
            f.write(op_lines(5, 20))
        wait_for(logged(log, "waiting after line 5 until one is ACTIVE again"), 15, "the wait")
    finally:
        assert stop_follower(proc) == 7  # the replication went to ERROR
    second = tmp_path / "elsewhere" / "ops.ndjson"
    second.parent.mkdir()
    cli("recreate", "a", "--path", second)  # PAUSED until activated
    proc = spawn_follower(log, source, "--follow")
    try:
        wait_for(lambda: log.read_text().count("waiting after line 5") == 2, 15, "the wait after the restart")
        with source.open("ab") as f:
            f.write(op_lines(20, 30))
        time.sleep(live.REFRESH_INTERVAL_S + 0.5)
        cli("activate", "a")
        wait_arrived(second, range(5, 30), timeout=live.REFRESH_INTERVAL_S + 5)
    finally:
        assert stop_follower(proc) == 130
    assert arrived(second) == Counter(range(5, 30))


def test_follow_reopens_a_replication_whose_binding_changed(file_replication, tmp_path: Path, isolated: Path) -> None:
    name, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 10))
    log = tmp_path / "follower.log"
    proc = spawn_follower(log, source, "--follow")
    moved = tmp_path / "moved.ndjson"
    try:
        wait_arrived(out, range(10))
        with Registry(isolated).transaction() as data:  # a binding changed behind the follower's back
            (rep,) = (r for r in data.replications.values() if r.name == name)
            rep.settings["path"] = str(moved)
        wait_for(logged(log, f"{name} (rep-"), live.REFRESH_INTERVAL_S + 5, "the new binding")
        assert "was rebound: delivering to its new binding" in log.read_text()
        with source.open("ab") as f:
            f.write(op_lines(10, 20))
        wait_arrived(moved, range(10, 20))
    finally:
        assert stop_follower(proc) == 130
    assert arrived(out) == Counter(range(10)) and arrived(moved) == Counter(range(10, 20))
