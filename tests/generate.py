"""Synthetic user-point exports with their expected operations worked out independently of dmrepl's transform.

Used by the tests (expected operations as (doc_type, doc_id, op) multisets) and by the benchmarks.
Run as a script to write a file: python tests/generate.py OUT N [--gzip] [--bad-every K]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

Expected = tuple[str, str, str]

BAD_LINES = [
    b"this is not json",
    b"[1, 2, 3]",
    b'{"creation_ts": 1}',
    b'{"user_point_id": "not-a-uuid"}',
    b'{"user_point_id": "%s", "activities": {"not": "a list"}}',
    b'{"user_point_id": "%s", "segments": [{"creation_ts": 1}]}',
]


def user_point(rng: random.Random, i: int, *, new_model: bool = True) -> tuple[dict, list[Expected]]:
    upid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    ts = 1_600_000_000_000 + i * 1000
    exp: list[Expected] = [("UserPoint", upid, "UPDATE")]
    up: dict = {"user_point_id": upid, "creation_ts": ts}
    up["accounts"] = [{"compartment_id": "3", "user_account_id": f"acc-{i}", "creation_ts": ts}]
    exp.append(("UserAccount", f"{upid}:3:acc-{i}", "UPDATE"))
    h = f"{i:064x}"
    up["emails"] = [{"hash": h, "email": f"u{i}@example.com", "creation_ts": ts}]
    exp.append(("UserEmail", f"{upid}:{h}", "UPDATE"))
    device = {
        "os_family": "ANDROID",
        "browser_family": "CHROME",
        "form_factor": "SMARTPHONE",
        "brand": "Acme",
        "model": None,
        "os_version": "14",
        "carrier": None,
    }
    vec = f"vec:{1000 + i}"
    if new_model:
        udp = f"udp:-{2000 + i}"
        up["user_agents"] = [
            {"vector_id": vec, "device": device, "creation_ts": ts, "migrated_to": {"user_device_point_id": udp}}
        ]
        exp += [
            ("UserAgent", f"{upid}:{vec}", "DELETE"),
            ("UserDevicePoint", f"{upid}:{udp}", "UPDATE"),
            ("UserDeviceTechnicalId", f"{upid}:{udp}:mum:{1000 + i}", "UPDATE"),
        ]
        udp2 = f"udp:{3000 + i}"
        up["devices"] = [
            {
                "id": udp2,
                "device": device,
                "creation_ts": ts,
                "last_activity_ts": ts + 5,
                "technical_identifiers": [{"type": "INSTALLATION_ID", "id": f"ins:1001:x{i}", "creation_ts": ts}],
            }
        ]
        exp += [
            ("UserDevicePoint", f"{upid}:{udp2}", "UPDATE"),
            ("UserDeviceTechnicalId", f"{upid}:{udp2}:ins:1001:x{i}", "UPDATE"),
        ]
    else:
        up["user_agents"] = [{"vector_id": vec, "device": device, "creation_ts": ts}]
        exp.append(("UserAgent", f"{upid}:{vec}", "UPDATE"))
    up["profiles"] = [
        {
            "$compartment_id": "3",
            "$user_account_id": f"acc-{i}",
            "$creation_ts": ts,
            "$last_modified_ts": ts + 1,
            "first_name": "Zoë",
            "score": i,
        }
    ]
    exp.append(("UserProfile", f"{upid}:3:acc-{i}", "UPDATE"))
    up["segments"] = []
    for s in range(rng.randint(0, 3)):
        up["segments"].append({"segment_id": str(100 + s), "creation_ts": ts, "last_modified_ts": ts + 2})
        exp.append(("UserSegment", f"{upid}:{100 + s}", "UPDATE"))
    up["activities"] = []
    for a in range(rng.randint(1, 4)):
        aid = f"act-{i}-{a}"
        up["activities"].append(
            {
                "$id": aid,
                "$type": "SITE_VISIT",
                "$ts": ts + a,
                "$session_status": "CLOSED_SESSION",
                "$events": [
                    {"$event_name": "$page_view", "$ts": ts + a, "$properties": {"$url": f"https://example.com/p/{a}"}}
                ],
            }
        )
        exp.append(("UserActivity", f"{upid}:{aid}", "UPDATE"))
    return up, exp


def lines(
    n: int, *, seed: int = 7, bad_every: int = 0, new_model: bool = True
) -> Iterator[tuple[bytes, list[Expected]]]:
    """Yield (line, expected operations); a bad line expects none."""
    rng = random.Random(seed)
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            bad = BAD_LINES[(i // bad_every) % len(BAD_LINES)]
            if b"%s" in bad:
                bad = bad % str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
            yield bad, []
            continue
        up, exp = user_point(rng, i, new_model=new_model)
        yield json.dumps(up, ensure_ascii=False).encode(), exp


def write(path: Path, n: int, *, compress: bool = False, **kw: object) -> tuple[Counter[Expected], list[int]]:
    """Write an export; return the expected operations multiset and the 1-based numbers of the bad lines."""
    expected: Counter[Expected] = Counter()
    bad: list[int] = []
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:  # type: ignore[operator]
        for no, (line, exp) in enumerate(lines(n, **kw), start=1):  # type: ignore[arg-type]
            f.write(line + b"\n")
            if exp:
                expected.update(exp)
            else:
                bad.append(no)
    return expected, bad


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--gzip", action="store_true")
    ap.add_argument("--bad-every", type=int, default=0)
    a = ap.parse_args()
    exp, bad = write(a.out, a.n, compress=a.gzip, bad_every=a.bad_every)
    print(f"{a.out}: {a.n} lines, {sum(exp.values())} operations, {len(bad)} bad lines")
