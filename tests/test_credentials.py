"""Every defect of a credentials file is reported by field, exit 4, nothing saved, no key material shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.factories import connection_string, ec_pem, rsa_pem, sas_key, service_account, service_account_json

PEM = rsa_pem()
KEY_BODY = PEM.splitlines()[5]  # a line of base64 from inside the key: must never be printed


def _pubsub_cases() -> list[tuple[str, bytes, list[str]]]:
    sa = service_account()
    cases: list[tuple[str, bytes, list[str]]] = [
        ("truncated-json", service_account_json()[:300].encode(), ["not valid JSON"]),
        ("wrong-type", service_account_json(type="authorized_user").encode(), ["type:"]),
        ("missing-type", service_account_json(type=None).encode(), ["type: is missing"]),
        ("literal-newlines", service_account_json(private_key=PEM.replace("\n", "\\n")).encode(), ["private_key"]),
        (
            "garbage-pem",
            service_account_json(private_key="-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").encode(),
            ["private_key"],
        ),
        ("ec-key", service_account_json(private_key=ec_pem()).encode(), ["private_key", "RSA"]),
        ("not-a-pem", service_account_json(private_key="hunter2").encode(), ["private_key"]),
        (
            "http-token-uri",
            service_account_json(token_uri="http://oauth2.example.com/token").encode(),
            ["token_uri", "https"],
        ),
        ("bad-token-uri", service_account_json(token_uri="nope").encode(), ["token_uri"]),
        ("bad-email", service_account_json(client_email="not-an-email").encode(), ["client_email"]),
        ("non-utf8", b"\xff\xfe" + service_account_json().encode("utf-16-le"), ["UTF-8"]),
        ("json-array", b"[1, 2, 3]", ["not a JSON object"]),
        ("empty", b"", ["empty"]),
        ("whitespace", b"   \n\n", ["empty"]),
        ("one-megabyte", b"{" + b" " * (1024 * 1024) + b"}", ["larger than 64 KiB"]),
        ("truncated-pem", service_account_json(private_key=PEM[: len(PEM) // 2]).encode(), ["private_key"]),
        ("key-is-number", service_account_json(private_key=12345).encode(), ["private_key"]),
    ]
    for field in ("project_id", "private_key_id", "private_key", "client_email", "token_uri"):
        cases.append((f"missing-{field}", json.dumps({k: v for k, v in sa.items() if k != field}).encode(), [field]))
    return cases


def _eventhubs_cases() -> list[tuple[str, bytes, list[str], list[str]]]:
    key = sas_key()
    return [
        (
            "missing-key",
            b"Endpoint=sb://ns1.servicebus.windows.net/;SharedAccessKeyName=send;EntityPath=hub1",
            ["SharedAccessKey"],
            [],
        ),
        (
            "missing-key-name",
            f"Endpoint=sb://ns1.servicebus.windows.net/;SharedAccessKey={key};EntityPath=hub1".encode(),
            ["SharedAccessKeyName"],
            [],
        ),
        (
            "missing-endpoint",
            f"SharedAccessKeyName=send;SharedAccessKey={key};EntityPath=hub1".encode(),
            ["Endpoint"],
            [],
        ),
        (
            "hub-conflict",
            connection_string(key=key, hub="hub1").encode(),
            ["--event-hub", "EntityPath"],
            ["--event-hub", "other"],
        ),
        ("no-hub", connection_string(key=key, hub=None).encode(), ["--event-hub"], []),
        (
            "emulator-public",
            (connection_string(key=key) + ";UseDevelopmentEmulator=true").encode(),
            ["UseDevelopmentEmulator"],
            [],
        ),
        ("no-scheme", connection_string(key=key).replace("sb://", "").encode(), ["Endpoint"], []),
        ("two-lines", (connection_string(key=key) + "\n" + connection_string()).encode(), ["more than one line"], []),
        ("non-utf8", b"\xff\xfe\xfa", ["UTF-8"], []),
        ("empty", b"", ["empty"], []),
        ("not-key-value", b"this is not a connection string", ["Key=Value"], []),
    ]


@pytest.mark.parametrize(("case", "content", "expected"), _pubsub_cases(), ids=[c[0] for c in _pubsub_cases()])
def test_defective_pubsub_credentials_are_refused(cli, datamart, tmp_path: Path, case, content, expected) -> None:
    path = tmp_path / "credentials.json"
    path.write_bytes(content)
    result = cli(
        "create",
        "--type",
        "google-pubsub",
        "--name",
        "ps",
        "--credentials",
        path,
        "--topic-id",
        "ops",
        "--project-id",
        "p1",
        expect=4,
    )
    err = result.stderr
    for word in expected:
        assert word in err, (case, err)
    assert str(path) in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and KEY_BODY not in err and KEY_BODY not in result.stdout
    assert cli("--json", "list").stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("case", "content", "expected", "extra"), _eventhubs_cases(), ids=[c[0] for c in _eventhubs_cases()]
)
def test_defective_connection_strings_are_refused(
    cli, datamart, tmp_path: Path, case, content, expected, extra
) -> None:
    path = tmp_path / "credentials.txt"
    path.write_bytes(content)
    result = cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", path, *extra, expect=4)
    for word in expected:
        assert word in result.stderr, (case, result.stderr)
    for secret_part in content.decode("utf-8", "replace").split(";"):
        if secret_part.lower().startswith("sharedaccesskey="):
            assert secret_part.split("=", 1)[1] not in result.stderr
    assert cli("--json", "list").stdout.strip() == "[]"


def test_every_defect_is_reported_at_once(cli, datamart, tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(
        service_account_json(type=None, client_email="nope", token_uri="http://evil.example/t", private_key_id=None)
    )
    result = cli(
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
        expect=4,
    )
    fields = {d["field"] for d in json.loads(result.stderr)["error"]["details"]}
    assert {"type", "client_email", "token_uri", "private_key_id"} <= fields


def test_missing_topic_and_bad_endpoint_are_reported_with_credentials_ok(cli, datamart, tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(service_account_json())
    result = cli(
        "create",
        "--type",
        "google-pubsub",
        "--name",
        "ps",
        "--credentials",
        path,
        "--endpoint",
        "no host:port",
        expect=4,
    )
    assert "--topic-id" in result.stderr and "--endpoint" in result.stderr


@pytest.mark.parametrize(
    "variant",
    [
        lambda cs: cs,
        lambda cs: "\ufeff" + cs + "\n",
        lambda cs: "  " + cs.replace("Endpoint=", "endpoint=").replace("SharedAccessKeyName", "sharedaccesskeyname"),
    ],
    ids=["plain", "bom-and-newline", "lowercase-keys"],
)
def test_valid_connection_strings_are_saved_without_the_key(cli, datamart, tmp_path: Path, variant, isolated) -> None:
    key = sas_key()
    path = tmp_path / "credentials.txt"
    path.write_text(variant(connection_string(key=key, hub="hub1")), encoding="utf-8")
    rep = json.loads(
        cli("--json", "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", path).stdout
    )
    assert rep["settings"]["event_hub"] == "hub1"
    assert rep["credentials"]["fingerprint"]["shared_access_key_name"] == "send"
    assert key not in (isolated / "registry.toml").read_text()


def test_sas_signature_is_accepted_instead_of_key(cli, datamart, tmp_path: Path) -> None:
    path = tmp_path / "credentials.txt"
    path.write_text(
        "Endpoint=sb://ns1.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1&skn=send"
    )
    cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", path, "--event-hub", "hub1")


def test_emulator_flag_is_accepted_on_loopback(cli, datamart, tmp_path: Path) -> None:
    path = tmp_path / "credentials.txt"
    path.write_text(connection_string(host="127.0.0.1:5672") + ";UseDevelopmentEmulator=true")
    cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", path)


@pytest.mark.parametrize(
    "token_uri", ["https://oauth2.googleapis.com/token", "http://127.0.0.1:8080/token", "http://localhost/token"]
)
def test_valid_service_account_is_saved(cli, datamart, tmp_path: Path, token_uri: str, isolated) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(service_account_json(token_uri=token_uri))
    rep = json.loads(
        cli(
            "--json", "create", "--type", "google-pubsub", "--name", "ps", "--credentials", path, "--topic-id", "ops"
        ).stdout
    )
    assert rep["settings"] == {"project_id": "dmrepl-test", "topic_id": "ops", "ordering": True}
    assert rep["credentials"]["fingerprint"]["client_email"] == "replicator@dmrepl-test.iam.gserviceaccount.com"
    assert KEY_BODY not in (isolated / "registry.toml").read_text()


def test_file_destination_needs_an_existing_parent(cli, datamart, tmp_path: Path) -> None:
    result = cli("create", "--type", "file", "--name", "f", "--path", tmp_path / "nope" / "out.ndjson", expect=4)
    assert "does not exist" in result.stderr
