"""The operation (docs/operations.md): the one wire format every destination receives, whatever produced it.

Everything that emits an operation goes through `encode`, so the key order (ts, doc_type, doc_id, op, value) and the
byte form (compact UTF-8 JSON, via orjson) are defined once. `validate_operation` is the gate for operations that
come from outside (an "operations" export, live replication); the export transformation validates its inputs while
building instead, and a test proves that everything it emits passes this gate.

doc_id grammar decisions:
- a user_point_id is a UUID (8-4-4-4-12 hex digits, either case);
- an id segment is non-empty and holds no control character; it holds no ':' unless it is the last segment *and*
  may legitimately contain one: the technical id (`ins:1001:…`) and the user account id, which is customer-defined
  (`crm:42`) and unambiguous because the compartment id before it never contains ':';
- activity, segment and email-hash ids are system-generated (UUID, number, hex digest): a ':' in them means a
  shifted or corrupted id, so it is refused.

The value must be `{}` for every DELETE and for the doc_types whose value docs/operations.md gives as empty
(UserPoint, UserAccount, UserDeviceTechnicalId): a consumer may rely on it, so a producer that sends more is rejected.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

#: One operation ready to send: (data, doc_type, op, key), `data` being its JSON in the exact key order and `key` its
#: user_point_id. A plain tuple, read by unpacking or by the indexes below, because a million of them are built per
#: sync, and a NamedTuple's construction is a Python call (measured 12 % slower conversion).
Message = tuple[bytes, str, str, str]
DATA, DOC_TYPE, OP, KEY = 0, 1, 2, 3

DOC_TYPES: tuple[str, ...] = (
    "UserPoint",
    "UserAgent",
    "UserDevicePoint",
    "UserDeviceTechnicalId",
    "UserActivity",
    "UserSegment",
    "UserProfile",
    "UserAccount",
    "UserEmail",
    "UserPointParent",
)
OPS: tuple[str, ...] = ("UPDATE", "DELETE")
KEYS: tuple[str, ...] = ("ts", "doc_type", "doc_id", "op", "value")
_KEY_SET = frozenset(KEYS)

#: doc_types whose value is always `{}` (docs/operations.md: "empty").
EMPTY_VALUE_DOC_TYPES = frozenset({"UserPoint", "UserDeviceTechnicalId", "UserAccount"})

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_SEG = r"[^:\x00-\x1f\x7f]+"
_TAIL = r"[^\x00-\x1f\x7f]+"
_UDP = r"udp:-?[0-9]+"

UUID_RE = re.compile(_UUID)
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

_DOC_ID_GRAMMAR: dict[str, tuple[re.Pattern[str], str]] = {
    "UserPoint": (re.compile(_UUID), "<user_point_id>"),
    "UserPointParent": (re.compile(_UUID), "<user_point_id>"),
    "UserAgent": (re.compile(rf"{_UUID}:vec:[0-9]+"), "<user_point_id>:vec:<digits>"),
    "UserDevicePoint": (re.compile(rf"{_UUID}:{_UDP}"), "<user_point_id>:udp:<digits>"),
    "UserDeviceTechnicalId": (
        re.compile(rf"{_UUID}:{_UDP}:{_TAIL}"),
        "<user_point_id>:udp:<digits>:<technical_id>",
    ),
    "UserActivity": (re.compile(rf"{_UUID}:{_SEG}"), "<user_point_id>:<activity_id>"),
    "UserSegment": (re.compile(rf"{_UUID}:{_SEG}"), "<user_point_id>:<segment_id>"),
    "UserEmail": (re.compile(rf"{_UUID}:{_SEG}"), "<user_point_id>:<email_hash>"),
    "UserProfile": (re.compile(rf"{_UUID}:{_SEG}:{_TAIL}"), "<user_point_id>:<compartment_id>:<user_account_id>"),
    "UserAccount": (re.compile(rf"{_UUID}:{_SEG}:{_TAIL}"), "<user_point_id>:<compartment_id>:<user_account_id>"),
}

_dumps = orjson.dumps


class Rejected(ValueError):
    """A line that must not be sent; `reason` names the offending field, for the rejects file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidOperation(Rejected):
    """An operation line that breaks a rule of docs/operations.md."""


