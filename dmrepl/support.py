"""A support bundle: everything a support engineer needs about one replication, and nothing secret."""

from __future__ import annotations

import platform
import sys
from typing import Any

from dmrepl import __version__
from dmrepl.registry import Registry, now_iso
from dmrepl.replications import resolve

_PACKAGES = ("typer", "rich", "google-cloud-pubsub", "azure-eventhub", "keyring", "orjson")


def _versions() -> dict[str, str]:
    from importlib import metadata  # 15 ms to import: paid by `support` alone, not by every command

    found = {"dmrepl": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def bundle(registry: Registry, ref: str) -> dict[str, Any]:
    """Built from an allow-list of fields, so a field added later is not leaked by accident."""
    data = registry.load()
    rep = resolve(data, ref).to_dict()
    creds = rep.get("credentials") or {}
    executions = [
        {k: e.get(k) for k in ("id", "status", "started_at", "finished_at", "error")}
        | {"replication": (e.get("replications") or {}).get(rep["id"])}
        for e in (x.to_dict() for x in data.executions.values())
        if rep["id"] in (e.get("replications") or {})
    ]
    datamart = data.datamarts.get(rep["datamart"])
    return {
        "generated_at": now_iso(),
        "replication": {
            k: rep.get(k)
            for k in (
                *("id", "name", "type", "datamart", "status", "created_at", "updated_at", "settings"),
                *("credentials_expire_at", "credentials_expiry_source"),
            )
        },
        "credentials": {"store": creds.get("store"), "fingerprint": creds.get("fingerprint")} if creds else None,
        "datamart": datamart.to_dict() if datamart else None,
        "last_check": rep.get("last_check"),
        "error": rep.get("error"),
        "past_errors": rep.get("past_errors", []),
        "history": rep.get("history", []),
        "executions": sorted(executions, key=lambda e: e.get("started_at") or ""),
        "versions": _versions(),
    }
