"""Live replication driven in this process: `dmrepl.live.LiveReplication` reading an in-memory stream or a pipe, or
following a file in a thread that is stopped through its `stop` callable, as `dmrepl replicate` stops it.

tests/test_live.py runs the same engine as a `dmrepl` subprocess, which is what a user runs but not what mutation
testing can see: mutmut ties a test to the functions it called in its own process. The rules that depend on time
(registry refresh, flush, poll) are shortened to a fraction of a second, so each test takes well under a second or
two while still crossing every interval several times.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmrepl import live, replications
from dmrepl.destinations import file as file_destination
from dmrepl.errors import InvalidInputError, RefusedError, UsageError
from dmrepl.models import SecretRef, Status
from dmrepl.registry import Registry

REFRESH_S = 0.15
POLL_S = 0.01
FLUSH_S = 0.05


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seconds become tens of milliseconds: the same rules, crossed many times per test."""
    monkeypatch.setattr(live, "REFRESH_INTERVAL_S", REFRESH_S)
    monkeypatch.setattr(live, "FOLLOW_POLL_S", POLL_S)
    monkeypatch.setattr(live, "FLUSH_INTERVAL_S", FLUSH_S)


# --------------------------------------------------------------------------------------------------------------
# helpers


def op_line(seq: int) -> bytes:
    """One valid operation whose doc_id carries `seq`, so every line can be counted where it arrives."""
    doc_id = f"00000000-0000-4000-8000-{seq:012d}"
    op = {"ts": 1_700_000_000_000 + seq, "doc_type": "UserPoint", "doc_id": doc_id, "op": "UPDATE", "value": {}}
    return json.dumps(op, separators=(",", ":")).encode() + b"\n"  # as dmrepl encodes it: delivered unchanged


def op_lines(start: int, stop: int) -> bytes:
    return b"".join(op_line(seq) for seq in range(start, stop))


def account_line(seq: int) -> bytes:
    doc_id = f"00000000-0000-4000-8000-{seq:012d}:3:acc-0-0"
    op = {"ts": 1_700_000_000_000 + seq, "doc_type": "UserAccount", "doc_id": doc_id, "op": "UPDATE", "value": {}}
    return json.dumps(op, separators=(",", ":")).encode() + b"\n"


def arrived(path: Path) -> Counter[int]:
    """How many times each operation arrived at a file destination; a torn line fails the test."""
    counts: Counter[int] = Counter()
    if not path.exists():
        return counts
    for line in path.read_bytes().splitlines():
        try:
            counts[int(json.loads(line)["doc_id"][24:36])] += 1
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"{path}: torn or foreign line {line[:80]!r}") from None
    return counts


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """`condition` may look at files that do not exist yet (positions.json before the first save): not yet true."""

    def holds() -> bool:
        try:
            return condition()
        except (OSError, KeyError):
            return False

    deadline = time.monotonic() + timeout
    while not holds():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)


def bounded(stop: Callable[[], bool], seconds: float = 5.0) -> Callable[[], bool]:
    """`stop`, or the end of a time limit: a run driven in the test's own thread must end even when the code under
    test (a mutant, say) never reaches the state `stop` waits for; the test's assertions then fail."""
    deadline = time.monotonic() + seconds
    return lambda: stop() or time.monotonic() > deadline


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def rep_id(home: Path, name: str) -> str:
    (rep,) = (r for r in Registry(home).load().replications.values() if r.name == name)
    return rep.id


def saved(home: Path) -> dict[str, Any]:
    return json.loads((home / "live" / "positions.json").read_text())


def position(home: Path, source: Path, datamart: str = "dm1") -> dict[str, Any]:
    return saved(home)["files"][str(source)][datamart]


def rejects(home: Path) -> list[dict[str, Any]]:
    path = home / "live" / f"rejects-{time.strftime('%Y%m%d')}.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Follower:
    """`LiveReplication.run` in a thread, stopped the way the CLI stops it (its `stop` callable); its log kept."""

    def __init__(self, home: Path, source: Path | str, *, follow: bool = True, **options: Any) -> None:
        self.logs: list[str] = []
        self.stopping = threading.Event()
        self.outcome: live.LiveOutcome | None = None
        self.error: BaseException | None = None
        options.setdefault("datamart", "dm1")
        self.engine = live.LiveReplication(
            Registry(home), str(source), follow=follow, stop=self.stopping.is_set, log=self.logs.append, **options
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.outcome = self.engine.run()
        except BaseException as exc:  # handed to the test by stop()
            self.error = exc

    def __enter__(self) -> Follower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)

    def log_count(self, text: str) -> int:
        return sum(text in line for line in list(self.logs))

    def wait_logged(self, text: str, count: int = 1) -> None:
        wait_for(lambda: self.log_count(text) >= count, f"{text!r} logged; log: {self.logs}")

    def stop(self) -> live.LiveOutcome:
        self.stopping.set()
        return self.join()

    def join(self) -> live.LiveOutcome:
        self.thread.join(5)
        assert not self.thread.is_alive(), "the run did not end"
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


# --------------------------------------------------------------------------------------------------------------
# streams: stdin, pipes, a file read once


def test_a_stream_is_delivered_and_its_bad_lines_rejected_by_line_number(
    file_replication: tuple[str, Path], isolated: Path
) -> None:
    _, out = file_replication
    rid = rep_id(isolated, "local")
    too_long = op_line(90)[:-1] + b" " * 300 + b"\n"  # valid, but over --max-line-bytes
    stream = io.BytesIO(
        op_lines(0, 2)
        + account_line(2)
        + b"\n"  # 4: blank, neither a line read nor a reject
        + b"not json\n"  # 5
        + op_line(3).replace(b"UserPoint", b"Nope")  # 6
        + too_long  # 7
        + b"   \n"  # 8: blank
        + op_line(4)[:-1]  # 9: the last line needs no newline
    )
    logs: list[str] = []
    outcome = live.run(Registry(isolated), "-", datamart=None, stdin=stream, max_line_bytes=200, log=logs.append)
    rejects_file = isolated / "live" / f"rejects-{time.strftime('%Y%m%d')}.ndjson"
    result = outcome.to_dict()
    assert result == {
        "lines": 7,
        "operations": {"UserAccount": 1, "UserPoint": 3},
        "rejects": 3,
        "rejects_file": str(rejects_file),
        "delivered": {rid: 4},
        "errored": {},
    }
    assert list(result["operations"]) == ["UserAccount", "UserPoint"], "operations are listed by doc type"
    assert out.read_bytes() == op_lines(0, 2) + account_line(2) + op_line(4)
    records = rejects(isolated)
    assert [(r["source"], r["line"]) for r in records] == [("stdin", 5), ("stdin", 6), ("stdin", 7)]
    assert "doc_type" in records[1]["reason"] and "Nope" in records[1]["reason"]
    assert records[2]["reason"] == "line longer than --max-line-bytes 200"
    assert all("replication" not in r and r["at"].endswith("Z") for r in records)
    assert stat.S_IMODE(rejects_file.stat().st_mode) == 0o600, "rejects hold personal data"
    assert stat.S_IMODE((isolated / "live").stat().st_mode) == 0o700
    assert not stream.closed, "stdin belongs to the caller"
    assert logs == [], "a stream keeps no position and has nothing to report"


