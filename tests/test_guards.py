"""Guards for properties the rest of the suite only checks by their end state, so that plausible bugs survived it:
durability (fsync order), a secret's mode at creation, resume line numbers, the weekly rule's boundary, resume
against a same-size same-mtime edit, and `pause` reaching a live replication that never goes quiet.

Each test observes the property itself: system calls as the product makes them (spies on the `os` functions the
product calls, identifying files by inode, never by guessing), or the CLI's exact exit codes and outputs.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import keyring
import pytest
from keyring.backends import fail

from dmrepl import live
from dmrepl.destinations import create
from dmrepl.registry import Registry
from tests import generate
from tests.factories import connection_string, sas_key

# --------------------------------------------------------------------------------------------------------------
# System-call spies


@dataclass(frozen=True)
class Event:
    """One observed call: `what` is the os function, `path` where its fd pointed (or its path argument), `inode`
    the (st_dev, st_ino) of the file it acted on, `size` the file's size at that moment."""

    what: str
    path: str
    inode: tuple[int, int] | None = None
    size: int | None = None
    is_dir: bool = False
    dst: str | None = None
    flags: int = 0
    mode: int = 0
    created_mode: int | None = None


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


def _fd_identity(fd: int) -> tuple[tuple[int, int] | None, int | None, bool]:
    try:
        st = os.fstat(fd)
    except OSError:
        return None, None, False
    return (st.st_dev, st.st_ino), st.st_size, stat.S_ISDIR(st.st_mode)


