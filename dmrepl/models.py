"""Typed records of the registry and of a sync's checkpoint, with explicit conversion to and from TOML/JSON tables.

The registry is a hand-editable file: a record that does not have the shape below is refused with the dotted path of
the field (`replications.rep-1a2b3c4d.status`), never half-read. TOML has no null, so a field whose value is None is
absent on disk and takes its default when read back. Keys that this version does not know are dropped on the next
write: `schema_version` is what protects a registry written by a newer dmrepl.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

SCHEMA_VERSION = 1
DEFAULT_RETRY_BUDGET_S = 300.0
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
DEFAULT_CHECK_TIMEOUT_S = 20.0


class Status(enum.StrEnum):
    """A replication's status (docs/statuses.md)."""

    PAUSED = "PAUSED"
    ACTIVE = "ACTIVE"
    ERROR = "ERROR"


class ExecutionStatus(enum.StrEnum):
    """An initial synchronization's status; STALE is derived (a RUNNING owner that is gone), never stored."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    STALE = "STALE"


RESUMABLE = frozenset({ExecutionStatus.RUNNING, ExecutionStatus.FAILED, ExecutionStatus.CANCELED})


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class RecordError(ValueError):
    """A field of a stored record is missing or of the wrong type; `where` is its dotted path."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# --- conversion ------------------------------------------------------------------------------------------------

R = TypeVar("R")
_SCALARS: dict[type, tuple[type, ...]] = {str: (str,), bool: (bool,), int: (int,), float: (int, float)}


def _key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("key", f.name))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, "a table")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None:
            return None
        (inner,) = (a for a in typing.get_args(tp) if a is not type(None))
        return _convert(inner, value, where)
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(where, "is not a table")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(where, "is not a list")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise RecordError(where, f"{str(value)[:40]!r} is not one of {allowed}") from None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    accepted = _SCALARS.get(tp)
    if accepted is not None:
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise RecordError(where, f"is {type(value).__name__}, expected {_type_name(tp)}")
        return float(value) if tp is float else value
    raise TypeError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover - a programming error


def from_dict(cls: type[R], raw: Any, where: str) -> R:
    """Build a record from a table, checking every field; raises RecordError naming the first bad one."""
    if not isinstance(raw, dict):
        raise RecordError(where, "is not a table")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = _key(f)
        if key not in raw or raw[key] is None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}.{key}", "is missing")
            continue
        values[f.name] = _convert(hints[f.name], raw[key], f"{where}.{key}")
    return cls(**values)


def to_dict(record: Any) -> Any:
    """A record as plain tables, lists and scalars (None kept: JSON shows null, the registry drops it)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {_key(f): to_dict(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, enum.Enum):
        return record.value
    if isinstance(record, dict):
        return {k: to_dict(v) for k, v in record.items()}
    if isinstance(record, list | tuple):
        return [to_dict(v) for v in record]
    return record


class Record:
    """Mixin: `to_dict()` for JSON output and the registry file."""

    def to_dict(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], to_dict(self))


# --- datamarts -------------------------------------------------------------------------------------------------


@dataclass
class Datamart(Record):
    id: str
    name: str
    user_point_system_version: str
    created_at: str
    updated_at: str | None = None


# --- replications ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class HistoryEntry(Record):
    at: str
    from_: Status | None = field(default=None, metadata={"key": "from"})
    to: Status
    reason: str
    #: Set by `rotate` (the status stays): which credentials were replaced by which, as non-secret fingerprints.
    old_fingerprint: dict[str, Any] | None = None
    new_fingerprint: dict[str, Any] | None = None


@dataclass
class ReplicationError(Record):
    """Why a replication went to ERROR and what it missed; kept in `past_errors` after a recreate."""

    code: str
    message: str
    first_seen: str
    last_seen: str
    attempts: int = 1
    undelivered: int = 0


@dataclass
class CheckRecord(Record):
    at: str
    ok: bool
    steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SecretRef(Record):
    """Where a replication's secret lives (never the secret), and a non-secret fingerprint of it."""

    store: str
    ref: str
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replication(Record):
    id: str
    name: str
    type: str
    datamart: str
    status: Status
    created_at: str
    updated_at: str
    settings: dict[str, Any] = field(default_factory=dict)
    credentials: SecretRef | None = None
    #: When the credentials stop working (ISO 8601 UTC), and what says so (`se=`, a certificate, `--expires`).
    credentials_expire_at: str | None = None
    credentials_expiry_source: str | None = None
    last_check: CheckRecord | None = None
    error: ReplicationError | None = None
    past_errors: list[ReplicationError] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)

    def transition(self, to: Status, reason: str) -> None:
        """Every status change goes through here, so the history is never missing one."""
        now = now_iso()
        self.history.append(HistoryEntry(at=now, to=to, reason=reason, from_=self.status))
        self.status = to
        self.updated_at = now


