"""Export files: golden transformations, gzip/format detection, resume, bounded lines, rejects, flat memory."""

from __future__ import annotations

import copy
import gzip
import hashlib
import itertools
import random
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from dmrepl.errors import InvalidInputError
from dmrepl.exports import ExportError, ExportLine, ExportReader, file_sha256
from dmrepl.operations import DATA, DOC_TYPE, KEY, KEYS, OP, Message, max_operation_bytes, validate_operation
from dmrepl.transform import InvalidLine, transform_user_point

DATA_DIR = Path(__file__).resolve().parent / "data"
START = 1_700_000_000_000
UP = "d95bafc8-f2a4-427b-9cf4-bb99f4bea973"


def write(path: Path, lines: list[bytes] | bytes, *, gz: bool = False) -> Path:
    data = lines if isinstance(lines, bytes) else b"".join(lines)
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


def dumps_lines(objs: list[Any]) -> list[bytes]:
    return [orjson.dumps(o) + b"\n" for o in objs]


def read_all(reader: ExportReader, *args: int) -> list[ExportLine]:
    return list(reader.lines(*args))


def messages(lines: list[ExportLine]) -> list[Message]:
    return [m for line in lines for m in line.messages]


def expected_ops(name: str) -> list[Any]:
    return [orjson.loads(line) for line in (DATA_DIR / name).read_bytes().splitlines() if line.strip()]


def one(obj: Any, version: str = "v202205") -> list[dict[str, Any]]:
    return [orjson.loads(m[DATA]) for m in transform_user_point(obj, system_version=version, start_ts=START)]


def reject_of(obj: Any, version: str = "v202205") -> str:
    with pytest.raises(InvalidLine) as info:
        transform_user_point(obj, system_version=version, start_ts=START)
    return info.value.reason


# --- golden -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v202205", "v201901"])
def test_golden_examples(version: str) -> None:
    reader = ExportReader(DATA_DIR / f"userpoints-{version}.ndjson", system_version=version, start_ts=START)
    assert (reader.format, reader.compressed) == ("user-points", False)
    lines = read_all(reader)
    assert [line.reject for line in lines] == [None] * len(lines)
    got = messages(lines)
    expected = expected_ops(f"userpoints-{version}.operations.ndjson")
    assert len(got) == len(expected)
    for i, (m, e) in enumerate(zip(got, expected, strict=True)):
        obj = orjson.loads(m[DATA])
        assert obj == e, f"operation {i}"
        assert list(obj) == list(KEYS)
        assert m[DATA].startswith(b'{"ts":')
        assert (m[DOC_TYPE], m[OP], m[KEY]) == (e["doc_type"], e["op"], e["doc_id"].partition(":")[0])


def test_operations_file_replays_to_identical_messages(tmp_path: Path) -> None:
    from_points = messages(read_all(ExportReader(DATA_DIR / "userpoints-v202205.ndjson", start_ts=START)))
    reader = ExportReader(DATA_DIR / "userpoints-v202205.operations.ndjson", start_ts=START)
    assert reader.format == "operations"
    assert messages(read_all(reader)) == from_points
    # the same lines with another key order and spacing are re-serialized to the same bytes
    shuffled = [orjson.dumps(dict(reversed(orjson.loads(m[DATA]).items()))) + b" \r\n" for m in from_points]
    again = ExportReader(write(tmp_path / "ops.ndjson", shuffled), start_ts=START)
    assert messages(read_all(again)) == from_points


# --- file handling ----------------------------------------------------------------------------------------------


def test_gzip_is_detected_by_magic_bytes_not_name(tmp_path: Path) -> None:
    src = (DATA_DIR / "userpoints-v202205.ndjson").read_bytes()
    expected = messages(read_all(ExportReader(DATA_DIR / "userpoints-v202205.ndjson", start_ts=START)))
    gz = ExportReader(write(tmp_path / "export.ndjson", src, gz=True), start_ts=START)
    plain = ExportReader(write(tmp_path / "export.ndjson.gz", src), start_ts=START)
    assert (gz.compressed, plain.compressed) == (True, False)
    assert gz.format == plain.format == "user-points"
    assert gz.size == (tmp_path / "export.ndjson").stat().st_size
    assert messages(read_all(gz)) == expected
    assert messages(read_all(plain)) == expected


