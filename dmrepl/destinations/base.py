"""The small interfaces every destination type implements, so the registry, the CLI, the sync engine and
`replicate` never know which service they talk to.

A destination type is one module under `dmrepl/destinations/` exposing `TYPE`, a `DestinationType`: the options
`create` takes for it, how they and a credentials file are validated offline into a `Binding`, how its target is
described, and its `Destination` (connectivity check and delivery). Modules import their SDK lazily (inside
methods), so that `dmrepl --help` and `dmrepl list` stay fast.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from dmrepl.models import DEFAULT_RETRY_BUDGET_S
from dmrepl.operations import Message


@dataclass
class Binding:
    """What `create`/`recreate` saves for a replication: settings (non-secret), the secret text, and a non-secret
    fingerprint of it. The secret is kept out of `repr` so that it never reaches a log or a traceback."""

    settings: dict[str, Any]
    secret: str | None = field(default=None, repr=False)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: What the service's SDK accepts but looks wrong: shown, never a refusal.
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OptionSpec:
    """An option `create`/`recreate` takes for a destination type; the CLI builds its flags from these, so that a
    new type declares its options in its own module. `kind` is str, Path or bool (then `flags` holds the on and
    off forms, as in `--ordering/--no-ordering`)."""

    name: str
    flags: str
    help: str
    kind: type = str
    #: Part of how to authenticate rather than of where to deliver: `rotate` offers it beside `--credentials`, and
    #: its setting may change there (every other setting must stay as it is: changing those is `recreate`).
    credential: bool = False


class DestinationType(ABC):
    """Everything dmrepl knows about one type of destination, outside delivery itself."""

    name: ClassVar[str]
    options: ClassVar[tuple[OptionSpec, ...]] = ()
    #: Whether `--credentials FILE` is required to bind a replication of this type (see `credentials_required`).
    needs_credentials: ClassVar[bool] = True
    credentials_help: ClassVar[str] = ""

    def credentials_required(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether a binding needs credentials now (an emulator, for instance, needs none; nor does a keyless
        identity chosen by `options`)."""
        return self.needs_credentials

    def reads_credentials_file(self, options: Mapping[str, Any]) -> bool:
        """Whether `--credentials` names a file to read: a type may also take a keyword there (Google's `adc`)."""
        return True

    @abstractmethod
    def bind(
        self,
        options: Mapping[str, Any],
        raw: bytes | None,
        source: str,
        previous: Mapping[str, Any] | None,
    ) -> Binding:
        """Validate settings and credentials offline, reporting every defect with its field (InvalidInputError).

        `options` holds the values given on the command line (None: not given); `previous`, the settings of the
        binding being replaced by `recreate`, whose values stand where an option was not given; `raw`, the
        credentials (a file's bytes, or the stored secret when `recreate` gets no new file).
        """

    @abstractmethod
    def describe(self, settings: Mapping[str, Any]) -> str:
        """The target in one line, as `list` shows it (e.g. projects/P/topics/T)."""

    @abstractmethod
    def destination(
        self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    ) -> Destination: ...

    def expires_at(
        self, settings: Mapping[str, Any], secret: str | None, *, fetch_timeout_s: float | None = None
    ) -> tuple[datetime, str] | None:
        """When these credentials stop working, and what says so (`se=` of a signature, a certificate's notAfter),
        so that `list`, `show` and `check` warn before the service refuses them. Offline unless `fetch_timeout_s` is
        given (then it may ask the issuer, within that time); None when nothing tells."""
        return None

    def previous_or(self, options: Mapping[str, Any], previous: Mapping[str, Any] | None, name: str) -> Any:
        """An option's value, or the replaced binding's when it was not given."""
        value = options.get(name)
        if value is None and previous:
            value = previous.get(name)
        return str(value) if isinstance(value, Path) else value


@dataclass(slots=True)
class CheckStep:
    """One named step of a connectivity check, as shown to the user and recorded as `last_check`."""

    name: str
    status: str = "ok"  # ok | failed | skipped
    duration_ms: int = 0
    detail: str = ""
    fix: str = ""
    code: str | None = None  # error code when failed, e.g. AUTH_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


