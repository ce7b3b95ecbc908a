"""Process-level concerns: whether the process that owns a RUNNING execution is still alive (so a crash never blocks
a datamart forever), and how a long-running sync process uses memory."""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmrepl.models import Execution, RegistryData

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def libc_function(name: str) -> Any | None:
    """A C library function by name (Linux), or None where there is none, or no ctypes to call it with."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (ImportError, OSError, AttributeError):
        return None


def tune_malloc() -> None:
    """Keep freed heap memory for reuse during a sync.

    glibc serves allocations over 128 KiB with fresh mmaps and hands freed heap tops back to the kernel, so a sync,
    which builds and frees a few hundred KiB per batch, faults the same pages in again and again: measured on 1.3M
    operations, 374k page faults and 1.1 s of system time, against 16k and 0.3 s with these thresholds (peak RSS
    unchanged). A user's own MALLOC_* settings win; elsewhere than glibc this does nothing.
    """
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 8 << 20)


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


def running_execution(data: RegistryData, datamart: str) -> Execution | None:
    """The RUNNING execution of a datamart whose process is alive; a stale one does not block."""
    for execution in data.executions.values():
        if (
            execution.datamart == datamart
            and execution.status == "RUNNING"
            and is_alive(execution.pid, execution.pid_start)
        ):
            return execution
    return None
