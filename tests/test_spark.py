"""The Spark engine on a real Spark (`local[2,2]`: two cores, a failed task retried once), one SparkSession for the
whole test session: `dmrepl sync start|resume --engine spark` in this process gets it back from getOrCreate.

What is compared with the local engine: the operations (as multisets of lines, and each user point's operations in
order), the rejects file, the counts; then a task failing mid-shard, a driver killed mid-job, and secrets."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl.delivery import ReplicationBinding
from dmrepl.registry import Registry
from dmrepl.sync import coordinator, spark
from dmrepl.sync.workdir import WorkDir
from tests import generate
from tests.conftest import REPO, Cli, spawn_dmrepl
from tests.peers import storage_servers as servers

SECRET = "canary-secret-7f3a91c2-do-not-leak"


def _java() -> bool:
    return shutil.which("java") is not None or bool(os.environ.get("JAVA_HOME"))


@pytest.fixture(scope="session")
def spark_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Started once: a JVM and its Python workers take seconds to start, a job on them a fraction of that."""
    pytest.importorskip("pyspark", reason="pip install -e '.[test]' (pyspark is in the test extra)")
    if not _java():
        pytest.skip("Spark needs a Java runtime: make peers-deps installs default-jre-headless")
    from pyspark.sql import SparkSession

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"pyspark\.")  # pandas-version notices
    events = tmp_path_factory.mktemp("spark-events")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2,2]")
        .appName("dmrepl tests")
        .config("spark.eventLog.enabled", "true")
        .config("spark.eventLog.dir", str(events))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.speculation", "false")
        .config("spark.log.level", "ERROR")
        .getOrCreate()
    )
    session.dmrepl_events = events  # type: ignore[attr-defined]
    yield session
    session.stop()


@pytest.fixture
def two_exports(tmp_path: Path) -> tuple[list[Path], Counter[generate.Expected], int]:
    """A plain export with bad lines (split into several byte-range shards) and a gzip one (a whole shard)."""
    plain, gz = tmp_path / "a.ndjson", tmp_path / "b.ndjson.gz"
    exp_a, bad_a = generate.write(plain, 2500, bad_every=97)
    exp_b, _ = generate.write(gz, 1200, compress=True, seed=11)
    return [plain, gz], exp_a + exp_b, 2500 + 1200 - len(bad_a)


def _home(monkeypatch: pytest.MonkeyPatch, cli: Cli, where: Path) -> Path:
    """A dmrepl home with a datamart and an active file replication writing to where/out.ndjson."""
    monkeypatch.setenv("DMREPL_HOME", str(where / "home"))
    cli("datamart", "add", "dm1", "--system-version", "v202205")
    out = where / "out.ndjson"
    cli("create", "--type", "file", "--name", "local", "--path", out)
    cli("activate", "local")
    return out


def _lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def _per_user_point(lines: list[bytes]) -> dict[str, list[bytes]]:
    by: dict[str, list[bytes]] = defaultdict(list)
    for line in lines:
        by[json.loads(line)["doc_id"].split(":")[0]].append(line)
    return by


def _execution() -> dict[str, Any]:
    (e,) = Registry().load().to_dict()["executions"].values()
    return e  # type: ignore[no-any-return]


def _rejects(home: Path) -> bytes:
    (path,) = (home / "executions").glob("*/rejects.ndjson")
    return path.read_bytes()


