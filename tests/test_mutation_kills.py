"""Tests that kill the mutants `make mutation` left alive in the modules that guard data (mutation_report.py).

Each test observes a property a user relies on, never how the code computes it; each section says which survivors it
kills (by function and mutation: mutant ids are mutmut's and shift when a function is edited).

transform.py: the reject reason is what a user reads in `rejects.ndjson` to fix the export line, so it is asserted
whole, for a defect in the *second* element of each list (the element's index is part of the reason); every timestamp
accepts 0; a device's fields all reach the operation.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keyring
import orjson
import pytest
import tomli_w
from keyring.backends import chainer, null

from dmrepl.destinations import DestinationError, create
from dmrepl.destinations import file as file_destination
from dmrepl.errors import InvalidInputError, NotFoundError
from dmrepl.models import (
    SCHEMA_VERSION,
    Checkpoint,
    Datamart,
    Execution,
    ExecutionOptions,
    ExecutionStatus,
    HistoryEntry,
    RecordError,
    RegistryData,
    Replication,
    ReplicationError,
    SecretRef,
    SourceFile,
    Status,
    from_dict,
    iso,
    now_iso,
    parse_iso,
)
from dmrepl.operations import Message
from dmrepl.registry import Registry, ensure_home, home
from dmrepl.secrets import delete_secret, keyring_usable, load_secret, resolve_store, store_secret
from dmrepl.transform import InvalidLine, transform_user_point

# --------------------------------------------------------------------------------------------------------------
# transform.py

UP = "d95bafc8-f2a4-427b-9cf4-bb99f4bea973"
UP2 = "0b5b7a2e-7f0e-4c8e-9d3a-6f1f2a3b4c5d"
START = 1_700_000_000_000
NEW = "v202205"
OLD = "v201901"
TS = "a timestamp (non-negative integer, ms)"
SEG = "a non-empty id without ':' or control characters"
TAIL = "a non-empty id without control characters"
UDP = "a user device point id (udp:<digits>)"

# One valid element per list: the defect under test is always in the element after it.
VALID: dict[str, Callable[[], dict[str, Any]]] = {
    "accounts": lambda: {"compartment_id": "1", "user_account_id": "u1"},
    "emails": lambda: {"hash": "h1"},
    "user_agents": lambda: {"vector_id": "vec:1"},
    "devices": lambda: {"id": "udp:1"},
    "profiles": lambda: {"$compartment_id": "1", "$user_account_id": "u1"},
    "segments": lambda: {"segment_id": "s1"},
    "activities": lambda: {"$id": "a1"},
    "merged_user_point_ids": lambda: {"user_point_id": UP2},
}


def second(name: str, **fields: Any) -> dict[str, Any]:
    """A user point whose list `name` holds a valid element, then one with `fields` over a valid element's."""
    bad = {**VALID[name](), **fields}
    return {"user_point_id": UP, name: [VALID[name](), {k: v for k, v in bad.items() if v is not MISSING}]}


MISSING = object()


def reason(obj: Any, version: str = NEW) -> str:
    with pytest.raises(InvalidLine) as info:
        transform_user_point(obj, system_version=version, start_ts=START)
    assert str(info.value) == info.value.reason  # the exception and the rejects file say the same
    return info.value.reason


def operations(obj: Any, version: str = NEW, start_ts: int = START) -> list[dict[str, Any]]:
    return [orjson.loads(m[0]) for m in transform_user_point(obj, system_version=version, start_ts=start_ts)]


REJECTS: list[tuple[Any, str]] = [
    # whole line
    ([1, 2], "not a JSON object: [1, 2]"),
    ({"user_point_id": "x" * 100}, f"user_point_id: '{'x' * 78}… is not a UUID"),
    ({"user_point_id": "x" * 78}, f"user_point_id: '{'x' * 78}' is not a UUID"),  # exactly 80: shown whole
    ({"user_point_id": "x" * 79}, f"user_point_id: '{'x' * 78}… is not a UUID"),  # 81: cut to 79 + …
    ({"user_point_id": UP, "creation_ts": -1}, f"creation_ts: -1 is not {TS}"),
    ({"user_point_id": UP, "creation_ts": "1"}, f"creation_ts: '1' is not {TS}"),
    # accounts
    (second("accounts", compartment_id=MISSING), "accounts[1].compartment_id: missing"),
    (second("accounts", compartment_id="a:b"), f"accounts[1].compartment_id: 'a:b' is not {SEG}"),
    (second("accounts", user_account_id="\x01"), f"accounts[1].user_account_id: '\\x01' is not {TAIL}"),
    (second("accounts", creation_ts=-1), f"accounts[1].creation_ts: -1 is not {TS}"),
    # emails
    (second("emails", hash=""), f"emails[1].hash: '' is not {SEG}"),
    (second("emails", creation_ts=-1), f"emails[1].creation_ts: -1 is not {TS}"),
    # user agents
    (second("user_agents", vector_id="vec:x"), "user_agents[1].vector_id: 'vec:x' is not a vector id (vec:<digits>)"),
    (second("user_agents", creation_ts=-1), f"user_agents[1].creation_ts: -1 is not {TS}"),
    (second("user_agents", last_activity_ts=-1), f"user_agents[1].last_activity_ts: -1 is not {TS}"),
    (second("user_agents", creation_ts="1", last_activity_ts=2), f"user_agents[1].creation_ts: '1' is not {TS}"),
    (second("user_agents", creation_ts=-1, last_activity_ts=2), f"user_agents[1].creation_ts: -1 is not {TS}"),
    (second("devices", creation_ts=-1, last_activity_ts=2), f"devices[1].creation_ts: -1 is not {TS}"),
    (second("user_agents", device="phone"), "user_agents[1].device: 'phone' is not an object"),
    (second("user_agents", migrated_to="udp:1"), "user_agents[1].migrated_to: 'udp:1' is not an object"),
    (
        second("user_agents", migrated_to={"user_device_point_id": "udp:-x1"}),
        f"user_agents[1].migrated_to.user_device_point_id: 'udp:-x1' is not {UDP}",
    ),
    # devices
    (second("devices", id="udp:-x"), f"devices[1].id: 'udp:-x' is not {UDP}"),
    (second("devices", id="udp:-x1"), f"devices[1].id: 'udp:-x1' is not {UDP}"),
    (second("devices", creation_ts=-1), f"devices[1].creation_ts: -1 is not {TS}"),
    (second("devices", device=[]), "devices[1].device: [] is not an object"),
    (second("devices", technical_identifiers={}), "devices[1].technical_identifiers: {} is not a list"),
    (
        second("devices", technical_identifiers=[{"id": "t"}, 5]),
        "devices[1].technical_identifiers[1]: 5 is not an object",
    ),
    (
        second("devices", technical_identifiers=[{"id": "t"}, {"id": ""}]),
        f"devices[1].technical_identifiers[1].id: '' is not {TAIL}",
    ),
    (
        second("devices", technical_identifiers=[{"id": "t"}, {"id": "u", "creation_ts": -1}]),
        f"devices[1].technical_identifiers[1].creation_ts: -1 is not {TS}",
    ),
    # profiles
    (second("profiles", **{"$compartment_id": ":"}), f"profiles[1].$compartment_id: ':' is not {SEG}"),
    (second("profiles", **{"$user_account_id": ""}), f"profiles[1].$user_account_id: '' is not {TAIL}"),
    (second("profiles", **{"$creation_ts": -1}), f"profiles[1].$creation_ts: -1 is not {TS}"),
    (second("profiles", **{"$last_modified_ts": -1}), f"profiles[1].$last_modified_ts: -1 is not {TS}"),
    # segments
    (second("segments", segment_id="a:b"), f"segments[1].segment_id: 'a:b' is not {SEG}"),
    (second("segments", creation_ts=-1), f"segments[1].creation_ts: -1 is not {TS}"),
    (second("segments", last_modified_ts=-1), f"segments[1].last_modified_ts: -1 is not {TS}"),
    (second("segments", expiration_ts=-1), f"segments[1].expiration_ts: -1 is not {TS}"),
    # the first bad timestamp is named, and a 0 before it is not bad
    (second("segments", creation_ts=0, expiration_ts=-1), f"segments[1].expiration_ts: -1 is not {TS}"),
    (second("segments", creation_ts=0, last_modified_ts="2"), f"segments[1].last_modified_ts: '2' is not {TS}"),
    # activities
    (second("activities", **{"$id": "a:b"}), f"activities[1].$id: 'a:b' is not {SEG}"),
    (second("activities", **{"$ts": -1}), f"activities[1].$ts: -1 is not {TS}"),
    # merges
    (second("merged_user_point_ids", user_point_id="x"), "merged_user_point_ids[1].user_point_id: 'x' is not a UUID"),
    (second("merged_user_point_ids", merge_ts=-1), f"merged_user_point_ids[1].merge_ts: -1 is not {TS}"),
]
# a timestamp that is not an integer, in every place one is read
REJECTS += [
    (second(name, **{key: "1"}), f"{name}[1].{key}: '1' is not {TS}")
    for name, key in [
        ("accounts", "creation_ts"),
        ("emails", "creation_ts"),
        ("user_agents", "last_activity_ts"),
        ("devices", "last_activity_ts"),
        ("profiles", "$creation_ts"),
        ("profiles", "$last_modified_ts"),
        ("segments", "creation_ts"),
        ("activities", "$ts"),
        ("merged_user_point_ids", "merge_ts"),
    ]
]
REJECTS += [
    (
        second("devices", technical_identifiers=[{"id": "t"}, {"id": "u", "creation_ts": "1"}]),
        f"devices[1].technical_identifiers[1].creation_ts: '1' is not {TS}",
    )
]
# every list: not a list, and an element that is not an object
REJECTS += [({"user_point_id": UP, name: "x"}, f"{name}: 'x' is not a list") for name in VALID]
REJECTS += [({"user_point_id": UP, name: [VALID[name](), 5]}, f"{name}[1]: 5 is not an object") for name in VALID]


def safe_ids(texts: list[str]) -> list[str]:
    """Plain ASCII test ids: mutmut hands node ids back to pytest, which cannot find ids it had to escape."""
    return [f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.$-]+', '-', text)[:60]}" for i, text in enumerate(texts)]