def test_multi_member_gzip(tmp_path: Path) -> None:
    lines = (DATA_DIR / "userpoints-v202205.ndjson").read_bytes().splitlines(keepends=True)
    path = tmp_path / "multi"
    path.write_bytes(gzip.compress(b"".join(lines[:3])) + gzip.compress(b"".join(lines[3:])))
    assert len(read_all(ExportReader(path, start_ts=START))) == len(lines)


def test_format_forced_and_undetectable(tmp_path: Path) -> None:
    points = DATA_DIR / "userpoints-v202205.ndjson"
    forced = ExportReader(points, fmt="operations", start_ts=START)
    assert forced.format == "operations"
    lines = read_all(forced)
    assert lines
    assert all(line.reject and line.reject.startswith("ts: missing") for line in lines)

    odd = write(tmp_path / "odd.ndjson", [b'{"hello": 1}\n', orjson.dumps({"user_point_id": UP}) + b"\n"])
    with pytest.raises(ExportError, match=r"odd\.ndjson.*--format") as info:
        ExportReader(odd, start_ts=START)
    assert isinstance(info.value, InvalidInputError)
    assert [line.line_no for line in read_all(ExportReader(odd, fmt="user-points", start_ts=START))] == [1, 2]

    garbage = write(tmp_path / "garbage.bin", [b"\x00\x01 not json\n"])
    with pytest.raises(ExportError, match=r"garbage\.bin"):
        ExportReader(garbage, start_ts=START)
    with pytest.raises(ValueError, match="format"):
        ExportReader(points, fmt="csv", start_ts=START)


def test_missing_unreadable_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"nope\.ndjson.*not found"):
        ExportReader(tmp_path / "nope.ndjson", start_ts=START)
    with pytest.raises(ExportError, match="not a regular file"):
        ExportReader(tmp_path, start_ts=START)
    empty = ExportReader(write(tmp_path / "empty.ndjson", [b"\n", b"  \n"]), start_ts=START)
    assert empty.format == "user-points"
    assert read_all(empty) == []


