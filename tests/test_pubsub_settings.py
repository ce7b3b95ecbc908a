"""google-pubsub settings as Google's own client takes them: the emulator needs no key, an endpoint without a port is
port 443, a credentials file of another type gets one clear message, and publish retries follow the library's
default schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.factories import service_account_json


def test_with_the_emulator_no_credentials_file_is_needed(
    cli, datamart, monkeypatch, pubsub_emulator, pubsub_topic
) -> None:
    rep = json.loads(
        cli(
            "--json",
            "create",
            "--type",
            "google-pubsub",
            "--name",
            "ps",
            "--project-id",
            pubsub_topic.project_id,
            "--topic-id",
            pubsub_topic.topic_id,
            "--check",
        ).stdout
    )
    assert rep["credentials"] is None and rep["settings"]["project_id"] == pubsub_topic.project_id
    cli("activate", "ps")
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST")
    err = cli(
        "create", "--type", "google-pubsub", "--name", "ps2", "--project-id", "p-1234", "--topic-id", "ops", expect=4
    ).stderr
    assert "--credentials" in err and "PUBSUB_EMULATOR_HOST" in err


def test_the_emulator_still_needs_a_project(cli, datamart, monkeypatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    err = json.loads(
        cli("--json", "create", "--type", "google-pubsub", "--name", "ps", "--topic-id", "ops", expect=4).stderr
    )["error"]
    assert [d["field"] for d in err["details"]] == ["--project-id"]


@pytest.mark.parametrize(
    ("given", "saved"),
    [
        ("europe-west1-pubsub.googleapis.com", "europe-west1-pubsub.googleapis.com:443"),
        ("europe-west1-pubsub.googleapis.com:443", "europe-west1-pubsub.googleapis.com:443"),
        ("127.0.0.1:8085", "127.0.0.1:8085"),
        ("[::1]", "[::1]:443"),
    ],
)
def test_an_endpoint_without_a_port_is_port_443(cli, datamart, tmp_path: Path, given: str, saved: str) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(service_account_json())
    rep = json.loads(
        cli(
            "--json",
            "create",
            "--type",
            "google-pubsub",
            "--name",
            "ps",
            "--credentials",
            path,
            "--topic-id",
            "ops",
            "--endpoint",
            given,
        ).stdout
    )
    assert rep["settings"]["endpoint"] == saved


@pytest.mark.parametrize("kind", ["authorized_user", "impersonated_service_account", "gdch_service_account"])
def test_other_credential_types_get_one_clear_message(cli, datamart, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"type": kind, "client_id": "x", "client_secret": "s3cr3t-value", "refresh_token": "r"}))
    result = cli(
        "--json",
        "create",
        "--type",
        "google-pubsub",
        "--name",
        "ps",
        "--credentials",
        path,
        "--project-id",
        "p-1234",
        "--topic-id",
        "ops",
        expect=4,
    )
    details = json.loads(result.stderr)["error"]["details"]
    assert [d["field"] for d in details] == ["type"], details  # not a list of "missing" service-account fields
    assert kind in details[0]["message"] and "service_account" in details[0]["message"]
    assert "s3cr3t-value" not in result.stderr


def test_publish_retries_follow_the_librarys_default_schedule() -> None:
    """The oracle is google-cloud-pubsub's own default Retry for Publish, read from the installed library."""
    from google.auth.credentials import AnonymousCredentials
    from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport

    from dmrepl.destinations.base import Backoff
    from dmrepl.destinations.pubsub import PUBLISH_BACKOFF

    transport = PublisherGrpcTransport(credentials=AnonymousCredentials(), host="127.0.0.1:1")
    retry = transport._wrapped_methods[transport.publish]._retry
    assert (PUBLISH_BACKOFF["initial_s"], PUBLISH_BACKOFF["multiplier"], PUBLISH_BACKOFF["maximum_s"]) == (
        retry._initial,
        retry._multiplier,
        retry._maximum,
    )
    slept: list[float] = []
    backoff = Backoff(1000.0, **PUBLISH_BACKOFF)
    for _ in range(7):
        assert backoff.sleep_or_give_up(slept.append)
    assert slept == pytest.approx([0.1, 0.4, 1.6, 6.4, 25.6, 60.0, 60.0])
    spent = Backoff(0.5, **PUBLISH_BACKOFF, started=0.0)
    assert not spent.sleep_or_give_up(slept.append)  # the budget, not the library's 600 s, bounds the retries
