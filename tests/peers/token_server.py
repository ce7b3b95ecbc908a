"""A loopback OAuth2 token endpoint for google-auth's service-account JWT-bearer grant.

It verifies the assertion for real (RS256 signature against the public key registered for the JWT's `kid`,
expiry), so tests can prove that a deleted or unknown key fails the check the way Google's endpoint fails it,
without any network access. Answers mimic oauth2.googleapis.com: 200 with an access token, or 400
`invalid_grant`.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: google-auth always sends this audience, whatever the token_uri.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


@dataclass
class TokenRequest:
    """What the server saw, for asserts; never the assertion itself."""

    path: str
    grant_type: str | None
    kid: str | None = None
    iss: str | None = None
    scope: str | None = None
    aud: str | None = None
    status: int = 0
    error: str | None = None
    access_token: str | None = None


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class TokenServer:
    """`http://127.0.0.1:PORT/token`, serving in a daemon thread; use as a context manager."""

    keys: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    requests: list[TokenRequest] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def register(self, kid: str, key: str | bytes | rsa.RSAPublicKey | rsa.RSAPrivateKey) -> None:
        """Accept assertions signed by `key` (a key object or a PEM, private or public) under `kid`."""
        if isinstance(key, str | bytes):
            pem = key.encode() if isinstance(key, str) else key
            loaded: Any = (
                serialization.load_pem_private_key(pem, password=None)
                if b"PRIVATE KEY" in pem
                else serialization.load_pem_public_key(pem)
            )
            key = loaded
        if isinstance(key, rsa.RSAPrivateKey):
            key = key.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise TypeError("only RSA keys are supported (RS256)")
        self.keys[kid] = key

    def revoke(self, kid: str) -> None:
        """Forget a key, as deleting a service-account key does."""
        self.keys.pop(kid, None)

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("token server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/token"

    def start(self) -> TokenServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
                status, body = server._grant(self.path, form)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start() if self._httpd is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _grant(self, path: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        grant_type = (form.get("grant_type") or [None])[0]
        record = TokenRequest(path=path, grant_type=grant_type)
        self.requests.append(record)
        status, body = self._verify(record, grant_type, (form.get("assertion") or [""])[0])
        record.status = status
        record.error = body.get("error")
        record.access_token = body.get("access_token")
        return status, body

    def _verify(self, record: TokenRequest, grant_type: str | None, assertion: str) -> tuple[int, dict[str, Any]]:
        if grant_type != JWT_BEARER:
            return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}
        try:
            header_b64, claims_b64, sig_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(sig_b64)
        except ValueError:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT."}
        record.kid, record.iss = header.get("kid"), claims.get("iss")
        record.scope, record.aud = claims.get("scope"), claims.get("aud")
        key = self.keys.get(str(header.get("kid")))
        if header.get("alg") != "RS256" or key is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        try:
            key.verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        now = time.time()
        if not isinstance(claims.get("exp"), int | float) or claims["exp"] < now:
            return 400, {
                "error": "invalid_grant",
                "error_description": "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            }
        if claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT audience."}
        return 200, {"access_token": "ya29.test-" + secrets.token_hex(12), "expires_in": 3600, "token_type": "Bearer"}
