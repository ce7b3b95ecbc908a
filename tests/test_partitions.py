"""dmrepl.partitions against oracles we did not write: the .NET SDK's published hash vectors, and a golden file of
10,000+ keys mapped by the JavaScript SDK itself (tests/tools/partition_golden.js says how to regenerate it).

Consumers rely on our partition choice being the service's, so the checks are exact, row by row.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from dmrepl.partitions import partition_for, partition_hash

GOLDEN = Path(__file__).parent / "data" / "eventhubs-partitions.golden.ndjson"

#: Azure/azure-sdk-for-net, sdk/eventhub/Azure.Messaging.EventHubs/tests/Core/PartitionResolverTests.cs.
DOTNET_VECTORS = [
    ("7", -15263),
    ("131", 30562),
    ("7149583486996073602", 12977),
    ("FWfAT", -22341),
    ("sOdeEAsyQoEuEFPGerWO", -6503),
    ("FAyAIctPeCgmiwLKbJcyswoHglHVjQdvtBowLACDNORsYvOcLddNJYDmhAVkbyLOrHTKLneMNcbgWVlasVywOByANjs", 5226),
    (
        "1XYM6!(7(lF5wq4k4m*e$Nc!1ezLJv*1YK1Y-C^*&B$O)lq^iUkG(TNzXG;Zi#z2Og*Qq0#^*k):vXh$3,C7We7%W0meJ;b3,rQCg^J;^twXgs5E$$hWKxqp",
        23950,
    ),
    (
        "E(x;RRIaQcJs*P;D&jTPau-4K04oqr:lF6Z):ERpo&;9040qyV@G1_c9mgOs-8_8/10Fwa-7b7-yP!T-!IH&968)FWuI;(^g$2fN;)HJ^^yTn:",
        -29304,
    ),
    ("!c*_!I@1^c", 15372),
    ("p4*!jioeO/z-!-;w:dh", -3104),
    ("$0cb", 26269),
    ("-4189260826195535198", 453),
]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@functools.cache
def golden() -> tuple[dict[str, Any], list[tuple[str, int, list[int]]]]:
    header, *lines = GOLDEN.read_text(encoding="utf-8").splitlines()
    return json.loads(header), [(key, hash_, partitions) for key, hash_, partitions in map(json.loads, lines)]


@pytest.mark.parametrize(("key", "expected"), DOTNET_VECTORS, ids=[k[:20] for k, _ in DOTNET_VECTORS])
def test_hash_matches_the_dotnet_sdk_vectors(key: str, expected: int) -> None:
    assert partition_hash(key) == expected


def test_golden_file_is_the_sdk_output_we_think_it_is() -> None:
    """Guards the oracle itself: a regenerated file that lost its hard cases would pass everything silently."""
    header, rows = golden()
    assert header["sdk"] == "@azure/event-hubs"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", header["version"])
    assert header["partition_counts"] == [1, 2, 3, 4, 7, 32, 100]
    assert header["rows"] == len(rows) >= 10_000
    keys = [key for key, _, _ in rows]
    assert len(set(keys)) == len(keys)
    assert "" in keys
    assert sum(bool(_UUID.fullmatch(k)) for k in keys) >= 8000
    assert sum(len(k.encode("utf-8", "surrogatepass")) >= 1024 for k in keys) >= 40
    assert sum(any(ord(ch) > 0xFFFF for ch in k) for k in keys) >= 100
    assert any(unicodedata.combining(ch) for k in keys for ch in k)
    assert {k for k, _ in DOTNET_VECTORS} <= set(keys)


def test_every_golden_row() -> None:
    header, rows = golden()
    counts = header["partition_counts"]
    wrong = [
        (key[:40], hash_, partitions)
        for key, hash_, partitions in rows
        if partition_hash(key) != hash_ or [partition_for(key, n) for n in counts] != partitions
    ]
    assert not wrong, f"{len(wrong)} of {len(rows)} rows differ from the SDK, e.g. {wrong[:5]}"


def test_a_floored_remainder_would_fail_the_golden_file() -> None:
    """The service's remainder truncates (C#): -15263 % 4 is -3 there, 1 in Python. Proves the golden check has
    teeth against the natural Python mistake."""
    assert partition_hash("7") == -15263
    assert partition_for("7", 4) == 3
    assert abs(-15263 % 4) == 1

    header, rows = golden()
    counts = header["partition_counts"]
    floored_wrong = sum(
        [abs(hash_ % n) for n in counts] != partitions
        for key, hash_, partitions in rows
        if partition_hash(key) == hash_
    )
    assert floored_wrong > len(rows) // 3


def test_non_ascii_keys_hash_their_utf8_bytes() -> None:
    """Expected values are the JavaScript SDK's. No Unicode normalisation: NFC and NFD keys are different keys."""
    assert partition_hash("café") == 23999
    assert partition_hash(unicodedata.normalize("NFD", "café")) == 11410
    assert partition_hash("Straße") == -18926
    assert partition_hash("日本語") == -23353
    assert partition_for("日本語", 100) == 53
    assert partition_for("über", 32) == 30


def test_lone_surrogates_are_hashed_as_the_sdks_encode_them() -> None:
    """.NET and JavaScript strings can hold a lone surrogate and encode it as U+FFFD; Python's codec refuses it."""
    assert partition_hash("\ud800") == partition_hash("\ufffd") == 25940
    assert partition_hash("\ud83d\ude00") == partition_hash("😀")


def test_partition_count_must_be_positive() -> None:
    assert partition_for("key", 1) == 0
    with pytest.raises(ValueError, match="at least 1"):
        partition_for("key", 0)


def test_import_stays_light() -> None:
    """The destination loads azure.eventhub lazily so that `dmrepl --help` stays fast; this module must not undo
    that."""
    code = "import sys, dmrepl.partitions; print(sorted(m for m in sys.modules if m.split('.')[0] == 'azure'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
