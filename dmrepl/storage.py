"""Where an export's bytes come from: a local file, or an object in Google Cloud Storage, Azure Blob Storage or S3.

Everything above this module (framing, shards, workers, checkpoints) sees a `Source`: a name to record and show, a
size, a version to detect a change, and `open()`, a seekable binary stream. A local file is opened as ever; an object
is read with ranged reads, through a fixed-size buffer, so memory stays flat whatever its size and nothing is copied
to local disk. A plain export is still split into line-aligned byte ranges (`ExportReader.ranges`), each read by its
own ranged requests, so worker processes read objects in parallel exactly as they read local files.

Object storage goes through fsspec and one SDK per service, installed as extras (`dmrepl[gcs]`, `[azure]`, `[s3]`)
and imported only when a URL needs them: the core install stays light and `dmrepl --help` imports none of them.
Credentials come from each SDK's own environment (README, "Exports in object storage"); dmrepl never takes a key on
its command line, and messages built from an SDK's error are cut to one line and stripped of any secret the
environment holds.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from dmrepl.errors import InvalidInputError

#: scheme → the extra that reads it.
EXTRAS: dict[str, str] = {"gs": "gcs", "gcs": "gcs", "abfs": "azure", "abfss": "azure", "az": "azure", "s3": "s3"}
_MODULES = {"gcs": "gcsfs", "azure": "adlfs", "s3": "s3fs"}
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_MAGIC_RE = re.compile(r"[*?[]")
_GZIP_MAGIC = b"\x1f\x8b"
#: A remote stream's buffer: each ranged read fetches this much (fewer requests), and it bounds the memory held.
REMOTE_BUFFER = 4 << 20
#: Plain objects are split into ranges of at least this size: every range costs a request or two.
REMOTE_MIN_RANGE = 8 << 20
_LOCAL_BUFFER = 1 << 20
_SECRET_ENV = (
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
_SECRET_PARTS_RE = re.compile(r"(AccountKey|SharedAccessSignature|SharedAccessKey)=([^;]+)", re.IGNORECASE)
_SAS_SIG_RE = re.compile(r"([?&]sig=)[^&\s]+", re.IGNORECASE)


class ExportError(InvalidInputError):
    """A file-level problem (missing, unreadable, corrupt gzip, undetectable format): the file cannot be used at all.

    An InvalidInputError so the CLI exits 4 with the message and no traceback; the message always names the file.
    """

    code = "INVALID_EXPORT"


class MissingExtraError(InvalidInputError):
    code = "MISSING_EXTRA"


class StorageError(OSError):
    """A failed request to an object store, already described in one safe line (`strerror`), so every layer that
    reports an unreadable file (`cannot read it (…)`) reports an object the same way."""

    def __init__(self, cause: str) -> None:
        super().__init__(0, cause)


def scheme_of(name: str | os.PathLike[str]) -> str | None:
    m = _SCHEME_RE.match(str(name))
    return m.group(1).lower() if m else None


def is_url(name: str | os.PathLike[str]) -> bool:
    return scheme_of(name) is not None


def redact(text: str) -> str:
    """Whatever secret the environment gives the SDKs, masked: SDK messages may echo a connection string or a URL."""
    for var in _SECRET_ENV:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    for m in _SECRET_PARTS_RE.finditer(conn):
        if len(m.group(2)) >= 4:
            text = text.replace(m.group(2), "***")
    text = _SECRET_PARTS_RE.sub(r"\1=***", text)
    return _SAS_SIG_RE.sub(r"\1***", text)


def describe(exc: BaseException) -> str:
    """One line for a failed storage request: what kind of failure, then the service's own words, redacted."""
    status = getattr(exc, "status_code", None) or getattr(exc, "code", None) or getattr(exc, "status", None)
    text = str(exc)
    error_code = getattr(exc, "error_code", None)
    if isinstance(exc, StorageError):
        return exc.strerror or text
    if isinstance(exc, FileNotFoundError) or status == 404:
        what = "not found"
    elif isinstance(exc, PermissionError) or status == 403 or text.startswith("Forbidden"):
        what = "permission denied"
    elif status == 401 or type(exc).__name__ in ("ClientAuthenticationError", "NoCredentialsError", "RefreshError"):
        what = "authentication failed"
    elif type(exc).__name__ in ("ClientConnectorError", "ServiceRequestError", "EndpointConnectionError") or (
        isinstance(exc, ConnectionError)
    ):
        what = "cannot reach the storage service"
    else:
        what = type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if text.startswith("Forbidden") and len(lines) > 1:
        lines = lines[1:]  # gcsfs: "Forbidden: <path>" then the service's message
    detail = str(error_code) if error_code else (lines[0] if lines else "")
    if detail.strip("'\" ") in ("", str(exc.errno) if isinstance(exc, OSError) else "", what):
        detail = ""
    if isinstance(exc, FileNotFoundError):
        detail = ""  # its text is the path or the SDK's "does not exist": the URL is named already
    detail = redact(detail)
    if len(detail) > 200:
        detail = detail[:199] + "…"
    return f"{what} ({detail})" if detail else what


