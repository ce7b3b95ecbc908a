"""Writing files that must survive a crash or stay private: the registry, checkpoints, rejects, destination files.

Kept apart from the registry so that the registry-free core (shards, workers, destinations) can use it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory: a crash leaves the old file or the new
    one, never half, and the rename itself survives a power loss."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def private_dir(path: Path) -> Path:
    """A directory only its owner can enter (0700 whatever the umask): executions hold personal data."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    return path


def open_append(path: Path, mode: int = 0o600) -> int:
    """An fd appending to `path`; a file created here gets exactly `mode` from its first byte, whatever the umask
    (created with O_EXCL, then fchmod before anything is written). An existing file keeps its own mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd
