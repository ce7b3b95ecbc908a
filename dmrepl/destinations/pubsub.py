"""Google Cloud Pub/Sub destination.

Delivery does not use the high-level `google.cloud.pubsub_v1.PublisherClient`: measured against pstest, its
per-message bookkeeping (a future, a size probe and a sequencer lookup per message) caps one process at
~16,000 messages/s unordered and ~10,000/s with 32 ordering keys, and with ordering on it forces infinite retry
deadlines. Instead this module batches raw protobuf messages itself and sends them with the generated (GAPIC)
client's `publish` RPC from a few worker threads: ~100,000 messages/s on the same machine, with retries, deadlines
and failure propagation fully under our control.

Ordering. Pub/Sub requires every message of one Publish request to carry the same ordering key, and one key per
user point would mean one tiny request per user point. So, when ordering is on, a user point's operations carry
the ordering key `ordering_key(user_point_id)`: one of ORDERING_BUCKETS fixed buckets derived from a stable hash.
All operations of a user point share a bucket, each bucket has at most one request in flight and is retried in
place, so per-user-point order is preserved end to end (subscribers with message ordering enabled receive a
bucket's messages in publish order). The bucket count is a constant on purpose: changing it would move user points
to other keys and lose ordering across the change.

Google libraries are imported inside methods only: `dmrepl --help` must not pay for grpc.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

from dmrepl.credentials import Defects, decode, is_loopback, sha256
from dmrepl.destinations.base import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    Backoff,
    Binding,
    CheckStep,
    Destination,
    DestinationError,
    DestinationType,
    OptionSpec,
    Window,
    memory_budget,
    skip_rest,
    timed_step,
)
from dmrepl.models import DEFAULT_RETRY_BUDGET_S
from dmrepl.operations import Message

PUBSUB_SCOPE = "https://www.googleapis.com/auth/pubsub"
CHECK_STEPS = ("credentials", "token", "topic", "publish-permission")

#: Number of ordering-key buckets when ordering is on. Fixed forever: see the module docstring.
ORDERING_BUCKETS = 64
#: Ordering key of bucket n: "b0" … "b63".
ORDERING_KEY_FORMAT = "b{bucket}"
_ORDERING_KEYS = tuple(ORDERING_KEY_FORMAT.format(bucket=n) for n in range(ORDERING_BUCKETS))

#: Pub/Sub's limit on one Publish request, as the official client enforces it (10 * 1000 * 1000).
SERVER_REQUEST_MAX_BYTES = 10_000_000
BATCH_MAX_MESSAGES = 1000
BATCH_MAX_BYTES = 9_000_000
BATCH_MAX_LATENCY_S = 0.05
#: The retry schedule of a failed Publish: google-cloud-pubsub's own default for Publish (initial 0.1 s, ×4, at most
#: 60 s between attempts; a test reads it from the installed library), bounded here by the retry budget.
PUBLISH_BACKOFF = {"initial_s": 0.1, "multiplier": 4.0, "maximum_s": 60.0}
#: Publish threads, and so the largest window: each has at most one request in flight. With ordering, thread n alone
#: owns the buckets b with b % WORKERS == n, so every bucket has at most one request in flight, in order (Pub/Sub's
#: rule per ordering key). 16 requests of ~1,000 messages carry ~100,000 messages/s over a 150 ms round trip; 64
#: threads measured 10-15 % slower on loopback (every acknowledgement wakes them all).
WORKERS = 16
#: The window (`Window`): how many requests may be in flight at once, from INITIAL_WINDOW between MIN_WINDOW and
#: WORKERS.
INITIAL_WINDOW = 8
MIN_WINDOW = 2
#: gRPC channels (HTTP/2 connections) the threads share: one connection's flow-control window and single I/O
#: thread hold back many large requests in flight over a long round trip.
CHANNELS = 4
#: Flow control: send() blocks past these many messages / bytes not yet acknowledged. The bytes are the memory
#: budget of one destination (DMREPL_MEMORY_BUDGET_MB, default 64).
MAX_OUTSTANDING_MESSAGES = 100_000
MAX_OUTSTANDING_BYTES = DEFAULT_MEMORY_BUDGET_BYTES


#: What the generated transport gives its own channels; ours are built here (see `_make_client`).
_CHANNEL_OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))
_OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
#: After a failure, how long flush() waits for the answers of requests still in flight.
_SETTLE_S = 10.0
#: `--credentials adc`: Application Default Credentials, found by google-auth where this runs (nothing is stored).
ADC = "adc"

#: Framing of one message inside a PublishRequest, above data + attribute values + key (measured: <= 36 bytes).
_MESSAGE_OVERHEAD = 40

_RETRYABLE = (
    "ServiceUnavailable",
    "DeadlineExceeded",
    "ResourceExhausted",
    "Aborted",
    "InternalServerError",
    "Unknown",
    "Cancelled",
)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_HOST = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)$")
_TOPIC_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$")
_AUTH_REJECTIONS = ("invalid_grant", "invalid_client", "unauthorized_client", "access_denied", "invalid_scope")


def _check_private_key(pem: str, defects: Defects) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if "\\n" in pem and "\n" not in pem.strip():
        defects.add("private_key", "contains literal \\n sequences instead of line breaks (was it pasted?)")
        return
    if "-----BEGIN" not in pem:
        defects.add("private_key", "is not a PEM private key (no BEGIN line)")
        return
    try:
        key = load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        defects.add("private_key", "does not load as a PEM private key (truncated, encrypted or corrupted)")
        return
    except Exception:
        defects.add("private_key", "does not load as a PEM private key")
        return
    if not isinstance(key, rsa.RSAPrivateKey):
        defects.add("private_key", f"is a {type(key).__name__.removeprefix('_')} key; service accounts use RSA")


def validate(
    raw: bytes | None,
    source: str,
    *,
    project_id: str | None,
    topic_id: str | None,
    endpoint: str | None,
    ordering: bool,
    adc: bool = False,
) -> Binding:
    """A service-account key file, an `external_account` configuration (workload identity federation), or `adc`
    (Application Default Credentials: nothing stored; none at all with PUBSUB_EMULATOR_HOST), and the topic
    settings, every defect named by field."""
    defects = Defects(source or "google-pubsub settings")
    text = decode(raw, defects) if raw is not None else None
    info: Any = None
    if text is not None:
        try:
            info = json.loads(text)
        except json.JSONDecodeError as exc:
            defects.add("file", f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    if text is not None and info is not None and not isinstance(info, dict):
        defects.add("file", "is not a JSON object")
        info = None
    fingerprint: dict[str, Any] = {}
    kind = info.get("type") if isinstance(info, dict) else None
    if kind == "external_account":
        fingerprint = _check_external_account(info, defects)
    elif isinstance(kind, str) and kind != "service_account":
        defects.add(
            "type",
            f"{kind[:40]!r} credentials are not supported: give a service-account key file (type "
            "'service_account'), a workload identity federation file (type 'external_account'), or "
            "--credentials adc",
        )
    elif isinstance(info, dict):
        if kind is None:
            defects.add("type", "is missing (expected 'service_account')")
        for name in ("project_id", "private_key_id", "private_key", "client_email", "token_uri"):
            value = info.get(name)
            if value is None:
                defects.add(name, "is missing")
            elif not isinstance(value, str) or not value.strip():
                defects.add(name, "must be a non-empty string")
        if isinstance(info.get("private_key"), str) and info["private_key"].strip():
            _check_private_key(info["private_key"], defects)
        email = info.get("client_email")
        if isinstance(email, str) and email.strip() and not _EMAIL.match(email):
            defects.add("client_email", f"{email[:80]!r} is not an e-mail address")
        uri = info.get("token_uri")
        if isinstance(uri, str) and uri.strip():
            parts = urlsplit(uri)
            if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
                pass
            elif parts.scheme == "http":
                defects.add("token_uri", "must use https (http is accepted only for a loopback host)")
            elif parts.scheme != "https" or not parts.hostname:
                defects.add("token_uri", f"{uri[:80]!r} is not an https URL")
        fingerprint = {
            k: info[k] for k in ("client_email", "private_key_id", "project_id") if isinstance(info.get(k), str)
        }
        project_id = project_id or (info.get("project_id") if isinstance(info.get("project_id"), str) else None)
    if not topic_id:
        defects.add("--topic-id", "is required for google-pubsub")
    elif "/" in topic_id or not _TOPIC_ID.match(topic_id):
        defects.add("--topic-id", f"{topic_id!r} is not a valid topic id (give the id, not projects/…/topics/…)")
    if not project_id:
        defects.add("--project-id", "is required (no project_id in the credentials)")
    if endpoint and not _HOSTPORT.match(endpoint):
        if _HOST.match(endpoint):
            endpoint += ":443"  # as Google's client does with an api_endpoint given without a port
        else:
            defects.add("--endpoint", f"{endpoint!r} is not host or host:port")
    defects.raise_if_any("google-pubsub credentials or settings")
    if text is not None:
        fingerprint["sha256"] = sha256(text)
    settings: dict[str, Any] = {"project_id": project_id, "topic_id": topic_id, "ordering": ordering}
    if endpoint:
        settings["endpoint"] = endpoint
    if adc:
        settings["credentials"] = ADC
    return Binding(settings=settings, secret=text, fingerprint=fingerprint)


def _check_external_account(info: dict[str, Any], defects: Defects) -> dict[str, Any]:
    """A workload identity federation file: no secret inside, only where a subject token comes from and where to
    exchange it. google-auth's own loader decides what it accepts; its refusal is reported on the field it names."""
    for name in ("audience", "subject_token_type", "token_url"):
        value = info.get(name)
        if not isinstance(value, str) or not value.strip():
            defects.add(name, "is missing" if value is None else "must be a non-empty string")
    source = info.get("credential_source")
    if not isinstance(source, dict) or not source:
        defects.add("credential_source", "is missing (file, url, executable, or AWS environment)")
    for name in ("token_url", "service_account_impersonation_url"):
        uri = info.get(name)
        if isinstance(uri, str) and uri.strip():
            parts = urlsplit(uri)
            if (parts.scheme == "https" and parts.hostname) or (
                parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname)
            ):
                continue
            defects.add(name, "must be an https URL (http is accepted only for a loopback host)")
    if not defects.items:
        from google.auth import exceptions as aexc

        try:
            load_external_account(info)
        except (aexc.GoogleAuthError, ValueError, TypeError) as exc:
            text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            named = next((k for k in info if isinstance(k, str) and k in text), "file")
            defects.add(named, f"google-auth refuses it: {text}")
    fingerprint = {"type": "external_account", "audience": info.get("audience")}
    impersonated = _impersonated_email(info.get("service_account_impersonation_url"))
    if impersonated:
        fingerprint["service_account"] = impersonated
    return {k: v for k, v in fingerprint.items() if isinstance(v, str)}