class Source(ABC):
    """One export file: where its bytes come from."""

    #: What is recorded in the execution and shown: an absolute path, or the URL.
    name: str
    size: int
    #: The service's id of this content (GCS generation, ETag): None for local files, which are hashed instead.
    version: str | None = None
    mtime_ns: int | None = None
    remote: bool = False

    @abstractmethod
    def open(self, end: int | None = None, buffer: int | None = None) -> IO[bytes]:
        """A seekable binary stream; `end`: nothing past it will be read (a remote stream then asks for no more);
        `buffer`: bytes read at once (a remote stream's request size)."""

    @abstractmethod
    def stamp(self) -> tuple[int, Any] | None:
        """What the file is now (size and modification time or version), None when it is gone: compared before and
        after reading it, to fail a run whose export changed under it."""

    def sha256(self) -> str:
        try:
            with self.open() as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise ExportError(f"export file {self.name}: cannot read it ({exc.strerror or exc})") from None

    @property
    def identity(self) -> str:
        """What names this content in messages: "sha256", "generation", "ETag"."""
        return self.version.split(":", 1)[0] if self.version else "sha256"

    def compressed(self) -> bool:
        try:
            with self.open(end=2, buffer=2) as f:
                return f.read(2) == _GZIP_MAGIC
        except OSError as exc:
            raise ExportError(f"export file {self.name}: cannot read it ({exc.strerror or exc})") from None


class LocalSource(Source):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path.absolute())
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ExportError(f"export file {path}: not found") from None
        except OSError as exc:
            raise ExportError(f"export file {path}: cannot access it ({exc.strerror or exc})") from None
        if not self.path.is_file():
            raise ExportError(f"export file {path}: not a regular file")
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns

    def __repr__(self) -> str:
        return f"LocalSource({self.name!r})"

    def open(self, end: int | None = None, buffer: int | None = None) -> IO[bytes]:
        return open(self.path, "rb", buffering=buffer or _LOCAL_BUFFER)

    def stamp(self) -> tuple[int, Any] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns


class RemoteSource(Source):
    """An object, read by ranged requests. `info`: the service's metadata when the caller has it (a listing)."""

    remote = True

    def __init__(self, fs: Any, url: str, path: str, info: dict[str, Any] | None = None) -> None:
        self.fs = fs
        self.name = url
        self.path = path
        if info is None:
            info = self._info()
            if info is None:
                raise ExportError(f"export file {url}: not found")
        if info.get("type", "file") != "file":
            raise ExportError(f"export file {url}: not an object (a directory or a prefix?)")
        self.size = int(info["size"])
        self.version = version_of(info)

    @classmethod
    def known(cls, fs: Any, url: str, path: str, size: int, version: str | None) -> RemoteSource:
        """As recorded by the coordinator: a worker reading a range asks the service nothing but the range."""
        self = cls.__new__(cls)
        self.fs, self.name, self.path, self.size, self.version = fs, url, path, size, version
        return self

    def __repr__(self) -> str:
        return f"RemoteSource({self.name!r}, size={self.size}, version={self.version!r})"

    def _info(self) -> dict[str, Any] | None:
        """Fresh metadata (fsspec caches listings), None when the object does not exist."""
        try:
            self.fs.invalidate_cache(self.path)
            return self.fs.info(self.path)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise ExportError(f"export file {self.name}: {describe(exc)}") from None

    def open(self, end: int | None = None, buffer: int | None = None) -> IO[bytes]:
        stop = self.size if end is None else min(end, self.size)
        return io.BufferedReader(_RangeReader(self, stop), buffer or REMOTE_BUFFER)

    def read(self, start: int, end: int) -> bytes:
        try:
            return self.fs.cat_file(self.path, start=start, end=end)  # type: ignore[no-any-return]
        except Exception as exc:
            raise StorageError(describe(exc)) from None

    def stamp(self) -> tuple[int, Any] | None:
        info = self._info()
        return None if info is None else (int(info["size"]), version_of(info))


class _RangeReader(io.RawIOBase):
    """The raw stream under a remote source's buffer: every read is one ranged request, never past `stop`."""

    def __init__(self, source: RemoteSource, stop: int) -> None:
        self.source = source
        self.stop = stop
        self.pos = 0
        self.name = source.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = self.stop + offset
        if self.pos < 0:
            raise ValueError("negative seek position")
        return self.pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.stop - self.pos)
        if want <= 0:
            return 0
        data = self.source.read(self.pos, self.pos + want)
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n