def test_corrupt_and_truncated_gzip_are_file_errors(tmp_path: Path) -> None:
    data = gzip.compress((DATA_DIR / "userpoints-v202205.ndjson").read_bytes())
    truncated = write(tmp_path / "truncated.gz", data[: len(data) // 2])
    reader = ExportReader(truncated, fmt="user-points", start_ts=START)
    with pytest.raises(ExportError, match=r"truncated\.gz.*truncated"):
        read_all(reader)
    corrupt = write(tmp_path / "corrupt.gz", data[:20] + bytes(200) + data[220:])
    with pytest.raises(ExportError, match=r"corrupt\.gz"):
        read_all(ExportReader(corrupt, fmt="user-points", start_ts=START))
    with pytest.raises(ExportError, match=r"corrupt\.gz"):
        ExportReader(corrupt, start_ts=START)


def test_file_sha256(tmp_path: Path) -> None:
    path = write(tmp_path / "x", b"abc\n" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc\n" * 1000).hexdigest()
    with pytest.raises(ExportError, match="missing"):
        file_sha256(tmp_path / "missing")


@pytest.mark.parametrize("gz", [False, True])
def test_raw_position_tracks_bytes_on_disk(tmp_path: Path, gz: bool) -> None:
    path = write(tmp_path / "e", dumps_lines(generate_user_points(300, seed=3)), gz=gz)
    reader = ExportReader(path, start_ts=START)
    assert reader.raw_position == 0
    seen = [reader.raw_position for _ in reader.lines()]
    assert seen == sorted(seen)
    assert 0 < seen[0] <= reader.size
    assert reader.raw_position == reader.size


# --- resume -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_resume_from_a_checkpoint(tmp_path: Path, gz: bool) -> None:
    src = (DATA_DIR / "userpoints-v202205.ndjson").read_bytes().splitlines(keepends=True)
    path = write(tmp_path / "e", [*src[:2], b"\n", *src[2:]], gz=gz)
    reader = ExportReader(path, start_ts=START)
    everything = read_all(reader)
    assert [line.line_no for line in everything] == [1, 2, 4, 5, 6, 7]
    for cut in range(len(everything)):
        before = everything[: cut + 1]
        after = read_all(reader, before[-1].end_offset, before[-1].line_no)
        assert before + after == everything
    assert read_all(reader, everything[-1].end_offset, everything[-1].line_no) == []


@pytest.mark.parametrize("gz", [False, True])
def test_resume_refuses_an_offset_that_is_not_a_line_boundary(tmp_path: Path, gz: bool) -> None:
    path = write(tmp_path / "e", (DATA_DIR / "userpoints-v202205.ndjson").read_bytes(), gz=gz)
    reader = ExportReader(path, start_ts=START)
    first = read_all(reader)[0]
    with pytest.raises(ExportError, match="line boundary"):
        read_all(reader, first.end_offset - 5, 1)
    with pytest.raises(ExportError, match="past the end"):
        read_all(reader, 10**9, 1)
    with pytest.raises(ValueError, match="non-negative"):
        reader.lines(-1)


def test_resume_after_a_last_line_without_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "e", (DATA_DIR / "userpoints-v202205.ndjson").read_bytes().rstrip(b"\n"))
    reader = ExportReader(path, start_ts=START)
    last = read_all(reader)[-1]
    assert last.end_offset == reader.size
    assert read_all(reader, last.end_offset, last.line_no) == []


# --- line handling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_line_too_long_is_rejected_and_the_next_line_read(tmp_path: Path, gz: bool) -> None:
    good = dumps_lines([{"user_point_id": UP, "creation_ts": 1}])[0]
    huge = orjson.dumps({"user_point_id": UP, "profiles": [{"x": "y" * 50_000}]}) + b"\n"
    path = write(tmp_path / "e", [good, huge, good, huge.rstrip(b"\n")], gz=gz)
    reader = ExportReader(path, start_ts=START, max_line_bytes=4096)
    lines = read_all(reader)
    assert [(line.line_no, line.reject is None) for line in lines] == [(1, True), (2, False), (3, True), (4, False)]
    assert f"{len(huge) - 1} bytes" in (lines[1].reject or "")
    assert "4096" in (lines[1].reject or "")
    assert lines[1].messages == []
    assert lines[1].end_offset == len(good) + len(huge)
    assert lines[-1].end_offset == 2 * len(good) + 2 * len(huge) - 1
    assert len(lines[2].messages) == 1


def test_line_at_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    line = orjson.dumps({"user_point_id": UP})
    path = write(tmp_path / "e", [line + b"\n", line + b" \n", line])
    lines = read_all(ExportReader(path, start_ts=START, max_line_bytes=len(line)))
    assert [line.reject is None for line in lines] == [True, False, True]


def test_a_long_line_is_never_buffered_whole(tmp_path: Path) -> None:
    big = b'{"user_point_id": "' + UP.encode() + b'", "x": "' + b"y" * (30 * 1024 * 1024) + b'"}\n'
    path = write(tmp_path / "e", [big, b'{"user_point_id": "' + UP.encode() + b'"}\n'])
    del big
    reader = ExportReader(path, fmt="user-points", start_ts=START, max_line_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        lines = read_all(reader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [line.reject is None for line in lines] == [False, True]
    assert peak < 8 * 1024 * 1024, peak


def test_blank_lines_crlf_and_bom(tmp_path: Path) -> None:
    a, b = dumps_lines(generate_user_points(2, seed=5))
    path = write(
        tmp_path / "e", [b"\xef\xbb\xbf" + a.rstrip(b"\n") + b"\r\n", b"\n", b" \t\r\n", b.rstrip(b"\n") + b"\r\n"]
    )
    lines = read_all(ExportReader(path, start_ts=START))
    assert [(line.line_no, line.reject) for line in lines] == [(1, None), (4, None)]
    expected = one(orjson.loads(a)) + one(orjson.loads(b))
    assert [orjson.loads(m[DATA]) for m in messages(lines)] == expected

    ops = write(tmp_path / "ops", b"\xef\xbb\xbf" + (DATA_DIR / "userpoints-v201901.operations.ndjson").read_bytes())
    reader = ExportReader(ops, start_ts=START)
    assert reader.format == "operations"
    assert [line.reject for line in read_all(reader)] == [None] * len(
        expected_ops("userpoints-v201901.operations.ndjson")
    )


def test_no_operation_outgrows_max_operation_bytes(tmp_path: Path) -> None:
    """Delivery skips measuring operations of lines whose bound is under a destination's limit: the bound must hold
    for the worst growth re-serializing can cause (numbers) and for the keys the transform adds (device info)."""
    floats = b"[" + b",".join([b"1e15"] * 500) + b"]"
    second = str(uuid.UUID(int=5))
    raw = [
        b'{"user_point_id":"%s","profiles":[{"$compartment_id":"1","$user_account_id":"a","v":%s}]}'
        % (UP.encode(), floats),
        b'{"user_point_id":"%s","activities":[{"$id":"a","$ts":1,"x":%s}]}' % (UP.encode(), floats),
        b'{"user_point_id":"%s","user_agents":[{"vector_id":"vec:1","migrated_to":{"user_device_point_id":"udp:1"}}]}'
        % UP.encode(),
        b'{"user_point_id":"%s","devices":[{"id":"udp:1","technical_identifiers":[{"id":"t"}]}]}' % UP.encode(),
        b'{"user_point_id":"%s","merged_user_point_ids":[{"user_point_id":"%s"}]}' % (UP.encode(), second.encode()),
        b'{"user_point_id":"%s","segments":[{"segment_id":"1"}],"emails":[{"hash":"h"}]}' % UP.encode(),
    ]
    grew = False
    for line in raw:
        ops = transform_user_point(orjson.loads(line), system_version="v202205", start_ts=START)
        assert ops and all(len(m[DATA]) <= max_operation_bytes(len(line)) for m in ops), line[:60]
        grew = grew or any(len(m[DATA]) > 4 * len(line) for m in ops) or max(len(m[DATA]) for m in ops) > len(line)
    assert grew  # the lines do exercise growth beyond their own length


def test_byte_ranges_tile_the_file_on_line_boundaries(tmp_path: Path) -> None:
    rng = random.Random(3)
    lines = [b"x" * rng.choice([0, 1, 10, 100, 5000]) + b"\n" for _ in range(400)]
    path = write(tmp_path / "e", b"".join(lines) + b"tail without newline")
    data = path.read_bytes()
    reader = ExportReader(path, fmt="user-points", start_ts=START)
    for chunk in (1, 64, 1000, 1 << 20):
        ranges = list(reader.ranges(0, chunk))
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(data[end - 1 : end] == b"\n" for _, end in ranges[:-1])
        assert all(end - start >= min(chunk, len(data) - start) for start, end in ranges)
    middle = len(lines[0]) + len(lines[1])
    assert list(reader.ranges(middle, 1 << 30)) == [(middle, len(data))]
    with pytest.raises(ExportError, match="not a line boundary"):
        list(reader.ranges(middle + 1, 1000))


def test_a_bom_later_in_the_file_is_not_tolerated(tmp_path: Path) -> None:
    a, b = dumps_lines(generate_user_points(2, seed=5))
    lines = read_all(ExportReader(write(tmp_path / "e", [a, b"\xef\xbb\xbf" + b]), start_ts=START))
    assert lines[0].reject is None
    assert "BOM" in (lines[1].reject or "")


# --- rejects ----------------------------------------------------------------------------------------------------

POINT = {"user_point_id": UP, "creation_ts": 5}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json}\n", "not valid JSON"),
        (b'{"user_point_id": "' + UP.encode() + b'", "x": "\xff\xfe"}\n', "UTF-8"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'"just a string"\n', "not a JSON object"),
        (orjson.dumps({"creation_ts": 1}) + b"\n", "user_point_id: missing"),
        (orjson.dumps({"user_point_id": "not-a-uuid"}) + b"\n", "user_point_id: 'not-a-uuid' is not a UUID"),
        (orjson.dumps({"user_point_id": 12}) + b"\n", "user_point_id: 12 is not a UUID"),
    ],
)
def test_bad_lines_are_rejected_in_place(tmp_path: Path, line: bytes, reason: str) -> None:
    good = orjson.dumps(POINT) + b"\n"
    path = write(tmp_path / "e", [good, line, good])
    lines = read_all(ExportReader(path, fmt="user-points", start_ts=START))
    assert [line.line_no for line in lines] == [1, 2, 3]
    assert lines[1].messages == []
    assert reason in (lines[1].reject or "")
    assert lines[0].reject is None
    assert lines[2].reject is None
    assert len(lines[2].messages) == 1


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"activities": {}}, "activities: {} is not a list"),
        ({"accounts": "a"}, "accounts: 'a' is not a list"),
        ({"segments": 0}, "segments: 0 is not a list"),
        ({"activities": [{"$id": "a", "$ts": 1}, 5]}, "activities[1]: 5 is not an object"),
        ({"accounts": [{"compartment_id": "1", "creation_ts": 1}]}, "accounts[0].user_account_id: missing"),
        ({"accounts": [{"user_account_id": "a"}]}, "accounts[0].compartment_id: missing"),
        ({"accounts": [{"compartment_id": "1:2", "user_account_id": "a"}]}, "accounts[0].compartment_id: '1:2'"),
        ({"accounts": [{"compartment_id": "", "user_account_id": "a"}]}, "accounts[0].compartment_id: ''"),
        ({"accounts": [{"compartment_id": True, "user_account_id": "a"}]}, "accounts[0].compartment_id: True"),
        ({"emails": [{"email": "a@b.c"}]}, "emails[0].hash: missing"),
        ({"activities": [{"$type": "TOUCH", "$ts": 1}]}, "activities[0].$id: missing"),
        ({"activities": [{"$id": "a\nb"}]}, "activities[0].$id"),
        ({"activities": [{"$id": "a", "$ts": "yesterday"}]}, "activities[0].$ts: 'yesterday' is not a timestamp"),
        ({"activities": [{"$id": "a", "$ts": -1}]}, "activities[0].$ts: -1"),
        ({"creation_ts": 1.5}, "creation_ts: 1.5 is not a timestamp"),
        ({"segments": [{"creation_ts": 1}]}, "segments[0].segment_id: missing"),
        ({"segments": [{"segment_id": "1", "expiration_ts": "never"}]}, "segments[0].expiration_ts"),
        ({"profiles": [{"$compartment_id": "1"}]}, "profiles[0].$user_account_id: missing"),
        ({"profiles": [{"$compartment_id": "1", "$user_account_id": "a", "$last_modified_ts": False}]}, "profiles[0]"),
        ({"user_agents": [{"device": {}}]}, "user_agents[0].vector_id: missing"),
        ({"user_agents": [{"vector_id": "vec:x"}]}, "user_agents[0].vector_id: 'vec:x'"),
        ({"user_agents": [{"vector_id": "vec:1", "device": "phone"}]}, "user_agents[0].device: 'phone'"),
        ({"user_agents": [{"vector_id": "vec:1", "last_activity_ts": "x"}]}, "user_agents[0].last_activity_ts"),
        (
            {"user_agents": [{"vector_id": "vec:1", "migrated_to": {"user_device_point_id": "udp:x"}}]},
            "user_agents[0].migrated_to.user_device_point_id: 'udp:x'",
        ),
        ({"user_agents": [{"vector_id": "vec:1", "migrated_to": "udp:1"}]}, "user_agents[0].migrated_to: 'udp:1'"),
        ({"devices": [{"device": {}}]}, "devices[0].id: missing"),
        ({"devices": [{"id": "udp:-"}]}, "devices[0].id: 'udp:-'"),
        ({"devices": [{"id": "udp:1", "technical_identifiers": {}}]}, "devices[0].technical_identifiers: {}"),
        (
            {"devices": [{"id": "udp:1"}, {"id": "udp:2", "technical_identifiers": [{"type": "MUM_ID"}]}]},
            "devices[1].technical_identifiers[0].id: missing",
        ),
        ({"merged_user_point_ids": [{"merge_ts": 1}]}, "merged_user_point_ids[0].user_point_id: missing"),
        ({"merged_user_point_ids": [UP]}, "merged_user_point_ids[0]: "),
    ],
)
def test_wrong_shapes_reject_the_whole_line(changes: dict[str, Any], reason: str) -> None:
    obj = {**POINT, "accounts": [{"compartment_id": "1", "user_account_id": "ok", "creation_ts": 1}], **changes}
    assert reason in reject_of(obj)