def _path_inode(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class Spy:
    """Wraps os.fsync, os.write, os.replace, os.open, os.chmod and os.fchmod (the functions the product calls, looked
    up on the `os` module at call time) and records each call with the identity of the file it acted on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[Event] = []
        self._real = {name: getattr(os, name) for name in ("fsync", "write", "replace", "open", "chmod", "fchmod")}
        for name in self._real:
            monkeypatch.setattr(os, name, getattr(self, f"_{name}"))  # also restored by monkeypatch on failure

    def stop(self) -> None:
        """Put the real functions back (without undoing the test's other monkeypatches, such as DMREPL_HOME)."""
        for name, real in self._real.items():
            setattr(os, name, real)

    def _fsync(self, fd: int) -> None:
        inode, size, is_dir = _fd_identity(fd)
        self._real["fsync"](fd)
        self.events.append(Event("fsync", _fd_path(fd), inode, size, is_dir))

    def _write(self, fd: int, data: Any) -> int:
        written: int = self._real["write"](fd, data)
        inode, size, _ = _fd_identity(fd)
        self.events.append(Event("write", _fd_path(fd), inode, size))
        return written

    def _replace(self, src: Any, dst: Any, **kw: Any) -> None:
        try:
            inode: tuple[int, int] | None = _path_inode(src)
        except OSError:
            inode = None
        self._real["replace"](src, dst, **kw)
        self.events.append(Event("replace", os.fsdecode(src), inode, dst=os.fsdecode(dst)))

    def _open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd: int = self._real["open"](path, flags, mode, **kw)
        created_mode = stat.S_IMODE(os.fstat(fd).st_mode)  # the mode the file has as soon as it exists
        inode, _, _ = _fd_identity(fd)
        self.events.append(Event("open", os.fsdecode(path), inode, flags=flags, mode=mode, created_mode=created_mode))
        return fd

    def _chmod(self, path: Any, mode: int, **kw: Any) -> None:
        self._real["chmod"](path, mode, **kw)
        self.events.append(Event("chmod", os.fsdecode(path) if not isinstance(path, int) else _fd_path(path), None))

    def _fchmod(self, fd: int, mode: int) -> None:
        inode, _, _ = _fd_identity(fd)
        self._real["fchmod"](fd, mode)
        self.events.append(Event("fchmod", _fd_path(fd), inode))

    def index(self, predicate: Callable[[Event], bool], *, last: bool = False) -> int | None:
        hits = [i for i, e in enumerate(self.events) if predicate(e)]
        if not hits:
            return None
        return hits[-1] if last else hits[0]

    def dump(self, events: list[Event] | None = None) -> str:
        return "\n".join(
            f"{i}: {e.what} {e.path} -> {e.dst or ''} {e.inode}" for i, e in enumerate(events or self.events)
        )


# --------------------------------------------------------------------------------------------------------------
# 1. registry: fsync the temp file before the rename, fsync the directory after it


def test_registry_write_fsyncs_the_temp_file_before_the_rename_and_the_directory_after(
    cli, isolated: Path, monkeypatch
) -> None:
    """A rename only points at durable data if the temp file was fsynced before it, and is itself only durable once
    the directory is fsynced after it; otherwise a power loss can leave an empty or an old registry.toml. The files
    look the same either way once the command returns, so the test watches the order of the calls."""
    cli("datamart", "add", "dm0")  # the home exists: what follows is a plain update
    spy = Spy(monkeypatch)
    cli("datamart", "add", "dm1", "--name", "Main")
    registry = isolated / "registry.toml"
    final_inode, final_size = _path_inode(registry), registry.stat().st_size
    renames = [(i, e) for i, e in enumerate(spy.events) if e.what == "replace" and Path(e.dst or "") == registry]
    assert renames, f"registry.toml was not replaced by a rename:\n{spy.dump()}"
    i, rename = renames[-1]
    assert rename.inode == final_inode and Path(rename.path).parent == isolated, rename
    assert rename.path != str(registry)
    synced = [j for j, e in enumerate(spy.events) if e.what == "fsync" and e.inode == final_inode]
    assert synced and synced[0] < i, f"the temp file was not fsynced before the rename:\n{spy.dump()}"
    before = spy.events[max(j for j in synced if j < i)]
    assert before.size == final_size, "fsynced before all of its content was written"
    assert before.path == rename.path, before  # /proc/self/fd named the temp file, not the registry
    home_inode = _path_inode(isolated)
    after = [e for e in spy.events[i + 1 :] if e.what == "fsync" and e.is_dir and e.inode == home_inode]
    assert after, f"the directory was not fsynced after the rename:\n{spy.dump()}"
    assert "dm1" in cli("--json", "datamart", "list").stdout


# --------------------------------------------------------------------------------------------------------------
# 2. file destination: flush() fsyncs the file after the last write


def _msg(i: int) -> tuple[bytes, str, str, str]:
    """A message as destinations take it: (data, doc_type, op, key)."""
    return (b'{"n":%d}' % i, "UserPoint", "UPDATE", "k")


def test_file_destination_flush_fsyncs_the_file_after_its_last_write(tmp_path: Path, monkeypatch) -> None:
    """flush() is the acknowledgement a checkpoint builds on: after it returns, what was sent must be on disk, so an
    fsync of the destination file (identified by inode) must follow the last write, within flush() itself."""
    out = tmp_path / "o.ndjson"
    dest = create("file", {"path": str(out)}, None)
    dest.open()
    spy = Spy(monkeypatch)
    try:
        dest.send([_msg(1), _msg(2)])
        dest.send([_msg(3)])
        sent = len(spy.events)
        dest.flush()
        events = list(spy.events)
    finally:
        spy.stop()
        dest.close()
    inode = _path_inode(out)
    last_write = max(i for i, e in enumerate(events) if e.what == "write" and e.inode == inode)
    assert last_write < sent
    fsyncs = [i for i, e in enumerate(events) if e.what == "fsync" and e.inode == inode]
    assert any(i >= sent for i in fsyncs), f"flush() did not fsync {out}:\n{spy.dump(events)}"
    assert out.read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'


def test_sync_fsyncs_the_destination_before_recording_the_execution(
    cli, file_replication, tmp_path: Path, monkeypatch
) -> None:
    """A SUCCEEDED execution in the registry says the operations were delivered: the destination file must be
    fsynced after its last write and before that record is written (in-process engine, whose writes are visible)."""
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    generate.write(export, 200)
    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    spy = Spy(monkeypatch)
    result = json.loads(cli("--json", "sync", "start", export, "--no-progress").stdout)
    assert result["status"] == "SUCCEEDED"
    inode = _path_inode(out)
    registry = Path(os.environ["DMREPL_HOME"]) / "registry.toml"
    last_write = spy.index(lambda e: e.what == "write" and e.inode == inode, last=True)
    last_record = spy.index(lambda e: e.what == "replace" and Path(e.dst or "") == registry, last=True)
    assert last_write is not None and last_record is not None and last_write < last_record
    fsyncs = [i for i, e in enumerate(spy.events) if e.what == "fsync" and e.inode == inode]
    assert any(last_write < i < last_record for i in fsyncs), f"{out} not fsynced before the record:\n{spy.dump()}"


# --------------------------------------------------------------------------------------------------------------
# 3. secrets: a file secret is created 0600, never chmod-ed afterwards


@pytest.fixture
def lax_umask() -> Iterator[None]:
    """umask 0: a file created 0644 stays 0644, so only the mode given at creation can make it private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_file_secret_is_0600_from_its_creation(
    cli, datamart, tmp_path: Path, isolated: Path, monkeypatch, lax_umask
) -> None:
    """The final mode (0600) hides a window during which another user could open the secret: the file must be
    created exclusively with mode 0600 (seen by fstat right as os.open returns), and never need a chmod."""
    keyring.set_keyring(fail.Keyring())
    key = sas_key()
    creds = tmp_path / "credentials.txt"
    creds.write_text(connection_string(key=key, hub="hub1"))
    spy = Spy(monkeypatch)
    rep = json.loads(
        cli(
            "--json", "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", creds,
            "--secret-store", "file",
        ).stdout
    )  # fmt: skip
    spy.stop()
    secrets = isolated / "secrets"
    secret_file = secrets / rep["credentials"]["ref"]
    assert rep["credentials"]["store"] == "file" and key in secret_file.read_text()
    opens = [e for e in spy.events if e.what == "open" and Path(e.path) == secret_file]
    assert len(opens) == 1, f"the secret was not created with one os.open:\n{spy.dump()}"
    (created,) = opens
    assert created.flags & (os.O_CREAT | os.O_EXCL) == os.O_CREAT | os.O_EXCL
    assert created.mode & 0o777 == 0o600 and created.created_mode == 0o600, created
    chmods = [e for e in spy.events if e.what in ("chmod", "fchmod") and Path(e.path).parent == secrets]
    assert not chmods, chmods
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


# --------------------------------------------------------------------------------------------------------------
# 4. resume: reject line numbers are the file's own


_BAD = (b"not json at all", b"[1, 2, 3]", b'{"creation_ts": 1}')


def _export_with_bad_lines(path: Path, n: int, bad_every: int, blank_every: int = 0) -> None:
    """User-point lines with bad lines (none starting with {"user_point_id") and blank lines mixed in."""
    out = []
    for i, (line, _) in enumerate(generate.lines(n), start=1):
        out.append(line)
        if i % bad_every == 0:
            out.append(_BAD[(i // bad_every) % len(_BAD)])
        if blank_every and i % blank_every == 0:
            out.append(b"")
    path.write_bytes(b"\n".join(out) + b"\n")


def _bad_line_numbers(path: Path) -> list[int]:
    """The truth, from the file alone: 1-based numbers of the non-blank lines that are not user points."""
    return [
        no
        for no, line in enumerate(path.read_bytes().split(b"\n"), start=1)
        if line.strip() and not line.startswith(b'{"user_point_id"')
    ]


def _only_execution(cli: Any) -> dict[str, Any]:
    """The one execution, as `sync list --json` shows it (the CLI's view, not the engine's records)."""
    (execution,) = json.loads(cli("--json", "sync", "list").stdout)
    assert isinstance(execution, dict)
    return execution


def _show(cli: Any, exec_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(cli("--json", "sync", "show", exec_id).stdout)
    return shown


@pytest.mark.parametrize("workers", ["1", "2"], ids=["in-process", "resumed-by-2-workers"])
def test_resumed_runs_report_the_true_line_numbers_of_rejects(
    cli, file_replication, tmp_path: Path, monkeypatch, workers: str
) -> None:
    """With --max-rejects 0 every run aborts soon after a reject, at a checkpoint (the limit is the execution's, so
    each resume aborts again at the next one): most rejects are found by resumed runs, which number lines on from a
    checkpoint, and each reported line must be the one a user opening the export would find. The first run is
    in-process, so that it stops early; resumes then run in-process, or in worker processes that frame byte ranges
    starting at the checkpoint."""
    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    export = tmp_path / "export.ndjson"
    _export_with_bad_lines(export, 1500, bad_every=97, blank_every=41)
    truth = _bad_line_numbers(export)
    total = 1500 + len(truth)  # non-blank lines
    assert len(truth) == 15
    err = json.loads(cli("--json", "sync", "start", export, "--max-rejects", "0", expect=4).stderr)["error"]
    assert err["code"] == "MAX_REJECTS", err
    assert f"line {truth[0]})" in err["message"], err  # the line that crossed the limit
    monkeypatch.setenv("DMREPL_SYNC_WORKERS", workers)
    exec_id = _only_execution(cli)["id"]
    shown = _show(cli, exec_id)
    assert 1 <= shown["rejects"] < len(truth) and shown["lines_read"] < total, "the first run must stop early"
    resumes = 0
    while shown["status"] != "SUCCEEDED":
        resumes += 1
        assert resumes <= len(truth) + 1, "resuming does not get to the end"
        before = shown
        result = cli("--json", "sync", "resume", exec_id, expect=None)
        if before["rejects"] < len(truth):  # the limit of 0 rejects stands: the next bad line aborts this run too
            assert result.exit_code == 4, result.stderr
            assert json.loads(result.stderr)["error"]["code"] == "MAX_REJECTS"
        else:
            assert result.exit_code == 0, result.stderr
        shown = _show(cli, exec_id)
        assert shown["lines_read"] > before["lines_read"] or before["lines_read"] == total
    rejects_file = Path(shown["rejects_file"])
    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
    assert [r["line"] for r in rejects] == truth
    assert all(r["file"] == str(export) for r in rejects)


# --------------------------------------------------------------------------------------------------------------
# 5. the weekly rule's boundary


def _set_started_at(exec_id: str, when: datetime) -> None:
    with Registry().transaction() as data:
        data.executions[exec_id].started_at = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_weekly_rule_boundary_is_seven_days(cli, file_replication, tmp_path: Path) -> None:
    """Six and a half days, or a minute short of seven, after a SUCCEEDED start a new one is refused (exit 6,
    announcing the date seven days after); a minute past seven days it is allowed."""
    export = tmp_path / "e.ndjson"
    generate.write(export, 5)
    cli("sync", "start", export)
    exec_id = _only_execution(cli)["id"]
    now = datetime.now(UTC).replace(microsecond=0)
    for ago in (timedelta(days=6, hours=12), timedelta(days=7) - timedelta(minutes=1)):
        started = now - ago
        _set_started_at(exec_id, started)
        error = json.loads(cli("--json", "sync", "start", export, expect=6).stderr)["error"]
        assert error["code"] == "WEEKLY_RULE", error
        allowed = (started + timedelta(days=7)).isoformat(timespec="seconds").replace("+00:00", "Z")
        assert f"allowed from {allowed}" in error["message"], error
    _set_started_at(exec_id, now - timedelta(days=7, minutes=1))
    result = json.loads(cli("--json", "sync", "start", export).stdout)
    assert result["status"] == "SUCCEEDED" and result["id"] != exec_id


# --------------------------------------------------------------------------------------------------------------
# 6. resume: same size, same mtime, other content


def test_resume_refuses_an_export_edited_in_place_keeping_size_and_mtime(cli, file_replication, tmp_path: Path) -> None:
    """Size and mtime are easily preserved by an edit (or restored by a copy tool): only the sha256 recorded at the
    start tells that the export a resume would read is not the one the execution started on."""
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    _export_with_bad_lines(export, 120, bad_every=10_000)  # no bad line yet
    lines = export.read_bytes().split(b"\n")
    lines.insert(2, b"not json")  # the first run aborts there; nothing after it would be rejected
    export.write_bytes(b"\n".join(lines))
    err = json.loads(cli("--json", "sync", "start", export, "--max-rejects", "0", expect=4).stderr)["error"]
    assert err["code"] == "MAX_REJECTS"
    execution = _only_execution(cli)
    assert execution["status"] == "FAILED" and execution["files"][0].get("sha256"), execution["files"]
    before = os.stat(export)
    content = export.read_bytes()
    edited = content[: len(content) // 2] + content[len(content) // 2 :].replace(b"@example.com", b"@example.org", 1)
    assert edited != content and len(edited) == len(content)
    export.write_bytes(edited)
    os.utime(export, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(export)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    delivered = out.read_bytes()
    error = json.loads(cli("--json", "sync", "resume", execution["id"], expect=4).stderr)["error"]
    assert error["code"] == "EXPORT_CHANGED", error
    assert out.read_bytes() == delivered  # refused before sending anything
    assert _only_execution(cli)["status"] == "FAILED"


# --------------------------------------------------------------------------------------------------------------
# 7. live replication: `pause` applies while operations keep arriving


def _op_line(seq: int) -> bytes:
    doc_id = str(uuid.UUID(int=seq + 1, version=4))
    return json.dumps(
        {"ts": 1_700_000_000_000 + seq, "doc_type": "UserPoint", "doc_id": doc_id, "op": "UPDATE", "value": {}}
    ).encode()


def _seqs(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["ts"] - 1_700_000_000_000 for line in path.read_bytes().splitlines() if line.strip()]


def test_pause_reaches_a_live_replication_that_never_goes_quiet(cli, tmp_path: Path) -> None:
    """A producer that writes every 0.2 s never leaves 2 s of silence, so the registry must be re-read while lines
    keep arriving: once `pause` is a refresh interval old, the paused replication gets nothing more while the other
    one gets everything and `replicate` keeps running. Checked for a followed file and for stdin at once."""
    sources: dict[str, Path] = {}
    outs: dict[str, tuple[Path, Path]] = {}
    for dm in ("follow", "stdin"):
        cli("datamart", "add", dm, "--system-version", "v202205")
        outs[dm] = (tmp_path / f"{dm}-a.ndjson", tmp_path / f"{dm}-b.ndjson")
        for name, path in zip(("a", "b"), outs[dm], strict=True):
            cli("create", "--type", "file", "--name", f"{dm}-{name}", "--path", path, "--datamart", dm)
            cli("activate", f"{dm}-{name}")
    sources["follow"] = tmp_path / "live.ndjson"
    sources["follow"].write_bytes(b"")
    base = [sys.executable, "-m", "dmrepl", "replicate"]
    procs = {
        "follow": subprocess.Popen(
            [*base, str(sources["follow"]), "--follow", "--datamart", "follow"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ),
        "stdin": subprocess.Popen(
            [*base, "-", "--datamart", "stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ),
    }
    seq = 0
    follow_source = sources["follow"].open("ab")
    stdin = procs["stdin"].stdin
    assert stdin is not None

    def produce(seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        nonlocal seq
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            line = _op_line(seq) + b"\n"
            follow_source.write(line)
            follow_source.flush()
            stdin.write(line)
            stdin.flush()
            seq += 1
            time.sleep(0.2)

    try:
        produce(15, until=lambda: all(_seqs(b) for _, b in outs.values()))
        assert all(_seqs(b) for _, b in outs.values()), "the replications received nothing"
        cli("pause", "follow-b")
        cli("pause", "stdin-b")
        produce(live.REFRESH_INTERVAL_S + 1.5)  # the pause must be seen within a refresh interval (+ slack)
        cutoff = seq
        produce(2.0)
        last = seq - 1
        assert cutoff < last
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(last in _seqs(a) for a, _ in outs.values()):
            time.sleep(0.1)
        running = {dm: proc.poll() for dm, proc in procs.items()}
    finally:
        follow_source.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        results = {dm: proc.communicate(timeout=30) for dm, proc in procs.items()}
    for dm, (a, b) in outs.items():
        assert running[dm] is None, f"{dm}: replicate stopped: {results[dm][1].decode()}"
        assert _seqs(a) == list(range(seq)), f"{dm}: the ACTIVE replication missed operations"
        late = [s for s in _seqs(b) if s >= cutoff]
        assert not late, f"{dm}: the paused replication still received {late} (pause applied at most before {cutoff})"
        assert procs[dm].returncode == 130, results[dm][1].decode()
