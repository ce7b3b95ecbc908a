"""Benchmark: how `dmrepl sync start` keeps its throughput over a delayed link, against the official clients.

Not part of the test suite. Run:
    python tests/bench/bench_latency.py [--users 100000] [--rtts 0,50,150] [--repeat 1] [--only pubsub|eventhubs]

Why: on loopback dmrepl publishes fast, but throughput over a link is bounded by what is in flight per round trip
(a fixed 8 Pub/Sub requests; one Event Hubs batch per partition). This kernel has no netem, so every side goes
through tests/bench/delay_proxy.py, a loopback TCP proxy (in a process of its own) adding rtt/2 to every chunk in
each direction without capping bandwidth, in front of a fresh peer for every measurement (pstest keeps every message
it was sent and slows down as they pile up; so does the Event Hubs peer's memory).

At each round trip, for each mode:
  - pubsub ordered / unordered: `dmrepl sync start` (whole process: start-up, reading and transforming the export,
    checkpoints) into a google-pubsub replication with `--ordering` / `--no-ordering`, PUBSUB_EMULATOR_HOST pointing
    at the proxy; official = google-cloud-pubsub's `PublisherClient` (batches of 1000 messages / 9 MB / 50 ms, with
    message ordering and dmrepl's 64 ordering keys, or without) publishing the very bytes dmrepl sends, parsed
    before its clock starts (publishing only: this favours the official client);
  - eventhubs: `dmrepl sync start` into an azure-event-hubs replication whose connection string's Endpoint is the
    proxy; official = the azure-eventhub SDK loop of bench_eventhubs.py (`create_batch`, `EventData` per operation,
    `send_batch` when full), as a whole process.
Every message is counted at the peer (pstest: its server-wide message ids, read with a probe publish straight to
pstest before and after; Event Hubs: the peer's own counters): a run that loses messages fails the benchmark.
msg/s is the export's operations over wall time.

On loopback without the proxy: a raw pre-serialized loop per peer, the most the peer takes from one client process
(Pub/Sub: pre-built PublishRequests of 1000 messages, serialized once, sent as raw bytes on several gRPC channels with
many requests in flight; Event Hubs: one ~1 MiB batch per partition built once and sent again and again, one in
flight per partition, a client per partition), and dmrepl on the same direct path, so its share of that ceiling and
the proxy's own cost at 0 ms both show.

Peak RSS of dmrepl: `os.wait4` (the largest single process) and the process tree's sum sampled from /proc. CPU
share: dmrepl's user+system seconds over its wall time (about 1 or more when CPU-bound; well under 1 when it waits
on the link). "in flight" is Little's law: rate × rtt, the messages dmrepl kept in flight on average.

Targets (printed, not asserted): at 150 ms each mode keeps >= 0.7 of its own 0 ms rate; dmrepl >= 3x official at
every round trip; peak RSS < 200 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench_eventhubs import SDK_LOOP
from bench_eventhubs import Peer as EventHubsPeerProcess
from bench_pubsub import SERVICE_ACCOUNT, TreeSampler
from common import REPO, compile_bytecode, dmrepl, generate_export
from delay_proxy import ProxyProcess

sys.path.insert(0, str(REPO))

from tests.peers.pubsub import PstestServer, start_pstest

PROJECT = "dmrepl-bench"
TARGET_KEEP = 0.7  # of a mode's own 0 ms rate, at the largest round trip
TARGET_VS_OFFICIAL = 3.0
TARGET_RSS_MB = 200

# The official high-level publisher, as bench_pubsub.py's baseline, with message ordering as an option: the ordering
# key of an operation is dmrepl's (b<crc32(user_point_id) mod 64>, the user point id being the doc_id up to ':').
OFFICIAL_PUBSUB = r"""
import json, sys, threading, time, zlib
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.types import BatchSettings, PublisherOptions

