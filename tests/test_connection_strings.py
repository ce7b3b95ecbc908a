"""Event Hubs connection strings are accepted and refused as azure-eventhub accepts and refuses them.

The oracle is the SDK itself, run offline on every row: the client constructor dmrepl delivers with
(`EventHubProducerClient.from_connection_string`). dmrepl refuses what it refuses; what it accepts, dmrepl accepts
(with a warning where the row says so), except for dmrepl's own rules, in DMREPL_ONLY: an emulator endpoint that is
not loopback (the SDK would turn TLS off), an `--event-hub` that contradicts EntityPath (the SDK
silently prefers the option), and a key with a signature (the SDK's own `parse_connection_string` refuses it; the
constructor silently prefers the signature).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.factories import sas_key

KEY = sas_key()
NS = "sb://ns1.servicebus.windows.net/"
EMULATOR = (
    "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;"
    "UseDevelopmentEmulator=true;"
)
SAS = "SharedAccessSignature sr=ns1.servicebus.windows.net&sig=abc%3D&se=4102444800&skn=send"

#: (id, connection string, --event-hub, what dmrepl says: "ok" | "warn:<text>" | "refuse:<field>")
ROWS: list[tuple[str, str, str | None, str]] = [
    ("plain", f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY};EntityPath=hub1", None, "ok"),
    ("microsoft-emulator-sample", EMULATOR, "hub1", "ok"),
    ("emulator-127", EMULATOR.replace("localhost", "127.0.0.1:5672"), "hub1", "ok"),
    (
        "emulator-public",
        f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY};UseDevelopmentEmulator=true",
        "hub1",
        "refuse:UseDevelopmentEmulator",
    ),
    ("emulator-True", EMULATOR.replace("=true", "=True"), "hub1", "warn:UseDevelopmentEmulator"),
    ("emulator-false", EMULATOR.replace("=true", "=false").replace("SAS_KEY_VALUE", KEY), "hub1", "ok"),
    (
        "amqps-endpoint",
        f"Endpoint=amqps://ns1.servicebus.windows.net;SharedAccessKeyName=send;SharedAccessKey={KEY}",
        "hub1",
        "ok",
    ),
    (
        "https-endpoint",
        f"Endpoint=https://ns1.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={KEY}",
        "hub1",
        "warn:scheme",
    ),
    (
        "no-scheme",
        f"Endpoint=ns1.servicebus.windows.net;SharedAccessKeyName=send;SharedAccessKey={KEY}",
        "hub1",
        "refuse:Endpoint",
    ),
    ("hostname-key", f"HostName={NS};SharedAccessKeyName=send;SharedAccessKey={KEY}", "hub1", "ok"),
    ("trailing-semicolon", f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY};", "hub1", "ok"),
    ("lowercase-keys", f"endpoint={NS};sharedaccesskeyname=send;sharedaccesskey={KEY}", "hub1", "ok"),
    (
        "duplicate-key",
        f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY};SharedAccessKey={KEY}",
        "hub1",
        "refuse:SharedAccessKey",
    ),
    (
        "duplicate-key-case",
        f"Endpoint={NS};SharedAccessKeyName=send;sharedaccesskey={KEY};SharedAccessKey=x",
        "hub1",
        "refuse:SharedAccessKey",
    ),
    (
        "space-in-key",
        f"Endpoint={NS}; SharedAccessKeyName=send;SharedAccessKey={KEY}",
        "hub1",
        "refuse:SharedAccessKeyName",
    ),
    ("empty-value", f"Endpoint={NS};SharedAccessKeyName=;SharedAccessKey={KEY}", "hub1", "refuse:segment 2"),
    ("not-key-value", "this is not a connection string", "hub1", "refuse:segment 1"),
    ("no-endpoint", f"SharedAccessKeyName=send;SharedAccessKey={KEY}", "hub1", "refuse:Endpoint"),
    ("key-without-name", f"Endpoint={NS};SharedAccessKey={KEY}", "hub1", "refuse:SharedAccessKeyName"),
    ("name-without-key", f"Endpoint={NS};SharedAccessKeyName=send", "hub1", "refuse:SharedAccessKey"),
    ("no-credential", f"Endpoint={NS};EntityPath=hub1", None, "refuse:SharedAccessKey"),
    ("sas", f"Endpoint={NS};SharedAccessSignature={SAS}", "hub1", "ok"),
    ("sas-lowercase-key", f"Endpoint={NS};sharedaccesssignature={SAS}", "hub1", "ok"),
    (
        "sas-and-key",
        f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY};SharedAccessSignature={SAS}",
        "hub1",
        "refuse:SharedAccessSignature",
    ),
    ("sas-odd", f"Endpoint={NS};SharedAccessSignature=sr%3Dx", "hub1", "warn:SharedAccessSignature"),
    ("key-not-base64", f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey=%%not-base64%%", "hub1", "warn:base64"),
    ("hub-from-option", f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY}", "hub1", "ok"),
    (
        "hub-conflict",
        f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY};EntityPath=hub1",
        "other",
        "refuse:--event-hub",
    ),
    ("no-hub", f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY}", None, "refuse:--event-hub"),
    ("odd-hub-name", f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey={KEY}", "hub one", "warn:--event-hub"),
]
DMREPL_ONLY = {"emulator-public", "hub-conflict", "sas-and-key"}


def sdk_refuses(conn: str, hub: str | None) -> bool:
    from azure.eventhub import EventHubProducerClient

    try:
        EventHubProducerClient.from_connection_string(conn, eventhub_name=hub)
    except ValueError:
        return True
    return False


def test_dmrepl_own_rules_are_only_those() -> None:
    """The exceptions are real: the SDK accepts each of them (else they would not need listing)."""
    assert all(not sdk_refuses(conn, hub) for case, conn, hub, _ in ROWS if case in DMREPL_ONLY)


@pytest.mark.parametrize(("case", "conn", "hub", "verdict"), ROWS, ids=[r[0] for r in ROWS])
def test_connection_strings_as_the_sdk_takes_them(cli, datamart, tmp_path: Path, case, conn, hub, verdict) -> None:
    path = tmp_path / "credentials.txt"
    path.write_text(conn)
    refused_by_sdk = sdk_refuses(conn, hub)
    kind, _, word = verdict.partition(":")
    if case not in DMREPL_ONLY:
        assert refused_by_sdk == (kind == "refuse"), f"{case}: the table disagrees with the SDK"
    extra = ["--event-hub", hub] if hub else []
    result = cli(
        "--json",
        "create",
        "--type",
        "azure-event-hubs",
        "--name",
        "eh",
        "--credentials",
        path,
        *extra,
        expect=4 if kind == "refuse" else 0,
    )
    if kind == "refuse":
        error = json.loads(result.stderr)["error"]
        assert error["code"] == "INVALID_CREDENTIALS"
        assert word in [d["field"] for d in error["details"]] or word in error["message"], error
        assert cli("--json", "list").stdout.strip() == "[]"
    else:
        warnings = json.loads(result.stdout)["warnings"]
        assert (kind == "warn") == bool(warnings), warnings
        if kind == "warn":
            assert any(word in w for w in warnings), warnings
    if KEY in conn:
        assert KEY not in result.stdout + result.stderr


def test_a_warning_is_shown_on_stderr_and_the_replication_saved(cli, datamart, tmp_path: Path) -> None:
    path = tmp_path / "credentials.txt"
    path.write_text(f"Endpoint={NS};SharedAccessKeyName=send;SharedAccessKey=%%not-base64%%;EntityPath=hub1")
    result = cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", path)
    assert "warning: SharedAccessKey: is not base64" in result.stderr
    assert "created rep-" in result.stdout
    assert "%%not-base64%%" not in result.stdout + result.stderr
