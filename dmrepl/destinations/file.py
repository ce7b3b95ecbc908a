"""The embedded default: append operations as NDJSON, so everything works on one machine and support can see
byte for byte what a cloud destination would receive.

It never destroys what it did not write. Beside the file, a mark `.<name>.dmrepl` records its device, inode and the
length dmrepl last made durable (fsync); repairing a torn tail after a crash cuts only bytes past that length. An
existing file dmrepl did not create is appended to only when it is NDJSON that ends with a newline; a new file is
created 0600 (or `--mode`) whatever the umask, since it holds personal data.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

from dmrepl.credentials import Defects
from dmrepl.destinations.base import (
    Binding,
    CheckStep,
    Destination,
    DestinationError,
    DestinationType,
    OptionSpec,
    timed_step,
)
from dmrepl.files import atomic_write, open_append
from dmrepl.models import DEFAULT_RETRY_BUDGET_S
from dmrepl.operations import DATA, Message
from dmrepl.processes import libc_function

_data_of = itemgetter(DATA)
_LAST = (b"",)
#: Written bytes after which the kernel is asked to start writing them to disk (see `start_writeback`).
WRITEBACK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2
DEFAULT_MODE = 0o600
_MODE = re.compile(r"^0?[0-7]{3}$")
#: An existing file is checked line by line up to this size, then by its first lines and its last one.
_FULL_CHECK_BYTES = 64 << 20


def mark_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.dmrepl")


def _read_mark(path: Path, st: os.stat_result) -> int | None:
    """The length dmrepl made durable in this very file (same device and inode), or None."""
    try:
        mark = json.loads(mark_path(path).read_bytes())
        if mark["dev"] == st.st_dev and mark["ino"] == st.st_ino:
            return int(mark["flushed"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_mark(path: Path, st: os.stat_result, flushed: int) -> None:
    data = {"dev": st.st_dev, "ino": st.st_ino, "flushed": flushed}
    atomic_write(mark_path(path), json.dumps(data).encode("utf-8"))


def _not_ndjson(path: Path, size: int) -> str | None:
    """Why an existing file must not be appended to, or None: it must be NDJSON (JSON objects, one per line) that
    ends with a newline, so that appending cannot glue a line of ours to one of its own."""
    import orjson

    with open(path, "rb") as f:
        f.seek(max(0, size - 1))
        if f.read(1) != b"\n":
            return "does not end with a newline"
        f.seek(0)
        for n, line in enumerate(f, start=1):
            if f.tell() > _FULL_CHECK_BYTES and n > 1000:
                break
            if line.strip():
                try:
                    ok = isinstance(orjson.loads(line), dict)
                except orjson.JSONDecodeError:
                    ok = False
                if not ok:
                    return f"line {n} is not a JSON object"
        f.seek(max(0, size - (1 << 20)))
        last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        if last.strip():
            try:
                ok = isinstance(orjson.loads(last), dict)
            except orjson.JSONDecodeError:
                ok = False
            if not ok:
                return "its last line is not a JSON object"
    return None


def foreign_problem(path: Path) -> str | None:
    """Why dmrepl must not append to `path`, or None. A file dmrepl writes (its mark matches), a new file, an empty
    one and a non-regular file (/dev/null, a FIFO) are fine."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory"
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or _read_mark(path, st) is not None:
        return None
    why = _not_ndjson(path, st.st_size)
    if why is None:
        return None
    return f"{path} exists, was not written by dmrepl and {why}: dmrepl will not append to it"


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    fn = libc_function("sync_file_range")
    if fn is not None:
        import ctypes  # there, since libc_function found one

        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def start_writeback(fd: int) -> bool:
    """Start writing the file's dirty pages to disk without waiting (Linux sync_file_range, as PostgreSQL does).

    Otherwise the kernel keeps a sync's whole output dirty in memory (up to 30 s or 10 % of RAM) and the checkpoint's
    fsync writes it all at once while every worker waits: measured 0.1 s at the end of a 290 MB sync, against at most
    5 ms per call here. False where that is not available; the fsync is then simply longer.
    """
    fn = _sync_file_range()
    return fn is not None and fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


