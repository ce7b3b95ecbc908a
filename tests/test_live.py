"""`dmrepl replicate` forwards operations to what is ACTIVE at each moment, with the same rejects."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import DATA_DIR

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
