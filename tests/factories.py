"""Real credential material for tests: fresh RSA/EC keys and Event Hubs connection strings."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@functools.cache
def rsa_pem(seed: int = 0) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def service_account(**overrides: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": "service_account",
        "project_id": "dmrepl-test",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": rsa_pem(),
        "client_email": "replicator@dmrepl-test.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    for k, v in overrides.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    return info


def service_account_json(**overrides: Any) -> str:
    return json.dumps(service_account(**overrides), indent=2)


def sas_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def connection_string(
    *, host: str = "ns1.servicebus.windows.net", name: str = "send", key: str | None = None, hub: str | None = "hub1"
) -> str:
    parts = [f"Endpoint=sb://{host}/", f"SharedAccessKeyName={name}", f"SharedAccessKey={key or sas_key()}"]
    if hub:
        parts.append(f"EntityPath={hub}")
    return ";".join(parts)


def fake_running_sync(datamart: str) -> subprocess.Popen[bytes]:
    """A live process standing in for a running sync, recorded as a RUNNING execution."""
    from dmrepl.models import Execution, from_dict
    from dmrepl.processes import process_start_time
    from dmrepl.registry import Registry

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with Registry().transaction() as data:
        data.executions["sync-running"] = from_dict(
            Execution,
            {
                "id": "sync-running",
                "datamart": datamart,
                "user_point_system_version": "v202205",
                "status": "RUNNING",
                "created_at": "2026-01-01T00:00:00.000Z",
                "started_at": "2026-01-01T00:00:00.000Z",
                "start_ts": 1767225600000,
                "pid": proc.pid,
                "pid_start": process_start_time(proc.pid),
                "progress": {"percent": 42.0, "lines_read": 10},
            },
            "test",
        )
    return proc
