"""What the network adds to an LLM, measured side by side with the upstream alone.

    python benchmarks/network.py            # all sections, writes BENCHMARKS.md and benchmarks/ttft_cdf.png
    python benchmarks/network.py --quick    # fewer rounds, for a look
    python benchmarks/network.py --llama    # also against a real llama.cpp server (../shared/tools/tiny-llm-server)

Every network is started the way a user starts one (`emulator up`, one OS process per node) on
ports from --base-port; the fake upstream runs in its own process too.  Requests to the targets
of one comparison are interleaved, so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

import peers

ROOT = Path(__file__).resolve().parent.parent
TINY_LLM_SERVER = ROOT.parent / "shared" / "tools" / "tiny-llm-server"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BASELINE = "3d5b40b"  # the commit the cost-per-hop work started from
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- processes -------------------------------------------------------------------------


def _emulator(*args: str) -> list[str]:
    return [sys.executable, "-m", "emulator.cli", *args]


@dataclass
class Network:
    root: Path
    base_port: int
    nodes: int
    llm: str

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.base_port + index - 1}"

    def pid(self, index: int) -> int:
        name = "fake.dev" if index == 1 else f"fake{index}.dev"
        return int(json.loads((self.root / name / "node.json").read_text())["pid"])


@asynccontextmanager
async def fake_llm(port: int, *flags: str) -> AsyncIterator[str]:
    process = subprocess.Popen(_emulator("fake-llm", "--port", str(port), *flags), stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert process.stdout is not None
        process.stdout.readline()  # "fake LLM listening on ..."
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait()


@asynccontextmanager
async def network(llm: str, base_port: int, nodes: int = 3, capacity: int = 1, source: Path = ROOT) -> AsyncIterator[Network]:
    """`emulator up` of the code in `source` (this checkout, or a worktree of an older commit)."""
    root = Path(tempfile.mkdtemp(prefix="llmp-bench-"))
    up = subprocess.Popen(
        _emulator("up", "--nodes", str(nodes), "--base-port", str(base_port), "--llm", llm, "--root", str(root)),
        stdout=subprocess.PIPE, text=True, cwd=source, env={**os.environ, "PYTHONPATH": str(source)},
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError("emulator up did not get ready")
        net = Network(root=root, base_port=base_port, nodes=nodes, llm=llm)
        if capacity > 1:
            for index in [2, *range(4, nodes + 1)]:
                token = (root / ("fake.dev" if index == 1 else f"fake{index}.dev") / "admin_token").read_text().strip()
                async with aiohttp.ClientSession() as session:
                    body = {"SetLocalDriver": {"model": "llama3", "is_public": True, "capacity": capacity}}
                    async with session.post(net.url(index) + "/admin", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
                        r.raise_for_status()
        yield net
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (a server's workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return tree


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


# --- one request -----------------------------------------------------------------------------


@dataclass
class Timing:
    ttft: float
    total: float
    tokens: int = 0
    delays: list[float] = field(default_factory=list)


async def chat(session: aiohttp.ClientSession, base: str, max_tokens: int | None = None, stamped: bool = False) -> Timing:
    """One streamed chat completion; with `stamped`, each token is its upstream send time."""
    body: dict[str, Any] = {"model": "llama3", "stream": True, "messages": [{"role": "user", "content": "How much wood?"}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    delays: list[float] = []
    async with session.post(base + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            received = time.time()
            payload = json.loads(line[6:])
            if "error" in payload:
                raise RuntimeError(payload["error"]["message"])
            content = payload["choices"][0]["delta"].get("content") if payload.get("choices") else None
            if content:
                first = first or time.perf_counter()
                words = content.split()
                tokens += len(words)
                if stamped:
                    delays.extend(received - float(word) for word in words)
    if first is None:
        raise RuntimeError("no content")
    return Timing(ttft=first - started, total=time.perf_counter() - started, tokens=tokens, delays=delays)


# --- figures ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    cdf: dict[str, list[float]] = field(default_factory=dict)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.say("| " + " | ".join(header) + " |")
        self.say("|" + "---|" * len(header))
        for row in rows:
            self.say("| " + " | ".join(row) + " |")
        self.say()


async def interleaved(targets: dict[str, str], rounds: int, max_tokens: int | None = None) -> dict[str, list[Timing]]:
    results: dict[str, list[Timing]] = {name: [] for name in targets}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for warm in range(5):
            for base in targets.values():
                await chat(session, base, max_tokens)
        for _ in range(rounds):
            for name, base in targets.items():
                results[name].append(await chat(session, base, max_tokens))
    return results


def latency_table(report: Report, results: dict[str, list[Timing]], baseline: str, label: str) -> None:
    rows = []
    base_ttft = statistics.median(t.ttft for t in results[baseline])
    base_total = statistics.median(t.total for t in results[baseline])
    for name, timings in results.items():
        ttft = [t.ttft for t in timings]
        total = [t.total for t in timings]
        added = "" if name == baseline else f"+{ms(statistics.median(ttft) - base_ttft)} / +{ms(statistics.median(total) - base_total)}"
        rows.append([name, ms(pct(ttft, 0.5)), ms(pct(ttft, 0.95)), ms(pct(ttft, 0.99)), ms(pct(total, 0.5)), ms(pct(total, 0.99)), added])
        if name != baseline:
            report.cdf[f"{label}: {name}"] = [t.ttft - base_ttft for t in timings]
    report.table(["path", "TTFT p50 ms", "p95", "p99", "total p50 ms", "total p99", "added p50 (TTFT / total) ms"], rows)


# --- sections ------------------------------------------------------------------------------------


async def added_latency(report: Report, args: argparse.Namespace, llm: str, label: str) -> None:
    async with network(llm, args.base_port) as net:
        targets = {"upstream direct": llm.removesuffix("/v1"), "node 2 (local)": net.url(2), "node 3 -> router -> node 2": net.url(3)}
        results = await interleaved(targets, args.rounds, max_tokens=16)
    report.say(f"### Added latency, {label} ({args.rounds} requests per path, interleaved)\n")
    latency_table(report, results, "upstream direct", label)


async def relay(report: Report, args: argparse.Namespace) -> None:
    tokens = 2000 if not args.quick else 500
    async with fake_llm(args.llm_port + 1, "--ttft", "0", "--tps", "0", "--tokens", str(tokens), "--stamp") as llm:
        async with network(llm, args.base_port, capacity=200) as net:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                rows = []
                for name, base in (("upstream direct", llm.removesuffix("/v1")), ("node 2 (local)", net.url(2))):
                    single = await chat(session, base, stamped=True)
                    started = time.perf_counter()
                    many = await asyncio.gather(*(chat(session, base, max_tokens=200, stamped=True) for _ in range(100)))
                    elapsed = time.perf_counter() - started
                    delays = [d for t in many for d in t.delays]
                    rows.append([
                        name, f"{single.tokens / single.total:,.0f}", f"{sum(t.tokens for t in many) / elapsed:,.0f}",
                        ms(pct(single.delays, 0.5)), ms(pct(delays, 0.5)), ms(pct(delays, 0.99)),
                    ])
    report.say("### Relay through one node (fast upstream: no delay between tokens)\n")
    report.table(["path", "tokens/s, 1 stream", "tokens/s, 100 streams", "chunk delay p50 ms, 1 stream", "p50, 100 streams", "p99, 100 streams"], rows)
    # The same delay when the node keeps up: an upstream paced like a fast real model (50 tokens/s).
    async with fake_llm(args.llm_port + 4, "--ttft", "0", "--tps", "50", "--tokens", "100", "--stamp") as llm:
        async with network(llm, args.base_port) as net:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                paced_rows = []
                for name, base in (("upstream direct", llm.removesuffix("/v1")), ("node 2 (local)", net.url(2)), ("node 3 -> router -> node 2", net.url(3))):
                    delays = [d for _ in range(5) for d in (await chat(session, base, stamped=True)).delays]
                    paced_rows.append([name, ms(pct(delays, 0.5)), ms(pct(delays, 0.95)), ms(pct(delays, 0.99))])
    report.say("### Per-chunk delay, upstream paced at 50 tokens/s (5 streams of 100 tokens, one at a time)\n")
    report.table(["path", "delay p50 ms", "p95", "p99"], paced_rows)


async def throughput(report: Report, args: argparse.Namespace, llm: str, nodes: int = 3, seconds: float | None = None,
                     heading: bool = True) -> list[str]:
    seconds = seconds or (10.0 if not args.quick else 4.0)
    async with network(llm, args.base_port, nodes=nodes, capacity=64) as net:
        target = Target(net.url(3), {"router": net.pid(1), "driver": net.pid(2), "client node": net.pid(3)})
        rate = await jobs_per_second(target, seconds)
    row = [f"{rate.jobs_per_s:,.0f}", str(rate.errors), *(f"{rate.cpu_ms[name]:.2f}" for name in ("router", "driver", "client node"))]
    if heading:
        report.say(f"### Throughput: 64 concurrent clients on node 3, answers of 4 tokens, {seconds:.0f} s\n")
        report.table(["jobs/s", "errors", "CPU ms/job router", "CPU ms/job driver", "CPU ms/job client node"], [row])
    return row


async def scale(report: Report, args: argparse.Namespace) -> None:
    streams = 1000 if not args.quick else 200
    rows = []
    # Each answer lasts 40 s, within the jobs' 60 s deadline and longer than opening them all takes.  The
    # streams are open, not busy: 1,000 streams at 1 token/s would be 1,000 chunks/s through three hops, a
    # throughput question (the throughput section's), and more than two shared cores relay.
    for ttft, pace, tokens, port in (("40", "0", "2", args.llm_port + 2), ("0", "0.05", "2", args.llm_port + 5)):
        async with fake_llm(port, "--ttft", ttft, "--tps", pace, "--tokens", tokens) as llm:
            label = f"first token after {ttft} s" if ttft != "0" else f"{pace} tokens/s"
            rows.append([f"{label}, {tokens} tokens", *await _open_streams(args, llm, streams)])
    report.say(
        f"### Scale: {streams} concurrent open streams through node 3, slow upstreams "
        f"(submitted {SUBMITTING} at a time; every stream stays open until its answer ends)\n"
    )
    report.table(
        ["upstream", "errors", "streams open at once", "RSS router MB (idle → open)", "RSS driver MB", "RSS client node MB",
         "memory per open stream KB (router / driver / client node)"],
        rows,
    )


SUBMITTING = 64  # submissions in flight while the streams open: a burst of clients, not a thousand at one instant


async def _open_streams(args: argparse.Namespace, llm: str, streams: int) -> list[str]:
    """Open `streams` job streams and read them to the end; errors, and memory once every stream is open (or failed)."""
    async with network(llm, args.base_port, capacity=streams) as net:
        pids = {index: net.pid(index) for index in (1, 2, 3)}
        idle = {i: rss_bytes(p) for i, p in pids.items()}
        all_started = asyncio.Event()
        submitting = asyncio.Semaphore(SUBMITTING)
        started, open_now, most_open, errors, peak = 0, 0, 0, 0, dict(idle)

        def one_more_started() -> None:
            nonlocal started
            started += 1
            if started == streams:
                all_started.set()

        async def stream(session: aiohttp.ClientSession) -> None:
            nonlocal open_now, most_open, errors
            opened = False
            try:
                async with submitting, session.post(net.url(3) + "/jobs", json={"model": "llama3", "prompt": "slow"}) as r:
                    job = await r.json()
                    if r.status != 202:
                        raise RuntimeError(f"submission refused: {r.status} {job}")
                async with session.get(net.url(3) + job["events_url"]) as events:
                    opened, open_now = True, open_now + 1
                    most_open = max(most_open, open_now)
                    one_more_started()
                    async for line in events.content:
                        if b'"is_final":true' in line and b'"status":"succeeded"' not in line:
                            errors += 1
            except Exception:
                errors += 1
                if not opened:
                    one_more_started()
            finally:
                open_now -= opened

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)) as session:
            tasks = [asyncio.ensure_future(stream(session)) for _ in range(streams)]
            await asyncio.wait_for(all_started.wait(), 240)
            for i, p in pids.items():
                peak[i] = rss_bytes(p)
            open_at_peak = open_now  # some of the first may have ended by the time the last opened
            await asyncio.gather(*tasks)
    per_stream = {i: (peak[i] - idle[i]) / max(open_at_peak, 1) / 1024 for i in pids}
    return [str(errors), str(most_open)] + [f"{idle[i] / 2**20:.0f} → {peak[i] / 2**20:.0f}" for i in (1, 2, 3)] + [
        " / ".join(f"{per_stream[i]:.0f}" for i in (1, 2, 3))
    ]


def insert_history(net: Network, jobs: int, start: int) -> None:
    """`jobs` finished jobs of 4 chunks each, written straight into the three nodes' stores (as a long-lived
    network would hold them within its retention), numbered from `start`."""
    now = time.time()
    spec = json.dumps({"job_id": "", "model": "llama3", "body": {"messages": [{"role": "user", "content": "old"}]}})
    ids = [f"history{n:08d}" for n in range(start, start + jobs)]
    stores = {name: net.root / name / "node.db" for name in ("fake.dev", "fake2.dev", "fake3.dev")}
    with sqlite3.connect(stores["fake3.dev"], timeout=60) as client:
        client.executemany(
            "INSERT INTO jobs (id, client, model, spec, status, router_node, driver_node, next_seq, created_at, first_token_at,"
            " finished_at, deadline, finish_reason) VALUES (?, 'http:127.0.0.1', 'llama3', ?, 'succeeded', 'fake.dev',"
            " 'fake2.dev', 5, ?, ?, ?, ?, 'stop')",
            [(job, spec, now - 60, now - 59, now - 58, now) for job in ids],
        )
        client.executemany(
            "INSERT INTO job_chunks (job_id, seq, delta) VALUES (?, ?, ?)",
            [(job, seq, "word ") for job in ids for seq in range(4)] + [(job, 4, "") for job in ids],
        )
    with sqlite3.connect(stores["fake.dev"], timeout=60) as router:
        router.executemany(
            "INSERT INTO routed_jobs (id, client_node, model, spec, status, driver_node, created_at, dispatched_at, finished_at,"
            " deadline, attempts, streamed, tokens_counted) VALUES (?, 'fake3.dev', 'llama3', ?, 'succeeded', 'fake2.dev', ?, ?, ?, ?, 1, 1, 1)",
            [(job, spec, now - 60, now - 60, now - 58, now) for job in ids],
        )
    with sqlite3.connect(stores["fake2.dev"], timeout=60) as driver:
        driver.executemany(
            "INSERT INTO served_jobs (id, origin_node, spec, status, created_at, finished_at, deadline, streamed)"
            " VALUES (?, 'fake.dev', ?, 'succeeded', ?, ?, ?, 1)",
            [(job, spec, now - 60, now - 58, now) for job in ids],
        )


async def growth(report: Report, args: argparse.Namespace, llm: str) -> None:
    rows = []
    rounds = 50 if not args.quick else 20
    async with network(llm, args.base_port) as net:
        stored = 0
        for target in (1, 1_000, 10_000, 100_000):
            insert_history(net, target - stored, stored)
            stored = target
            results = await interleaved({"3 hops": net.url(3)}, rounds, max_tokens=16)
            ttft = [t.ttft for t in results["3 hops"]]
            rows.append([f"{target:,} finished jobs stored, 1 driver", ms(pct(ttft, 0.5)), ms(pct(ttft, 0.99)), ""])
    for drivers, nodes in ((4, 6), (16, 18)):
        async with network(llm, args.base_port, nodes=nodes) as net:
            results = await interleaved({"3 hops": net.url(3)}, rounds, max_tokens=16)
        ttft = [t.ttft for t in results["3 hops"]]
        jobs = (await throughput(report, args, llm, nodes=nodes, seconds=4.0, heading=False))[0]
        rows.append([f"fresh, {drivers} drivers", ms(pct(ttft, 0.5)), ms(pct(ttft, 0.99)), jobs])
    report.say("### How cost grows with history and network size (3-hop TTFT; throughput as above, 4 s)\n")
    report.table(["state", "TTFT p50 ms", "TTFT p99 ms", "jobs/s"], rows)


# --- cost per hop: our paths beside their peers, in one run ---------------------------------------


@dataclass
class Target:
    url: str
    processes: dict[str, int]  # whose CPU a job costs: name -> pid (with its children)


@dataclass
class Rate:
    jobs_per_s: float
    errors: int
    cpu_ms: dict[str, float]  # per job, per process


async def jobs_per_second(target: Target, seconds: float, clients: int = 64) -> Rate:
    """`clients` concurrent clients, each asking for 4-token answers one after another, for `seconds`."""
    trees = {name: process_tree(pid) for name, pid in target.processes.items()}
    before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in trees.items()}
    done, errors = 0, 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                await chat(session, target.url, max_tokens=4)
                done += 1
            except Exception:
                errors += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    cpu = {name: (sum(cpu_seconds(p) for p in pids) - before[name]) * 1000 / max(done, 1) for name, pids in trees.items()}
    return Rate(done / elapsed, errors, cpu)


def _mean_rate(rates: list[Rate]) -> Rate:
    return Rate(
        statistics.mean(r.jobs_per_s for r in rates), sum(r.errors for r in rates),
        {name: statistics.mean(r.cpu_ms[name] for r in rates) for name in rates[0].cpu_ms},
    )


@dataclass
class Door:
    """A node's wait at its door, from its histograms: the event loop's lag, and node messages' delay."""

    lag_count: float = 0.0
    lag_sum: float = 0.0
    lag_buckets: dict[float, float] = field(default_factory=dict)  # cumulative, by upper bound
    delay_count: float = 0.0
    delay_sum: float = 0.0

    def since(self, earlier: Door) -> Door:
        return Door(
            self.lag_count - earlier.lag_count, self.lag_sum - earlier.lag_sum,
            {le: n - earlier.lag_buckets.get(le, 0.0) for le, n in self.lag_buckets.items()},
            self.delay_count - earlier.delay_count, self.delay_sum - earlier.delay_sum,
        )

    def lag_quantile(self, q: float) -> float:
        """The upper bound of the bucket the q-quantile falls in."""
        return next((le for le, n in sorted(self.lag_buckets.items()) if n >= q * self.lag_count), float("inf"))


