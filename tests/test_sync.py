"""Initial synchronizations end to end on the file destination: operations, rejects, refusals, checkpoints, resume."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dmrepl.errors import InvalidInputError
from dmrepl.models import ExecutionStatus
from dmrepl.operations import DATA
from dmrepl.registry import Registry
from tests import generate
from tests.conftest import DATA_DIR, spawn_dmrepl
from tests.factories import fake_running_sync


@pytest.fixture(params=["1", "2"], ids=["in-process", "2-workers"])
def sync_workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a test with the in-process engine and with worker processes (forced even for small exports)."""
    monkeypatch.setenv("DMREPL_SYNC_WORKERS", request.param)
    return int(request.param)


def ops_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def keys(ops: list[dict[str, Any]]) -> Counter[tuple[str, str, str]]:
    return Counter((o["doc_type"], o["doc_id"], o["op"]) for o in ops)


def executions() -> dict[str, Any]:
    return Registry().load().to_dict()["executions"]


@pytest.mark.parametrize("version", ["v202205", "v201901"])
def test_sample_exports_produce_the_expected_operations(sync_workers, cli, tmp_path: Path, version: str) -> None:
    cli("datamart", "add", "dm1", "--system-version", version)
    out = tmp_path / "out.ndjson"
    cli("create", "--type", "file", "--name", "local", "--path", out)
    cli("activate", "local")
    result = json.loads(cli("--json", "sync", "start", DATA_DIR / f"userpoints-{version}.ndjson").stdout)
    expected = ops_of(DATA_DIR / f"userpoints-{version}.operations.ndjson")
    got = ops_of(out)
    assert len(got) == len(expected)
    start_ts = result["start_ts"]
    for g, e in zip(got, expected, strict=True):
        if e["ts"] == 1700000000000:  # elements without a timestamp of their own get the execution's start
            e["ts"] = start_ts
        assert g == e
        assert list(g) == ["ts", "doc_type", "doc_id", "op", "value"]
    assert result["status"] == "SUCCEEDED"
    assert sum(result["operations"].values()) == len(expected)
    assert result["replications"][next(iter(result["replications"]))]["delivered"] == len(expected)
    assert (
        result["files"][0]["sha256"]
        and result["files"][0]["size"] == (DATA_DIR / f"userpoints-{version}.ndjson").stat().st_size
    )


def test_generated_export_with_bad_lines(sync_workers, cli, datamart, tmp_path: Path) -> None:
    export = tmp_path / "export.ndjson.gz"
    expected, bad = generate.write(export, 2500, compress=True, bad_every=83)
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / f"{name}.ndjson")
        cli("create", "--type", "file", "--name", name, "--path", outs[-1])
        cli("activate", name)
    result = json.loads(cli("--json", "sync", "start", export).stdout)
    for out in outs:
        assert keys(ops_of(out)) == expected
    assert result["rejects"] == len(bad) and result["lines_read"] == 2500
    rejects = [json.loads(line) for line in Path(result["rejects_file"]).read_text().splitlines()]
    assert [r["line"] for r in rejects] == bad
    assert all(r["file"] == str(export) and r["reason"] for r in rejects)
    assert result["files"][0]["compressed"] is True


def _nasty_export(path: Path) -> None:
    """Everything framing must agree on: a BOM, CRLF, blank lines, over-long lines (with --max-line-bytes 3000)
    and bad lines, spread over many byte ranges."""
    rng = random.Random(99)
    good = [line for line, _ in generate.lines(600, bad_every=37)]
    out = [b"\xef\xbb\xbf"]
    for i, line in enumerate(good):
        out.append(line.rstrip(b"\n") + (b"\r\n" if i % 5 == 0 else b"\n"))
        if rng.random() < 0.05:
            out.append(rng.choice([b"\n", b"  \t\r\n", b"\r\n"]))
        if rng.random() < 0.03:
            out.append(b'{"user_point_id": "' + b"x" * rng.randint(3000, 9000) + b'"}\n')
    path.write_bytes(b"".join(out) + b'{"no": "newline at the end"}')


#: dmrepl's own entry point with ~80 byte ranges over the nasty export (lines straddling their boundaries), which
#: prints the start method of its workers; with "thread", a thread of its own runs first, so workers are spawned.
_RANGES_RUNNER = """
import sys, threading
from dmrepl.sync import pool as shards
shards.CHUNK_BYTES = shards.MIN_RANGE_BYTES = 16 * 1024
real, used = shards.start_method, []
shards.start_method = lambda: used.append(real()) or used[-1]
if sys.argv.pop(1) == "thread":
    threading.Thread(target=threading.Event().wait, daemon=True).start()
from dmrepl.cli.app import main
try:
    main()
finally:
    print("start methods:", used, file=sys.stderr)
"""