def test_spark_output_equals_the_local_engines_and_no_secret_leaks(
    spark_session, cli, monkeypatch, tmp_path: Path, two_exports
) -> None:
    exports, expected, _ = two_exports
    local_out = _home(monkeypatch, cli, tmp_path / "local")
    cli("sync", "start", *exports)
    local_rejects = _rejects(tmp_path / "local" / "home")
    local_exec = _execution()

    # Every binding the driver resolves carries a secret, as a cloud replication's would.
    def with_secret(registry: Any, rep: Any) -> tuple[ReplicationBinding | None, Any]:
        binding, failure = resolve(registry, rep)
        if binding is not None:
            binding = ReplicationBinding(binding.rep_id, binding.name, binding.type, binding.settings, SECRET)
        return binding, failure

    resolve = coordinator.resolve_binding
    monkeypatch.setattr(coordinator, "resolve_binding", with_secret)
    work = tmp_path / "work"
    spark_out = _home(monkeypatch, cli, tmp_path / "spark")
    result = cli("--json", "sync", "start", *exports, "--engine", "spark", "--master", "local[2]", "--work-dir", work)
    spark_exec = _execution()

    local_lines, spark_lines = _lines(local_out), _lines(spark_out)
    assert Counter(spark_lines) == Counter(local_lines)
    assert _per_user_point(spark_lines) == _per_user_point(local_lines)
    assert sum(expected.values()) == len(spark_lines)
    assert _rejects(tmp_path / "spark" / "home") == local_rejects and local_rejects.count(b"\n") == 25
    for key in ("status", "lines_read", "operations", "rejects"):
        assert spark_exec[key] == local_exec[key], key
    assert spark_exec["status"] == "SUCCEEDED"
    (rep,) = spark_exec["replications"].values()
    assert rep["delivered"] == len(spark_lines)
    assert json.loads((tmp_path / "spark" / "home" / "executions" / spark_exec["id"] / "engine.json").read_text()) == {
        "engine": "spark",
        "master": "local[2]",
        "work_dir": str(work),
    }

    done = list(work.glob("*/done/*.json"))
    assert len(done) >= 3  # several byte ranges of the plain export, and the gzip one
    needles = [SECRET.encode(), base64.b64encode(SECRET.encode())]
    events = list(spark_session.dmrepl_events.iterdir())
    assert events and any(f.stat().st_size for f in events)
    for f in [*work.rglob("*"), *events, *(tmp_path / "spark" / "home").rglob("*")]:
        if f.is_file():
            data = f.read_bytes()
            assert not any(n in data for n in needles), f
    assert SECRET not in result.stdout + result.stderr
    assert all(SECRET not in str(v) for v in spark_session.sparkContext.getConf().getAll())


@pytest.mark.parametrize("limit", [5, 150], ids=["first-shard", "later-shard"])
def test_max_rejects_aborts_at_the_same_line_as_the_local_engine(
    spark_session, cli, monkeypatch, tmp_path: Path, limit: int
) -> None:
    """Exactly as on one machine: the same abort line, rejects file, and delivered operations (none after the line
    that crosses the limit), also when that line is in a later shard than the first, while the shards before and
    after it run in parallel."""
    monkeypatch.setattr(spark, "SHARD_MIN_BYTES", 16 << 10)  # 8 shards (size // 8) of the 330 kB export
    export = tmp_path / "export.ndjson"
    _, bad = generate.write(export, 2000, bad_every=10)
    local_out = _home(monkeypatch, cli, tmp_path / "local")
    local = cli("sync", "start", export, "--max-rejects", limit, expect=4)
    local_rejects = _rejects(tmp_path / "local" / "home")
    spark_out = _home(monkeypatch, cli, tmp_path / "spark")
    remote = cli("sync", "start", export, "--max-rejects", limit, "--engine", "spark", "--master", "local[2]", expect=4)
    assert f"line {bad[limit]}" in local.stderr and f"line {bad[limit]}" in remote.stderr
    assert _rejects(tmp_path / "spark" / "home") == local_rejects and local_rejects.count(b"\n") == limit + 1
    assert Counter(_lines(spark_out)) == Counter(_lines(local_out)) and _lines(local_out)
    e = _execution()
    assert e["status"] == "FAILED" and e["rejects"] == limit + 1
    counted = list((tmp_path / "spark" / "home").rglob("rejects-pass/done/*.json"))
    assert len(counted) >= 4  # several shards, each counted by the conversion-only pass before anything is delivered


def test_a_task_failing_mid_shard_is_retried_from_its_checkpoint(
    spark_session, cli, monkeypatch, tmp_path: Path
) -> None:
    """The hook fails the first attempt that reads 1,200 lines, after it offered a chunk it did not acknowledge:
    Spark retries the task, which continues from the shard's checkpoint (line 1,000 of the gzip shard)."""
    export = tmp_path / "export.ndjson.gz"
    expected, _ = generate.write(export, 2000, compress=True)
    out = _home(monkeypatch, cli, tmp_path)
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(spark.FAIL_HOOK_ENV, f"{marker}:1200")
    monkeypatch.setattr(spark, "CHECKPOINT_LINES", 200)
    result = cli("sync", "start", export, "--engine", "spark", "--master", "local[2]")
    assert marker.exists()  # the hook did fail an attempt
    got = _lines(out)
    keys = Counter((o["doc_type"], o["doc_id"], o["op"]) for o in map(json.loads, got))
    assert set(keys) == set(expected)  # everything delivered
    duplicates = len(got) - sum(expected.values())
    reported = int(result.stderr.split("up to ")[1].split(" operation")[0])
    assert 0 <= duplicates <= reported
    per_line = [len(exp) for _, exp in generate.lines(2000)]
    assert reported <= max(sum(per_line[i : i + 200]) for i in range(0, 1801))  # one chunk of 200 lines at most
    e = _execution()
    assert e["status"] == "SUCCEEDED" and sum(e["operations"].values()) == sum(expected.values())
    (rep,) = e["replications"].values()
    assert rep["delivered"] == sum(expected.values())  # counted from the checkpoint, not twice


