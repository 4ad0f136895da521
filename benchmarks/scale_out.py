"""Scaling out, measured with real processes: router replicas over one database, a client node as gunicorn workers.

    LLMP_TEST_POSTGRES_URL=postgresql+asyncpg://USER:PASS@127.0.0.1:5432/postgres python benchmarks/scale_out.py
    python benchmarks/scale_out.py --postgres-url URL --quick   # ~3 s of load per setup instead of ~8 s
    python benchmarks/scale_out.py                              # no PostgreSQL server: its rows are skipped

Each setup is a fresh network on 127.0.0.1: a fake LLM (no delay, 4 tokens), the router fake.dev, the
driver fake2.dev (capacity 64) and the client node fake3.dev, every node its own OS process (`python -m
emulator.cli node`, or gunicorn's master and workers), each started in a session of its own and killed with
its process group at the end, errors or not.  The PostgreSQL setups get a database of their own on the
server (CREATE DATABASE, then DROP DATABASE ... WITH (FORCE)).

Load: 64 concurrent clients in this process, each posting non-streaming /v1/chat/completions (model llama3,
max_tokens 4) to the client node, one after another, for --seconds; an answer other than HTTP 200 with
content, or a failed request, is an error.  CPU per job is utime + stime from /proc over every process in
the node's process group(s), divided by the completed jobs; for PostgreSQL also over the whole server when
it runs on this machine (its postmaster, live children, and through the postmaster's cutime/cstime the
backends that exited).  Commits, rollbacks and connections opened per job are the change in
pg_stat_database's xact_commit, xact_rollback and sessions for the router's database over the load, divided
by the completed jobs.  A backend holds back up to ~1 s of its counters, for as long as 10 s while idle, and
pg_stat_force_next_flush() flushes only the backend that calls it, so neither it nor a ~1 s wait gives a
true count: the first reading is taken after 11 s idle (setup and warm-up flushed), the second once the
router's processes have exited (a backend flushes its counters at exit).  The tables go to stdout, progress
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from network import CLOCK_TICKS, cpu_seconds, fake_llm, ms
from sqlalchemy.engine import URL, make_url

from emulator.client import send_admin
from llm_provider.directory import Peer, write_directory
from llm_provider.homes import Home
from llm_provider.signing import NodeKey

ROOT = Path(__file__).resolve().parent.parent
ROUTER, DRIVER, CLIENT = "fake.dev", "fake2.dev", "fake3.dev"
MODEL = "llama3"
CLIENTS = 64
READY_S = 30.0  # a process must answer /healthz within this
STOP_S = 15.0  # a stopped process must exit within this, or it is killed
BODY = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "How much wood?"}]}


# --- processes ---------------------------------------------------------------------------------------


def free_port(taken: set[int]) -> int:
    """A loopback port nothing listens on now, not handed out before."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


