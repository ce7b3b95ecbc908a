"""Exports read where they live: gs:// (fake-gcs-server), abfs:// / az:// (Azurite) and s3:// (moto's server), each a
real server over HTTP on loopback (tests/peers/storage_servers.py), started once per session and only when a test of
its scheme runs. What a sync of objects delivers is compared byte for byte with the same sync of local copies.
"""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dmrepl.errors import Interrupted
from dmrepl.registry import Registry
from tests import generate
from tests.conftest import REPO, Cli
from tests.peers import storage_servers as servers

SCHEMES = ("gs", "az", "s3")
_prefixes = itertools.count(1)


@dataclass
class Store:
    """One bucket (container) of a running server, with credentials that can read it and some that cannot."""

    scheme: str
    bucket: str
    env: dict[str, str]
    denied_env: dict[str, str]  # under these, reading `denied_key(...)` is refused by the server
    put: Callable[[str, bytes], None]
    secrets: list[str] = field(default_factory=list)
    denied_prefix: str = ""

    def url(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def denied_key(self, key: str) -> str:
        return self.denied_prefix + key


_STORAGE_ENV = (
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


@pytest.fixture(scope="session")
def gs_store() -> Iterator[Store]:
    with servers.fake_gcs() as gcs:
        gcs.create_bucket("exports")
        gate = servers.GcsIamGate(gcs, ("private/",))
        try:
            yield Store(
                "gs",
                "exports",
                env={"STORAGE_EMULATOR_HOST": gcs.url},
                denied_env={"STORAGE_EMULATOR_HOST": gate.url},
                put=lambda key, data: gcs.put("exports", key, data) and None,
                denied_prefix="private/",
            )
        finally:
            gate.close()


@pytest.fixture(scope="session")
def az_store() -> Iterator[Store]:
    with servers.azurite() as az:
        az.create_container("exports")
        listing_only = az.sas_connection_string("exports", "l")
        yield Store(
            "az",
            "exports",
            env={"AZURE_STORAGE_CONNECTION_STRING": az.connection_string()},
            denied_env={"AZURE_STORAGE_CONNECTION_STRING": listing_only},
            put=lambda key, data: az.put("exports", key, data),
            secrets=[servers.AZURITE_KEY, listing_only.split("sig=")[1].split("&")[0]],
        )


@pytest.fixture(scope="session")
def s3_store() -> Iterator[Store]:
    with servers.moto_s3() as s3:
        s3.client().create_bucket(Bucket="exports")
        s3.add_user("writer", ["s3:*"])
        s3.add_user("reader", ["s3:GetObject", "s3:ListBucket"])
        s3.add_user("lister", ["s3:ListBucket"])
        s3.enforce_auth()
        writer = s3.client("writer")
        yield Store(
            "s3",
            "exports",
            env=s3.env("reader"),
            denied_env=s3.env("lister"),
            put=lambda key, data: writer.put_object(Bucket="exports", Key=key, Body=data) and None,
            secrets=[s3.keys[user][1] for user in ("writer", "reader", "lister")],
        )


@pytest.fixture(params=SCHEMES)
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Store]:
    """The scheme's store, its reading credentials in the environment (and no other storage credentials)."""
    s: Store = request.getfixturevalue(f"{request.param}_store")
    for var in _STORAGE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # no SDK may look for a cloud metadata server off loopback
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    for k, v in s.env.items():
        monkeypatch.setenv(k, v)
    yield s
    _forget_filesystems()


def _forget_filesystems() -> None:
    """fsspec caches a filesystem per constructor arguments, not per environment: a test that changes credentials
    must not get the previous test's client."""
    import fsspec

    for cls in fsspec.AbstractFileSystem.__subclasses__():
        _clear(cls)


def _clear(cls: type) -> None:
    if hasattr(cls, "clear_instance_cache"):
        cls.clear_instance_cache()  # type: ignore[attr-defined]
    for sub in cls.__subclasses__():
        _clear(sub)


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The export's parts: two plain files (with bad lines) and a gzip one; ~0.6 MB in all."""
    d = tmp_path_factory.mktemp("exports")
    generate.write(d / "part-1.ndjson", 300, bad_every=40)
    generate.write(d / "part-2.ndjson.gz", 150, compress=True, seed=8)
    generate.write(d / "part-3.ndjson", 120, seed=9, bad_every=25)
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _upload(store: Store, exports: dict[str, bytes], prefix: str) -> None:
    for name, data in exports.items():
        store.put(f"{prefix}{name}", data)


def _local(tmp_path: Path, exports: dict[str, bytes]) -> list[Path]:
    d = tmp_path / "local"
    d.mkdir(exist_ok=True)
    for name, data in exports.items():
        (d / name).write_bytes(data)
    return sorted(d.iterdir())


def _replication(cli: Cli, tmp_path: Path, dm: str) -> Path:
    out = tmp_path / f"{dm}.ndjson"
    cli("datamart", "add", dm, "--system-version", "v202205")
    cli("create", "--type", "file", "--name", f"{dm}-file", "--datamart", dm, "--path", out)
    cli("activate", f"{dm}-file")
    return out


def _small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 KiB ranges instead of 8 MiB: every plain part is read by several ranged shards."""
    from dmrepl.sync import coordinator, pool

    monkeypatch.setattr(coordinator, "REMOTE_MIN_RANGE", 0)
    monkeypatch.setattr(pool.InlineExecutor, "range_bytes", lambda self, size: pool.MIN_RANGE_BYTES)


def _rejects(result: dict[str, Any]) -> list[tuple[str, int, str]]:
    text = Path(result["rejects_file"]).read_text("utf-8")
    return [(Path(r["file"]).name, r["line"], r["reason"]) for r in map(json.loads, text.splitlines())]


def _sync(cli: Cli, *args: Any, expect: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cli("--json", "sync", "start", *args, "--workers", "1", expect=expect).stdout)
    return out


def test_a_glob_sync_of_objects_equals_the_sync_of_local_copies(
    cli: Cli, store: Store, exports: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"t{next(_prefixes)}/exports/2026-11/"
    _upload(store, exports, prefix)
    store.put(f"{prefix}README.txt", b"not an export\n")  # not matched by the pattern
    store.put(f"t{next(_prefixes)}/exports/2026-10/part-1.ndjson", b"{}\n")  # another month
    _small_ranges(monkeypatch)
    remote_out = _replication(cli, tmp_path, "remote")
    local_out = _replication(cli, tmp_path, "local")

    pattern = store.url(f"{prefix}part-*")
    plan = json.loads(cli("--json", "sync", "plan", pattern, "--datamart", "remote").stdout)
    assert [f["name"] for f in plan["files"]] == [store.url(prefix + name) for name in exports]
    remote = _sync(cli, pattern, "--datamart", "remote")
    local = _sync(cli, *_local(tmp_path, exports), "--datamart", "local")

    assert remote["status"] == local["status"] == "SUCCEEDED"
    assert remote_out.read_bytes() == local_out.read_bytes()
    assert remote_out.stat().st_size > 500_000
    assert _rejects(remote) == _rejects(local) and _rejects(remote)
    assert (remote["lines_read"], remote["operations"]) == (local["lines_read"], local["operations"])
    for f, name in zip(remote["files"], exports, strict=True):
        assert f["name"] == store.url(prefix + name) and f["size"] == len(exports[name])
        assert f["compressed"] is name.endswith(".gz")
        assert f["version"].startswith("generation:" if store.scheme == "gs" else "ETag:"), f
        assert f["sha256"] is None  # the version identifies the content: no second read to hash it
    assert all(f["sha256"] and f["version"] is None for f in local["files"])


@pytest.mark.parametrize("store", ["s3"], indirect=True)  # the worker path is the same for every scheme
def test_workers_read_object_ranges_themselves(
    cli: Cli, store: Store, exports: dict[str, bytes], tmp_path: Path, run_dmrepl: Callable[..., Any]
) -> None:
    """Worker processes (spawned: the storage client runs a thread) read their ranges of an object themselves."""
    prefix = f"t{next(_prefixes)}/"
    big = b"".join(exports[n] for n in ("part-1.ndjson", "part-3.ndjson")) * 3
    store.put(f"{prefix}big.ndjson", big)
    (tmp_path / "big.ndjson").write_bytes(big)
    remote_out = _replication(cli, tmp_path, "remote")
    local_out = _replication(cli, tmp_path, "local")
    runner = (
        "import sys\nfrom dmrepl.sync import coordinator, pool\n"
        "pool.CHUNK_BYTES = pool.MIN_RANGE_BYTES = 64 * 1024\ncoordinator.REMOTE_MIN_RANGE = 0\n"
        "from dmrepl.cli.app import main\nmain()\n"
    )
    args = ["--json", "sync", "start", store.url(f"{prefix}big.ndjson"), "--datamart", "remote", "--workers", "2"]
    proc = subprocess.run([sys.executable, "-c", runner, *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout)
    local = _sync(cli, tmp_path / "big.ndjson", "--datamart", "local")
    assert remote["options"] == local["options"]
    assert sorted(remote_out.read_bytes().splitlines()) == sorted(local_out.read_bytes().splitlines())
    assert _rejects(remote) == _rejects(local)


def test_an_interrupted_sync_of_objects_resumes_where_it_stopped(
    cli: Cli, store: Store, exports: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmrepl import sync as engine

    prefix = f"t{next(_prefixes)}/"
    _upload(store, exports, prefix)
    _small_ranges(monkeypatch)
    remote_out = _replication(cli, tmp_path, "remote")
    local_out = _replication(cli, tmp_path, "local")
    polls = itertools.count()
    opts = engine.SyncOptions(workers=1, checkpoint_interval_s=3600)
    with pytest.raises(Interrupted):  # stopped after a few ranges of the first plain part
        engine.start(
            Registry(), [store.url(f"{prefix}part-*")], datamart="remote", opts=opts, stop=lambda: next(polls) >= 3
        )
    (exec_id,) = (e["id"] for e in json.loads(cli("--json", "sync", "list").stdout) if e["datamart"] == "remote")
    assert remote_out.read_bytes().count(b"\n") > 0
    resumed = json.loads(cli("--json", "sync", "resume", exec_id).stdout)
    _sync(cli, *_local(tmp_path, exports), "--datamart", "local")
    assert resumed["status"] == "SUCCEEDED"
    assert remote_out.read_bytes() == local_out.read_bytes()


def test_an_object_overwritten_between_start_and_resume_is_refused(
    cli: Cli, store: Store, exports: dict[str, bytes], tmp_path: Path
) -> None:
    prefix = f"t{next(_prefixes)}/"
    _upload(store, exports, prefix)
    _replication(cli, tmp_path, "remote")
    failed = _sync(cli, store.url(f"{prefix}part-*"), "--datamart", "remote", "--max-rejects", "0", expect=4)
    assert failed["status"] == "FAILED"
    plain = exports["part-3.ndjson"]
    store.put(f"{prefix}part-3.ndjson", plain.replace(b"acc-", b"ACC-"))  # same size, other content
    err = cli("sync", "resume", failed["id"], expect=4).stderr
    assert err.startswith(f"error: {store.url(prefix + 'part-3.ndjson')}: the export changed since"), err
    assert ("generation" if store.scheme == "gs" else "ETag") in err and len(err.strip().splitlines()) <= 2


def test_an_object_overwritten_while_it_is_read_fails_the_execution(
    cli: Cli, store: Store, exports: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmrepl import sync as engine
    from dmrepl.errors import InvalidInputError

    prefix = f"t{next(_prefixes)}/"
    store.put(f"{prefix}part-1.ndjson", exports["part-1.ndjson"])
    _small_ranges(monkeypatch)
    _replication(cli, tmp_path, "remote")
    touched: list[bool] = []

    def stop() -> bool:
        if not touched:
            touched.append(True)
            store.put(f"{prefix}part-1.ndjson", exports["part-1.ndjson"] + b"\n")
        return False

    with pytest.raises(InvalidInputError, match="changed while it was read") as raised:
        engine.start(
            Registry(), [store.url(f"{prefix}part-1.ndjson")], datamart="remote", opts=engine.SyncOptions(), stop=stop
        )
    assert touched and raised.value.code == "EXPORT_CHANGED"


def test_a_missing_object_or_an_empty_pattern_is_one_line_naming_the_url(
    cli: Cli, store: Store, tmp_path: Path, run_dmrepl: Callable[..., Any]
) -> None:
    _replication(cli, tmp_path, "remote")
    missing = store.url(f"t{next(_prefixes)}/nope.ndjson")
    for args, words in (
        ([missing], "not found"),
        ([store.url("t0/nothing-here/*.ndjson")], "no object matches this pattern"),
    ):
        proc = run_dmrepl("sync", "start", *args)
        assert proc.returncode == 4, proc.stderr
        assert proc.stderr == f"error: export file {args[0]}: {words}\n", proc.stderr
    error = json.loads(cli("--json", "sync", "plan", missing, expect=4).stderr)["error"]
    assert error["code"] == "INVALID_EXPORT" and missing in error["message"]


def test_a_permission_error_is_one_line_naming_the_url_and_no_secret(
    cli: Cli,
    store: Store,
    exports: dict[str, bytes],
    tmp_path: Path,
    run_dmrepl: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = store.denied_key(f"t{next(_prefixes)}/part-1.ndjson")
    store.put(key, exports["part-1.ndjson"])
    _replication(cli, tmp_path, "remote")
    for k, v in store.denied_env.items():
        monkeypatch.setenv(k, v)
    for command in (("sync", "start"), ("sync", "plan"), ("--json", "sync", "start")):
        proc = run_dmrepl(*command, store.url(key))
        assert proc.returncode == 4, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert store.url(key) in proc.stderr and "permission denied" in proc.stderr, proc.stderr
        for secret in store.secrets:
            assert secret not in proc.stderr
    registry = (tmp_path / "home" / "registry.toml").read_text("utf-8")
    assert all(secret not in registry for secret in store.secrets)


@pytest.mark.parametrize(
    ("scheme", "extra", "module"), [("gs", "gcs", "gcsfs"), ("az", "azure", "adlfs"), ("s3", "s3", "s3fs")]
)
def test_a_url_whose_extra_is_missing_names_the_extra(datamart: str, scheme: str, extra: str, module: str) -> None:
    """The SDK made unimportable, as in a core install without the extra."""
    code = f"import sys\nsys.modules[{module!r}] = None\nfrom dmrepl.cli.app import main\nmain()\n"
    url = f"{scheme}://bucket/exports/*.ndjson.gz"
    proc = subprocess.run(
        [sys.executable, "-c", code, "sync", "plan", url], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 4, proc.stderr
    needs = f"reading {scheme}:// exports needs the {extra} extra: pip install 'dmrepl[{extra}]'"
    assert proc.stderr == f"error: export file {url}: {needs}\n"


def test_help_imports_no_storage_sdk() -> None:
    code = (
        "import sys\nfrom dmrepl.cli.app import main\nsys.argv = ['dmrepl', 'sync', 'start', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('fsspec', 'gcsfs', 'adlfs', 's3fs', 'boto3', 'aiobotocore') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "gs://" in proc.stdout and proc.stdout.strip().endswith("[]"), proc.stdout


def test_an_unsupported_scheme_is_refused(cli: Cli, datamart: str) -> None:
    err = cli("sync", "plan", "ftp://host/export.ndjson", expect=4).stderr
    assert err.startswith("error: export file ftp://host/export.ndjson: unsupported scheme ftp://"), err


def test_gzip_of_an_object_is_one_whole_stream(store: Store, exports: dict[str, bytes]) -> None:
    """A gzip object is read as one stream from its start (a gzip stream cannot be entered mid-way)."""
    from dmrepl.exports import ExportReader

    key = f"t{next(_prefixes)}/part-2.ndjson.gz"
    store.put(key, exports["part-2.ndjson.gz"])
    reader = ExportReader(store.url(key), start_ts=0)
    assert reader.compressed and reader.format == "user-points"
    with pytest.raises(ValueError, match="uncompressed"):
        next(reader.ranges(0, 1 << 16))
    plain = gzip.decompress(exports["part-2.ndjson.gz"])
    assert [f[2] for f in reader.frames()] == [line + b"\n" for line in plain.splitlines()]
