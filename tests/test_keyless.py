"""Keyless identities end to end: google-auth and azure-identity, unmocked, against loopback identity endpoints.

Google: Application Default Credentials from a metadata-server stand-in (`GCE_METADATA_HOST`, read by google-auth at
import: so those runs are real `dmrepl` processes) and a workload identity federation (`external_account`) file whose
subject token is exchanged at a loopback STS endpoint; Pub/Sub is Google's own pstest. Azure: a managed identity
(App Service-style endpoint) and DefaultAzureCredential, whose JWTs the Event Hubs peer verifies (signature,
audience, expiry), on a namespace that refuses SAS ("local") authentication.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA_DIR, Cli
from tests.peers.eventhubs import EventHubsPeer
from tests.peers.fixtures_pubsub import PubSubTopic
from tests.peers.identity import IdentityServer
from tests.peers.pubsub import PstestServer

EXPORT = DATA_DIR / "userpoints-v202205.ndjson"
HUB = "hub1"
IDENTITY_ENV = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GCE_METADATA_HOST",
    "GCE_METADATA_IP",
    "NO_GCE_CHECK",
)


@pytest.fixture(autouse=True)
def no_ambient_identity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the identities a test sets up: none from the machine running the tests."""
    for name in IDENTITY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud user credentials
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path / "azure"))  # no `az login`


@pytest.fixture
def identity() -> Iterator[IdentityServer]:
    with IdentityServer() as server:
        yield server


@pytest.fixture
def entra_peer(identity: IdentityServer) -> Iterator[EventHubsPeer]:
    """A namespace that takes only Entra ID tokens from `identity`, as one whose policy disables SAS."""
    with EventHubsPeer(hubs={HUB: 4}, jwt_key=identity.jwt_key, local_auth=False) as peer:
        yield peer


def namespace(peer: EventHubsPeer) -> str:
    return peer.endpoint.split("//", 1)[1].strip("/")


def operations_in(export: Path) -> int:
    """The operations an export must produce, counted by the independent generator's golden file."""
    golden = DATA_DIR / "userpoints-v202205.operations.ndjson"
    return sum(1 for line in golden.read_text(encoding="utf-8").splitlines() if line.strip())


# -- Azure: managed identity and DefaultAzureCredential ---------------------------------------------------------------


