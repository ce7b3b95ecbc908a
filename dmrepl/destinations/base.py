"""The one small interface every destination implements, so the sync engine and `replicate` never know which
service they talk to. Implementations import their SDK lazily (inside methods), keeping `dmrepl --help` fast."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

#: One operation ready to send: (data, doc_type, op, key), `data` being its SPEC §1 JSON and `key` its
#: user_point_id. A plain tuple, read by unpacking or by the indexes below, because a million of them are built per
#: sync: measured 12 % faster to convert an export than with a NamedTuple, whose construction is a Python call.
Message = tuple[bytes, str, str, str]
DATA, DOC_TYPE, OP, KEY = 0, 1, 2, 3


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

    `code` is one of the SPEC §3 error codes (AUTH_FAILED, PERMISSION_DENIED, TOPIC_NOT_FOUND, EVENT_HUB_NOT_FOUND,
    UNREACHABLE, PAYLOAD_TOO_LARGE, ...). The message must never contain secret material.
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

    def __init__(self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = 300.0) -> None:
        self.settings = dict(settings)
        self.secret = secret
        self.retry_budget_s = retry_budget_s

    @abstractmethod
    def check(self, timeout_s: float = 20.0) -> list[CheckStep]:
        """Run the connectivity steps of SPEC §5 in order; after a failed step the rest are `skipped`."""

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


@dataclass
class Backoff:
    """Exponential backoff bounded by a total budget, shared by the destinations' retry loops."""

    budget_s: float
    initial_s: float = 0.2
    maximum_s: float = 10.0
    started: float = field(default_factory=time.monotonic)
    _next: float = 0.0

    def sleep_or_give_up(self, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Sleep before the next attempt; False when the budget is spent (the caller then raises)."""
        remaining = self.budget_s - (time.monotonic() - self.started)
        if remaining <= 0:
            return False
        self._next = min(self.maximum_s, self._next * 2 if self._next else self.initial_s)
        sleep(min(self._next, remaining))
        return True
