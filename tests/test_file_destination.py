"""The file destination on its own: the destination interface every engine path relies on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from dmrepl.destinations import DestinationError, Message, create


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
    out = tmp_path / "o.ndjson"
    out.write_bytes(b'{"n":1}\n{"n":2}\n{"ts":16000')
    with create("file", {"path": str(out)}, None) as dest:
        dest.send([msg(3)])
    assert out.read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'


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
