"""The registry is atomic, locked, never overwritten when not understood, and holds no secret."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dmrepl.models import Datamart
from dmrepl.registry import Registry


def test_home_is_read_at_call_time(cli, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("DMREPL_HOME", str(other))
    assert cli("home").stdout.strip() == str(other)
    assert json.loads(cli("--json", "--home", tmp_path / "x", "home").stdout) == {"home": str(tmp_path / "x")}


def test_home_is_private(cli, isolated: Path) -> None:
    cli("datamart", "add", "dm1")
    assert stat.S_IMODE(isolated.stat().st_mode) == 0o700
    assert stat.S_IMODE((isolated / "registry.toml").stat().st_mode) == 0o600
    data = tomllib.loads((isolated / "registry.toml").read_text())
    assert data["schema_version"] == 1 and data["datamarts"]["dm1"]["user_point_system_version"] == "v202205"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"schema_version = 1\n[datamarts\n", ["does not parse"]),
        (b"schema_version = 99\n", ["newer", "99"]),
        (b"\xff\xfe garbage", ["does not parse"]),
        (b"datamarts = 3\n", ["schema_version"]),
    ],
    ids=["broken-toml", "newer-schema", "binary", "no-version"],
)
def test_unreadable_registry_is_an_error_and_is_left_untouched(cli, isolated: Path, content: bytes, words) -> None:
    isolated.mkdir(parents=True)
    path = isolated / "registry.toml"
    path.write_bytes(content)
    for args in (["list"], ["datamart", "add", "dm2"], ["--json", "datamart", "list"]):
        result = cli(*args, expect=4)
        for w in words:
            assert w in result.stderr
        assert str(path) in result.stderr
        assert "Traceback" not in result.stderr
    assert path.read_bytes() == content


def test_interrupted_write_leaves_the_old_registry(cli, isolated: Path, monkeypatch) -> None:
    cli("datamart", "add", "dm1")
    before = (isolated / "registry.toml").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash between temp write and replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"), Registry().transaction() as data:
        data.datamarts["dm2"] = Datamart(id="dm2", name="dm2", user_point_system_version="v202205", created_at="x")
    assert (isolated / "registry.toml").read_bytes() == before
    assert [p.name for p in isolated.iterdir() if p.name.endswith(".tmp")] == []


def test_lock_held_past_wait_is_refused_with_exit_6(cli, isolated: Path) -> None:
    cli("datamart", "add", "dm1")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dmrepl.registry import Registry\n"
            "with Registry().lock():\n    print('locked', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = cli("--wait", "0.3", "datamart", "add", "dm2", expect=6)
        assert "locked" in result.stderr and "--wait" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    cli("datamart", "add", "dm2")


def test_twenty_concurrent_creates_lose_nothing(cli, isolated: Path, tmp_path: Path) -> None:
    cli("datamart", "add", "dm1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dmrepl",
                "create",
                "--type",
                "file",
                "--name",
                f"f{i:02d}",
                "--path",
                str(tmp_path / f"out{i}.ndjson"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for i in range(20)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    data = tomllib.loads((isolated / "registry.toml").read_text())
    assert sorted(r["name"] for r in data["replications"].values()) == [f"f{i:02d}" for i in range(20)]