@pytest.mark.parametrize("auth", ["managed-identity", "default"])
def test_keyless_event_hubs_activate_and_sync(
    auth: str,
    cli: Cli,
    datamart: str,
    identity: IdentityServer,
    entra_peer: EventHubsPeer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in identity.managed_identity_env().items():
        monkeypatch.setenv(name, value)
    created = json.loads(
        cli(
            "--json", "create", "--type", "azure-event-hubs", "--name", "eh", "--auth", auth,
            "--namespace", namespace(entra_peer), "--event-hub", HUB,
        ).stdout
    )  # fmt: skip
    assert created["settings"] == {"auth": auth, "namespace": namespace(entra_peer), "event_hub": HUB}
    assert created["credentials"] is None  # nothing stored: the identity is the machine's
    shown = cli("activate", "eh").stdout
    principal = identity.system_client_id
    assert f"Entra ID token for {principal}" in shown, shown
    assert f"Entra ID token (jwt) of {principal}" in shown, shown
    cli("sync", "start", EXPORT)
    assert entra_peer.event_count(HUB) == operations_in(EXPORT)
    assert {s.service for s in identity.seen} == {"managed-identity"}
    assert {s.detail["resource"].rstrip("/") for s in identity.seen} == {"https://eventhubs.azure.net"}


@pytest.mark.parametrize(
    ("knob", "value", "why"),
    [("token_lifetime_s", -120, "ExpiredToken"), ("audience_override", "https://storage.azure.com", "InvalidAudience")],
)
def test_a_refused_entra_token_is_auth_failed_naming_the_principal(
    knob: str,
    value: Any,
    why: str,
    cli: Cli,
    datamart: str,
    identity: IdentityServer,
    entra_peer: EventHubsPeer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, env_value in identity.managed_identity_env().items():
        monkeypatch.setenv(name, env_value)
    setattr(identity, knob, value)
    client_id = "11111111-2222-3333-4444-555555555555"
    cli(
        "create", "--type", "azure-event-hubs", "--name", "eh", "--auth", "managed-identity",
        "--client-id", client_id, "--namespace", namespace(entra_peer), "--event-hub", HUB,
    )  # fmt: skip
    failed = cli("activate", "eh", expect=5)
    assert re.search(r"^cbs-auth\s+FAILED \(AUTH_FAILED\)", failed.stderr, re.MULTILINE), failed.stderr
    assert f"refused the Entra ID token of {client_id}" in failed.stderr
    assert why in failed.stderr
    assert json.loads(cli("--json", "show", "eh").stdout)["status"] == "PAUSED"
    assert entra_peer.event_count() == 0


def test_sas_on_a_namespace_without_local_auth_names_auth(
    cli: Cli, datamart: str, entra_peer: EventHubsPeer, tmp_path: Path
) -> None:
    conn = tmp_path / "credentials.txt"
    conn.write_text(entra_peer.connection_string("send", HUB) + "\n", encoding="utf-8")
    cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", conn)
    failed = cli("activate", "eh", expect=5)
    assert "LocalAuthDisabled" in failed.stderr
    assert "--auth managed-identity, service-principal or default" in failed.stderr
    assert entra_peer.policies["send"] not in failed.stdout + failed.stderr


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--auth", "managed-identity", "--event-hub", HUB], "--namespace"),
        (["--auth", "managed-identity", "--namespace", "ns.servicebus.windows.net"], "--event-hub"),
        (["--auth", "default", "--namespace", "ns.servicebus.windows.net", "--event-hub", HUB, "--client-id", "x"],
         "--client-id"),
        (["--auth", "service-principal", "--namespace", "ns.servicebus.windows.net", "--event-hub", HUB],
         "--credentials"),
        (["--namespace", "ns.servicebus.windows.net"], "--namespace"),
    ],
)  # fmt: skip
def test_keyless_settings_are_validated_offline(cli: Cli, datamart: str, args: list[str], field: str) -> None:
    failed = cli("create", "--type", "azure-event-hubs", "--name", "eh", *args, expect=4)
    assert f"{field}:" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert json.loads(cli("--json", "list").stdout) == []


def test_service_principal_file_defects_are_named_and_nothing_echoed(cli: Cli, datamart: str, tmp_path: Path) -> None:
    password = "Zq8~fake.client-secret-value_0123456789"
    sp = tmp_path / "sp.json"
    sp.write_text(json.dumps({"appId": "not-a-guid", "password": password, "certificate": "x"}), encoding="utf-8")
    failed = cli(
        "create", "--type", "azure-event-hubs", "--name", "eh", "--auth", "service-principal",
        "--namespace", "ns.servicebus.windows.net", "--event-hub", HUB, "--credentials", sp, expect=4,
    )  # fmt: skip
    for named in ("tenant: is missing", "appId: must be an application (client) id", "password: and certificate"):
        assert named in failed.stderr, failed.stderr
    assert password not in failed.stdout + failed.stderr
    assert json.loads(cli("--json", "list").stdout) == []


def test_service_principal_secret_goes_to_the_secret_store_only(
    cli: Cli, datamart: str, tmp_path: Path, isolated: Path
) -> None:
    password = "Zq8~fake.client-secret-value_0123456789"
    tenant, app_id = "72f988bf-86f1-41af-91ab-2d7cd011db47", "22222222-3333-4444-5555-666666666666"
    sp = tmp_path / "sp.json"
    sp.write_text(json.dumps({"tenant": tenant, "appId": app_id, "password": password}), encoding="utf-8")
    created = cli(
        "--json", "create", "--type", "azure-event-hubs", "--name", "eh", "--auth", "service-principal",
        "--namespace", "ns.servicebus.windows.net", "--event-hub", HUB, "--credentials", sp,
    )  # fmt: skip
    rep = json.loads(created.stdout)
    assert rep["settings"]["client_id"] == app_id and rep["settings"]["tenant_id"] == tenant
    assert rep["credentials"]["fingerprint"]["client_id"] == app_id
    assert password not in created.stdout + created.stderr
    for path in isolated.rglob("*"):
        if path.is_file():
            assert password not in path.read_text(encoding="utf-8", errors="replace"), path
    keyring_file = Path(os.environ["DMREPL_TEST_KEYRING"])
    assert password in keyring_file.read_text(encoding="utf-8")  # the positive control: it is stored, there


