"""Datamarts: the source of operations. Their system version decides how devices are replicated
(docs/operations.md, "Device identifiers")."""

from __future__ import annotations

import re

from dmrepl.errors import InvalidInputError, NotFoundError, RefusedError, UsageError
from dmrepl.models import Datamart, RegistryData, now_iso
from dmrepl.registry import Registry

DEFAULT_SYSTEM_VERSION = "v202205"
_VERSION = re.compile(r"^v\d{6}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_version(version: str) -> str:
    if not _VERSION.match(version):
        raise InvalidInputError(
            f"--system-version: {version!r} is not a system version like v201901 or v202205", code="INVALID_VERSION"
        )
    return version


def add(registry: Registry, datamart_id: str, *, name: str | None, system_version: str) -> Datamart:
    if not _ID.match(datamart_id):
        raise InvalidInputError(
            f"datamart id {datamart_id!r}: use letters, digits, '.', '_' or '-' (64 at most)", code="INVALID_ID"
        )
    check_version(system_version)
    with registry.transaction() as data:
        if datamart_id in data.datamarts:
            raise RefusedError(f"datamart {datamart_id} already exists", code="ALREADY_EXISTS")
        entry = Datamart(
            id=datamart_id, name=name or datamart_id, user_point_system_version=system_version, created_at=now_iso()
        )
        data.datamarts[datamart_id] = entry
    return entry


def get(data: RegistryData, datamart_id: str) -> Datamart:
    try:
        return data.datamarts[datamart_id]
    except KeyError:
        raise NotFoundError(f"datamart {datamart_id} not found (see dmrepl datamart list)") from None


def list_(registry: Registry) -> list[tuple[Datamart, int]]:
    """Every datamart with its number of replications."""
    data = registry.load()
    return [
        (d, sum(r.datamart == d.id for r in data.replications.values()))
        for d in sorted(data.datamarts.values(), key=lambda d: d.id)
    ]


def resolve(data: RegistryData, given: str | None) -> str:
    """`--datamart` may be omitted when there is exactly one, as gh does with a single remote."""
    if given:
        return get(data, given).id
    ids = sorted(data.datamarts)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise NotFoundError("no datamart yet: add one with dmrepl datamart add ID --system-version V")
    raise UsageError(f"several datamarts ({', '.join(ids)}): choose one with --datamart")


def set_version(registry: Registry, datamart_id: str, version: str) -> Datamart:
    check_version(version)
    with registry.transaction() as data:
        entry = get(data, datamart_id)
        entry.user_point_system_version = version
        entry.updated_at = now_iso()
    return entry
