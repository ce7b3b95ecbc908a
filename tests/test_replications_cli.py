"""The status machine (docs/statuses.md), addressing by id or name, --json, exit codes, no prompts without a TTY."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dmrepl.registry import Registry
from dmrepl.replications import mark_error


def test_lists_are_empty_json_arrays(cli) -> None:
    for args in (["list"], ["datamart", "list"], ["sync", "list"]):
        assert json.loads(cli("--json", *args).stdout) == []


def test_datamart_commands(cli) -> None:
    cli("datamart", "add", "dm1", "--name", "Main", "--system-version", "v201901")
    assert json.loads(cli("--json", "datamart", "show", "dm1").stdout)["user_point_system_version"] == "v201901"
    cli("datamart", "set-version", "dm1", "v202205")
    assert "v202205" in cli("datamart", "list").stdout
    assert "already exists" in cli("datamart", "add", "dm1", expect=6).stderr
    assert "v2022" in cli("datamart", "set-version", "dm1", "v2022", expect=4).stderr
    cli("datamart", "show", "nope", expect=3)


def test_datamart_is_required_when_ambiguous(cli, tmp_path: Path) -> None:
    assert "datamart add" in cli("create", "--type", "file", "--name", "f", "--path", tmp_path / "o", expect=3).stderr
    cli("datamart", "add", "a")
    cli("datamart", "add", "b")
    assert "--datamart" in cli("create", "--type", "file", "--name", "f", "--path", tmp_path / "o", expect=2).stderr
    cli("create", "--type", "file", "--name", "f", "--path", tmp_path / "o", "--datamart", "b")


def test_status_machine_and_history(cli, datamart, tmp_path: Path) -> None:
    rep = json.loads(cli("--json", "create", "--type", "file", "--name", "f", "--path", tmp_path / "o.ndjson").stdout)
    assert rep["status"] == "PAUSED" and rep["id"].startswith("rep-")
    assert json.loads(cli("--json", "activate", rep["id"]).stdout)["status"] == "ACTIVE"
    assert json.loads(cli("--json", "pause", "f").stdout)["status"] == "PAUSED"
    cli("activate", "f")
    history = json.loads(cli("--json", "history", "f").stdout)
    assert [(h.get("from"), h["to"]) for h in history] == [
        (None, "PAUSED"),
        ("PAUSED", "ACTIVE"),
        ("ACTIVE", "PAUSED"),
        ("PAUSED", "ACTIVE"),
    ]
    assert "activated" in cli("history", rep["id"]).stdout


def test_activate_failure_stays_paused_with_last_check(cli, datamart, tmp_path: Path) -> None:
    target_dir = tmp_path / "d"
    target_dir.mkdir()
    cli("create", "--type", "file", "--name", "f", "--path", target_dir / "o.ndjson")
    target_dir.rmdir()
    result = cli("activate", "f", expect=5)
    assert "path-writable" in result.stderr and "stays PAUSED" in result.stderr and "fix:" in result.stderr
    shown = json.loads(cli("--json", "show", "f").stdout)
    assert shown["status"] == "PAUSED"
    assert shown["last_check"]["ok"] is False
    assert shown["last_check"]["steps"][0]["status"] == "failed"
    err = json.loads(cli("--json", "activate", "f", expect=5).stderr)["error"]
    assert err["code"] == "CHECK_FAILED" and err["details"][0]["name"] == "path-writable"
    checked = cli("check", "f", expect=5)
    assert "path-writable" in checked.stderr and "FAILED" in checked.stderr and not checked.stdout
    same = json.loads(cli("--json", "check", "f", expect=5).stderr)["error"]  # the same channel and shape as activate
    assert same["code"] == "CHECK_FAILED" and same["details"][0]["name"] == "path-writable"


def test_create_check_failure_saves_nothing(cli, datamart, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    target = ro / "o.ndjson"
    target.mkdir()  # a directory where the file should be: passes offline parent checks? no: it is refused
    result = cli("create", "--type", "file", "--name", "f", "--path", target, "--check", expect=4)
    assert "is a directory" in result.stderr
    assert json.loads(cli("--json", "list").stdout) == []


def test_error_replication_cannot_be_activated_only_recreated(cli, datamart, tmp_path: Path) -> None:
    rep = json.loads(cli("--json", "create", "--type", "file", "--name", "f", "--path", tmp_path / "o").stdout)
    cli("activate", "f")
    mark_error(Registry(), rep["id"], code="UNREACHABLE", message="disk gone", undelivered=3, reason="test")
    shown = json.loads(cli("--json", "show", "f").stdout)
    assert shown["status"] == "ERROR" and shown["error"]["code"] == "UNREACHABLE"
    assert "recreate" in cli("activate", "f", expect=6).stderr
    assert "ERROR" in cli("pause", "f", expect=6).stderr
    assert "ERROR (UNREACHABLE)" in cli("list").stdout
    new_path = tmp_path / "new.ndjson"
    rebound = json.loads(cli("--json", "recreate", "f", "--path", new_path).stdout)
    assert rebound["status"] == "PAUSED" and rebound["id"] == rep["id"] and rebound["name"] == "f"
    assert rebound["settings"]["path"] == str(new_path)
    assert rebound["past_errors"][0]["code"] == "UNREACHABLE" and rebound["error"] is None
    cli("activate", "f")
    assert [h["to"] for h in json.loads(cli("--json", "history", "f").stdout)] == [
        "PAUSED",
        "ACTIVE",
        "ERROR",
        "PAUSED",
        "ACTIVE",
    ]
    assert "pause it" in cli("recreate", "f", "--path", new_path, expect=6).stderr


def test_names_ids_and_not_found(cli, datamart, tmp_path: Path) -> None:
    rep = json.loads(cli("--json", "create", "--type", "file", "--name", "f", "--path", tmp_path / "o").stdout)
    assert json.loads(cli("--json", "show", rep["id"]).stdout)["name"] == "f"
    assert "already exists" in cli("create", "--type", "file", "--name", "f", "--path", tmp_path / "p", expect=6).stderr
    assert (
        "rep-" in cli("create", "--type", "file", "--name", "rep-0a1b2c3d", "--path", tmp_path / "p", expect=4).stderr
    )
    err = json.loads(cli("--json", "show", "missing", expect=3).stderr)
    assert err["error"]["code"] == "NOT_FOUND" and "missing" in err["error"]["message"]
    cli("create", "--type", "nope", "--name", "g", expect=2)


def test_delete_never_prompts_without_a_tty(cli, datamart, tmp_path: Path) -> None:
    cli("create", "--type", "file", "--name", "f", "--path", tmp_path / "o")
    assert "--yes" in cli("delete", "f", expect=2).stderr
    assert json.loads(cli("--json", "delete", "f", "--yes").stdout)["name"] == "f"
    cli("show", "f", expect=3)


def test_list_filters(cli, datamart, tmp_path: Path) -> None:
    cli("create", "--type", "file", "--name", "a", "--path", tmp_path / "a")
    cli("create", "--type", "file", "--name", "b", "--path", tmp_path / "b")
    cli("activate", "b")
    names = [r["name"] for r in json.loads(cli("--json", "list", "--status", "active").stdout)]
    assert names == ["b"]
    assert [r["name"] for r in json.loads(cli("--json", "list", "--datamart", "dm1").stdout)] == ["a", "b"]
    cli("list", "--status", "weird", expect=2)


def test_support_bundle(cli, datamart, tmp_path: Path) -> None:
    cli("create", "--type", "file", "--name", "f", "--path", tmp_path / "o")
    cli("activate", "f")
    bundle = json.loads(cli("support-bundle", "f").stdout)
    assert bundle["replication"]["name"] == "f" and bundle["last_check"]["ok"] is True
    assert bundle["versions"]["dmrepl"] and bundle["history"][-1]["to"] == "ACTIVE"


def test_unexpected_errors_have_no_traceback_unless_verbose(cli, datamart, tmp_path: Path, monkeypatch) -> None:
    import dmrepl.replications as module

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(module, "list_", boom)
    result = cli("list", expect=1)
    assert "kaboom" in result.stderr and "Traceback" not in result.stderr and "-v" in result.stderr
    assert "Traceback" in cli("-v", "list", expect=1).stderr


@pytest.mark.parametrize("args", [["--help"], ["sync", "--help"], ["datamart", "--help"], ["create", "--help"]])
def test_help(cli, args) -> None:
    out = cli(*args).stdout
    assert "Usage" in out
    if args == ["--help"]:
        for word in ("Exit codes", "130 interrupted", "datamart", "sync", "replicate", "support-bundle"):
            assert word in out


def test_version_and_no_heavy_imports(run_dmrepl) -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom dmrepl.cli.app import app\n"
        "try:\n    app(['list'], prog_name='dmrepl')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in sys.modules if m.startswith(('grpc', 'google.cloud', 'azure', 'proton'))]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert run_dmrepl("--version").stdout.startswith("dmrepl ")
    assert json.loads(run_dmrepl("--json", "--version").stdout)["version"]