def test_driver_killed_then_resume_submits_only_the_shards_not_done(
    spark_session, cli, monkeypatch, tmp_path: Path
) -> None:
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 8000)
    total = sum(expected.values())
    out = _home(monkeypatch, cli, tmp_path)
    work = tmp_path / "work"
    proc = spawn_dmrepl(
        "sync",
        "start",
        export,
        "--engine",
        "spark",
        "--master",
        "local[1]",
        "--work-dir",
        work,
        "--checkpoint-every",
        0.1,
    )
    deadline = time.monotonic() + 240
    # At least one shard finished (the others not all), and the registry shows it (`sync list` while Spark runs).
    while (
        not list(work.glob("*/done/*.json"))
        or not Registry().load().executions
        or not _execution()["progress"]["bytes_read"]
    ):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the Spark job did not finish a shard in time"
        time.sleep(0.05)
    assert "is RUNNING" in cli("pause", "local", expect=6).stderr  # the status lock, while Spark runs the job
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # its JVM sees its stdin close and exits, with the tasks it ran
    done_before = {p.name: p.stat().st_mtime_ns for p in work.glob("*/done/*.json")}
    e = _execution()
    assert e["status"] == "RUNNING"

    result = cli("--json", "sync", "resume", e["id"])  # the engine recorded at the start, by default
    final = json.loads(result.stdout)
    assert final["status"] == "SUCCEEDED" and sum(final["operations"].values()) == total
    assert final["lines_read"] == 8000
    done_after = {p.name: p.stat().st_mtime_ns for p in work.glob("*/done/*.json")}
    assert len(done_before) < len(done_after) >= 8  # the shards of 1/8 of the export each
    assert all(done_after[name] == mtime for name, mtime in done_before.items())  # not run again
    got = _lines(out)
    keys = Counter((o["doc_type"], o["doc_id"], o["op"]) for o in map(json.loads, got))
    assert set(keys) == set(expected)
    assert len(got) - total < total // 2  # at most the shards in flight at the kill were re-sent
    err = cli("sync", "start", export, "--engine", "spark", "--master", "local[2]", expect=6).stderr
    assert "succeeded less than 7 days ago" in err  # the weekly rule, as on one machine


