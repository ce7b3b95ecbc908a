"""Nothing lost, nothing misleading: the file destination never destroys what it did not write, files holding
personal data are private, the secret store trusts nothing on disk, and the operating system's refusals are named
(exit 8), never called bugs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR

SAMPLE = DATA_DIR / "userpoints-v202205.ndjson"


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- the file destination --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [(b'{"a": 1}\n{"b": 2}', "does not end with a newline"), (b"name,email\nx,y\n", "line 1 is not a JSON object")],
)
def test_create_refuses_a_file_it_did_not_write(cli, datamart, tmp_path: Path, content: bytes, why: str) -> None:
    single = tmp_path / "single.json"
    single.write_bytes(content)
    err = cli("create", "--type", "file", "--name", "f", "--path", single, expect=4).stderr
    assert why in err and str(single) in err
    assert single.read_bytes() == content
    assert json.loads(cli("--json", "list").stdout) == []


def test_an_ndjson_file_is_appended_to_not_rewritten(cli, datamart, tmp_path: Path) -> None:
    out = tmp_path / "existing.ndjson"
    out.write_bytes(b'{"kept": true}\n')
    cli("create", "--type", "file", "--name", "f", "--path", out)
    cli("activate", "f")
    cli("sync", "start", SAMPLE)
    lines = out.read_bytes().splitlines()
    assert lines[0] == b'{"kept": true}' and len(lines) == 1 + 64


def test_a_sync_never_appends_into_its_own_export(cli, datamart, tmp_path: Path) -> None:
    export = tmp_path / "export.ndjson"
    shutil.copy(SAMPLE, export)
    before = export.read_bytes()
    ops = tmp_path / "ops.ndjson"
    cli("create", "--type", "file", "--name", "f", "--path", ops)
    cli("activate", "f")
    cli("sync", "start", SAMPLE)  # the replication's file is now dmrepl's own output, and a valid export
    err = json.loads(cli("--json", "sync", "start", ops, expect=4).stderr)["error"]
    assert err["code"] == "DESTINATION_IS_EXPORT" and str(ops) in err["message"]
    assert json.loads(cli("--json", "sync", "plan", ops, expect=4).stderr)["error"]["code"] == "DESTINATION_IS_EXPORT"
    assert export.read_bytes() == before


def test_files_with_personal_data_are_private_whatever_the_umask(cli, datamart, tmp_path: Path, umask_022) -> None:
    out = tmp_path / "ops.ndjson"
    shared = tmp_path / "shared.ndjson"
    cli("create", "--type", "file", "--name", "f", "--path", out)
    cli("create", "--type", "file", "--name", "g", "--path", shared, "--mode", "640")
    cli("activate", "f")
    cli("activate", "g")
    export = tmp_path / "export.ndjson"
    export.write_bytes(SAMPLE.read_bytes() + b"not json\n")
    result = json.loads(cli("--json", "sync", "start", export).stdout)
    rejects = Path(result["rejects_file"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    assert stat.S_IMODE(rejects.stat().st_mode) == 0o600
    assert stat.S_IMODE(rejects.parent.stat().st_mode) == 0o700
    assert cli("create", "--type", "file", "--name", "h", "--path", tmp_path / "x", "--mode", "rw", expect=4)


# --- the secret store --------------------------------------------------------------------------------------------


@pytest.fixture
def stored(cli, datamart, tmp_path: Path, isolated: Path) -> tuple[Path, Path]:
    """A file replication's secret can't exist, so an Event Hubs one (checked offline only) with a file-store secret."""
    from tests.factories import connection_string

    creds = tmp_path / "credentials.txt"
    creds.write_text(connection_string(host="127.0.0.1:1", hub="hub1"))
    cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", creds, "--secret-store", "file")
    (secret,) = (isolated / "secrets").iterdir()
    return isolated / "secrets", secret


def test_a_swapped_secret_file_is_refused(cli, stored, tmp_path: Path) -> None:
    from tests.factories import connection_string

    _, secret = stored
    secret.write_text(connection_string(host="other.servicebus.windows.net", hub="hub1"))
    err = json.loads(cli("--json", "check", "eh", "--timeout", "2", expect=4).stderr)["error"]
    assert err["code"] == "SECRET_MISMATCH" and "swapped" in err["message"]
    assert "other.servicebus" not in err["message"]


def test_a_secret_file_that_is_not_0600_is_refused(cli, stored) -> None:
    _, secret = stored
    secret.chmod(0o644)
    err = json.loads(cli("--json", "check", "eh", "--timeout", "2", expect=4).stderr)["error"]
    assert err["code"] == "SECRET_STORE_UNSAFE" and "0644" in err["message"]


@pytest.mark.parametrize("how", ["symlink", "group-writable", "another-owner"])
def test_an_untrustworthy_secret_directory_is_refused(cli, stored, tmp_path: Path, how: str) -> None:
    directory, _ = stored
    if how == "symlink":
        moved = tmp_path / "elsewhere"
        directory.rename(moved)
        directory.symlink_to(moved)
    elif how == "group-writable":
        directory.chmod(0o770)
    else:
        os.chown(directory, 65534, 65534)  # nobody: the tests run as root, who may give a directory away
    err = json.loads(cli("--json", "check", "eh", "--timeout", "2", expect=4).stderr)["error"]
    assert err["code"] == "SECRET_STORE_UNSAFE" and str(directory) in err["message"]


# --- what the operating system refuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "dangling-symlink"])
def test_a_home_that_is_a_file_is_a_system_error_not_a_bug(run_dmrepl, tmp_path: Path, kind: str) -> None:
    home = tmp_path / "home"
    if kind == "file":
        home.write_text("oops")
    else:
        home.symlink_to(tmp_path / "nowhere")
    result = run_dmrepl("--home", home, "datamart", "add", "dm1")
    assert result.returncode == 8, result.stderr
    assert str(home) in result.stderr and "unexpected" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 256 KiB (tmpfs), to fill or to make read-only: root ignores permission bits."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_and_leaves_no_orphan_secret(run_dmrepl, small_fs: Path, tmp_path: Path) -> None:
    from tests.factories import connection_string

    home = small_fs / "home"
    assert run_dmrepl("--home", home, "datamart", "add", "dm1").returncode == 0
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f:  # leave room for the secret but not for the registry's rewrite
        try:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - 6000)
    creds = tmp_path / "credentials.txt"
    creds.write_text(connection_string(hub="hub1"))
    result = run_dmrepl(
        "--home",
        home,
        "create",
        "--type",
        "azure-event-hubs",
        "--name",
        "eh",
        "--credentials",
        creds,
        "--secret-store",
        "file",
    )
    assert result.returncode == 8, result.stderr
    assert "No space left on device" in result.stderr and "free some space" in result.stderr
    assert list((home / "secrets").iterdir()) == []
    assert "eh" not in (home / "registry.toml").read_text()


def test_a_read_only_home_is_named(run_dmrepl, small_fs: Path, tmp_path: Path) -> None:
    home = small_fs / "home"
    assert run_dmrepl("--home", home, "datamart", "add", "dm1").returncode == 0
    assert (
        run_dmrepl("--home", home, "create", "--type", "file", "--name", "f", "--path", tmp_path / "o").returncode == 0
    )
    assert run_dmrepl("--home", home, "activate", "f").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for args in (["pause", "f"], ["sync", "start", SAMPLE], ["datamart", "add", "dm2"]):
        result = run_dmrepl("--home", home, *args)
        assert result.returncode == 8, (args, result.stderr)
        assert "Read-only file system" in result.stderr and "unexpected" not in result.stderr


def test_a_destination_directory_that_disappeared(cli, datamart, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    cli("create", "--type", "file", "--name", "f", "--path", gone / "o.ndjson")
    cli("activate", "f")
    gone.rmdir()
    check = json.loads(cli("--json", "check", "f", expect=5).stderr)["error"]
    assert check["details"][0]["code"] == "PATH_NOT_FOUND"
    result = cli("--json", "sync", "start", SAMPLE, expect=7)
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "REPLICATION_ERROR" and "UNWRITABLE" in error["message"]
    shown = json.loads(cli("--json", "show", "f").stdout)
    assert shown["status"] == "ERROR" and str(gone) in shown["error"]["message"]


# --- initial synchronizations ------------------------------------------------------------------------------------


def _executions() -> dict:
    from dmrepl.registry import Registry

    return Registry().load().to_dict()["executions"]


def _set_started(exec_id: str, when: str) -> None:
    from dmrepl.registry import Registry

    with Registry().transaction() as data:
        data.executions[exec_id].started_at = when


def test_an_execution_older_than_a_success_cannot_be_resumed(cli, file_replication, tmp_path: Path) -> None:
    export = tmp_path / "e.ndjson"
    export.write_bytes(SAMPLE.read_bytes() + b"bad\n" + SAMPLE.read_bytes())
    cli("sync", "start", export, "--max-rejects", "0", expect=4)  # FAILED, resumable
    (old,) = _executions()
    _set_started(old, "2020-01-01T00:00:00.000Z")
    cli("sync", "start", SAMPLE)  # a newer one SUCCEEDED
    err = json.loads(cli("--json", "sync", "resume", old, expect=6).stderr)["error"]
    assert err["code"] == "SUPERSEDED" and old in err["message"]


def test_a_success_dated_in_the_future_blocks_for_seven_days_from_now_at_most(cli, file_replication) -> None:
    from datetime import UTC, datetime, timedelta

    cli("sync", "start", SAMPLE)
    (exec_id,) = _executions()
    _set_started(exec_id, "2099-01-01T00:00:00.000Z")
    err = json.loads(cli("--json", "sync", "start", SAMPLE, expect=6).stderr)["error"]
    assert err["code"] == "WEEKLY_RULE" and "2099-01-01" in err["message"] and "in the future" in err["message"]
    allowed = datetime.fromisoformat(err["message"].rsplit("allowed from ", 1)[1].replace("Z", "+00:00"))
    assert allowed <= datetime.now(UTC) + timedelta(days=7, seconds=5)


def test_a_worker_killed_by_a_signal_is_named_and_resume_loses_nothing(
    file_replication, run_dmrepl, tmp_path: Path
) -> None:
    """What the OOM killer does to a worker: the execution is FAILED with that cause, exit 8 (not the bug exit 1),
    and `sync resume` delivers every operation."""
    import signal
    import time

    from tests import generate
    from tests.conftest import spawn_dmrepl

    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 6000)
    proc = spawn_dmrepl("--json", "sync", "start", export, "--workers", "2", "--checkpoint-every", "0.1")
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
        try:
            workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            workers = []
    assert len(workers) == 2
    while (not out.exists() or out.stat().st_size < 100_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 8, stderr
    assert "sync worker 2 was killed by signal 9 (SIGKILL)" in stderr and "out of memory?" in stderr
    (execution,) = _executions().values()
    assert execution["status"] == "FAILED" and "killed by signal 9" in execution["error"]
    resumed = run_dmrepl("sync", "resume", execution["id"])
    assert resumed.returncode == 0, resumed.stderr
    got = Counter((o["doc_type"], o["doc_id"], o["op"]) for o in map(json.loads, out.read_bytes().splitlines()))
    assert set(got) == set(expected) and all(got[k] >= n for k, n in expected.items())


def test_smaller_ones(cli, file_replication) -> None:
    assert "not a number of seconds" in cli("check", "local", "--timeout", "nan", expect=2).stderr
    assert "not a number of seconds" in cli("check", "local", "--timeout", "inf", expect=2).stderr
    assert "not a number of seconds" in cli("sync", "start", SAMPLE, "--checkpoint-every", "nan", expect=2).stderr
    err = cli("sync", "start", SAMPLE.parent, expect=4).stderr  # a directory given as an export
    assert "not a regular file" in err