# --- initial synchronizations ----------------------------------------------------------------------------------


@dataclass
class SourceFile(Record):
    """An export as it was when the execution started: a resume refuses one that changed since."""

    name: str
    size: int
    format: str
    compressed: bool
    mtime_ns: int | None = None
    sha256: str | None = None
    #: An object's generation, version id or ETag (`dmrepl.storage.version_of`); None for a local file.
    version: str | None = None


@dataclass
class ExecutionOptions(Record):
    format: str = "auto"
    max_rejects: int | None = None
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S


@dataclass
class ReplicationResult(Record):
    """One replication's share of an execution."""

    name: str
    type: str
    delivered: int = 0
    failed: int = 0
    rejected: int = 0
    status: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class Progress(Record):
    bytes_read: int = 0
    bytes_total: int = 0
    percent: float = 0.0
    lines_read: int = 0
    updated_at: str | None = None


@dataclass
class Execution(Record):
    id: str
    datamart: str
    user_point_system_version: str
    status: ExecutionStatus
    created_at: str
    started_at: str
    start_ts: int
    files: list[SourceFile] = field(default_factory=list)
    options: ExecutionOptions = field(default_factory=ExecutionOptions)
    replications: dict[str, ReplicationResult] = field(default_factory=dict)
    pid: int | None = None
    pid_start: str | None = None
    lines_read: int = 0
    operations: dict[str, int] = field(default_factory=dict)
    rejects: int = 0
    progress: Progress = field(default_factory=Progress)
    error: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    rejects_file: str | None = None
    resumes: list[str] = field(default_factory=list)


# --- the registry as a whole -----------------------------------------------------------------------------------


@dataclass
class RegistryData(Record):
    schema_version: int = SCHEMA_VERSION
    datamarts: dict[str, Datamart] = field(default_factory=dict)
    replications: dict[str, Replication] = field(default_factory=dict)
    executions: dict[str, Execution] = field(default_factory=dict)


# --- a sync's checkpoint (a JSON file beside the registry) ------------------------------------------------------

Position = tuple[int, int, int]  # file index, byte offset after a line (decompressed stream), line number


@dataclass
class RepPosition(Record):
    """What one replication acknowledged: everything up to `pos`."""

    pos: list[int] = field(default_factory=lambda: [0, 0, 0])
    delivered: int = 0
    rejected: int = 0

    @property
    def position(self) -> Position:
        return (self.pos[0], self.pos[1], self.pos[2])


@dataclass
class Checkpoint(Record):
    """Everything needed to continue exactly: the read position, each replication's acknowledged position, the
    counters, and how much of the rejects file is final."""

    read: list[int] = field(default_factory=lambda: [0, 0, 0])
    reps: dict[str, RepPosition] = field(default_factory=dict)
    lines_read: int = 0
    operations: dict[str, int] = field(default_factory=dict)
    rejects: int = 0
    rejects_bytes: int = 0
    saved_at: str | None = None

    @property
    def read_position(self) -> Position:
        return (self.read[0], self.read[1], self.read[2])

    def counter(self) -> Counter[str]:
        return Counter(self.operations)

    @classmethod
    def fresh(cls, rep_ids: typing.Iterable[str]) -> Checkpoint:
        return cls(reps={r: RepPosition() for r in rep_ids})
