"""Fan-out of operations to the replications of one run (a sync or the live stream).

One replication failing never stops the others: its target is marked dead, the replication goes to ERROR in the
registry at once, and the run goes on. An operation counts as delivered only after a successful `flush()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from dmrepl import destinations, secrets
from dmrepl.destinations.base import DATA, Destination, DestinationError, Message
from dmrepl.errors import DmreplError
from dmrepl.registry import Registry
from dmrepl.replications import mark_error

SEND_BATCH = 1000
_data_of = itemgetter(DATA)

RejectHook = Callable[["Target", Message, str], None]


@dataclass
class Target:
    rep_id: str
    name: str
    type: str
    settings: dict[str, Any]
    credentials: dict[str, Any] | None
    dest: Destination | None = None
    alive: bool = True
    delivered: int = 0
    rejected: int = 0
    in_flight: int = 0
    error: dict[str, Any] | None = None
    pending: list[Message] = field(default_factory=list)
    limit: int = 0


class Fanout:
    def __init__(
        self,
        registry: Registry,
        replications: Sequence[dict[str, Any]],
        *,
        retry_budget_s: float,
        on_reject: RejectHook,
        reason: str,
    ) -> None:
        self.registry = registry
        self.retry_budget_s = retry_budget_s
        self.on_reject = on_reject
        self.reason = reason
        self.targets: dict[str, Target] = {}
        for rep in replications:
            self.add(rep)

    def add(self, rep: dict[str, Any]) -> Target:
        target = Target(rep["id"], rep["name"], rep["type"], rep["settings"], rep.get("credentials"))
        self.targets[rep["id"]] = target
        return target

    @property
    def live(self) -> list[Target]:
        return [t for t in self.targets.values() if t.alive]

    def open(self, target: Target) -> None:
        try:
            secret = secrets.load_secret(target.credentials) if target.credentials else None
            target.dest = destinations.create(target.type, target.settings, secret, retry_budget_s=self.retry_budget_s)
            target.dest.open()
            target.limit = target.dest.max_message_bytes
        except DestinationError as exc:
            self.fail(target, exc)
        except DmreplError as exc:
            self.fail(target, DestinationError(exc.code, exc.message))

    def open_all(self) -> None:
        for target in list(self.targets.values()):
            if target.alive and target.dest is None:
                self.open(target)

    def fail(self, target: Target, exc: DestinationError) -> None:
        target.alive = False
        target.pending = []
        target.error = {"code": exc.code, "message": exc.message}
        mark_error(self.registry, target.rep_id, code=exc.code, message=exc.message, undelivered=0, reason=self.reason)
        if target.dest is not None:
            with contextlib.suppress(Exception):  # it already failed; closing must not hide why
                target.dest.close()
            target.dest = None

    def offer(self, target: Target, messages: Sequence[Message], bound: int | None = None) -> None:
        """Queue one line's messages for a target, rejecting for this target alone any over its size limit (an
        operation can outgrow its line: `1e9` is re-serialized as `1000000000.0`). `bound`, when known, is an upper
        bound on their sizes (`operations.max_operation_bytes`): below the limit, nothing needs measuring."""
        if not target.alive:
            return
        if (bound is None or bound > target.limit) and max(map(len, map(_data_of, messages)), default=0) > target.limit:
            kept = []
            for m in messages:
                if len(m[DATA]) > target.limit:
                    target.rejected += 1
                    self.on_reject(target, m, f"PAYLOAD_TOO_LARGE: {len(m[DATA])} bytes > {target.limit}")
                else:
                    kept.append(m)
            messages = kept
        target.pending.extend(messages)
        if len(target.pending) >= SEND_BATCH:
            self.push(target)

    def push(self, target: Target) -> None:
        if not target.pending or not target.alive or target.dest is None:
            return
        batch, target.pending = target.pending, []
        target.in_flight += len(batch)
        try:
            target.dest.send(batch)
        except DestinationError as exc:
            self.fail(target, exc)

    def flush(self) -> None:
        """Push what is queued and wait for acknowledgements; only then are operations counted as delivered."""
        for target in self.live:
            self.push(target)
        for target in self.live:
            assert target.dest is not None
            try:
                target.dest.flush()
            except DestinationError as exc:
                self.fail(target, exc)
                continue
            target.delivered += target.in_flight
            target.in_flight = 0

    def close(self, target: Target) -> None:
        if target.dest is not None:
            try:
                target.dest.close()
            finally:
                target.dest = None

    def close_all(self) -> None:
        for target in self.targets.values():
            with contextlib.suppress(DestinationError):
                self.close(target)
