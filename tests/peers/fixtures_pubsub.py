"""pytest fixtures for the Pub/Sub peer (register with `pytest_plugins = ["tests.peers.fixtures_pubsub"]`).

One pstest process serves the whole session (building it costs seconds, a topic costs nothing); every test gets
topics of its own. Tests that kill the server use `pstest_private`. A missing Go toolchain is a test error whose
message says what to install, not a silent skip: these tests are the only proof the destination works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.peers.pubsub import (
    PstestServer,
    create_subscription,
    create_topic,
    pstest,
    pull_all,
    unique_id,
)
from tests.peers.pubsub import (
    Pulled as Pulled,
)
from tests.peers.token_server import TokenServer

PROJECT = "dmrepl-test"


@pytest.fixture(scope="session")
def pstest_server() -> Iterator[PstestServer]:
    with pstest() as server:
        yield server


@pytest.fixture
def pstest_private() -> Iterator[PstestServer]:
    """A server of this test's own, free to be killed."""
    with pstest() as server:
        yield server


@pytest.fixture
def pubsub_emulator(pstest_server: PstestServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """PUBSUB_EMULATOR_HOST pointing at the session server, for this test only; returns the address."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pstest_server.addr)
    return pstest_server.addr


@dataclass(frozen=True)
class PubSubTopic:
    """A fresh topic with one subscription (created first, so it sees every message published)."""

    addr: str
    project_id: str
    topic_id: str
    subscription_id: str

    @property
    def path(self) -> str:
        return f"projects/{self.project_id}/topics/{self.topic_id}"

    def settings(self, **extra: object) -> dict[str, object]:
        return {"project_id": self.project_id, "topic_id": self.topic_id, **extra}

    def pull(self, expected: int | None = None, timeout: float = 30.0) -> list[Pulled]:
        return pull_all(self.addr, self.project_id, self.subscription_id, expected=expected, timeout=timeout)


def new_topic(server: PstestServer) -> PubSubTopic:
    topic_id, sub_id = unique_id("topic"), unique_id("sub")
    create_topic(server.addr, PROJECT, topic_id)
    create_subscription(server.addr, PROJECT, topic_id, sub_id)
    return PubSubTopic(server.addr, PROJECT, topic_id, sub_id)


@pytest.fixture
def pubsub_topic(pstest_server: PstestServer) -> PubSubTopic:
    return new_topic(pstest_server)


@pytest.fixture
def make_pubsub_topic() -> Callable[[PstestServer], PubSubTopic]:
    """For a topic on another server (e.g. `pstest_private`)."""
    return new_topic


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    with TokenServer() as server:
        yield server
