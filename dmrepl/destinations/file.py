"""The embedded default: append operations as NDJSON, so everything works on one machine and support can see
byte for byte what a cloud destination would receive."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from dmrepl.destinations.base import CheckStep, Destination, DestinationError, Message, timed_step


class FileDestination(Destination):
    type_name = "file"
    max_message_bytes = 64 * 1024 * 1024

    _f: BinaryIO | None = None

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
            elif p.exists() and (p.is_dir() or not os.access(p, os.W_OK)):
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

    def open(self) -> None:
        try:
            self._f = open(self.path, "ab", buffering=1024 * 1024)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise DestinationError("UNWRITABLE", f"cannot open {self.path}: {exc.strerror}") from None

    def send(self, messages: Sequence[Message]) -> None:
        assert self._f is not None, "open() first"
        try:
            self._f.write(b"".join(m.data + b"\n" for m in messages))
        except OSError as exc:
            raise DestinationError("UNWRITABLE", f"cannot write {self.path}: {exc.strerror}") from None

    def flush(self) -> None:
        if self._f is None:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise DestinationError("UNWRITABLE", f"cannot write {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        if self._f is not None:
            try:
                self.flush()
            finally:
                self._f.close()
                self._f = None