def test_values_too_deep_to_serialize_reject_the_line() -> None:
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    obj = {**POINT, "profiles": [{"$compartment_id": "1", "$user_account_id": "a", "v": deep}]}
    assert "serialized" in reject_of(obj)


@pytest.mark.parametrize("version", ["v201709", "v201901"])
def test_device_points_do_not_exist_before_v202205(version: str) -> None:
    assert "devices" in reject_of({**POINT, "devices": [{"id": "udp:1"}]}, version)
    migrated = {"vector_id": "vec:1", "migrated_to": {"user_device_point_id": "udp:2"}}
    assert "user_agents[0].migrated_to" in reject_of({**POINT, "user_agents": [migrated]}, version)
    # an empty devices list and an unmigrated user agent are fine
    ops = one({**POINT, "devices": [], "user_agents": [{"vector_id": "vec:1", "migrated_to": None}]}, version)
    assert [(o["doc_type"], o["op"]) for o in ops] == [("UserPoint", "UPDATE"), ("UserAgent", "UPDATE")]


def test_later_system_versions_use_the_new_device_model() -> None:
    migrated = {"vector_id": "vec:9", "creation_ts": 3, "migrated_to": {"user_device_point_id": "udp:-2"}}
    ops = one({**POINT, "user_agents": [migrated]}, "v202301")
    assert [(o["doc_type"], o["op"], o["doc_id"]) for o in ops[1:]] == [
        ("UserAgent", "DELETE", f"{UP}:vec:9"),
        ("UserDevicePoint", "UPDATE", f"{UP}:udp:-2"),
        ("UserDeviceTechnicalId", "UPDATE", f"{UP}:udp:-2:mum:9"),
    ]
    with pytest.raises(ValueError, match="system_version"):
        ExportReader(DATA_DIR / "userpoints-v202205.ndjson", system_version="2022-05", start_ts=START)


