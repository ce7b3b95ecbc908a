"""`replicate --follow` under everything at once for about half a minute: rotations of both kinds, a `kill -9` and a
restart (with a rotation while it is stopped), a replication going to ERROR and coming back; nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from dmrepl import live
from dmrepl.delivery import SEND_BATCH
from tests.test_live import arrived, op_lines, spawn_follower, stop_follower, wait_arrived, wait_for


class Producer(threading.Thread):
    """Appends 10 operations every 10 ms by name, as a logger that reopens its file for every write would; rotations
    take `lock` so that they fall between two writes."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.lock = threading.Lock()
        self.written = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with self.lock, self.path.open("ab") as f:
                f.write(op_lines(self.written, self.written + 10))
                self.written += 10
            time.sleep(0.01)


def _last_seq(path: Path) -> int:
    data = path.read_bytes() if path.exists() else b""
    tail = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return int(json.loads(tail)["doc_id"][-12:]) if tail else -1


@pytest.mark.slow
def test_follow_soak(cli, datamart, tmp_path: Path) -> None:
    keep = tmp_path / "keep.ndjson"
    flaky = tmp_path / "flaky-1" / "ops.ndjson"
    flaky.parent.mkdir()
    cli("create", "--type", "file", "--name", "keep", "--path", keep)
    cli("create", "--type", "file", "--name", "flaky", "--path", flaky)
    cli("activate", "keep")
    cli("activate", "flaky")
    source = tmp_path / "live.ndjson"
    source.write_bytes(b"")
    log = tmp_path / "follower.log"
    producer = Producer(source)
    rotations = 0

    def rotate(kind: str) -> None:
        nonlocal rotations
        rotations += 1
        rotated = tmp_path / f"live.ndjson.{rotations}"
        with producer.lock:
            if kind == "rename":
                os.rename(source, rotated)  # the producer's next write creates the new file
            else:  # copytruncate loses what was not read before the truncation: logrotate's own caveat
                wait_for(lambda: _last_seq(keep) == producer.written - 1, 10, "the follower to catch up")
                shutil.copyfile(source, rotated)
                os.truncate(source, 0)

    def rotate_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(1.5)
            rotate("rename" if rotations % 2 else "copytruncate")

    proc = spawn_follower(log, source, "--follow")
    producer.start()
    try:
        rotate_for(6)
        time.sleep(1.5)  # the last rotation is behind the follower: the kill lands in the current file
        proc.kill()
        proc.wait(timeout=10)
        time.sleep(0.5)
        rotate("rename")  # while it is stopped
        time.sleep(0.5)
        proc = spawn_follower(log, source, "--follow")
        rotate_for(3)
        shutil.rmtree(flaky.parent)  # flaky's next flush cannot write: ERROR, while keep goes on
        wait_for(lambda: json.loads(cli("--json", "show", "flaky").stdout)["status"] == "ERROR", 15, "ERROR")
        flaky = tmp_path / "flaky-2" / "ops.ndjson"
        flaky.parent.mkdir()
        cli("recreate", "flaky", "--path", flaky)
        cli("activate", "flaky")
        time.sleep(live.REFRESH_INTERVAL_S + 1)
        recovered = producer.written  # lines written from here on must reach the recreated flaky
        rotate_for(8)
    finally:
        producer.done.set()
        producer.join()
    try:
        wait_arrived(keep, range(producer.written), timeout=20)
        wait_arrived(flaky, range(recovered, producer.written), timeout=10)
    finally:
        assert stop_follower(proc) == 130
    counts = arrived(keep)  # a torn line fails here
    assert set(counts) == set(range(producer.written))
    duplicates = sum(counts.values()) - len(counts)
    assert duplicates < 2 * SEND_BATCH, f"{duplicates} operations sent twice for one kill -9"
    assert set(range(recovered, producer.written)) <= set(arrived(flaky))
    text = log.read_text()
    for expected in (
        "truncated, reading from the start",
        "replaced (new inode), reading the new file from the start",
        "replaced while dmrepl was stopped: reading the rest of",
        "flaky (rep-",
        "went to ERROR (UNWRITABLE)",
        "is ACTIVE again",
    ):
        assert expected in text, expected
    assert "Traceback" not in text
