"""A Spark sync's work dir: where each shard task keeps its checkpoint and its final result, so that a retried task
(or a resumed execution, after the driver was killed) continues from there instead of re-sending its whole shard.

A local path for one machine (`local[N]` masters), or an object-storage URL every executor can reach
(gs://, abfs://, s3://: through the same fsspec layer and extras as the exports, `dmrepl.storage`). Every write is
atomic: a temp file renamed into place locally, a single PUT of a whole object remotely, so a reader sees the old
record or the new one, never half. Records hold positions and counts only: never a secret (the tasks get theirs in
the job itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dmrepl.errors import DmreplError
from dmrepl.files import atomic_write, private_dir
from dmrepl.storage import describe, filesystem, is_url


class WorkDirError(OSError):
    """A work-dir read or write that failed, described in one safe line."""

    def __init__(self, cause: str) -> None:
        super().__init__(0, cause)


class WorkDir:
    """Records named by a key under one directory or prefix; picklable (a task rebuilds its filesystem)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") if is_url(url) else str(Path(url).absolute())
        self._fs: Any = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url = state["url"]
        self._fs = None
        self._root = ""

    @property
    def remote(self) -> bool:
        return is_url(self.url)

    def _remote(self) -> tuple[Any, str]:
        if self._fs is None:
            self._fs, self._root = filesystem(self.url)
            self._root = self._root.rstrip("/")
        return self._fs, self._root

    def read(self, name: str) -> dict[str, Any] | None:
        """The record, or None when there is none yet."""
        try:
            if not self.remote:
                data = (Path(self.url) / name).read_bytes()
            else:
                fs, root = self._remote()
                data = fs.cat_file(f"{root}/{name}")
        except FileNotFoundError:
            return None
        except DmreplError:  # a missing extra: its own one-line message
            raise
        except Exception as exc:
            raise WorkDirError(f"work dir {self.url}: cannot read {name} ({describe(exc)})") from None
        return json.loads(data)  # type: ignore[no-any-return]

    def write(self, name: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, separators=(",", ":")).encode("utf-8")
        try:
            if not self.remote:
                path = Path(self.url) / name
                private_dir(path.parent)
                atomic_write(path, data)
            else:
                fs, root = self._remote()
                fs.pipe_file(f"{root}/{name}", data)
        except DmreplError:
            raise
        except Exception as exc:
            raise WorkDirError(f"work dir {self.url}: cannot write {name} ({describe(exc)})") from None

    def names(self, prefix: str) -> set[str]:
        """The records under `prefix` (a directory), for progress while a job runs."""
        try:
            if not self.remote:
                directory = Path(self.url) / prefix
                return {n for n in os.listdir(directory) if not n.startswith(".")} if directory.is_dir() else set()
            fs, root = self._remote()
            fs.invalidate_cache(f"{root}/{prefix}")
            return {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{prefix}", detail=False)}
        except FileNotFoundError:
            return set()
        except DmreplError:
            raise
        except Exception as exc:
            raise WorkDirError(f"work dir {self.url}: cannot list {prefix} ({describe(exc)})") from None


__all__ = ["WorkDir", "WorkDirError"]
