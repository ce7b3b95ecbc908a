"""Azure Event Hubs destination: events sent in full batches, one batch stream per partition.

Ordering and batching. The partition key of every event is its user_point_id, so all operations of a user point land
in one partition, in order. A batch carries one partition key, and one batch per key would mean one ~30 ms round trip
per user point; so we compute each key's partition ourselves, exactly as the service and the .NET, Java and JavaScript
SDKs map a partition key (`dmrepl.partitions`), fill one batch per partition, and send it to that partition when it is
full or at `flush()`. Each event still carries its `x-opt-partition-key` annotation, as the SDK's buffered mode sends
it, so consumers see the key, and any other producer sending the same key lands in the same partition. One thread per
partition sends that partition's batches in order, and a failed batch is retried before the next one is sent, so the
per-key order is kept (at-least-once: a batch whose acknowledgement was lost may arrive twice).

Throughput over a long round trip. The SDK's send waits for each batch's disposition, so a partition link carries one
batch per round trip. Each partition therefore has up to `MAX_LANES` lanes, each a client of its own (a connection and
a link per partition) owning a fixed share of the keys (crc32 of the key): a key's batches still go one at a time, in
order, on one link, while the lanes of a partition have several batches in flight. Every lane's links are opened
concurrently by `open()`, not one by one at their first send.

Encoding. Building events through `EventData` + `EventDataBatch.add` costs ~85 µs per event (two full encodes in
pure Python), which would cap a sync at ~10,000 events/s. Our events have a fixed shape (annotation, content type,
two properties, one data section), so we encode them ourselves in ~2 µs and append the bytes to an `EventDataBatch`
sized by the link's max message size. That touches the batch's private fields, so `open()` first proves, for the
installed SDK, that our bytes and size accounting equal what `EventDataBatch.add` produces; if not, it falls back to
`add`.

Errors. `AuthenticationError` (or a link detached with `amqp:unauthorized-access`) → AUTH_FAILED at once; a missing
hub → EVENT_HUB_NOT_FOUND at once; a batch refused as too large → PAYLOAD_TOO_LARGE; anything else is retried with
backoff within `retry_budget_s`, then UNREACHABLE. When the SDK's exception is ambiguous (a send on a link the service
detached reports `unknown-error`), one management read tells a missing hub or a refused key from a network fault.
Every SDK call runs under a watchdog: the SDK waits without limit for a connection that opened but never answers
(`while not client_ready(): sleep(0.05)`), so a call past its time is abandoned, its client replaced, and the attempt
counted as a transient failure.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import functools
import json
import os
import queue
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dmrepl.credentials import Defects, decode, is_loopback, sha256
from dmrepl.destinations.base import (
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
from dmrepl.operations import DATA, KEY, Message
from dmrepl.partitions import partition_for

if TYPE_CHECKING:
    from azure.eventhub import EventDataBatch, EventHubProducerClient

CONTENT_TYPE = "application/json"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")
PARTITION_KEY_ANNOTATION = "x-opt-partition-key"
CHECK_STEPS = ("connection-string", "cbs-auth", "event-hub")
AUTH_FIX = (
    "check SharedAccessKeyName/SharedAccessKey (or the SharedAccessSignature and its expiry) against the namespace's "
    "shared access policies, or generate a new key for the policy, then `dmrepl recreate`; a namespace that disables "
    "SAS (local) authentication takes only Microsoft Entra ID: recreate with --auth managed-identity, "
    "service-principal or default"
)
KEYLESS_AUTH_FIX = (
    "grant the identity the 'Azure Event Hubs Data Sender' role on the event hub or namespace, check that it is the "
    "identity you meant (--client-id), and that the machine's clock is right"
)
#: The scope azure-eventhub asks Entra ID tokens for (its JWT_TOKEN_SCOPE).
TOKEN_SCOPE = "https://eventhubs.azure.net/.default"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


class Auth(enum.StrEnum):
    """How a replication authenticates: a SAS connection string, or a Microsoft Entra ID identity (azure-identity)."""

    SAS = "sas"
    MANAGED_IDENTITY = "managed-identity"
    SERVICE_PRINCIPAL = "service-principal"
    DEFAULT = "default"


#: Partition key (a user_point_id has 36 characters) and doc type lengths budgeted by `max_message_bytes`.
_KEY_RESERVE = 64
_DOC_TYPE_RESERVE = 32
_SEND_TIMEOUT_S = 60.0
_MANAGEMENT_TIMEOUT_S = 30.0
#: After a failure, how long the batches in flight on other lanes are awaited before the failure is reported.
_SETTLE_S = 5.0
_CHECK_ATTEMPTS = 3
_PARTITION_CACHE = 200_000
#: Most sender lanes per partition. A partition link has one batch in flight at a time (the SDK's send waits for
#: its disposition), so over a long round trip one lane per partition idles between acknowledgements; each lane is
#: a client of its own (its own connection and link to the partition) and owns a fixed share of the keys, so every
#: key still has one batch in flight at a time, in order. Lanes are bounded by the memory budget: each holds up to
#: three batches (one filling, one queued, one in flight).
MAX_LANES = 4
_BATCHES_PER_LANE = 3
_ENCODED_CACHE = 50_000


class _Sdk:
    """The SDK names we use, imported on first use so that `dmrepl --help` never loads azure.eventhub."""

    def __init__(self) -> None:
        from azure.eventhub import EventData, EventDataBatch, EventHubProducerClient
        from azure.eventhub import exceptions as eh_exceptions

        self.EventData = EventData
        self.EventDataBatch = EventDataBatch
        self.EventHubProducerClient = EventHubProducerClient
        self.AuthenticationError = eh_exceptions.AuthenticationError
        from azure.core.exceptions import ClientAuthenticationError

        self.ClientAuthenticationError = ClientAuthenticationError


def parse_connection_string(text: str, defects: Defects) -> dict[str, str]:
    """Split a connection string as azure-core's parser does (the one azure-eventhub uses), so that what dmrepl saves
    is what the SDK will accept: `Key=Value` segments separated by `;` (a trailing `;` allowed), neither side empty,
    no key twice in any case. Returns the keys lower-cased; values keep their case. Only the whole string's
    surrounding whitespace and BOM are tolerated."""
    text = text.strip().lstrip("\ufeff").strip()
    if "\n" in text:
        defects.add("file", "holds more than one line; expected one connection string")
        return {}
    if not text:
        defects.add("file", "holds no connection string")
        return {}
    parts: dict[str, str] = {}
    for i, segment in enumerate(text.rstrip(";").split(";"), start=1):
        key, sep, value = segment.partition("=")
        if not sep or not key or not value:
            defects.add(f"segment {i}", "is not Key=Value (both non-empty)")
            continue
        if key.lower() in parts:
            defects.add(key, "appears twice (the SDK refuses a duplicated key)")
            continue
        parts[key.lower()] = value
    return parts


def validate(raw: bytes, source: str, *, event_hub: str | None) -> Binding:
    """A connection string and the event hub name. What azure-eventhub refuses (its parser and client constructor)
    is refused, every defect named by field; what it accepts but looks wrong is a warning. One rule is dmrepl's own:
    `UseDevelopmentEmulator=true` turns TLS off, so it is refused for any endpoint but a loopback one."""
    defects = Defects(source)
    warnings: list[str] = []
    text = decode(raw, defects)
    parts = parse_connection_string(text, defects) if text is not None else {}
    namespace = None
    if text is not None and not defects.items:
        endpoint = (parts.get("endpoint") or parts.get("hostname") or "").rstrip("/")
        host = ""
        if not endpoint:
            defects.add("Endpoint", "is missing")
        else:
            url = urlsplit(endpoint)
            host = url.hostname or ""
            if not url.netloc.strip():
                defects.add("Endpoint", "must look like sb://<namespace>.servicebus.windows.net/")
            elif url.scheme.lower() not in ("sb", "amqps"):
                warnings.append(f"Endpoint: scheme {url.scheme!r} is unusual (sb:// or amqps:// expected)")
            namespace = url.netloc.strip()
        emulator = parts.get("usedevelopmentemulator")
        if emulator == "true" and host and not is_loopback(host):
            defects.add(
                "UseDevelopmentEmulator",
                "is accepted only for a loopback endpoint (localhost, 127.0.0.1): it turns TLS off",
            )
        elif emulator is not None and emulator != "true" and emulator.lower() == "true":
            warnings.append(
                f"UseDevelopmentEmulator={emulator}: the SDK honours only 'true' in lower case (TLS stays on)"
            )
        key_name, key, sas = (
            parts.get("sharedaccesskeyname"),
            parts.get("sharedaccesskey"),
            parts.get("sharedaccesssignature"),
        )
        if bool(key_name) != bool(key):
            defects.add("SharedAccessKey" if key_name else "SharedAccessKeyName", "is missing (both or neither)")
        if sas and key:
            defects.add("SharedAccessSignature", "and SharedAccessKey are both given: give only one")
        elif not sas and not key and not key_name:
            defects.add("SharedAccessKey", "is missing (or give SharedAccessSignature)")
        if sas and not sas.startswith("SharedAccessSignature "):
            warnings.append("SharedAccessSignature: does not start with 'SharedAccessSignature sr='")
        if key and emulator != "true":
            try:
                base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                warnings.append("SharedAccessKey: is not base64, as the keys Azure issues are")
        entity = parts.get("entitypath") or None
        if event_hub and entity and event_hub != entity:
            defects.add("--event-hub", f"{event_hub!r} differs from the connection string's EntityPath {entity!r}")
        hub = event_hub or entity
        if not hub:
            defects.add("--event-hub", "is required (the connection string has no EntityPath)")
        elif not _HUB_NAME.match(hub):
            warnings.append(f"--event-hub: {hub[:80]!r} is not a name Event Hubs accepts (letters, digits, . _ -)")
    defects.raise_if_any("azure-event-hubs connection string or settings")
    assert text is not None
    secret = text.strip().lstrip("\ufeff").strip()
    fingerprint = {
        "namespace": namespace,
        "shared_access_key_name": parts.get("sharedaccesskeyname"),
        "entity_path": parts.get("entitypath"),
        "sha256": sha256(secret),
    }
    settings = {"event_hub": event_hub or parts.get("entitypath"), "namespace": namespace}
    return Binding(
        settings=settings,
        secret=secret,
        fingerprint={k: v for k, v in fingerprint.items() if v},
        warnings=warnings,
    )


def validate_keyless(
    auth: Auth,
    *,
    namespace: str | None,
    event_hub: str | None,
    client_id: str | None,
    raw: bytes | None,
    source: str,
    credentials_given: bool,
) -> Binding:
    """An Entra ID binding: where (namespace, hub), which identity, and for a service principal its secret (the
    only part stored in the secret store). Every defect named by field; nothing of the secret echoed."""
    defects = Defects(source or f"--auth {auth}")
    if not namespace:
        defects.add("--namespace", "is required with --auth (e.g. mynamespace.servicebus.windows.net)")
    elif not _NAMESPACE.match(namespace) or ("." not in _host(namespace) and not is_loopback(_host(namespace))):
        defects.add("--namespace", "must be a host name like mynamespace.servicebus.windows.net")
    if not event_hub:
        defects.add("--event-hub", "is required with --auth")
    elif not _HUB_NAME.match(event_hub):
        defects.add("--event-hub", "is not a name Event Hubs accepts (letters, digits, . _ -)")
    if client_id is not None and not _GUID.match(client_id):
        defects.add("--client-id", "must be an application (client) id, a GUID")
    settings: dict[str, Any] = {"auth": str(auth), "namespace": namespace, "event_hub": event_hub}
    fingerprint: dict[str, Any] = {"auth": str(auth), "namespace": namespace}
    secret: str | None = None
    if auth is Auth.SERVICE_PRINCIPAL:
        if client_id is not None:
            defects.add("--client-id", "is read from the service principal's file with --auth service-principal")
        if raw is None:
            defects.add(
                "--credentials",
                "is required with --auth service-principal (a JSON file: tenant, appId, password or certificate)",
            )
        else:
            principal = _service_principal(raw, defects)
            if principal is not None:
                secret = json.dumps(principal, sort_keys=True)
                settings.update(tenant_id=principal["tenant"], client_id=principal["appId"])
                fingerprint.update(tenant_id=principal["tenant"], client_id=principal["appId"], sha256=sha256(secret))
    else:
        if credentials_given:
            defects.add("--credentials", f"is not used with --auth {auth}: the identity comes from the machine")
        if client_id:
            settings["client_id"] = fingerprint["client_id"] = client_id
    defects.raise_if_any(f"azure-event-hubs --auth {auth} settings")
    return Binding(
        settings={k: v for k, v in settings.items() if v is not None},
        secret=secret,
        fingerprint={k: v for k, v in fingerprint.items() if v},
    )


def _host(namespace: str) -> str:
    return namespace.rsplit(":", 1)[0] if re.search(r":[0-9]+$", namespace) else namespace


def _claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified: only to name the principal in messages (the service verifies the token)."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return claims if isinstance(claims, dict) else {}
    except (IndexError, ValueError):
        return {}


class _TrackingCredential:
    """An azure-identity credential that remembers who its last token was for, so that a refusal can name the
    principal (application id, object id or user) instead of "the credentials"."""

    def __init__(self, inner: Any, described: str) -> None:
        self.inner = inner
        self.described = described
        self.principal: str | None = None

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        token = self.inner.get_token(*scopes, **kwargs)
        claims = _claims(token.token)
        who = claims.get("upn") or claims.get("appid") or claims.get("azp") or claims.get("oid")
        if who:
            self.principal = f"{who} (tenant {claims['tid']})" if claims.get("tid") else str(who)
        return token

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.close()


def _service_principal(raw: bytes, defects: Defects) -> dict[str, str] | None:
    """`az ad sp create-for-rbac`'s output (tenant, appId, password), or tenantId/clientId/clientSecret, or a
    certificate (PEM with its private key) instead of the password."""
    text = decode(raw, defects)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except ValueError as exc:
        defects.add("file", f"is not JSON (line {getattr(exc, 'lineno', '?')})")
        return None
    if not isinstance(info, dict):
        defects.add("file", "is not a JSON object")
        return None

    def field_(*names: str) -> str | None:
        for name in names:
            value = info.get(name)
            if value is not None:
                if not isinstance(value, str) or not value.strip():
                    defects.add(name, "must be a non-empty string")
                    return None
                return value.strip()
        return None

    tenant = field_("tenant", "tenantId")
    app_id = field_("appId", "clientId")
    password = field_("password", "clientSecret")
    certificate = field_("certificate", "clientCertificate")
    if tenant is None and "tenant" not in info and "tenantId" not in info:
        defects.add("tenant", "is missing (the directory (tenant) id)")
    elif tenant is not None and not _GUID.match(tenant) and "." not in tenant:
        defects.add("tenant", "must be a tenant id (a GUID) or a domain name")
    if app_id is None and "appId" not in info and "clientId" not in info:
        defects.add("appId", "is missing (the application (client) id)")
    elif app_id is not None and not _GUID.match(app_id):
        defects.add("appId", "must be an application (client) id, a GUID")
    if password and certificate:
        defects.add("password", "and certificate are both given: give only one")
    elif not password and not certificate and not {"password", "clientSecret", "certificate"} & info.keys():
        defects.add("password", "is missing (or give certificate: a PEM with the private key)")
    if certificate and ("PRIVATE KEY-----" not in certificate or "CERTIFICATE-----" not in certificate):
        defects.add("certificate", "must be a PEM holding the certificate and its private key")
    if defects.items or tenant is None or app_id is None:
        return None
    principal = {"tenant": tenant, "appId": app_id}
    if password:
        principal["password"] = password
    if certificate:
        principal["certificate"] = certificate
    return principal


class EventHubsType(DestinationType):
    name = "azure-event-hubs"
    options = (
        OptionSpec("event_hub", "--event-hub", "Event hub name (default: the connection string's EntityPath)."),
        OptionSpec(
            "auth",
            "--auth",
            "sas (a connection string, the default), managed-identity, service-principal or default "
            "(azure-identity's DefaultAzureCredential).",
            Auth,
            credential=True,
        ),
        OptionSpec("namespace", "--namespace", "Namespace host, with --auth (NS.servicebus.windows.net)."),
        OptionSpec(
            "client_id", "--client-id", "A user-assigned managed identity's client id (--auth).", credential=True
        ),
    )
    credentials_help = (
        "a credentials.txt holding one Event Hubs connection string (or --auth managed-identity, service-principal "
        "with a JSON file, or default)"
    )

    def credentials_required(self, options: Mapping[str, Any] | None = None) -> bool:
        """`bind` says what is missing: whether a file is needed depends on the binding being replaced too."""
        return False

    def bind(
        self, options: Mapping[str, Any], raw: bytes | None, source: str, previous: Mapping[str, Any] | None
    ) -> Binding:
        auth = Auth(self.previous_or(options, previous, "auth") or Auth.SAS)
        if auth is Auth.SAS:
            defects = Defects(source or "--auth sas")
            for name, flag in (("namespace", "--namespace"), ("client_id", "--client-id")):
                if options.get(name) is not None:
                    defects.add(
                        flag,
                        "is for --auth managed-identity/service-principal/default: a connection "
                        "string names its namespace",
                    )
            if raw is None:
                defects.add(
                    "--credentials",
                    "a credentials.txt holding one Event Hubs connection string is "
                    "required (or --auth managed-identity, service-principal or default)",
                )
            defects.raise_if_any("azure-event-hubs settings")
            assert raw is not None
            return validate(raw, source, event_hub=self.previous_or(options, previous, "event_hub"))
        same_auth = previous is not None and previous.get("auth") == auth
        return validate_keyless(
            auth,
            namespace=self.previous_or(options, previous, "namespace"),
            event_hub=self.previous_or(options, previous, "event_hub"),
            client_id=options.get("client_id") or (previous or {}).get("client_id")
            if same_auth
            else options.get("client_id"),
            raw=raw,
            source=source,
            credentials_given=bool(options.get("credentials")),
        )

    def expires_at(
        self, settings: Mapping[str, Any], secret: str | None, *, fetch_timeout_s: float | None = None
    ) -> tuple[datetime, str] | None:
        """A `SharedAccessSignature=` connection string stops working at its `se=` (seconds since the epoch); a key
        (`SharedAccessKey=`) signs fresh tokens and never expires on its own."""
        if not secret:
            return None
        parts = parse_connection_string(secret, Defects("stored credentials"))
        signature = parts.get("sharedaccesssignature") or ""
        for field_ in signature.removeprefix("SharedAccessSignature ").split("&"):
            key, _, value = field_.strip().partition("=")
            if key.lower() == "se" and value.isdigit():
                try:
                    return datetime.fromtimestamp(int(value), UTC), "SharedAccessSignature se="
                except (OverflowError, ValueError, OSError):
                    return None
        return None

    def describe(self, settings: Mapping[str, Any]) -> str:
        return f"{settings.get('namespace', '')}/{settings.get('event_hub')}"

    def destination(
        self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    ) -> Destination:
        return EventHubsDestination(settings, secret, retry_budget_s=retry_budget_s)


TYPE = EventHubsType()


class EventHubsDestination(Destination):
    type_name = "azure-event-hubs"
    #: Until `open()` reads the link's limit: the service's 1 MiB minus per-event overhead.
    max_message_bytes = 1_048_576 - 512

    def __init__(
        self, settings: Mapping[str, Any], secret: str | None, *, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    ) -> None:
        super().__init__(settings, secret, retry_budget_s=retry_budget_s)
        self._auth = Auth(self.settings.get("auth") or Auth.SAS)
        self._conn_str = (secret or "").strip().lstrip("\ufeff").strip() if self._auth is Auth.SAS else ""
        self._fields = (  # validated at create
            parse_connection_string(self._conn_str, Defects("connection string")) if self._auth is Auth.SAS else {}
        )
        self._hub: str = str(self.settings.get("event_hub") or self._fields.get("entitypath") or "")
        self._identity: _TrackingCredential | None = None
        self._sdk_names: _Sdk | None = None
        self._clients: list[EventHubProducerClient] = []  # one per lane
        self._client_lock = threading.Lock()
        self._partition_ids: list[str] = []
        self._lanes = 1
        self._window = Window(1, 1, 1)
        self._route_of: dict[str, tuple[str, int]] = {}
        self._batches: dict[tuple[str, int], EventDataBatch] = {}
        self._max_batch_bytes = 0
        self._fast = False
        self._annotations: dict[str, bytes] = {}
        self._app_props: dict[tuple[str, str], bytes] = {}
        self._senders: dict[tuple[str, int], _PartitionSender] = {}
        self._error: DestinationError | None = None
        self._error_lock = threading.Lock()
        self._closing = False

    # -- identity, for messages ------------------------------------------------------------------------------------

    @property
    def _namespace(self) -> str:
        if self._auth is not Auth.SAS:
            return str(self.settings.get("namespace") or "?")
        endpoint = self._fields.get("endpoint", "")
        host = re.sub(r"^[a-z]+://", "", endpoint, flags=re.IGNORECASE).split("/")[0]
        return host or str(self.settings.get("namespace") or "?")

    @property
    def _where(self) -> str:
        return f"event hub '{self._hub}' in namespace {self._namespace}"

    # -- connectivity check -----------------------------------------------------------------------------------------

    def check(self, timeout_s: float = 20.0) -> list[CheckStep]:
        """Parse → CBS put-token → management READ of the hub; never sends an event.

        The SDK has no public call that authenticates without also reading: `get_eventhub_properties()` does the
        `$cbs` put-token and, only once the token is accepted, the `$management` READ. So steps 2 and 3 come from that
        one call, attributed by where it failed: an AuthenticationError is the token being refused (cbs-auth); a
        404/not-found can only follow an accepted token (cbs-auth ok, event-hub failed); no answer is UNREACHABLE on
        cbs-auth, the first step that needs the network. The call's time is shown on cbs-auth.
        """
        deadline = time.monotonic() + timeout_s
        steps: list[CheckStep] = []
        if self._auth is not Auth.SAS:
            return self._check_keyless(deadline)
        with timed_step(steps, "connection-string") as step:
            problem = self._connection_string_problem()
            if problem:
                step.status, step.code, step.detail = "failed", "INVALID_CREDENTIALS", problem
                step.fix = "fix the connection string (Endpoint, SharedAccessKeyName, SharedAccessKey) and --event-hub"
            else:
                policy = self._fields.get("sharedaccesskeyname") or "(shared access signature)"
                step.detail = f"namespace {self._namespace}, policy {policy}, event hub '{self._hub}'"
        if step.status == "failed":
            skip_rest(steps, CHECK_STEPS[1:])
            return steps
        return steps + self._hub_steps(deadline, "SAS token", "(--event-hub / EntityPath), then `dmrepl recreate`")

    def _hub_steps(self, deadline: float, token: str, hub_fix: str) -> list[CheckStep]:
        """cbs-auth (the token accepted) and event-hub (it exists), from one management call."""
        auth, hub = CheckStep("cbs-auth"), CheckStep("event-hub")
        start = time.monotonic()
        outcome, value = self._check_call(deadline)
        auth.duration_ms = int((time.monotonic() - start) * 1000)
        if outcome == "ok":
            auth.detail = f"{token} accepted by {self._namespace} for '{self._hub}'"
            ids = value["partition_ids"]
            hub.detail = f"'{self._hub}': {len(ids)} partitions ({', '.join(ids)})"
        elif outcome == "EVENT_HUB_NOT_FOUND":
            auth.detail = f"{token} accepted by {self._namespace}"
            hub.status, hub.code, hub.detail = "failed", outcome, value
            hub.fix = (
                f"create event hub '{self._hub}' in namespace {self._namespace}, or name an existing one {hub_fix}"
            )
        else:
            auth.status, auth.code, auth.detail = "failed", outcome, value
            if outcome == "AUTH_FAILED":
                auth.fix = AUTH_FIX if self._auth is Auth.SAS else KEYLESS_AUTH_FIX
            else:
                auth.fix = (
                    f"check that {self._namespace} resolves and that outbound AMQP (TCP 5671) is allowed by "
                    "firewalls and proxies"
                )
            hub.status, hub.detail = "skipped", "an earlier step failed"
        return [auth, hub]

    def _check_keyless(self, deadline: float) -> list[CheckStep]:
        """token (from the identity, via azure-identity) → cbs-auth (the service accepts it) → event-hub."""
        steps: list[CheckStep] = []
        with timed_step(steps, "token") as step:
            try:
                self._credential()
            except DestinationError as exc:
                step.status, step.code, step.detail = "failed", exc.code, exc.message
                step.fix = "check the identity (a certificate must be a PEM with its key), then dmrepl rotate"
                skip_rest(steps, CHECK_STEPS[1:])
                return steps
            ok, value = _bounded(
                lambda: self._credential().get_token(TOKEN_SCOPE), max(1.0, deadline - time.monotonic())
            )
            if ok:
                step.detail = f"Entra ID token for {self._principal()} from {self._credential().described}"
            else:
                step.status, step.code = "failed", "AUTH_FAILED"
                step.detail = (
                    f"no token from {self._credential().described} within the check's time limit"
                    if value is None
                    else f"{self._credential().described} gave no token: {self._summary(value)}"
                )
                step.fix = {
                    Auth.MANAGED_IDENTITY: "run on a machine with a managed identity (VM, App Service, AKS workload "
                    "identity), or give the user-assigned identity's --client-id",
                    Auth.SERVICE_PRINCIPAL: "check the service principal's tenant, appId and password (or "
                    "certificate) and its expiry; `dmrepl rotate` with a new secret",
                    Auth.DEFAULT: "sign in (az login) or configure an identity DefaultAzureCredential finds "
                    "(AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, a managed identity)",
                }[self._auth]
        if step.status == "failed":
            skip_rest(steps, CHECK_STEPS[1:])
            return steps
        return steps + self._hub_steps(deadline, f"Entra ID token (jwt) of {self._principal()}", "(--event-hub)")

    def _credential(self) -> _TrackingCredential:
        """One azure-identity credential per destination (its token cache is shared by every lane's client); a
        credential azure-identity will not build (a certificate it cannot read) is AUTH_FAILED, not a crash."""
        if self._identity is None:
            try:
                self._identity = self._make_identity()
            except Exception as exc:
                raise DestinationError(
                    "AUTH_FAILED",
                    f"{self._where}: the --auth {self._auth} identity cannot be used: {self._summary(exc)}",
                ) from None
        return self._identity

    def _make_identity(self) -> _TrackingCredential:
        from azure import identity

        client_id = self.settings.get("client_id")
        if self._auth is Auth.MANAGED_IDENTITY:
            inner: Any = identity.ManagedIdentityCredential(client_id=client_id)
            described = f"the managed identity{f' {client_id}' if client_id else ' (system-assigned)'}"
        elif self._auth is Auth.SERVICE_PRINCIPAL:
            principal = json.loads(self.secret or "{}")
            tenant, app_id = principal.get("tenant", ""), principal.get("appId", "")
            # AZURE_AUTHORITY_HOST (a sovereign cloud, or a loopback endpoint in tests) is read by azure-identity;
            # Entra ID's instance discovery cannot know a loopback authority.
            authority = urlsplit(os.environ.get("AZURE_AUTHORITY_HOST", "")).hostname or ""
            local = {"disable_instance_discovery": True} if authority and is_loopback(authority) else {}
            if principal.get("certificate"):
                inner = identity.CertificateCredential(
                    tenant, app_id, certificate_data=principal["certificate"].encode(), **local
                )
            else:
                inner = identity.ClientSecretCredential(tenant, app_id, principal.get("password", ""), **local)
            described = f"service principal {app_id} of tenant {tenant}"
        else:
            inner = identity.DefaultAzureCredential(managed_identity_client_id=client_id)
            described = "DefaultAzureCredential"
        return _TrackingCredential(inner, described)

    def _principal(self) -> str:
        identity = self._identity
        if identity is not None and identity.principal:
            return identity.principal
        client_id = self.settings.get("client_id")
        return str(client_id) if client_id else (identity.described if identity else "the identity")

    def _connection_string_problem(self) -> str | None:
        if self._auth is not Auth.SAS:
            return None if self.settings.get("namespace") and self._hub else "no --namespace or --event-hub"
        f = self._fields
        if not self._conn_str:
            return "the connection string is empty"
        if not f.get("endpoint"):
            return "Endpoint is missing"
        if not (f.get("sharedaccesskeyname") and f.get("sharedaccesskey")) and not f.get("sharedaccesssignature"):
            return "SharedAccessKeyName and SharedAccessKey (or SharedAccessSignature) are missing"
        if not self._hub:
            return "no event hub name: give --event-hub or EntityPath"
        try:
            self._make_client(retry_total=0)  # parses offline; opens nothing until first used
        except ValueError as exc:
            return f"the SDK refuses the connection string: {self._summary(exc)}"
        return None

    def _check_call(self, deadline: float) -> tuple[str, Any]:
        """("ok", hub properties) or (error code, message); a failure that may be transient is retried."""
        backoff = Backoff(max(0.0, deadline - time.monotonic()), initial_s=0.25, maximum_s=2.0)
        value: Any = None
        for attempt in range(1, _CHECK_ATTEMPTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            client = self._make_client(retry_total=0, auth_timeout=max(1.0, remaining))
            ok, value = _bounded(client.get_eventhub_properties, remaining)
            _close_in_background(client)
            if ok:
                return "ok", value
            if value is None:
                return "UNREACHABLE", f"no answer from {self._namespace} within the check's time limit"
            code = self._classify(value)
            if code in ("AUTH_FAILED", "EVENT_HUB_NOT_FOUND"):
                return code, self._describe(code, value)
            if attempt == _CHECK_ATTEMPTS or not backoff.sleep_or_give_up():
                break
        if value is None:
            return "UNREACHABLE", f"no answer from {self._namespace} within the check's time limit"
        return "UNREACHABLE", f"cannot reach {self._namespace}: {self._summary(value)}"

    # -- delivery ---------------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, read the hub's partitions and its link's max message size, choose the encoder and the lanes,
        then open every lane's link to every partition at once: opened one by one at their first send, the links
        of a hub four partitions wide took 3.7 s each over a 150 ms round trip."""
        if self._clients:
            return
        problem = self._connection_string_problem()
        if problem:
            raise DestinationError("INVALID_CREDENTIALS", f"{self._where}: {problem}")
        self._error, self._closing = None, False
        self._clients = [self._make_client(retry_total=1)]
        props, probe = _concurrently(
            lambda: self._with_retry(
                lambda c: c.get_eventhub_properties(), "reading the event hub's properties", _MANAGEMENT_TIMEOUT_S
            ),
            lambda: self._with_retry(lambda c: c.create_batch(), "opening a producer link", _MANAGEMENT_TIMEOUT_S),
        )
        self._partition_ids = list(props["partition_ids"])
        if not self._partition_ids:
            raise DestinationError("EVENT_HUB_NOT_FOUND", f"{self._where} reports no partitions")
        self._max_batch_bytes = probe.max_size_in_bytes
        self._fast = self._fast_path_matches_sdk()
        self.max_message_bytes = self._largest_body()
        per_lane = len(self._partition_ids) * _BATCHES_PER_LANE * self._max_batch_bytes
        self._lanes = max(1, min(MAX_LANES, memory_budget() // per_lane))
        self._clients += [self._make_client(retry_total=1) for _ in range(1, self._lanes)]
        partitions = len(self._partition_ids)
        self._window = Window(initial=partitions, minimum=1, maximum=partitions * self._lanes)
        self._open_links()

    def _open_links(self) -> None:
        """Open each lane's producer link to each partition concurrently, within the management time limit. Best
        effort, through the SDK's private producer table: a link that does not open here opens at its first send,
        whose retries and error codes are the ones that count."""

        def open_link(client: EventHubProducerClient, partition: str) -> None:
            with contextlib.suppress(Exception):
                if not client._partition_ids:  # a lane's new client: spare it a management round trip of its own
                    with client._lock:
                        client._partition_ids = list(self._partition_ids)
                        for pid in self._partition_ids:
                            client._producers.setdefault(pid, None)
                client._start_producer(partition, _SEND_TIMEOUT_S)
                client._producers[partition]._open_with_retry()

        threads = [
            threading.Thread(
                target=open_link,
                args=(client, partition),
                name=f"eventhubs-open-{partition}-{lane}",
                daemon=True,
            )
            for lane, client in enumerate(self._clients)
            for partition in self._partition_ids
        ]
        deadline = time.monotonic() + _MANAGEMENT_TIMEOUT_S
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def send(self, messages: Sequence[Message]) -> None:
        """Add to the partitions' batches; a full batch is handed to its partition's sender thread.

        Does not wait for acknowledgements (flush() does); blocks only while the partition already has a batch in
        flight and one queued, which bounds memory to about three batches per partition.
        """
        self._raise_if_failed()
        if not self._clients:
            raise DestinationError("UNREACHABLE", f"{self._where}: send() before open()")
        add = self._add_fast if self._fast else self._add_sdk
        batches = self._batches
        for message in messages:
            key = message[KEY]
            route = self._route_of.get(key) or self._route_for(key)
            batch = batches.get(route)
            if batch is None:
                batch = batches[route] = self._new_batch(route[0])
            if add(batch, message):
                continue
            self._hand_over(route, batch)
            batch = batches[route] = self._new_batch(route[0])
            if not add(batch, message):
                raise DestinationError(
                    "PAYLOAD_TOO_LARGE",
                    f"an operation of {len(message[DATA])} bytes does not fit in one event for {self._where} "
                    f"(limit {self.max_message_bytes} bytes)",
                )

    def flush(self) -> None:
        """Hand over every partial batch, then wait until each partition's batches were all accepted (or failed)."""
        self._raise_if_failed()
        for route, batch in list(self._batches.items()):
            if len(batch):
                self._hand_over(route, batch)
            del self._batches[route]
        for sender in list(self._senders.values()):
            sender.queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the senders and release the connections, without waiting on a hung call. Events not flushed are
        dropped: only flushed ones count as delivered, and the engine flushes first when it wants them."""
        self._closing = True
        self._batches.clear()
        senders, self._senders = self._senders, {}
        for sender in senders.values():
            sender.stop()
        deadline = time.monotonic() + 5
        for sender in senders.values():
            sender.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        clients, self._clients = self._clients, []
        for client in clients:
            _close_in_background(client, wait_s=5 / len(clients))

    def _hand_over(self, route: tuple[str, int], batch: EventDataBatch) -> None:
        sender = self._senders.get(route)
        if sender is None:
            sender = self._senders[route] = _PartitionSender(self, *route)
        while True:
            self._raise_if_failed()
            try:
                sender.queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._settle()
            raise self._error

    def _settle(self) -> None:
        """After a failure, let the batches already sent on other lanes be answered (briefly): they may have been
        accepted, and `acknowledged` must count everything the service took. Queued batches are dropped at once."""
        deadline = time.monotonic() + _SETTLE_S
        while time.monotonic() < deadline and any(s.queue.unfinished_tasks for s in list(self._senders.values())):
            time.sleep(0.01)

    def _fail(self, error: DestinationError) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error

    # -- batches ----------------------------------------------------------------------------------------------------

    def _route_for(self, key: str) -> tuple[str, int]:
        """The key's partition (the service's own mapping) and its lane in that partition (fixed for this
        destination's life, so that a key never has batches in flight on two links)."""
        ids = self._partition_ids
        route = ids[partition_for(key, len(ids))], zlib.crc32(key.encode()) % self._lanes
        if len(self._route_of) >= _PARTITION_CACHE:
            self._route_of.clear()
        self._route_of[key] = route
        return route

    def _new_batch(self, partition: str | None) -> EventDataBatch:
        """An empty batch sized by the link's limit read at open(); built directly, because `create_batch()` opens
        a link when its client is new (after a replacement), and building must never touch the network."""
        return self._sdk().EventDataBatch(max_size_in_bytes=self._max_batch_bytes, partition_id=partition)

    def _add_sdk(self, batch: EventDataBatch, message: Message) -> bool:
        data, doc_type, op, key = message
        event = self._sdk().EventData(data)
        event.content_type = CONTENT_TYPE
        event.properties = {"doc_type": doc_type, "op": op}
        event.raw_amqp_message.annotations[PARTITION_KEY_ANNOTATION] = key
        try:
            batch.add(event)
        except ValueError:
            return False
        return True

    def _add_fast(self, batch: EventDataBatch, message: Message) -> bool:
        encoded = self._encode(message)
        size = batch._size + len(encoded) + (5 if len(encoded) < 256 else 8)  # as EventDataBatch.add counts it
        if size > batch.max_size_in_bytes:
            return False
        batch._message.data.append(encoded)
        batch._size = size
        batch._count += 1
        return True

    def _encode(self, message: Message) -> bytes:
        """The AMQP message `_add_sdk` would build for this event (checked by `_fast_path_matches_sdk`)."""
        data, doc_type, op, key = message
        annotations = self._annotations.get(key)
        if annotations is None:
            if len(self._annotations) >= _ENCODED_CACHE:
                self._annotations.clear()
            annotations = b"\x00\x53\x72" + _map([(_symbol(PARTITION_KEY_ANNOTATION), _string(key))])
            self._annotations[key] = annotations
        app = self._app_props.get((doc_type, op))
        if app is None:
            pairs = [(_string("doc_type"), _string(doc_type)), (_string("op"), _string(op))]
            app = self._app_props[(doc_type, op)] = b"\x00\x53\x74" + _map(pairs)
        n = len(data)
        head = b"\x00\x53\x75\xa0" + bytes((n,)) if n <= 255 else b"\x00\x53\x75\xb0" + struct.pack(">I", n)
        return b"".join((annotations, _PROPERTIES, app, head, data))

    def _fast_path_matches_sdk(self) -> bool:
        """True when our bytes and size accounting equal `EventDataBatch.add`'s for sample events of every shape
        (short and long bodies, keys and values, so that each one-byte/four-byte length form is compared). Small
        enough to fit the smallest limit a link may announce."""
        samples: list[Message] = [
            (b"{}", "UserPoint", "DELETE", "4700c85f-17e3-4304-aa7f-dc140173b08d"),
            (b'{"v":"' + b"x" * 300 + b'"}', "UserDeviceTechnicalId", "UPDATE", "k"),
            (b"[" + b"1," * 200 + b"1]", "U" * 260, "UPDATE", "u" * 300),
        ]
        try:
            sdk, ours = self._new_batch(None), self._new_batch(None)
            for sample in samples:
                if not (self._add_sdk(sdk, sample) and self._add_fast(ours, sample)):
                    return False
            return (
                [bytes(x) for x in sdk._message.data] == [bytes(x) for x in ours._message.data]
                and sdk.size_in_bytes == ours.size_in_bytes
                and len(sdk) == len(ours) == len(samples)
            )
        except Exception:
            return False

    def _largest_body(self) -> int:
        """Largest operation data that fits alone in a batch: the link's limit minus the event's own overhead (the
        annotation with a key of up to `_KEY_RESERVE` characters, content type, properties, section headers) and the
        batch's framing."""
        batch = self._new_batch(None)
        empty = batch.size_in_bytes
        add = self._add_fast if self._fast else self._add_sdk
        add(batch, (b"", "D" * _DOC_TYPE_RESERVE, "DELETE", "k" * _KEY_RESERVE))
        overhead = batch.size_in_bytes - empty + 4 + 3  # with a large body: 4 more bytes of length, 3 of framing
        return max(0, self._max_batch_bytes - empty - overhead)

    def _send_batch(self, partition: str, lane: int, batch: EventDataBatch) -> bool:
        """Send one batch, retried within the budget (called by the lane's sender thread); True when it had to be
        retried (the window then shrinks)."""
        retried: list[bool] = []
        self._with_retry(
            lambda c: c.send_batch(batch, timeout=_SEND_TIMEOUT_S),
            f"sending {len(batch)} events to partition {partition}",
            _SEND_TIMEOUT_S + 10,
            lane,
            on_transient=lambda: retried.append(True),
        )
        with self._error_lock:
            self.acknowledged += len(batch)
        return bool(retried)

    # -- retries and errors -----------------------------------------------------------------------------------------

    def _with_retry(
        self,
        call: Callable[[EventHubProducerClient], Any],
        what: str,
        limit_s: float,
        lane: int = 0,
        *,
        on_transient: Callable[[], None] | None = None,
    ) -> Any:
        """Run `call(client)` with the lane's client until it succeeds, fails for a non-retryable reason, or the
        budget is spent; `on_transient` hears of each failure that is retried."""
        backoff = Backoff(self.retry_budget_s)
        attempts = 0
        while True:
            attempts += 1
            clients = self._clients
            client = clients[lane] if lane < len(clients) else None
            if client is None or self._closing:
                raise DestinationError("UNREACHABLE", f"{what}: the destination was closed")
            remaining = self.retry_budget_s - (time.monotonic() - backoff.started)
            timeout = max(1.0, min(limit_s, remaining))
            ok, value = _bounded(functools.partial(call, client), timeout)
            if ok:
                return value
            exc: BaseException = value if value is not None else TimeoutError(f"no answer within {timeout:g}s")
            if value is None:
                self._replace_client(client, lane)
            if self._closing:
                raise DestinationError("UNREACHABLE", f"{what}: the destination was closed")
            throttled = _is_throttling(exc)
            code = None if throttled else self._classify(exc) or self._diagnose(self._left(backoff))
            if code is not None:
                raise DestinationError(code, f"{what}: {self._describe(code, exc)}")
            if on_transient is not None:
                on_transient()
            if self._error is not None or not backoff.sleep_or_give_up():
                raise DestinationError(
                    "UNREACHABLE",
                    f"{what}: {self._where} still failing after {attempts} attempts over "
                    f"{self.retry_budget_s:g}s: {self._summary(exc)}",
                    retryable=True,
                )

    def _left(self, backoff: Backoff) -> float:
        return self.retry_budget_s - (time.monotonic() - backoff.started)

    def _replace_client(self, stale: EventHubProducerClient, lane: int) -> None:
        """A call on `stale` hung; it may hold the producer's lock, so later calls need a new client."""
        with self._client_lock:
            if lane < len(self._clients) and self._clients[lane] is stale and not self._closing:
                self._clients[lane] = self._make_client(retry_total=1)
        _close_in_background(stale)

    def _classify(self, exc: BaseException) -> str | None:
        """The non-retryable code an SDK exception means, or None when it may be transient."""
        if isinstance(exc, self._sdk().AuthenticationError | self._sdk().ClientAuthenticationError):
            return "AUTH_FAILED"
        error = str(getattr(exc, "error", "") or "")
        text = str(exc)
        if error == "unauthorized-access" or "amqp:unauthorized-access" in text:
            return "AUTH_FAILED"
        if error == "not-found" or "amqp:not-found" in text or "Status code: 404" in text:
            return "EVENT_HUB_NOT_FOUND"
        if "message-size-exceeded" in error or "message-size-exceeded" in text:
            return "PAYLOAD_TOO_LARGE"  # batches follow the link's limit: a service below it would refuse every retry
        return None

    def _diagnose(self, remaining_s: float) -> str | None:
        """After an ambiguous failure: AUTH_FAILED or EVENT_HUB_NOT_FOUND when the management plane says so."""
        timeout = max(1.0, min(10.0, remaining_s))
        client = self._make_client(retry_total=0, auth_timeout=timeout)
        ok, value = _bounded(client.get_eventhub_properties, timeout)
        _close_in_background(client)
        if ok or value is None:
            return None
        code = self._classify(value)
        return code if code in ("AUTH_FAILED", "EVENT_HUB_NOT_FOUND") else None

    def _describe(self, code: str, exc: BaseException) -> str:
        if code == "AUTH_FAILED" and self._auth is not Auth.SAS:
            return f"{self._namespace} refused the Entra ID token of {self._principal()}: {self._summary(exc)}"
        if code == "AUTH_FAILED":
            policy = self._fields.get("sharedaccesskeyname") or "(shared access signature)"
            return f"{self._namespace} refused the credentials of policy {policy}: {self._summary(exc)}"
        if code == "EVENT_HUB_NOT_FOUND":
            return f"{self._where} does not exist: {self._summary(exc)}"
        return f"{self._where}: {self._summary(exc)}"

    def _summary(self, exc: BaseException) -> str:
        """One line, secrets removed. The SDK repeats its description under several labels: keep each line once."""
        lines: list[str] = []
        for raw in str(exc).splitlines():
            line = " ".join(raw.split())
            if line and line not in lines and not line.startswith(("Error Description:", "Error condition:")):
                lines.append(line)
        return self._redact(f"{type(exc).__name__}: {'; '.join(lines)}"[:400])

    def _redact(self, text: str) -> str:
        principal: dict[str, Any] = {}
        if self._auth is Auth.SERVICE_PRINCIPAL:
            with contextlib.suppress(ValueError):
                principal = json.loads(self.secret or "{}")
        for secret in (
            self._conn_str,
            self._fields.get("sharedaccesskey"),
            self._fields.get("sharedaccesssignature"),
            principal.get("password"),
            principal.get("certificate"),
        ):
            if secret:
                text = text.replace(secret, "[redacted]")
        return re.sub(r"(sig=)[^&\s;]+", r"\1[redacted]", text)

    # -- SDK --------------------------------------------------------------------------------------------------------

    def _sdk(self) -> _Sdk:
        if self._sdk_names is None:
            self._sdk_names = _Sdk()
        return self._sdk_names

    def _make_client(self, *, retry_total: int, auth_timeout: float = 30.0) -> EventHubProducerClient:
        """A client whose own retries are short: the SDK's defaults (3 retries, 0.8 s exponential backoff) hide an
        authentication failure for ~13 s, and our loop owns the retry budget. One quick SDK retry is kept for
        delivery: it re-sends at once after the service closed an idle connection."""
        if self._auth is not Auth.SAS:
            namespace = str(self.settings.get("namespace"))
            return self._sdk().EventHubProducerClient(
                fully_qualified_namespace=namespace,
                eventhub_name=self._hub,
                credential=self._credential(),
                use_tls=not is_loopback(_host(namespace)),  # as UseDevelopmentEmulator: plain AMQP on loopback only
                retry_total=retry_total,
                retry_backoff_factor=0.05,
                retry_backoff_max=2.0,
                auth_timeout=auth_timeout,
            )
        return self._sdk().EventHubProducerClient.from_connection_string(
            self._conn_str,
            eventhub_name=self._hub,
            retry_total=retry_total,
            retry_backoff_factor=0.05,
            retry_backoff_max=2.0,
            auth_timeout=auth_timeout,
        )


class _PartitionSender:
    """Sends one lane of a partition's batches in order, one at a time, each retried until accepted before the
    next, so the per-key order holds while partitions and lanes proceed in parallel. In the SDK each partition's
    producer has its own lock and, by default, its own connection; the SDK's buffered mode sends from a thread pool
    the same way."""

    def __init__(self, destination: EventHubsDestination, partition: str, lane: int) -> None:
        self.destination = destination
        self.partition = partition
        self.lane = lane
        self.queue: queue.Queue[EventDataBatch | None] = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, name=f"eventhubs-partition-{partition}-{lane}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
            self.queue.task_done()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)

    def _run(self) -> None:
        dest = self.destination
        while True:
            batch = self.queue.get()
            try:
                if batch is None:
                    return
                if dest._error is None and not dest._closing:
                    waited = dest._window.acquire(lambda: dest._error is not None or dest._closing)
                    throttled = True
                    try:
                        throttled = dest._send_batch(self.partition, self.lane, batch)
                    finally:
                        dest._window.release(waited, throttled)
            except DestinationError as exc:
                dest._fail(exc)
            except Exception as exc:
                dest._fail(DestinationError("UNREACHABLE", f"{dest._where}: {dest._summary(exc)}"))
            finally:
                self.queue.task_done()


# --------------------------------------------------------------------------------------------------------------------


def _is_throttling(exc: BaseException) -> bool:
    """The service refused for load (`com.microsoft:server-busy`, error 50002), not for what was sent: retried, and
    the window shrinks; no management read is needed to tell what it means."""
    return "server-busy" in str(getattr(exc, "error", "") or "") or "server-busy" in str(exc)


def _bounded(call: Callable[[], Any], timeout_s: float) -> tuple[bool, Any]:
    """Run `call` in a daemon thread: (True, result), (False, exception), or (False, None) if it outlives
    `timeout_s`. A daemon thread, so that a hung SDK call blocks neither us nor the interpreter's exit."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, call()))
        except Exception as exc:
            box.append((False, exc))

    worker = threading.Thread(target=run, daemon=True, name="eventhubs-call")
    worker.start()
    worker.join(max(0.0, timeout_s))
    return box[0] if box else (False, None)


def _concurrently(*calls: Callable[[], Any]) -> list[Any]:
    """Run `calls` at once (each waits on round trips, not on the CPU); their results, or the first call's
    exception in argument order."""
    boxes: list[list[tuple[bool, Any]]] = [[] for _ in calls]

    def run(call: Callable[[], Any], box: list[tuple[bool, Any]]) -> None:
        try:
            box.append((True, call()))
        except BaseException as exc:
            box.append((False, exc))

    threads = [threading.Thread(target=run, args=(c, b), daemon=True) for c, b in zip(calls, boxes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ok, value in (box[0] for box in boxes):
        if not ok:
            raise value
    return [box[0][1] for box in boxes]


def _close_in_background(client: EventHubProducerClient, wait_s: float = 0.0) -> None:
    """Close without risking a hang: `close()` waits for the producers' locks, which a hung call may hold."""
    _bounded(client.close, wait_s)


def _sized(small: int, large: int, raw: bytes) -> bytes:
    n = len(raw)
    return bytes((small, n)) + raw if n <= 255 else bytes((large,)) + struct.pack(">I", n) + raw


def _string(text: str) -> bytes:
    return _sized(0xA1, 0xB1, text.encode())


def _symbol(text: str) -> bytes:
    return _sized(0xA3, 0xB3, text.encode())


def _map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(k + v for k, v in pairs)
    count = 2 * len(pairs)
    if count <= 255 and len(body) < 255:
        return bytes((0xC1, len(body) + 1, count)) + body
    return b"\xd1" + struct.pack(">II", len(body) + 4, count) + body


def _properties_section() -> bytes:
    """Every event's properties: 13 fields, all null but content-type (the SDK writes every field)."""
    items = b"\x40" * 6 + _symbol(CONTENT_TYPE) + b"\x40" * 6
    return b"\x00\x53\x73" + bytes((0xC0, len(items) + 1, 13)) + items


_PROPERTIES = _properties_section()
