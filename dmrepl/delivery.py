"""Fan-out of operations to the replications of one run (a sync shard, a sync worker, the live stream).

One replication failing never stops the others: its target is marked dead and the run goes on. An operation counts
as delivered only after a successful `flush()`. This module never touches the registry: whoever owns the run (the
sync coordinator, live replication) learns of a failure through `on_fail` or the targets' state, and records it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from dmrepl import destinations
from dmrepl.destinations.base import Destination, DestinationError
from dmrepl.models import DEFAULT_RETRY_BUDGET_S
from dmrepl.operations import DATA, Message

SEND_BATCH = 1000
_data_of = itemgetter(DATA)


@dataclass(frozen=True)
class ReplicationBinding:
    """All a destination needs to deliver for one replication, with no registry or keyring behind it: what the
    owner of a run resolves once and hands to shards and workers (the secret is kept out of `repr`)."""

    rep_id: str
    name: str
    type: str
    settings: dict[str, Any]
    secret: str | None = field(default=None, repr=False)


@dataclass
class Failure:
    """Why a replication can no longer deliver: one of the error codes of docs/statuses.md, and a message free of
    secrets."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class Target:
    binding: ReplicationBinding
    dest: Destination | None = None
    alive: bool = True
    delivered: int = 0
    rejected: int = 0
    in_flight: int = 0
    error: Failure | None = None
    pending: list[Message] = field(default_factory=list)
    limit: int = 0
    acked_at_flush: int = 0  # the destination's `acknowledged` at the last successful flush

    @property
    def rep_id(self) -> str:
        return self.binding.rep_id

    @property
    def name(self) -> str:
        return self.binding.name


RejectHook = Callable[[Target, Message, str], None]
FailHook = Callable[[Target], None]


class Fanout:
    def __init__(
        self,
        bindings: Iterable[ReplicationBinding],
        *,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        on_reject: RejectHook,
        on_fail: FailHook | None = None,
    ) -> None:
        self.retry_budget_s = retry_budget_s
        self.on_reject = on_reject
        self.on_fail = on_fail
        self.targets: dict[str, Target] = {}
        for binding in bindings:
            self.add(binding)

    def add(self, binding: ReplicationBinding) -> Target:
        target = Target(binding)
        self.targets[binding.rep_id] = target
        return target

    @property
    def live(self) -> list[Target]:
        return [t for t in self.targets.values() if t.alive]

    def open(self, target: Target) -> None:
        b = target.binding
        try:
            target.dest = destinations.create(b.type, b.settings, b.secret, retry_budget_s=self.retry_budget_s)
            target.dest.open()
            target.limit = target.dest.max_message_bytes
        except DestinationError as exc:
            self.fail(target, exc)

    def open_all(self) -> None:
        for target in list(self.targets.values()):
            if target.alive and target.dest is None:
                self.open(target)

    def fail(self, target: Target, exc: DestinationError) -> None:
        """`delivered` then also counts what the service acknowledged since the last flush: it did arrive (a resume
        from the last checkpoint re-sends it: at least once)."""
        target.alive = False
        target.pending = []
        target.error = Failure(exc.code, exc.message)
        if target.dest is not None:
            target.delivered += max(0, min(target.dest.acknowledged - target.acked_at_flush, target.in_flight))
            target.in_flight = 0
            with contextlib.suppress(Exception):  # it already failed; closing must not hide why
                target.dest.close()
            target.dest = None
        if self.on_fail is not None:
            self.on_fail(target)

    def drop(self, rep_id: str) -> None:
        """Stop delivering to a replication that failed elsewhere (another worker) or was paused."""
        target = self.targets.get(rep_id)
        if target is not None and target.alive:
            target.alive = False
            target.pending = []
            with contextlib.suppress(DestinationError):
                self.close(target)

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
            target.acked_at_flush = target.dest.acknowledged

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