def load_external_account(info: dict[str, Any]) -> Any:
    """google-auth's loader for this kind of federation (AWS, an executable, or a file/URL subject token): the
    type-specific loaders, not `load_credentials_from_dict`, which google-auth warns would load any type."""
    source = info.get("credential_source") or {}
    if str(source.get("environment_id", "")).startswith("aws"):
        from google.auth import aws as module
    elif "executable" in source:
        from google.auth import pluggable as module  # type: ignore[no-redef]
    else:
        from google.auth import identity_pool as module  # type: ignore[no-redef]
    return module.Credentials.from_info(info, scopes=[PUBSUB_SCOPE])


def _impersonated_email(url: Any) -> str | None:
    match = re.search(r"/serviceAccounts/([^/:]+):generateAccessToken", url) if isinstance(url, str) else None
    return match.group(1) if match else None


class PubSubType(DestinationType):
    name = "google-pubsub"
    options = (
        OptionSpec("project_id", "--project-id", "Pub/Sub project (default: the credentials' project_id)."),
        OptionSpec("topic_id", "--topic-id", "Pub/Sub topic id."),
        OptionSpec("endpoint", "--endpoint", "Pub/Sub regional or private endpoint, host[:port] (port 443)."),
        OptionSpec("ordering", "--ordering/--no-ordering", "Pub/Sub ordering keys (default on).", bool),
    )
    credentials_help = (
        "a service-account credentials.json, a workload identity federation file (external_account), or `adc` "
        "(Application Default Credentials); none with PUBSUB_EMULATOR_HOST"
    )

    def credentials_required(self, options: Mapping[str, Any] | None = None) -> bool:
        """The emulator takes anonymous calls, as Google's client makes them when PUBSUB_EMULATOR_HOST is set."""
        return not os.environ.get("PUBSUB_EMULATOR_HOST")

    def reads_credentials_file(self, options: Mapping[str, Any]) -> bool:
        return str(options.get("credentials")) != ADC

    def bind(
        self, options: Mapping[str, Any], raw: bytes | None, source: str, previous: Mapping[str, Any] | None
    ) -> Binding:
        ordering = self.previous_or(options, previous, "ordering")
        given = options.get("credentials")
        adc = str(given) == ADC if given is not None else bool(previous and previous.get("credentials") == ADC)
        return validate(
            None if adc else raw,
            "--credentials adc" if adc else source,
            project_id=self.previous_or(options, previous, "project_id"),
            topic_id=self.previous_or(options, previous, "topic_id"),
            endpoint=self.previous_or(options, previous, "endpoint"),
            ordering=True if ordering is None else bool(ordering),
            adc=adc,
        )

    def expires_at(
        self, settings: Mapping[str, Any], secret: str | None, *, fetch_timeout_s: float | None = None
    ) -> tuple[datetime, str] | None:
        """A service-account key file does not say when it expires: its certificate does, published at the
        key's `client_x509_cert_url` (Google's JSON map of key id → PEM). Asked only when a check runs, over https
        (or http on loopback, as `token_uri`); trusted only when the certificate holds the key's own public key.
        Any failure means "not known", never a failed check."""
        if not secret or fetch_timeout_s is None:
            return None
        import urllib.request

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            info = json.loads(secret)
            url, kid = info.get("client_x509_cert_url"), info.get("private_key_id")
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is None or not kid or not parts.hostname:
                return None
            if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname)):
                return None
            with urllib.request.urlopen(url, timeout=max(fetch_timeout_s, 0.1)) as resp:
                certs = json.loads(resp.read(1 << 20))
            cert = x509.load_pem_x509_certificate(certs[kid].encode("utf-8"))
            key = serialization.load_pem_private_key(info["private_key"].encode("utf-8"), password=None)
            spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
                return None
            return cert.not_valid_after_utc, f"certificate of key {kid[:12]}"
        except Exception:  # an unreachable, odd or lying endpoint only leaves the expiry unknown
            return None

    def describe(self, settings: Mapping[str, Any]) -> str:
        return f"projects/{settings.get('project_id')}/topics/{settings.get('topic_id')}"

    def destination(
        self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    ) -> Destination:
        return PubSubDestination(settings, secret, retry_budget_s=retry_budget_s)


