"""Benchmark: `dmrepl sync start` into a file replication vs. a parse-and-serialize baseline.

Not part of the test suite. Run: python tests/bench/bench_sync.py [--users 100000] [--runs 5]
Both sides run as whole processes on the same export in the same run (dmrepl with its bytecode compiled, as an
install has it); figures are medians. Prints operations/s, the ratio sync/baseline (target >= 0.5) with its spread
over the interleaved runs (on a shared 2-core machine the sync, which uses both cores, swings more than the one-core
baseline), and the peak RSS of the sync for the large export and for one a tenth of its size (target < 150 MB and
within 20 %).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import REPO, compile_bytecode, dmrepl, generate_export, run

BASELINE = r"""
import sys, orjson
n = 0
with open(sys.argv[1], "rb", buffering=1 << 20) as f:
    for line in f:
        up = orjson.loads(line)
        orjson.dumps({})  # the UserPoint itself
        for key in ("accounts", "emails", "user_agents", "devices", "profiles", "segments", "activities",
                    "merged_user_point_ids"):
            for element in up.get(key) or ():
                orjson.dumps(element)
                n += 1
                for tid in element.get("technical_identifiers") or ():
                    orjson.dumps(tid)
print(n)
"""


def sync_once(export: Path, work: Path, workers: int | None) -> tuple[float, int]:
    home = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "DMREPL_HOME": str(home), "PYTHONPATH": str(REPO)}
    dmrepl(env, "datamart", "add", "bench")
    dmrepl(env, "create", "--type", "file", "--name", "out", "--path", str(home / "out.ndjson"))
    dmrepl(env, "activate", "out")
    extra = ["--workers", str(workers)] if workers else []
    result = run([sys.executable, "-m", "dmrepl", "-q", "sync", "start", str(export), "--no-progress", *extra], env)
    (home / "out.ndjson").unlink()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, help="passed to dmrepl sync start (default: its automatic choice)")
    a = ap.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = {"large": a.users, "small": max(1, a.users // 10)}
        exports, ops = {}, {}
        for label, n in sizes.items():
            exports[label] = work / f"{label}.ndjson"
            ops[label] = generate_export(exports[label], n)
        print(
            f"export: {a.users} user points, {ops['large']} operations, "
            f"{exports['large'].stat().st_size / 1e6:.0f} MB; {a.runs} runs each, medians"
        )
        base_times, sync_times, rss = [], [], {"large": [], "small": []}
        env = dict(os.environ)
        for _ in range(a.runs):  # interleaved, so load on the machine hits both sides alike
            base_times.append(run([sys.executable, "-c", BASELINE, str(exports["large"])], env)[0])
            t, r = sync_once(exports["large"], work, a.workers)
            sync_times.append(t)
            rss["large"].append(r)
            rss["small"].append(sync_once(exports["small"], work, a.workers)[1])
        base, sync = statistics.median(base_times), statistics.median(sync_times)
        base_rate, sync_rate = ops["large"] / base, ops["large"] / sync
        rss_large, rss_small = statistics.median(rss["large"]), statistics.median(rss["small"])
        print(f"(a) baseline parse+serialize : {base:7.2f} s  {base_rate:12,.0f} operations/s")
        print(f"(b) dmrepl sync start (file) : {sync:7.2f} s  {sync_rate:12,.0f} operations/s")
        pairs = sorted(b / s for b, s in zip(base_times, sync_times, strict=True))
        print(
            f"ratio (b)/(a)                : {sync_rate / base_rate:.2f}   (target >= 0.5; "
            f"run by run {pairs[0]:.2f}-{pairs[-1]:.2f})"
        )
        print(
            f"peak RSS of (b)              : {rss_large} MB for {sizes['large']} user points, "
            f"{rss_small} MB for {sizes['small']} ({100 * (rss_large - rss_small) / rss_small:+.0f} %)"
            "   (target < 150 MB, within 20 %)"
        )


if __name__ == "__main__":
    main()