def test_invalid_operation_lines_are_rejected_with_the_field(tmp_path: Path) -> None:
    good = orjson.loads((DATA_DIR / "userpoints-v202205.operations.ndjson").read_bytes().splitlines()[2])
    bad = [
        ({**good, "ts": "1"}, "ts:"),
        ({**good, "doc_type": "UserX"}, "doc_type:"),
        ({**good, "doc_id": "x"}, "doc_id:"),
        ({**good, "op": "upsert"}, "op:"),
        ({**good, "value": []}, "value:"),
        ({**good, "op": "DELETE"}, "value:"),
        ({k: v for k, v in good.items() if k != "doc_id"}, "doc_id: missing"),
    ]
    path = write(tmp_path / "ops", [orjson.dumps(good) + b"\n"] + [orjson.dumps(o) + b"\n" for o, _ in bad])
    lines = read_all(ExportReader(path, start_ts=START))
    assert lines[0].reject is None
    for line, (_, field) in zip(lines[1:], bad, strict=True):
        assert line.messages == []
        assert (line.reject or "").startswith(field), (line.line_no, line.reject)


# --- transformation rules ---------------------------------------------------------------------------------------


def test_timestamps_fall_back_to_the_start_time_only_when_absent() -> None:
    obj = {
        "user_point_id": UP,
        "accounts": [{"compartment_id": 7, "user_account_id": "crm:42"}],
        "emails": [{"hash": "h", "email": None, "creation_ts": None}],
        "user_agents": [{"vector_id": "vec:1", "last_activity_ts": 9, "creation_ts": 8}],
        "devices": [{"id": "udp:1", "technical_identifiers": [{"id": "ins:1:x"}]}],
        "profiles": [{"$compartment_id": "1", "$user_account_id": "a", "$creation_ts": 4}],
        "segments": [{"segment_id": 5, "creation_ts": 2, "expiration_ts": 10}],
        "activities": [{"$id": "act", "$type": "TOUCH"}],
        "merged_user_point_ids": [{"user_point_id": UP.replace("d", "e")}],
        "unknown_key": [1],
    }
    ops = one(obj)
    assert [(o["doc_type"], o["doc_id"], o["ts"]) for o in ops] == [
        ("UserPoint", UP, START),
        ("UserAccount", f"{UP}:7:crm:42", START),
        ("UserEmail", f"{UP}:h", START),
        ("UserAgent", f"{UP}:vec:1", 9),
        ("UserDevicePoint", f"{UP}:udp:1", START),
        ("UserDeviceTechnicalId", f"{UP}:udp:1:ins:1:x", START),
        ("UserProfile", f"{UP}:1:a", 4),
        ("UserSegment", f"{UP}:5", 2),
        ("UserActivity", f"{UP}:act", START),
        ("UserPointParent", UP.replace("d", "e"), START),
    ]
    assert ops[2]["value"] == {"$hash": "h"}
    assert ops[3]["value"]["$creation_ts"] == 8
    assert ops[4]["value"] == {
        "$os_family": None,
        "$browser_family": None,
        "$form_factor": None,
        "$brand": None,
        "$model": None,
        "$os_version": None,
        "$carrier": None,
        "$creation_ts": 0,
    }
    assert ops[7]["value"] == {"$creation_ts": 2, "$last_modified_ts": None, "$expiration_ts": 10}
    assert ops[8]["value"] == {"$type": "TOUCH"}
    assert all(validate_operation(o) is None for o in ops)


