"""Destination types, registered here by module and loaded lazily by name: the cloud SDKs are imported only by the
commands that check or send. Adding a type is its module plus one line in MODULES."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from dmrepl.destinations.base import Binding, CheckStep, Destination, DestinationError, DestinationType
from dmrepl.models import DEFAULT_RETRY_BUDGET_S

MODULES: dict[str, str] = {
    "file": "dmrepl.destinations.file",
    "google-pubsub": "dmrepl.destinations.pubsub",
    "azure-event-hubs": "dmrepl.destinations.eventhubs",
}
TYPES: tuple[str, ...] = tuple(MODULES)


def get_type(type_name: str) -> DestinationType:
    t: DestinationType = importlib.import_module(MODULES[type_name]).TYPE
    return t


def all_types() -> list[DestinationType]:
    return [get_type(name) for name in TYPES]


def create(
    type_name: str, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> Destination:
    return get_type(type_name).destination(settings, secret, retry_budget_s=retry_budget_s)


__all__ = [
    "MODULES",
    "TYPES",
    "Binding",
    "CheckStep",
    "Destination",
    "DestinationError",
    "DestinationType",
    "all_types",
    "create",
    "get_type",
]