@pytest.mark.parametrize(("obj", "expected"), REJECTS, ids=safe_ids([r for _, r in REJECTS]))
def test_transform_reject_reasons_name_the_field_and_the_element(obj: Any, expected: str) -> None:
    """Kills in transform.py: the string, argument and index mutants of `_bad`, `_not_object`, `_not_list`, `_loc`,
    `_show` (80-character cut), `_seg_slow`, `_tail_slow`, `_device`, `_check_ts`, `_bad_migration`, and the
    reject branches of `transform` (which list, which key, which element)."""
    assert reason(obj) == expected


def test_device_points_are_refused_by_a_datamart_older_than_the_device_model() -> None:
    """Kills `_bad_migration`'s and `transform`'s version-message mutants: the reason names the datamart's version."""
    migrated = second("user_agents", migrated_to={"user_device_point_id": "udp:1"})
    assert reason(migrated, OLD) == (
        f"user_agents[1].migrated_to: a {OLD} datamart has no device points (migration exists from {NEW})"
    )
    assert reason({"user_point_id": UP, "devices": [{"id": "udp:1"}]}, OLD) == (
        f"devices: a {OLD} datamart has no device points (they exist from {NEW})"
    )


def test_every_timestamp_accepts_zero() -> None:
    """Kills every `ts < 0` → `ts <= 0` / `ts < 1` mutant: 0 is the epoch, a valid timestamp, never a reject."""
    obj = {
        "user_point_id": UP,
        "creation_ts": 0,
        "accounts": [{"compartment_id": "1", "user_account_id": "u", "creation_ts": 0}],
        "emails": [{"hash": "h", "creation_ts": 0}],
        "user_agents": [{"vector_id": "vec:1", "creation_ts": 0, "last_activity_ts": 0}],
        "devices": [{"id": "udp:1", "creation_ts": 0, "technical_identifiers": [{"id": "t", "creation_ts": 0}]}],
        "profiles": [
            {"$compartment_id": "1", "$user_account_id": "u", "$creation_ts": 0},
            {"$compartment_id": "1", "$user_account_id": "v", "$last_modified_ts": 0},
        ],
        "segments": [{"segment_id": "s", "creation_ts": 0, "last_modified_ts": 0, "expiration_ts": 0}],
        "activities": [{"$id": "a", "$ts": 0}],
        "merged_user_point_ids": [{"user_point_id": UP2, "merge_ts": 0}],
    }
    ops = operations(obj, start_ts=0)
    assert len(ops) == 11
    assert {op["ts"] for op in ops} == {0}


def test_start_ts_must_be_a_non_negative_integer() -> None:
    """Kills the `start_ts` guard's mutants: 0 is accepted, -1 and a float are refused with a message saying why."""
    assert operations({"user_point_id": UP}, start_ts=0)[0]["ts"] == 0
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=rf"^start_ts must be a non-negative integer \(ms\), not {bad}$"):
            transform_user_point({"user_point_id": UP}, system_version=NEW, start_ts=bad)  # type: ignore[arg-type]


def test_a_device_reaches_the_operation_field_by_field() -> None:
    """Kills the `d("model")` … `d("carrier")` key mutants of `_device_point`: each device field lands under its own
    name, and `$creation_ts` is the element's creation time."""
    device = {
        "os_family": "LINUX",
        "browser_family": "FIREFOX",
        "form_factor": "PERSONAL_COMPUTER",
        "brand": "Acme",
        "model": "X1",
        "os_version": "6.1",
        "carrier": "Net",
    }
    [_, ua] = operations(
        {"user_point_id": UP, "user_agents": [{"vector_id": "vec:7", "creation_ts": 3, "device": device}]}
    )
    assert ua["value"] == {f"${k}": v for k, v in device.items()} | {"$creation_ts": 3}
    assert ua["ts"] == 3
    [_, udp] = operations({"user_point_id": UP, "devices": [{"id": "udp:-5", "last_activity_ts": 9}]})
    assert udp["doc_id"] == f"{UP}:udp:-5"
    assert udp["ts"] == 9
    assert udp["value"]["$creation_ts"] == 0


def test_a_migrated_user_agent_becomes_a_device_point() -> None:
    """Kills the migration mutants that keep the version or the id out of the operations: a user agent migrated to
    `udp:-3` is deleted and re-created as that device point with its MUM technical id."""
    ops = operations(
        {
            "user_point_id": UP,
            "user_agents": [{"vector_id": "vec:42", "migrated_to": {"user_device_point_id": "udp:-3"}}],
        }
    )
    assert [(o["doc_type"], o["op"], o["doc_id"]) for o in ops[1:]] == [
        ("UserAgent", "DELETE", f"{UP}:vec:42"),
        ("UserDevicePoint", "UPDATE", f"{UP}:udp:-3"),
        ("UserDeviceTechnicalId", "UPDATE", f"{UP}:udp:-3:mum:42"),
    ]


def test_integer_ids_are_accepted_as_their_decimal_text() -> None:
    """Kills `_seg_slow` / `_tail_slow` mutants of the integer branch (`str(None)`): an id given as a JSON integer
    becomes its digits in the doc_id."""
    ops = operations(
        {
            "user_point_id": UP,
            "accounts": [{"compartment_id": 7, "user_account_id": 8}],
            "devices": [{"id": "udp:1", "technical_identifiers": [{"id": 9}]}],
        }
    )
    assert [o["doc_id"] for o in ops[1:]] == [f"{UP}:7:8", f"{UP}:udp:1", f"{UP}:udp:1:9"]


# --------------------------------------------------------------------------------------------------------------
# registry.py, models.py: a hand-edited registry is refused naming the field and what it should be (the message is
# the only way a user finds the typo); records survive a save and a load unchanged; every status change is in the
# history with where it came from.


def _sample_registry() -> RegistryData:
    """A registry with one record of every kind and every field type (lists, tables, enums, scalars)."""
    at = "2026-01-02T03:04:05.678Z"
    rep = Replication(
        id="rep-1",
        name="local",
        type="file",
        datamart="dm1",
        status=Status.PAUSED,
        created_at=at,
        updated_at=at,
        settings={"path": "/tmp/o.ndjson"},
        credentials=SecretRef(store="file", ref="r1", fingerprint={"sha256": "ab"}),
        error=ReplicationError(code="UNWRITABLE", message="m", first_seen=at, last_seen=at, attempts=2),
        history=[
            HistoryEntry(at=at, to=Status.PAUSED, reason="create"),
            HistoryEntry(at=at, from_=Status.PAUSED, to=Status.ACTIVE, reason="activate"),
        ],
    )
    execution = Execution(
        id="ex-1",
        datamart="dm1",
        user_point_system_version="v202205",
        status=ExecutionStatus.SUCCEEDED,
        created_at=at,
        started_at=at,
        start_ts=5,
        files=[SourceFile(name="e.ndjson", size=3, format="user-points", compressed=False)],
        options=ExecutionOptions(retry_budget_s=7.5),
        operations={"UserPoint": 4},
    )
    return RegistryData(
        datamarts={"dm1": Datamart(id="dm1", name="Main", user_point_system_version="v202205", created_at=at)},
        replications={"rep-1": rep},
        executions={"ex-1": execution},
    )


def test_a_saved_registry_loads_back_equal(tmp_path: Path) -> None:
    """Kills `Registry.save` → `_write(None)` (no test saved a whole registry): what is saved is what is read."""
    registry = Registry(tmp_path)
    registry.save(_sample_registry())
    assert registry.load() == _sample_registry()


