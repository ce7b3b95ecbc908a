"""Live replication: forward a stream of operations to whatever is ACTIVE at each moment.

The registry is re-read every few seconds, so `dmrepl pause` takes effect while this runs; nothing is queued for
a PAUSED replication. A replication that is rebound (`recreate`) or comes back from ERROR (`recreate` + `activate`)
while this runs is reopened within the same interval. Reading stdin uses select() with a timeout so queued
operations are flushed even when the producer goes quiet.

`--follow FILE` follows the file by name, as `tail -F` does, and remembers where it stopped, as Filebeat's registry
does: the position after the last acknowledged line is saved in `<home>/live/positions.json` after every successful
flush, so a restarted follower continues there (see `LiveReplication` for the delivery rule, `FollowedFile` for
rotation, `LiveReplication._start` for what a restart does).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from dmrepl import datamarts, replications
from dmrepl.delivery import SEND_BATCH, Fanout, Target
from dmrepl.errors import InvalidInputError, RefusedError, UsageError
from dmrepl.files import atomic_write, open_append, private_dir
from dmrepl.models import DEFAULT_MAX_LINE_BYTES, DEFAULT_RETRY_BUDGET_S, Replication, Status, now_iso
from dmrepl.operations import DOC_TYPE, InvalidOperation, Message, parse_operation_line
from dmrepl.registry import Registry, ensure_home
from dmrepl.replications import mark_error

REFRESH_INTERVAL_S = 2.0
FLUSH_INTERVAL_S = 1.0
FOLLOW_POLL_S = 0.2
#: A followed file is flushed (and its position saved) at least every this many lines, which bounds what a
#: restart after a crash or `kill -9` sends again.
MAX_UNACKED_LINES = SEND_BATCH
#: Bytes before the read position compared on every read and at a restart: the same inode and a large enough size
#: do not prove the same content (truncated and rewritten, or a recreated file on a reused inode).
TAIL_BYTES = 64
READ_CHUNK = 1 << 20
POSITIONS_FILE = "positions.json"
POSITIONS_VERSION = 1

Start = Literal["start", "end"]
Change = Literal["truncated", "replaced"]
Log = Callable[[str], None]


@dataclass
class LiveOutcome:
    lines: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    rejects: int = 0
    delivered: dict[str, int] = field(default_factory=dict)
    errored: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejects_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "operations": dict(sorted(self.operations.items())),
            "rejects": self.rejects,
            "rejects_file": self.rejects_file if self.rejects else None,
            "delivered": self.delivered,
            "errored": self.errored,
        }


# --- framing ---------------------------------------------------------------------------------------------------


class Framer:
    """Cuts bytes into lines and knows where the last complete line ends: a saved position must point at a line
    boundary, never into a line (nor into an overlong line being skipped)."""

    def __init__(self, max_line_bytes: int, offset: int = 0, line: int = 0) -> None:
        self.max_line_bytes = max_line_bytes
        self.reset(offset, line)

    def reset(self, offset: int, line: int) -> None:
        self.pos = offset  # offset of the next byte to read
        self.boundary = offset  # offset after the last complete line
        self.line = line  # number of the last line yielded
        self.boundary_line = line  # number of the last line that ends at or before `boundary`
        self.buf = b""
        self.skipping = False

    @property
    def partial(self) -> bytes:
        """The start of a line whose end has not been read (empty while an overlong line is skipped)."""
        return b"" if self.skipping else self.buf

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes | None]]:
        """Yield (line number, line) — or (n, None) for a line over the limit. A consumer that stops early must
        `reset` the framer (or stop reading): only `boundary` and `boundary_line` are kept up to date per line."""
        buf = self.buf + chunk if self.buf else chunk
        base = self.pos - len(self.buf)
        self.pos += len(chunk)
        self.buf = b""
        limit = self.max_line_bytes
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            line = buf[start:nl]
            start = nl + 1
            self.boundary = base + start
            if self.skipping:
                self.skipping = False
                self.boundary_line = self.line
                continue
            self.line += 1
            self.boundary_line = self.line
            yield self.line, (line if len(line) <= limit else None)
        rest = buf[start:]
        if len(rest) > limit:
            if not self.skipping:
                self.line += 1
                self.skipping = True
                yield self.line, None
            rest = b""
        self.buf = rest

    def finish(self) -> Iterator[tuple[int, bytes | None]]:
        """The end of the input: a last line without a newline is still a line."""
        rest, skipping = self.buf, self.skipping
        self.buf, self.skipping = b"", False
        self.boundary = self.pos
        if rest.strip() and not skipping:
            self.line += 1
            self.boundary_line = self.line
            yield self.line, (rest if len(rest) <= self.max_line_bytes else None)
        self.boundary_line = self.line


def read_lines(
    stream: BinaryIO, *, follow: bool, max_line_bytes: int, idle: Callable[[], None], stop: Callable[[], bool]
) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, line) — or (n, None) for a line over the limit — calling `idle` whenever input pauses.
    For stdin, pipes and a file read once; a followed regular file is a `FollowedFile`."""
    try:
        fd: int | None = stream.fileno()
    except (OSError, ValueError, AttributeError):
        fd = None  # an in-memory stream (tests, embedding): always readable
    framer = Framer(max_line_bytes)
    while not stop():
        if fd is not None:
            ready, _, _ = select.select([fd], [], [], FLUSH_INTERVAL_S)
            if not ready:
                idle()
                continue
        chunk = os.read(fd, READ_CHUNK) if fd is not None else stream.read(READ_CHUNK)
        if not chunk:
            idle()
            if follow:
                time.sleep(FOLLOW_POLL_S)
                continue
            break
        yield from framer.feed(chunk)
    yield from framer.finish()