def test_null_lists_are_empty() -> None:
    keys = ["accounts", "emails", "user_agents", "devices", "profiles", "segments", "activities"]
    ops = one({**POINT, **dict.fromkeys(keys), "merged_user_point_ids": None}, "v201901")
    assert [o["doc_type"] for o in ops] == ["UserPoint"]


# --- everything emitted is valid --------------------------------------------------------------------------------

ODD_IDS = ["日本語", "a b", "\u2028", "x" * 300, "🚀", "-1", "0", 12, "\\", '"q"']
ODD_TAILS = [*ODD_IDS, "a:b", "ins:1001:aZm:", ":x"]


def generate_user_points(n: int, *, seed: int, new_model: bool = True) -> list[dict[str, Any]]:
    rnd = random.Random(seed)

    def uid() -> str:
        return str(uuid.UUID(int=rnd.getrandbits(128), version=4))

    def ts() -> int | None:
        return rnd.choice([None, 0, rnd.randrange(10**13)])

    def device() -> dict[str, Any] | None:
        return rnd.choice([None, {}, {"os_family": "IOS", "brand": "Apple", "carrier": None, "extra": 1}])

    def seg() -> str | int:
        return rnd.choice([str(rnd.randrange(10**6)), uid(), *ODD_IDS])

    out = []
    for k in range(n):
        up: dict[str, Any] = {"user_point_id": uid() if k % 7 else uid().upper(), "creation_ts": ts()}
        up["accounts"] = [
            {"compartment_id": seg(), "user_account_id": rnd.choice(ODD_TAILS), "creation_ts": ts()}
            for _ in range(rnd.randrange(3))
        ]
        up["emails"] = [{"hash": seg(), "email": rnd.choice([None, "a@b.c"])} for _ in range(rnd.randrange(2))]
        agents = []
        for _ in range(rnd.randrange(4)):
            ua: dict[str, Any] = {"vector_id": f"vec:{rnd.randrange(10**12)}", "device": device()}
            ua.update(creation_ts=ts(), last_activity_ts=ts())
            if new_model and rnd.random() < 0.5:
                ua["migrated_to"] = {"user_device_point_id": f"udp:{rnd.randrange(-(10**11), 10**11)}"}
            agents.append(ua)
        up["user_agents"] = agents
        if new_model:
            up["devices"] = [
                {
                    "id": f"udp:{rnd.randrange(-(10**11), 10**11)}",
                    "device": device(),
                    "creation_ts": ts(),
                    "technical_identifiers": [
                        {"type": "X", "id": rnd.choice(ODD_TAILS), "creation_ts": ts()} for _ in range(rnd.randrange(3))
                    ],
                }
                for _ in range(rnd.randrange(3))
            ]
        up["profiles"] = [
            {"$compartment_id": seg(), "$user_account_id": rnd.choice(ODD_TAILS), "$last_modified_ts": ts(), "p": k}
            for _ in range(rnd.randrange(2))
        ]
        up["segments"] = [
            {"segment_id": seg(), "creation_ts": ts(), "last_modified_ts": ts(), "expiration_ts": ts()}
            for _ in range(rnd.randrange(4))
        ]
        up["activities"] = [
            {"$id": seg(), "$type": "SITE_VISIT", "$ts": ts(), "$events": [{"$ts": 1, "label": "santé"}]}
            for _ in range(rnd.randrange(5))
        ]
        up["merged_user_point_ids"] = [{"user_point_id": uid(), "merge_ts": ts()} for _ in range(rnd.randrange(2))]
        out.append(up)
    return out


