"""Whether the process that owns a RUNNING execution is still alive, so a crash never blocks a datamart forever."""

from __future__ import annotations

import os
from typing import Any


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a live owner from a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def is_alive(pid: int | None, start: str | None = None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start is not None:
        current = process_start_time(pid)
        if current is not None and current != start:
            return False
    return True


def owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "pid_start": process_start_time(pid)}


def running_execution(data: dict[str, Any], datamart: str) -> dict[str, Any] | None:
    """The RUNNING execution of a datamart whose process is alive; a stale one does not block."""
    for execution in data.get("executions", {}).values():
        if (
            execution.get("datamart") == datamart
            and execution.get("status") == "RUNNING"
            and is_alive(execution.get("pid"), execution.get("pid_start"))
        ):
            return execution
    return None