@dataclass
class Proc:
    """One started process (and the group it leads): a node, a node replica, gunicorn, or the fake LLM."""

    name: str
    port: int
    log: Path
    popen: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, ... (utime is [11])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes_where(field_index: int, value: int) -> set[int]:
    """The processes whose /proc stat field `field_index` (1: ppid, 2: pgrp) is `value`."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(proc_stat(int(stat.parent.name))[field_index]) == value:
                found.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def group_pids(pgid: int) -> set[int]:
    """The processes in process group `pgid` (a gunicorn master and its workers, or one node)."""
    return processes_where(2, pgid)


def children(pid: int) -> set[int]:
    return processes_where(1, pid)


def group_cpu(procs: Iterable[Proc]) -> float:
    """CPU seconds used so far by every process of the groups these processes lead."""
    total = 0.0
    for proc in procs:
        for pid in group_pids(proc.popen.pid):
            try:
                total += cpu_seconds(pid)
            except (OSError, IndexError):
                pass  # exited meanwhile
    return total


class Lab:
    """The processes of one setup, under one folder; `kill_all()` kills every group still alive."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.taken: set[int] = set()

    def port(self) -> int:
        return free_port(self.taken)

    def spawn(self, name: str, port: int, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.root / f"{name}.out"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env=env,
            )
        proc = Proc(name=name, port=port, log=log, popen=popen)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            kill_group(proc, signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                pass


def kill_group(proc: Proc, sig: signal.Signals) -> None:
    if proc.alive():
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            pass


async def stop(procs: Iterable[Proc]) -> None:
    """SIGTERM each group and wait for the leaders to exit (SIGKILL after STOP_S)."""
    for proc in procs:
        kill_group(proc, signal.SIGTERM)
    for proc in procs:
        deadline = time.monotonic() + STOP_S
        while proc.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # a child's exit gives no event to await here
        kill_group(proc, signal.SIGKILL)
        proc.popen.wait()


async def wait_ready(http: aiohttp.ClientSession, proc: Proc) -> None:
    """Poll GET /healthz until 200: a port opening sends no event."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} while starting:\n{proc.tail()}")
        try:
            async with http.get(proc.url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer /healthz within {READY_S:.0f} s:\n{proc.tail()}")


# --- PostgreSQL --------------------------------------------------------------------------------------


def asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@asynccontextmanager
async def fresh_database(server: URL) -> AsyncIterator[URL]:
    """A new, empty database on the server (its SQLAlchemy URL); dropped afterwards."""
    name = f"llmp_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(server))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield server.set(database=name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


IDLE_FLUSH_S = 11.0  # PGSTAT_IDLE_INTERVAL (10 s): by then an idle backend has flushed what it held back


class PgWatch:
    """The router's database seen from a connection to the server's own database: counters, and the server's CPU."""

    def __init__(self, connection: Any, database: str, postmaster: int) -> None:
        self.connection = connection
        self.database = database
        self.postmaster = postmaster

    async def counters(self) -> tuple[int, int, int]:
        """pg_stat_database's (xact_commit, xact_rollback, sessions) for the database, as flushed so far."""
        await self.connection.execute("SELECT pg_stat_clear_snapshot()")
        query = "SELECT xact_commit, xact_rollback, sessions FROM pg_stat_database WHERE datname = $1"
        row = await self.connection.fetchrow(query, self.database)
        return int(row[0]), int(row[1]), int(row[2])

    def server_cpu(self) -> float | None:
        """CPU seconds so far of the whole server: the postmaster, its live children (backends, WAL writer...)
        and, through the postmaster's cutime/cstime, the backends that exited.  None unless the server is local."""
        try:
            fields = proc_stat(self.postmaster)
        except OSError:
            return None
        total = sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
        for pid in children(self.postmaster):
            try:
                total += cpu_seconds(pid)
            except (OSError, IndexError):
                pass  # exited meanwhile: counted in the postmaster's cutime from now on
        return total

    async def until_no_backends(self) -> None:
        """Wait until every backend of the database has exited: each flushes its counters as it goes."""
        deadline = time.monotonic() + STOP_S
        while time.monotonic() < deadline:
            if not await self.connection.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", self.database):
                return
            await asyncio.sleep(0.05)  # a backend's exit sends no event


@asynccontextmanager
async def pg_watch(server: URL, database: str) -> AsyncIterator[PgWatch]:
    connection = await asyncpg.connect(asyncpg_dsn(server))
    try:
        backend = int(await connection.fetchval("SELECT pg_backend_pid()"))
        try:
            postmaster = int(proc_stat(backend)[1])
        except OSError:
            postmaster = -1  # the server is not on this machine
        yield PgWatch(connection, database, postmaster)
    finally:
        await connection.close()


async def server_version(server: URL) -> str:
    connection = await asyncpg.connect(asyncpg_dsn(server))
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


# --- one setup ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    label: str
    router_replicas: int = 1
    router_db: str = "home"  # "home": SQLite in the router's home; "file": one SQLite file; "postgres"
    client_workers: int = 0  # 0: `emulator node`; N: gunicorn with N workers
    client_shared: bool = False  # `emulator node --shared` for the client node


@dataclass
class DbFigures:
    """What the router's PostgreSQL database did over the load."""

    commits: int
    rollbacks: int
    sessions: int  # connections opened
    cpu: float | None  # seconds, the whole server (None unless it runs on this machine)


@dataclass
class Result:
    jobs: int
    errors: int
    seconds: float
    cpu: dict[str, float]  # node name -> CPU seconds over the load
    db: DbFigures | None = None  # PostgreSQL setups only
    error_sample: str | None = None

    def per_job(self, value: float) -> float:
        return value / max(self.jobs, 1)


@dataclass
class Network:
    router: list[Proc]
    driver: Proc
    client: Proc
    homes: dict[str, Path] = field(default_factory=dict)

    def procs(self, name: str) -> list[Proc]:
        return {ROUTER: self.router, DRIVER: [self.driver], CLIENT: [self.client]}[name]


def write_peers(lab: Lab, ports: dict[str, list[int]]) -> Path:
    """The directory file: each name's URLs and the public key made in its home beforehand."""
    directory = lab.root / "directory.json"
    peers = {
        name: Peer(tuple(f"http://127.0.0.1:{port}" for port in ports_of_name), public_key(lab.root / name))
        for name, ports_of_name in ports.items()
    }
    write_directory(directory, peers)
    return directory


def public_key(home: Path) -> str:
    """The node's public key, its key pair made in its home now if it has none yet (as a node does at boot)."""
    return NodeKey.load_or_create(Home(home).key_file).public_key


def node_args(name: str, port: int, home: Path, directory: Path, flags: list[str]) -> list[str]:
    where = ["--port", str(port), "--home", str(home), "--directory", str(directory)]
    return ["emulator.cli", "node", "--name", name, *where, *flags]


def gunicorn_args(port: int, workers: int) -> list[str]:
    return [
        "gunicorn", "llm_provider.gunicorn:create_app", "--worker-class", "aiohttp.GunicornWebWorker",
        "--workers", str(workers), "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
    ]


def router_flags(setup: Setup, lab: Lab, database: URL | None) -> list[str]:
    if setup.router_db == "postgres":
        assert database is not None
        shared = ["--shared"] if setup.router_replicas > 1 else []
        return ["--database-url", database.render_as_string(hide_password=False), *shared]
    if setup.router_db == "file":
        return ["--database-url", f"sqlite+aiosqlite:///{lab.root / 'router.db'}", "--shared"]
    return ["--shared"] if setup.router_replicas > 1 else []


async def start_network(http: aiohttp.ClientSession, lab: Lab, setup: Setup, database: URL | None) -> Network:
    """Start the router (replica 1 first: it makes the database's tables), then the driver and the client node."""
    ports = {ROUTER: [lab.port() for _ in range(setup.router_replicas)], DRIVER: [lab.port()], CLIENT: [lab.port()]}
    directory = write_peers(lab, ports)
    homes = {name: lab.root / name for name in ports}
    flags = router_flags(setup, lab, database)

    def router(replica: int) -> Proc:
        port = ports[ROUTER][replica - 1]
        return lab.spawn(f"{ROUTER}#{replica}", port, node_args(ROUTER, port, homes[ROUTER], directory, flags))

    replicas = [router(1)]
    await wait_ready(http, replicas[0])
    replicas += [router(replica) for replica in range(2, setup.router_replicas + 1)]
    driver = lab.spawn(DRIVER, ports[DRIVER][0], node_args(DRIVER, ports[DRIVER][0], homes[DRIVER], directory, []))
    client = start_client(lab, setup, ports[CLIENT][0], homes[CLIENT], directory)
    await asyncio.gather(*(wait_ready(http, proc) for proc in [*replicas[1:], driver, client]))
    return Network(router=replicas, driver=driver, client=client, homes=homes)


def start_client(lab: Lab, setup: Setup, port: int, home: Path, directory: Path) -> Proc:
    if not setup.client_workers:
        return lab.spawn(CLIENT, port, node_args(CLIENT, port, home, directory, ["--shared"] if setup.client_shared else []))
    env = {**os.environ, "LLMP_NAME": CLIENT, "LLMP_HOME": str(home), "LLMP_PORT": str(port), "LLMP_DIRECTORY": str(directory)}
    return lab.spawn(CLIENT, port, gunicorn_args(port, setup.client_workers), env)


async def admin(net: Network, name: str, message: Any, process: str | None = None) -> None:
    await send_admin(net.procs(name)[0].url, Home(net.homes[name]).admin_token(), message, process)


async def wire(net: Network, llm: str) -> None:
    await admin(net, ROUTER, "StartRouter")
    await admin(net, DRIVER, {"SetRouter": {"node": ROUTER}})
    await admin(net, DRIVER, {"RegisterOaiProviderEndpoint": {"endpoint": llm}}, "openai")
    await admin(net, DRIVER, {"SetLocalDriver": {"model": MODEL, "is_public": True, "capacity": CLIENTS}})
    await admin(net, CLIENT, {"SetRouter": {"node": ROUTER}})


# --- load ---------------------------------------------------------------------------------------------


async def complete(http: aiohttp.ClientSession, url: str) -> None:
    """One non-streaming chat completion; raises unless it answers 200 with content."""
    async with http.post(url + "/v1/chat/completions", json=BODY) as response:
        text = await response.text()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {text[:200]}")
    if not json.loads(text)["choices"][0]["message"]["content"]:
        raise RuntimeError(f"no content: {text[:200]}")


@dataclass
class Tally:
    jobs: int = 0
    errors: int = 0
    sample: str | None = None


async def one_client(http: aiohttp.ClientSession, url: str, deadline: float, tally: Tally) -> None:
    while time.perf_counter() < deadline:
        try:
            await complete(http, url)
            tally.jobs += 1
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError, LookupError, TypeError) as error:
            tally.errors += 1  # the first is kept, to show
            tally.sample = tally.sample or f"{type(error).__name__}: {error}"