TYPE = PubSubType()


def ordering_key(user_point_id: str) -> str:
    """The ordering key of a user point: `b<crc32(user_point_id as UTF-8) mod ORDERING_BUCKETS>`."""
    return _ORDERING_KEYS[zlib.crc32(user_point_id.encode()) % ORDERING_BUCKETS]


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    host, _, port = endpoint.rpartition(":")
    return (host, port) if host else (endpoint, "")


class _TimedRequest:
    """google-auth's HTTP transport with a bound timeout: its default is 120 s, longer than any check."""

    def __init__(self, timeout_s: float | Callable[[], float]) -> None:
        from google.auth.transport.requests import Request

        self._inner = Request()
        self._timeout = timeout_s

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = self._timeout() if callable(self._timeout) else self._timeout
        if t <= 0:
            from google.auth.exceptions import TransportError

            raise TransportError("the time budget ran out before the token request")
        kwargs["timeout"] = t
        return self._inner(*args, **kwargs)


class _Batch:
    """One Publish request being filled; with ordering, all of one bucket.

    Messages are added straight into the request's protobuf: building them apart and copying them in costs twice
    the CPU and twice the memory (measured: 7.1 vs 3.5 µs and ~1,600 vs ~700 bytes per 300-byte message).
    """

    __slots__ = ("add", "bucket", "count", "created", "nbytes", "request")

    def __init__(self, bucket: int, request: Any) -> None:
        self.bucket = bucket
        self.created = time.monotonic()
        self.request = request
        self.add = request.messages.add
        self.count = 0
        self.nbytes = 0


