"""Credentials that expire are seen before they bite: a SAS connection string's `se=`, a service-account key's
certificate (`notAfter`, fetched from the key's `client_x509_cert_url` and matched against the key), and `--expires`.

Dates are relative to now (a SAS that expires in 3 days, one that expired yesterday), or given to an explicit clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from dmrepl import replications
from dmrepl.destinations import pubsub
from dmrepl.models import Replication, Status, iso
from tests.conftest import Cli
from tests.factories import sas_key, service_account
from tests.peers.eventhubs import EventHubsPeer
from tests.test_output import in_pipe, on_terminal, tsv, visible_lines

HUB = "hub1"


def sas_connection_string(endpoint: str, policy: str, key: str, expiry: int, hub: str = HUB) -> str:
    """A connection string carrying a SharedAccessSignature signed for real with `key`, valid until `expiry`."""
    sr = quote_plus(f"{endpoint}{hub}")
    sig = base64.b64encode(hmac.new(key.encode(), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
    token = f"SharedAccessSignature sr={sr}&sig={quote_plus(sig)}&se={expiry}&skn={policy}"
    return f"Endpoint={endpoint};SharedAccessSignature={token};EntityPath={hub};UseDevelopmentEmulator=true"


def write(path: Path, text: str) -> Path:
    path.write_text(text + "\n", encoding="utf-8")
    return path


def whole_second(delta: timedelta) -> datetime:
    return datetime.fromtimestamp(int((datetime.now(UTC) + delta).timestamp()), UTC)


# -- SAS: se= ----------------------------------------------------------------------------------------------------------


def test_a_sas_expiring_in_3_days_is_warned_about_by_list_show_and_check(
    cli: Cli, datamart: str, eventhubs_peer: EventHubsPeer, tmp_path: Path
) -> None:
    expiry = whole_second(timedelta(days=3))
    conn = sas_connection_string(
        eventhubs_peer.endpoint, "send", eventhubs_peer.policies["send"], int(expiry.timestamp())
    )
    created = json.loads(
        cli(
            "--json",
            "create",
            "--type",
            "azure-event-hubs",
            "--name",
            "eh",
            "--credentials",
            write(tmp_path / "c", conn),
        ).stdout
    )
    assert created["credentials_expire_at"] == iso(expiry)
    assert created["credentials_expiry_source"] == "SharedAccessSignature se="
    assert any("expire at" in w for w in created["warnings"])

    shown = cli("show", "eh")
    assert re.search(rf"^warning: eh \(rep-[0-9a-f]{{8}}\): the credentials expire at {iso(expiry)}", shown.stderr)
    assert "in 2 days" in shown.stderr or "in 3 days" in shown.stderr
    assert f"dmrepl rotate {created['id']} --credentials FILE" in shown.stderr
    assert iso(expiry) in shown.stdout  # "credentials expire" line

    checked = cli("check", "eh")  # a valid SAS: the check passes, with the warning first
    assert checked.stderr.startswith("warning: eh") and re.search(r"^cbs-auth\s+ok", checked.stdout, re.MULTILINE)
    as_json = json.loads(cli("--json", "check", "eh").stdout)
    assert as_json["credentials_expire_at"] == iso(expiry) and len(as_json["warnings"]) == 1

    header, row = tsv(in_pipe("list"))[:2]
    record = dict(zip(header, row, strict=True))
    assert record["STATUS"] == f"PAUSED (expires {expiry:%Y-%m-%d})"
    assert "warning: eh" in in_pipe("list").decode()
    lines = visible_lines(on_terminal("list", columns=80))
    table = [line for line in lines if not line.startswith("warning:") and line.strip()]
    assert any(line.startswith("warning: eh") for line in lines), lines
    assert all(len(line) <= 80 for line in table), table
    assert f"(expires {expiry:%Y-%m-%d})" in table[-1] and created["id"] in table[-1], table
    assert json.loads(cli("--json", "list").stdout)[0]["credentials_expire_at"] == iso(expiry)


def test_an_expired_sas_fails_check_and_activate_with_exit_5_before_any_network_call(
    cli: Cli, datamart: str, closed_port: int, tmp_path: Path
) -> None:
    """The endpoint is a closed port: had the check gone to the network, its step would be cbs-auth UNREACHABLE."""
    expiry = whole_second(-timedelta(days=1))
    conn = sas_connection_string(f"sb://127.0.0.1:{closed_port}/", "send", sas_key(), int(expiry.timestamp()))
    created = cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", write(tmp_path / "c", conn))
    assert f"warning: the credentials expired at {iso(expiry)}" in created.stderr

    start = time.monotonic()
    error = json.loads(cli("--json", "check", "eh", expect=5).stderr)["error"]
    assert time.monotonic() - start < 5
    assert error["code"] == "CHECK_FAILED" and iso(expiry) in error["message"]
    assert [(s["name"], s["status"], s["code"]) for s in error["details"]] == [
        ("credentials-expiry", "failed", "CREDENTIALS_EXPIRED")
    ]
    human = cli("check", "eh", expect=5).stderr
    assert human.startswith("warning: eh") and "expired at" in human
    assert re.search(r"^credentials-expiry\s+FAILED \(CREDENTIALS_EXPIRED\)", human, re.MULTILINE), human
    assert json.loads(cli("--json", "activate", "eh", expect=5).stderr)["error"]["details"][0]["name"] == (
        "credentials-expiry"
    )
    rep = json.loads(cli("--json", "show", "eh").stdout)
    assert rep["status"] == "PAUSED" and rep["last_check"]["ok"] is False
    header, row = tsv(in_pipe("list"))[:2]
    assert dict(zip(header, row, strict=True))["STATUS"] == "PAUSED (EXPIRED)"
    bundle = json.loads(cli("support-bundle", "eh").stdout)  # what a support engineer is sent
    assert bundle["replication"]["credentials_expire_at"] == iso(expiry)


def test_a_key_never_expires_by_itself(cli: Cli, datamart: str, eventhubs_peer: EventHubsPeer, tmp_path: Path) -> None:
    conn = eventhubs_peer.connection_string("send", HUB)
    cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", write(tmp_path / "c", conn))
    rep = json.loads(cli("--json", "show", "eh").stdout)
    assert rep["credentials_expire_at"] is None  # null, not absent
    assert "warning" not in cli("show", "eh").stderr + cli("check", "eh").stderr
    assert "expires" not in in_pipe("list").decode()


# -- --expires ---------------------------------------------------------------------------------------------------------


def test_expires_is_stored_warned_about_within_14_days_and_validated(cli: Cli, datamart: str, tmp_path: Path) -> None:
    soon = (datetime.now(UTC) + timedelta(days=10)).date()
    later = (datetime.now(UTC) + timedelta(days=30)).date()
    out = tmp_path / "out.ndjson"
    created = json.loads(
        cli("--json", "create", "--type", "file", "--name", "f", "--path", out, "--expires", str(soon)).stdout
    )
    assert created["credentials_expire_at"] == f"{soon}T00:00:00.000Z"
    assert created["credentials_expiry_source"] == "--expires"
    assert "warning: f (" in cli("show", "f").stderr

    cli("recreate", "f", "--expires", f"{later}T12:00:00+02:00")
    rep = json.loads(cli("--json", "show", "f").stdout)
    assert rep["credentials_expire_at"] == f"{later}T10:00:00.000Z"
    assert "warning" not in cli("show", "f").stderr

    yesterday = (datetime.now(UTC) - timedelta(days=1)).date()
    for bad, why in ((str(yesterday), "is in the past"), ("next tuesday", "is not a date")):
        result = cli("create", "--type", "file", "--name", "g", "--path", out, "--expires", bad, expect=4)
        assert "--expires: " in result.stderr and why in result.stderr
    assert [r["name"] for r in json.loads(cli("--json", "list").stdout)] == ["f"]


def test_rotate_takes_expires_and_a_new_secret_forgets_the_old_expiry(
    cli: Cli, datamart: str, eventhubs_peer: EventHubsPeer, tmp_path: Path
) -> None:
    expiry = whole_second(timedelta(days=2))
    key = eventhubs_peer.policies["send"]
    conn = sas_connection_string(eventhubs_peer.endpoint, "send", key, int(expiry.timestamp()))
    cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", write(tmp_path / "c", conn))
    assert json.loads(cli("--json", "show", "eh").stdout)["credentials_expire_at"] == iso(expiry)

    keyed = write(tmp_path / "k", eventhubs_peer.connection_string("send", HUB))
    rotated = json.loads(cli("--json", "rotate", "eh", "--credentials", keyed).stdout)
    assert rotated["credentials_expire_at"] is None and rotated["warnings"] == []

    until = (datetime.now(UTC) + timedelta(days=5)).date()
    rotated = json.loads(cli("--json", "rotate", "eh", "--credentials", keyed, "--expires", str(until)).stdout)
    assert rotated["credentials_expire_at"] == f"{until}T00:00:00.000Z"
    assert rotated["credentials_expiry_source"] == "--expires"


# -- the clock ---------------------------------------------------------------------------------------------------------


def _rep(expire_at: datetime | None) -> Replication:
    rep = Replication(
        id="rep-0000abcd", name="r", type="file", datamart="dm1", status=Status.ACTIVE, created_at="", updated_at=""
    )
    rep.credentials_expire_at = iso(expire_at) if expire_at else None
    rep.credentials_expiry_source = "--expires"
    return rep


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        (timedelta(days=15), None),
        (timedelta(days=14, seconds=1), None),
        (timedelta(days=14), "expiring"),
        (timedelta(hours=1), "expiring"),
        (timedelta(0), "expired"),
        (-timedelta(days=1), "expired"),
    ],
)
def test_the_14_day_window_on_an_injected_clock(left: timedelta, expected: str | None) -> None:
    now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    rep = _rep(now + left)
    status = replications.expiry_status(rep, now=now)
    assert (status[0] if status else None) == expected
    warning = replications.expiry_warning(rep, now=now)
    assert (warning is not None) == (expected is not None)
    if expected == "expired":
        assert warning and "expired at" in warning
    assert replications.expiry_status(_rep(None), now=now) is None


# -- a service-account key's certificate -------------------------------------------------------------------------------


def certificate(key: rsa.RSAPrivateKey, not_after: datetime) -> str:
    """A self-signed x509 certificate of `key`, as Google publishes one per service-account key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replicator@dmrepl-test.iam.gserviceaccount.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - timedelta(days=3650))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def cert_server() -> Iterator[dict[str, Any]]:
    """`http://127.0.0.1:PORT/x509`: Google's robot metadata endpoint in miniature (key id → PEM certificate)."""
    published: dict[str, Any] = {"certs": {}, "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            published["hits"] += 1
            body = json.dumps(published["certs"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    published["url"] = f"http://127.0.0.1:{server.server_address[1]}/x509"
    yield published
    server.shutdown()
    server.server_close()


def test_a_service_account_key_expires_when_its_published_certificate_does(cert_server: dict[str, Any]) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    kid = "0123456789abcdef0123456789abcdef01234567"
    not_after = whole_second(timedelta(days=9))
    info = service_account(private_key=pem, private_key_id=kid, client_x509_cert_url=cert_server["url"])
    secret = json.dumps(info)
    settings = {"project_id": "dmrepl-test", "topic_id": "t", "ordering": True}

    assert pubsub.TYPE.expires_at(settings, secret) is None  # offline: a key file does not say
    assert cert_server["hits"] == 0
    assert pubsub.TYPE.expires_at(settings, secret, fetch_timeout_s=5) is None  # nothing published for the key

    cert_server["certs"] = {kid: certificate(key, not_after)}
    at, source = pubsub.TYPE.expires_at(settings, secret, fetch_timeout_s=5) or (None, "")
    assert at == not_after and kid[:12] in source

    # A certificate of another key under this key's id is not believed.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert_server["certs"] = {kid: certificate(other, not_after)}
    assert pubsub.TYPE.expires_at(settings, secret, fetch_timeout_s=5) is None
    # Nor is one fetched over plain http from anywhere but loopback (never even asked).
    hits = cert_server["hits"]
    remote = json.dumps(info | {"client_x509_cert_url": "http://certs.example.com/x509"})
    assert pubsub.TYPE.expires_at(settings, remote, fetch_timeout_s=5) is None
    assert cert_server["hits"] == hits


def test_check_records_the_certificate_expiry_of_a_service_account_key(
    cli: Cli,
    datamart: str,
    pubsub_topic: Any,
    token_server: Any,
    cert_server: dict[str, Any],
    tmp_path: Path,
) -> None:
    """End to end, against the Pub/Sub peer and a real token endpoint: the key passes the check, and its
    certificate, published at its client_x509_cert_url, says it expires in 10 days."""
    from tests.peers.pubsub import make_service_account

    kid = "f" * 40
    info, pem = make_service_account(token_server.url, kid, project_id=pubsub_topic.project_id)
    token_server.register(kid, pem)
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    not_after = whole_second(timedelta(days=10))
    cert_server["certs"] = {kid: certificate(key, not_after)}
    creds = tmp_path / "key.json"
    creds.write_text(json.dumps(info | {"client_x509_cert_url": cert_server["url"]}))
    base = ("create", "--type", "google-pubsub", "--topic-id", pubsub_topic.topic_id, "--endpoint", pubsub_topic.addr)

    unchecked = json.loads(cli("--json", *base, "--name", "ps0", "--credentials", creds).stdout)
    assert unchecked["credentials_expire_at"] is None and cert_server["hits"] == 0  # offline, nothing known

    created = json.loads(cli("--json", *base, "--name", "ps", "--credentials", creds, "--check").stdout)
    assert created["credentials_expire_at"] == iso(not_after)
    assert created["credentials_expiry_source"] == f"certificate of key {kid[:12]}"
    assert any("expire at" in w for w in created["warnings"])

    checked = cli("check", "ps0")  # the check of the first one learns it too
    assert re.search(r"^token\s+ok", checked.stdout, re.MULTILINE), checked.stdout
    assert json.loads(cli("--json", "show", "ps0").stdout)["credentials_expire_at"] == iso(not_after)
    assert "warning: ps0" in cli("show", "ps0").stderr