def test_a_clean_stream_reports_no_rejects_file_and_creates_none(
    file_replication: tuple[str, Path], isolated: Path
) -> None:
    _, out = file_replication
    outcome = live.run(Registry(isolated), "-", datamart="dm1", stdin=io.BytesIO(op_lines(0, 3)))
    assert outcome.to_dict()["rejects_file"] is None and outcome.rejects == 0
    assert outcome.rejects_file == str(isolated / "live" / f"rejects-{time.strftime('%Y%m%d')}.ndjson")
    assert not list((isolated / "live").glob("rejects-*"))
    assert arrived(out) == Counter(range(3))


def test_a_quiet_pipe_is_flushed_while_it_stays_open(file_replication: tuple[str, Path], isolated: Path) -> None:
    """select() times out when the producer goes quiet: what was read is delivered then, not at the end."""
    _, out = file_replication
    r, w = os.pipe()
    writer = os.fdopen(w, "wb", buffering=0)
    with os.fdopen(r, "rb") as stdin:  # buffered, as sys.stdin.buffer is: read() would wait for a full buffer
        try:
            with Follower(isolated, "-", follow=False, stdin=stdin) as follower:
                writer.write(op_lines(0, 5) + op_line(5)[:20])
                wait_for(lambda: len(arrived(out)) == 5, "the first lines, the pipe still open")
                writer.write(op_line(5)[20:] + op_lines(6, 8))
                wait_for(lambda: len(arrived(out)) == 8, "the next lines, the pipe still open")
                writer.close()
                outcome = follower.join()  # the end of the pipe ends the run: nobody called stop
        finally:
            writer.close()  # a reader stuck in read() gets the end of its input
        assert not stdin.closed
    assert arrived(out) == Counter(range(8))
    assert outcome.lines == 8 and outcome.delivered == {rep_id(isolated, "local"): 8}


def test_stdin_followed_keeps_reading_after_its_end_until_stopped(
    file_replication: tuple[str, Path], isolated: Path
) -> None:
    _, out = file_replication
    r, w = os.pipe()
    with os.fdopen(r, "rb", buffering=0) as stdin, Follower(isolated, "-", follow=True, stdin=stdin) as follower:
        os.write(w, op_lines(0, 3))
        os.close(w)
        wait_for(lambda: len(arrived(out)) == 3, "the lines before the end")
        time.sleep(5 * POLL_S)
        assert follower.thread.is_alive(), "--follow stopped at the end of the input"
        outcome = follower.stop()
    assert outcome.lines == 3
    assert not (isolated / "live" / "positions.json").exists(), "a pipe has no position"


def test_an_endless_stream_is_flushed_every_interval_without_going_idle(
    file_replication: tuple[str, Path], isolated: Path
) -> None:
    """A producer that never pauses: delivery must not wait for the end of the input (nor for a quiet moment)."""
    _, out = file_replication
    seen_during: list[int] = []

    def during(chunk: int) -> None:
        seen_during.append(len(arrived(out)))

    stream = Endless(chunks=30, on_chunk=during, pause_s=FLUSH_S / 4)
    outcome = live.run(Registry(isolated), "-", datamart="dm1", stdin=stream)
    assert outcome.lines == 300 and arrived(out) == Counter(range(300))
    assert any(0 < n < 300 for n in seen_during), "nothing was delivered before the end of the input"


class Endless(io.RawIOBase):
    """An in-memory stdin that is never empty until its last chunk (the engine never goes idle): ten lines a read,
    `on_chunk(i)` called before chunk i is handed over."""

    def __init__(self, chunks: int, on_chunk: Callable[[int], None], pause_s: float = 0.0) -> None:
        self.chunks = chunks
        self.on_chunk = on_chunk
        self.pause_s = pause_s
        self.next = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.next >= self.chunks:
            return b""
        i = self.next
        self.next += 1
        self.on_chunk(i)
        time.sleep(self.pause_s)
        return op_lines(10 * i, 10 * i + 10)