async def door(url: str) -> Door:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    found = Door()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmp_event_loop_lag_seconds_count":
                found.lag_count += sample.value
            elif sample.name == "llmp_event_loop_lag_seconds_sum":
                found.lag_sum += sample.value
            elif sample.name == "llmp_event_loop_lag_seconds_bucket":
                bound = float(sample.labels["le"])
                found.lag_buckets[bound] = found.lag_buckets.get(bound, 0.0) + sample.value
            elif sample.name == "llmp_node_message_delay_seconds_count":
                found.delay_count += sample.value
            elif sample.name == "llmp_node_message_delay_seconds_sum":
                found.delay_sum += sample.value
    return found


UPSTREAM, RELAY, LITELLM, LOCAL, THREE_HOPS = "upstream alone", "bare relay", "LiteLLM proxy (1 worker)", "node 2, local path", "node 3 → router → node 2"


async def cost_per_hop(report: Report, args: argparse.Namespace) -> None:
    seconds = 8.0 if not args.quick else 3.0
    async with fake_llm(args.llm_port + 6, "--ttft", "0", "--tps", "0", "--tokens", "4") as llm, AsyncExitStack() as stack:
        targets = {UPSTREAM: Target(llm.removesuffix("/v1"), {})}
        url, pid = await stack.enter_async_context(peers.relay(args.base_port + 50, llm))
        targets[RELAY] = Target(url, {"relay": pid})
        if args.peers:
            url, pid = await stack.enter_async_context(peers.litellm(args.base_port + 51, llm))
            targets[LITELLM] = Target(url, {"litellm": pid})
        net = await stack.enter_async_context(network(llm, args.base_port, capacity=64))
        targets[LOCAL] = Target(net.url(2), {"driver": net.pid(2)})
        targets[THREE_HOPS] = Target(net.url(3), {"client node": net.pid(3), "router": net.pid(1), "driver": net.pid(2)})
        baseline = f"3 hops at {args.baseline} (before)" if args.baseline else None
        if baseline:
            old = await stack.enter_async_context(
                network(llm, args.base_port + 20, capacity=64, source=peers.worktree(args.baseline))
            )
            targets[baseline] = Target(old.url(3), {"client node": old.pid(3), "router": old.pid(1), "driver": old.pid(2)})
        latency = await interleaved({name: target.url for name, target in targets.items()}, args.rounds, max_tokens=4)
        passes: dict[str, list[Rate]] = {name: [] for name in targets}
        doors = {index: Door() for index in (1, 2, 3)}
        for _ in range(2):  # in turns, so a noisy moment hits every target alike
            for name, target in targets.items():
                before = {index: await door(net.url(index)) for index in doors} if name == THREE_HOPS else {}
                passes[name].append(await jobs_per_second(target, seconds / 2))
                for index, earlier in before.items():
                    moved = (await door(net.url(index))).since(earlier)
                    doors[index] = Door(
                        doors[index].lag_count + moved.lag_count, doors[index].lag_sum + moved.lag_sum,
                        {le: doors[index].lag_buckets.get(le, 0.0) + n for le, n in moved.lag_buckets.items()},
                        doors[index].delay_count + moved.delay_count, doors[index].delay_sum + moved.delay_sum,
                    )
    rates = {name: _mean_rate(runs) for name, runs in passes.items()}

    base_ttft = statistics.median(t.ttft for t in latency[UPSTREAM])
    base_total = statistics.median(t.total for t in latency[UPSTREAM])
    added = {name: statistics.median(t.ttft for t in timings) - base_ttft for name, timings in latency.items()}
    added_total = {name: statistics.median(t.total for t in timings) - base_total for name, timings in latency.items()}
    p50 = {name: pct([t.ttft for t in timings], 0.5) for name, timings in latency.items()}
    p99 = {name: pct([t.ttft for t in timings], 0.99) for name, timings in latency.items()}
    cpu = {name: sum(rate.cpu_ms.values()) for name, rate in rates.items()}
    floor_added, floor_rate = added[RELAY], rates[RELAY].jobs_per_s
    rows = []
    for name in targets:
        rate = rates[name]
        parts = " + ".join(f"{process} {ms_:.2f}" for process, ms_ in rate.cpu_ms.items())
        rows.append([
            name, ms(p50[name]), "" if name == UPSTREAM else f"+{ms(added[name])}",
            "" if name == UPSTREAM else f"{added[name] / floor_added:.1f}", f"{p99[name] / p50[name]:.1f}",
            "" if name == UPSTREAM else f"+{ms(added_total[name])}",
            f"{rate.jobs_per_s:,.0f}", f"{rate.jobs_per_s / floor_rate:.2f}", str(rate.errors),
            (parts if len(rate.cpu_ms) == 1 else f"{parts} = {cpu[name]:.2f}") if rate.cpu_ms else "",
        ])
        if name != UPSTREAM:
            report.cdf[f"cost per hop: {name}"] = [t.ttft - base_ttft for t in latency[name]]
    report.say(
        f"### Cost per hop: every target in one run ({args.rounds} requests each, one at a time and interleaved, for TTFT; "
        f"64 concurrent clients, 4-token answers, {seconds:.0f} s each in two turns, for jobs/s)\n"
    )
    if args.peers:
        report.say(f"LiteLLM {peers.litellm_version()}, its proxy with one worker, pointed at the same fake upstream.\n")
    report.table(
        ["target", "TTFT p50 ms", "added TTFT p50 ms", "× relay", "TTFT p99 / p50", "added total p50 ms", "jobs/s",
         "× relay", "errors", "CPU ms per job, by process"],
        rows,
    )
    checks = [
        ("added TTFT p50, local path ≤ 2× the bare relay's", f"{added[LOCAL] / floor_added:.1f}×", added[LOCAL] <= 2 * floor_added),
        ("added TTFT p50, 3-hop path ≤ 5× the bare relay's", f"{added[THREE_HOPS] / floor_added:.1f}×", added[THREE_HOPS] <= 5 * floor_added),
        ("jobs/s, local path ≥ 0.4× the bare relay's", f"{rates[LOCAL].jobs_per_s / floor_rate:.2f}×", rates[LOCAL].jobs_per_s >= 0.4 * floor_rate),
        ("jobs/s, 3-hop path ≥ 0.15× the bare relay's", f"{rates[THREE_HOPS].jobs_per_s / floor_rate:.2f}×",
         rates[THREE_HOPS].jobs_per_s >= 0.15 * floor_rate),
        *[(f"TTFT p99 ≤ 3× p50, {name}", f"{p99[name] / p50[name]:.1f}×", p99[name] <= 3 * p50[name]) for name in (LOCAL, THREE_HOPS)],
    ]
    if args.peers:
        checks += [
            ("local path ahead of LiteLLM: added TTFT", f"{ms(added[LOCAL])} vs {ms(added[LITELLM])} ms", added[LOCAL] < added[LITELLM]),
            ("local path ahead of LiteLLM: added total time", f"{ms(added_total[LOCAL])} vs {ms(added_total[LITELLM])} ms",
             added_total[LOCAL] < added_total[LITELLM]),
            ("local path ahead of LiteLLM: jobs/s", f"{rates[LOCAL].jobs_per_s:,.0f} vs {rates[LITELLM].jobs_per_s:,.0f}",
             rates[LOCAL].jobs_per_s > rates[LITELLM].jobs_per_s),
            ("local path ahead of LiteLLM: CPU per job", f"{cpu[LOCAL]:.2f} vs {cpu[LITELLM]:.2f} ms", cpu[LOCAL] < cpu[LITELLM]),
        ]
    if baseline:
        checks += [
            (f"3-hop added TTFT at most half of {args.baseline}'s", f"{added[THREE_HOPS] / added[baseline]:.2f}×",
             added[THREE_HOPS] <= added[baseline] / 2),
            (f"3-hop jobs/s at least twice {args.baseline}'s", f"{rates[THREE_HOPS].jobs_per_s / rates[baseline].jobs_per_s:.2f}×",
             rates[THREE_HOPS].jobs_per_s >= 2 * rates[baseline].jobs_per_s),
        ]
    report.say(
        "Time at each node's door during the 3-hop jobs/s runs: how late its event loop ran a timer that was due "
        "(`llmp_event_loop_lag_seconds`, sampled every 0.25 s; p99 is a bucket's upper bound), and how long node "
        "messages took from their sending to their handler's start (`llmp_node_message_delay_seconds`).\n"
    )
    report.table(
        ["node", "event loop lag, mean ms", "lag p99 ≤ ms", "node message delay, mean ms", "messages"],
        [[name, ms(d.lag_sum / max(d.lag_count, 1)), ms(d.lag_quantile(0.99)), ms(d.delay_sum / max(d.delay_count, 1)), f"{d.delay_count:,.0f}"]
         for name, d in (("node 1 (router)", doors[1]), ("node 2 (driver)", doors[2]), ("node 3 (client)", doors[3]))],
    )
    report.say("Against the targets, in this run:\n")
    report.table(["target", "measured", "met?"], [[what, figure, "yes" if met else "**no**"] for what, figure, met in checks])


