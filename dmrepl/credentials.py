"""What every destination type's offline validation shares: reading a credentials file once and bounded, and
collecting defects.

Every defect is collected (not just the first) and named by field; no message ever quotes key material,
because error messages end up in terminals, CI logs and support tickets. The type-specific rules live in each
destination's module (`dmrepl/destinations/`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from dmrepl.errors import InvalidInputError

MAX_CREDENTIALS_BYTES = 64 * 1024


@dataclass
class Defects:
    source: str
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, message: str) -> None:
        self.items.append((name, message))

    def raise_if_any(self, what: str) -> None:
        if self.items:
            joined = "; ".join(f"{n}: {m}" for n, m in self.items)
            raise InvalidInputError(
                f"{self.source}: invalid {what}: {joined}",
                code="INVALID_CREDENTIALS",
                details=[{"field": n, "message": m} for n, m in self.items],
            )


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_credentials_file(path: str | Path) -> bytes:
    """Read once, bounded: a 1 GB file given by mistake must not be loaded."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CREDENTIALS_BYTES + 1)
    except FileNotFoundError:
        raise InvalidInputError(f"{p}: credentials file not found", code="INVALID_CREDENTIALS") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{p}: credentials path is a directory", code="INVALID_CREDENTIALS") from None
    except PermissionError:
        raise InvalidInputError(f"{p}: credentials file is not readable", code="INVALID_CREDENTIALS") from None
    if len(raw) > MAX_CREDENTIALS_BYTES:
        raise InvalidInputError(
            f"{p}: credentials file is larger than {MAX_CREDENTIALS_BYTES // 1024} KiB: is it the right file?",
            code="INVALID_CREDENTIALS",
        )
    if not raw.strip():
        raise InvalidInputError(f"{p}: credentials file is empty", code="INVALID_CREDENTIALS")
    return raw


def decode(raw: bytes, defects: Defects) -> str | None:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        defects.add("file", f"not UTF-8 text (byte {exc.start})")
        return None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