def test_a_pause_takes_effect_while_lines_keep_arriving(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    """The registry is re-read between lines, not only when the input goes quiet: here it never does."""
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    for name, path in (("a", a), ("b", b)):
        cli("create", "--type", "file", "--name", name, "--path", path)
        cli("activate", name)
    registry = Registry(isolated)
    changed_at: dict[int, float] = {}

    def pause_b(chunk: int) -> None:  # paused after line 100, active again after line 400, paused after line 500
        if chunk in (10, 50):
            replications.pause(registry, "b")
        elif chunk == 40:
            replications.activate(registry, "b")
        else:
            return
        changed_at[chunk] = time.monotonic()

    stream = Endless(chunks=80, on_chunk=pause_b, pause_s=REFRESH_S / 10)
    outcome = live.run(registry, "-", datamart="dm1", stdin=stream)
    assert changed_at[40] - changed_at[10] > 3 * REFRESH_S, "the stream went too fast to tell"
    assert arrived(a) == Counter(range(800))
    got = arrived(b)
    assert max(got.values()) == 1
    first = sorted(s for s in got if s < 400)
    assert first == list(range(len(first))) and 100 <= len(first) < 390, f"b got {len(first)} lines, paused at 100"
    assert any(400 <= s < 500 for s in got), "b was activated again but received nothing"
    assert not any(s >= 700 for s in got), "b received lines long after its second pause"
    assert outcome.delivered == {rep_id(isolated, "a"): 800, rep_id(isolated, "b"): len(got)}


def test_a_file_read_once_is_delivered_and_released(file_replication: tuple[str, Path], tmp_path: Path) -> None:
    _, out = file_replication
    source = tmp_path / "ops.ndjson"
    source.write_bytes(op_lines(0, 4))
    before = open_fds()
    outcome = live.run(Registry(), str(source), datamart="dm1", log=lambda _: None)
    assert open_fds() == before, "a descriptor was left open"
    assert outcome.lines == 4 and arrived(out) == Counter(range(4))
    with pytest.raises(InvalidInputError) as err:
        live.run(Registry(), str(tmp_path / "missing.ndjson"), datamart="dm1")
    assert err.value.code == "INVALID_INPUT"
    assert str(err.value) == f"{tmp_path / 'missing.ndjson'}: cannot read (No such file or directory)"


def test_where_to_start_needs_a_followed_file(file_replication: tuple[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "ops.ndjson"
    source.write_bytes(b"")
    for args in (("-", True, "end"), ("-", True, "start"), (str(source), False, "end"), (str(source), False, "start")):
        with pytest.raises(UsageError, match="they need --follow and a FILE"):
            live.LiveReplication(Registry(), args[0], datamart="dm1", follow=args[1], start=args[2])  # type: ignore[arg-type]


def test_a_followed_fifo_is_read_without_a_position(file_replication: tuple[str, Path], tmp_path: Path) -> None:
    _, out = file_replication
    fifo = tmp_path / "ops.fifo"
    os.mkfifo(fifo)
    home = Registry().root
    follower = Follower(home, fifo)
    with follower:
        with fifo.open("wb") as w:
            w.write(op_lines(0, 3))
        wait_for(lambda: len(arrived(out)) == 3, "the FIFO's lines")
        time.sleep(5 * POLL_S)
        assert follower.thread.is_alive()
        outcome = follower.stop()
    assert outcome.lines == 3
    assert not (home / "live" / "positions.json").exists()
    assert follower.logs == []


def test_the_log_goes_to_stderr_by_default(
    file_replication: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "ops.ndjson"
    source.write_bytes(b"")
    live.run(Registry(), str(source), datamart="dm1", follow=True, stop=lambda: True)
    captured = capsys.readouterr()
    assert captured.err == f"{source}: no saved position, reading from the start\n" and captured.out == ""


# --------------------------------------------------------------------------------------------------------------
# framing


def frame(data: bytes, chunk: int, limit: int = 10) -> tuple[list[tuple[int, bytes | None]], list[int]]:
    framer = live.Framer(limit)
    lines: list[tuple[int, bytes | None]] = []
    marks: list[int] = []
    for i in range(0, len(data), chunk):
        lines += framer.feed(data[i : i + chunk])
        marks.append(framer.boundary)
    lines += framer.finish()
    marks.append(framer.boundary)
    return lines, marks


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 11, 100])
def test_lines_are_the_same_whatever_the_reads_cut(chunk: int) -> None:
    data = b"abc\n\n0123456789\n0123456789ABCDEF\nx\n0123456789AB" + b"C" * 20 + b"\nend"
    lines, _ = frame(data, chunk)
    assert lines == [(1, b"abc"), (2, b""), (3, b"0123456789"), (4, None), (5, b"x"), (6, None), (7, b"end")]


def test_the_framer_knows_where_the_last_complete_line_ends() -> None:
    framer = live.Framer(10, offset=100, line=7)
    assert list(framer.feed(b"ab\ncd")) == [(8, b"ab")]
    assert (framer.pos, framer.boundary, framer.line, framer.boundary_line, framer.partial) == (105, 103, 8, 8, b"cd")
    assert list(framer.feed(b"0123456789")) == [(9, None)]  # "cd0123456789" is over the limit: skipped
    assert (framer.boundary, framer.line, framer.boundary_line, framer.partial) == (103, 9, 8, b"")
    assert list(framer.feed(b"xyz\nok")) == []
    assert (framer.boundary, framer.line, framer.boundary_line, framer.partial) == (119, 9, 9, b"ok")
    assert list(framer.finish()) == [(10, b"ok")]
    assert (framer.pos, framer.boundary, framer.boundary_line) == (121, 121, 10)
    framer.reset(5, 1)
    assert (framer.pos, framer.boundary, framer.line, framer.boundary_line, framer.partial) == (5, 5, 1, 1, b"")


def test_the_end_of_input_in_an_overlong_line_or_after_blanks_adds_no_line() -> None:
    framer = live.Framer(4)
    assert list(framer.feed(b"a\n123456")) == [(1, b"a"), (2, None)]
    assert list(framer.finish()) == []
    assert (framer.boundary, framer.boundary_line, framer.partial) == (8, 2, b"")
    framer = live.Framer(4)
    assert list(framer.feed(b"a\n  ")) == [(1, b"a")]
    assert list(framer.finish()) == [] and framer.boundary_line == 1
    framer = live.Framer(4)
    assert list(framer.feed(b"1234")) == [] and framer.partial == b"1234", "exactly the limit is allowed"
    assert list(framer.finish()) == [(1, b"1234")]


# --------------------------------------------------------------------------------------------------------------
# following a file


def test_a_followed_file_delivers_appends_and_saves_its_position_after_each_flush(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5) + op_line(5)[:30])
    with Follower(isolated, source) as follower:
        wait_for(lambda: len(arrived(out)) == 5, "the first lines")
        wait_for(lambda: position(isolated, source)["line"] == 5, "the first position")
        first = position(isolated, source)
        append(source, op_line(5)[30:] + op_lines(6, 9))
        wait_for(lambda: len(arrived(out)) == 9, "the appended lines")
        wait_for(lambda: position(isolated, source)["line"] == 9, "the position after them")
        outcome = follower.stop()
    assert follower.logs == [f"{source}: no saved position, reading from the start"]
    st = source.stat()
    offset = len(op_lines(0, 5))
    assert first == {
        "device": st.st_dev,
        "inode": st.st_ino,
        "offset": offset,
        "size": offset + 30,
        "line": 5,
        "tail_sha256": hashlib.sha256(op_lines(0, 5)[-64:]).hexdigest(),
        "updated_at": first["updated_at"],
    }
    last = position(isolated, source)
    data = source.read_bytes()
    assert (last["offset"], last["size"], last["line"]) == (len(data), len(data), 9)
    assert last["tail_sha256"] == hashlib.sha256(data[-64:]).hexdigest()
    assert saved(isolated)["version"] == 1 and "waiting_for" not in last
    text = (isolated / "live" / "positions.json").read_text()  # one key a line, sorted: readable and diffable
    assert text == json.dumps(saved(isolated), indent=1, sort_keys=True) + "\n"
    assert arrived(out) == Counter(range(9))
    assert outcome.to_dict() == {
        "lines": 9,
        "operations": {"UserPoint": 9},
        "rejects": 0,
        "rejects_file": None,
        "delivered": {rep_id(isolated, "local"): 9},
        "errored": {},
    }
    for name in ("positions.json", "positions.lock"):
        assert stat.S_IMODE((isolated / "live" / name).stat().st_mode) == 0o600


def test_a_followed_file_with_bad_lines_rejects_them_by_line_in_a_private_file(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_line(0) + b"{}\n" + op_line(1))
    with Follower(isolated, source, max_line_bytes=200) as follower:
        wait_for(lambda: len(arrived(out)) == 2, "the good lines")
        append(source, b"x" * 500 + b"\n" + op_line(2))
        wait_for(lambda: len(arrived(out)) == 3, "the line after the overlong one")
        outcome = follower.stop()
    records = rejects(isolated)
    assert [(r["source"], r["line"]) for r in records] == [(str(source), 2), (str(source), 4)]
    assert outcome.lines == 5 and outcome.rejects == 2
    assert position(isolated, source)["line"] == 5


def test_a_long_backlog_is_acknowledged_every_batch_of_lines(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A followed file is flushed every MAX_UNACKED_LINES lines, whatever the time: that bounds what a crash sends
    again. Seen from inside the run: `stop` is asked after every line."""
    _, out = file_replication
    monkeypatch.setattr(live, "MAX_UNACKED_LINES", 4)
    monkeypatch.setattr(live, "FLUSH_INTERVAL_S", 3600.0)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 11))
    delivered_when_asked: list[int] = []

    def stop() -> bool:
        delivered_when_asked.append(len(arrived(out)))
        return len(delivered_when_asked) > 20

    live.run(Registry(isolated), str(source), datamart="dm1", follow=True, stop=bounded(stop), log=lambda _: None)
    # asked before the first read, then after each of the 11 lines: flushed after lines 4 and 8
    assert delivered_when_asked[:12] == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8]
    assert arrived(out) == Counter(range(11)) and position(isolated, source)["line"] == 11


def test_an_idle_follower_does_not_rewrite_its_position(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 3))
    with Follower(isolated, source) as follower:
        wait_for(lambda: position(isolated, source)["line"] == 3, "the position")
        inode = (isolated / "live" / "positions.json").stat().st_ino
        time.sleep(10 * FLUSH_S)
        follower.stop()
    assert (isolated / "live" / "positions.json").stat().st_ino == inode, "positions.json rewritten for nothing"
    with Follower(isolated, source) as follower:  # a restart with nothing new
        follower.wait_logged("continuing after line 3")
        time.sleep(5 * FLUSH_S)
        follower.stop()
    assert (isolated / "live" / "positions.json").stat().st_ino == inode


def _rename(source: Path) -> None:
    with source.open("ab") as writer:  # a logger's descriptor, kept across the rename until it reopens
        writer.write(op_lines(20, 30))
        writer.flush()
        os.rename(source, source.with_name("live.ndjson.1"))
        writer.write(op_lines(30, 35) + op_line(35)[:-1])  # its last line is never terminated
    source.write_bytes(op_lines(100, 110))


def test_rotation_by_rename_reads_the_old_file_to_its_end_then_the_new_one(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 20))
    with Follower(isolated, source) as follower:
        wait_for(lambda: len(arrived(out)) == 20, "the first lines")
        _rename(source)
        follower.wait_logged("replaced (new inode)")
        wait_for(lambda: len(arrived(out)) == 46, "every line of both files")
        wait_for(lambda: position(isolated, source)["line"] == 10, "the new file's position")
        outcome = follower.stop()
    assert arrived(out) == Counter([*range(36), *range(100, 110)]), "every line once, none torn"
    assert follower.logs[1:] == [f"{source}: replaced (new inode), reading the new file from the start"]
    pos = position(isolated, source)
    assert (pos["inode"], pos["offset"]) == (source.stat().st_ino, source.stat().st_size)
    assert outcome.lines == 46 and not rejects(isolated)


def test_a_name_that_vanishes_keeps_the_old_file_until_a_new_one_appears(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    with Follower(isolated, source) as follower:
        wait_for(lambda: len(arrived(out)) == 5, "the first lines")
        with source.open("ab") as writer:
            source.unlink()
            time.sleep(10 * POLL_S)
            writer.write(op_lines(5, 8))
        wait_for(lambda: len(arrived(out)) == 8, "lines appended to the removed file")
        assert follower.logs[1:] == []
        source.write_bytes(op_lines(100, 102))
        wait_for(lambda: len(arrived(out)) == 10, "the new file")
        follower.stop()
    assert arrived(out) == Counter([*range(8), 100, 101])


@pytest.mark.parametrize("grow", [True, False], ids=["grows-past-the-offset", "stays-shorter"])
def test_copytruncate_is_read_again_from_the_start(
    grow: bool, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 20))
    with Follower(isolated, source) as follower:
        wait_for(lambda: len(arrived(out)) == 20, "the first lines")
        with source.open("r+b") as f:
            f.truncate(0)
            f.write(op_lines(100, 140 if grow else 105))  # at once: it may be past the old offset when looked at
        follower.wait_logged("truncated, reading from the start")
        wait_for(lambda: len(arrived(out)) == (60 if grow else 25), "the new content")
        wait_for(lambda: position(isolated, source)["line"] == (40 if grow else 5), "the new position")
        follower.stop()
    assert arrived(out) == Counter([*range(20), *range(100, 140 if grow else 105)])
    assert follower.logs[1:] == [f"{source}: truncated, reading from the start"]
    assert not rejects(isolated)


def test_a_line_cut_by_truncation_is_rejected_with_its_line_number(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5) + op_line(5)[:40])
    with Follower(isolated, source) as follower:
        wait_for(lambda: position(isolated, source)["line"] == 5, "the first lines")
        with source.open("r+b") as f:
            f.truncate(0)
        follower.wait_logged("truncated, reading from the start")
        wait_for(lambda: position(isolated, source)["offset"] == 0, "the position at the start")
        append(source, op_lines(100, 102))
        wait_for(lambda: len(arrived(out)) == 7, "the new lines")
        outcome = follower.stop()
    (record,) = rejects(isolated)
    assert (record["source"], record["line"]) == (str(source), 6)
    assert record["reason"] == "incomplete line: the file was truncated before its end was read"
    assert outcome.rejects == 1 and arrived(out) == Counter([*range(5), 100, 101])


# --------------------------------------------------------------------------------------------------------------
# restarts


def follow_until(home: Path, source: Path, line: int, **options: Any) -> Follower:
    """A run of the follower until its saved position reaches `line`."""
    with Follower(home, source, **options) as follower:
        wait_for(lambda: position(home, source)["line"] == line, f"position at line {line}; log: {follower.logs}")
        follower.stop()
    return follower


def test_a_restart_continues_after_the_saved_line(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 10))
    follow_until(isolated, source, 10)
    append(source, op_lines(10, 15))
    second = follow_until(isolated, source, 15, start="end")  # a saved position wins over --from-end
    assert second.logs == [f"{source}: continuing after line 10 (saved position)"]
    assert arrived(out) == Counter(range(15))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.write_bytes(op_lines(100, 105)), "truncated while dmrepl was stopped, reading from the start"),
        (
            lambda p: p.write_bytes(op_lines(0, 9) + op_line(109) + op_lines(10, 12)),
            "rewritten while dmrepl was stopped, reading from the start",
        ),
    ],
    ids=["truncated", "rewritten"],
)
def test_a_file_changed_in_place_while_stopped_is_read_from_the_start(
    change: Callable[[Path], None], message: str, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 10))
    follow_until(isolated, source, 10)
    inode = source.stat().st_ino
    change(source)
    assert source.stat().st_ino == inode
    lines = source.read_bytes().count(b"\n")
    second = follow_until(isolated, source, lines)
    assert second.logs == [f"{source}: {message}"]
    assert sum(arrived(out).values()) == 10 + lines


@pytest.mark.parametrize("appended", [5, 0], ids=["appended-to-before-rotation", "rotated-as-left"])
def test_a_file_rotated_while_stopped_is_finished_from_next_to_it_first(
    appended: int, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 10))
    follow_until(isolated, source, 10)
    append(source, op_lines(10, 10 + appended))
    rotated = tmp_path / "live.ndjson.1"
    os.rename(source, rotated)
    (tmp_path / "same-size-decoy").write_bytes(op_lines(0, 15))  # another inode: never mistaken for it
    source.write_bytes(op_lines(100, 103))
    with Follower(isolated, source) as follower:
        wait_for(lambda: len(arrived(out)) == 13 + appended, "the rest of the old file, then the new one")
        wait_for(lambda: position(isolated, source)["inode"] == source.stat().st_ino, "the new file's position")
        follower.stop()
    assert arrived(out) == Counter([*range(10 + appended), *range(100, 103)])
    assert follower.logs == [
        f"{source}: replaced while dmrepl was stopped: reading the rest of {rotated} after line 10 first",
        f"{source}: replaced (new inode), reading the new file from the start",
    ]


@pytest.mark.parametrize("where", ["elsewhere", "rewritten"])
def test_a_file_rotated_away_out_of_reach_starts_the_new_file_from_the_start(
    where: str, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 10))
    follow_until(isolated, source, 10)
    if where == "elsewhere":
        (tmp_path / "archive").mkdir()
        os.rename(source, tmp_path / "archive" / "live.ndjson.1")
    else:  # next to it, but not the bytes that were read just before the position: not the same content
        rotated = tmp_path / "live.ndjson.1"
        os.rename(source, rotated)
        with rotated.open("r+b") as f:
            f.seek(len(op_lines(0, 10)) - 40)
            f.write(b"X" * 10)
    source.write_bytes(op_lines(100, 103))
    os.mkfifo(tmp_path / "a.fifo")  # opening it would block: only an entry with the saved inode may be opened
    second = follow_until(isolated, source, 3)
    assert second.logs == [
        f"{source}: replaced while dmrepl was stopped (new inode), the old file is not next to it: "
        "reading the new file from the start"
    ]
    assert arrived(out) == Counter([*range(10), *range(100, 103)])


def test_a_rotated_file_shorter_than_the_saved_offset_is_not_the_old_one(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 10))
    follow_until(isolated, source, 10)
    rotated = tmp_path / "live.ndjson.1"
    os.rename(source, rotated)
    os.truncate(rotated, 100)
    source.write_bytes(op_lines(100, 102))
    second = follow_until(isolated, source, 2)
    assert "the old file is not next to it" in second.logs[0]
    assert arrived(out) == Counter([*range(10), 100, 101])


def test_from_end_starts_after_the_last_complete_line(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 100) + op_line(100)[:30])  # a line being written is a new line
    with Follower(isolated, source, start="end") as follower:
        wait_for(lambda: position(isolated, source)["line"] == 100, "the start position")
        append(source, op_line(100)[30:] + op_lines(101, 105))
        wait_for(lambda: position(isolated, source)["line"] == 105, "the new lines")
        follower.stop()
    assert follower.logs == [f"{source}: no saved position, starting at its end (after line 100)"]
    assert arrived(out) == Counter(range(100, 105))


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b"", 0),
        (b"no newline at all", 0),
        (b"\n" * 3 + b"x" * 70_000, 3),  # the last newline is more than one 64 KiB step back
        (b"\n" * 3 + b"x" * 200_000 + b"\n" + b"y" * 10, 4),
        (b"\n" + b"x" * 70_000, 1),  # the only newline is the first byte of the file (and of the last step back)
        (b"\n" + b"x" * 65_536, 1),  # ... and the step back before it is exactly one byte
    ],
    ids=["empty", "no-newline", "long-partial", "long-line", "first-byte", "first-byte-alone"],
)
def test_from_end_finds_the_last_newline_however_far_back(
    content: bytes, line: int, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    source = tmp_path / "live.ndjson"
    source.write_bytes(content)
    offset = content.rfind(b"\n") + 1
    with Follower(isolated, source, start="end") as follower:
        wait_for(lambda: (isolated / "live" / "positions.json").exists(), "the start position")
        follower.stop()
    assert follower.logs[0] == f"{source}: no saved position, starting at its end (after line {line})"
    pos = position(isolated, source)
    assert (pos["offset"], pos["line"]) == (offset, line)
    assert pos["tail_sha256"] == hashlib.sha256(content[max(0, offset - 64) : offset]).hexdigest()


def test_from_end_counts_lines_across_many_reads(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "READ_CHUNK", 100)
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 30))
    with Follower(isolated, source, start="end") as follower:
        follower.wait_logged("starting at its end (after line 30)")
        append(source, op_lines(30, 40))
        wait_for(lambda: position(isolated, source)["line"] == 40, "the appended lines, read 100 bytes at a time")
        follower.stop()
    assert arrived(out) == Counter(range(30, 40))


# --------------------------------------------------------------------------------------------------------------
# positions.json and the follow lock


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        (b"[]", "no 'files' table"),
        (b'{"version": 1}', "no 'files' table"),
        (b'{"version": 1, "files": []}', "no 'files' table"),
        (b'{"version": 2, "files": {}}', "version 2 is not 1"),
        (b'{"files": {}}', "version None is not 1"),
    ],
)
def test_unreadable_positions_are_refused_and_kept(
    content: bytes, why: str, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 3))
    path = isolated / "live" / "positions.json"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(content)
    before = open_fds()
    with pytest.raises(InvalidInputError) as err:
        live.run(Registry(), str(source), datamart="dm1", follow=True, stop=bounded(lambda: False), log=lambda _: None)
    assert err.value.code == "POSITIONS_INVALID"
    assert str(err.value) == (
        f"{path}: the saved positions do not parse ({why}); dmrepl will not overwrite them: "
        "move the file away to start every followed file afresh"
    )
    assert path.read_bytes() == content, "dmrepl overwrote positions it could not read"
    assert open_fds() == before, "the refused run left a descriptor open"
    path.unlink()  # nothing was left locked by the refused run
    follow_until(isolated, source, 3)


@pytest.mark.parametrize("entry", [{"offset": 3}, "text", {"device": 1, "inode": 2, "offset": 3, "size": 4}])
def test_an_incomplete_position_is_refused_naming_the_file(
    entry: Any, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 3))
    path = isolated / "live" / "positions.json"
    path.parent.mkdir(mode=0o700)
    path.write_text(json.dumps({"version": 1, "files": {str(source): {"dm1": entry}}}))
    with pytest.raises(InvalidInputError) as err:
        live.run(Registry(), str(source), datamart="dm1", follow=True, stop=bounded(lambda: False), log=lambda _: None)
    assert err.value.code == "POSITIONS_INVALID"
    assert str(err.value).startswith(f"{path}: the position of {source} for datamart dm1 is incomplete (")
    assert str(err.value).endswith("remove that entry to read the file from the start")


def test_followers_of_two_files_keep_each_others_positions(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    one, two = tmp_path / "one.ndjson", tmp_path / "two.ndjson"
    one.write_bytes(op_lines(0, 2))
    two.write_bytes(op_lines(10, 13))
    with Follower(isolated, one), Follower(isolated, two):
        wait_for(lambda: str(one) in saved(isolated)["files"] and str(two) in saved(isolated)["files"], "both")
        wait_for(lambda: position(isolated, one)["line"] == 2 and position(isolated, two)["line"] == 3, "lines")
    follow_until(isolated, one, 2)
    assert set(saved(isolated)["files"]) == {str(one), str(two)}


def test_one_file_is_followed_once_per_datamart(
    cli: Any, file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    cli("datamart", "add", "dm2", "--system-version", "v202205")
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 3))
    with Follower(isolated, source) as first:
        wait_for(lambda: (isolated / "live" / "positions.json").exists(), "the first follower")
        with pytest.raises(RefusedError) as err:
            live.run(
                Registry(), str(source), datamart="dm1", follow=True, stop=bounded(lambda: False), log=lambda _: None
            )
        assert err.value.code == "ALREADY_FOLLOWED"
        assert str(err.value) == (f"{source} is already followed for datamart dm1 by another dmrepl replicate --follow")
        other = follow_until(isolated, source, 3, datamart="dm2")  # another datamart: its own follower
        assert other.logs == [f"{source}: no saved position, reading from the start"]
        first.stop()
    follow_until(isolated, source, 3)  # the lock went with the first follower
    locks = list((isolated / "live").glob("follow-*.lock"))
    assert len(locks) == 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in locks)


# --------------------------------------------------------------------------------------------------------------
# replications that fail, come back, are rebound or deleted


def make_replication(cli: Any, name: str, path: Path) -> None:
    cli("create", "--type", "file", "--name", name, "--path", path)
    cli("activate", name)


def doomed_replication(cli: Any, tmp_path: Path) -> Path:
    """Replication `a` writing into a directory the test deletes to make its next flush fail (UNWRITABLE)."""
    first = tmp_path / "gone" / "ops.ndjson"
    first.parent.mkdir()
    make_replication(cli, "a", first)
    return first


def fail_after_five_lines(follower: Follower, isolated: Path, source: Path, first: Path, more: bytes) -> None:
    """Once lines 1-5 are acknowledged, `first`'s directory goes and `more` arrives: the follower waits."""
    wait_for(lambda: position(isolated, source)["line"] == 5, "the first lines")
    shutil.rmtree(first.parent)  # the next flush cannot record what it wrote
    append(source, more)
    follower.wait_logged("until one is ACTIVE again")


def test_a_failed_replication_holds_the_position_until_it_is_active_again(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    first = doomed_replication(cli, tmp_path)
    rid = rep_id(isolated, "a")
    registry = Registry(isolated)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    second = tmp_path / "elsewhere" / "ops.ndjson"
    second.parent.mkdir()
    with Follower(isolated, source) as follower:
        fail_after_five_lines(follower, isolated, source, first, op_lines(5, 20))
        pos = position(isolated, source)
        assert (pos["line"], pos["offset"], pos["waiting_for"]) == (5, len(op_lines(0, 5)), [rid])
        rep = registry.load().replications[rid]
        assert rep.status is Status.ERROR and rep.error is not None and rep.error.code == "UNWRITABLE"
        assert rep.error.message == f"cannot write {first.parent / '.ops.ndjson.dmrepl'}: No such file or directory"
        assert (rep.error.undelivered, rep.history[-1].reason) == (0, "live replication: UNWRITABLE")
        time.sleep(3 * REFRESH_S)
        assert position(isolated, source)["line"] == 5, "the position moved past lines nobody received"
        replications.recreate(registry, "a", options={"path": second})
        append(source, op_lines(20, 30))
        time.sleep(3 * REFRESH_S)
        assert not second.exists(), "a PAUSED replication received lines"
        replications.activate(registry, "a")
        wait_for(lambda: len(arrived(second)) == 25, "every line after the last acknowledged one")
        wait_for(lambda: "waiting_for" not in position(isolated, source), "the wait recorded as over")
        outcome = follower.stop()
    assert arrived(second) == Counter(range(5, 30))
    assert position(isolated, source)["line"] == 30
    assert follower.logs[1].startswith(f"a ({rid}) went to ERROR (UNWRITABLE): cannot write ")
    assert follower.logs[2:] == [
        f"{source}: no replication of datamart dm1 can receive and {rid} failed: waiting after line 5 until one is "
        "ACTIVE again (dmrepl recreate ID, then dmrepl activate ID)",
        f"a ({rid}) is ACTIVE again: delivering to it",
        f"{source}: delivering again, reading on after line 5",
    ]
    assert outcome.errored == {} and outcome.delivered == {rid: 30}
    assert outcome.lines == 5 + 15 + 25, "lines read before the wait are read again after it"


def test_the_wait_for_a_failed_replication_survives_a_restart(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    first = doomed_replication(cli, tmp_path)
    rid = rep_id(isolated, "a")
    registry = Registry(isolated)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    with Follower(isolated, source) as follower:
        fail_after_five_lines(follower, isolated, source, first, op_lines(5, 20))
        outcome = follower.stop()
    assert list(outcome.errored) == [rid]
    assert outcome.errored[rid]["name"] == "a" and outcome.errored[rid]["code"] == "UNWRITABLE"
    assert outcome.errored[rid]["message"].startswith("cannot write ")
    second = tmp_path / "elsewhere" / "ops.ndjson"
    second.parent.mkdir()
    replications.recreate(registry, "a", options={"path": second})  # PAUSED until activated
    with Follower(isolated, source) as follower:
        follower.wait_logged("waiting after line 5 until one is ACTIVE again")
        append(source, op_lines(20, 30))
        time.sleep(3 * REFRESH_S)
        assert position(isolated, source)["line"] == 5 and not second.exists()
        replications.activate(registry, "a")
        wait_for(lambda: len(arrived(second)) == 25, "the lines after the last acknowledged one")
        outcome = follower.stop()
    assert follower.logs[0] == f"{source}: continuing after line 5 (saved position)"
    assert arrived(second) == Counter(range(5, 30)) and outcome.errored == {}


def test_deleting_the_failed_replication_ends_the_wait(cli: Any, datamart: str, tmp_path: Path, isolated: Path) -> None:
    first = doomed_replication(cli, tmp_path)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    with Follower(isolated, source) as follower:
        fail_after_five_lines(follower, isolated, source, first, op_lines(5, 20))
        replications.delete(Registry(isolated), "a")
        wait_for(lambda: position(isolated, source)["line"] == 20, "the lines read and dropped: nobody waits")
        follower.stop()
    assert "waiting_for" not in position(isolated, source)


def test_a_failure_with_another_replication_alive_does_not_hold_the_file(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    good = tmp_path / "good.ndjson"
    make_replication(cli, "good", good)
    make_replication(cli, "full", Path("/dev/full"))
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    with Follower(isolated, source) as follower:
        wait_for(lambda: position(isolated, source)["line"] == 5, "the first lines")
        append(source, op_lines(5, 8))
        wait_for(lambda: position(isolated, source)["line"] == 8, "the lines after the failure")
        outcome = follower.stop()
    rid = rep_id(isolated, "full")
    assert arrived(good) == Counter(range(8))
    assert list(outcome.errored) == [rid] and outcome.errored[rid]["code"] == "UNWRITABLE"
    assert outcome.delivered == {rep_id(isolated, "good"): 8, rid: 0}
    assert Registry(isolated).load().replications[rid].status is Status.ERROR
    assert "waiting_for" not in position(isolated, source)
    assert not any("waiting after" in line for line in follower.logs)


def test_a_replication_whose_credentials_are_gone_goes_to_error_at_start(
    cli: Any, file_replication: tuple[str, Path], isolated: Path
) -> None:
    name, out = file_replication
    rid = rep_id(isolated, name)
    with Registry(isolated).transaction() as data:
        data.replications[rid].credentials = SecretRef(store="keyring", ref="nowhere")
    logs: list[str] = []
    outcome = live.run(Registry(isolated), "-", datamart="dm1", stdin=io.BytesIO(op_lines(0, 2)), log=logs.append)
    assert list(outcome.errored) == [rid] and outcome.errored[rid]["code"] == "SECRET_NOT_FOUND"
    assert outcome.errored[rid]["name"] == name and "are gone" in outcome.errored[rid]["message"]
    assert logs == [f"{name} ({rid}) went to ERROR (SECRET_NOT_FOUND): {outcome.errored[rid]['message']}"]
    rep = Registry(isolated).load().replications[rid]
    assert rep.status is Status.ERROR and rep.error is not None and rep.error.code == "SECRET_NOT_FOUND"
    assert not out.exists() and outcome.delivered == {rid: 0} and outcome.lines == 2


def test_an_operation_too_large_for_a_destination_is_rejected_for_it_alone(
    file_replication: tuple[str, Path], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, out = file_replication
    rid = rep_id(isolated, name)
    monkeypatch.setattr(file_destination.FileDestination, "max_message_bytes", 150)
    big = (
        json.dumps(
            {
                "ts": 1,
                "doc_type": "UserEmail",
                "doc_id": "00000000-0000-4000-8000-000000000009:" + "a" * 64,
                "op": "UPDATE",
                "value": {"$hash": "a" * 64, "$email": "someone@example.com"},
            }
        ).encode()
        + b"\n"
    )
    outcome = live.run(Registry(isolated), "-", datamart="dm1", stdin=io.BytesIO(op_line(0) + big + op_line(1)))
    (record,) = rejects(isolated)
    assert (record["line"], record["replication"], record["source"]) == (2, rid, "stdin")
    assert record["reason"].startswith("PAYLOAD_TOO_LARGE: ")
    assert outcome.rejects == 1 and outcome.lines == 3 and outcome.operations == Counter(UserPoint=2, UserEmail=1)
    assert arrived(out) == Counter([0, 1]) and outcome.delivered == {rid: 2}


def test_a_rebound_replication_is_reopened_on_its_new_binding(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    name, out = file_replication
    rid = rep_id(isolated, name)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 10))
    moved = tmp_path / "moved.ndjson"
    with Follower(isolated, source) as follower:
        wait_for(lambda: position(isolated, source)["line"] == 10, "the first lines")
        append(source, op_lines(10, 12))
        with Registry(isolated).transaction() as data:  # a binding changed behind the follower's back
            data.replications[rid].settings["path"] = str(moved)
        follower.wait_logged("was rebound")
        append(source, op_lines(12, 20))
        wait_for(lambda: position(isolated, source)["line"] == 20, "the lines after the change")
        outcome = follower.stop()
    assert follower.logs[1:] == [f"{name} ({rid}) was rebound: delivering to its new binding"]
    together = arrived(out) + arrived(moved)
    assert together == Counter(range(20)), "every line once, on one binding or the other"
    assert set(arrived(moved)) >= set(range(12, 20))
    assert outcome.delivered == {rid: 20}


def test_a_replication_activated_while_running_receives_what_follows(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    make_replication(cli, "a", a)
    cli("create", "--type", "file", "--name", "b", "--path", b)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    with Follower(isolated, source) as follower:
        wait_for(lambda: position(isolated, source)["line"] == 5, "the first lines")
        replications.activate(Registry(isolated), "b")
        time.sleep(3 * REFRESH_S)
        append(source, op_lines(5, 9))
        wait_for(lambda: position(isolated, source)["line"] == 9, "the next lines")
        outcome = follower.stop()
    assert arrived(a) == Counter(range(9)) and arrived(b) == Counter(range(5, 9))
    assert outcome.delivered == {rep_id(isolated, "a"): 9, rep_id(isolated, "b"): 4}


def test_with_every_replication_paused_lines_are_read_and_dropped(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    a = tmp_path / "a.ndjson"
    cli("create", "--type", "file", "--name", "a", "--path", a)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    follower = follow_until(isolated, source, 5)
    assert not a.exists() and follower.logs == [f"{source}: no saved position, reading from the start"]


def test_rejects_keep_non_ascii_text_as_utf8(file_replication: tuple[str, Path], isolated: Path) -> None:
    """A reject quotes the line's own text: written as UTF-8, readable as the export shows it, not as \\u escapes."""
    line = op_line(0).replace(b"UserPoint", "Profilé".encode())
    live.run(Registry(isolated), "-", datamart="dm1", stdin=io.BytesIO(line))
    raw = (isolated / "live" / f"rejects-{time.strftime('%Y%m%d')}.ndjson").read_bytes()
    assert "'Profilé'".encode() in raw and b"\\u00e9" not in raw


def test_several_failed_replications_are_all_named_in_the_wait(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        make_replication(cli, name, tmp_path / name / "ops.ndjson")
    ids = sorted(rep_id(isolated, name) for name in ("a", "b"))
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 2))
    with Follower(isolated, source) as follower:
        wait_for(lambda: position(isolated, source)["line"] == 2, "the first lines")
        shutil.rmtree(tmp_path / "a")
        shutil.rmtree(tmp_path / "b")
        append(source, op_lines(2, 4))
        follower.wait_logged("until one is ACTIVE again")
        follower.stop()
    assert follower.log_count(f"can receive and {ids[0]}, {ids[1]} failed: waiting after line 2") == 1
    assert position(isolated, source)["waiting_for"] == ids


def test_a_truncation_found_as_the_last_replication_fails_waits_at_the_start_of_the_new_content(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is truncated (and written again past the old offset) while lines are being read, and the flush that
    the truncation triggers is the one where the only replication fails: the new content's start is where the
    follower waits, not the old content's position (which means nothing in the new content)."""
    monkeypatch.setattr(live, "READ_CHUNK", 200)  # a few lines a read: the truncation lands between two reads
    monkeypatch.setattr(live, "FLUSH_INTERVAL_S", 3600.0)
    monkeypatch.setattr(live, "REFRESH_INTERVAL_S", 3600.0)
    first = doomed_replication(cli, tmp_path)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 3))
    logs: list[str] = []
    lines_after_append: list[int] = []

    def stop() -> bool:  # asked in the follower's own thread, after every line and every poll
        if not lines_after_append and (isolated / "live" / "positions.json").exists():
            if position(isolated, source)["line"] == 3:  # lines 1-3 acknowledged: more arrive
                append(source, op_lines(3, 20))
                lines_after_append.append(0)
        elif lines_after_append:
            lines_after_append[0] += 1
            if lines_after_append[0] == 3:  # two lines read and not yet flushed, 200 bytes at a time
                shutil.rmtree(first.parent)
                with source.open("r+b") as f:
                    f.truncate(0)
                    f.write(op_lines(100, 130))
        return any("waiting after line" in line for line in logs) or len(logs) > 20

    live.run(Registry(isolated), str(source), datamart="dm1", follow=True, stop=bounded(stop), log=logs.append)
    assert logs[-2] == f"{source}: truncated, reading from the start"
    assert logs[-1].endswith(
        "waiting after line 0 until one is ACTIVE again (dmrepl recreate ID, then dmrepl activate ID)"
    )
    assert (position(isolated, source)["offset"], position(isolated, source)["line"]) == (0, 0)


def test_a_stop_takes_effect_after_the_line_being_handled(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    """Ctrl-C while a long read is being handled: what was handled is delivered and saved, the rest of the read is
    left to the next run, which delivers it once."""
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 30))
    asked: list[bool] = []

    def stop() -> bool:  # asked before the first read, then after each line handled
        asked.append(True)
        return len(asked) >= 5

    live.run(Registry(isolated), str(source), datamart="dm1", follow=True, stop=bounded(stop), log=lambda _: None)
    assert arrived(out) == Counter(range(4)) and position(isolated, source)["line"] == 4
    follow_until(isolated, source, 30)
    assert arrived(out) == Counter(range(30))


def test_a_stop_while_a_rotated_file_is_being_finished_keeps_its_place_in_it(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed away, then appended to by its writer: a stop while the old file is being read to its end (a line or
    so a read) keeps the position in the old file, after the line being handled (not the new one's start, nor
    further on), so the next run finishes the old file, then reads the new one: every line once."""
    monkeypatch.setattr(live, "READ_CHUNK", 150)
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    rotated = tmp_path / "live.ndjson.1"
    source.write_bytes(op_lines(0, 5))
    old_inode = source.stat().st_ino
    calls: list[str] = []
    logs: list[str] = []

    def stop() -> bool:  # runs in the follower's thread: each step happens at a known point of its loop
        if not calls:
            if (isolated / "live" / "positions.json").exists() and position(isolated, source)["line"] == 5:
                os.rename(source, rotated)
                source.write_bytes(op_lines(100, 103))
                calls.append("rotated")
            return False
        calls.append("asked")
        if len(calls) == 2:  # the name now shows another file: the old one is being read to its end
            append(rotated, op_lines(5, 10))
        return len(calls) >= 3  # stop after the first of those lines

    live.run(Registry(isolated), str(source), datamart="dm1", follow=True, stop=bounded(stop), log=logs.append)
    assert not any("replaced (new inode)" in line for line in logs), logs
    pos = position(isolated, source)
    assert (pos["inode"], pos["line"]) == (old_inode, 6)
    second = follow_until(isolated, source, 3)
    assert (
        second.logs[0]
        == f"{source}: replaced while dmrepl was stopped: reading the rest of {rotated} after line 6 first"
    )
    assert arrived(out) == Counter([*range(10), *range(100, 103)])


def test_a_file_truncated_while_the_follower_waits_is_read_from_its_start_once_it_can_deliver(
    cli: Any, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    """copytruncate during an outage: the follower waits at the last acknowledged line of the old content; when the
    replication is back, the bytes before that offset are not the ones it read, so it reads the new content from its
    start instead of from the middle of it."""
    first = doomed_replication(cli, tmp_path)
    registry = Registry(isolated)
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    second = tmp_path / "elsewhere" / "ops.ndjson"
    second.parent.mkdir()
    with Follower(isolated, source) as follower:
        fail_after_five_lines(follower, isolated, source, first, op_lines(5, 8))
        with source.open("r+b") as f:  # copied away and emptied, then written again, longer than before
            f.truncate(0)
            f.write(op_lines(100, 120))
        replications.recreate(registry, "a", options={"path": second})
        replications.activate(registry, "a")
        wait_for(lambda: len(arrived(second)) == 20, "the new content")
        follower.stop()
    assert arrived(second) == Counter(range(100, 120)), "the new content was read from the middle"
    assert follower.log_count("truncated, reading from the start") == 1
    assert not rejects(isolated)


def test_a_file_rewritten_in_place_is_caught_by_more_than_the_last_bytes_read(
    file_replication: tuple[str, Path], tmp_path: Path, isolated: Path
) -> None:
    """The last read was a few bytes (blank lines): the bytes compared before the read offset are still the last 64
    read, so content rewritten in place (same size, same last bytes) is noticed and read again from its start."""
    _, out = file_replication
    source = tmp_path / "live.ndjson"
    source.write_bytes(op_lines(0, 5))
    with Follower(isolated, source) as follower:
        wait_for(lambda: position(isolated, source)["line"] == 5, "the first lines")
        append(source, b"\n\n\n")
        wait_for(lambda: position(isolated, source)["line"] == 8, "the blank lines")
        with source.open("r+b") as f:  # same size, same last three bytes, other lines before them
            f.write(op_lines(100, 105))
        time.sleep(5 * POLL_S)
        append(source, op_lines(200, 202))
        wait_for(lambda: 201 in arrived(out), "the lines appended after the rewrite")
        follower.stop()
    assert arrived(out) == Counter([*range(5), *range(100, 105), 200, 201])
    assert follower.log_count("truncated, reading from the start") == 1
