"""The operation (docs/operations.md): canonical bytes, and a gate that names the field of every invalid operation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from dmrepl.operations import (
    DATA,
    DOC_TYPE,
    DOC_TYPES,
    KEY,
    KEYS,
    OP,
    OPS,
    InvalidOperation,
    encode,
    parse_operation_line,
    to_message,
    validate_operation,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
UP = "4700c85f-17e3-4304-aa7f-dc140173b08d"
DEVICE = {"$os_family": "LINUX", "$browser_family": None, "$creation_ts": 0}

VALID: list[tuple[str, str, dict[str, Any]]] = [
    ("UserPoint", UP, {}),
    ("UserPoint", UP.upper(), {}),
    ("UserAgent", f"{UP}:vec:32453299893", DEVICE),
    ("UserDevicePoint", f"{UP}:udp:-70306587554", DEVICE),
    ("UserDevicePoint", f"{UP}:udp:42", DEVICE),
    ("UserDeviceTechnicalId", f"{UP}:udp:-1:mum:7231822539", {}),
    ("UserDeviceTechnicalId", f"{UP}:udp:-1:ins:1001:aZm", {}),
    ("UserActivity", f"{UP}:87c56473-a7a8-4ee0-b61e-bfd2bd143fa9", {"$type": "TOUCH", "$ts": 1}),
    ("UserSegment", f"{UP}:3640", {"$creation_ts": 1, "$last_modified_ts": 2}),
    ("UserProfile", f"{UP}:1:acc-1", {"first_name": "日本語"}),
    ("UserProfile", f"{UP}:1:crm:42", {}),
    ("UserAccount", f"{UP}:3:john doe", {}),
    ("UserEmail", f"{UP}:6e405d93ff", {"$hash": "6e405d93ff"}),
    ("UserPointParent", UP, {"$message": "m", "$kept_user_point_id": UP}),
]


def op(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"ts": 1676627112685, "doc_type": "UserSegment", "doc_id": f"{UP}:1", "op": "UPDATE"}
    base["value"] = {"$creation_ts": 1, "$last_modified_ts": 2}
    base.update(changes)
    return base


def test_constants_match_the_spec() -> None:
    assert len(DOC_TYPES) == len(set(DOC_TYPES)) == 10
    assert OPS == ("UPDATE", "DELETE")
    assert KEYS == ("ts", "doc_type", "doc_id", "op", "value")


def test_encode_is_compact_utf8_in_spec_key_order() -> None:
    data = encode(5, "UserProfile", f"{UP}:1:a", "UPDATE", {"z": 1, "label": "santé 🚀", "a": None})
    assert (
        data
        == (
            '{"ts":5,"doc_type":"UserProfile","doc_id":"' + UP + ':1:a","op":"UPDATE",'
            '"value":{"z":1,"label":"santé 🚀","a":null}}'
        ).encode()
    )


def test_to_message_keys_by_user_point_id() -> None:
    m = to_message(7, "UserAgent", f"{UP}:vec:1", "DELETE", {})
    assert type(m) is tuple and len(m) == 4
    assert (m[DOC_TYPE], m[OP], m[KEY]) == ("UserAgent", "DELETE", UP)
    assert orjson.loads(m[DATA]) == {
        "ts": 7,
        "doc_type": "UserAgent",
        "doc_id": f"{UP}:vec:1",
        "op": "DELETE",
        "value": {},
    }
    assert to_message(7, "UserPoint", UP, "UPDATE", {}, key="k")[KEY] == "k"


@pytest.mark.parametrize(("doc_type", "doc_id", "value"), VALID)
def test_valid_operations_pass(doc_type: str, doc_id: str, value: dict[str, Any]) -> None:
    assert validate_operation(op(doc_type=doc_type, doc_id=doc_id, value=value)) is None
    if doc_type not in ("UserPoint", "UserAccount", "UserDeviceTechnicalId"):
        assert validate_operation(op(doc_type=doc_type, doc_id=doc_id, value={}, op="DELETE")) is None


def test_every_doc_type_has_a_valid_example() -> None:
    assert {d for d, _, _ in VALID} == set(DOC_TYPES)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ([1], "not a JSON object"),
        ("op", "not a JSON object"),
        ({k: v for k, v in op().items() if k != "ts"}, "ts: missing"),
        ({k: v for k, v in op().items() if k != "value"}, "value: missing"),
        ({**op(), "extra": 1}, "extra: unexpected key"),
        (op(ts=True), "ts:"),
        (op(ts=-1), "ts:"),
        (op(ts=1.5), "ts:"),
        (op(ts="1676627112685"), "ts:"),
        (op(ts=None), "ts:"),
        (op(doc_type="UserThing"), "doc_type:"),
        (op(doc_type="userpoint"), "doc_type:"),
        (op(doc_type=["UserPoint"]), "doc_type:"),
        (op(op="update"), "op:"),
        (op(op=" UPDATE"), "op:"),
        (op(op="UPSERT"), "op:"),
        (op(op=None), "op:"),
        (op(value=[]), "value:"),
        (op(value=None), "value:"),
        (op(value="{}"), "value:"),
        (op(op="DELETE"), "value: must be {} for a DELETE"),
        (op(doc_type="UserPoint", doc_id=UP, value={"a": 1}), "value: must be {} for UserPoint"),
        (op(doc_type="UserAccount", doc_id=f"{UP}:1:a", value={"a": 1}), "value: must be {} for UserAccount"),
    ],
)
def test_invalid_operation_names_the_field(obj: object, field: str) -> None:
    reason = validate_operation(obj)
    assert reason is not None
    assert field in reason


@pytest.mark.parametrize(
    ("doc_type", "doc_id"),
    [
        ("UserPoint", "not-a-uuid"),
        ("UserPoint", UP + "0"),
        ("UserPoint", UP[:-1] + "g"),
        ("UserPoint", f"{UP}:x"),
        ("UserPoint", 42),
        ("UserPointParent", ""),
        ("UserAgent", f"{UP}:vec:"),
        ("UserAgent", f"{UP}:vec:12a"),
        ("UserAgent", f"{UP}:vec:-1"),
        ("UserAgent", f"{UP}:udp:1"),
        ("UserAgent", "x:vec:1"),
        ("UserDevicePoint", f"{UP}:udp:x"),
        ("UserDevicePoint", f"{UP}:udp:"),
        ("UserDevicePoint", f"{UP}:udp:1:mum:1"),
        ("UserDeviceTechnicalId", f"{UP}:udp:1"),
        ("UserDeviceTechnicalId", f"{UP}:udp:1:"),
        ("UserDeviceTechnicalId", f"{UP}:udp:1:mum:1\n"),
        ("UserActivity", f"{UP}:"),
        ("UserActivity", UP),
        ("UserActivity", f"{UP}:a:b"),
        ("UserSegment", f"{UP}:1\x00"),
        ("UserEmail", f"{UP}:"),
        ("UserProfile", f"{UP}:1"),
        ("UserProfile", f"{UP}::acc"),
        ("UserProfile", f"{UP}:1:"),
        ("UserAccount", f"{UP}:1"),
        ("UserAccount", f"{UP}:1:a\tb"),
    ],
)
def test_doc_id_grammar_is_validated_per_doc_type(doc_type: str, doc_id: object) -> None:
    value: dict[str, Any] = {}
    reason = validate_operation(op(doc_type=doc_type, doc_id=doc_id, value=value))
    assert reason is not None
    assert reason.startswith("doc_id:")
    assert doc_type in reason


def test_long_values_are_truncated_in_reasons() -> None:
    reason = validate_operation(op(doc_id="x" * 10_000))
    assert reason is not None
    assert len(reason) < 300


def test_parse_reserializes_to_the_canonical_form() -> None:
    line = (
        '{ "value": {"b": 1, "a": "é"}, "op": "UPDATE", "doc_id": "' + UP + ':1:x",\n "doc_type": "UserProfile",'
        ' "ts": 3 }\r\n'
    ).encode()
    m = parse_operation_line(line)
    assert m == (encode(3, "UserProfile", f"{UP}:1:x", "UPDATE", {"b": 1, "a": "é"}), "UserProfile", "UPDATE", UP)
    assert m[DATA].startswith(b'{"ts":3,"doc_type":"UserProfile","doc_id":')


def test_parse_merge_is_keyed_by_the_merged_user_point() -> None:
    merged = "be11d56b-a0b4-4296-9d80-55a9f03f2d71"
    m = parse_operation_line(orjson.dumps(op(doc_type="UserPointParent", doc_id=merged, value={"$message": "x"})))
    assert m[KEY] == merged


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b'{"ts": NaN}', "not valid JSON"),
        (b'{"ts": 1,', "not valid JSON"),
        (b'{"a": "\xff"}', "UTF-8"),
        (b"[]", "not a JSON object"),
        (orjson.dumps(op(op="DELETE")), "value"),
        (orjson.dumps(op(doc_id="nope")), "doc_id"),
    ],
)
def test_parse_rejects_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(InvalidOperation) as info:
        parse_operation_line(line)
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason


def test_parse_rejects_values_too_deep_to_serialize() -> None:
    deep = b"[" * 300 + b"]" * 300
    line = b'{"ts":1,"doc_type":"UserProfile","doc_id":"' + UP.encode() + b':1:a","op":"UPDATE","value":{"x":' + deep
    with pytest.raises(InvalidOperation, match="value"):
        parse_operation_line(line + b"}}")


@pytest.mark.parametrize("name", ["userpoints-v202205.operations.ndjson", "userpoints-v201901.operations.ndjson"])
def test_the_example_operations_are_valid_and_already_canonical(name: str) -> None:
    lines = [line for line in (DATA_DIR / name).read_bytes().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert validate_operation(orjson.loads(line)) is None
        assert parse_operation_line(line)[DATA] == line