def _set(table: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    for key in path[:-1]:
        table = table[key]  # type: ignore[index]
    if value is MISSING:
        del table[path[-1]]  # type: ignore[arg-type]
    else:
        table[path[-1]] = value  # type: ignore[index]


HAND_EDITS: list[tuple[tuple[str | int, ...], Any, str]] = [
    (("datamarts", "dm1", "name"), MISSING, "datamarts.dm1.name: is missing"),
    (("datamarts", "dm1", "name"), 5, "datamarts.dm1.name: is int, expected a string"),
    (("replications", "rep-1", "settings"), 3, "replications.rep-1.settings: is not a table"),
    (("replications", "rep-1", "credentials"), "r1", "replications.rep-1.credentials: is not a table"),
    (("replications", "rep-1", "history"), 3, "replications.rep-1.history: is not a list"),
    (
        ("replications", "rep-1", "history", 1, "to"),
        "RUNNING" * 10,
        f"replications.rep-1.history[1].to: {('RUNNING' * 10)[:40]!r} is not one of PAUSED, ACTIVE, ERROR",
    ),
    (
        ("replications", "rep-1", "error", "attempts"),
        True,
        "replications.rep-1.error.attempts: is bool, expected an integer",
    ),
    (
        ("executions", "ex-1", "operations", "UserPoint"),
        "4",
        "executions.ex-1.operations.UserPoint: is str, expected an integer",
    ),
    (
        ("executions", "ex-1", "options", "retry_budget_s"),
        "7",
        "executions.ex-1.options.retry_budget_s: is str, expected a number",
    ),
    (
        ("executions", "ex-1", "files", 0, "compressed"),
        0,
        "executions.ex-1.files[0].compressed: is int, expected true or false",
    ),
]


@pytest.mark.parametrize(("path", "value", "problem"), HAND_EDITS, ids=safe_ids([p for _, _, p in HAND_EDITS]))
def test_a_hand_edited_registry_is_refused_naming_the_field_and_what_it_must_be(
    tmp_path: Path, path: tuple[str | int, ...], value: Any, problem: str
) -> None:
    """Kills in models.py the `where` / problem-text / `allowed` mutants of `_convert` and `from_dict`, the
    `_type_name` lookups, `RecordError.problem`, and the bool-is-not-an-integer check; the whole message is asserted
    because it is all a user has to find the typo."""
    registry = Registry(tmp_path)
    registry.save(_sample_registry())
    table = tomllib.loads(registry.path.read_text("utf-8"))
    _set(table, path, value)
    text = tomli_w.dumps(table)
    registry.path.write_text(text, "utf-8")
    with pytest.raises(InvalidInputError) as info:
        registry.load()
    assert info.value.message == (
        f"{registry.path}: {problem}; dmrepl will not overwrite it: fix that field or restore the file from a backup"
    )
    assert info.value.code == "REGISTRY_INVALID"
    assert registry.path.read_text("utf-8") == text


def test_a_whole_number_is_a_valid_float_field_and_is_read_as_a_float(tmp_path: Path) -> None:
    """Kills `float(value) if tp is float` mutants: `retry_budget_s = 7` (TOML integer) reads as 7.0, not refused."""
    registry = Registry(tmp_path)
    registry.save(_sample_registry())
    table = tomllib.loads(registry.path.read_text("utf-8"))
    table["executions"]["ex-1"]["options"]["retry_budget_s"] = 7
    registry.path.write_text(tomli_w.dumps(table), "utf-8")
    budget = registry.load().executions["ex-1"].options.retry_budget_s
    assert budget == 7.0
    assert type(budget) is float


def test_a_bad_checkpoint_field_is_named_in_the_error_message() -> None:
    """Kills `RecordError.__init__` → `super().__init__(None)`: `sync resume` shows str(error) for an unreadable
    checkpoint, so it must name the field and the problem."""
    with pytest.raises(RecordError) as info:
        from_dict(Checkpoint, {"read": 3}, "checkpoint")
    assert str(info.value) == "checkpoint.read: is not a list"
    assert (info.value.where, info.value.problem) == ("checkpoint.read", "is not a list")


def test_timestamps_are_utc_with_a_z_and_read_back() -> None:
    """Kills `iso`'s `replace("+00:00", "Z")` string mutant: registry timestamps end in Z, to the millisecond."""
    dt = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert iso(dt) == "2026-01-02T03:04:05.678Z"
    assert parse_iso(iso(dt)) == dt
    assert now_iso().endswith("Z")


def test_every_status_change_is_in_the_history_with_where_it_came_from(cli: Any, file_replication: Any) -> None:
    """Kills `Replication.transition` mutants that drop the entry or its `from`: `dmrepl history` shows each change
    from → to, in order."""
    cli("pause", "local")
    entries = json.loads(cli("--json", "history", "local").stdout)
    assert [(e.get("from"), e["to"], e["reason"]) for e in entries][-2:] == [
        ("PAUSED", "ACTIVE", entries[-2]["reason"]),
        ("ACTIVE", "PAUSED", entries[-1]["reason"]),
    ]
    assert all(e["reason"] for e in entries)


def test_a_checkpoint_counts_the_operations_it_recorded() -> None:
    """Kills `Checkpoint.counter` → `Counter(None)`: a resumed run starts counting from the checkpoint's counts."""
    assert Checkpoint(operations={"UserPoint": 3, "UserEmail": 1}).counter() == Counter(UserPoint=3, UserEmail=1)


def test_a_record_field_of_an_unsupported_type_is_a_programming_error_naming_it() -> None:
    """Kills `raise TypeError(None)` in `_convert`: whoever adds a record field of a type the registry cannot hold
    is told which field, at its first load."""

    @dataclasses.dataclass
    class Odd:
        tags: set[str]

    with pytest.raises(TypeError, match=r"^odd\.tags: unsupported field type set\[str\]$"):
        from_dict(Odd, {"tags": ["a"]}, "odd")


def test_a_registry_write_goes_through_a_hidden_temporary_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills the `mkstemp` prefix / suffix mutants of `atomic_write`: what a crash mid-write can leave behind is a
    hidden `.registry.toml.*.tmp` in the registry's own directory (same file system, so the rename is atomic), never
    a visible file that a user or a backup could take for the registry."""
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        replaced.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    registry = Registry(tmp_path)
    registry.save(_sample_registry())
    [(src, dst)] = replaced
    assert Path(dst) == registry.path
    assert Path(src).parent == registry.path.parent
    assert re.fullmatch(r"\.registry\.toml\.[^/]+\.tmp", Path(src).name), src


def test_a_registry_root_that_does_not_exist_yet_is_created_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `ensure_home(None)` in `Registry._write` and `mkdir(parents=None)` in `ensure_home`: `--home a/b/c` is
    created with its parents, and the registry goes there, not to $DMREPL_HOME."""
    monkeypatch.setenv("DMREPL_HOME", str(tmp_path / "env-home"))
    registry = Registry(tmp_path / "a" / "b" / "home")
    registry.save(_sample_registry())
    assert registry.load() == _sample_registry()
    assert not (tmp_path / "env-home").exists()


def test_an_older_registry_is_rewritten_in_this_schema_version(tmp_path: Path) -> None:
    """Kills the `table["schema_version"]` key mutants of `Registry._write`: a registry of an older schema that this
    dmrepl changes is written back as this schema, with no stray key."""
    registry = Registry(tmp_path)
    registry.path.write_text(
        'schema_version = 0\n[datamarts.dm1]\nid = "dm1"\nname = "Old"\nuser_point_system_version = "v202205"\n'
        'created_at = "2026-01-02T03:04:05.678Z"\n',
        "utf-8",
    )
    with registry.transaction() as data:
        data.datamarts["dm1"].name = "New"
    table = tomllib.loads(registry.path.read_text("utf-8"))
    assert table["schema_version"] == SCHEMA_VERSION
    assert set(table) == {"schema_version", "datamarts", "replications", "executions"}
    assert table["datamarts"]["dm1"]["name"] == "New"


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (
            b"schema_version = [1",
            "REGISTRY_INVALID",
            "the registry does not parse (*); dmrepl will not overwrite it: restore it from a backup or move it away",
        ),
        (
            b'schema_version = "1"\n',
            "REGISTRY_INVALID",
            "schema_version is missing or not an integer; dmrepl will not overwrite it",
        ),
        (
            b"schema_version = 2\n",
            "REGISTRY_TOO_NEW",
            "schema_version 2 is newer than this dmrepl understands (1); upgrade dmrepl",
        ),
    ],
    ids=["unparsable", "no-version", "too-new"],
)
def test_an_unreadable_registry_is_refused_with_its_code_and_what_to_do(
    tmp_path: Path, content: bytes, code: str, message: str
) -> None:
    """Kills the `code=` and message mutants of `Registry.load`: `--json` errors carry the code scripts branch on,
    and the message says what to do; the file is left as it was."""
    registry = Registry(tmp_path)
    registry.path.write_bytes(content)
    with pytest.raises(InvalidInputError) as info:
        registry.load()
    assert info.value.code == code
    head, _, tail = f"{registry.path}: {message}".partition("*")
    assert info.value.message.startswith(head)
    assert info.value.message.endswith(tail)
    assert registry.path.read_bytes() == content


