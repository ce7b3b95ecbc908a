"""Loopback identity endpoints for keyless credentials, spoken to by the real google-auth and azure-identity.

One HTTP server plays three services, each at its own path, the way the real ones answer:
- **Google's metadata server** (`GCE_METADATA_HOST` / `GCE_METADATA_IP` point at it): `/` answers the ping with
  `Metadata-Flavor: Google`; `/computeMetadata/v1/instance/service-accounts/default/token` issues an access token,
  `…/default/?recursive=true` and `…/default/email` say whose, `/computeMetadata/v1/project/project-id` the project.
  Every request must carry `Metadata-Flavor: Google`, as on a VM.
- **Google's STS token exchange** (`/v1/token`, the `token_url` of an `external_account` file): RFC 8693, accepting
  only the subject token and audience the test configured.
- **Microsoft Entra ID's token endpoint** (with `tls=True`: https, its certificate signed by a test CA written to
  `ca_file`, for `REQUESTS_CA_BUNDLE`; `AZURE_AUTHORITY_HOST` points azure-identity at it): the OpenID configuration
  of a tenant and its `oauth2/v2.0/token`, issuing a JWT to a service principal (client credentials grant) whose
  client secret matches `service_principals`.
- **An App Service managed-identity endpoint** (`IDENTITY_ENDPOINT` / `IDENTITY_HEADER`, api-version 2019-08-01),
  which azure-identity accepts over http on loopback: it issues a JWT for the requested resource, signed HS256 with a
  key the Event Hubs peer is given (`EventHubsPeer(jwt_key=…)`), so the peer can verify it the way Entra ID tokens
  are verified by the service: signature, audience, expiry.

Knobs for failure cases: `token_lifetime_s` (negative: an already expired token, still announced as valid so the
client uses it), `audience_override` (a token for another resource).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import itertools
import json
import secrets
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
EVENTHUBS_RESOURCE = "https://eventhubs.azure.net"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(claims: dict[str, Any], key: bytes) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(sig)}"


@dataclass
class Seen:
    """One request, for asserts (never a token)."""

    service: str  # metadata | sts | managed-identity
    path: str
    status: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class IdentityServer:
    email: str = "dmrepl-vm@test-project.iam.gserviceaccount.com"
    project_id: str = "test-project"
    #: The subject token and audience an `external_account` file must present to the STS endpoint.
    sts_subject_token: str = field(default_factory=lambda: "subject-" + secrets.token_hex(8))
    sts_audience: str = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q"
    #: The managed identity: `IDENTITY_HEADER`'s value, the key its JWTs are signed with, who it is.
    identity_header: str = field(default_factory=lambda: secrets.token_hex(16))
    jwt_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    tenant_id: str = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    system_client_id: str = "0c2e6f3a-9a3e-4cd0-9a8e-111111111111"
    token_lifetime_s: float = 3600
    audience_override: str | None = None
    #: With `tls`: https with a certificate of a test CA (`ca_file`), as Entra ID's endpoint must be.
    tls: bool = False
    #: Service principals the Entra ID endpoint knows: client id → client secret.
    service_principals: dict[str, str] = field(default_factory=dict)
    ca_file: str = ""
    seen: list[Seen] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None
    _counter: Any = field(default_factory=itertools.count)

    # -- addresses -------------------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        assert self._httpd is not None, "identity server not started"
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    @property
    def authority_host(self) -> str:
        return f"https://{self.host}"

    @property
    def identity_endpoint(self) -> str:
        return f"http://{self.host}/msi/token"

    @property
    def sts_url(self) -> str:
        return f"http://{self.host}/v1/token"

    def metadata_env(self) -> dict[str, str]:
        return {"GCE_METADATA_HOST": self.host, "GCE_METADATA_IP": self.host}

    def managed_identity_env(self) -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": self.identity_endpoint, "IDENTITY_HEADER": self.identity_header}

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self) -> IdentityServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, headers, body = server._get(self.path, dict(self.headers.items()))
                self._answer(status, headers, body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
                status, body = server._exchange(self.path, form)
                self._answer(status, {"Content-Type": "application/json"}, json.dumps(body).encode())

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert_file, key_file, self.ca_file = _test_ca_and_certificate()
            context.load_cert_chain(cert_file, key_file)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="identity-server", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> IdentityServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- services --------------------------------------------------------------------------------------------------

    def _get(self, raw_path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        lower = {k.lower(): v for k, v in headers.items()}
        if url.path == f"/{self.tenant_id}/v2.0/.well-known/openid-configuration":
            base = f"https://{self.host}/{self.tenant_id}"
            config = {
                "issuer": f"{base}/v2.0",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "tenant_region_scope": "WW",
            }
            self.seen.append(Seen("entra", url.path, 200))
            return 200, {"Content-Type": "application/json"}, json.dumps(config).encode()
        if url.path.startswith("/msi/"):
            return self._managed_identity(url.path, query, lower)
        flavor = {"Metadata-Flavor": "Google"}
        if lower.get("metadata-flavor") != "Google":
            self.seen.append(Seen("metadata", url.path, 403))
            return 403, {"Content-Type": "text/plain"}, b"Missing Metadata-Flavor:Google header."
        account = "/computeMetadata/v1/instance/service-accounts/default/"
        if url.path == "/":
            status, ctype, body = 200, "text/plain", b""
        elif url.path == account + "token":
            token = f"ya29.metadata-{next(self._counter)}-{secrets.token_hex(6)}"
            answer = {"access_token": token, "expires_in": int(self.token_lifetime_s), "token_type": "Bearer"}
            status, ctype, body = 200, "application/json", json.dumps(answer).encode()
        elif url.path == account and query.get("recursive") == "true":
            answer = {
                "aliases": ["default"],
                "email": self.email,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            }
            status, ctype, body = 200, "application/json", json.dumps(answer).encode()
        elif url.path == account + "email":
            status, ctype, body = 200, "text/plain", self.email.encode()
        elif url.path == "/computeMetadata/v1/project/project-id":
            status, ctype, body = 200, "text/plain", self.project_id.encode()
        else:
            status, ctype, body = 404, "text/plain", b"Not Found"
        self.seen.append(Seen("metadata", url.path, status))
        return status, {**flavor, "Content-Type": ctype}, body

    def _client_credentials(self, path: str, one: Any) -> tuple[int, dict[str, Any]]:
        """Entra ID's client credentials grant, for a service principal with a client secret."""
        client_id, secret, scope = one("client_id"), one("client_secret"), one("scope") or ""
        if one("grant_type") != "client_credentials":
            status, body = 400, {"error": "unsupported_grant_type"}
        elif client_id not in self.service_principals or self.service_principals[client_id] != secret:
            status, body = (
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                },
            )
        else:
            resource = scope.split()[0].removesuffix("/.default") if scope else ""
            status, body = (
                200,
                {
                    "token_type": "Bearer",
                    "expires_in": 3599,
                    "access_token": self._jwt(resource, str(client_id)),
                },
            )
        self.seen.append(Seen("entra", path, status, {"client_id": client_id, "scope": scope}))
        return status, body

    def _jwt(self, resource: str, client_id: str, **extra: str) -> str:
        now = int(time.time())
        claims = {
            "aud": self.audience_override or resource.rstrip("/"),
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + int(self.token_lifetime_s),
            "appid": client_id,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_OID, client_id)),
            "tid": self.tenant_id,
            **extra,
        }
        return sign_jwt(claims, self.jwt_key)

    def _managed_identity(
        self, path: str, query: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        def answer(status: int, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
            detail = {"resource": query.get("resource"), "client_id": query.get("client_id")}
            self.seen.append(Seen("managed-identity", path, status, detail))
            return status, {"Content-Type": "application/json"}, json.dumps(body).encode()

        if headers.get("x-identity-header") != self.identity_header:
            return answer(401, {"error": {"code": "AuthenticationFailed", "message": "bad X-IDENTITY-HEADER"}})
        if query.get("api-version") != "2019-08-01" or not query.get("resource"):
            return answer(400, {"error": {"code": "BadRequest", "message": "api-version and resource required"}})
        client_id = query.get("client_id") or self.system_client_id
        resource = query["resource"].rstrip("/").removesuffix("/.default")
        mirid = f"/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/{client_id}"
        token = self._jwt(resource, client_id, xms_mirid=mirid)
        # an expired token still announced as valid
        announced = int(time.time()) + max(int(self.token_lifetime_s), 3600)
        return answer(
            200,
            {
                "access_token": token,
                "expires_on": str(announced),
                "resource": query["resource"],
                "token_type": "Bearer",
                "client_id": client_id,
            },
        )

    def _exchange(self, path: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        def one(name: str) -> str | None:
            return (form.get(name) or [None])[0]

        if path == f"/{self.tenant_id}/oauth2/v2.0/token":
            return self._client_credentials(path, one)
        if path != "/v1/token":
            self.seen.append(Seen("sts", path, 404))
            return 404, {"error": "not_found"}
        if one("grant_type") != TOKEN_EXCHANGE:
            status, body = 400, {"error": "unsupported_grant_type"}
        elif one("subject_token") != self.sts_subject_token:
            status, body = 400, {"error": "invalid_grant", "error_description": "The subject token is invalid."}
        elif one("audience") != self.sts_audience:
            status, body = 400, {"error": "invalid_target", "error_description": "The audience is invalid."}
        else:
            status, body = (
                200,
                {
                    "access_token": f"sts-{next(self._counter)}-{secrets.token_hex(6)}",
                    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "token_type": "Bearer",
                    "expires_in": int(self.token_lifetime_s),
                },
            )
        self.seen.append(Seen("sts", path, status, {"audience": one("audience"), "scope": one("scope")}))
        return status, body


def _test_ca_and_certificate() -> tuple[str, str, str]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost: (cert, key, CA) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dmrepl test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory = tempfile.mkdtemp(prefix="dmrepl-test-ca-")
    paths = [f"{directory}/{name}" for name in ("server.pem", "server.key", "ca.pem")]
    with open(paths[0], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(paths[2], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    return paths[0], paths[1], paths[2]