# -- Google: Application Default Credentials (metadata server) and workload identity federation ---------------------


def google_env(identity: IdentityServer, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in IDENTITY_ENV}
    return {**env, **identity.metadata_env(), "DMREPL_HOME": str(home)}


def test_adc_from_the_metadata_server_activates_and_syncs(
    pstest_server: PstestServer, pubsub_topic: PubSubTopic, identity: IdentityServer, isolated: Path, run_dmrepl: Any
) -> None:
    env = google_env(identity, isolated)
    run = lambda *a: run_dmrepl(*a, env=env)  # noqa: E731
    assert run("datamart", "add", "dm1", "--system-version", "v202205").returncode == 0
    created = run(
        "--json", "create", "--type", "google-pubsub", "--name", "ps", "--credentials", "adc",
        "--project-id", pubsub_topic.project_id, "--topic-id", pubsub_topic.topic_id,
        "--endpoint", pstest_server.addr,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    rep = json.loads(created.stdout)
    assert rep["settings"]["credentials"] == "adc" and rep["credentials"] is None
    activated = run("activate", "ps")
    assert activated.returncode == 0, activated.stderr
    assert f"for {identity.email}" in activated.stdout
    assert f"the metadata server ({identity.host})" in activated.stdout
    synced = run("sync", "start", EXPORT)
    assert synced.returncode == 0, synced.stderr
    assert len(pubsub_topic.pull(expected=operations_in(EXPORT))) == operations_in(EXPORT)
    tokens = [s for s in identity.seen if s.path.endswith("/token")]
    assert tokens and all(s.status == 200 for s in tokens)


def test_adc_without_any_identity_fails_the_check_clearly(
    pubsub_topic: PubSubTopic, pstest_server: PstestServer, isolated: Path, run_dmrepl: Any, closed_port: int
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in IDENTITY_ENV}
    env.update(DMREPL_HOME=str(isolated), GCE_METADATA_HOST=f"127.0.0.1:{closed_port}",
               GCE_METADATA_IP=f"127.0.0.1:{closed_port}")  # fmt: skip
    assert run_dmrepl("datamart", "add", "dm1", "--system-version", "v202205", env=env).returncode == 0
    created = run_dmrepl(
        "create", "--type", "google-pubsub", "--name", "ps", "--credentials", "adc", "--check",
        "--project-id", pubsub_topic.project_id, "--topic-id", pubsub_topic.topic_id,
        "--endpoint", pstest_server.addr, env=env,
    )  # fmt: skip
    assert created.returncode == 5, created.stderr
    assert "Application Default Credentials" in created.stderr
    assert "Traceback" not in created.stderr


def external_account(identity: IdentityServer, tmp_path: Path) -> Path:
    subject = tmp_path / "subject-token"
    subject.write_text(identity.sts_subject_token, encoding="utf-8")
    config = {
        "type": "external_account",
        "audience": identity.sts_audience,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": identity.sts_url,
        "credential_source": {"file": str(subject)},
    }
    path = tmp_path / "wif.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_workload_identity_federation_file_activates_and_syncs(
    cli: Cli,
    datamart: str,
    pstest_server: PstestServer,
    pubsub_topic: PubSubTopic,
    identity: IdentityServer,
    tmp_path: Path,
) -> None:
    config = external_account(identity, tmp_path)
    created = json.loads(
        cli(
            "--json", "create", "--type", "google-pubsub", "--name", "ps", "--credentials", config,
            "--project-id", pubsub_topic.project_id, "--topic-id", pubsub_topic.topic_id,
            "--endpoint", pstest_server.addr,
        ).stdout
    )  # fmt: skip
    assert created["credentials"]["fingerprint"]["type"] == "external_account"
    assert created["credentials"]["fingerprint"]["audience"] == identity.sts_audience
    shown = cli("activate", "ps").stdout
    assert f"{identity.sts_url} (subject token from {tmp_path / 'subject-token'})" in shown, shown
    cli("sync", "start", EXPORT)
    assert len(pubsub_topic.pull(expected=operations_in(EXPORT))) == operations_in(EXPORT)
    exchanges = [s for s in identity.seen if s.service == "sts"]
    assert exchanges and all(s.status == 200 and s.detail["audience"] == identity.sts_audience for s in exchanges)