@pytest.mark.parametrize("version", ["v202205", "v201901"])
def test_every_emitted_operation_is_valid(tmp_path: Path, version: str) -> None:
    points = generate_user_points(400, seed=11, new_model=version >= "v202205")
    path = write(tmp_path / "e", dumps_lines(points))
    lines = read_all(ExportReader(path, system_version=version, start_ts=START))
    assert [line.reject for line in lines] == [None] * len(points)
    ops = messages(lines)
    assert len(ops) > 4 * len(points)
    assert len({m[DOC_TYPE] for m in ops}) == (10 if version >= "v202205" else 8)
    for m in ops:
        obj = orjson.loads(m[DATA])
        assert validate_operation(obj) is None, obj
        assert list(obj) == list(KEYS)
        assert (m[DOC_TYPE], m[OP], m[KEY]) == (obj["doc_type"], obj["op"], obj["doc_id"].partition(":")[0])


JUNK = [None, "", ":", "a:b", "a\nb", "\x00", "\x7f", -1, 0, True, 1.5, [], {}, "vec:x", "udp:", "udp:-", "udp:1", "é"]


def _mutations(obj: Any, rnd: random.Random) -> Iterator[Any]:
    """Every way of replacing one scalar, list or dict somewhere in `obj` by a random junk value."""
    if isinstance(obj, dict):
        for key in list(obj):
            yield from ((key, sub) for sub in _mutations(obj[key], rnd))
            yield (key, rnd.choice(JUNK))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from ((i, sub) for sub in _mutations(item, rnd))