async def load(url: str, seconds: float) -> tuple[Tally, float]:
    """CLIENTS concurrent clients for `seconds`; the tally and the time it took to finish."""
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one_client(http, url, started + seconds, tally) for _ in range(CLIENTS)))
        return tally, time.perf_counter() - started


def node_cpu(net: Network) -> dict[str, float]:
    return {name: group_cpu(net.procs(name)) for name in (ROUTER, DRIVER, CLIENT)}


async def measure(setup: Setup, llm: str, server: URL | None, seconds: float) -> Result:
    """Start the setup's network, check one job, load it for `seconds`, read the counters, stop everything."""
    async with AsyncExitStack() as stack:
        database = await stack.enter_async_context(fresh_database(server)) if setup.router_db == "postgres" and server else None
        watch = await stack.enter_async_context(pg_watch(server, database.database or "")) if server and database else None
        lab = Lab(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmp-scale-"))))
        stack.callback(lab.kill_all)
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
        net = await start_network(http, lab, setup, database)
        await wire(net, llm)
        await complete(http, net.client.url)  # the network answers before it is timed
        result = await timed_load(net, watch, seconds)
    return result


async def timed_load(net: Network, watch: PgWatch | None, seconds: float) -> Result:
    """The load and what it cost; with a database to watch, the router is stopped at the end to read its counters."""
    if watch is not None:
        await asyncio.sleep(IDLE_FLUSH_S)  # what the backends held back from the setup is counted before the load
        counted, server_before = await watch.counters(), watch.server_cpu()
    before = node_cpu(net)
    tally, elapsed = await load(net.client.url, seconds)
    after = node_cpu(net)
    cpu = {name: after[name] - before[name] for name in after}
    result = Result(tally.jobs, tally.errors, elapsed, cpu, error_sample=tally.sample)
    if watch is not None:
        server_after = watch.server_cpu()
        await stop(net.router)
        await watch.until_no_backends()
        commits, rollbacks, sessions = (now - then for now, then in zip(await watch.counters(), counted))
        server = server_after - server_before if server_after is not None and server_before is not None else None
        result.db = DbFigures(commits=commits, rollbacks=rollbacks, sessions=sessions, cpu=server)
    return result


# --- the fake LLM -------------------------------------------------------------------------------------


# --- report -------------------------------------------------------------------------------------------


ROUTER_SETUPS = [
    Setup("1 process, SQLite (its home)"),
    Setup("1 process, PostgreSQL", router_db="postgres"),
    Setup("2 replicas (--shared), one PostgreSQL database", router_replicas=2, router_db="postgres"),
    Setup("2 replicas (--shared), one SQLite file", router_replicas=2, router_db="file"),
]
CLIENT_SETUPS = [
    Setup("1 process (`emulator node`)"),  # the same network as the first router setup: measured once
    Setup("1 process, --shared", client_shared=True),
    Setup("gunicorn, 2 workers (always shared)", client_workers=2),
]


def cpu_cells(result: Result) -> list[str]:
    return [ms(result.per_job(result.cpu[name])) for name in (ROUTER, DRIVER, CLIENT)]


def base_cells(result: Result) -> list[str]:
    return [f"{result.jobs / result.seconds:,.0f}", str(result.errors)]


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def router_table(results: dict[Setup, Result | None]) -> None:
    rows = []
    for setup, result in results.items():
        if result is None:
            rows.append([setup.label, "skipped", *[""] * 8])
            continue
        rows.append([setup.label, *base_cells(result), *cpu_cells(result), *db_cells(result)])
    columns = ["router", "jobs/s", "errors", "CPU ms/job router", "driver", "client node", "PG server CPU ms/job",
               "PG commits/job", "rollbacks/job", "connections opened/job"]
    table(columns, rows)


def db_cells(result: Result) -> list[str]:
    if result.db is None:
        return ["–", "–", "–", "–"]
    db = result.db
    cpu = ms(result.per_job(db.cpu)) if db.cpu is not None else "?"
    return [cpu, *(f"{result.per_job(count):.2f}" for count in (db.commits, db.rollbacks, db.sessions))]


def client_table(results: dict[Setup, Result]) -> None:
    rows = [[setup.label, *base_cells(result), *cpu_cells(result)[::-1]] for setup, result in results.items()]
    table(["client node (SQLite; router 1 process)", "jobs/s", "errors", "CPU ms/job client node", "driver", "router"], rows)


def header(seconds: float, pg_version: str | None) -> str:
    pg = f"PostgreSQL {pg_version}" if pg_version else "no PostgreSQL"
    return (
        f"{datetime.datetime.now().isoformat(timespec='minutes')} · {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, {pg} · {seconds:g} s of load per setup"
    )


def notes(results: list[Result | None]) -> None:
    print(
        f"{CLIENTS} concurrent clients post non-streaming /v1/chat/completions (max_tokens 4) to the client node, a "
        "fresh network of real processes per row; every node, the fake LLM, PostgreSQL and the load generator share "
        "the machine's cores.  CPU ms/job sums each node's processes (both replicas; gunicorn's master and workers); "
        "PG server: every PostgreSQL process, exited backends included (anything else the server did meanwhile too).  "
        "PG commits, rollbacks and connections opened: pg_stat_database of the router's database (xact_commit, "
        "xact_rollback, sessions), read after 11 s idle before the load and again once the router's processes had "
        "exited, since a backend flushes its counters at exit and holds up to 10 s of them back before "
        "(pg_stat_force_next_flush() would flush only the reader's own)."
    )
    for sample in sorted({r.error_sample for r in results if r is not None and r.error_sample}):
        print(f"\nfirst error seen: {sample}")


# --- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="seconds of load per setup (default 8, or 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="~3 s of load per setup")
    parser.add_argument(
        "--postgres-url", default=os.environ.get("LLMP_TEST_POSTGRES_URL"),
        help="SQLAlchemy URL of a PostgreSQL server whose role may CREATE DATABASE (default: $LLMP_TEST_POSTGRES_URL)",
    )
    args = parser.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 8.0)
    return args