def test_workers_framing_byte_ranges_agree_with_the_reader(cli, datamart, tmp_path: Path) -> None:
    """Workers frame their own byte ranges: line numbers, rejects and operations must be exactly the in-process
    engine's, which frames the file as one stream; with forked workers and with spawned ones (dmrepl spawns when
    another thread runs). Each run is a process of its own, so that the forked one is forked from a process
    without the test's threads."""
    export = tmp_path / "nasty.ndjson"
    _nasty_export(export)
    results = {}
    for name, workers, methods in (("in-process", "1", "[]"), ("fork", "2", "['fork']"), ("spawn", "2", "['spawn']")):
        out = tmp_path / f"out-{name}.ndjson"
        cli("create", "--type", "file", "--name", name, "--path", out)
        cli("activate", name)
        args = ["--json", "sync", "start", str(export), "--workers", workers, "--max-line-bytes", "3000"]
        run = subprocess.run(
            [sys.executable, "-c", _RANGES_RUNNER, "thread" if name == "spawn" else "-", *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 0, run.stderr
        assert f"start methods: {methods}" in run.stderr
        result = json.loads(run.stdout)
        cli("pause", name)
        rejects = [json.loads(line) for line in Path(result["rejects_file"]).read_text().splitlines()]
        results[name] = (Counter(out.read_bytes().splitlines()), result, [(r["line"], r["reason"]) for r in rejects])
        with Registry().transaction() as data:  # the weekly rule would refuse the next run
            data.executions.clear()
    ops, reference, rejected = results["in-process"]
    assert sum(ops.values()) == sum(reference["operations"].values()) and reference["lines_read"] > 600
    assert any("line too long" in why for _, why in rejected) and any("not valid JSON" in why for _, why in rejected)
    for name in ("fork", "spawn"):
        ops2, result, rejected2 = results[name]
        assert ops2 == ops and rejected2 == rejected, name
        assert (result["lines_read"], result["rejects"], result["operations"]) == (
            reference["lines_read"],
            reference["rejects"],
            reference["operations"],
        ), name


def test_max_rejects_aborts_exactly_at_the_limit(sync_workers, cli, file_replication, tmp_path: Path) -> None:
    """The run stops at the 6th bad line: it is recorded, and no operation of a line after it is delivered, with
    workers asked for too (ranges of 16 KiB, so the limit falls inside one of many)."""
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    generate.write(export, 3000, bad_every=10)
    per_line = list(generate.lines(3000, bad_every=10))
    sixth_bad = [no for no, (_, exp) in enumerate(per_line, start=1) if not exp][5]
    before: Counter[tuple[str, str, str]] = Counter()
    for _, exp in per_line[: sixth_bad - 1]:
        before.update(exp)
    result = cli("sync", "start", export, "--max-rejects", "5", "--workers", "2", expect=4)
    assert "--max-rejects 5" in result.stderr and f"line {sixth_bad}" in result.stderr
    (execution,) = executions().values()
    assert execution["status"] == "FAILED" and execution["rejects"] == 6
    assert keys(ops_of(out)) == before


def test_refusals(cli, datamart, tmp_path: Path) -> None:
    export = DATA_DIR / "userpoints-v202205.ndjson"
    cli("create", "--type", "file", "--name", "local", "--path", tmp_path / "o.ndjson")
    err = cli("sync", "start", export, expect=6).stderr
    assert "no ACTIVE replication" in err
    cli("activate", "local")
    cli("sync", "start", export)
    err = cli("--json", "sync", "start", export, expect=6).stderr
    error = json.loads(err)["error"]
    assert error["code"] == "WEEKLY_RULE" and "allowed from" in error["message"]
    # a missing export is invalid input whatever the datamart's state: exactly 4, even under the weekly rule
    error = json.loads(cli("--json", "sync", "start", tmp_path / "missing.ndjson", expect=4).stderr)["error"]
    assert "missing.ndjson" in error["message"], error
    cli("datamart", "add", "dm2")
    cli("create", "--type", "file", "--name", "two", "--path", tmp_path / "2.ndjson", "--datamart", "dm2")
    cli("activate", "two")
    assert "missing.ndjson" in cli("sync", "start", "--datamart", "dm2", tmp_path / "missing.ndjson", expect=4).stderr
    empty = tmp_path / "empty.ndjson"
    empty.write_text("\n\n")
    result = json.loads(cli("--json", "sync", "start", "--datamart", "dm2", empty).stdout)  # blank lines only
    assert (result["status"], result["lines_read"], result["rejects"], result["operations"]) == ("SUCCEEDED", 0, 0, {})
    assert not (tmp_path / "2.ndjson").exists() or (tmp_path / "2.ndjson").read_bytes() == b""


def test_status_changes_are_refused_while_a_sync_runs(cli, file_replication, tmp_path: Path) -> None:
    cli("create", "--type", "file", "--name", "other", "--path", tmp_path / "x.ndjson")
    proc = fake_running_sync("dm1")
    try:
        for args in (
            ["pause", "local"],
            ["activate", "other"],
            ["delete", "other", "--yes"],
            ["recreate", "other", "--path", tmp_path / "y.ndjson"],
        ):
            err = cli(*args, expect=6).stderr
            assert "sync-running" in err and f"pid {proc.pid}" in err and "42%" in err
        err = cli("sync", "start", DATA_DIR / "userpoints-v202205.ndjson", expect=6).stderr
        assert "sync-running" in err
        assert "RUNNING" in cli("sync", "list").stdout
    finally:
        proc.kill()
        proc.wait()
    listed = json.loads(cli("--json", "sync", "list").stdout)
    assert listed[0]["status"] == "STALE"
    cli("pause", "local")


def test_plan_sends_nothing(cli, file_replication, tmp_path: Path) -> None:
    _, out = file_replication
    cli("create", "--type", "file", "--name", "paused", "--path", tmp_path / "p.ndjson")
    export = tmp_path / "export.ndjson"
    expected, bad = generate.write(export, 200, bad_every=50)
    plan = json.loads(cli("--json", "sync", "plan", export).stdout)
    assert plan["operations_total"] == sum(expected.values()) and plan["rejects"] == len(bad)
    assert [r["name"] for r in plan["would_receive"]] == ["local"]
    assert plan["would_not_receive"][0]["name"] == "paused" and "PAUSED" in plan["would_not_receive"][0]["why"]
    assert plan["next_allowed"] == "now"
    assert not out.exists()
    assert "UserActivity" in cli("sync", "plan", export).stdout
    cli("sync", "start", export)
    assert json.loads(cli("--json", "sync", "plan", export).stdout)["refusals"][0]["code"] == "WEEKLY_RULE"


def test_replication_in_error_fails_the_run_but_not_the_others(sync_workers, cli, datamart, tmp_path: Path) -> None:
    good = tmp_path / "good.ndjson"
    cli("create", "--type", "file", "--name", "good", "--path", good)
    cli("create", "--type", "file", "--name", "full", "--path", "/dev/full")  # every write fails: ENOSPC
    cli("activate", "good")
    cli("activate", "full")
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 500)
    result = cli("--json", "sync", "start", export, expect=7)
    assert "full" in json.loads(result.stderr)["error"]["message"]
    assert keys(ops_of(good)) == expected
    (execution,) = executions().values()
    assert execution["status"] == "FAILED"
    by_name = {r["name"]: r for r in execution["replications"].values()}
    assert by_name["good"]["delivered"] == sum(expected.values()) and by_name["good"]["failed"] == 0
    assert by_name["full"]["failed"] == sum(expected.values()) and by_name["full"]["delivered"] == 0
    full = json.loads(cli("--json", "show", "full").stdout)
    assert full["status"] == "ERROR" and full["error"]["code"] == "UNWRITABLE"
    assert full["error"]["undelivered"] == sum(expected.values())


def _start_sync(export: Path, *extra: str) -> subprocess.Popen[str]:
    return spawn_dmrepl("--json", "sync", "start", export, "--checkpoint-every", "0.1", *extra)


def _resume(exec_id: str) -> subprocess.Popen[str]:
    return spawn_dmrepl("--json", "sync", "resume", exec_id, "--checkpoint-every", "0.1")


def _wait_for_lines(path: Path, proc: subprocess.Popen[str], at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.stat().st_size > at_least * 100:
            return
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _proc_state(p)]
        time.sleep(0.05)
    assert not alive, f"worker processes {alive} outlived their killed main process"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_sigkill_at_random_points_then_resume_loses_nothing(
    sync_workers, cli, file_replication, tmp_path: Path
) -> None:
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 12_000)
    total = sum(expected.values())
    rng = random.Random(1234)
    proc = _start_sync(export)
    kills = 0
    exec_id = None
    for _ in range(4):
        _wait_for_lines(out, proc, int(total * rng.uniform(0.05, 0.2)) * (kills + 1))
        if proc.poll() is not None:
            break
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        _wait_gone(workers)  # orphaned workers finish what they hold, see the pipe close, and exit
        (execution,) = executions().values()
        exec_id = execution["id"]
        assert execution["status"] == "RUNNING"  # the killed process could not say otherwise...
        listed = json.loads(cli("--json", "sync", "show", exec_id).stdout)
        assert listed["status"] == "STALE"  # ...but dmrepl sees its pid is gone
        proc = _resume(exec_id)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert kills >= 2
    got = keys(ops_of(out))
    assert set(got) == set(expected)  # every expected operation delivered at least once
    duplicates = sum(got.values()) - total
    assert 0 <= duplicates < total // 2, duplicates
    final = json.loads(stdout)
    assert final["status"] == "SUCCEEDED" and sum(final["operations"].values()) == total
    assert final["lines_read"] == 12_000 and 1 <= len(final["resumes"]) <= kills  # a kill may precede the record