def _apply(obj: Any, path: Any) -> Any:
    key, rest = path
    clone = copy.deepcopy(obj)
    target, (k, v) = clone, (key, rest)
    while isinstance(v, tuple):
        target, (k, v) = target[k], v
    target[k] = v
    return clone


def test_mutated_user_points_are_rejected_or_emit_only_valid_operations() -> None:
    rnd = random.Random(7)
    rejected = emitted = 0
    for point in generate_user_points(40, seed=12):
        for path in _mutations(point, rnd):
            mutated = _apply(point, path)
            try:
                ops = transform_user_point(mutated, system_version="v202205", start_ts=START)
            except InvalidLine as exc:
                assert exc.reason
                rejected += 1
                continue
            emitted += 1
            for m in ops:
                assert validate_operation(orjson.loads(m[DATA])) is None, (path, m[DATA])
    assert rejected > 100
    assert emitted > 100


# --- memory -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size_mb", "gz"), [(50, False), (20, True)])
def test_streaming_keeps_memory_flat(tmp_path: Path, size_mb: int, gz: bool) -> None:
    # few, wide lines: tracemalloc slows every allocation, and width is what a buffering reader would pay for
    points = generate_user_points(20, seed=21)
    for i, point in enumerate(points):
        point["profiles"] = [{"$compartment_id": "1", "$user_account_id": "a", "blob": chr(65 + i) * 60_000}]
    block = b"".join(dumps_lines(points))
    path = tmp_path / "big"
    with gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb") as f:
        repeats = size_mb * 1024 * 1024 // len(block) + 1
        for _ in range(repeats):
            f.write(block)
    reader = ExportReader(path, start_ts=START)
    tracemalloc.start()
    try:
        lines = count = 0
        for line in reader.lines():
            lines += 1
            count += len(line.messages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reader.raw_position == path.stat().st_size
    assert lines == repeats * len(points)
    assert count > 10 * lines
    assert peak < 8 * 1024 * 1024, peak
