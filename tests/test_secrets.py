"""Secrets go to the keyring or, opted in, to 0600 files; never to the registry or any output."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import keyring
import pytest
from keyring.backends import fail

from tests.factories import connection_string, rsa_pem, sas_key, service_account_json

KEY = sas_key()


@pytest.fixture
def eh_credentials(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.txt"
    path.write_text(connection_string(key=KEY, hub="hub1"))
    return path


def test_secret_goes_to_the_keyring(cli, datamart, eh_credentials: Path, isolated: Path) -> None:
    rep = json.loads(
        cli("--json", "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", eh_credentials).stdout
    )
    assert rep["credentials"]["store"] == "keyring"
    stored = keyring.get_password("dmrepl", rep["credentials"]["ref"])
    assert stored is not None and KEY in stored
    assert not (isolated / "secrets").exists()
    cli("delete", "eh", "--yes")
    assert keyring.get_password("dmrepl", rep["credentials"]["ref"]) is None


def test_no_keyring_refuses_with_a_hint(cli, datamart, eh_credentials: Path, isolated: Path) -> None:
    keyring.set_keyring(fail.Keyring())
    result = cli("create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", eh_credentials, expect=4)
    assert "--secret-store file" in result.stderr and "DMREPL_SECRET_STORE=file" in result.stderr
    assert cli("--json", "list").stdout.strip() == "[]"


@pytest.mark.parametrize("how", ["option", "env"])
def test_file_store_is_0600_from_creation(
    cli, datamart, eh_credentials: Path, isolated: Path, monkeypatch, how
) -> None:
    keyring.set_keyring(fail.Keyring())
    old = os.umask(0)  # a lax umask must not widen the secret file's mode
    try:
        args = ["--secret-store", "file"] if how == "option" else []
        if how == "env":
            monkeypatch.setenv("DMREPL_SECRET_STORE", "file")
        rep = json.loads(
            cli(
                "--json", "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", eh_credentials, *args
            ).stdout
        )
    finally:
        os.umask(old)
    secret_file = isolated / "secrets" / rep["credentials"]["ref"]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    assert KEY in secret_file.read_text()
    assert rep["credentials"]["store"] == "file"


def test_no_secret_anywhere_dmrepl_writes_or_prints(cli, datamart, tmp_path: Path, isolated: Path) -> None:
    pem = rsa_pem()
    key_lines = [line for line in pem.splitlines() if "-----" not in line]
    sa = tmp_path / "credentials.json"
    sa.write_text(service_account_json(private_key=pem))
    cs = connection_string(key=KEY, hub="hub1")
    eh = tmp_path / "credentials.txt"
    eh.write_text(cs)
    outputs = []
    for args in (
        ["create", "--type", "google-pubsub", "--name", "ps", "--credentials", sa, "--topic-id", "ops"],
        ["create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", eh],
        ["list"],
        ["--json", "list"],
        ["show", "ps"],
        ["--json", "show", "eh"],
        ["show", "eh"],
        ["history", "ps"],
        ["support-bundle", "ps"],
        ["support-bundle", "eh"],
        ["recreate", "eh", "--event-hub", "other"],
        ["activate", "ps", "--timeout", "1"],
        ["--json", "activate", "eh", "--timeout", "1"],
    ):
        r = cli(*args, expect=None)
        outputs += [r.stdout, r.stderr]
    written = "".join(
        p.read_text(errors="replace") for p in isolated.rglob("*") if p.is_file() and p.parent.name != "secrets"
    )
    haystack = "\n".join(outputs) + written
    assert "replicator@dmrepl-test.iam.gserviceaccount.com" in haystack  # the fingerprint is shown, not the key
    assert KEY not in haystack and cs not in haystack
    for line in key_lines:
        assert line not in haystack
