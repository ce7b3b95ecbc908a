"""Where credentials live: the OS keyring, or (opt-in only) one 0600 file per secret under the home.

The registry stores only a `SecretRef` (store, ref, fingerprint); this module is the only one that sees secret text
at rest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path

from dmrepl.errors import InvalidInputError, NotFoundError
from dmrepl.models import SecretRef
from dmrepl.registry import ensure_home, home

SERVICE = "dmrepl"
STORES = ("auto", "keyring", "file")


def secrets_dir(root: Path | None = None) -> Path:
    """The file store's directory, created 0700; one that another account could have planted or could write into
    (a symlink, another owner, group or world writable) is refused rather than trusted."""
    path = (root or home()) / "secrets"
    if not os.path.lexists(path):
        ensure_home(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    st = os.lstat(path)
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != os.getuid():
        why = f"belongs to another user (uid {st.st_uid})"
    elif st.st_mode & 0o022:
        why = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    if why:
        raise InvalidInputError(
            f"{path}: the secret store {why}; dmrepl will not trust it: move it away, then recreate the replications "
            "whose secrets it held (dmrepl recreate ID --credentials FILE)",
            code="SECRET_STORE_UNSAFE",
        )
    return path


def _read_secret_file(path: Path) -> str | None:
    """A secret file must be a regular file of ours, 0600: anything else may have been swapped or read by others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidInputError(
                f"{path}: the secret file is a symbolic link; dmrepl will not follow it", code="SECRET_STORE_UNSAFE"
            ) from None
        raise
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o600:
            raise InvalidInputError(
                f"{path}: the secret file is not a 0600 file of yours (mode {stat.S_IMODE(st.st_mode):04o}, uid "
                f"{st.st_uid}); dmrepl will not use it: recreate the replication (dmrepl recreate ID --credentials "
                "FILE)",
                code="SECRET_STORE_UNSAFE",
            )
        return f.read()


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
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk must not leave half a secret behind
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
    return SecretRef(store=store, ref=ref)


def load_secret(entry: SecretRef, root: Path | None = None) -> str:
    store, ref = entry.store, entry.ref
    if store == "keyring":
        import keyring

        value = keyring.get_password(SERVICE, ref)
    else:
        value = _read_secret_file(secrets_dir(root) / ref)
    if value is None:
        raise NotFoundError(
            f"the credentials of this replication ({store} secret '{ref}') are gone; "
            "rebind it with dmrepl recreate ID --credentials FILE",
            code="SECRET_NOT_FOUND",
        )
    expected = entry.fingerprint.get("sha256")
    if expected and hashlib.sha256(value.encode("utf-8")).hexdigest() != expected:
        raise InvalidInputError(
            f"the credentials of this replication ({store} secret '{ref}') are not the ones recorded at create "
            "(their sha256 differs from the fingerprint): were they swapped? Rebind it with dmrepl recreate ID "
            "--credentials FILE",
            code="SECRET_MISMATCH",
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