class DestinationError(Exception):
    """The destination can no longer deliver: a non-retryable failure, or retryable ones past the retry budget.

    `code` is one of the error codes of docs/statuses.md (AUTH_FAILED, PERMISSION_DENIED, TOPIC_NOT_FOUND,
    EVENT_HUB_NOT_FOUND, UNREACHABLE, PAYLOAD_TOO_LARGE, ...). The message must never contain secret material.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class Destination(ABC):
    """A replication's binding to one service.

    Life cycle: `check()` alone (never publishes), or `open()`, then any number of `send()` and `flush()`,
    then `close()`. `send()` may be asynchronous; `flush()` returns only when everything sent so far was
    acknowledged by the service (the engine checkpoints right after), and raises DestinationError otherwise.
    Transient failures are retried inside the destination within `retry_budget_s`.
    """

    type_name: ClassVar[str]
    #: Messages larger than this are rejected by the engine for this destination only (PAYLOAD_TOO_LARGE).
    max_message_bytes: int = 10_000_000
    #: Messages the service acknowledged since open(), as they are acknowledged (not only at `flush()`): when the
    #: destination fails between two flushes, the run still counts what did arrive. 0 where nothing tells.
    acknowledged: int = 0

    def __init__(
        self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    ) -> None:
        self.settings = dict(settings)
        self.secret = secret
        self.retry_budget_s = retry_budget_s

    @abstractmethod
    def check(self, timeout_s: float = 20.0) -> list[CheckStep]:
        """Run the connectivity steps (README, "Connectivity checks") in order; after a failed step the rest are
        `skipped`."""

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def send(self, messages: Sequence[Message]) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Destination:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def timed_step(steps: list[CheckStep], name: str) -> Iterator[CheckStep]:
    """Append a step and time it; the body sets status/detail/fix/code on failure."""
    step = CheckStep(name)
    steps.append(step)
    start = time.monotonic()
    try:
        yield step
    finally:
        step.duration_ms = int((time.monotonic() - start) * 1000)


def skip_rest(steps: list[CheckStep], names: Sequence[str], why: str = "an earlier step failed") -> None:
    steps.extend(CheckStep(n, status="skipped", detail=why) for n in names)


#: Bytes one destination may hold unacknowledged (DMREPL_MEMORY_BUDGET_MB overrides it): what bounds its window.
DEFAULT_MEMORY_BUDGET_BYTES = 64 << 20


def memory_budget() -> int:
    """The budget now: read when a destination opens, never fixed at import."""
    value = os.environ.get("DMREPL_MEMORY_BUDGET_MB", "")
    return int(value) << 20 if value.isdigit() and int(value) > 0 else DEFAULT_MEMORY_BUDGET_BYTES


@dataclass
class Backoff:
    """Exponential backoff bounded by a total budget, shared by the destinations' retry loops."""

    budget_s: float
    initial_s: float = 0.2
    maximum_s: float = 10.0
    multiplier: float = 2.0
    started: float = field(default_factory=time.monotonic)
    _next: float = 0.0

    def sleep_or_give_up(self, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Sleep before the next attempt; False when the budget is spent (the caller then raises)."""
        remaining = self.budget_s - (time.monotonic() - self.started)
        if remaining <= 0:
            return False
        self._next = min(self.maximum_s, self._next * self.multiplier if self._next else self.initial_s)
        sleep(min(self._next, remaining))
        return True


class Window:
    """How many requests a destination keeps in flight, sized to the link like TCP's congestion window: it grows by
    one each time a sender had to wait for a slot (the link took all there was: the bandwidth-delay product is
    larger) and halves when a request met a retryable failure (throttling such as ServerBusy or RESOURCE_EXHAUSTED,
    an unavailable server), between `minimum` and `maximum` (what the memory budget allows)."""

    def __init__(self, initial: int, minimum: int, maximum: int) -> None:
        self.minimum, self.maximum = max(1, minimum), max(1, minimum, maximum)
        self.limit = min(self.maximum, max(self.minimum, initial))
        self.in_flight = 0
        #: How far it grew and how often it halved: what the tests observe.
        self.peak = self.limit
        self.shrinks = 0
        self._cond = threading.Condition()

    def acquire(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait for a slot (or for `stop`); True when the sender had to wait, i.e. the window was the limit."""
        waited = False
        with self._cond:
            while self.in_flight >= self.limit and not stop():
                waited = True
                self._cond.wait(0.5)
            self.in_flight += 1
        return waited

    def release(self, waited: bool, throttled: bool) -> None:
        """`throttled`: the request met a retryable failure on its way (the window halves); else, if it had waited
        for its slot, the window grows by one."""
        with self._cond:
            self.in_flight -= 1
            if throttled:
                self.limit = max(self.minimum, self.limit // 2)
                self.shrinks += 1
            elif waited and self.limit < self.maximum:
                self.limit += 1
                self.peak = max(self.peak, self.limit)
            self._cond.notify_all()
