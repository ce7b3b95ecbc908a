"""What a sync is asked to do and what it reports, shared by the API, the coordinator and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dmrepl.models import DEFAULT_MAX_LINE_BYTES, DEFAULT_RETRY_BUDGET_S, Execution, ExecutionOptions

if TYPE_CHECKING:
    from dmrepl.sync.spark import SparkSettings

CHECKPOINT_INTERVAL_S = 5.0
PROGRESS_INTERVAL_S = 0.25
CHECKPOINT_FILE = "checkpoint.json"
FORMATS = ("auto", "operations", "user-points")

#: Called with (bytes read, bytes in all, operations so far).
ProgressHook = Callable[[int, int, int], None]


@dataclass
class SyncOptions:
    fmt: str = "auto"
    max_rejects: int | None = None
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S
    workers: int = 0  # 0: automatic (several for large user-point exports, see dmrepl.sync.pool)
    #: --engine spark: where and how (None: the local engine, in this process or its worker processes).
    spark: SparkSettings | None = None

    def recorded(self) -> ExecutionOptions:
        """What an execution keeps, so that a resume reads its exports the same way."""
        return ExecutionOptions(
            format=self.fmt,
            max_rejects=self.max_rejects,
            max_line_bytes=self.max_line_bytes,
            retry_budget_s=self.retry_budget_s,
        )


@dataclass
class Outcome:
    execution: Execution
    errored: list[str] = field(default_factory=list)
    aborted: str | None = None
    #: Operations a retried Spark task may have delivered twice (at-least-once; bounded by one chunk per retry).
    possible_duplicates: int = 0
