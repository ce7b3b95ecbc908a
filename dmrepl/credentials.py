"""Offline validation of credentials and settings before anything is saved.

Every defect is collected (not just the first) and named by field; no message ever quotes key material,
because error messages end up in terminals, CI logs and support tickets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dmrepl.errors import InvalidInputError

MAX_CREDENTIALS_BYTES = 64 * 1024
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")
_TOPIC_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$")
_PROJECT_ID = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$|^[a-z0-9.:-]{1,63}$")


@dataclass
class Binding:
    """What `create`/`recreate` saves: settings (non-secret), the secret text, and a non-secret fingerprint."""

    settings: dict[str, Any]
    secret: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


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


def _decode(raw: bytes, defects: Defects) -> str | None:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        defects.add("file", f"not UTF-8 text (byte {exc.start})")
        return None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- google-pubsub ------------------------------------------------------------------------------------------


def _check_private_key(pem: str, defects: Defects) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if "\\n" in pem and "\n" not in pem.strip():
        defects.add("private_key", "contains literal \\n sequences instead of line breaks (was it pasted?)")
        return
    if "-----BEGIN" not in pem:
        defects.add("private_key", "is not a PEM private key (no BEGIN line)")
        return
    try:
        key = load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        defects.add("private_key", "does not load as a PEM private key (truncated, encrypted or corrupted)")
        return
    except Exception:
        defects.add("private_key", "does not load as a PEM private key")
        return
    if not isinstance(key, rsa.RSAPrivateKey):
        defects.add("private_key", f"is a {type(key).__name__.removeprefix('_')} key; service accounts use RSA")


def validate_pubsub(
    raw: bytes,
    source: str,
    *,
    project_id: str | None,
    topic_id: str | None,
    endpoint: str | None,
    ordering: bool,
) -> Binding:
    defects = Defects(source)
    text = _decode(raw, defects)
    info: Any = None
    if text is not None:
        try:
            info = json.loads(text)
        except json.JSONDecodeError as exc:
            defects.add("file", f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    if text is not None and info is not None and not isinstance(info, dict):
        defects.add("file", "is not a JSON object")
        info = None
    fingerprint: dict[str, Any] = {}
    if isinstance(info, dict):
        if info.get("type") != "service_account":
            got = info.get("type")
            defects.add(
                "type",
                "is missing" if got is None else f"is {str(got)[:40]!r}, expected 'service_account'",
            )
        for name in ("project_id", "private_key_id", "private_key", "client_email", "token_uri"):
            value = info.get(name)
            if value is None:
                defects.add(name, "is missing")
            elif not isinstance(value, str) or not value.strip():
                defects.add(name, "must be a non-empty string")
        if isinstance(info.get("private_key"), str) and info["private_key"].strip():
            _check_private_key(info["private_key"], defects)
        email = info.get("client_email")
        if isinstance(email, str) and email.strip() and not _EMAIL.match(email):
            defects.add("client_email", f"{email[:80]!r} is not an e-mail address")
        uri = info.get("token_uri")
        if isinstance(uri, str) and uri.strip():
            parts = urlsplit(uri)
            if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
                pass
            elif parts.scheme == "http":
                defects.add("token_uri", "must use https (http is accepted only for a loopback host)")
            elif parts.scheme != "https" or not parts.hostname:
                defects.add("token_uri", f"{uri[:80]!r} is not an https URL")
        fingerprint = {
            k: info[k] for k in ("client_email", "private_key_id", "project_id") if isinstance(info.get(k), str)
        }
        project_id = project_id or (info.get("project_id") if isinstance(info.get("project_id"), str) else None)
    if not topic_id:
        defects.add("--topic-id", "is required for google-pubsub")
    elif "/" in topic_id or not _TOPIC_ID.match(topic_id):
        defects.add("--topic-id", f"{topic_id!r} is not a valid topic id (give the id, not projects/…/topics/…)")
    if not project_id:
        defects.add("--project-id", "is required (no project_id in the credentials)")
    if endpoint and not _HOSTPORT.match(endpoint):
        defects.add("--endpoint", f"{endpoint!r} is not host:port")
    defects.raise_if_any("google-pubsub credentials or settings")
    assert text is not None
    fingerprint["sha256"] = sha256(text)
    settings: dict[str, Any] = {"project_id": project_id, "topic_id": topic_id, "ordering": ordering}
    if endpoint:
        settings["endpoint"] = endpoint
    return Binding(settings=settings, secret=text, fingerprint=fingerprint)


# --- azure-event-hubs ---------------------------------------------------------------------------------------


def parse_connection_string(text: str, defects: Defects) -> dict[str, str]:
    """Keys are case-insensitive; values keep their case. Returns lower-cased keys."""
    text = text.strip().lstrip("\ufeff").strip()
    if "\n" in text:
        defects.add("file", "holds more than one line; expected one connection string")
        return {}
    parts: dict[str, str] = {}
    for i, segment in enumerate(s for s in text.split(";") if s.strip()):
        key, sep, value = segment.partition("=")
        if not sep:
            defects.add(f"segment {i + 1}", "is not Key=Value")
            continue
        parts[key.strip().lower()] = value.strip()
    return parts


def validate_eventhubs(raw: bytes, source: str, *, event_hub: str | None) -> Binding:
    defects = Defects(source)
    text = _decode(raw, defects)
    parts = parse_connection_string(text, defects) if text is not None else {}
    namespace = None
    if text is not None and not defects.items:
        endpoint = parts.get("endpoint")
        host = ""
        if not endpoint:
            defects.add("Endpoint", "is missing")
        else:
            url = urlsplit(endpoint)
            host = url.hostname or ""
            if url.scheme != "sb" or not host:
                defects.add("Endpoint", "must look like sb://<namespace>.servicebus.windows.net/")
            namespace = url.netloc
        emulator = parts.get("usedevelopmentemulator", "").lower()
        if emulator == "true" and host and not is_loopback(host):
            defects.add("UseDevelopmentEmulator", "is accepted only for a loopback endpoint (localhost, 127.0.0.1)")
        elif emulator not in ("", "true", "false"):
            defects.add("UseDevelopmentEmulator", "must be true or false")
        if "sharedaccesssignature" in parts:
            if not parts["sharedaccesssignature"].startswith("SharedAccessSignature "):
                defects.add("SharedAccessSignature", "must start with 'SharedAccessSignature sr='")
        else:
            if not parts.get("sharedaccesskeyname"):
                defects.add("SharedAccessKeyName", "is missing")
            key = parts.get("sharedaccesskey")
            if not key:
                defects.add("SharedAccessKey", "is missing")
            else:
                try:
                    base64.b64decode(key, validate=True)
                except (binascii.Error, ValueError):
                    defects.add("SharedAccessKey", "is not valid base64")
        entity = parts.get("entitypath") or None
        if event_hub and entity and event_hub != entity:
            defects.add("--event-hub", f"{event_hub!r} differs from the connection string's EntityPath {entity!r}")
        hub = event_hub or entity
        if not hub:
            defects.add("--event-hub", "is required (the connection string has no EntityPath)")
        elif not _HUB_NAME.match(hub):
            defects.add("--event-hub", f"{hub[:80]!r} is not a valid event hub name")
    elif text is not None and not parts:
        pass
    defects.raise_if_any("azure-event-hubs connection string or settings")
    assert text is not None
    secret = text.strip().lstrip("\ufeff").strip()
    fingerprint = {
        "namespace": namespace,
        "shared_access_key_name": parts.get("sharedaccesskeyname"),
        "entity_path": parts.get("entitypath"),
        "sha256": sha256(secret),
    }
    settings = {"event_hub": event_hub or parts.get("entitypath"), "namespace": namespace}
    return Binding(settings=settings, secret=secret, fingerprint={k: v for k, v in fingerprint.items() if v})


# --- file ---------------------------------------------------------------------------------------------------


def validate_file(path: str | None, source: str = "--path") -> Binding:
    defects = Defects(source)
    if not path:
        defects.add("--path", "is required for the file destination")
        defects.raise_if_any("file settings")
    assert path is not None
    p = Path(path).expanduser().absolute()
    if not p.parent.is_dir():
        defects.add("--path", f"parent directory {p.parent} does not exist")
    elif not os.access(p.parent, os.W_OK | os.X_OK):
        defects.add("--path", f"parent directory {p.parent} is not writable")
    elif p.exists() and (p.is_dir() or not os.access(p, os.W_OK)):
        defects.add("--path", f"{p} exists and is not a writable file")
    defects.raise_if_any("file settings")
    return Binding(settings={"path": str(p)})