def show(value: object, limit: int = 80) -> str:
    """Quote untrusted input in a reason without letting a huge value flood the rejects file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validate_operation(obj: object) -> str | None:
    """Return why `obj` is not a valid operation, or None when it is.

    A reason rather than an exception because callers batch rejects; checks run cheapest first.
    """
    if type(obj) is not dict:
        return f"not a JSON object: {show(obj)}"
    if obj.keys() != _KEY_SET:
        missing = [k for k in KEYS if k not in obj]
        if missing:
            return f"{missing[0]}: missing"
        extra = next(k for k in obj if k not in KEYS)
        return f"{extra}: unexpected key (an operation has only {', '.join(KEYS)})"
    ts = obj["ts"]
    if type(ts) is not int or ts < 0:
        return f"ts: {show(ts)} is not a non-negative integer (ms since epoch)"
    doc_type = obj["doc_type"]
    grammar = _DOC_ID_GRAMMAR.get(doc_type) if type(doc_type) is str else None
    if grammar is None:
        return f"doc_type: {show(doc_type)} is not one of {', '.join(DOC_TYPES)}"
    op = obj["op"]
    if op != "UPDATE" and op != "DELETE":
        return f"op: {show(op)} is not UPDATE or DELETE"
    doc_id = obj["doc_id"]
    pattern, shape = grammar
    if type(doc_id) is not str or pattern.fullmatch(doc_id) is None:
        return f"doc_id: {show(doc_id)} is not {shape} for {doc_type}"
    value = obj["value"]
    if type(value) is not dict:
        return f"value: {show(value)} is not a JSON object"
    if value:
        if op == "DELETE":
            return "value: must be {} for a DELETE"
        if doc_type in EMPTY_VALUE_DOC_TYPES:
            return f"value: must be {{}} for {doc_type}"
    return None


def encode(ts: int, doc_type: str, doc_id: str, op: str, value: dict[str, Any]) -> bytes:
    """The single serializer: the only place the key order is written down."""
    return _dumps({"ts": ts, "doc_type": doc_type, "doc_id": doc_id, "op": op, "value": value})


def to_message(ts: int, doc_type: str, doc_id: str, op: str, value: dict[str, Any], key: str | None = None) -> Message:
    """Build a Message; `key` defaults to the user_point_id, i.e. the doc_id up to its first ':'."""
    if key is None:
        key = doc_id.partition(":")[0]
    return (encode(ts, doc_type, doc_id, op, value), doc_type, op, key)


def max_operation_bytes(line_bytes: int) -> int:
    """An upper bound on the size of any operation built from an export line of `line_bytes`.

    Re-serializing never lengthens a string (escapes can only shrink) and lengthens a number by at most 4.5×
    (`1e15` becomes `1000000000000000.0`); a doc_id is made of ids from the line, and the operation wrapper and the
    keys the transform adds are bounded. Lets delivery skip measuring every operation of lines far below a
    destination's limit (tested against number-heavy lines in tests/test_exports.py).
    """
    return 5 * line_bytes + 2048


def json_error_reason(exc: orjson.JSONDecodeError) -> str:
    """Reject reason for a line orjson refused; invalid UTF-8 is named as such (orjson says "surrogates")."""
    text = str(exc)
    if "UTF-8" in text and "BOM" not in text:
        return "not valid UTF-8 text"
    return f"not valid JSON: {text}"


def parse_operation_line(line: bytes) -> Message:
    """Turn one NDJSON operation line into a canonical Message, or raise InvalidOperation.

    Re-serializing (rather than forwarding the bytes) makes every destination receive the canonical form whatever
    whitespace or key order the producer used. Trailing whitespace (CRLF) is fine; a BOM is not (readers strip it).
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidOperation(json_error_reason(exc)) from None
    reason = validate_operation(obj)
    if reason is not None:
        raise InvalidOperation(reason)
    doc_id = obj["doc_id"]
    try:
        return to_message(obj["ts"], obj["doc_type"], doc_id, obj["op"], obj["value"], doc_id.partition(":")[0])
    except orjson.JSONEncodeError as exc:
        raise InvalidOperation(f"value: cannot be serialized ({exc})") from None