def version_of(info: dict[str, Any]) -> str | None:
    """The id the service gives this content: a GCS generation, a version id, else the ETag (which every overwrite
    changes); None when the service gives none (then the content is hashed)."""
    if info.get("generation"):
        return f"generation:{info['generation']}"
    for key in ("VersionId", "version_id"):
        if info.get(key) and info[key] != "null":
            return f"version:{info[key]}"
    for key in ("ETag", "etag"):
        if info.get(key):
            return f"ETag:{str(info[key]).strip(chr(34))}"
    return None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for a URL and the path within it; one line naming the extra when its SDK is missing."""
    scheme = scheme_of(url) or ""
    extra = EXTRAS.get(scheme)
    if extra is None:
        raise ExportError(
            f"export file {url}: unsupported scheme {scheme}:// (dmrepl reads local files and "
            "gs://, gcs://, abfs://, abfss://, az://, s3:// URLs)"
        )
    try:
        module = __import__(_MODULES[extra])
        import fsspec.core
    except ImportError:
        raise MissingExtraError(
            f"export file {url}: reading {scheme}:// exports needs the {extra} extra: pip install 'dmrepl[{extra}]'"
        ) from None
    _quiet_sdk_loggers()
    try:
        if extra == "gcs" and os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "").lower() not in ("true", "1"):
            # gcsfs's default class asks the Storage Control API (gRPC) for every bucket's layout; the JSON API
            # alone reads any standard bucket, and works against emulators (STORAGE_EMULATOR_HOST).
            cls = module.core.GCSFileSystem
            # With an emulator, no credentials (as Google's own client does): no lookup of Application Default
            # Credentials, which would also probe the GCE metadata server.
            emulated = os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default")
            return (cls(token="anon") if emulated else cls()), cls._strip_protocol(url)
        return fsspec.core.url_to_fs(url)
    except Exception as exc:
        raise ExportError(f"export file {url}: {describe(exc)}") from None


def _quiet_sdk_loggers() -> None:
    """The SDKs log their retries with tracebacks (gcsfs: "_request out of retries"), which Python prints on stderr
    when nobody configured logging: dmrepl reports the failure itself, in one line. A handler configured by the
    embedding program still receives these records."""
    for name in ("gcsfs", "adlfs", "s3fs", "fsspec", "azure", "aiobotocore", "botocore", "google"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())


def _url_for(url: str, fs_path: str, match: str) -> str:
    """The URL of one match of a pattern, in the pattern's own spelling (scheme, account part)."""
    root = fs_path.split("/", 1)[0]
    head = url[: url.index("://") + 3]
    authority = url[len(head) :].split("/", 1)[0]
    return f"{head}{authority}{match[len(root) :]}"


def resolve(names: Sequence[str | os.PathLike[str]], *, expand: bool = True) -> list[Source]:
    """Each name as a source: a local path, an object URL, or (with `expand`) a URL with a glob pattern, whose
    matches are taken in name order. A pattern that matches nothing is an error, as a missing file is."""
    out: list[Source] = []
    for name in names:
        if not is_url(name):
            out.append(LocalSource(name))
            continue
        url = str(name)
        fs, path = filesystem(url)
        if not (expand and _MAGIC_RE.search(path)):
            out.append(RemoteSource(fs, url, path))
            continue
        try:
            found = fs.glob(path, detail=True)
        except Exception as exc:
            raise ExportError(f"export file {url}: {describe(exc)}") from None
        matches = sorted(p for p, info in found.items() if info.get("type", "file") == "file")
        if not matches:
            raise ExportError(f"export file {url}: no object matches this pattern")
        out.extend(RemoteSource(fs, _url_for(url, path, m), m, found[m]) for m in matches)
    return out


def open_source(name: str, *, size: int | None = None, version: str | None = None) -> Source:
    """A source named as recorded (no pattern expanded). With `size`, a remote one is not asked for its metadata."""
    if not is_url(name):
        return LocalSource(name)
    fs, path = filesystem(name)
    if size is not None:
        return RemoteSource.known(fs, name, path, size, version)
    return RemoteSource(fs, name, path)


__all__ = [
    "EXTRAS",
    "REMOTE_MIN_RANGE",
    "ExportError",
    "LocalSource",
    "MissingExtraError",
    "RemoteSource",
    "Source",
    "StorageError",
    "describe",
    "is_url",
    "open_source",
    "redact",
    "resolve",
    "scheme_of",
]