def test_a_wrong_subject_token_fails_the_token_step(
    cli: Cli, datamart: str, pstest_server: PstestServer, pubsub_topic: PubSubTopic, identity: IdentityServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    config = external_account(identity, tmp_path)
    (tmp_path / "subject-token").write_text("someone-else", encoding="utf-8")
    cli(
        "create", "--type", "google-pubsub", "--name", "ps", "--credentials", config,
        "--project-id", pubsub_topic.project_id, "--topic-id", pubsub_topic.topic_id,
        "--endpoint", pstest_server.addr,
    )  # fmt: skip
    failed = cli("activate", "ps", expect=5)
    assert re.search(r"^token\s+FAILED \(AUTH_FAILED\)", failed.stderr, re.MULTILINE), failed.stderr
    assert "invalid_grant" in failed.stderr
    assert [s.status for s in identity.seen if s.service == "sts"] == [400]


@pytest.mark.parametrize(
    ("drop", "field"),
    [("audience", "audience"), ("credential_source", "credential_source"), ("token_url", "token_url")],
)
def test_external_account_defects_are_named(
    cli: Cli, datamart: str, identity: IdentityServer, tmp_path: Path, drop: str, field: str
) -> None:
    config = external_account(identity, tmp_path)
    info = json.loads(config.read_text(encoding="utf-8"))
    del info[drop]
    config.write_text(json.dumps(info), encoding="utf-8")
    failed = cli(
        "create", "--type", "google-pubsub", "--name", "ps", "--credentials", config, "--topic-id", "t",
        "--project-id", "p", expect=4,
    )  # fmt: skip
    assert f"{field}: is missing" in failed.stderr
    assert json.loads(cli("--json", "list").stdout) == []


def test_module_imports_stay_lazy() -> None:
    code = (
        "import dmrepl.destinations.eventhubs, dmrepl.destinations.pubsub, sys; print('azure.identity' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_recreate_from_sas_to_a_managed_identity_drops_the_stored_secret(
    cli: Cli, datamart: str, identity: IdentityServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in identity.managed_identity_env().items():
        monkeypatch.setenv(name, value)
    with EventHubsPeer(hubs={HUB: 2}, jwt_key=identity.jwt_key) as peer:  # SAS and Entra ID both allowed
        conn = tmp_path / "credentials.txt"
        conn.write_text(peer.connection_string("send", HUB) + "\n", encoding="utf-8")
        cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", conn)
        keyring_file = Path(os.environ["DMREPL_TEST_KEYRING"])
        assert peer.policies["send"] in keyring_file.read_text(encoding="utf-8")
        rebound = json.loads(
            cli(
                "--json", "recreate", "eh", "--auth", "managed-identity", "--namespace", namespace(peer),
                "--event-hub", HUB,
            ).stdout
        )  # fmt: skip
        assert rebound["credentials"] is None and rebound["settings"]["auth"] == "managed-identity"
        assert peer.policies["send"] not in keyring_file.read_text(encoding="utf-8")
        cli("activate", "eh")
        cli("sync", "start", EXPORT)
        assert peer.event_count(HUB) == operations_in(EXPORT)


def test_rotate_to_another_managed_identity_keeps_the_replication_active(
    cli: Cli, datamart: str, identity: IdentityServer, entra_peer: EventHubsPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in identity.managed_identity_env().items():
        monkeypatch.setenv(name, value)
    cli(
        "create", "--type", "azure-event-hubs", "--name", "eh", "--auth", "managed-identity",
        "--namespace", namespace(entra_peer), "--event-hub", HUB,
    )  # fmt: skip
    cli("activate", "eh")
    other = "33333333-4444-5555-6666-777777777777"
    rotated = json.loads(cli("--json", "rotate", "eh", "--auth", "managed-identity", "--client-id", other).stdout)
    assert rotated["status"] == "ACTIVE" and rotated["settings"]["client_id"] == other
    cli("sync", "start", EXPORT)
    assert entra_peer.event_count(HUB) == operations_in(EXPORT)
    asked = [(s.status, s.detail["client_id"]) for s in identity.seen if s.service == "managed-identity"]
    assert asked[0] == (200, None) and asked[-1] == (200, other)  # the system identity, then the other one


@pytest.fixture
def entra() -> Iterator[IdentityServer]:
    """Entra ID's token endpoint over https (a test CA), for the service-principal flow."""
    with IdentityServer(tls=True, service_principals={SP_APP_ID: SP_PASSWORD}) as server:
        yield server


SP_APP_ID = "22222222-3333-4444-5555-666666666666"
SP_PASSWORD = "Zq8~fake.client-secret-value_0123456789"


def test_service_principal_gets_an_entra_token_over_https_then_activates_and_syncs(
    cli: Cli, datamart: str, entra: IdentityServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", entra.authority_host)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", entra.ca_file)
    sp = tmp_path / "sp.json"
    sp.write_text(json.dumps({"tenant": entra.tenant_id, "appId": SP_APP_ID, "password": SP_PASSWORD}), "utf-8")
    with EventHubsPeer(hubs={HUB: 4}, jwt_key=entra.jwt_key, local_auth=False) as peer:
        created = cli(
            "create", "--type", "azure-event-hubs", "--name", "eh", "--auth", "service-principal",
            "--namespace", namespace(peer), "--event-hub", HUB, "--credentials", sp,
        )  # fmt: skip
        shown = cli("activate", "eh")
        assert f"Entra ID token for {SP_APP_ID} (tenant {entra.tenant_id})" in shown.stdout, shown.stdout
        assert f"from service principal {SP_APP_ID} of tenant {entra.tenant_id}" in shown.stdout
        cli("sync", "start", EXPORT)
        assert peer.event_count(HUB) == operations_in(EXPORT)
    grants = [(s.status, s.detail["client_id"]) for s in entra.seen if s.path.endswith("/token")]
    assert grants and all(g == (200, SP_APP_ID) for g in grants)
    for text in (created.stdout, created.stderr, shown.stdout, shown.stderr):
        assert SP_PASSWORD not in text


def _activate_fails_at_token(cli: Cli, sp: Path) -> Any:
    """A service principal replication created from `sp`: its activation fails at the token step (exit 5)."""
    cli(
        "create", "--type", "azure-event-hubs", "--name", "eh", "--auth", "service-principal",
        "--namespace", "127.0.0.1:9", "--event-hub", HUB, "--credentials", sp,
    )  # fmt: skip
    failed = cli("activate", "eh", expect=5)
    assert re.search(r"^token\s+FAILED \(AUTH_FAILED\)", failed.stderr, re.MULTILINE), failed.stderr
    return failed


def test_a_wrong_client_secret_fails_the_token_step_naming_the_principal(
    cli: Cli, datamart: str, entra: IdentityServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", entra.authority_host)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", entra.ca_file)
    wrong = "Zq8~a-revoked-client-secret-000000000000"
    sp = tmp_path / "sp.json"
    sp.write_text(json.dumps({"tenant": entra.tenant_id, "appId": SP_APP_ID, "password": wrong}), "utf-8")
    failed = _activate_fails_at_token(cli, sp)
    assert f"service principal {SP_APP_ID} of tenant {entra.tenant_id} gave no token" in failed.stderr
    assert "AADSTS7000215" in failed.stderr and wrong not in failed.stderr


def test_a_certificate_azure_identity_cannot_read_fails_the_token_step_without_a_traceback(
    cli: Cli, datamart: str, tmp_path: Path
) -> None:
    garbage = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    pem = garbage + "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    sp = tmp_path / "sp.json"
    sp.write_text(
        json.dumps({"tenant": "72f988bf-86f1-41af-91ab-2d7cd011db47", "appId": SP_APP_ID, "certificate": pem})
    )
    failed = _activate_fails_at_token(cli, sp)
    assert "identity cannot be used" in failed.stderr and "Traceback" not in failed.stderr
    assert "bm90IGEga2V5" not in failed.stdout + failed.stderr
