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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TINY_LLM_SERVER = ROOT.parent / "shared" / "tools" / "tiny-llm-server"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
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
async def network(llm: str, base_port: int, nodes: int = 3, capacity: int = 1) -> AsyncIterator[Network]:
    root = Path(tempfile.mkdtemp(prefix="llmp-bench-"))
    up = subprocess.Popen(
        _emulator("up", "--nodes", str(nodes), "--base-port", str(base_port), "--llm", llm, "--root", str(root)),
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
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
        pids = {index: net.pid(index) for index in range(1, nodes + 1)}
        cpu_before = {i: cpu_seconds(p) for i, p in pids.items()}
        done, errors = 0, 0
        deadline = time.perf_counter() + seconds

        async def client(session: aiohttp.ClientSession) -> None:
            nonlocal done, errors
            while time.perf_counter() < deadline:
                try:
                    await chat(session, net.url(3), max_tokens=4)
                    done += 1
                except Exception:
                    errors += 1

        started = time.perf_counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*(client(session) for _ in range(64)))
        elapsed = time.perf_counter() - started
        cpu = {i: (cpu_seconds(p) - cpu_before[i]) / max(done, 1) for i, p in pids.items()}
    row = [f"{done / elapsed:,.0f}", str(errors), ms(cpu[1]), ms(cpu[2]), ms(cpu[3])]
    if heading:
        report.say(f"### Throughput: 64 concurrent clients on node 3, answers of 4 tokens, {seconds:.0f} s\n")
        report.table(["jobs/s", "errors", "CPU ms/job router", "CPU ms/job driver", "CPU ms/job client node"], [row])
    return row


async def scale(report: Report, args: argparse.Namespace) -> None:
    streams = 1000 if not args.quick else 200
    rows = []
    for pace, tokens, port in (("1", "8", args.llm_port + 2), ("0.2", "4", args.llm_port + 5)):
        async with fake_llm(port, "--ttft", "0", "--tps", pace, "--tokens", tokens) as llm:
            rows.append([f"{pace} tokens/s, {tokens} tokens", *await _open_streams(args, llm, streams)])
    report.say(f"### Scale: {streams} concurrent open streams through node 3, slow upstreams\n")
    report.table(
        ["upstream", "errors", "RSS router MB (idle → open)", "RSS driver MB", "RSS client node MB", "memory per open stream KB (all nodes)"],
        rows,
    )


async def _open_streams(args: argparse.Namespace, llm: str, streams: int) -> list[str]:
    """Open `streams` job streams at once and read them to the end; errors and memory."""
    async with network(llm, args.base_port, capacity=streams) as net:
        pids = {index: net.pid(index) for index in (1, 2, 3)}
        idle = {i: rss_bytes(p) for i, p in pids.items()}
        opened = asyncio.Event()
        count, errors, peak = 0, 0, dict(idle)

        async def stream(session: aiohttp.ClientSession) -> None:
            nonlocal count, errors
            try:
                async with session.post(net.url(3) + "/jobs", json={"model": "llama3", "prompt": "slow"}) as r:
                    job = await r.json()
                async with session.get(net.url(3) + job["events_url"]) as events:
                    count += 1
                    if count == streams:
                        opened.set()
                    async for line in events.content:
                        if b'"is_final":true' in line and b'"status":"succeeded"' not in line:
                            errors += 1
            except Exception:
                errors += 1

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)) as session:
            tasks = [asyncio.ensure_future(stream(session)) for _ in range(streams)]
            await asyncio.wait_for(opened.wait(), 120)
            for i, p in pids.items():
                peak[i] = rss_bytes(p)
            await asyncio.gather(*tasks)
    per_stream = sum(peak[i] - idle[i] for i in pids) / streams
    return [str(errors)] + [f"{idle[i] / 2**20:.0f} → {peak[i] / 2**20:.0f}" for i in (1, 2, 3)] + [f"{per_stream / 1024:.0f}"]


async def growth(report: Report, args: argparse.Namespace, llm: str) -> None:
    rows = []
    rounds = 50 if not args.quick else 20
    async with network(llm, args.base_port) as net:
        stored = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for target in (1, 10, 100, 1000):
                while stored < target:
                    batch = min(32, target - stored)
                    await asyncio.gather(*(chat(session, net.url(3), max_tokens=2) for _ in range(batch)))
                    stored += batch
                results = await interleaved({"3 hops": net.url(3)}, rounds, max_tokens=16)
                ttft = [t.ttft for t in results["3 hops"]]
                rows.append([f"{target} stored jobs, 1 driver", ms(pct(ttft, 0.5)), ms(pct(ttft, 0.99)), ""])
    for drivers, nodes in ((4, 6), (16, 18)):
        async with network(llm, args.base_port, nodes=nodes) as net:
            results = await interleaved({"3 hops": net.url(3)}, rounds, max_tokens=16)
        ttft = [t.ttft for t in results["3 hops"]]
        jobs = (await throughput(report, args, llm, nodes=nodes, seconds=4.0, heading=False))[0]
        rows.append([f"fresh, {drivers} drivers", ms(pct(ttft, 0.5)), ms(pct(ttft, 0.99)), jobs])
    report.say("### How cost grows with history and network size (3-hop TTFT; throughput as above, 4 s)\n")
    report.table(["state", "TTFT p50 ms", "TTFT p99 ms", "jobs/s"], rows)


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
    parser.add_argument("--only", default=None, help="comma-separated: latency,llama,relay,throughput,scale,growth")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    args.rounds = args.rounds or (300 if not args.quick else 60)
    only = set(args.only.split(",")) if args.only else {"latency", "relay", "throughput", "scale", "growth"} | ({"llama"} if args.llama else set())

    report = Report()
    report.say(f"## Figures\n\n{machine()}\n")
    report.say("Produced by `python benchmarks/network.py" + (" --llama" if args.llama else "") + "`; every network is `emulator up`, one process per node.\n")
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
    png = args.out.parent / "benchmarks" / "ttft_cdf.png"
    if report.cdf and plot(report.cdf, png):
        report.say(f"![added TTFT CDF](benchmarks/{png.name})\n")
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
