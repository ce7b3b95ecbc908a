"""Destination types, loaded lazily by name so the cloud SDKs are imported only by commands that send."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from dmrepl.destinations.base import CheckStep, Destination, DestinationError, Message

TYPES: dict[str, str] = {
    "file": "dmrepl.destinations.file:FileDestination",
    "google-pubsub": "dmrepl.destinations.pubsub:PubSubDestination",
    "azure-event-hubs": "dmrepl.destinations.eventhubs:EventHubsDestination",
}


def destination_class(type_name: str) -> type[Destination]:
    module, _, attr = TYPES[type_name].partition(":")
    cls: type[Destination] = getattr(importlib.import_module(module), attr)
    return cls


def create(
    type_name: str, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = 300.0
) -> Destination:
    return destination_class(type_name)(settings, secret, retry_budget_s=retry_budget_s)


__all__ = ["TYPES", "CheckStep", "Destination", "DestinationError", "Message", "create", "destination_class"]
