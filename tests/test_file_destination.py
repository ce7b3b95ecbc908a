"""The file destination on its own: the destination interface every engine path relies on."""

from __future__ import annotations

import ctypes
import os
import platform
import stat
import threading
from pathlib import Path

import pytest

from dmrepl.destinations import DestinationError, create
from dmrepl.destinations import file as file_destination
from dmrepl.operations import Message


def msg(i: int) -> Message:
    return (b'{"n":%d}' % i, "UserPoint", "UPDATE", "k")


def test_appends_lines_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "o.ndjson"
    out.write_bytes(b'{"old":1}\n')
    dest = create("file", {"path": str(out)}, None)
    assert [s.status for s in dest.check()] == ["ok"]
    with dest:
        dest.send([msg(1), msg(2)])
        dest.flush()
    assert out.read_bytes() == b'{"old":1}\n{"n":1}\n{"n":2}\n'


def test_a_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    """A crash mid-write leaves half a line past what dmrepl made durable: it is cut, and only it."""
    out = tmp_path / "o.ndjson"
    with create("file", {"path": str(out)}, None) as dest:
        dest.send([msg(1), msg(2)])
    with open(out, "ab") as f:  # what a write torn by a crash leaves
        f.write(b'{"n":3}\n{"ts":16000')
    with create("file", {"path": str(out)}, None) as dest:
        dest.send([msg(4)])
    assert out.read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n{"n":4}\n'


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"n":1}\n{"n":2}', "does not end with a newline"),
        (b"plain text\n", "line 1 is not a JSON object"),
        (b'{"n":1}\n[1,2]\n', "line 2 is not a JSON object"),
    ],
)
def test_a_file_dmrepl_did_not_write_is_never_cut(tmp_path: Path, content: bytes, why: str) -> None:
    out = tmp_path / "single.json"
    out.write_bytes(content)
    dest = create("file", {"path": str(out)}, None)
    with pytest.raises(DestinationError, match=why) as raised:
        dest.open()
    assert raised.value.code == "FOREIGN_FILE"
    assert out.read_bytes() == content
    assert [s.code for s in create("file", {"path": str(out)}, None).check()] == ["FOREIGN_FILE"]


def test_an_existing_ndjson_file_is_appended_to_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "o.ndjson"
    out.write_bytes(b'{"theirs":1}\n')
    with create("file", {"path": str(out)}, None) as dest:
        dest.send([msg(1)])
    with open(out, "ab") as f:
        f.write(b'{"torn')
    with create("file", {"path": str(out)}, None) as dest:
        dest.send([msg(2)])
    assert out.read_bytes() == b'{"theirs":1}\n{"n":1}\n{"n":2}\n'


@pytest.mark.parametrize(
    ("umask", "mode", "expected"), [(0o022, None, 0o600), (0o000, None, 0o600), (0o077, "640", 0o640)]
)
def test_a_new_file_is_private_whatever_the_umask(tmp_path: Path, umask: int, mode: str | None, expected: int) -> None:
    out = tmp_path / "o.ndjson"
    settings = {"path": str(out)} | ({"mode": mode} if mode else {})
    old = os.umask(umask)
    try:
        with create("file", settings, None) as dest:
            assert stat.S_IMODE(out.stat().st_mode) == expected  # from its creation, before anything is written
            dest.send([msg(1)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == expected


def test_concurrent_writers_never_split_lines(tmp_path: Path) -> None:
    out = tmp_path / "o.ndjson"

    def writer(tag: int) -> None:
        with create("file", {"path": str(out)}, None) as dest:
            for batch in range(50):
                dest.send([(b'{"w":%d,"pad":"%s"}' % (tag, b"x" * 5000), "UserPoint", "UPDATE", "k")] * 40)
                if batch % 10 == 0:
                    dest.flush()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.read_bytes().splitlines()
    assert len(lines) == 4 * 50 * 40
    assert all(line.startswith(b'{"w":') and line.endswith(b'"}') for line in lines)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def dirty_pages(path: Path) -> int:
    """The file's dirty page-cache pages, from the kernel's own count (cachestat, Linux >= 6.5)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("cachestat is read here on Linux x86_64 and aarch64 only")
    libc = ctypes.CDLL(None, use_errno=True)
    stat = _Cachestat()
    with open(path, "rb") as f:
        rc = libc.syscall(451, f.fileno(), ctypes.byref(_CachestatRange(0, 0)), ctypes.byref(stat), 0)
    if rc != 0:
        pytest.skip(f"this kernel has no cachestat ({os.strerror(ctypes.get_errno())})")
    return stat.dirty


def test_large_outputs_are_written_back_while_sending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without it the whole output stays dirty (the kernel waits 30 s) and the checkpoint's fsync writes it all."""
    monkeypatch.setattr(file_destination, "WRITEBACK_BYTES", 1 << 20)
    out = tmp_path / "o.ndjson"
    line = (b'{"pad":"%s"}' % (b"x" * 990), "UserPoint", "UPDATE", "k")
    with create("file", {"path": str(out)}, None) as dest:
        for _ in range(5):
            dest.send([line] * 2000)
        assert out.stat().st_size == 5 * 2000 * 1001
        assert dirty_pages(out) * os.sysconf("SC_PAGE_SIZE") < 1 << 20


def test_writeback_is_started_once_per_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(file_destination, "WRITEBACK_BYTES", 9_999)
    monkeypatch.setattr(file_destination, "start_writeback", calls.append)
    with create("file", {"path": str(tmp_path / "o.ndjson")}, None) as dest:
        for _ in range(10):
            dest.send([(b"x" * 3332, "UserPoint", "UPDATE", "k")])  # 3,333 bytes a line: every third send
        assert len(calls) == 3
        dest.flush()  # an fsync leaves nothing unsynced: counting starts again, the 10th send is forgotten
        dest.send([(b"x" * 3332, "UserPoint", "UPDATE", "k")] * 2)
        assert len(calls) == 3


def test_write_failure_is_a_destination_error(tmp_path: Path) -> None:
    dest = create("file", {"path": "/dev/full"}, None)
    dest.open()
    with pytest.raises(DestinationError) as exc:
        dest.send([msg(1)])
        dest.flush()
    assert exc.value.code == "UNWRITABLE"
    dest.close()


def test_check_reports_missing_directory_and_permissions(tmp_path: Path) -> None:
    (step,) = create("file", {"path": str(tmp_path / "nope" / "o")}, None).check()
    assert step.status == "failed" and step.code == "PATH_NOT_FOUND" and "mkdir" in step.fix
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        (step,) = create("file", {"path": str(ro / "o")}, None).check()
        assert step.status == "failed"