def test_a_new_home_is_private_from_its_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills the `mode=0o700` mutants of `ensure_home`'s mkdir: the home holds the registry (and may hold secrets),
    so it is 0700 from the instant it exists, not only once `chmod` has run."""
    modes: list[int] = []
    real_chmod = os.chmod

    def spy(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        modes.append(stat.S_IMODE(os.stat(path).st_mode))  # as the directory was created, before this chmod
        real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", spy)
    old_umask = os.umask(0o022)
    try:
        ensure_home(tmp_path / "home")
    finally:
        os.umask(old_umask)
    assert modes == [0o700]
    assert stat.S_IMODE(os.stat(tmp_path / "home").st_mode) == 0o700


def test_without_dmrepl_home_the_registry_is_in_the_user_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `home()`'s `user_config_dir("dmrepl")` mutants: without --home or $DMREPL_HOME the registry is in the
    platform's user config directory, under `dmrepl` (README: ~/.config/dmrepl on Linux)."""
    monkeypatch.delenv("DMREPL_HOME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert home() == tmp_path / "config" / "dmrepl"


# --------------------------------------------------------------------------------------------------------------
# secrets.py: a stored secret reads back exactly, from the store and the home it was stored in; a missing one is an
# error that says what to do; deleting twice is harmless; a keyring that cannot keep secrets is named in the refusal.


@pytest.mark.parametrize("store", ["file", "keyring"])
def test_a_stored_secret_reads_back_exactly_and_is_deleted_for_good(tmp_path: Path, store: str) -> None:
    """Kills in `load_secret` every mutant of the read (`value = None`, `get_password(None, ref)`, the store test,
    `secrets_dir(None)`), and in `delete_secret` the path mutants: what is stored under a home is read back byte for
    byte from that home, and gone after a delete; the home is not $DMREPL_HOME (the isolated fixture's
    tmp_path/"home"), so a store that fell back to $DMREPL_HOME would be seen."""
    root = tmp_path / "other-home"
    value = 'Endpoint=sb://ns.example/;SharedAccessKeyName=k;SharedAccessKey=a+b/c=\n{"é": 1}'
    ref = store_secret("rep-1a2b3c4d", value, store, root=root)
    assert ref == SecretRef(store=store, ref="rep-1a2b3c4d")
    assert load_secret(ref, root=root) == value
    delete_secret(ref, root=root)
    with pytest.raises(NotFoundError):
        load_secret(ref, root=root)
    delete_secret(ref, root=root)  # deleting what is already gone is not an error


def test_a_secret_that_is_gone_says_how_to_rebind(tmp_path: Path) -> None:
    """Kills `load_secret`'s `value = ""`, `is not None`, message and `code=` mutants: a missing secret is refused
    with SECRET_NOT_FOUND and the command that fixes it, never read as an empty secret."""
    for store in ("file", "keyring"):
        with pytest.raises(NotFoundError) as info:
            load_secret(SecretRef(store=store, ref="rep-gone"), root=tmp_path)
        assert info.value.code == "SECRET_NOT_FOUND"
        assert info.value.message == (
            f"the credentials of this replication ({store} secret 'rep-gone') are gone; "
            "rebind it with dmrepl recreate ID --credentials FILE"
        )


def test_file_secrets_go_under_the_given_home_created_if_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `secrets_dir`'s `root and home()` and `ensure_home(None)`, and `store_secret`'s `secrets_dir(None)`: with
    `--home`, secrets go under that home (created on first use), never under $DMREPL_HOME."""
    monkeypatch.setenv("DMREPL_HOME", str(tmp_path / "env-home"))
    root = tmp_path / "new" / "home"
    store_secret("rep-1", "s3cret", "file", root=root)
    assert (root / "secrets" / "rep-1").read_text("utf-8") == "s3cret"
    assert not (tmp_path / "env-home").exists()


def test_a_keyring_that_cannot_keep_secrets_is_named_in_the_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills `keyring_usable`'s mutants: the null backend and a keyring configuration that raises are unusable, and
    the refusal names the backend (or the error) so the user knows what to fix."""
    keyring.set_keyring(null.Keyring())
    assert keyring_usable() == (False, "keyring.backends.null.Keyring")

    def broken() -> Any:
        raise RuntimeError("bad keyringrc")

    monkeypatch.setattr(keyring, "get_keyring", broken)
    assert keyring_usable() == (False, "keyring configuration error: RuntimeError")
    with pytest.raises(InvalidInputError) as info:
        resolve_store("auto")
    assert info.value.code == "NO_KEYRING"
    assert info.value.message == (
        "no usable OS keyring backend (keyring configuration error: RuntimeError): dmrepl will not store the secret. "
        "On a headless server opt in to the file store with --secret-store file or DMREPL_SECRET_STORE=file "
        "(one 0600 file per secret under the dmrepl home)"
    )
    assert resolve_store("file") == "file"


def test_an_unknown_secret_store_is_refused_listing_the_known_ones() -> None:
    """Kills `resolve_store`'s INVALID_SECRET_STORE message and code mutants."""
    with pytest.raises(InvalidInputError) as info:
        resolve_store("vault")
    assert info.value.code == "INVALID_SECRET_STORE"
    assert info.value.message == "secret store 'vault' is not one of auto, keyring, file"


def test_a_keyring_chain_with_nothing_to_chain_is_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills `keyring_usable`'s ChainerBackend mutants (`and backend.backends`, `return True`): a chainer backend
    that found no keyring to chain keeps no secret, so dmrepl must refuse to store one there."""
    monkeypatch.setattr(keyring.backend, "get_all_keyring", lambda: [])
    keyring.set_keyring(chainer.ChainerBackend())
    assert keyring_usable() == (False, "keyring.backends.chainer.ChainerBackend")


def test_a_working_keyring_is_usable_and_named() -> None:
    """Kills the `name = …` mutants of `keyring_usable`: the backend in use is reported by module and class."""
    assert keyring_usable() == (True, "tests.keyring_backend.FileKeyring")


# --------------------------------------------------------------------------------------------------------------
# destinations/file.py: the connectivity check and `create` say what is wrong with a --path and how to fix it (a
# directory of /proc/sys stands for one that cannot be written: even root cannot create files there); `recreate`
# without --path keeps the path; `dmrepl list` shows the path; the kernel's writeback can be started on Linux.

UNWRITABLE_DIR = Path("/proc/sys")
needs_unwritable_dir = pytest.mark.skipif(
    not UNWRITABLE_DIR.is_dir() or os.access(UNWRITABLE_DIR, os.W_OK), reason="needs a directory nobody can write"
)


def _check(path: Path) -> dict[str, Any]:
    [step] = create("file", {"path": str(path)}, None).check()
    found = step.to_dict()
    found.pop("duration_ms", None)
    return found


def test_the_file_check_names_a_missing_directory_and_how_to_create_it(tmp_path: Path) -> None:
    """Kills the `check` step-name and PATH_NOT_FOUND detail mutants."""
    missing = tmp_path / "nope"
    assert _check(missing / "o.ndjson") == {
        "name": "path-writable",
        "status": "failed",
        "code": "PATH_NOT_FOUND",
        "detail": f"directory {missing} does not exist",
        "fix": f"create it (mkdir -p {missing}) or recreate the replication with another --path",
    }
    assert _check(tmp_path / "o.ndjson") == {
        "name": "path-writable",
        "status": "ok",
        "detail": str(tmp_path / "o.ndjson"),
    }


@needs_unwritable_dir
def test_the_file_check_refuses_a_new_file_in_a_directory_it_cannot_write() -> None:
    """Kills `check`'s `not p.exists()` → `p.exists()` and `W_OK | X_OK` → `W_OK & X_OK` mutants: a file that does
    not exist yet in a directory dmrepl cannot write fails the check, with the fix."""
    assert _check(UNWRITABLE_DIR / "o.ndjson") == {
        "name": "path-writable",
        "status": "failed",
        "code": "PERMISSION_DENIED",
        "detail": f"cannot create files in {UNWRITABLE_DIR}",
        "fix": "fix the directory's permissions or choose another --path",
    }


def _bind_error(options: dict[str, Any]) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        file_destination.TYPE.bind(options, None, "", None)
    return info.value


def test_create_refuses_a_missing_path_or_directory_naming_the_option(tmp_path: Path) -> None:
    """Kills `bind`'s `Defects("--path")`, `defects.add("--path", …)` and `raise_if_any("file settings")` mutants:
    the error names the option and the problem, in the message and in `--json` details."""
    error = _bind_error({})
    assert error.message == "--path: invalid file settings: --path: is required for the file destination"
    assert error.details == [{"field": "--path", "message": "is required for the file destination"}]
    missing = tmp_path / "nope"
    error = _bind_error({"path": str(missing / "o.ndjson")})
    assert error.message == f"--path: invalid file settings: --path: parent directory {missing} does not exist"
    assert error.details == [{"field": "--path", "message": f"parent directory {missing} does not exist"}]


@needs_unwritable_dir
def test_create_refuses_a_path_in_a_directory_it_cannot_write() -> None:
    """Kills `bind`'s `W_OK | X_OK` → `W_OK & X_OK` and the not-writable message mutants."""
    error = _bind_error({"path": str(UNWRITABLE_DIR / "o.ndjson")})
    assert error.message == f"--path: invalid file settings: --path: parent directory {UNWRITABLE_DIR} is not writable"


def test_recreate_without_path_keeps_the_path_and_list_shows_it(tmp_path: Path) -> None:
    """Kills `bind`'s `previous_or(options, None, "path")` and `describe`'s mutants: a rebind that gives no --path
    keeps the replication's path, and the TARGET column of `dmrepl list` is that path."""
    previous = {"path": str(tmp_path / "o.ndjson")}
    assert file_destination.TYPE.bind({}, None, "", previous).settings["path"] == previous["path"]
    assert file_destination.TYPE.describe(previous) == previous["path"]
    assert file_destination.TYPE.describe({}) == ""


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux's")
def test_writeback_can_be_started_on_linux(tmp_path: Path) -> None:
    """Kills `start_writeback`'s `== 0` → `!= 0` / `== 1` mutants: on Linux the call succeeds and says so."""
    with open(tmp_path / "o.ndjson", "wb") as f:
        f.write(b"{}\n" * 1000)
        assert file_destination.start_writeback(f.fileno()) is True


def _lines(n: int) -> list[Message]:
    return [(b'{"n":%d}' % i, "UserPoint", "UPDATE", "k") for i in range(n)]


def _write_then_tear(path: Path, lines: int, torn: bytes) -> bytes:
    """What dmrepl made durable (`lines` whole lines), then what a crash mid-write leaves after it."""
    with create("file", {"path": str(path)}, None) as dest:
        if lines:
            dest.send(_lines(lines))
    durable = path.read_bytes()
    with open(path, "ab") as f:
        f.write(torn)
    return durable


@pytest.mark.parametrize(
    "torn",
    [b"{", b'{"ts":1', b'{"n":7}\n' + b"x" * 200_000, b"\n" + b"y" * 65_535, b"\n" + b"y" * 65_536],
    ids=["one-byte", "no-newline-at-all", "longer-than-two-read-chunks", "newline-first-in-the-chunk", "newline-alone"],
)
@pytest.mark.parametrize("lines", [0, 3])
def test_reopening_after_a_crash_cuts_exactly_the_torn_last_line(tmp_path: Path, torn: bytes, lines: int) -> None:
    """Kills `_repair_torn_tail`'s boundary mutants (`size == 1`, `while pos >= 0` / `> 1`, `nl > 0`, `pos = step`,
    `pos += step`, `truncate(None, 0)`): after a crash, reopening keeps every whole line and only them, whether the
    torn line is one byte, the whole file, or longer than the 64 KiB the repair reads at a time."""
    path = tmp_path / "o.ndjson"
    durable = _write_then_tear(path, lines, torn)
    whole = durable + torn[: torn.rfind(b"\n") + 1]
    with create("file", {"path": str(path)}, None) as dest:
        dest.send(_lines(1))
    assert path.read_bytes() == whole + b'{"n":0}\n'


def test_a_file_that_cannot_be_opened_is_unwritable_naming_it(tmp_path: Path) -> None:
    """Kills `open`'s DestinationError code and message mutants: the replication goes to ERROR with UNWRITABLE and
    a message naming the file and the system's reason."""
    path = tmp_path / "gone" / "o.ndjson"
    with pytest.raises(DestinationError) as info:
        create("file", {"path": str(path)}, None).open()
    assert info.value.code == "UNWRITABLE"
    assert info.value.message == f"cannot open {path}: No such file or directory"


def test_a_short_write_is_continued_until_every_byte_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `send`'s `data = data[written:]` → `data = None`: the kernel may write less than asked (a signal, a
    nearly full disk); what it did not take is written next, so no line is ever cut short."""
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:7]))

    path = tmp_path / "o.ndjson"
    with create("file", {"path": str(path)}, None) as dest:
        monkeypatch.setattr(os, "write", short_write)
        dest.send(_lines(5))
        monkeypatch.setattr(os, "write", real_write)
    assert path.read_bytes() == b"".join(b'{"n":%d}\n' % i for i in range(5))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_unwritable_naming_the_file_and_the_cause() -> None:
    """Kills `send`'s DestinationError code and message mutants: a write the system refuses (here: no space left)
    puts the replication in ERROR as UNWRITABLE, with the file and the system's reason."""
    dest = create("file", {"path": "/dev/full"}, None)
    dest.open()
    try:
        with pytest.raises(DestinationError) as info:
            dest.send(_lines(1))
        assert info.value.code == "UNWRITABLE"
        assert info.value.message == "cannot write /dev/full: No space left on device"
    finally:
        dest.close()


def test_closing_releases_the_file_and_a_second_close_is_harmless(tmp_path: Path) -> None:
    """Kills `close`'s `if self._fd is None` and `self._fd = ""` mutants: a closed destination holds no descriptor
    (a long `replicate` opens and closes many), and closing it again does nothing."""
    before = set(os.listdir("/proc/self/fd"))
    dest = create("file", {"path": str(tmp_path / "o.ndjson")}, None)
    dest.open()
    dest.send(_lines(2))
    dest.close()
    assert set(os.listdir("/proc/self/fd")) <= before
    dest.close()
    assert (tmp_path / "o.ndjson").read_bytes() == b'{"n":0}\n{"n":1}\n'