@dataclass
class _Failure:
    code: str
    message: str
    retryable: bool


class PubSubDestination(Destination):
    """A replication's binding to one Pub/Sub topic (README, "What destinations receive").

    settings: `project_id`, `topic_id`, optional `endpoint` ("host:port"; a loopback host is reached without TLS,
    with the service account's call credentials, like a local proxy or sidecar), `ordering` (bool).
    `PUBSUB_EMULATOR_HOST`, when set, wins over everything, as in Google's own client: insecure channel, anonymous.
    """

    type_name: ClassVar[str] = "google-pubsub"
    #: The engine rejects larger operations. Below 10 MB by the request framing (topic name, attributes, key),
    #: so an accepted operation always fits the 10,000,000-byte Publish request limit on its own.
    max_message_bytes: int = SERVER_REQUEST_MAX_BYTES - 1024

    def __init__(
        self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    ) -> None:
        super().__init__(settings, secret, retry_budget_s=retry_budget_s)
        self.project_id = str(self.settings["project_id"])
        self.topic_id = str(self.settings["topic_id"])
        self.endpoint: str | None = self.settings.get("endpoint") or None
        self.ordering = bool(self.settings.get("ordering", True))
        self.topic_path = f"projects/{self.project_id}/topics/{self.topic_id}"
        self.acked = 0
        self.failed = 0
        self._client: Any = None
        self._clients: list[Any] = []
        self._window = Window(INITIAL_WINDOW, MIN_WINDOW, WORKERS)
        self._budget = MAX_OUTSTANDING_BYTES
        self._creds: Any = None
        self._keyless: str | None = None  # ADC or "external_account"
        self._token_lock: threading.Lock | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._open: dict[int, _Batch] = {}
        self._full: list[deque[_Batch]] = []
        self._threads: list[threading.Thread] = []
        self._buckets = 1
        self._lanes = 1
        self._keys: tuple[str, ...] = ("",)
        self._urgent = 0
        self._outstanding = 0
        self._outstanding_bytes = 0
        self._last_progress = time.monotonic()
        self._failure: _Failure | None = None
        self._req_cls: Any = None
        self._wrap: Any = None

    # ----------------------------------------------------------------------------------------------- helpers

    @property
    def _emulator(self) -> str | None:
        return os.environ.get("PUBSUB_EMULATOR_HOST") or None

    @property
    def _target(self) -> str:
        return self._emulator or self.endpoint or "pubsub.googleapis.com:443"

    def _scrub(self, text: str) -> str:
        """Drop any line of the private key from a message we did not write (server or library text)."""
        if self.secret:
            try:
                key = json.loads(self.secret).get("private_key") or ""
            except (ValueError, AttributeError):
                key = self.secret
            for line in str(key).replace("\\n", "\n").splitlines():
                line = line.strip()
                if len(line) >= 16 and "PRIVATE KEY" not in line:
                    text = text.replace(line, "[redacted]")
        return text[:500]

    def _client_email(self) -> str:
        """Who the credentials are: the service account's e-mail, an impersonated one, or what else is known."""
        email = getattr(self._creds, "service_account_email", None)
        if email and email != "default":
            return str(email)
        if self._keyless == "external_account":
            audience = getattr(self._creds, "_audience", None) or "its workload identity pool"
            return f"the federated identity of {audience}"
        if getattr(self._creds, "account", None):
            return str(self._creds.account)
        return "the service account" if self._keyless is None else "the default identity"

    def _token_source(self) -> str:
        """Where the token comes from, for the check's `token` step and its errors."""
        creds = self._creds
        if self._keyless == "external_account":
            source = getattr(creds, "_credential_source_file", None) or getattr(creds, "_credential_source_url", None)
            where = getattr(creds, "_token_url", "the STS endpoint")
            return f"{where} (subject token from {source})" if source else str(where)
        if self._keyless == ADC:
            module = type(creds).__module__
            if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
                return f"Application Default Credentials ({os.environ['GOOGLE_APPLICATION_CREDENTIALS']})"
            if module.startswith("google.auth.compute_engine"):
                host = os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
                return f"Application Default Credentials: the metadata server ({host})"
            if module.startswith("google.oauth2.credentials"):
                return "Application Default Credentials: gcloud auth application-default login (a user)"
            return f"Application Default Credentials ({type(creds).__name__})"
        return str(getattr(creds, "_token_uri", "the token_uri"))

    def _credentials(self) -> Any:
        """Load the credentials (service-account key, external_account file, or ADC); ValueError on anything
        unusable."""
        if self._creds is None and self.settings.get("credentials") == ADC:
            import google.auth
            from google.auth import exceptions as aexc

            try:
                self._creds, _ = google.auth.default(scopes=[PUBSUB_SCOPE])
            except aexc.DefaultCredentialsError as exc:
                raise ValueError(f"no Application Default Credentials here: {str(exc).splitlines()[0]}") from None
            self._keyless = ADC
        if self._creds is None and self.secret and '"external_account"' in self.secret:
            info = json.loads(self.secret)
            if isinstance(info, dict) and info.get("type") == "external_account":
                self._creds = load_external_account(info)
                self._keyless = "external_account"
        if self._creds is None:
            from google.oauth2 import service_account

            if self.secret is None:
                raise ValueError("no credentials are stored for this replication")
            try:
                info = json.loads(self.secret)
            except ValueError as exc:
                raise ValueError(f"credentials.json is not JSON (line {getattr(exc, 'lineno', '?')})") from None
            if not isinstance(info, dict):
                raise ValueError("credentials.json is not a JSON object")
            self._creds = service_account.Credentials.from_service_account_info(info, scopes=[PUBSUB_SCOPE])
        return self._creds

    def _make_client(self, token_timeout: float | Callable[[], float]) -> Any:
        """A client on a channel of its own: gRPC's process-wide subchannel pool would otherwise give channels with
        the same target and arguments one TCP connection, and so one flow-control window, for all of them."""
        import grpc
        from google.pubsub_v1 import PublisherClient
        from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport

        if self._emulator:
            channel = grpc.insecure_channel(self._emulator, options=[*_CHANNEL_OPTIONS, *_OWN_CONNECTION])
            return PublisherClient(transport=PublisherGrpcTransport(channel=channel))
        creds = self._credentials()
        if self.endpoint and is_loopback(_split_endpoint(self.endpoint)[0]):
            from google.auth.transport.grpc import secure_authorized_channel

            # Without this lock every worker's first RPC would fetch a token of its own.
            self._token_lock = threading.Lock()
            channel = secure_authorized_channel(
                creds,
                _TimedRequest(token_timeout),
                self.endpoint,
                ssl_credentials=grpc.local_channel_credentials(),
                options=[*_CHANNEL_OPTIONS, *_OWN_CONNECTION],
            )
            return PublisherClient(transport=PublisherGrpcTransport(channel=channel))

        def own_connection(*args: Any, options: Sequence[tuple[str, Any]] = (), **kwargs: Any) -> Any:
            return PublisherGrpcTransport.create_channel(*args, options=[*options, *_OWN_CONNECTION], **kwargs)

        options = {"api_endpoint": self.endpoint} if self.endpoint else None
        transport = functools.partial(PublisherGrpcTransport, channel=own_connection)
        return PublisherClient(credentials=creds, client_options=options, transport=transport)

    def _classify(self, exc: BaseException) -> _Failure:
        """Map an SDK exception to an error code (docs/statuses.md) and whether retrying may help."""
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as aexc

        name = type(exc).__name__
        text = self._scrub(f"{name}: {exc}")
        email = self._client_email()
        if isinstance(exc, gexc.NotFound):
            return _Failure("TOPIC_NOT_FOUND", f"topic {self.topic_path} does not exist ({text})", False)
        if isinstance(exc, gexc.PermissionDenied):
            return _Failure("PERMISSION_DENIED", f"{email} may not publish to {self.topic_path} ({text})", False)
        if isinstance(exc, gexc.Unauthenticated):
            return _Failure("AUTH_FAILED", f"the service-account key of {email} was rejected ({text})", False)
        if isinstance(exc, aexc.RefreshError | aexc.OAuthError):
            if getattr(exc, "retryable", False):
                return _Failure("UNREACHABLE", f"the token endpoint failed ({text})", True)
            return _Failure("AUTH_FAILED", f"the service-account key of {email} was rejected ({text})", False)
        if isinstance(exc, aexc.TransportError):
            return _Failure("UNREACHABLE", f"the token endpoint is unreachable ({text})", True)
        if isinstance(exc, gexc.ServiceUnavailable) and "metadata from plugin failed" in str(exc):
            # Credentials failures inside gRPC's auth plugin all surface as 503: tell rejections from outages.
            if any(r in str(exc) for r in _AUTH_REJECTIONS):
                return _Failure("AUTH_FAILED", f"the service-account key of {email} was rejected ({text})", False)
            return _Failure("UNREACHABLE", f"no access token could be obtained ({text})", True)
        if isinstance(exc, gexc.GoogleAPICallError) and name in _RETRYABLE:
            return _Failure("UNREACHABLE", f"{self._target} failed or did not answer ({text})", True)
        if isinstance(exc, gexc.RetryError):
            return _Failure("UNREACHABLE", f"{self._target} failed or did not answer ({text})", False)
        if isinstance(exc, gexc.InvalidArgument) and "size" in str(exc).lower():
            return _Failure("PAYLOAD_TOO_LARGE", f"Pub/Sub refused the request as too large ({text})", False)
        return _Failure("PUBLISH_FAILED", f"publishing to {self.topic_path} failed ({text})", False)

    # ------------------------------------------------------------------------------------------------- check

    def check(self, timeout_s: float = 20.0) -> list[CheckStep]:
        """The four connectivity steps (README, "Connectivity checks"), never publishing, bounded by `timeout_s`.

        Every RPC gets `retry=None` or a short explicit retry and a timeout from the remaining budget: the
        library defaults would retry an unreachable or rejecting endpoint for ten minutes.
        """
        deadline = time.monotonic() + timeout_s

        def remaining() -> float:
            return deadline - time.monotonic()

        steps: list[CheckStep] = []
        rest = list(CHECK_STEPS)

        def fail(step: CheckStep, code: str, detail: str, fix: str) -> None:
            step.status, step.code, step.detail, step.fix = "failed", code, self._scrub(detail), fix

        rest.pop(0)
        with timed_step(steps, "credentials") as step:
            if self.secret is None and self._emulator and self.settings.get("credentials") != ADC:
                step.status, step.detail = "skipped", "no credentials: PUBSUB_EMULATOR_HOST is set (anonymous)"
            else:
                try:
                    self._credentials()
                    step.detail = (
                        f"service account {self._client_email()}"
                        if self._keyless is None
                        else f"{self._keyless} ({'no secret stored' if self._keyless == ADC else 'no key inside'})"
                    )
                    if self._emulator:
                        step.detail += " (unused: PUBSUB_EMULATOR_HOST is set)"
                except ValueError as exc:
                    fail(
                        step,
                        "AUTH_FAILED",
                        f"the credentials do not load: {exc}",
                        "run dmrepl recreate with a service-account key file downloaded from the Google Cloud console",
                    )
        if step.status == "failed":
            skip_rest(steps, rest)
            return steps

        rest.pop(0)
        with timed_step(steps, "token") as step:
            if self._emulator:
                step.status, step.detail = "skipped", "PUBSUB_EMULATOR_HOST is set: the emulator takes no token"
            else:
                self._check_token(step, remaining, fail)
        if step.status == "failed":
            skip_rest(steps, rest)
            return steps

        client: Any = None
        try:
            rest.pop(0)
            with timed_step(steps, "topic") as step:
                try:
                    client = self._make_client(remaining)
                except ValueError as exc:
                    fail(step, "AUTH_FAILED", str(exc), "run dmrepl recreate with valid credentials")
                else:
                    self._check_topic(client, step, remaining, fail)
            topic_unverified = step.status == "skipped"
            if step.status == "failed":
                skip_rest(steps, rest)
                return steps
            with timed_step(steps, "publish-permission") as step:
                self._check_permission(client, step, remaining, fail, topic_unverified)
        finally:
            if client is not None:
                client.transport.close()
        return steps

    def _check_token(self, step: CheckStep, remaining: Callable[[], float], fail: Callable[..., None]) -> None:
        from google.auth import exceptions as aexc

        creds = self._credentials()
        email = self._client_email()
        uri = self._token_source()
        try:
            creds.refresh(_TimedRequest(lambda: min(remaining(), 30.0)))
        except (aexc.RefreshError, aexc.OAuthError) as exc:
            text = str(exc.args[0] if exc.args else exc)
            fix = f"the key may have been deleted or disabled: create a new key for {email} and run dmrepl recreate"
            if self._keyless is not None:
                fix = (
                    "check the identity this machine has (gcloud auth application-default print-access-token, the "
                    "VM's service account, the workload identity pool's provider and its subject token)"
                )
            if "iat" in text or "exp" in text or "timeframe" in text:
                fix = "this machine's clock looks wrong (the token's iat/exp were refused): sync it with NTP"
            if getattr(exc, "retryable", False):
                fail(step, "UNREACHABLE", f"{uri} failed: {text}", "retry later; check Google Cloud status")
            else:
                fail(step, "AUTH_FAILED", f"{uri} refused the key: {text}", fix)
        except aexc.TransportError as exc:
            fail(
                step,
                "UNREACHABLE",
                f"{uri} is unreachable: {type(exc).__name__}: {exc}",
                "check DNS, proxy and firewall rules for outbound HTTPS from this machine",
            )
        else:
            step.detail = f"access token obtained from {uri} for {self._client_email()}"

    def _check_topic(
        self, client: Any, step: CheckStep, remaining: Callable[[], float], fail: Callable[..., None]
    ) -> None:
        from google.api_core import exceptions as gexc
        from google.api_core.retry import Retry

        budget = remaining()
        # A short retry rides over one dropped connection without hiding a dead endpoint for long.
        retry = Retry(
            predicate=lambda e: isinstance(e, gexc.ServiceUnavailable) and self._classify(e).retryable,
            initial=0.2,
            maximum=1.0,
            timeout=max(0.1, min(5.0, budget)),
        )
        try:
            client.get_topic(request={"topic": self.topic_path}, retry=retry, timeout=max(0.1, budget))
        except gexc.NotFound:
            fail(
                step,
                "TOPIC_NOT_FOUND",
                f"topic {self.topic_path} does not exist",
                f"create it (gcloud pubsub topics create {self.topic_id} --project={self.project_id}) or fix "
                "--topic-id / --project-id with dmrepl recreate",
            )
        except gexc.PermissionDenied:
            # roles/pubsub.publisher lacks pubsub.topics.get: a least-privilege account is not a failure here.
            step.status = "skipped"
            step.detail = (
                f"{self._client_email()} may not read the topic's metadata (pubsub.topics.get); its "
                "existence is checked by the permission test"
            )
        except Exception as exc:  # classified below: unreachable, auth, anything else
            failure = self._classify(exc)
            code = failure.code
            fix = {
                "UNREACHABLE": f"check that {self._target} is reachable from this machine (DNS, proxy, firewall)"
                + (", and that the emulator is running" if self._emulator else ""),
                "AUTH_FAILED": f"create a new key for {self._client_email()} and run dmrepl recreate",
            }.get(code, "see the detail; run dmrepl check again")
            fail(step, code, failure.message, fix)
        else:
            step.detail = f"{self.topic_path} exists"

    def _check_permission(
        self,
        client: Any,
        step: CheckStep,
        remaining: Callable[[], float],
        fail: Callable[..., None],
        topic_unverified: bool,
    ) -> None:
        from google.api_core import exceptions as gexc

        email = self._client_email()
        grant = (
            f"grant roles/pubsub.publisher to {email} on topic {self.topic_id} (gcloud pubsub topics "
            f"add-iam-policy-binding {self.topic_id} --project={self.project_id} "
            f"--member=serviceAccount:{email} --role=roles/pubsub.publisher)"
        )
        try:
            resp = client.test_iam_permissions(
                request={"resource": self.topic_path, "permissions": ["pubsub.topics.publish"]},
                retry=None,
                timeout=max(0.1, remaining()),
            )
        except gexc.MethodNotImplemented:
            if topic_unverified:
                fail(
                    step,
                    "PERMISSION_DENIED",
                    "the topic could not be read and this server cannot test permissions",
                    f"grant roles/pubsub.viewer to {email} on topic {self.topic_id}, or check it",
                )
            else:
                step.status = "skipped"
                step.detail = f"{self._target} does not implement TestIamPermissions (e.g. an emulator)"
        except gexc.NotFound:
            fail(
                step,
                "TOPIC_NOT_FOUND",
                f"topic {self.topic_path} does not exist",
                "create it or fix --topic-id / --project-id with dmrepl recreate",
            )
        except gexc.PermissionDenied:
            fail(step, "PERMISSION_DENIED", f"{email} may not test permissions on {self.topic_path}", grant)
        except Exception as exc:
            failure = self._classify(exc)
            fail(step, failure.code, failure.message, "see the detail; run dmrepl check again")
        else:
            if "pubsub.topics.publish" in list(resp.permissions):
                step.detail = f"{email} may publish to {self.topic_path}"
            else:
                fail(step, "PERMISSION_DENIED", f"{email} lacks pubsub.topics.publish on {self.topic_path}", grant)

    # ---------------------------------------------------------------------------------------------- delivery

    def open(self) -> None:
        """Build the client and start the workers; nothing touches the network before the first request."""
        if self._client is not None:
            return
        if self.secret is None and not self._emulator and self.settings.get("credentials") != ADC:
            raise DestinationError("AUTH_FAILED", "no credentials are stored for this replication")
        from google.pubsub_v1.types import pubsub as pubsub_types

        try:
            self._clients = [self._make_client(lambda: 30.0) for _ in range(CHANNELS)]
        except ValueError as exc:
            raise DestinationError("AUTH_FAILED", self._scrub(f"the credentials do not load: {exc}")) from None
        self._client = self._clients[0]
        self._budget = memory_budget()
        self._req_cls = pubsub_types.PublishRequest.pb()
        self._wrap = pubsub_types.PublishRequest.wrap
        self._buckets = ORDERING_BUCKETS if self.ordering else 1
        self._keys = tuple(ORDERING_KEY_FORMAT.format(bucket=n) for n in range(self._buckets))
        workers = WORKERS
        # With ordering, worker i alone sends the buckets n % workers == i, one request at a time and in order;
        # without, every worker takes from the one shared lane.
        self._lanes = workers if self.ordering else 1
        self._full = [deque() for _ in range(self._lanes)]
        self._threads = [
            threading.Thread(
                target=self._worker,
                args=(
                    i % self._lanes,
                    tuple(range(i % self._lanes, self._buckets, self._lanes)),
                    self._clients[i % len(self._clients)],
                ),
                name=f"pubsub-publish-{i}",
                daemon=True,
            )
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def send(self, messages: Sequence[Message]) -> None:
        """Queue messages for publishing; blocks while too much is unacknowledged (flow control)."""
        if self._client is None:
            self.open()
        self._raise_if_failed()
        req_cls, keys, buckets, lanes = self._req_cls, self._keys, self._buckets, self._lanes
        limit = SERVER_REQUEST_MAX_BYTES - len(self.topic_path) - 16
        max_messages, max_bytes = BATCH_MAX_MESSAGES, BATCH_MAX_BYTES
        with self._cond:
            if not self._outstanding:
                self._last_progress = time.monotonic()
            for data, doc_type, op, upid in messages:
                bucket = zlib.crc32(upid.encode()) % buckets if self.ordering else 0
                key = keys[bucket] if self.ordering else ""
                size = len(data) + len(doc_type) + len(op) + len(key) + _MESSAGE_OVERHEAD
                if size > limit:
                    raise DestinationError(
                        "PAYLOAD_TOO_LARGE", f"a {len(data)}-byte operation exceeds Pub/Sub's request limit"
                    )
                if self._outstanding and (
                    self._outstanding >= MAX_OUTSTANDING_MESSAGES or self._outstanding_bytes + size > self._budget
                ):
                    self._wait_for_room(size)
                batch = self._open.get(bucket)
                if batch is not None and (batch.count >= max_messages or batch.nbytes + size > max_bytes):
                    del self._open[bucket]
                    self._full[bucket % lanes].append(batch)
                    self._cond.notify_all()
                    batch = None
                if batch is None:
                    batch = self._open[bucket] = _Batch(bucket, req_cls(topic=self.topic_path))
                    self._cond.notify_all()
                batch.add(data=data, attributes={"doc_type": doc_type, "op": op}, ordering_key=key)
                batch.count += 1
                batch.nbytes += size
                self._outstanding += 1
                self._outstanding_bytes += size

    def flush(self) -> None:
        """Return once every message sent so far is acknowledged; raise DestinationError if any failed."""
        if self._client is None:
            return
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._outstanding and self._failure is None:
                    self._cond.wait(0.5)
                    self._check_progress()
                # Requests in flight when one failed may still be acknowledged (on other connections, in any
                # order): their answers are awaited, briefly, so that `acknowledged` counts all the service took.
                settle = time.monotonic() + _SETTLE_S
                while self._failure is not None and self._window.in_flight and time.monotonic() < settle:
                    self._cond.wait(0.1)
            finally:
                self._urgent -= 1
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the workers and the channel. Unflushed messages are abandoned (the engine re-sends them)."""
        if self._client is None:
            return
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        # Closing the channels cancels RPCs in flight, so a hung server cannot hold the workers.
        for client in self._clients:
            client.transport.close()
        deadline = time.monotonic() + 5
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._client = None
        self._clients = []

    # ------------------------------------------------------------------------------------------- internals

    def _wait_for_room(self, size: int) -> None:
        """Flow control, lock held: wait for acknowledgements or a failure.

        When no full batch is waiting, what is outstanding is open batches and requests in flight, so the workers
        are told to take open batches at once rather than wait for them to fill.
        """
        while self._outstanding and (
            self._outstanding >= MAX_OUTSTANDING_MESSAGES or self._outstanding_bytes + size > self._budget
        ):
            if self._failure is not None:
                break
            urgent = not any(self._full)
            self._urgent += urgent
            if urgent:
                self._cond.notify_all()
            try:
                self._cond.wait(0.5)
            finally:
                self._urgent -= urgent
            self._check_progress()
        if self._failure is not None:
            raise self._error()

    def _check_progress(self) -> None:
        """Last-resort watchdog: the workers bound every request, so this only fires on a bug or a wedged stack."""
        stalled = time.monotonic() - self._last_progress
        if self._outstanding and self._failure is None and stalled > self.retry_budget_s + 90:
            self._failure = _Failure(
                "UNREACHABLE", f"no acknowledgement from {self._target} for {stalled:.0f} s", False
            )

    def _error(self) -> DestinationError:
        assert self._failure is not None
        pending = self._outstanding
        note = f"; {pending} message(s) not acknowledged" if pending else ""
        return DestinationError(self._failure.code, self._failure.message + note)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            with self._lock:
                raise self._error()

    def _next_batch(self, lane: int, owned: tuple[int, ...]) -> _Batch | None:
        """Lock held. A full batch first (older than any open one of the same bucket), else the oldest open batch
        that is due: older than BATCH_MAX_LATENCY_S, or wanted now by flush/flow control. Waits otherwise, so
        open batches keep filling while this worker is busy: batches grow with the load."""
        while not self._stop.is_set():
            full = self._full[lane]
            if full:
                return full.popleft()
            now = time.monotonic()
            oldest: _Batch | None = None
            for bucket in owned:
                batch = self._open.get(bucket)
                if batch is not None and (oldest is None or batch.created < oldest.created):
                    oldest = batch
            if oldest is not None and (self._urgent or now - oldest.created >= BATCH_MAX_LATENCY_S):
                del self._open[oldest.bucket]
                return oldest
            self._cond.wait(0.5 if oldest is None else BATCH_MAX_LATENCY_S - (now - oldest.created))
        return None

    def _done(self, batch: _Batch, failure: _Failure | None = None) -> None:
        with self._cond:
            n = batch.count
            self._outstanding -= n
            self._outstanding_bytes -= batch.nbytes
            if failure is None:
                self.acked += n
                self.acknowledged += n
            else:
                self.failed += n
                if self._failure is None:
                    self._failure = failure
            self._last_progress = time.monotonic()
            self._cond.notify_all()

    def _worker(self, lane: int, owned: tuple[int, ...], client: Any) -> None:
        while True:
            with self._cond:
                batch = self._next_batch(lane, owned)
                if batch is None:
                    return
            waited = self._window.acquire(self._stop.is_set)
            throttled = False
            try:
                throttled = self._publish(batch, client)
            except BaseException as exc:  # a worker must never die silently: flush would wait forever
                self._done(batch, _Failure("PUBLISH_FAILED", self._scrub(f"{type(exc).__name__}: {exc}"), False))
            finally:
                self._window.release(waited, throttled)

    def _publish(self, batch: _Batch, client: Any) -> bool:
        """One request, retried in place (which keeps a bucket's order) until acknowledged or out of budget. True
        when a retryable failure was met on the way (the window then shrinks)."""
        throttled = False
        if self._failure is not None or self._stop.is_set():
            self._done(batch, self._failure or _Failure("PUBLISH_FAILED", "the destination was closed", False))
            return throttled
        request = self._wrap(batch.request)
        backoff = Backoff(self.retry_budget_s, **PUBLISH_BACKOFF)
        attempts = 0
        while True:
            attempts += 1
            left = self.retry_budget_s - (time.monotonic() - backoff.started)
            try:
                if self._token_lock is not None and not self._creds.valid:
                    with self._token_lock:
                        if not self._creds.valid:
                            self._creds.refresh(_TimedRequest(min(30.0, max(5.0, left))))
                resp = client.publish(request=request, retry=None, timeout=min(60.0, max(5.0, left)))
            except Exception as exc:
                failure = self._classify(exc)
                throttled = throttled or failure.retryable
                if (
                    failure.retryable
                    and self._failure is None
                    and not self._stop.is_set()
                    and backoff.sleep_or_give_up(self._stop.wait)
                ):
                    continue
                if failure.retryable:
                    failure = _Failure(
                        failure.code,
                        f"{failure.message}; gave up after {attempts} attempt(s) within the retry budget of "
                        f"{self.retry_budget_s:g} s",
                        False,
                    )
                self._done(batch, failure)
                return throttled
            if len(resp.message_ids) != batch.count:
                self._done(batch, _Failure("PUBLISH_FAILED", "Pub/Sub acknowledged only part of a request", False))
            else:
                self._done(batch)
            return throttled
