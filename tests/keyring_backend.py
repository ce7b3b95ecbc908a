"""A real keyring backend for tests: a JSON file named by DMREPL_TEST_KEYRING, so subprocesses share it.

Set with PYTHON_KEYRING_BACKEND=tests.keyring_backend.FileKeyring (keyring's own mechanism) or keyring.set_keyring.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError


class FileKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    @property
    def path(self) -> Path:
        return Path(os.environ["DMREPL_TEST_KEYRING"])

    def _update(self, change: object) -> dict[str, str]:
        self.path.touch()
        with open(self.path, "r+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            text = f.read()
            data: dict[str, str] = json.loads(text) if text else {}
            if callable(change):
                change(data)
                f.seek(0)
                f.truncate()
                f.write(json.dumps(data))
            return data

    def get_password(self, service: str, username: str) -> str | None:
        return self._update(None).get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        self._update(lambda d: d.__setitem__(f"{service}/{username}", password))

    def delete_password(self, service: str, username: str) -> None:
        key = f"{service}/{username}"
        if key not in self._update(None):
            raise PasswordDeleteError(key)
        self._update(lambda d: d.pop(key))

    def secrets(self) -> dict[str, str]:
        return self._update(None)