def test_a_stalled_worker_does_not_hold_back_the_other(file_replication, tmp_path: Path) -> None:
    """Chunks go to the least busy worker: while one worker is stopped (as a process on a starved core would be),
    the other goes on through the export instead of waiting for it, and the result is still exact."""
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 6000)  # 16 ranges: 3 at most wait in the stopped worker's queue
    total = sum(expected.values())
    # No checkpoint meanwhile: a checkpoint waits, by design, for the stopped worker's ranges to be acknowledged.
    proc = _start_sync(export, "--workers", "2", "--checkpoint-every", "600")
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.005)
    assert len(workers) == 2, "the sync did not start its two workers"
    os.kill(workers[0], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        written = 0
        while time.monotonic() < deadline and written < total // 2:
            written = out.read_bytes().count(b"\n") if out.exists() else 0
            time.sleep(0.05)
    finally:
        os.kill(workers[0], signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert written >= total // 2, f"only {written} of {total} operations written while one worker was stopped"
    assert keys(ops_of(out)) == expected


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_checkpoints_and_resume_completes(sync_workers, cli, file_replication, tmp_path: Path, sig) -> None:
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 12_000)
    proc = _start_sync(export)
    _wait_for_lines(out, proc, 20_000)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    (execution,) = executions().values()
    assert execution["status"] == "CANCELED"
    checkpointed = json.loads(
        (Path(os.environ["DMREPL_HOME"]) / "executions" / execution["id"] / "checkpoint.json").read_text()
    )
    delivered_at_stop = len(ops_of(out))
    assert checkpointed["reps"][next(iter(checkpointed["reps"]))]["delivered"] == delivered_at_stop
    result = json.loads(cli("--json", "sync", "resume", execution["id"]).stdout)
    got = keys(ops_of(out))
    assert got == expected  # a graceful stop flushes and checkpoints: not even a duplicate
    assert result["status"] == "SUCCEEDED"


def test_resume_refusals(cli, file_replication, tmp_path: Path) -> None:
    cli("sync", "resume", "nope", expect=3)
    export = tmp_path / "e.ndjson"
    generate.write(export, 10)
    cli("sync", "start", export)
    (execution,) = executions().values()
    assert "SUCCEEDED" in cli("sync", "resume", execution["id"], expect=6).stderr


def test_export_changed_before_resume_is_refused(cli, file_replication, tmp_path: Path) -> None:
    export = tmp_path / "e.ndjson"
    generate.write(export, 10)
    cli("sync", "start", export)
    with Registry().transaction() as data:
        next(iter(data.executions.values())).status = ExecutionStatus.FAILED
    export.write_bytes(export.read_bytes() + b"\n")
    (execution,) = executions().values()
    assert "changed" in cli("sync", "resume", execution["id"], expect=4).stderr


def test_an_export_changed_while_it_is_read_fails_the_execution(sync_workers, file_replication, tmp_path: Path) -> None:
    """Appended to mid-run (here at the first point the engine polls for a stop): the run cannot match any one
    version of the file, so it fails, saying so, instead of reporting a success."""
    from dmrepl import sync as engine

    export = tmp_path / "export.ndjson"
    generate.write(export, 3000)
    touched: list[bool] = []

    def stop() -> bool:
        if not touched:
            touched.append(True)
            with open(export, "ab") as f:
                f.write(b"\n")
        return False

    with pytest.raises(InvalidInputError, match="changed while it was read") as raised:
        engine.start(Registry(), [export], datamart=None, opts=engine.SyncOptions(), stop=stop)
    assert touched and raised.value.code == "EXPORT_CHANGED"
    (execution,) = executions().values()
    assert execution["status"] == "FAILED" and "changed while it was read" in execution["error"]
    assert "resume" not in execution["error"]  # resuming would read the changed file: a new sync is the way


def test_gzip_by_magic_and_forced_format(cli, file_replication, tmp_path: Path) -> None:
    _, out = file_replication
    ops = (DATA_DIR / "userpoints-v202205.operations.ndjson").read_bytes()
    disguised = tmp_path / "ops.txt"
    disguised.write_bytes(gzip.compress(ops))
    result = json.loads(cli("--json", "sync", "start", disguised, "--format", "operations").stdout)
    assert result["files"][0]["format"] == "operations" and result["files"][0]["compressed"] is True
    assert ops_of(out) == ops_of(DATA_DIR / "userpoints-v202205.operations.ndjson")
    cli("sync", "start", disguised, "--format", "xml", expect=2)


def test_dashboard_and_show(cli, file_replication, tmp_path: Path) -> None:
    export = tmp_path / "e.ndjson"
    generate.write(export, 20, bad_every=7)
    cli("sync", "start", export)
    listing = cli("sync", "list").stdout
    assert "SUCCEEDED" in listing and "local:" in listing
    (execution,) = executions().values()
    shown = cli("sync", "show", execution["id"]).stdout
    assert "rejected lines" in shown and "UserActivity" in shown
    cli("sync", "show", "nope", expect=3)


def test_progress_bar_only_on_a_terminal(cli, file_replication, tmp_path: Path) -> None:
    import pty

    export = tmp_path / "e.ndjson"
    generate.write(export, 3000)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmrepl", "sync", "start", str(export)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "100"},
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0
    assert b"ops/s" in seen and b"sync" in seen
    with Registry().transaction() as data:  # allow a second run: the weekly rule is not what this tests
        data.executions.clear()
    quiet = cli("sync", "start", export)  # stderr is not a terminal here: no bar
    assert "ops/s" not in quiet.stderr


def test_a_stale_execution_is_marked_failed_by_the_next_start(cli, file_replication, tmp_path: Path) -> None:
    proc = fake_running_sync("dm1")
    proc.kill()
    proc.wait()
    export = tmp_path / "e.ndjson"
    generate.write(export, 10)
    cli("sync", "start", export)
    stale = executions()["sync-running"]
    assert stale["status"] == "FAILED" and "resume" in stale["error"]


def test_second_interrupt_aborts_and_keeps_the_last_safe_checkpoint(cli, file_replication, tmp_path: Path) -> None:
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 12_000)
    proc = _start_sync(export)
    _wait_for_lines(out, proc, 20_000)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    (execution,) = executions().values()
    assert execution["status"] == "CANCELED"
    cli("sync", "resume", execution["id"])
    assert set(keys(ops_of(out))) == set(expected)