class FileDestination(Destination):
    type_name = "file"
    max_message_bytes = 64 * 1024 * 1024

    _fd: int | None = None
    _unsynced = 0
    _regular = False
    _flushed = 0

    @property
    def path(self) -> Path:
        return Path(self.settings["path"])

    def check(self, timeout_s: float = 20.0) -> list[CheckStep]:
        steps: list[CheckStep] = []
        with timed_step(steps, "path-writable") as step:
            p = self.path
            if not p.parent.is_dir():
                step.status, step.code = "failed", "PATH_NOT_FOUND"
                step.detail = f"directory {p.parent} does not exist"
                step.fix = f"create it (mkdir -p {p.parent}) or recreate the replication with another --path"
            elif foreign := foreign_problem(p):
                step.status, step.code = "failed", "FOREIGN_FILE"
                step.detail = foreign
                step.fix = "recreate the replication with another --path (a new file, or dmrepl's own output)"
            elif p.exists() and not os.access(p, os.W_OK):
                step.status, step.code = "failed", "PERMISSION_DENIED"
                step.detail = f"{p} is not a writable file"
                step.fix = "fix its permissions or recreate the replication with another --path"
            elif not p.exists() and not os.access(p.parent, os.W_OK | os.X_OK):
                step.status, step.code = "failed", "PERMISSION_DENIED"
                step.detail = f"cannot create files in {p.parent}"
                step.fix = "fix the directory's permissions or choose another --path"
            else:
                step.detail = str(p)
        return steps

    @property
    def mode(self) -> int:
        return int(str(self.settings.get("mode") or "600"), 8)

    def open(self) -> None:
        try:
            self._fd = open_append(self.path, self.mode)
            st = os.fstat(self._fd)
            self._regular = stat.S_ISREG(st.st_mode)
            if self._regular:
                self._adopt_or_repair(st)
        except OSError as exc:
            self._close_fd()
            raise DestinationError("UNWRITABLE", f"cannot open {self.path}: {exc.strerror}") from None
        except DestinationError:
            self._close_fd()
            raise

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _adopt_or_repair(self, st: os.stat_result) -> None:
        """Our own file (its mark matches): cut a torn tail past the durable length, under the lock, which is held
        as briefly as a write's (other writers append meanwhile). Another's: append only to NDJSON that ends with a
        newline, and never cut any of it."""
        assert self._fd is not None
        flushed = _read_mark(self.path, st)
        if flushed is None:
            if st.st_size:
                why = _not_ndjson(self.path, st.st_size)
                if why is not None:
                    raise DestinationError(
                        "FOREIGN_FILE", f"{self.path} was not written by dmrepl and {why}: dmrepl will not append to it"
                    )
            _write_mark(self.path, st, st.st_size)
            self._flushed = st.st_size
            return
        self._flushed = flushed
        if st.st_size > flushed:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._repair_torn_tail(os.fstat(self._fd).st_size, flushed)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _repair_torn_tail(self, size: int, flushed: int) -> None:
        """A crash (power loss, full disk) can leave half a line that was never acknowledged: cut it, so the
        re-sent operations start on a line of their own; never below what dmrepl made durable."""
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            pos = size
            while pos > flushed:
                step = min(pos - flushed, 1 << 16)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    os.truncate(self.path, pos - step + nl + 1)
                    return
                pos -= step
        os.truncate(self.path, flushed)

    def send(self, messages: Sequence[Message]) -> None:
        """Whole lines per batch under an exclusive lock: concurrent writers (a sync and `replicate`) interleave
        whole batches, never parts of lines, and never see each other's half-written batch as a torn tail."""
        assert self._fd is not None, "open() first"
        data = memoryview(b"\n".join(chain(map(_data_of, messages), _LAST)))  # one copy, newline-terminated
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                while data:
                    written = os.write(self._fd, data)
                    data = data[written:]
                    self._unsynced += written
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise DestinationError("UNWRITABLE", f"cannot write {self.path}: {exc.strerror}") from None
        if self._unsynced >= WRITEBACK_BYTES:
            self._unsynced = 0
            start_writeback(self._fd)

    def flush(self) -> None:
        """fsync, then record how much of the file is durable: whole lines up to the size measured before the fsync
        (every writer appends whole batches under the lock), which a later repair will never cut."""
        if self._fd is None:
            return
        self._unsynced = 0
        try:
            size = os.fstat(self._fd).st_size
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # character devices such as /dev/null cannot fsync
                raise DestinationError("UNWRITABLE", f"cannot write {self.path}: {exc.strerror}") from None
            return
        if self._regular and size > self._flushed:
            # Not under the lock: writers record concurrently, and a mark a little behind another writer's only lets
            # a repair cut a torn line it would have cut anyway (it cuts back to the last newline, never past one).
            try:
                st = os.fstat(self._fd)
                self._flushed = max(size, _read_mark(self.path, st) or 0)
                _write_mark(self.path, st, self._flushed)
            except OSError as exc:
                raise DestinationError("UNWRITABLE", f"cannot write {mark_path(self.path)}: {exc.strerror}") from None

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = None


class FileType(DestinationType):
    name = "file"
    options = (
        OptionSpec("path", "--path", "NDJSON file to append to.", Path),
        OptionSpec("mode", "--mode", "Permissions of the file when dmrepl creates it (octal; default 600)."),
    )
    needs_credentials = False

    def bind(
        self, options: Mapping[str, Any], raw: bytes | None, source: str, previous: Mapping[str, Any] | None
    ) -> Binding:
        path = self.previous_or(options, previous, "path")
        defects = Defects("--path")
        if not path:
            defects.add("--path", "is required for the file destination")
            defects.raise_if_any("file settings")
        p = Path(path).expanduser().absolute()
        if not p.parent.is_dir():
            defects.add("--path", f"parent directory {p.parent} does not exist")
        elif not os.access(p.parent, os.W_OK | os.X_OK):
            defects.add("--path", f"parent directory {p.parent} is not writable")
        elif foreign := foreign_problem(p):
            defects.add("--path", foreign)
        elif p.exists() and not os.access(p, os.W_OK):
            defects.add("--path", f"{p} exists and is not a writable file")
        mode = self.previous_or(options, previous, "mode")
        if mode is not None and not _MODE.match(str(mode)):
            defects.add("--mode", f"{str(mode)[:20]!r} is not an octal mode such as 600 or 640")
        defects.raise_if_any("file settings")
        settings: dict[str, Any] = {"path": str(p)}
        if mode is not None:
            settings["mode"] = str(mode).lstrip("0").rjust(3, "0")
        return Binding(settings=settings)

    def describe(self, settings: Mapping[str, Any]) -> str:
        return str(settings.get("path", ""))

    def destination(
        self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    ) -> Destination:
        return FileDestination(settings, secret, retry_budget_s=retry_budget_s)


TYPE = FileType()
