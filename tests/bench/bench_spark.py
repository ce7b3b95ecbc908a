"""Benchmark: `dmrepl sync start --engine spark --master local[2]` against the local engine on the same export.

Not part of the test suite. Run: python tests/bench/bench_spark.py [--users 500000] [--runs 1] [--master local[2]]
The baseline is the in-process sync (`--workers 1`; `--workers 0` for the local engine's own choice, which forks
worker processes for a file destination). Both sides are whole `dmrepl` processes syncing the same generated export
into a file replication, on the same machine in the same run (interleaved when --runs > 1; medians), so the ratio
holds whatever the machine's speed: the question is whether Spark's start-up (a JVM, Python workers, a job) is
amortized over the sync, not multiplied.

Prints, for each side, the wall time and operations/s; for Spark, its start-up share: the wall time of the same
Spark sync of a one-line export (the driver's JVM, the session, the Python workers, a job: everything that does not
grow with the export), measured in the same run, over the Spark sync's wall time; and the ratio spark/local (target
>= 0.7, printed, not asserted). Each run's output file is counted, then deleted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import REPO, compile_bytecode, dmrepl, generate_export, run


def sync_once(export: Path, work: Path, extra: list[str]) -> tuple[float, int]:
    """Wall time of one `dmrepl sync start` into a fresh home's file replication; the lines it wrote."""
    home = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "DMREPL_HOME": str(home), "PYTHONPATH": str(REPO)}
    dmrepl(env, "datamart", "add", "bench")
    out = home / "out.ndjson"
    dmrepl(env, "create", "--type", "file", "--name", "out", "--path", str(out))
    dmrepl(env, "activate", "out")
    elapsed, _ = run([sys.executable, "-m", "dmrepl", "-q", "sync", "start", str(export), "--no-progress", *extra], env)
    with open(out, "rb", buffering=1 << 20) as f:
        lines = sum(1 for _ in f)
    out.unlink()
    return elapsed, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the local engine's --workers (default 1: the in-process sync, the baseline the target is set against; "
        "0: its automatic choice)",
    )
    a = ap.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = work / "export.ndjson"
        ops = generate_export(export, a.users)
        tiny = work / "tiny.ndjson"
        tiny_ops = generate_export(tiny, 1)
        print(
            f"export: {a.users} user points, {ops} operations, {export.stat().st_size / 1e6:.0f} MB; "
            f"{a.runs} run(s) each, medians; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
        )
        local_extra = ["--workers", str(a.workers)] if a.workers else []
        spark_extra = ["--engine", "spark", "--master", a.master]
        local_t, spark_t, start_t = [], [], []
        for _ in range(a.runs):  # interleaved, so load on the machine hits both sides alike
            t, lines = sync_once(export, work, local_extra)
            assert lines == ops, f"local engine wrote {lines} operations, expected {ops}"
            local_t.append(t)
            t, lines = sync_once(tiny, work, spark_extra)
            assert lines == tiny_ops
            start_t.append(t)
            t, lines = sync_once(export, work, spark_extra)
            assert lines == ops, f"spark engine wrote {lines} operations, expected {ops}"
            spark_t.append(t)
        local, sprk, start = statistics.median(local_t), statistics.median(spark_t), statistics.median(start_t)
        local_rate, spark_rate = ops / local, ops / sprk
        print(f"(a) local engine                : {local:7.2f} s  {local_rate:12,.0f} operations/s")
        print(
            f"(b) --engine spark {a.master:<12} : {sprk:7.2f} s  {spark_rate:12,.0f} operations/s   "
            f"(start-up {start:.1f} s: {100 * start / sprk:.0f} % of it)"
        )
        if sprk > start:
            print(
                f"    spark without its start-up  : {sprk - start:7.2f} s  {ops / (sprk - start):12,.0f} operations/s"
            )
        pairs = sorted(s / p for s, p in zip(local_t, spark_t, strict=True))
        print(
            f"ratio (b)/(a)                   : {spark_rate / local_rate:.2f}   (target >= 0.7; "
            f"run by run {pairs[0]:.2f}-{pairs[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
