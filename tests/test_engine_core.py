"""The engine core's contracts: a shard runs with no registry behind it, registry records are typed and a bad field
is named, destination types declare the command line's options, and the CLI's error paths are the documented ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from dmrepl import destinations
from dmrepl.cli import replication as replication_cli
from tests.conftest import DATA_DIR, REPO

_SHARD_RUNNER = textwrap.dedent(
    """
    import json, os, sys
    from dmrepl.delivery import ReplicationBinding
    from dmrepl.sync.shard import Shard, ShardOptions, run_shard

    export, out, bad_dir = sys.argv[1:4]
    size = os.path.getsize(export)
    bindings = [
        ReplicationBinding("rep-00000001", "local", "file", {"path": out}),
        ReplicationBinding("rep-00000002", "gone", "file", {"path": os.path.join(bad_dir, "missing", "x.ndjson")}),
    ]
    options = ShardOptions(system_version="v202205", start_ts=1700000000000)
    result = run_shard(Shard(1, 0, export, "user-points", 0, size, 0, size=size), bindings, options)
    acks = result.acks
    print(json.dumps({
        "lines": result.lines, "last_line": result.last_line, "end": result.end_offset, "counts": result.counts,
        "rejects": [list(r) for r in result.rejects], "delivered": acks.delivered,
        "failures": {k: v.code for k, v in acks.failures.items()},
    }))
    """
)


def test_a_shard_runs_and_reports_with_no_registry_at_all(tmp_path: Path) -> None:
    """What a Spark executor or a worker on another machine does: no dmrepl home, no keyring, no registry module."""
    export = tmp_path / "export.ndjson"
    sample = (DATA_DIR / "userpoints-v202205.ndjson").read_bytes()
    export.write_bytes(sample + b"not json\n" + sample)
    out = tmp_path / "out.ndjson"
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir(mode=0o500)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "HOME": str(nowhere),
        "XDG_CONFIG_HOME": str(nowhere / "config"),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
    }
    code = "import sys; sys.modules['dmrepl.registry'] = None; sys.modules['keyring'] = None\n" + _SHARD_RUNNER
    run = subprocess.run(
        [sys.executable, "-c", code, str(export), str(out), str(nowhere)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    expected = [json.loads(x) for x in (DATA_DIR / "userpoints-v202205.operations.ndjson").read_text().splitlines()]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got == expected + expected  # the golden file's start time is the shard's: every value, every ts
    assert report["counts"] == dict(Counter(o["doc_type"] for o in expected + expected))
    sample_lines = sample.count(b"\n")
    assert report["lines"] == 2 * sample_lines + 1 and report["last_line"] == 2 * sample_lines + 1
    assert report["end"] == export.stat().st_size
    assert [line for line, _ in report["rejects"]] == [sample_lines + 1]
    assert report["delivered"]["rep-00000001"] == 2 * len(expected)
    assert report["failures"] == {"rep-00000002": "UNWRITABLE"}
    assert list(nowhere.iterdir()) == []  # nothing written where a dmrepl home would be


def _registry_text(isolated: Path) -> str:
    return (isolated / "registry.toml").read_text()


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('status = "PAUSED"', 'status = "RUNNING"', "status"),
        ('status = "PAUSED"', "status = 3", "status"),
        ('type = "file"\n', "", "type"),
        ("created_at = ", "created_on = ", "created_at"),
    ],
)
def test_a_hand_edited_registry_with_a_bad_field_is_refused_naming_it(
    cli, file_replication, isolated: Path, old: str, new: str, field: str
) -> None:
    cli("pause", "local")
    text = _registry_text(isolated)
    assert old in text
    broken = text.replace(old, new, 1)
    (isolated / "registry.toml").write_text(broken)
    for command in (["list"], ["--json", "list"], ["pause", "local"]):
        result = cli(*command, expect=4)
        assert str(isolated / "registry.toml") in result.stderr
        assert f".{field}" in result.stderr or f"{field}:" in result.stderr, result.stderr
    assert _registry_text(isolated) == broken  # never overwritten


def test_records_round_trip_through_the_registry(cli, file_replication, isolated: Path) -> None:
    """Typed records write back exactly what they read: a no-op transaction leaves the file byte for byte."""
    from dmrepl.registry import Registry

    cli("check", "local")
    before = (isolated / "registry.toml").read_bytes()
    with Registry().transaction() as data:
        assert data.replications[next(iter(data.replications))].name == "local"
    assert (isolated / "registry.toml").read_bytes() == before
    assert Registry().load().to_dict() == Registry().load().to_dict()


def test_create_offers_exactly_the_options_the_destination_types_declare() -> None:
    declared = {flag for kind in destinations.all_types() for spec in kind.options for flag in spec.flags.split("/")}
    import inspect

    params = inspect.signature(replication_cli.create).parameters
    own = {"ctx", "type_name", "name", "datamart", "credentials", "check", "timeout", "secret_store", "expires"}
    flags = set()
    for name, p in params.items():
        if name in own:
            continue
        info = p.annotation.__metadata__[0]
        decls = [info.default, *(info.param_decls or ())] if isinstance(info.default, str) else info.param_decls
        flags.update(d for decl in decls for d in decl.split("/"))
    assert flags == declared


def test_type_status_format_and_secret_store_take_only_their_values(cli, file_replication) -> None:
    err = cli("create", "--type", "kafka", "--name", "k", expect=2).stderr
    assert "file" in err and "google-pubsub" in err and "azure-event-hubs" in err
    assert cli("list", "--status", "active").stdout.count("local") == 1  # case-insensitive, as before
    assert "paused" in cli("list", "--status", "nope", expect=2).stderr.lower()
    assert (
        "user-points" in cli("sync", "plan", "--format", "csv", DATA_DIR / "userpoints-v202205.ndjson", expect=2).stderr
    )
    err = cli("create", "--type", "file", "--name", "x", "--path", "/tmp/x", "--secret-store", "vault", expect=2).stderr
    assert "keyring" in err


def test_home_option_does_not_leak_into_the_environment(cli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    before = os.environ.get("DMREPL_HOME")
    cli("--home", elsewhere, "datamart", "add", "dm9")
    assert os.environ.get("DMREPL_HOME") == before
    assert (elsewhere / "registry.toml").exists()
    assert json.loads(cli("--home", elsewhere, "--json", "home").stdout)["home"] == str(elsewhere)
    assert cli("--json", "datamart", "list").stdout.strip() == "[]"  # the default home was not touched


def test_a_declined_delete_exits_6_and_deletes_nothing(cli, file_replication) -> None:
    """At a terminal, `delete` asks; "n" is a documented refusal (exit 6), never the "bug" exit 1."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmrepl", "delete", "local"], stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    seen = b""
    while b"[y/N]" not in seen:
        seen += os.read(master, 1024)
    os.write(master, b"n\n")
    proc.wait(timeout=30)
    try:
        while chunk := os.read(master, 1024):
            seen += chunk
    except OSError:  # the pty closes with the process
        pass
    os.close(master)
    assert proc.returncode == 6, seen
    assert b"not deleted" in seen
    assert json.loads(cli("--json", "list").stdout)[0]["name"] == "local"


def test_errors_name_the_next_command(cli, file_replication, tmp_path: Path) -> None:
    err = json.loads(cli("--json", "show", "nope", expect=3).stderr)["error"]
    assert "dmrepl list" in err["message"] + err.get("hint", "")
    cli("sync", "start", DATA_DIR / "userpoints-v202205.ndjson")
    weekly = json.loads(cli("--json", "sync", "start", DATA_DIR / "userpoints-v202205.ndjson", expect=6).stderr)
    assert weekly["error"]["code"] == "WEEKLY_RULE" and weekly["error"]["hint"].startswith("dmrepl sync plan")
    assert "(next: dmrepl sync plan" in cli("sync", "start", DATA_DIR / "userpoints-v202205.ndjson", expect=6).stderr