@asynccontextmanager
async def tiny_llm_server(port: int) -> AsyncIterator[str]:
    cache = Path.home() / ".cache" / "llm-provider"
    pid_file = cache / "tiny-llm.pid"
    command = [
        sys.executable, str(TINY_LLM_SERVER), "--port", str(port), "--detach", "--pid-file", str(pid_file),
        "--venv", str(cache / "llm-venv"), "--cache-dir", str(cache / "tiny-llm"), "--log-file", str(cache / "tiny-llm.log"),
    ]
    url = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    try:
        yield url
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


def plot(cdf: dict[str, list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, values in cdf.items():
        ordered = sorted(v * 1000 for v in values)
        axes.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    axes.set_xlabel("added time to first token (ms, vs the upstream alone)")
    axes.set_ylabel("fraction of requests")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def machine() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return (
        f"{datetime.date.today().isoformat()} · commit {commit or '?'} · {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama", action="store_true", help="also measure against tiny-llm-server (builds it once, ~4 min)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--base-port", type=int, default=18081)
    parser.add_argument("--llm-port", type=int, default=18180)
    parser.add_argument("--only", default=None, help="comma-separated: hops,latency,llama,relay,throughput,scale,growth")
    parser.add_argument("--peers", action="store_true", help="also measure the LiteLLM proxy (installed once into a venv of its own)")
    parser.add_argument("--baseline", default=BASELINE, help="an older commit measured beside this one ('' for none)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    args.rounds = args.rounds or (300 if not args.quick else 60)
    only = set(args.only.split(",")) if args.only else {"hops", "latency", "relay", "throughput", "scale", "growth"} | ({"llama"} if args.llama else set())

    report = Report()
    report.say(f"## Figures\n\n{machine()}\n")
    flags = "".join(f" --{flag}" for flag in ("llama", "peers") if getattr(args, flag))
    report.say(f"Produced by `python benchmarks/network.py{flags}`; every network is `emulator up`, one process per node.\n")
    if "hops" in only:
        await cost_per_hop(report, args)
    async with fake_llm(args.llm_port, "--ttft", "0", "--tps", "0", "--tokens", "16") as fast:
        if "latency" in only:
            await added_latency(report, args, fast, "fake upstream, 0 ms to first token")
        if "llama" in only:
            async with tiny_llm_server(args.llm_port + 3) as real:
                await added_latency(report, args, real, "llama.cpp (tiny-llm-server)")
        if "relay" in only:
            await relay(report, args)
        if "throughput" in only:
            await throughput(report, args, fast)
        if "scale" in only:
            await scale(report, args)
        if "growth" in only:
            await growth(report, args, fast)
    # Beside the report it illustrates: benchmarks/ for BENCHMARKS.md, the same folder for a report elsewhere.
    png = ROOT / "benchmarks" / "ttft_cdf.png" if args.out.resolve() == ROOT / "BENCHMARKS.md" else args.out.with_suffix(".png")
    if report.cdf and plot(report.cdf, png):
        report.say(f"![added TTFT CDF]({os.path.relpath(png, args.out.resolve().parent)})\n")
    write_figures(args.out, "\n".join(report.lines))


START, END = "<!-- figures: written by benchmarks/network.py -->", "<!-- /figures -->"


def write_figures(path: Path, figures: str) -> None:
    """Replace the measured part of BENCHMARKS.md; what people wrote around it stays."""
    block = f"{START}\n{figures}\n{END}"
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = block + "\n" + text
    path.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
