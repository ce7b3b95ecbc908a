"""Benchmark: `dmrepl sync start` into an azure-event-hubs replication vs. a plain azure-eventhub SDK loop.

Not part of the test suite. Run: python tests/bench/bench_eventhubs.py [--users 100000] [--runs 3]

Both sides send to the same local Event Hubs peer (tests/peers/eventhubs.py in its subprocess mode, so it has a core
of its own rather than sharing the benchmark's GIL), as whole processes, interleaved, on the same operations:
- (a) the SDK the way its documentation shows it: `EventHubProducerClient`, `create_batch()`, one `EventData` per
  operation (body, content type, `doc_type`/`op` properties) and `batch.add`, `send_batch` when the batch is full.
  It reads the operations pre-serialized (the exact bytes dmrepl sends, taken from a file replication of the same
  export), so it does no JSON work at all;
- (b) `dmrepl sync start EXPORT` (whole process: reading and transforming the export, routing by user point,
  batching, acknowledgements, checkpoints) into an ACTIVE azure-event-hubs replication.
Prints events/s of each (medians), the ratio (b)/(a) (target >= 0.9), and the peak RSS of (b) (`os.wait4`; with
worker processes, Linux reports the largest of the process and its workers, not their sum). `--workers N` is passed
to `dmrepl sync start` (default: dmrepl's automatic choice). Each measurement is checked against the peer's own
counters: a run that loses events fails the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from common import REPO, dmrepl, run

HUB = "hub1"
PARTITIONS = 4

SDK_LOOP = r"""
import sys
from azure.eventhub import EventData, EventHubProducerClient

conn_str, path = sys.argv[1], sys.argv[2]
client = EventHubProducerClient.from_connection_string(conn_str)
sent = 0
with client, open(path, "rb", buffering=1 << 20) as ops:
    batch = client.create_batch()
    for line in ops:
        doc_type, op, body = line.rstrip(b"\n").split(b"\t", 2)
        event = EventData(body)
        event.content_type = "application/json"
        event.properties = {"doc_type": doc_type.decode(), "op": op.decode()}
        try:
            batch.add(event)
        except ValueError:
            client.send_batch(batch)
            batch = client.create_batch()
            batch.add(event)
        sent += 1
    if len(batch):
        client.send_batch(batch)
print(sent)
"""


class Peer:
    """The Event Hubs peer as a child process; its counters are read over its stdout (SIGUSR1)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.eventhubs", "--port", "0", "--hub", f"{HUB}={PARTITIONS}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.out: IO[str] = self.proc.stdout
        hello = json.loads(self.out.readline())
        self.connection_string: str = hello["connection_string"]

    def events(self) -> int:
        self.proc.send_signal(signal.SIGUSR1)
        return int(json.loads(self.out.readline())["events"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fresh_home(work: Path) -> dict[str, str]:
    """A registry of its own per run (so the weekly rule never refuses), with the opt-in file secret store because a
    benchmark machine has no keyring."""
    home = Path(tempfile.mkdtemp(dir=work))
    return {
        **os.environ,
        "DMREPL_HOME": str(home / "home"),
        "DMREPL_SECRET_STORE": "file",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def pre_serialize(export: Path, work: Path) -> tuple[Path, int]:
    """The operations dmrepl sends for `export`, byte for byte (a file replication's output), as `doc_type TAB op TAB
    body` lines for the SDK loop. Streamed: the benchmark process stays small."""
    import orjson

    env = fresh_home(work)
    out = work / "operations.ndjson"
    dmrepl(env, "datamart", "add", "bench")
    dmrepl(env, "create", "--type", "file", "--name", "out", "--path", str(out))
    dmrepl(env, "activate", "out")
    dmrepl(env, "-q", "sync", "start", str(export), "--no-progress")
    ops = work / "operations.tsv"
    count = 0
    with open(out, "rb") as src, open(ops, "wb") as dst:
        for line in src:
            body = line.rstrip(b"\n")
            op: dict[str, Any] = orjson.loads(body)
            dst.write(b"%s\t%s\t%s\n" % (op["doc_type"].encode(), op["op"].encode(), body))
            count += 1
    out.unlink()
    return ops, count


def sdk_once(peer: Peer, ops: Path, count: int) -> float:
    before = peer.events()
    elapsed, _ = run([sys.executable, "-c", SDK_LOOP, peer.connection_string, str(ops)], dict(os.environ))
    got = peer.events() - before
    if got != count:
        raise SystemExit(f"(a) the peer received {got} events, expected {count}")
    return elapsed


def dmrepl_once(peer: Peer, export: Path, count: int, work: Path, workers: list[str]) -> tuple[float, int]:
    env = fresh_home(work)
    creds = Path(env["DMREPL_HOME"]).parent / "credentials.txt"
    creds.write_text(peer.connection_string)
    dmrepl(env, "datamart", "add", "bench")
    dmrepl(env, "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", str(creds))
    dmrepl(env, "activate", "eh")
    before = peer.events()
    cmd = [sys.executable, "-m", "dmrepl", "-q", "sync", "start", str(export), "--no-progress", *workers]
    elapsed, rss = run(cmd, env)
    got = peer.events() - before
    if got < count:  # at-least-once: duplicates would be allowed, losses are not
        raise SystemExit(f"(b) the peer received {got} events, expected {count}")
    return elapsed, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, help="passed to dmrepl sync start (default: its automatic choice)")
    a = ap.parse_args()
    workers = [] if a.workers is None else ["--workers", str(a.workers)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = work / "export.ndjson"
        subprocess.run(
            [sys.executable, str(REPO / "tests" / "generate.py"), str(export), str(a.users)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        ops, count = pre_serialize(export, work)
        peer = Peer()
        try:
            print(
                f"export: {a.users} user points, {count} operations, {export.stat().st_size / 1e6:.0f} MB; "
                f"peer: {PARTITIONS} partitions, 1 MiB max message size, own process; dmrepl workers: "
                f"{a.workers if a.workers is not None else 'automatic'}; {a.runs} runs each, medians",
                flush=True,
            )
            sdk_times, sync_times, rss = [], [], []
            for i in range(a.runs):  # interleaved, so load on the machine hits both sides alike
                sdk_times.append(sdk_once(peer, ops, count))
                t, r = dmrepl_once(peer, export, count, work, workers)
                sync_times.append(t)
                rss.append(r)
                print(
                    f"  run {i + 1}: (a) {count / sdk_times[-1]:9,.0f} events/s   (b) {count / t:9,.0f} events/s, "
                    f"{r} MB",
                    flush=True,
                )
        finally:
            peer.stop()
        sdk, sync = statistics.median(sdk_times), statistics.median(sync_times)
        sdk_rate, sync_rate = count / sdk, count / sync
        print(f"(a) SDK loop (EventData + batch.add) : {sdk:7.2f} s  {sdk_rate:10,.0f} events/s")
        print(f"(b) dmrepl sync start (event hubs)   : {sync:7.2f} s  {sync_rate:10,.0f} events/s")
        print(f"ratio (b)/(a)                        : {sync_rate / sdk_rate:.2f}   (target >= 0.9)")
        print(f"peak RSS of (b)                      : {statistics.median(rss)} MB (median; max {max(rss)} MB)")


if __name__ == "__main__":
    main()