def test_workers_keep_each_user_points_operations_together_and_in_order(cli, file_replication, tmp_path: Path) -> None:
    _, out = file_replication
    export = tmp_path / "e.ndjson"
    generate.write(export, 3000, bad_every=101)
    result = json.loads(cli("--json", "sync", "start", export, "--workers", "2").stdout)
    assert result["status"] == "SUCCEEDED"
    reference = tmp_path / "ref.ndjson"
    from dmrepl.exports import ExportReader

    expected = [m[DATA] for line in ExportReader(export, start_ts=result["start_ts"]).lines() for m in line.messages]
    reference.write_bytes(b"\n".join(expected) + b"\n")
    by_user: dict[str, list[bytes]] = {}
    for line in out.read_bytes().splitlines():
        by_user.setdefault(json.loads(line)["doc_id"][:36], []).append(line)
    ref_by_user: dict[str, list[bytes]] = {}
    for line in reference.read_bytes().splitlines():
        ref_by_user.setdefault(json.loads(line)["doc_id"][:36], []).append(line)
    assert by_user == ref_by_user  # same operations, and per user point the same order


def test_when_every_replication_failed_the_undelivered_count_is_still_exact(
    sync_workers, cli, datamart, tmp_path: Path
) -> None:
    cli("create", "--type", "file", "--name", "full", "--path", "/dev/full")
    cli("activate", "full")
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 3000)
    cli("sync", "start", export, "--checkpoint-every", "0.05", expect=7)
    (execution,) = executions().values()
    (entry,) = execution["replications"].values()
    assert entry["failed"] == sum(expected.values()) and execution["lines_read"] == 3000
    assert json.loads(cli("--json", "show", "full").stdout)["error"]["undelivered"] == sum(expected.values())
