"""Initial synchronizations: replay a datamart export into every ACTIVE replication, with checkpoints.

The API (`start`, `resume`, `plan`, `list_executions`, `show`, `SyncOptions`, `Outcome`) is `dmrepl.sync.api`,
re-exported here when first used: importing `dmrepl.sync.shard` (a worker, an executor on another machine) must not
load the registry, which the API needs.
"""

from __future__ import annotations

from typing import Any

_API = frozenset(
    {"CHECKPOINT_INTERVAL_S", "FORMATS", "Outcome", "ProgressHook", "SyncOptions", "list_executions", "plan", "resume"}
    | {"show", "start"}
)


def __getattr__(name: str) -> Any:
    if name in _API:
        from dmrepl.sync import api

        return getattr(api, name)
    raise AttributeError(f"module 'dmrepl.sync' has no attribute {name!r}")