def test_a_secret_is_utf8_on_disk_whatever_the_locale(tmp_path: Path) -> None:
    """Kills `store_secret`'s and `load_secret`'s `encoding=None` / dropped-encoding mutants: a server under LANG=C
    (an ASCII locale, as cron often runs) stores and reads a non-ASCII secret as UTF-8, the same bytes a UTF-8
    machine would write. The in-process round trip comes first so that mutmut ties this test to both functions."""
    value = "SharedAccessKey=clé€"
    ref = store_secret("rep-1", value, "file", root=tmp_path / "here")
    assert load_secret(ref, root=tmp_path / "here") == value
    code = (  # the value as an ASCII literal: under LANG=C, non-ASCII arguments would not arrive intact
        "import sys\nfrom pathlib import Path\nfrom dmrepl.secrets import load_secret, store_secret\n"
        f"root, value = Path(sys.argv[1]), {value!a}\nref = store_secret('rep-1', value, 'file', root=root)\n"
        "sys.exit(0 if load_secret(ref, root=root) == value else 3)\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    root = tmp_path / "c-locale"
    done = subprocess.run([sys.executable, "-c", code, str(root)], env=env, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert (root / "secrets" / "rep-1").read_bytes() == value.encode("utf-8")


def test_a_directory_is_not_a_file_destination(tmp_path: Path) -> None:
    """Kills the existing-path branches of `check` and `bind` (`is_dir() and …`, `os.access(p, None)`, the step's
    status / detail / fix, the defect's field): a --path that is a directory fails the check and is refused by
    `create`, naming the path; the check says what to do with --path."""
    [step] = create("file", {"path": str(tmp_path)}, None).check()
    assert step.status == "failed"
    assert str(tmp_path) in step.detail
    assert "--path" in step.fix
    error = _bind_error({"path": str(tmp_path)})
    assert [d["field"] for d in error.details] == ["--path"]
    assert str(tmp_path) in error.details[0]["message"]


def test_a_failed_fsync_is_unwritable_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills `flush`'s DestinationError code and message mutants: when the system cannot make the file durable (an
    I/O error on fsync), the replication goes to ERROR as UNWRITABLE with the file and the cause, instead of a
    checkpoint recording operations that may be lost."""
    path = tmp_path / "o.ndjson"
    dest = create("file", {"path": str(path)}, None)
    dest.open()
    dest.send(_lines(1))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(DestinationError) as info:
        dest.flush()
    assert info.value.code == "UNWRITABLE"
    assert info.value.message == f"cannot write {path}: {os.strerror(errno.EIO)}"
    monkeypatch.setattr(os, "fsync", real_fsync)
    dest.close()


# --------------------------------------------------------------------------------------------------------------
# sync/coordinator.py and sync/api.py: a sync stopped and resumed in this process (test_sync.py's interrupt tests
# stop a `dmrepl sync start` subprocess, which mutmut cannot see)


def _sync_keys(path: Path) -> Counter[tuple[str, str, str]]:
    ops = [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return Counter((o["doc_type"], o["doc_id"], o["op"]) for o in ops)


def _stop_after(pieces: int) -> Callable[[], bool]:
    """A stop asked between pieces of work (1 MiB ranges in-process): true from the `pieces`-th question on."""
    asked: list[bool] = []

    def stop() -> bool:
        asked.append(True)
        return len(asked) >= pieces

    return stop


def _padded_export(
    path: Path, users: int = 400, *, bad_every: int = 0, pad: int = 9000
) -> tuple[Counter[Any], list[int]]:
    """A user-point export of ~11 KB lines: a 1 MiB piece (the in-process piece size) holds ~90 of them, so a sync
    of several pieces has few user points to convert and deliver (what keeps these tests fast). Returns the expected
    operations and the numbers of the bad lines, as `generate.write` does."""
    from tests import generate

    expected: Counter[Any] = Counter()
    bad: list[int] = []
    with path.open("wb") as f:
        for no, (line, exp) in enumerate(generate.lines(users, bad_every=bad_every), start=1):
            if exp:
                up = json.loads(line)
                up["profiles"][0]["pad"] = "x" * pad
                line = json.dumps(up).encode()
                expected.update(exp)
            else:
                bad.append(no)
            f.write(line + b"\n")
    return expected, bad


def test_a_sync_stopped_between_pieces_checkpoints_there_and_its_resume_sends_the_rest_once(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graceful stop (what Ctrl-C and SIGTERM ask for) flushes and checkpoints exactly where the run stopped: the
    execution is CANCELED, the checkpoint's position is the end of the last line delivered, its counts are what the
    destination holds, and a resume delivers every other operation exactly once, with rejects numbered as in the
    export."""
    from dmrepl import sync as engine
    from dmrepl.errors import Interrupted

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, bad = _padded_export(export, bad_every=50)  # 4.4 MB: five 1 MiB pieces
    with pytest.raises(Interrupted):
        engine.start(Registry(), [export], datamart=None, opts=engine.SyncOptions(), stop=_stop_after(2))
    (execution,) = Registry().load().executions.values()
    (rid,) = execution.replications
    assert execution.status is ExecutionStatus.CANCELED
    assert execution.error == f"interrupted (Interrupted); resume with dmrepl sync resume {execution.id}"
    directory = home() / "executions" / execution.id
    cp = json.loads((directory / "checkpoint.json").read_text())
    data = export.read_bytes()
    file_idx, offset, line = cp["read"]
    assert file_idx == 0 and 0 < offset < len(data) and data[offset - 1 : offset] == b"\n"
    assert data[:offset].count(b"\n") == line == cp["lines_read"] == execution.lines_read
    assert cp["reps"][rid]["pos"] == cp["read"]
    delivered = _sync_keys(out)
    assert cp["reps"][rid]["delivered"] == sum(delivered.values()) == execution.replications[rid].delivered
    assert cp["rejects"] == execution.rejects == sum(b <= line for b in bad) > 0
    assert sum(cp["operations"].values()) == sum(delivered.values())
    assert 0 < execution.progress.bytes_read < execution.progress.bytes_total == len(data)

    outcome = engine.resume(Registry(), execution.id)
    assert outcome.execution.status is ExecutionStatus.SUCCEEDED and outcome.errored == []
    assert _sync_keys(out) == expected, "an operation lost or sent twice across the stop"
    done = outcome.execution
    assert (done.lines_read, done.rejects) == (400, len(bad))
    assert done.replications[rid].delivered == sum(expected.values()) and done.replications[rid].failed == 0
    assert sum(done.operations.values()) == sum(expected.values())
    assert done.progress.percent == 100.0 and done.progress.bytes_read == len(data)
    rejects = [json.loads(r) for r in (directory / "rejects.ndjson").read_text().splitlines()]
    assert [r["line"] for r in rejects] == bad and {r["file"] for r in rejects} == {str(export)}


def test_a_sync_interrupted_mid_piece_keeps_the_last_checkpoint(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything raised while a piece is on its way (a second Ctrl-C) leaves only the previous checkpoint safe: the
    execution is CANCELED at it, and a resume from it completes (re-sending at most what was in flight)."""
    from dmrepl import sync as engine

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, _ = _padded_export(export)
    asked: list[bool] = []

    def stop() -> bool:
        asked.append(True)
        if len(asked) == 3:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        engine.start(Registry(), [export], datamart=None, opts=engine.SyncOptions(checkpoint_interval_s=0), stop=stop)
    (execution,) = Registry().load().executions.values()
    assert execution.status is ExecutionStatus.CANCELED
    assert execution.error == f"interrupted (KeyboardInterrupt); resume with dmrepl sync resume {execution.id}"
    cp = json.loads((home() / "executions" / execution.id / "checkpoint.json").read_text())
    (rid,) = cp["reps"]
    assert cp["read"][0] == 0 and 0 < cp["read"][1] < export.stat().st_size
    written = sum(_sync_keys(out).values())
    assert 0 < cp["reps"][rid]["delivered"] < written, "the interrupted piece was written after the checkpoint"
    outcome = engine.resume(Registry(), execution.id)
    assert outcome.execution.status is ExecutionStatus.SUCCEEDED
    got = _sync_keys(out)
    assert not expected - got, "an operation was lost"
    assert sum((got - expected).values()) == written - cp["reps"][rid]["delivered"], (
        "a resume re-sends exactly what was written after the checkpoint"
    )


# --------------------------------------------------------------------------------------------------------------
# delivery.py: the fan-out's accounting when one replication fails, is dropped, or acknowledged part of a batch


def _fanout_messages(start: int, stop: int) -> list[Message]:
    return [(b'{"n":%d}' % i, "UserPoint", "UPDATE", f"key-{i}") for i in range(start, stop)]


def _fanout(tmp_path: Path, failed: list[Any], *names: str) -> Any:
    from dmrepl.delivery import Fanout, ReplicationBinding

    bindings = [ReplicationBinding(f"rep-{n}", n, "file", {"path": str(tmp_path / f"{n}.ndjson")}) for n in names]
    fanout = Fanout(bindings, on_reject=lambda *a: None, on_fail=failed.append)
    fanout.open_all()
    return fanout


def _fsync_fails_for(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """An I/O error when the system makes `path` durable (a failing disk under one replication's file)."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_replication_failing_in_a_flush_fails_alone_is_released_and_not_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `Fanout.fail`'s and `open_all`'s mutants on what a failure does: it is reported once (to the owner of
    the run, which records the ERROR), the other replication is delivered to and counted, the failed one's file is
    released even though closing it fails too, and nothing opens it again (its file removed meanwhile stays gone)."""
    before = _open_fds()
    failed: list[Any] = []
    fanout = _fanout(tmp_path, failed, "a", "b")
    _fsync_fails_for(monkeypatch, tmp_path / "a.ndjson")
    for target in list(fanout.targets.values()):
        fanout.offer(target, _fanout_messages(0, 5))
    fanout.flush()  # raises nothing: one replication failing never stops the others
    a, b = fanout.targets["rep-a"], fanout.targets["rep-b"]
    assert [t.rep_id for t in failed] == ["rep-a"] and a.error is not None
    assert (a.error.code, a.error.to_dict()) == ("UNWRITABLE", {"code": "UNWRITABLE", "message": a.error.message})
    assert a.error.message == f"cannot write {tmp_path / 'a.ndjson'}: {os.strerror(errno.EIO)}"
    assert fanout.live == [b] and (a.delivered, b.delivered) == (0, 5)
    assert _open_fds() - before == {str(b.dest._fd)}, "the failed replication's file is still open"
    (tmp_path / "a.ndjson").unlink()
    fanout.open_all()
    assert not (tmp_path / "a.ndjson").exists(), "a failed replication was opened again"
    fanout.offer(a, _fanout_messages(5, 6))
    fanout.flush()
    assert [t.rep_id for t in failed] == ["rep-a"]
    fanout.close_all()
    assert _open_fds() == before


def test_a_dropped_replication_receives_nothing_more_and_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `Fanout.drop`'s mutants: a replication dropped (paused, or failed in another worker) gets none of what
    was queued for it, nor anything after; its file is closed even when closing fails; dropping an unknown or
    already dropped replication is harmless; the others go on."""
    before = _open_fds()
    failed: list[Any] = []
    fanout = _fanout(tmp_path, failed, "a", "b")
    a, b = fanout.targets["rep-a"], fanout.targets["rep-b"]
    for target in (a, b):
        fanout.offer(target, _fanout_messages(0, 3))
    fanout.flush()
    for target in (a, b):
        fanout.offer(target, _fanout_messages(3, 6))  # queued, not yet sent
    _fsync_fails_for(monkeypatch, tmp_path / "a.ndjson")
    fanout.drop("rep-a")
    fanout.drop("rep-a")
    fanout.drop("rep-nobody")
    assert fanout.live == [b] and not failed, "a drop is not a failure"
    assert _open_fds() - before == {str(b.dest._fd)}, "the dropped replication's file is still open"
    fanout.offer(a, _fanout_messages(6, 9))
    fanout.offer(b, _fanout_messages(6, 9))
    fanout.flush()
    assert (tmp_path / "a.ndjson").read_bytes().count(b"\n") == 3
    assert (tmp_path / "b.ndjson").read_bytes().count(b"\n") == 9
    assert (a.delivered, b.delivered) == (3, 9)
    fanout.close_all()
    assert _open_fds() == before


def test_what_pubsub_acknowledged_before_failing_counts_as_delivered(pubsub_emulator: str, pubsub_topic: Any) -> None:
    """Kills `Fanout.fail`'s accounting mutants: between two flushes the service acknowledges messages as they
    arrive; when the replication then fails, those did arrive and count as delivered (a resume re-sends them: at
    least once), and no more than that."""
    from dmrepl.delivery import Fanout, ReplicationBinding
    from tests.peers.pubsub import delete_topic

    failed: list[Any] = []
    binding = ReplicationBinding("rep-ps", "ps", "google-pubsub", pubsub_topic.settings(ordering=True))
    fanout = Fanout([binding], retry_budget_s=30, on_reject=lambda *a: None, on_fail=failed.append)
    fanout.open_all()
    (target,) = fanout.targets.values()
    fanout.offer(target, _fanout_messages(0, 1500))
    fanout.flush()
    assert target.delivered == 1500
    fanout.offer(target, _fanout_messages(1500, 1800))
    fanout.push(target)
    deadline = time.monotonic() + 10
    while target.dest.acknowledged < 1800 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert target.dest.acknowledged == 1800, "the server did not acknowledge the batch sent without a flush"
    delete_topic(pubsub_topic.addr, pubsub_topic.project_id, pubsub_topic.topic_id)
    fanout.offer(target, _fanout_messages(1800, 2000))
    fanout.flush()
    assert [t.rep_id for t in failed] == ["rep-ps"] and target.error is not None
    assert target.error.code == "TOPIC_NOT_FOUND"
    assert target.delivered == 1800 == len(pubsub_topic.pull(expected=1800, timeout=10))
    fanout.close_all()


def test_a_plan_counts_everything_a_start_would_send_and_says_who_would_not_receive_it(
    cli: Any, tmp_path: Path
) -> None:
    """Kills `plan`'s and `_iso_or_now`'s mutants: the dry run reports the exact lines, operations by type, rejects
    (with at most 100 samples, each naming its file and line), the export's size and sha256, and, for the chosen
    datamart only, which replications would receive and why the others would not; after a successful sync, the
    weekly rule's next allowed start."""
    import hashlib

    from dmrepl import sync as engine
    from dmrepl.replications import mark_error
    from tests import generate

    cli("datamart", "add", "dm1", "--system-version", "v202205")
    cli("datamart", "add", "dm2", "--system-version", "v202205")
    # "0-other" sorts first: the listing skips other datamarts' replications, it does not stop at them
    for name, datamart in (("a", "dm1"), ("b", "dm1"), ("c", "dm1"), ("0-other", "dm2")):
        path = tmp_path / f"{name}.ndjson"
        cli("create", "--type", "file", "--name", name, "--datamart", datamart, "--path", path)
    for name in ("a", "c", "0-other"):
        cli("activate", name)
    registry = Registry()
    ids = {r.name: r.id for r in registry.load().replications.values()}
    mark_error(registry, ids["c"], code="UNWRITABLE", message="gone", undelivered=0, reason="test")
    export = tmp_path / "export.ndjson"
    expected, bad = generate.write(export, 250, bad_every=2)
    assert len(bad) == 125

    plan = engine.plan(registry, [export], datamart="dm1", opts=engine.SyncOptions())
    by_type = Counter(doc_type for doc_type, _, _ in expected.elements())
    assert (plan["datamart"], plan["user_point_system_version"]) == ("dm1", "v202205")
    assert (plan["lines"], plan["rejects"]) == (250, 125)
    assert plan["operations"] == dict(by_type) and list(plan["operations"]) == sorted(by_type)
    assert plan["operations_total"] == sum(by_type.values())
    samples = plan["reject_samples"]
    assert [s["line"] for s in samples] == bad[:100] and {s["file"] for s in samples} == {str(export)}
    assert all(s["reason"] for s in samples)
    (described,) = plan["files"]
    assert (described["name"], described["size"]) == (str(export), export.stat().st_size)
    assert described["compressed"] is False
    assert described["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
    assert plan["would_receive"] == [{"id": ids["a"], "name": "a", "type": "file", "status": "ACTIVE"}]
    assert plan["would_not_receive"] == [
        {"id": ids["b"], "name": "b", "type": "file", "status": "PAUSED", "why": "PAUSED: activate it to include it"},
        {"id": ids["c"], "name": "c", "type": "file", "status": "ERROR", "why": "ERROR: recreate it first"},
    ]
    assert (plan["refusals"], plan["next_allowed"]) == ([], "now")
    assert not (tmp_path / "a.ndjson").exists(), "a plan sent something"
    (tmp_path / "a.ndjson").write_bytes(export.read_bytes())
    with pytest.raises(InvalidInputError) as err:  # a plan refuses what a start would refuse
        engine.plan(registry, [tmp_path / "a.ndjson"], datamart="dm1", opts=engine.SyncOptions())
    assert err.value.code == "DESTINATION_IS_EXPORT"
    (tmp_path / "a.ndjson").unlink()

    engine.start(registry, [export], datamart="dm1", opts=engine.SyncOptions())
    (execution,) = registry.load().executions.values()
    plan = engine.plan(registry, [export], datamart="dm1", opts=engine.SyncOptions())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", plan["next_allowed"]), plan["next_allowed"]
    started = parse_iso(execution.started_at)
    allowed = datetime.fromisoformat(plan["next_allowed"])
    assert abs((allowed - started).total_seconds() - 7 * 86400) < 1
    (refusal,) = plan["refusals"]
    assert refusal["code"] == "WEEKLY_RULE" and refusal["message"].endswith(f"allowed from {plan['next_allowed']}")


@pytest.mark.parametrize("workers", ["1", "2"], ids=["in-process", "2-worker-processes"])
def test_a_replication_failing_mid_sync_counts_what_its_service_acknowledged(
    workers: str,
    cli: Any,
    datamart: str,
    pubsub_emulator: str,
    pubsub_topic: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kills `Coordinator._on_fail`'s and `_fail`'s accounting mutants, in-process (test_pubsub_e2e.py checks the same
    through a subprocess): the topic is deleted between two pieces, after Pub/Sub acknowledged operations that no
    checkpoint recorded yet. Those arrived, so they count as delivered: the execution's `delivered` is what the
    server holds, `failed` the rest, the replication's error says how many it missed, and the file replication
    beside it gets everything. With worker processes, the failure reaches the coordinator in a checkpoint's
    acknowledgements instead of a callback."""
    from dmrepl import sync as engine
    from tests.peers.pubsub import delete_topic
    from tests.test_pubsub_e2e import Collector, create_file, create_pubsub, op_key, rep_id, write_key

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", workers)
    export = tmp_path / "export.ndjson"
    expected, _ = _padded_export(export, 1500, pad=500)  # over SEND_BATCH operations a piece: some sent mid-piece
    total = sum(expected.values())
    create_pubsub(cli, "ps", write_key(tmp_path), pubsub_topic.topic_id)
    cli("activate", "ps")
    ps_id = rep_id(cli, "ps")
    out = tmp_path / "file.ndjson"
    create_file(cli, "local", out)
    directory: list[Path] = []
    checkpointed: list[int] = []

    def stop() -> bool:  # asked after each piece, before its checkpoint
        directory[:] = list((home() / "executions").iterdir())
        if len(checkpointed) == 0 and (directory[0] / "checkpoint.json").exists():
            checkpointed.append(json.loads((directory[0] / "checkpoint.json").read_text())["reps"][ps_id]["delivered"])
            time.sleep(0.2)  # Pub/Sub acknowledges the second piece meanwhile; no checkpoint records it
            delete_topic(pubsub_topic.addr, pubsub_topic.project_id, pubsub_topic.topic_id)
        return False

    outcome = engine.start(
        Registry(), [export], datamart=None, opts=engine.SyncOptions(checkpoint_interval_s=0), stop=stop
    )
    collector = Collector.of(pubsub_topic)
    try:
        on_server = Counter(op_key(p.data) for p in collector.drain())
    finally:
        collector.close()
    assert outcome.errored == [ps_id] and outcome.execution.status is ExecutionStatus.FAILED
    ps = outcome.execution.replications[ps_id]
    assert ps.status == "ERROR" and ps.error is not None and ps.error["code"] == "TOPIC_NOT_FOUND"
    assert not on_server - expected, "duplicates or foreign operations on the server"
    assert ps.delivered == sum(on_server.values()) > checkpointed[0] > 0
    assert (ps.rejected, ps.failed) == (0, total - ps.delivered)
    rep = Registry().load().replications[ps_id]
    assert rep.status is Status.ERROR and rep.error is not None and rep.error.undelivered == ps.failed
    assert rep.history[-1].reason == f"sync {outcome.execution.id}: TOPIC_NOT_FOUND"
    local = next(r for r in outcome.execution.replications.values() if r is not ps)
    assert (local.status, local.delivered, local.failed) == ("OK", total, 0)
    assert _sync_keys(out) == expected


def test_an_operation_over_a_destinations_limit_is_rejected_for_it_alone_and_the_rest_kept_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `Fanout.offer`'s mutants: the limit is the destination's (here 100 bytes), exactly the limit passes,
    each operation over it is rejected with its size (the owner of the run writes it to rejects.ndjson), counted,
    and the others are sent in order; a line with no operation is harmless."""
    monkeypatch.setattr(file_destination.FileDestination, "max_message_bytes", 100)
    rejected: list[tuple[str, Message, str]] = []
    from dmrepl.delivery import Fanout, ReplicationBinding

    fanout = Fanout(
        [ReplicationBinding("rep-a", "a", "file", {"path": str(tmp_path / "a.ndjson")})],
        on_reject=lambda target, message, reason: rejected.append((target.rep_id, message, reason)),
    )
    fanout.open_all()
    (target,) = fanout.targets.values()

    def sized(n: int, tag: bytes) -> Message:
        data = b'{"t":"' + tag + b'","p":"' + b"x" * (n - 16) + b'"}'
        assert len(data) == n
        return (data, "UserPoint", "UPDATE", "k")

    fits, exact, over, far_over = sized(99, b"a"), sized(100, b"b"), sized(101, b"c"), sized(500, b"d")
    fanout.offer(target, [fits, over, exact, far_over])
    fanout.offer(target, [])
    fanout.flush()
    assert [r[0] for r in rejected] == ["rep-a", "rep-a"] and [r[1] for r in rejected] == [over, far_over]
    assert [r[2] for r in rejected] == ["PAYLOAD_TOO_LARGE: 101 bytes > 100", "PAYLOAD_TOO_LARGE: 500 bytes > 100"]
    assert (tmp_path / "a.ndjson").read_bytes() == fits[0] + b"\n" + exact[0] + b"\n"
    assert (target.rejected, target.delivered) == (2, 2)
    fanout.close_all()


def test_a_full_batch_is_sent_at_once(tmp_path: Path) -> None:
    """Kills `offer`'s batch mutant: the SEND_BATCH-th queued operation sends the batch without waiting for a flush
    (what is queued stays bounded), and not one operation earlier."""
    from dmrepl.delivery import SEND_BATCH, Fanout, ReplicationBinding

    failed: list[Any] = []
    a = tmp_path / "a.ndjson"
    fanout = Fanout(
        [ReplicationBinding("rep-a", "a", "file", {"path": str(a)})], on_reject=lambda *x: None, on_fail=failed.append
    )
    fanout.open_all()
    target = fanout.targets["rep-a"]
    fanout.offer(target, _fanout_messages(0, SEND_BATCH - 1))
    assert a.read_bytes() == b""
    fanout.offer(target, _fanout_messages(SEND_BATCH - 1, SEND_BATCH))
    assert a.read_bytes().count(b"\n") == SEND_BATCH, "a full batch waited for a flush"
    fanout.flush()
    assert target.delivered == SEND_BATCH and not failed
    fanout.close_all()


def test_a_destination_that_cannot_open_fails_its_replication_naming_why(tmp_path: Path) -> None:
    """Kills `Fanout.open`'s failure mutants: the replication is reported failed with the destination's code and
    message, and the others open."""
    from dmrepl.delivery import Fanout, ReplicationBinding

    failed: list[Any] = []
    missing = tmp_path / "missing" / "a.ndjson"
    fanout = Fanout(
        [
            ReplicationBinding("rep-a", "a", "file", {"path": str(missing)}),
            ReplicationBinding("rep-b", "b", "file", {"path": str(tmp_path / "b.ndjson")}),
        ],
        on_reject=lambda *a: None,
        on_fail=failed.append,
    )
    fanout.open_all()
    assert [t.rep_id for t in failed] == ["rep-a"] and failed[0].error is not None
    assert failed[0].error.to_dict() == {
        "code": "UNWRITABLE",
        "message": f"cannot open {missing}: No such file or directory",
    }
    assert [t.rep_id for t in fanout.live] == ["rep-b"]
    fanout.close_all()


def test_the_retry_budget_given_to_a_run_is_the_destinations(monkeypatch: pytest.MonkeyPatch, closed_port: int) -> None:
    """Kills the retry-budget mutants of `Fanout`: a service that stays unreachable fails the replication once the
    run's budget (here 1 s) is spent, not after the 60 s default."""
    from dmrepl.delivery import Fanout, ReplicationBinding

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{closed_port}")
    failed: list[Any] = []
    binding = ReplicationBinding("rep-ps", "ps", "google-pubsub", {"project_id": "p", "topic_id": "t"})
    fanout = Fanout([binding], retry_budget_s=1, on_reject=lambda *a: None, on_fail=failed.append)
    start = time.monotonic()
    fanout.open_all()
    (target,) = fanout.targets.values()
    fanout.offer(target, _fanout_messages(0, 3))
    fanout.flush()
    assert [t.rep_id for t in failed] == ["rep-ps"]
    assert time.monotonic() - start < 15, "the run's retry budget was not the destination's"
    fanout.close_all()


def _stopped_sync(export: Path, *, pieces: int = 2, **opts: Any) -> str:
    """A sync of `export` stopped after `pieces` pieces (CANCELED, resumable); its execution id."""
    from dmrepl import sync as engine
    from dmrepl.errors import Interrupted

    with pytest.raises(Interrupted):
        engine.start(Registry(), [export], datamart=None, opts=engine.SyncOptions(**opts), stop=_stop_after(pieces))
    (execution,) = Registry().load().executions.values()
    return execution.id


def test_a_resume_reads_the_checkpoint_it_finds_and_refuses_one_it_cannot_read(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `load_checkpoint`'s mutants: a replication the checkpoint does not know starts from the beginning (and
    is the only one the next checkpoint records); an unreadable checkpoint is refused, naming the file and the field,
    and never overwritten."""
    from dmrepl import sync as engine

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    expected, _ = _padded_export(export, 300)  # 3.3 MB: four pieces
    exec_id = _stopped_sync(export, pieces=1)
    path = home() / "executions" / exec_id / "checkpoint.json"
    good = path.read_text()
    path.write_text(good.replace('"reps": {', '"reps": {"rep-x": {"pos": [0, "x", 0]}, ', 1))
    with pytest.raises(InvalidInputError) as err:
        engine.resume(Registry(), exec_id)
    assert str(err.value).startswith(f"{path}: unreadable checkpoint (checkpoint.reps")
    assert "rep-x" in str(err.value)
    path.write_text("{")
    with pytest.raises(InvalidInputError, match=r"unreadable checkpoint \("):
        engine.resume(Registry(), exec_id)
    assert path.read_text() == "{"
    before = _sync_keys(out)
    saved = json.loads(good)
    (rid,) = saved["reps"]
    del saved["reps"][rid]  # a checkpoint that does not know the replication: it starts from the beginning
    path.write_text(json.dumps(saved))
    outcome = engine.resume(Registry(), exec_id)
    assert outcome.execution.status is ExecutionStatus.SUCCEEDED
    assert _sync_keys(out) == before + expected
    assert set(json.loads(path.read_text())["reps"]) == {rid}


def test_a_resume_keeps_the_options_of_the_start_and_passes_on_its_hooks(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `resume`'s mutants: the lines after the checkpoint are read with the start's --max-line-bytes (a long
    line is rejected as it would have been), a resume can itself be stopped, and it reports progress."""
    from dmrepl import sync as engine
    from dmrepl.errors import Interrupted

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    export = tmp_path / "export.ndjson"
    _padded_export(export)
    lines = export.read_bytes().splitlines()
    long_at = 380  # far after the checkpoint: read by the resume
    assert len(lines[long_at]) < 16384
    lines[long_at] = lines[long_at][:-1] + b', "more": "' + b"x" * 8000 + b'"}'
    export.write_bytes(b"\n".join(lines) + b"\n")
    exec_id = _stopped_sync(export, max_line_bytes=16384)
    with pytest.raises(Interrupted):
        engine.resume(Registry(), exec_id, stop=_stop_after(1))
    progress: list[tuple[int, int, int]] = []
    outcome = engine.resume(Registry(), exec_id, progress=lambda *p: progress.append(p))
    assert outcome.execution.status is ExecutionStatus.SUCCEEDED
    assert outcome.execution.rejects == 1
    rejects = [json.loads(r) for r in Path(outcome.execution.rejects_file or "").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [long_at + 1] and "16384" in rejects[0]["reason"]
    assert progress and progress[-1][0] == progress[-1][1] == export.stat().st_size


def test_a_resume_of_an_execution_stopped_before_hashing_compares_size_and_time(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `resume`'s export-comparison mutants: without a recorded sha256 (the run stopped before its hasher
    finished), an export of the same size and modification time is resumed, and one whose time changed is refused
    as changed."""
    from dmrepl import sync as engine

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    export = tmp_path / "export.ndjson"
    _padded_export(export)
    exec_id = _stopped_sync(export)
    with Registry().transaction() as data:
        data.executions[exec_id].files[0].sha256 = None
    st = export.stat()
    os.utime(export, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(InvalidInputError) as err:
        engine.resume(Registry(), exec_id)
    assert err.value.code == "EXPORT_CHANGED"
    assert str(err.value) == (
        f"{export}: the export changed since the execution started (size or sha256 differs); "
        "start a new synchronization instead"
    )
    os.utime(export, ns=(st.st_atime_ns, st.st_mtime_ns))
    (home() / "executions" / exec_id / "checkpoint.json").unlink()  # nor any checkpoint yet: from the start
    outcome = engine.resume(Registry(), exec_id)
    assert outcome.execution.status is ExecutionStatus.SUCCEEDED
    assert outcome.execution.lines_read == 400


def test_an_export_appended_to_while_read_fails_the_execution_saying_what_to_do(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `_check_unchanged`'s message mutants: the error says to start a new synchronization once the export is
    complete (resuming would read the changed file)."""
    from dmrepl import sync as engine
    from tests import generate

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    export = tmp_path / "export.ndjson"
    generate.write(export, 300)

    def stop() -> bool:
        with open(export, "ab") as f:
            f.write(b"\n")
        return False

    with pytest.raises(InvalidInputError) as err:
        engine.start(Registry(), [export], datamart=None, opts=engine.SyncOptions(), stop=stop)
    assert str(err.value) == (
        f"{export}: the export changed while it was read (size or modification time); "
        "start a new synchronization once it is complete"
    )


def test_sync_rejects_keep_non_ascii_text_as_utf8(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `_write_reject`'s mutants: a reject quotes the export line's text as UTF-8, as the export has it."""
    from dmrepl import sync as engine
    from tests import generate

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    export = tmp_path / "export.ndjson"
    lines = [line for line, _ in generate.lines(3)]
    export.write_bytes(b"\n".join([*lines, '{"user_point_id": "Zoé"}'.encode()]) + b"\n")
    outcome = engine.start(Registry(), [export], datamart=None, opts=engine.SyncOptions())
    raw = Path(outcome.execution.rejects_file or "").read_bytes()
    assert "Zoé".encode() in raw and b"\\u00e9" not in raw


def test_closing_every_replication_goes_on_past_one_that_fails_to_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `Fanout.close_all`'s mutant: at the end of a run, a destination whose close fails (its last fsync) does
    not stop the others from being closed, nor end the run with an error of its own."""
    before = _open_fds()
    failed: list[Any] = []
    fanout = _fanout(tmp_path, failed, "a", "b")
    for target in list(fanout.targets.values()):
        fanout.offer(target, _fanout_messages(0, 2))
        fanout.push(target)  # written, not yet made durable: closing does that
    _fsync_fails_for(monkeypatch, tmp_path / "a.ndjson")
    fanout.close_all()
    assert _open_fds() == before, "a replication was left open"
    assert (tmp_path / "b.ndjson").read_bytes().count(b"\n") == 2


def test_a_replication_delivers_with_its_own_credentials(
    pstest_server: Any, pubsub_topic: Any, token_server: Any
) -> None:
    """Kills `Fanout.open`'s secret mutant: the destination is opened with the replication's secret (here a
    service account whose key the token endpoint knows), not without credentials."""
    import uuid

    from dmrepl.delivery import Fanout, ReplicationBinding
    from tests.peers.pubsub import make_service_account

    kid = uuid.uuid4().hex
    info, pem = make_service_account(token_server.url, kid)
    token_server.register(kid, pem)
    failed: list[Any] = []
    settings = pubsub_topic.settings(endpoint=pstest_server.addr)
    binding = ReplicationBinding("rep-ps", "ps", "google-pubsub", settings, json.dumps(info))
    fanout = Fanout([binding], retry_budget_s=5, on_reject=lambda *a: None, on_fail=failed.append)
    fanout.open_all()
    (target,) = fanout.targets.values()
    fanout.offer(target, _fanout_messages(0, 10))
    fanout.flush()
    assert not failed and target.delivered == 10
    assert len(pubsub_topic.pull(expected=10, timeout=10)) == 10
    assert [r.status for r in token_server.requests] == [200], "the replication's key was not the one used"
    fanout.close_all()


def test_a_replication_that_fails_mid_piece_is_in_error_at_once_with_what_it_received_and_rejected(
    cli: Any, datamart: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `_on_fail`'s and `_fail`'s mutants, in-process: a replication whose writes fail (/dev/full) while a
    piece is being sent is put in ERROR then, not at the next checkpoint (seen from `stop`, asked before it), with
    the operations it had rejected as too large for it counted, and nothing counted delivered."""
    from dmrepl import sync as engine

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    monkeypatch.setattr(file_destination.FileDestination, "max_message_bytes", 300)  # some operations are larger
    good = tmp_path / "good.ndjson"
    for name, path in (("good", good), ("full", Path("/dev/full"))):
        cli("create", "--type", "file", "--name", name, "--path", path)
        cli("activate", name)
    ids = {r.name: r.id for r in Registry().load().replications.values()}
    export = tmp_path / "export.ndjson"
    expected, _ = _padded_export(export, 1500, pad=500)  # over SEND_BATCH operations in the first piece
    total = sum(expected.values())
    seen: list[Status] = []

    def stop() -> bool:
        seen.append(Registry().load().replications[ids["full"]].status)
        return False

    outcome = engine.start(Registry(), [export], datamart=None, opts=engine.SyncOptions(), stop=stop)
    assert seen[0] is Status.ERROR, "the failure waited for a checkpoint to be recorded"
    assert outcome.errored == [ids["full"]]
    good_rep, full_rep = outcome.execution.replications[ids["good"]], outcome.execution.replications[ids["full"]]
    assert good_rep.rejected > 0 and good_rep.delivered + good_rep.rejected == total
    assert 0 < full_rep.rejected < good_rep.rejected and full_rep.delivered == 0
    assert full_rep.failed == total - full_rep.rejected
    rep = Registry().load().replications[ids["full"]]
    assert rep.error is not None and rep.error.undelivered == full_rep.failed


def test_a_replication_whose_secret_is_gone_fails_at_start_and_the_others_sync(
    file_replication: tuple[str, Path], cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `_fail`'s and `_acked`'s mutants for a replication that never delivered: its secret cannot be read, so
    it goes to ERROR at the start with the counts of its checkpoint (none yet), and misses everything."""
    from dmrepl import sync as engine

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    _, out = file_replication
    cli("create", "--type", "file", "--name", "keyless", "--path", tmp_path / "keyless.ndjson")
    cli("activate", "keyless")
    registry = Registry()
    rid = next(r.id for r in registry.load().replications.values() if r.name == "keyless")
    with registry.transaction() as data:
        data.replications[rid].credentials = SecretRef(store="keyring", ref="nowhere")
    export = tmp_path / "export.ndjson"
    expected, _ = _padded_export(export, 50)
    outcome = engine.start(registry, [export], datamart=None, opts=engine.SyncOptions())
    assert outcome.errored == [rid]
    entry = outcome.execution.replications[rid]
    assert (entry.delivered, entry.rejected, entry.failed) == (0, 0, sum(expected.values()))
    assert entry.error is not None and entry.error["code"] == "SECRET_NOT_FOUND"
    assert _sync_keys(out) == expected


def test_a_resume_keeps_the_starts_reject_limit_and_reports_its_start(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `resume`'s max_rejects and on_started mutants: --max-rejects is the execution's, so a resume past the
    limit aborts too; `on_started` is given the execution being resumed."""
    from dmrepl import sync as engine

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    export = tmp_path / "export.ndjson"
    _, bad = _padded_export(export, bad_every=150)  # bad lines 150 and 300, after the first piece
    exec_id = _stopped_sync(export, pieces=1, max_rejects=1)
    started: list[Any] = []
    outcome = engine.resume(Registry(), exec_id, on_started=started.append)
    assert [e.id for e in started] == [exec_id]
    assert outcome.aborted is not None and "more than --max-rejects 1" in outcome.aborted
    assert outcome.execution.status is ExecutionStatus.FAILED and len(bad) == 2


def test_each_checkpoint_records_the_progress_the_registry_shows(
    file_replication: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills `checkpoint`'s and `_save_progress`'s mutants: while a sync runs, each checkpoint (here after every
    piece) writes checkpoint.json with when it was saved and what each replication acknowledged, and the execution
    in the registry shows the same progress (`dmrepl sync list` reads it): lines read, bytes read out of the total,
    their percentage, and when."""
    from dmrepl import sync as engine

    monkeypatch.setenv("DMREPL_SYNC_WORKERS", "1")
    _, out = file_replication
    export = tmp_path / "export.ndjson"
    _padded_export(export)
    size = export.stat().st_size
    seen: list[tuple[dict[str, Any], Any, int]] = []

    def stop() -> bool:  # asked after each piece, before that piece's checkpoint: sees the previous one
        (execution,) = Registry().load().executions.values()
        path = home() / "executions" / execution.id / "checkpoint.json"
        if path.exists():
            delivered = sum(_sync_keys(out).values())
            seen.append((json.loads(path.read_text()), execution.progress, delivered))
        return False

    outcome = engine.start(
        Registry(), [export], datamart=None, opts=engine.SyncOptions(checkpoint_interval_s=0), stop=stop
    )
    assert len(seen) >= 3
    (rid,) = outcome.execution.replications
    for cp, progress, delivered in seen:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", cp["saved_at"]), cp["saved_at"]
        assert cp["reps"][rid]["pos"] == cp["read"] and cp["reps"][rid]["delivered"] <= delivered
        assert cp["reps"][rid]["rejected"] == 0
        assert progress.lines_read == cp["lines_read"] == cp["read"][2] > 0
        assert progress.bytes_total == size and 0 < progress.bytes_read < size
        assert progress.percent == round(100.0 * progress.bytes_read / size, 1)
        assert progress.updated_at is not None and progress.updated_at >= cp["saved_at"], "recorded after it"
    lines = [cp["lines_read"] for cp, _, _ in seen]
    assert lines == sorted(set(lines)), "each checkpoint is further on than the one before"


def test_the_engine_an_execution_ran_on_is_read_back_as_written_else_local(tmp_path: Path) -> None:
    """Kills `record_engine`'s and `recorded_engine`'s mutants (the sync scope runs no Spark job): what `sync resume`
    reuses by default is read back exactly, from a file only the owner can read in a directory only the owner can
    enter; a missing, unreadable or non-object record means the local engine."""
    from dmrepl.sync import api

    ensure_home()
    registry = Registry()
    engine = {"engine": "spark", "master": "local[3]", "work_dir": str(tmp_path / "w")}
    api.record_engine(registry, "sync-1", engine)
    path = home() / "executions" / "sync-1" / "engine.json"
    assert json.loads(path.read_bytes()) == engine
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert api.recorded_engine(registry, "sync-1") == engine
    api.record_engine(registry, "sync-1", {"engine": "local"})  # a resume on the other engine replaces it
    assert api.recorded_engine(registry, "sync-1") == {"engine": "local"}
    assert api.recorded_engine(registry, "sync-2") == {"engine": "local"}
    for text in ("{", '["spark"]', ""):
        path.write_text(text)
        assert api.recorded_engine(registry, "sync-1") == {"engine": "local"}, text