def test_ctrl_c_cancels_the_job_and_resume_finishes_it(spark_session, cli, monkeypatch, tmp_path: Path) -> None:
    """Ctrl-C on the driver (SIGINT: Spark's JVM ignores it, dmrepl cancels the job): exit 130, CANCELED, no
    traceback, and a resume runs only the shards the cancelled job had not finished."""
    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 8000)
    out = _home(monkeypatch, cli, tmp_path)
    work = tmp_path / "work"
    proc = spawn_dmrepl("sync", "start", export, "--engine", "spark", "--master", "local[1]", "--work-dir", work)
    deadline = time.monotonic() + 240
    while not list(work.glob("*/done/*.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the Spark job did not finish a shard in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Py4J" not in stderr
    e = _execution()
    assert e["status"] == "CANCELED"
    done_before = {p.name: p.stat().st_mtime_ns for p in work.glob("*/done/*.json")}
    assert 0 < len(done_before) < 8

    final = json.loads(cli("--json", "sync", "resume", e["id"]).stdout)
    assert final["status"] == "SUCCEEDED" and final["lines_read"] == 8000
    assert sum(final["operations"].values()) == sum(expected.values())
    done_after = {p.name: p.stat().st_mtime_ns for p in work.glob("*/done/*.json")}
    assert all(done_after[name] == mtime for name, mtime in done_before.items())  # not run again
    got = Counter((o["doc_type"], o["doc_id"], o["op"]) for o in map(json.loads, _lines(out)))
    assert set(got) == set(expected)


def test_a_local_master_starts_quickly_unless_told_otherwise() -> None:
    """A local master's driver JVM gets no web UI and the quick JIT alone (docs/scale-out.md); `--spark-conf` wins,
    except for speculation; a cluster's driver and Spark Connect keep their own defaults."""
    conf = spark.session_conf(spark.SparkSettings(master="local[2]"))
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.driver.extraJavaOptions"] == "-XX:TieredStopAtLevel=1"
    assert conf["spark.speculation"] == "false"
    mine = {"spark.ui.enabled": "true", "spark.driver.extraJavaOptions": "-Xmx2g", "spark.speculation": "true"}
    conf = spark.session_conf(spark.SparkSettings(master="local[*]", conf=mine))
    assert conf["spark.ui.enabled"] == "true" and conf["spark.driver.extraJavaOptions"] == "-Xmx2g"
    assert conf["spark.speculation"] == "false"
    conf = spark.session_conf(spark.SparkSettings(master="yarn"))
    assert "spark.ui.enabled" not in conf and "spark.driver.extraJavaOptions" not in conf
    assert spark.session_conf(spark.SparkSettings(master="sc://host:15002", conf={"a": "b"})) == {"a": "b"}


def test_without_the_extra_the_spark_engine_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['pyspark'] = None; sys.modules['pyspark.sql'] = None\n"
        "from dmrepl.cli.app import main\n"
        f"sys.argv = ['dmrepl', 'sync', 'start', {str(tmp_path / 'x.ndjson')!r}, '--engine', 'spark']\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "DMREPL_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 4, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "pip install 'dmrepl[spark]'" in run.stderr
    assert not (tmp_path / "home" / "executions").exists()  # refused before anything was recorded


def test_help_and_the_local_engine_never_import_pyspark(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from dmrepl.cli.app import app\n"
        "r = CliRunner().invoke(app, ['sync', 'start', '--help'])\n"
        "assert r.exit_code == 0 and '--engine' in r.stdout, r.stdout\n"
        "assert 'pyspark' not in sys.modules and 'dmrepl.sync.spark' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "DMREPL_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr


def test_spark_options_need_the_spark_engine(cli, file_replication, tmp_path: Path) -> None:
    export = tmp_path / "export.ndjson"
    generate.write(export, 10)
    result = cli("sync", "start", export, "--master", "local[2]", expect=4)
    assert "--engine spark" in result.stderr
    result = cli("sync", "start", export, "--engine", "spark", "--spark-conf", "novalue", expect=4)
    assert "KEY=VALUE" in result.stderr
    assert not (Path(os.environ["DMREPL_HOME"]) / "executions").exists()


def test_the_work_dir_on_object_storage_is_written_whole_and_read_back(monkeypatch, tmp_path: Path) -> None:
    """Executors on a cluster share the work dir through object storage (here moto's S3 server), as the exports."""
    import fsspec

    with servers.moto_s3() as s3:
        s3.client().create_bucket(Bucket="work")
        s3.add_user("writer", ["s3:*"])
        s3.enforce_auth()
        for k, v in s3.env("writer").items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        spark.check_work_dir("s3://work/dmrepl")
        wd = WorkDir("s3://work/dmrepl")
        assert wd.read("exec-1/done/a.json") is None and wd.names("exec-1/done") == set()
        wd.write("exec-1/checkpoints/a.json", {"offset": 10})
        wd.write("exec-1/checkpoints/a.json", {"offset": 20})
        wd.write("exec-1/done/a.json", {"offset": 30})
        again = pickle.loads(pickle.dumps(wd))  # as a task gets it, in the job's closure
        assert again.read("exec-1/checkpoints/a.json") == {"offset": 20}
        assert again.names("exec-1/done") == {"a.json"}
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        with pytest.raises(OSError, match=r"^.*work dir s3://work/dmrepl: cannot write exec-1/x.json") as err:
            WorkDir("s3://work/dmrepl").write("exec-1/x.json", {})
        assert "\n" not in str(err.value) and s3.keys["writer"][1] not in str(err.value)


def test_a_replication_going_to_error_on_an_executor_fails_the_execution(
    spark_session, cli, monkeypatch, tmp_path: Path
) -> None:
    """The Event Hubs peer revokes the key while the tasks deliver: the tasks that meet the refusal record it in
    their shard's record (they do not fail: a retry would be refused too), and the driver, the registry's only
    writer, puts the replication in ERROR with that code and ends the execution FAILED (exit 7), while the file
    replication beside it gets everything. The counts add up: what the hub acknowledged is `delivered`, the rest
    `failed`."""
    from tests.peers.eventhubs import EventHubsPeer, unique

    export = tmp_path / "export.ndjson"
    expected, _ = generate.write(export, 600, seed=5)  # ~7,800 operations, ~1.1 MB: 5 byte-range shards
    total = sum(expected.values())
    out = _home(monkeypatch, cli, tmp_path)
    # A 32 KiB link limit: ~75 transfers, so a fault after 25 of them lands inside the job.
    with EventHubsPeer(hubs={"hub1": 4}, max_message_size=32 * 1024) as peer:
        creds = tmp_path / "eh.txt"
        creds.write_text(peer.connection_string("send", "hub1") + "\n")
        eh_id = json.loads(
            cli("--json", "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", creds).stdout
        )["id"]
        cli("activate", "eh")
        fired = threading.Event()

        def revoke_mid_job() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if peer.transfers() >= 25:
                    peer.set_auth_failure(True)
                    fired.set()
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=revoke_mid_job, daemon=True)
        watcher.start()
        result = cli("--json", "sync", "start", export, "--engine", "spark", "--master", "local[2]", expect=7)
        watcher.join(5)
        assert fired.is_set()
        received = unique(peer.events("hub1"))

    error = json.loads(result.stderr)["error"]
    assert error["code"] == "REPLICATION_ERROR" and "AUTH_FAILED" in error["message"]
    e = _execution()
    assert e["status"] == "FAILED" and "eh (AUTH_FAILED)" in e["error"]
    assert sum(e["operations"].values()) == total and e["lines_read"] == 600
    reps = {r["name"]: r for r in e["replications"].values()}
    eh, local = reps["eh"], reps["local"]
    assert (eh["status"], eh["error"]["code"]) == ("ERROR", "AUTH_FAILED")
    assert 0 < eh["delivered"] < total and eh["failed"] == total - eh["delivered"] - eh["rejected"] > 0
    assert eh["delivered"] == len(received)  # what the hub acknowledged, each once: no task was retried
    assert (local["status"], local["delivered"], local["failed"]) == ("OK", total, 0)
    lines = _lines(out)
    assert Counter((o["doc_type"], o["doc_id"], o["op"]) for o in map(json.loads, lines)) == expected
    assert {json.loads(ev.body)["doc_id"] for ev in received} <= {json.loads(line)["doc_id"] for line in lines}
    rep = Registry().load().to_dict()["replications"][eh_id]
    assert rep["status"] == "ERROR" and rep["error"]["code"] == "AUTH_FAILED"
    assert rep["error"]["undelivered"] == eh["failed"]


@pytest.fixture(scope="session")
def azurite() -> Iterator[servers.Azurite]:
    """Azurite (Azure Blob Storage's emulator) with a container `exports`, for the whole session."""
    with servers.azurite() as az:
        az.create_container("exports")
        yield az


def test_a_glob_of_objects_through_spark_equals_the_local_engine_on_local_copies(
    spark_session, azurite: servers.Azurite, cli, monkeypatch, tmp_path: Path
) -> None:
    """The executors read their byte ranges (and the gzip object, whole) from Azurite themselves. A cluster's
    executors take storage credentials from their own environment (a managed identity, or spark.executorEnv.*): the
    shared session's executors get the connection string the same way, through the context's executor environment,
    which starts Python workers of their own for this job."""
    src = tmp_path / "src"
    src.mkdir()
    generate.write(src / "part-1.ndjson", 300, bad_every=40)
    generate.write(src / "part-2.ndjson.gz", 150, compress=True, seed=8)
    generate.write(src / "part-3.ndjson", 120, seed=9, bad_every=25)
    local_files = sorted(src.iterdir())
    for f in local_files:
        azurite.put("exports", f"spark/2026-11/{f.name}", f.read_bytes())
    azurite.put("exports", "spark/2026-11/README.txt", b"not an export\n")  # not matched by the pattern
    pattern = "az://exports/spark/2026-11/part-*"
    monkeypatch.setattr(spark, "SHARD_MIN_BYTES", 64 << 10)  # several ranged shards per plain object
    monkeypatch.setattr(coordinator, "REMOTE_MIN_RANGE", 0)
    for var in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string())
    executor_env = spark_session.sparkContext.environment
    executor_env["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string()
    try:
        local_out = _home(monkeypatch, cli, tmp_path / "local")
        local = json.loads(cli("--json", "sync", "start", *local_files, "--workers", "1").stdout)
        spark_out = _home(monkeypatch, cli, tmp_path / "spark")
        remote = json.loads(cli("--json", "sync", "start", pattern, "--engine", "spark", "--master", "local[2]").stdout)
    finally:
        executor_env.pop("AZURE_STORAGE_CONNECTION_STRING", None)
        import fsspec

        fsspec.get_filesystem_class("az").clear_instance_cache()

    assert remote["status"] == local["status"] == "SUCCEEDED"
    assert [f["name"] for f in remote["files"]] == [f"az://exports/spark/2026-11/{f.name}" for f in local_files]
    assert all(f["version"].startswith("ETag:") for f in remote["files"])
    local_lines, spark_lines = _lines(local_out), _lines(spark_out)
    assert len(spark_lines) > 5000 and Counter(spark_lines) == Counter(local_lines)
    assert _per_user_point(spark_lines) == _per_user_point(local_lines)
    for key in ("lines_read", "operations", "rejects"):
        assert remote[key] == local[key], key

    def rejects(result: dict[str, Any]) -> list[tuple[str, int, str]]:
        text = Path(result["rejects_file"]).read_text("utf-8")
        return [(r["file"].rsplit("/", 1)[-1], r["line"], r["reason"]) for r in map(json.loads, text.splitlines())]

    assert rejects(remote) == rejects(local) and len(rejects(local)) == 300 // 40 + 120 // 25
    assert len(list((tmp_path / "spark" / "home" / "executions").glob("*/spark-work/*/done/*.json"))) >= 4


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Spark Connect server (pyspark's own spark-connect jar, `local[2]`), as Databricks or a cluster's Connect
    endpoint would be: dmrepl reaches it only through `sc://` (gRPC), and its Python workers import this dmrepl."""
    pyspark = pytest.importorskip("pyspark", reason="pip install -e '.[test]' (pyspark is in the test extra)")
    if not _java():
        pytest.skip("Spark needs a Java runtime: make peers-deps installs default-jre-headless")
    port = servers.free_port()
    log = tmp_path_factory.mktemp("connect") / "server.log"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    command = [
        str(Path(pyspark.__file__).parent / "bin" / "spark-submit"),
        "--class",
        "org.apache.spark.sql.connect.service.SparkConnectServer",
        "--master",
        "local[2]",
        "--conf",
        f"spark.connect.grpc.binding.port={port}",
        "--conf",
        "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        "spark.speculation=false",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the Spark Connect server did not listen in time"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        yield f"sc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_spark_connect_runs_the_same_job_through_sc_urls(
    connect_server: str, cli, run_dmrepl, monkeypatch, tmp_path: Path, two_exports
) -> None:
    """The DataFrame-only job over Spark Connect (no SparkContext on the driver): the same operations, rejects and
    counts as the local engine, and the Connect URL, which may carry a token, is never recorded."""
    exports, expected, _ = two_exports
    local_out = _home(monkeypatch, cli, tmp_path / "local")
    cli("sync", "start", *exports)
    local_rejects = _rejects(tmp_path / "local" / "home")
    local_exec = _execution()

    spark_out = _home(monkeypatch, cli, tmp_path / "connect")
    work = tmp_path / "work"
    url = f"{connect_server}/;user_id=dmrepl-test"
    run = run_dmrepl("--json", "sync", "start", *exports, "--engine", "spark", "--master", url, "--work-dir", work)
    assert run.returncode == 0, run.stderr
    spark_exec = _execution()
    assert Counter(_lines(spark_out)) == Counter(_lines(local_out))
    assert _per_user_point(_lines(spark_out)) == _per_user_point(_lines(local_out))
    assert len(_lines(spark_out)) == sum(expected.values())
    assert _rejects(tmp_path / "connect" / "home") == local_rejects
    for key in ("status", "lines_read", "operations", "rejects"):
        assert spark_exec[key] == local_exec[key], key
    assert list(work.glob("*/done/*.json"))
    home = tmp_path / "connect" / "home"
    engine = json.loads((home / "executions" / spark_exec["id"] / "engine.json").read_text())
    assert engine == {"engine": "spark", "master": None, "work_dir": str(work)}
    assert not any("user_id=" in f.read_text(errors="replace") for f in home.rglob("*") if f.is_file())
