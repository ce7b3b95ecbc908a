"""Live replication: forward a stream of operations to whatever is ACTIVE at each moment.

The registry is re-read every few seconds, so `dmrepl pause` takes effect while this runs; nothing is queued for
a PAUSED replication. Reading uses select() with a timeout so queued operations are flushed even when the
producer goes quiet.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dmrepl import datamarts, secrets
from dmrepl.delivery import Failure, Fanout, ReplicationBinding, Target
from dmrepl.errors import DmreplError, InvalidInputError
from dmrepl.models import DEFAULT_MAX_LINE_BYTES, DEFAULT_RETRY_BUDGET_S, Replication, Status, now_iso
from dmrepl.operations import DOC_TYPE, InvalidOperation, Message, parse_operation_line
from dmrepl.registry import Registry, ensure_home
from dmrepl.replications import mark_error

REFRESH_INTERVAL_S = 2.0
FLUSH_INTERVAL_S = 1.0
FOLLOW_POLL_S = 0.2


@dataclass
class LiveOutcome:
    lines: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    rejects: int = 0
    delivered: dict[str, int] = field(default_factory=dict)
    errored: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejects_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "operations": dict(sorted(self.operations.items())),
            "rejects": self.rejects,
            "rejects_file": self.rejects_file if self.rejects else None,
            "delivered": self.delivered,
            "errored": self.errored,
        }


def read_lines(
    stream: BinaryIO, *, follow: bool, max_line_bytes: int, idle: Callable[[], None], stop: Callable[[], bool]
) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, line) — or (n, None) for a line over the limit — calling `idle` whenever input pauses."""
    try:
        fd: int | None = stream.fileno()
    except (OSError, ValueError, AttributeError):
        fd = None  # an in-memory stream (tests, embedding): always readable
    buf = b""
    line_no = 0
    skipping = False
    while not stop():
        if fd is not None:
            ready, _, _ = select.select([fd], [], [], FLUSH_INTERVAL_S)
            if not ready:
                idle()
                continue
        chunk = os.read(fd, 1 << 20) if fd is not None else stream.read(1 << 20)
        if not chunk:
            idle()
            if follow:
                time.sleep(FOLLOW_POLL_S)
                continue
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > max_line_bytes:
                    if not skipping:
                        line_no += 1
                        yield line_no, None
                    skipping, buf = True, b""
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            if skipping:
                skipping = False
                continue
            line_no += 1
            yield line_no, (line if len(line) <= max_line_bytes else None)
    if buf.strip() and not skipping:
        yield line_no + 1, buf if len(buf) <= max_line_bytes else None


def run(
    registry: Registry,
    source: str,
    *,
    datamart: str | None,
    follow: bool = False,
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    stop: Callable[[], bool] = lambda: False,
    stdin: BinaryIO | None = None,
) -> LiveOutcome:
    stdin = stdin if stdin is not None else sys.stdin.buffer
    dm_id = datamarts.resolve(registry.load(), datamart)
    outcome = LiveOutcome()
    live_dir = ensure_home(registry.root) / "live"
    live_dir.mkdir(exist_ok=True)
    rejects_path = live_dir / f"rejects-{time.strftime('%Y%m%d')}.ndjson"
    outcome.rejects_file = str(rejects_path)
    name = "stdin" if source == "-" else str(Path(source).absolute())
    rejects = None

    def reject(line_no: int, reason: str, replication: str | None = None) -> None:
        nonlocal rejects
        outcome.rejects += 1
        if rejects is None:
            rejects = open(rejects_path, "ab")  # noqa: SIM115 - closed below
        record = {"at": now_iso(), "source": name, "line": line_no, "reason": reason}
        if replication:
            record["replication"] = replication
        rejects.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    current_line = [0]

    def on_reject(target: Target, message: Message, reason: str) -> None:
        reject(current_line[0], reason, target.rep_id)

    def on_fail(target: Target) -> None:
        assert target.error is not None
        error = target.error
        mark_error(
            registry, target.rep_id, code=error.code, message=error.message, undelivered=0, reason="live replication"
        )

    fanout = Fanout([], retry_budget_s=retry_budget_s, on_reject=on_reject, on_fail=on_fail)
    last_refresh = 0.0
    last_flush = time.monotonic()

    def refresh() -> None:
        nonlocal last_refresh
        data = registry.load()
        active = {r.id: r for r in data.replications.values() if r.datamart == dm_id and r.status is Status.ACTIVE}
        for rep_id, target in list(fanout.targets.items()):
            if rep_id not in active and target.alive:
                fanout.flush()
                fanout.close(target)
                outcome.delivered[target.rep_id] = target.delivered
                del fanout.targets[rep_id]
        for rep_id, rep in active.items():
            if rep_id not in fanout.targets:
                binding, failure = _bind(registry, rep)
                target = fanout.add(binding)
                if failure is not None:
                    target.alive, target.error = False, failure
                    on_fail(target)
                else:
                    fanout.open(target)
        last_refresh = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        fanout.flush()
        last_flush = time.monotonic()

    def idle() -> None:
        flush()
        if time.monotonic() - last_refresh >= REFRESH_INTERVAL_S:
            refresh()

    try:
        stream: BinaryIO = stdin if source == "-" else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise InvalidInputError(f"{source}: cannot read ({exc.strerror})", code="INVALID_INPUT") from None
    try:
        refresh()
        for line_no, line in read_lines(stream, follow=follow, max_line_bytes=max_line_bytes, idle=idle, stop=stop):
            current_line[0] = line_no
            if line is None:
                outcome.lines += 1
                reject(line_no, f"line longer than --max-line-bytes {max_line_bytes}")
                continue
            if not line.strip():
                continue
            outcome.lines += 1
            try:
                message = parse_operation_line(line)
            except InvalidOperation as exc:
                reject(line_no, str(exc))
                continue
            outcome.operations[message[DOC_TYPE]] += 1
            now = time.monotonic()
            if now - last_refresh >= REFRESH_INTERVAL_S:
                refresh()
            for target in fanout.live:
                fanout.offer(target, (message,))
            if now - last_flush >= FLUSH_INTERVAL_S:
                flush()
        flush()
    finally:
        fanout.close_all()
        if stream is not stdin:
            stream.close()
        if rejects is not None:
            rejects.close()
    for target in fanout.targets.values():
        outcome.delivered[target.rep_id] = target.delivered
        if not target.alive:
            outcome.errored[target.rep_id] = {"name": target.name, **(target.error.to_dict() if target.error else {})}
    return outcome


def _bind(registry: Registry, rep: Replication) -> tuple[ReplicationBinding, Failure | None]:
    """The replication's binding with its secret, or why the secret could not be read."""
    try:
        secret = secrets.load_secret(rep.credentials, registry.root) if rep.credentials else None
    except DmreplError as exc:
        return ReplicationBinding(rep.id, rep.name, rep.type, dict(rep.settings)), Failure(exc.code, exc.message)
    return ReplicationBinding(rep.id, rep.name, rep.type, dict(rep.settings), secret), None
