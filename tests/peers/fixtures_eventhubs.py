"""pytest fixtures for the local Event Hubs peer (register with `pytest_plugins = ["tests.peers.fixtures_eventhubs"]`).

`eventhubs_peer` is per test, so fault modes and recorded events never leak between tests; `eventhubs_peer_session`
is shared by tests that only read or that use their own hub (an extra hub costs nothing: see `eventhubs_hub`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.peers.eventhubs import EventHubsPeer

_hub_names = itertools.count(1)


@pytest.fixture
def eventhubs_peer() -> Iterator[EventHubsPeer]:
    """A fresh peer: hub `hub1` with 4 partitions, policy `send`, 1 MiB max message size."""
    with EventHubsPeer(hubs={"hub1": 4}) as peer:
        yield peer


@pytest.fixture(scope="session")
def eventhubs_peer_session() -> Iterator[EventHubsPeer]:
    with EventHubsPeer(hubs={"hub1": 4}) as peer:
        yield peer


@pytest.fixture
def eventhubs_hub(eventhubs_peer_session: EventHubsPeer) -> str:
    """A hub of its own (4 partitions) on the session peer, so recorded events of other tests do not mix in."""
    name = f"hub-t{next(_hub_names)}"
    eventhubs_peer_session.add_hub(name, 4)
    return name


@pytest.fixture
def eventhubs_connection_string(eventhubs_peer: EventHubsPeer) -> str:
    """Connection string of the per-test peer for policy `send`, with `EntityPath=hub1`."""
    return eventhubs_peer.connection_string("send", "hub1")