async def run_all(args: argparse.Namespace) -> None:
    server = make_url(args.postgres_url) if args.postgres_url else None
    pg_version = await server_version(server) if server else None
    measured: dict[Setup, Result] = {}
    async with fake_llm(free_port(set()), "--ttft", "0", "--tps", "0", "--tokens", "4") as llm:
        for setup in [*ROUTER_SETUPS, *CLIENT_SETUPS[1:]]:
            if setup.router_db == "postgres" and server is None:
                continue
            print(f"measuring: {setup.label} ...", file=sys.stderr, flush=True)
            measured[setup] = await measure(setup, llm, server, args.seconds)
    print(f"## Scaling out\n\n{header(args.seconds, pg_version)}\n")
    if server is None:
        print("No PostgreSQL server (--postgres-url or LLMP_TEST_POSTGRES_URL): its rows are skipped.\n")
    router_table({setup: measured.get(setup) for setup in ROUTER_SETUPS})
    client_table({setup: measured[ROUTER_SETUPS[0] if setup is CLIENT_SETUPS[0] else setup] for setup in CLIENT_SETUPS})
    notes(list(measured.values()))


async def main() -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # clean up on SIGTERM as on errors
    await run_all(parse_args())


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.exit("interrupted: the processes it started were killed, its databases dropped")
