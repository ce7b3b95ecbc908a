"""The local registry: one TOML file, read without a lock, written atomically under an exclusive lock.

Readers never lock because writers replace the file atomically; writers lock so that two cron jobs never lose
each other's update. The registry holds no secret (see `dmrepl.secrets`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dmrepl.errors import InvalidInputError, RefusedError
from dmrepl.files import atomic_write
from dmrepl.models import SCHEMA_VERSION, RecordError, RegistryData, from_dict, now_iso, parse_iso

__all__ = ["Registry", "atomic_write", "ensure_home", "home", "now_iso", "parse_iso"]

REGISTRY_FILE = "registry.toml"
LOCK_FILE = "registry.lock"
DEFAULT_LOCK_WAIT_S = 30.0


def home() -> Path:
    """Read at call time so tests and `--home` can redirect it at any moment."""
    env = os.environ.get("DMREPL_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("dmrepl"))


def ensure_home(path: Path | None = None) -> Path:
    path = path or home()
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    return path


def _without_none(value: Any) -> Any:
    """TOML has no null: absent keys stand for None."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


class Registry:
    """`root` is resolved when the registry is made (from `--home`, else DMREPL_HOME, else the platform's dir)."""

    def __init__(self, root: Path | None = None, *, wait_s: float | None = None) -> None:
        self.root = root if root is not None else home()
        self.wait_s = DEFAULT_LOCK_WAIT_S if wait_s is None else wait_s
        self.path = self.root / REGISTRY_FILE
        self.lock_path = self.root / LOCK_FILE

    def load(self) -> RegistryData:
        """Parse and check the schema version and every record; a registry we cannot understand is never
        overwritten."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return RegistryData()
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInputError(
                f"{self.path}: the registry does not parse ({exc}); dmrepl will not overwrite it: "
                "restore it from a backup or move it away",
                code="REGISTRY_INVALID",
            ) from None
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise InvalidInputError(
                f"{self.path}: schema_version is missing or not an integer; dmrepl will not overwrite it",
                code="REGISTRY_INVALID",
            )
        if version > SCHEMA_VERSION:
            raise InvalidInputError(
                f"{self.path}: schema_version {version} is newer than this dmrepl understands ({SCHEMA_VERSION}); "
                "upgrade dmrepl",
                code="REGISTRY_TOO_NEW",
            )
        try:
            return from_dict(RegistryData, data, "registry")
        except RecordError as exc:
            raise InvalidInputError(
                f"{self.path}: {exc.where.removeprefix('registry.')}: {exc.problem}; dmrepl will not overwrite it: "
                "fix that field or restore the file from a backup",
                code="REGISTRY_INVALID",
            ) from None

    def save(self, data: RegistryData) -> None:
        self._write(data.to_dict())

    def _write(self, table: dict[str, Any]) -> None:
        import tomli_w

        ensure_home(self.root)
        table["schema_version"] = SCHEMA_VERSION
        atomic_write(self.path, tomli_w.dumps(_without_none(table)).encode("utf-8"))

    @contextlib.contextmanager
    def lock(self, wait_s: float | None = None) -> Iterator[None]:
        ensure_home(self.root)
        wait_s = self.wait_s if wait_s is None else wait_s
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + wait_s
            delay = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise RefusedError(
                            f"{self.lock_path}: the registry is locked by another dmrepl process "
                            f"(waited {wait_s:g} s; raise it with --wait)",
                            code="REGISTRY_LOCKED",
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def transaction(self, wait_s: float | None = None) -> Iterator[RegistryData]:
        """Load under the lock, let the caller mutate the records, write back only if something changed."""
        with self.lock(wait_s):
            data = self.load()
            before = data.to_dict()
            yield data
            after = data.to_dict()
            if after != before:
                self._write(after)