ops_file, topic, ordering = sys.argv[1], sys.argv[2], sys.argv[3] == "ordered"
messages = []
with open(ops_file, "rb") as f:
    for line in f:
        data = line.rstrip(b"\n")
        doc = json.loads(data)
        key = "b%d" % (zlib.crc32(doc["doc_id"].split(":", 1)[0].encode()) % 64) if ordering else ""
        messages.append((data, doc["doc_type"], doc["op"], key))
client = pubsub_v1.PublisherClient(
    batch_settings=BatchSettings(max_messages=1000, max_bytes=9_000_000, max_latency=0.05),
    publisher_options=PublisherOptions(enable_message_ordering=ordering),
)
n = len(messages)
done = threading.Event()
lock = threading.Lock()
counts = {"ok": 0, "failed": 0}

def callback(future):
    key = "failed" if future.exception() is not None else "ok"
    with lock:
        counts[key] += 1
        if counts["ok"] + counts["failed"] == n:
            done.set()

start = time.perf_counter()
publish = client.publish
for data, doc_type, op, key in messages:
    publish(topic, data, ordering_key=key, doc_type=doc_type, op=op).add_done_callback(callback)
done.wait()
elapsed = time.perf_counter() - start
print(json.dumps({"elapsed": elapsed, **counts}))
"""

# The ceiling of one client process into pstest: requests built and serialized before the clock starts, sent as raw
# bytes (no per-message work at all) on CHANNELS connections with up to INFLIGHT requests outstanding.
RAW_PUBSUB = r"""
import json, sys, threading, time
import grpc
from google.pubsub_v1.types import pubsub

ops_file, topic, addr, channels, inflight = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
Req = pubsub.PublishRequest.pb()
requests, req, n = [], Req(topic=topic), 0
with open(ops_file, "rb") as f:
    for line in f:
        data = line.rstrip(b"\n")
        doc = json.loads(data)
        m = req.messages.add()
        m.data = data
        m.attributes["doc_type"] = doc["doc_type"]
        m.attributes["op"] = doc["op"]
        n += 1
        if len(req.messages) == 1000:
            requests.append(req.SerializeToString())
            req = Req(topic=topic)
if len(req.messages):
    requests.append(req.SerializeToString())