# --- positions -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where a followed file was read up to, identified the way `tail -F` and Filebeat identify a file: device and
    inode (a name is reused by rotation), with the hash of the bytes before `offset` against inode reuse."""

    device: int
    inode: int
    offset: int
    size: int
    line: int
    tail_sha256: str

    def same_place(self, other: Position | None) -> bool:
        return other is not None and (self.device, self.inode, self.offset, self.line) == (
            other.device,
            other.inode,
            other.offset,
            other.line,
        )


def _tail_hash(fd: int, offset: int) -> str:
    k = min(TAIL_BYTES, offset)
    return hashlib.sha256(os.pread(fd, k, offset - k) if k else b"").hexdigest()


class Positions:
    """`<home>/live/positions.json`: {"version": 1, "files": {absolute path: {datamart: position}}}, a position
    being `Position`'s fields, `updated_at`, and `waiting_for`: the replications a follower stopped for (see
    `LiveReplication`), so that a restarted one keeps waiting for them.

    One file for every follower of the home, like Filebeat's registry: each write is a read-modify-write under
    `positions.lock` (followers of other files must not lose each other's update), then `atomic_write`, so a crash
    leaves the previous positions or the new ones. Readers do not lock."""

    def __init__(self, live_dir: Path) -> None:
        self.path = live_dir / POSITIONS_FILE
        self.lock_path = live_dir / "positions.lock"

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"version": POSITIONS_VERSION, "files": {}}
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
                raise ValueError("no 'files' table")
            if data.get("version") != POSITIONS_VERSION:
                raise ValueError(f"version {data.get('version')!r} is not {POSITIONS_VERSION}")
        except ValueError as exc:
            raise InvalidInputError(
                f"{self.path}: the saved positions do not parse ({exc}); dmrepl will not overwrite them: "
                "move the file away to start every followed file afresh",
                code="POSITIONS_INVALID",
            ) from None
        return data

    def get(self, path: str, datamart: str) -> tuple[Position | None, set[str]]:
        """The saved position (None: a first run) and the replications it was waiting for."""
        entry = self._load()["files"].get(path, {}).get(datamart)
        if entry is None:
            return None, set()
        try:
            position = Position(**{k: entry[k] for k in Position.__dataclass_fields__})
            return position, {str(r) for r in entry.get("waiting_for", [])}
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(
                f"{self.path}: the position of {path} for datamart {datamart} is incomplete ({exc}); "
                "remove that entry to read the file from the start",
                code="POSITIONS_INVALID",
            ) from None

    def put(self, path: str, datamart: str, position: Position, waiting: Iterable[str] = ()) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self._load()
            entry: dict[str, Any] = {**asdict(position), "updated_at": now_iso()}
            if waiting:
                entry["waiting_for"] = sorted(waiting)
            data["files"].setdefault(path, {})[datamart] = entry
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n")
        finally:
            os.close(fd)


# --- following a file by name ----------------------------------------------------------------------------------


class FollowedFile:
    """A regular file followed by name, like `tail -F`, read with pread at an offset this class owns.

    Rotation rules: at the end of the data, the name is stat()ed. A different inode means the file was renamed away
    (or removed) and a new one created: the old descriptor is read to its end, and only once it has stayed quiet
    for a poll interval (a writer may append to it until it reopens its log) is the new file opened, from its start.
    A size below the read offset, or bytes before the read offset that are not the ones read (checked on every read,
    since a truncated file can grow past the old offset between two polls), mean the file was truncated in place
    (`copytruncate`): it is read again from its start. A name that vanished keeps the old descriptor until a new
    file appears."""

    def __init__(self, path: str, fd: int, framer: Framer) -> None:
        self.path = path
        self.fd = fd
        self.framer = framer
        self.identity = self._identity()
        self.tail = self._tail(framer.pos)

    def _identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def _tail(self, offset: int) -> bytes:
        k = min(TAIL_BYTES, offset)
        return os.pread(self.fd, k, offset - k) if k else b""

    def read(self) -> bytes | None:
        """New bytes (b"" at the end), or None when the bytes before the read offset changed (truncated)."""
        k = len(self.tail)
        data = os.pread(self.fd, READ_CHUNK + k, self.framer.pos - k)
        if data[:k] != self.tail:
            return None
        new = data[k:]
        if new:
            self.tail = new[-TAIL_BYTES:] if len(new) >= TAIL_BYTES else (self.tail + new)[-TAIL_BYTES:]
        return new

    def change(self) -> Change | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != self.identity:
            return "replaced"
        if st.st_size < self.framer.pos:
            return "truncated"
        return None

    def position(self) -> Position:
        offset = self.framer.boundary
        return Position(
            device=self.identity[0],
            inode=self.identity[1],
            offset=offset,
            size=os.fstat(self.fd).st_size,
            line=self.framer.boundary_line,
            tail_sha256=_tail_hash(self.fd, offset),
        )

    def seek(self, offset: int, line: int) -> None:
        self.framer.reset(offset, line)
        self.tail = self._tail(offset)

    def reopen(self) -> bool:
        """Switch to the file now at the name; False if there is none (yet)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        os.close(self.fd)
        self.fd = fd
        self.identity = self._identity()
        self.seek(0, 0)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _last_line_end(fd: int, size: int) -> int:
    """Offset after the last newline: `--from-end` must not start in the middle of a line being written."""
    pos = size
    while pos > 0:
        step = min(pos, 1 << 16)
        chunk = os.pread(fd, step, pos - step)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0


def _count_lines(fd: int, end: int) -> int:
    count, pos = 0, 0
    while pos < end:
        chunk = os.pread(fd, min(READ_CHUNK, end - pos), pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


# --- the run ---------------------------------------------------------------------------------------------------


def _binding_key(rep: Replication) -> tuple[Any, ...]:
    """What makes a target stale when it changes: settings and the credentials' reference and fingerprint."""
    creds = rep.credentials
    return rep.type, rep.settings, creds.ref if creds else None, creds.fingerprint if creds else None


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class LiveReplication:
    """One `dmrepl replicate` run.

    Delivery is at least once. For a followed file, the saved position only ever points after lines that every
    replication able to receive them has acknowledged:

    - after each flush, if at least one target is alive (every live target's `Fanout.flush()` succeeded), the
      position moves to the end of the last line read. A replication that failed in that flush went to ERROR and,
      like a PAUSED one, receives nothing more from this run until it is ACTIVE again: it cannot hold back the
      others;
    - if no target is alive and a replication of the datamart failed (it is in ERROR, or was seen in ERROR and has
      not been delivered to since: `recreate` leaves it PAUSED until `activate`), the position does not move:
      reading stops, the file is rewound to the last acknowledged line, and everything after it is read again once
      a replication is ACTIVE and open again, in this process or in the next one (deleting the failed replication
      ends the wait too);
    - if nothing is ACTIVE and nothing failed (everything PAUSED), lines are read and dropped and the position moves
      on: pausing has always meant receiving nothing meanwhile.

    stdin and a file read without --follow keep no position.
    """

    def __init__(
        self,
        registry: Registry,
        source: str,
        *,
        datamart: str | None,
        follow: bool = False,
        start: Start | None = None,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        stop: Callable[[], bool] = lambda: False,
        stdin: BinaryIO | None = None,
        log: Log = _stderr,
    ) -> None:
        if start is not None and (source == "-" or not follow):
            raise UsageError("--from-start/--from-end choose where --follow FILE starts; they need --follow and a FILE")
        self.registry = registry
        self.source = source
        self.follow = follow
        self.start = start
        self.max_line_bytes = max_line_bytes
        self.stop = stop
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.log = log
        self.dm_id = datamarts.resolve(registry.load(), datamart)
        self.outcome = LiveOutcome()
        self.live_dir = private_dir(ensure_home(registry.root) / "live")
        self.rejects_path = self.live_dir / f"rejects-{time.strftime('%Y%m%d')}.ndjson"
        self.outcome.rejects_file = str(self.rejects_path)
        self.name = "stdin" if source == "-" else os.path.abspath(source)
        self.rejects: BinaryIO | None = None
        self.current_line = 0
        self.fanout = Fanout([], retry_budget_s=retry_budget_s, on_reject=self._on_reject, on_fail=self._on_fail)
        self.bindings: dict[str, tuple[Any, ...]] = {}
        self.delivered: Counter[str] = Counter()
        self.errored: dict[str, dict[str, Any]] = {}
        self.failed: set[str] = set()  # replications seen in ERROR and not delivered to since
        self.last_refresh = 0.0
        self.last_flush = time.monotonic()
        self.unacked = 0
        self.follower: FollowedFile | None = None
        self.positions: Positions | None = None
        self.acked: Position | None = None
        self.saved_waiting: set[str] = set()
        self.held = False
        self.lock_fd: int | None = None

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> LiveOutcome:
        stream = None
        try:
            stream = self._open_source()
            self._refresh()
            if self.follower is not None:
                self._follow(self.follower)
            else:
                assert stream is not None
                lines = read_lines(
                    stream, follow=self.follow, max_line_bytes=self.max_line_bytes, idle=self._idle, stop=self.stop
                )
                for line_no, line in lines:
                    self._handle(line_no, line)
            self._flush()
        finally:
            self.fanout.close_all()
            if stream is not None and stream is not self.stdin:
                stream.close()
            if self.follower is not None:
                self.follower.close()
            if self.rejects is not None:
                self.rejects.close()
            if self.lock_fd is not None:
                os.close(self.lock_fd)
        return self._result()

    def _follow(self, f: FollowedFile) -> None:
        while not self.stop():
            if self._holding():
                self._hold(f)
                self._idle()
                time.sleep(FOLLOW_POLL_S)
                continue
            if self.held:
                self.held = False
                self.log(f"{self.name}: delivering again, reading on after line {f.framer.boundary_line}")
            data = f.read()
            if data is None:
                self._truncated(f)
            elif data:
                self._consume(f.framer.feed(data))
            else:
                self._idle()
                change = f.change()
                if change == "replaced":
                    self._replaced(f)
                elif change == "truncated":
                    self._truncated(f)
                else:
                    time.sleep(FOLLOW_POLL_S)

    def _consume(self, lines: Iterable[tuple[int, bytes | None]]) -> None:
        for line_no, line in lines:
            self._handle(line_no, line)
            if self.stop() or self._holding():
                break

    def _handle(self, line_no: int, line: bytes | None) -> None:
        self.current_line = line_no
        if line is None:
            self.outcome.lines += 1
            self._reject(line_no, f"line longer than --max-line-bytes {self.max_line_bytes}")
            return
        if not line.strip():
            return
        self.outcome.lines += 1
        try:
            message = parse_operation_line(line)
        except InvalidOperation as exc:
            self._reject(line_no, str(exc))
            return
        self.outcome.operations[message[DOC_TYPE]] += 1
        for target in self.fanout.live:
            self.fanout.offer(target, (message,))
        self.unacked += 1
        now = time.monotonic()
        if now - self.last_refresh >= REFRESH_INTERVAL_S:
            self._refresh()  # after the offers: a flush in there saves a position that includes this line
        if now - self.last_flush >= FLUSH_INTERVAL_S or (
            self.follower is not None and self.unacked >= MAX_UNACKED_LINES
        ):
            self._flush()

    def _idle(self) -> None:
        self._flush()
        if time.monotonic() - self.last_refresh >= REFRESH_INTERVAL_S:
            self._refresh()

    # -- rotation --------------------------------------------------------------------------------------------

    def _drain(self, f: FollowedFile) -> bool:
        """Read what was appended to the old descriptor; True if there was something (or reading must pause)."""
        found = False
        while not self.stop() and not self._holding():
            data = f.read()
            if not data:
                return found
            found = True
            self._consume(f.framer.feed(data))
        return True

    def _replaced(self, f: FollowedFile) -> None:
        if self._drain(f):
            return
        time.sleep(FOLLOW_POLL_S)
        if self._drain(f):
            return
        self._consume(f.framer.finish())
        self._flush()
        if self._holding() or not f.reopen():
            return
        self.log(f"{self.name}: replaced (new inode), reading the new file from the start")
        self._persist()

    def _truncated(self, f: FollowedFile) -> None:
        partial = f.framer.partial
        if partial.strip():
            self._reject(f.framer.boundary_line + 1, "incomplete line: the file was truncated before its end was read")
        self._flush()
        self.log(f"{self.name}: truncated, reading from the start")
        f.seek(0, 0)
        self._persist(force=True)

    # -- positions -------------------------------------------------------------------------------------------

    def _holding(self) -> bool:
        if self.follower is None or self.fanout.live:
            return False
        return bool(self.failed)

    def _hold(self, f: FollowedFile) -> None:
        """Nothing can receive and something failed: go back to the last acknowledged line and wait there."""
        if self.held:
            return
        self.held = True
        assert self.acked is not None
        f.seek(self.acked.offset, self.acked.line)
        self._save(self.acked, set(self.failed))
        self.log(
            f"{self.name}: no replication of datamart {self.dm_id} can receive and {', '.join(sorted(self.failed))} "
            f"failed: waiting after line {self.acked.line} until one is ACTIVE again (dmrepl recreate ID, then "
            "dmrepl activate ID)"
        )

    def _persist(self, *, force: bool = False) -> None:
        f = self.follower
        if f is None or (self._holding() and not force):
            return
        self._save(f.position(), set())

    def _save(self, position: Position, waiting: set[str]) -> None:
        if position.same_place(self.acked) and waiting == self.saved_waiting:
            return
        assert self.positions is not None
        self.positions.put(self.name, self.dm_id, position, waiting)
        self.acked, self.saved_waiting = position, waiting

    def _open_source(self) -> BinaryIO | None:
        """The stream to read, or None when a regular file is followed (then `self.follower` is set)."""
        if self.source == "-":
            return self.stdin
        try:
            if not self.follow:
                return open(self.source, "rb")
            fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidInputError(f"{self.source}: cannot read ({exc.strerror})", code="INVALID_INPUT") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fdopen(fd, "rb")  # a FIFO or a device: no offsets, no position
        try:
            self._lock_follow()
            self.positions = Positions(self.live_dir)
            self.follower = self._start(fd)
        except BaseException:
            os.close(fd)
            raise
        return None

    def _lock_follow(self) -> None:
        """Two followers of one file for one datamart would deliver everything twice and overwrite each other's
        position."""
        key = hashlib.sha256(f"{self.dm_id}\0{self.name}".encode()).hexdigest()[:16]
        fd = os.open(self.live_dir / f"follow-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RefusedError(
                f"{self.name} is already followed for datamart {self.dm_id} by another dmrepl replicate --follow",
                code="ALREADY_FOLLOWED",
            ) from None
        self.lock_fd = fd

    def _start(self, fd: int) -> FollowedFile:
        """Restart rules, from the saved position of this file and datamart:

        - none (a first run): from the start, or after the last complete line with `--from-end`;
        - same inode, size at least the saved offset and the same bytes before it: after the saved line;
        - same inode but shorter, or other bytes before the offset (truncated, rewritten): from the start;
        - another inode (rotated while stopped): the rest of the old file if it is still in the same directory
          (found by its inode, checked by its bytes before the offset), then the new file from the start.
        """
        assert self.positions is not None
        saved, waiting = self.positions.get(self.name, self.dm_id)
        self.failed, self.saved_waiting = set(waiting), set(waiting)
        st = os.fstat(fd)
        offset = line = 0
        if saved is None:
            if self.start == "end":
                offset = _last_line_end(fd, st.st_size)
                line = _count_lines(fd, offset)
                self.log(f"{self.name}: no saved position, starting at its end (after line {line})")
            else:
                self.log(f"{self.name}: no saved position, reading from the start")
        elif (saved.device, saved.inode) == (st.st_dev, st.st_ino):
            if st.st_size < saved.offset:
                self.log(f"{self.name}: truncated while dmrepl was stopped, reading from the start")
            elif _tail_hash(fd, saved.offset) != saved.tail_sha256:
                self.log(f"{self.name}: rewritten while dmrepl was stopped, reading from the start")
            else:
                offset, line = saved.offset, saved.line
                self.log(f"{self.name}: continuing after line {line} (saved position)")
        else:
            old = self._rotated_away(saved)
            if old is not None:
                old_path, old_fd = old
                os.close(fd)
                fd, offset, line = old_fd, saved.offset, saved.line
                self.log(
                    f"{self.name}: replaced while dmrepl was stopped: reading the rest of {old_path} after line "
                    f"{line} first"
                )
            else:
                self.log(
                    f"{self.name}: replaced while dmrepl was stopped (new inode), the old file is not next to it: "
                    "reading the new file from the start"
                )
        follower = FollowedFile(self.name, fd, Framer(self.max_line_bytes, offset, line))
        self.acked = saved
        self._save(follower.position(), waiting)
        return follower

    def _rotated_away(self, saved: Position) -> tuple[str, int] | None:
        """The renamed file, when rotation left it in the same directory (logrotate's `f.1`, `f-20260101`): one
        readdir, no stat per entry."""
        directory = os.path.dirname(self.name)
        try:
            entries = [e.path for e in os.scandir(directory) if e.inode() == saved.inode and e.path != self.name]
        except OSError:
            return None
        for path in entries:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            st = os.fstat(fd)
            if (
                stat.S_ISREG(st.st_mode)
                and (st.st_dev, st.st_ino) == (saved.device, saved.inode)
                and st.st_size >= saved.offset
                and _tail_hash(fd, saved.offset) == saved.tail_sha256
            ):
                return path, fd
            os.close(fd)
        return None

    # -- delivery --------------------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.unacked:
            self.fanout.flush()
            self.unacked = 0
        self.last_flush = time.monotonic()
        self._persist()

    def _refresh(self) -> None:
        """Make the open targets match the ACTIVE replications, by id and by binding: pause and delete close a
        target, `recreate` + `activate` of a replication in ERROR or a changed binding (re)open it."""
        data = self.registry.load()
        reps = [r for r in data.replications.values() if r.datamart == self.dm_id]
        active = {r.id: r for r in reps if r.status is Status.ACTIVE}
        self.failed = {r.id for r in reps if r.id in self.failed or r.status is Status.ERROR}
        flushed = False
        for rep_id, target in list(self.fanout.targets.items()):
            rep = active.get(rep_id)
            if rep is not None and target.alive and self.bindings[rep_id] == _binding_key(rep):
                continue
            if target.alive and not flushed:
                self._flush()
                flushed = True
            if rep is not None and target.alive:
                self.log(f"{target.name} ({rep_id}) was rebound: delivering to its new binding")
            self._retire(target)
        for rep_id, rep in active.items():
            if rep_id not in self.fanout.targets:
                self._open(rep)
        self.last_refresh = time.monotonic()

    def _retire(self, target: Target) -> None:
        if target.alive:
            self.fanout.close(target)
        self.delivered[target.rep_id] += target.delivered
        del self.fanout.targets[target.rep_id]

    def _open(self, rep: Replication) -> None:
        binding, failure = replications.resolve_binding(self.registry, rep)
        target = self.fanout.add(binding)
        self.bindings[rep.id] = _binding_key(rep)
        if failure is not None:
            target.alive, target.error = False, failure
            self._on_fail(target)
            return
        self.fanout.open(target)
        if target.alive:
            self.failed.discard(rep.id)
            if self.errored.pop(rep.id, None) is not None:
                self.log(f"{rep.name} ({rep.id}) is ACTIVE again: delivering to it")

    def _on_fail(self, target: Target) -> None:
        assert target.error is not None
        error = target.error
        mark_error(
            self.registry,
            target.rep_id,
            code=error.code,
            message=error.message,
            undelivered=0,
            reason="live replication",
        )
        self.errored[target.rep_id] = {"name": target.name, **error.to_dict()}
        self.failed.add(target.rep_id)
        self.log(f"{target.name} ({target.rep_id}) went to ERROR ({error.code}): {error.message}")

    def _on_reject(self, target: Target, message: Message, reason: str) -> None:
        self._reject(self.current_line, reason, target.rep_id)

    def _reject(self, line_no: int, reason: str, replication: str | None = None) -> None:
        self.outcome.rejects += 1
        if self.rejects is None:
            self.rejects = os.fdopen(open_append(self.rejects_path), "ab")  # rejects hold personal data: 0600
        record = {"at": now_iso(), "source": self.name, "line": line_no, "reason": reason}
        if replication:
            record["replication"] = replication
        self.rejects.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    def _result(self) -> LiveOutcome:
        delivered = Counter(self.delivered)
        for target in self.fanout.targets.values():
            delivered[target.rep_id] += target.delivered
        self.outcome.delivered = dict(delivered)
        self.outcome.errored = dict(self.errored)
        return self.outcome


def run(registry: Registry, source: str, **options: Any) -> LiveOutcome:
    """One `replicate` run; `options` are LiveReplication's."""
    return LiveReplication(registry, source, **options).run()
