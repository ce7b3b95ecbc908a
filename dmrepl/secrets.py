"""Where credentials live: the OS keyring, or (opt-in only) one 0600 file per secret under the home.

The registry stores only a `SecretRef` (store, ref, fingerprint); this module is the only one that sees secret text
at rest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dmrepl.errors import InvalidInputError, NotFoundError
from dmrepl.models import SecretRef
from dmrepl.registry import ensure_home, home

SERVICE = "dmrepl"
STORES = ("auto", "keyring", "file")


def secrets_dir(root: Path | None = None) -> Path:
    path = (root or home()) / "secrets"
    if not path.exists():
        ensure_home(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def keyring_usable() -> tuple[bool, str]:
    """A keyring whose backend is the fail/null one, or has no positive priority, cannot keep a secret."""
    import keyring
    from keyring.backends import chainer, fail

    try:
        backend = keyring.get_keyring()
    except Exception as exc:  # a broken keyring configuration must not become a traceback
        return False, f"keyring configuration error: {type(exc).__name__}"
    name = f"{type(backend).__module__}.{type(backend).__name__}"
    if isinstance(backend, fail.Keyring) or "null" in type(backend).__module__:
        return False, name
    if isinstance(backend, chainer.ChainerBackend) and not backend.backends:
        return False, name
    return True, name


def resolve_store(requested: str | None) -> str:
    requested = requested or os.environ.get("DMREPL_SECRET_STORE") or "auto"
    if requested not in STORES:
        raise InvalidInputError(
            f"secret store '{requested}' is not one of {', '.join(STORES)}", code="INVALID_SECRET_STORE"
        )
    usable, backend = keyring_usable()
    if requested == "file":
        return "file"
    if usable:
        return "keyring"
    raise InvalidInputError(
        f"no usable OS keyring backend ({backend}): dmrepl will not store the secret. On a headless server "
        "opt in to the file store with --secret-store file or DMREPL_SECRET_STORE=file "
        "(one 0600 file per secret under the dmrepl home)",
        code="NO_KEYRING",
    )


def store_secret(ref: str, value: str, store: str, root: Path | None = None) -> SecretRef:
    if store == "keyring":
        import keyring

        keyring.set_password(SERVICE, ref, value)
    else:
        path = secrets_dir(root) / ref
        # 0600 from the first byte: O_EXCL + mode at creation, never chmod after writing.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
    return SecretRef(store=store, ref=ref)


def load_secret(entry: SecretRef, root: Path | None = None) -> str:
    store, ref = entry.store, entry.ref
    if store == "keyring":
        import keyring

        value = keyring.get_password(SERVICE, ref)
    else:
        try:
            value = (secrets_dir(root) / ref).read_text(encoding="utf-8")
        except FileNotFoundError:
            value = None
    if value is None:
        raise NotFoundError(
            f"the credentials of this replication ({store} secret '{ref}') are gone; "
            "rebind it with dmrepl recreate ID --credentials FILE",
            code="SECRET_NOT_FOUND",
        )
    return value


def delete_secret(entry: SecretRef, root: Path | None = None) -> None:
    store, ref = entry.store, entry.ref
    if not ref:
        return
    if store == "keyring":
        import keyring
        from keyring.errors import PasswordDeleteError

        with contextlib.suppress(PasswordDeleteError):
            keyring.delete_password(SERVICE, ref)
    else:
        with contextlib.suppress(FileNotFoundError):
            (secrets_dir(root) / ref).unlink()