options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
           ("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel
chans = [grpc.insecure_channel(addr, options=options) for _ in range(channels)]
for ch in chans:
    grpc.channel_ready_future(ch).result(timeout=30)  # connected before the clock starts
calls = [ch.unary_unary("/google.pubsub.v1.Publisher/Publish") for ch in chans]
slots = threading.Semaphore(inflight)
done = threading.Event()
lock = threading.Lock()
state = {"left": len(requests), "failed": 0}

def finished(future):
    if future.exception() is not None:
        state["failed"] += 1
    slots.release()
    with lock:
        state["left"] -= 1
        if not state["left"]:
            done.set()

start = time.perf_counter()
for i, body in enumerate(requests):
    slots.acquire()
    calls[i % channels].future(body, timeout=120).add_done_callback(finished)
done.wait()
elapsed = time.perf_counter() - start
print(json.dumps({"elapsed": elapsed, "sent": n, "failed": state["failed"], "requests": len(requests)}))
"""

# The ceiling of one client process into the Event Hubs peer: per partition, one batch filled to the link's max
# message size once, then sent again and again by a thread and a client of its own (one batch in flight each).
RAW_EVENTHUBS = r"""
import json, sys, threading, time
from azure.eventhub import EventData, EventHubProducerClient

conn_str, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
probe = EventHubProducerClient.from_connection_string(conn_str)
partitions = probe.get_partition_ids()
probe.close()
clients = [EventHubProducerClient.from_connection_string(conn_str) for _ in partitions]
batches = []
with open(path, "rb", buffering=1 << 20) as ops:
    for client, pid in zip(clients, partitions):
        batch = client.create_batch(partition_id=pid)
        for line in ops:
            doc_type, op, body = line.rstrip(b"\n").split(b"\t", 2)
            event = EventData(body)
            event.content_type = "application/json"
            event.properties = {"doc_type": doc_type.decode(), "op": op.decode()}
            try:
                batch.add(event)
            except ValueError:
                break
        batches.append(batch)
        client.send_batch(batch)  # connects and warms the link before the clock starts; counted below
share = -(-count // len(partitions))
sends = [max(1, -(-share // len(b))) for b in batches]
errors = []

def pump(client, batch, times):
    try:
        for _ in range(times):
            client.send_batch(batch)
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=pump, args=(c, b, t)) for c, b, t in zip(clients, batches, sends)]
start = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - start
for c in clients:
    c.close()
sent = sum(len(b) * t for b, t in zip(batches, sends))
print(json.dumps({"elapsed": elapsed, "sent": sent, "warm_up": sum(len(b) for b in batches),
                  "batch_events": [len(b) for b in batches], "errors": errors}))
"""

# A helper process for pstest administration, so this process never imports grpc: its pages would count in the
# peak RSS wait4 reports for the children it spawns. One JSON command per line on stdin, one JSON answer per line.
PSTEST_ADMIN = r"""
import json, sys
from tests.peers.pubsub import publisher_admin

clients = {}
for line in sys.stdin:
    cmd = json.loads(line)
    addr = cmd["addr"]
    client = clients.get(addr) or clients.setdefault(addr, publisher_admin(addr))
    if cmd["op"] == "create_topic":
        client.create_topic(name=cmd["topic"], timeout=30)
        print(json.dumps({"ok": True}), flush=True)
    elif cmd["op"] == "probe":
        ids = client.publish(topic=cmd["topic"], messages=[{"data": b"probe"}], timeout=30).message_ids
        print(json.dumps({"seq": int(ids[0].lstrip("m"))}), flush=True)
    elif cmd["op"] == "forget":
        c = clients.pop(addr, None)
        if c is not None:
            c.transport.close()
        print(json.dumps({"ok": True}), flush=True)
"""


@dataclass
class Measure:
    """One whole child process."""

    seconds: float
    cpu_s: float = 0.0  # user + system, with reaped children
    rss_mb: int = 0  # wait4: the largest single process
    tree_mb: int = 0  # the process tree's sum, sampled
    inner_s: float | None = None  # the execution's own duration (dmrepl's report), without interpreter start-up
    connections: int = 0  # TCP connections the side opened through the proxy
    proxy_cpu_s: float = 0.0  # CPU the proxy process used (it competes for the same two cores)
    extra: dict[str, Any] = field(default_factory=dict)


def measure(cmd: list[str], env: dict[str, str], stdout: Path) -> Measure:
    """Run one process to its end: wall time, CPU time and peak RSS (wait4 and sampled tree); stdout to a file."""
    with open(stdout, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        assert proc.stderr is not None
        err = proc.stderr.read()  # drained before waiting: a chatty child must not block on a full pipe
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed ({code}): {err.decode(errors='replace')[-3000:]}")
    return Measure(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, sampler.peak >> 20)


class PstestAdmin:
    """The admin helper process (see PSTEST_ADMIN)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PSTEST_ADMIN],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, **cmd: str) -> dict[str, Any]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise SystemExit(f"the pstest admin helper died on {cmd}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass(frozen=True)
class Side:
    """One thing measured: `peer` pubsub|eventhubs, `who` dmrepl|official|raw, `mode` ordered|unordered|eventhubs,
    `rtt_ms` None for the direct loopback path (no proxy)."""

    peer: str
    who: str
    mode: str
    rtt_ms: float | None


class Bench:
    def __init__(self, work: Path, export: Path, operations: int) -> None:
        self.work = work
        self.export = export
        self.operations = operations
        self.ops_ndjson = work / "operations.ndjson"
        self.ops_tsv = work / "operations.tsv"
        self.credentials = work / "credentials.json"
        self.base_env = {**os.environ, "PYTHONPATH": str(REPO), "DMREPL_SECRET_STORE": "file", "NO_COLOR": "1"}
        self.base_env.pop("PUBSUB_EMULATOR_HOST", None)
        self.serial = 0
        self.admin: PstestAdmin | None = None

    # -- set-up (untimed) ---------------------------------------------------------------------------------------------

    def prepare(self, pubsub: bool) -> None:
        """The exact operation bytes dmrepl sends (a file replication of the export), for the official clients and the
        raw loops, as NDJSON and as `doc_type TAB op TAB body` lines; the service account for google-pubsub."""
        env = self.fresh_home()
        dmrepl(env, "create", "--type", "file", "--name", "ops", "--path", str(self.ops_ndjson))
        dmrepl(env, "activate", "ops")
        dmrepl(env, "-q", "sync", "start", str(self.export), "--no-progress")
        count = 0
        with open(self.ops_ndjson, "rb") as src, open(self.ops_tsv, "wb") as dst:
            for line in src:
                body = line.rstrip(b"\n")
                doc = json.loads(body)
                dst.write(b"%s\t%s\t%s\n" % (doc["doc_type"].encode(), doc["op"].encode(), body))
                count += 1
        if count != self.operations:
            raise SystemExit(f"the file replication has {count} operations, the generator said {self.operations}")
        if pubsub:
            creds = subprocess.run(
                [sys.executable, "-c", SERVICE_ACCOUNT], env=self.base_env, check=True, capture_output=True, text=True
            )
            self.credentials.write_text(creds.stdout)
            self.admin = PstestAdmin(self.base_env)

    def fresh_home(self, **extra: str) -> dict[str, str]:
        """A registry of its own per run, so the weekly rule never refuses a sync."""
        self.serial += 1
        env = {**self.base_env, "DMREPL_HOME": str(self.work / f"home-{self.serial}"), **extra}
        dmrepl(env, "datamart", "add", "bench")
        return env

    def report(self) -> Path:
        self.serial += 1
        return self.work / f"out-{self.serial}.json"

    # -- one measurement ----------------------------------------------------------------------------------------------

    def run(self, side: Side) -> Measure:
        if side.peer == "pubsub":
            return self._pubsub(side)
        return self._eventhubs(side)

    def _pubsub(self, side: Side) -> Measure:
        assert self.admin is not None
        server: PstestServer = start_pstest()
        proxy: ProxyProcess | None = None
        try:
            topic = f"projects/{PROJECT}/topics/bench"
            probe = f"projects/{PROJECT}/topics/probe"
            for t in (topic, probe):
                self.admin.call(op="create_topic", addr=server.addr, topic=t)
            addr = server.addr
            if side.rtt_ms is not None:
                proxy = ProxyProcess(server.addr, side.rtt_ms / 2).start()
                addr = proxy.addr
            before = self.admin.call(op="probe", addr=server.addr, topic=probe)["seq"]
            m = self._pubsub_side(side, addr, topic)
            after = self.admin.call(op="probe", addr=server.addr, topic=probe)["seq"]
            self.admin.call(op="forget", addr=server.addr)
        finally:
            if proxy is not None:
                proxy.close()
            server.stop()
        got = after - before - 1
        expected = m.extra.get("sent", self.operations)
        if got < expected:
            raise SystemExit(f"{side}: pstest received {got} messages, expected {expected}")
        m.extra["duplicates"] = got - expected
        if proxy is not None:
            m.connections = proxy.counters.get("connections", 0)
            m.proxy_cpu_s = proxy.counters.get("cpu_s", 0.0)
        return m

    def _pubsub_side(self, side: Side, addr: str, topic: str) -> Measure:
        out = self.report()
        if side.who == "dmrepl":
            env = self.fresh_home(PUBSUB_EMULATOR_HOST=addr)
            flag = "--ordering" if side.mode == "ordered" else "--no-ordering"
            dmrepl(
                env, "create", "--type", "google-pubsub", "--name", "ps", "--credentials", str(self.credentials),
                "--topic-id", topic.rsplit("/", 1)[1], "--project-id", PROJECT, flag,
            )  # fmt: skip
            dmrepl(env, "activate", "ps")
            return self._sync(env, out)
        env = {**self.base_env, "PUBSUB_EMULATOR_HOST": addr}
        if side.who == "official":
            m = measure([sys.executable, "-c", OFFICIAL_PUBSUB, str(self.ops_ndjson), topic, side.mode], env, out)
            result = json.loads(out.read_text())
            if result["ok"] != self.operations:
                raise SystemExit(f"{side}: {result['ok']} acknowledged, {result['failed']} failed")
            m.seconds = result["elapsed"]  # publishing only: parsing is before its clock starts
            return m
        cmd = [sys.executable, "-c", RAW_PUBSUB, str(self.ops_ndjson), topic, addr, "8", "64"]
        m = measure(cmd, env, out)
        result = json.loads(out.read_text())
        if result["failed"]:
            raise SystemExit(f"{side}: {result['failed']} requests failed")
        m.seconds = result["elapsed"]
        m.extra["sent"] = result["sent"]
        return m

    def _eventhubs(self, side: Side) -> Measure:
        peer = EventHubsPeerProcess()
        proxy: ProxyProcess | None = None
        try:
            conn = peer.connection_string
            if side.rtt_ms is not None:
                direct = conn.split("Endpoint=sb://", 1)[1].split("/", 1)[0]
                proxy = ProxyProcess(direct, side.rtt_ms / 2).start()
                conn = conn.replace(f"sb://{direct}/", f"sb://{proxy.addr}/")
            before = peer.events()
            m = self._eventhubs_side(side, conn)
            got = peer.events() - before
        finally:
            if proxy is not None:
                proxy.close()
            peer.stop()
        expected = m.extra.get("sent", self.operations)
        if got < expected:  # at-least-once: duplicates are allowed, losses are not
            raise SystemExit(f"{side}: the peer received {got} events, expected {expected}")
        m.extra["duplicates"] = got - expected
        if proxy is not None:
            m.connections = proxy.counters.get("connections", 0)
            m.proxy_cpu_s = proxy.counters.get("cpu_s", 0.0)
        return m

    def _eventhubs_side(self, side: Side, conn: str) -> Measure:
        out = self.report()
        if side.who == "dmrepl":
            env = self.fresh_home()
            creds = self.work / f"eh-{self.serial}.txt"
            creds.write_text(conn)
            dmrepl(env, "create", "--type", "azure-event-hubs", "--name", "eh", "--credentials", str(creds))
            dmrepl(env, "activate", "eh")
            return self._sync(env, out)
        if side.who == "official":
            m = measure([sys.executable, "-c", SDK_LOOP, conn, str(self.ops_tsv)], self.base_env, out)
            if int(out.read_text()) != self.operations:
                raise SystemExit(f"{side}: the SDK loop sent {out.read_text().strip()} events")
            return m
        m = measure(
            [sys.executable, "-c", RAW_EVENTHUBS, conn, str(self.ops_tsv), str(self.operations)], self.base_env, out
        )
        result = json.loads(out.read_text())
        if result["errors"]:
            raise SystemExit(f"{side}: {result['errors'][:3]}")
        m.seconds = result["elapsed"]
        m.extra["sent"] = result["sent"] + result["warm_up"]  # what the peer counts
        m.extra["timed"] = result["sent"]
        m.extra["batch_events"] = result["batch_events"]
        return m

    def _sync(self, env: dict[str, str], out: Path) -> Measure:
        """The whole `dmrepl sync start` process; its JSON result must show every operation delivered."""
        cmd = [sys.executable, "-m", "dmrepl", "--json", "sync", "start", str(self.export), "--no-progress"]
        m = measure(cmd, env, out)
        result = json.loads(out.read_text())
        (rep,) = result["replications"].values()
        if rep["delivered"] != self.operations:
            raise SystemExit(f"dmrepl delivered {rep['delivered']} of {self.operations}")
        m.inner_s = result.get("duration_s")
        return m


def rate_of(side: Side, m: Measure, operations: int) -> float:
    """Messages per second of one measurement (a raw loop's own count: it sends whole batches)."""
    return float(m.extra.get("timed", m.extra.get("sent", operations))) / m.seconds


def fmt_rate(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000, help="user points in the export (default 100000)")
    ap.add_argument("--rtts", default="0,50,150", help="round trips in ms, comma-separated (default 0,50,150)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement; figures are medians")
    ap.add_argument("--only", choices=("pubsub", "eventhubs"), help="one destination type only")
    ap.add_argument("--no-raw", action="store_true", help="skip the direct loopback runs (raw loops, dmrepl direct)")
    a = ap.parse_args()
    rtts = [float(x) for x in a.rtts.split(",") if x.strip()]
    if not rtts or any(r < 0 for r in rtts):
        ap.error("--rtts: round trips in ms, >= 0")
    peers = [a.only] if a.only else ["pubsub", "eventhubs"]
    modes = [(p, m) for p in peers for m in (("ordered", "unordered") if p == "pubsub" else ("eventhubs",))]

    sides: list[Side] = []
    for rtt in rtts:
        for peer, mode in modes:
            sides += [Side(peer, "dmrepl", mode, rtt), Side(peer, "official", mode, rtt)]
    if not a.no_raw:
        for peer in peers:
            sides.append(Side(peer, "raw", "unordered" if peer == "pubsub" else "eventhubs", None))
            sides += [Side(peer, "dmrepl", mode, None) for p, mode in modes if p == peer]

    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        export = work / "export.ndjson"
        operations = generate_export(export, a.users)
        bench = Bench(work, export, operations)
        bench.prepare(pubsub="pubsub" in peers)
        print(
            f"export: {a.users} user points, {operations} operations, {export.stat().st_size / 1e6:.0f} MB; "
            f"round trips {', '.join(f'{r:g}' for r in rtts)} ms (one-way delay rtt/2 each way, proxy in its own "
            f"process); {a.repeat} run(s) each, medians; {os.cpu_count()} CPUs; a fresh peer per measurement",
            flush=True,
        )
        samples: dict[Side, list[Measure]] = {s: [] for s in sides}
        try:
            for r in range(a.repeat):
                order = sides[r % len(sides) :] + sides[: r % len(sides)] if r else sides
                for side in order:
                    m = bench.run(side)
                    samples[side].append(m)
                    log_run(side, m, operations)
        finally:
            if bench.admin is not None:
                bench.admin.close()
        print_tables(samples, rtts, modes, operations, sys.stdout)


def log_run(side: Side, m: Measure, operations: int) -> None:
    where = "direct" if side.rtt_ms is None else f"{side.rtt_ms:g} ms"
    rate = rate_of(side, m, operations)
    bits = [f"  {where:>7} {side.peer:9} {side.mode:9} {side.who:8}: {m.seconds:6.2f} s {rate:9,.0f} msg/s"]
    if side.who == "dmrepl":
        bits.append(f"cpu {m.cpu_s / m.seconds:.2f}, RSS {m.rss_mb} MB (tree {m.tree_mb} MB)")
        if m.inner_s:
            bits.append(f"in-run {operations / m.inner_s:,.0f} msg/s")
    if m.connections:
        bits.append(f"{m.connections} conn, proxy cpu {m.proxy_cpu_s:.1f} s")
    if m.extra.get("duplicates"):
        bits.append(f"{m.extra['duplicates']} duplicates")
    print(", ".join(bits), flush=True)


def print_tables(
    samples: dict[Side, list[Measure]],
    rtts: list[float],
    modes: list[tuple[str, str]],
    operations: int,
    out: IO[str],
) -> None:
    def med(side: Side, key: Callable[[Measure], float]) -> float | None:
        xs = samples.get(side)
        return statistics.median(key(m) for m in xs) if xs else None

    def rate(side: Side) -> float | None:
        return med(side, lambda m: rate_of(side, m, operations))

    names = {"ordered": "pubsub ordered", "unordered": "pubsub unordered", "eventhubs": "eventhubs"}
    top = max(rtts)
    print(file=out)
    header = (
        f"{'rtt':>6}  {'mode':17} {'dmrepl msg/s':>13} {'official msg/s':>15} {'dmrepl/off.':>12} "
        f"{'vs own 0ms':>11} {'in flight':>10} {'cpu':>5} {'peak RSS':>9}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    misses: list[str] = []
    for rtt in rtts:
        for peer, mode in modes:
            d, o = Side(peer, "dmrepl", mode, rtt), Side(peer, "official", mode, rtt)
            dr, orate = rate(d), rate(o)
            base = rate(Side(peer, "dmrepl", mode, 0.0)) if 0.0 in rtts else None
            ratio = dr / orate if dr and orate else None
            keep = dr / base if dr and base else None
            cpu = med(d, lambda m: m.cpu_s / m.seconds)
            rss = med(d, lambda m: max(m.rss_mb, m.tree_mb))
            in_flight = f"{dr * rtt / 1000:,.0f}" if dr and rtt else "—"
            ratio_s = "—" if ratio is None else f"{ratio:.2f} {verdict(ratio >= TARGET_VS_OFFICIAL)}"
            keep_s = "—" if keep is None else f"{keep:.2f}"
            if keep is not None and rtt == top and rtt > 0:
                keep_s += f" {verdict(keep >= TARGET_KEEP)}"
                if keep < TARGET_KEEP:
                    misses.append(f"{names[mode]} keeps {keep:.2f} of its 0 ms rate at {rtt:g} ms")
            if ratio is not None and ratio < TARGET_VS_OFFICIAL:
                misses.append(f"{names[mode]} at {rtt:g} ms is {ratio:.2f}x official")
            rss_s = "—" if rss is None else f"{rss:.0f} MB"
            if rss is not None and rss >= TARGET_RSS_MB:
                misses.append(f"{names[mode]} at {rtt:g} ms peaks at {rss:.0f} MB")
            print(
                f"{rtt:>4g}ms  {names[mode]:17} {fmt_rate(dr):>13} {fmt_rate(orate):>15} {ratio_s:>12} "
                f"{keep_s:>11} {in_flight:>10} {'—' if cpu is None else f'{cpu:.2f}':>5} {rss_s:>9}",
                file=out,
            )
    print(
        f"targets: at {top:g} ms each mode keeps >= {TARGET_KEEP} of its 0 ms rate; dmrepl >= {TARGET_VS_OFFICIAL:g}x "
        f"official at every rtt; peak RSS < {TARGET_RSS_MB} MB (largest of wait4 and the sampled process tree)",
        file=out,
    )
    print(
        "official: pubsub = PublisherClient, publishing only (parsing before its clock); eventhubs = SDK loop, whole "
        "process. dmrepl: whole process. in flight = dmrepl msg/s x rtt (Little's law). cpu = dmrepl's CPU s / wall s",
        file=out,
    )

    raws = [s for s in samples if s.who == "raw"]
    if raws:
        print(file=out)
        print("loopback, no proxy: raw pre-serialized loop (the most one client process gets into the peer)", file=out)
        for raw in raws:
            rr = rate(raw)
            print(f"  {raw.peer:9} raw loop: {fmt_rate(rr):>10} msg/s", file=out)
            for peer, mode in modes:
                if peer != raw.peer:
                    continue
                direct = rate(Side(peer, "dmrepl", mode, None))
                proxied = rate(Side(peer, "dmrepl", mode, 0.0)) if 0.0 in rtts else None
                line = f"    dmrepl {names[mode]:17}: {fmt_rate(direct):>10} msg/s direct"
                if direct and rr:
                    line += f" = {direct / rr:.2f} of the raw loop"
                if direct and proxied:
                    line += f"; through the 0 ms proxy {fmt_rate(proxied)} msg/s ({proxied / direct:.2f} of direct)"
                print(line, file=out)
    print(file=out)
    print("targets missed: " + ("; ".join(misses) if misses else "none"), file=out)


if __name__ == "__main__":
    main()
