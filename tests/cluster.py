"""Real node and fake-LLM processes for a test, and what the process tests read besides job streams
(those are tests/streams.py's, with its bound `STEP_S`).

Every node and every fake LLM is its own process (`python -m emulator.cli node|fake-llm`), started in a
session of its own so teardown can kill its whole process group, even when the test fails.  Nodes find each
other through one directory file written before any of them starts.  Each step awaits an HTTP answer, an
SSE event or a process exit, under a bound (asyncio.timeout) so that a hang fails the test instead of
stalling the run.  The only polling is GET /healthz, since nothing else tells when a port opens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from emulator.client import send_admin
from llm_provider.directory import Peer, write_directory
from llm_provider.homes import Home
from llm_provider.signing import NodeKey
from tests.hosts import free_port
from tests.processes import kill_group, wait_healthy
from tests.streams import STEP_S
from tests.upstreams import MODEL

REPO = Path(__file__).resolve().parents[1]
ROUTER, DRIVER, CLIENT, DRIVER2 = "fake.dev", "fake2.dev", "fake3.dev", "fake4.dev"
NAMES = (ROUTER, DRIVER, CLIENT, DRIVER2)
FINAL = {"succeeded", "failed", "timed_out", "cancelled"}

READY_S = 20.0  # a process must answer /healthz within this


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    args: list[str]  # after `python -m`: `emulator.cli node ...`, or gunicorn's
    port: int
    output: Path
    home: Path | None = None
    env: dict[str, str] | None = None
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def marker(self) -> str:
        """What its command line names while it is the process we started: the module run and its first argument."""
        return " ".join(self.args[:2])

    @property
    def database(self) -> Path:
        """A node's SQLite file (a fake LLM has no home, hence none)."""
        assert self.home is not None, f"{self.name} has no home"
        return Home(self.home).database

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def admin(self, message: Any, process: str | None = None) -> dict[str, Any]:
        assert self.home is not None
        return await send_admin(self.url, Home(self.home).admin_token(), message, process)


class Cluster:
    """Node and fake-LLM processes for one test; `close()` kills every one still alive."""

    def __init__(self, root: Path, http: aiohttp.ClientSession, replicas: dict[str, int] | None = None) -> None:
        """`replicas`: how many processes serve a node name on ports of their own (default one)."""
        self.root = root
        self.http = http
        self.procs: dict[str, Proc] = {}
        taken: set[int] = set()
        self.replica_ports = {name: [self._fresh_port(taken) for _ in range((replicas or {}).get(name, 1))] for name in NAMES}
        self.ports = {name: ports[0] for name, ports in self.replica_ports.items()}
        # Each node's key pair is made in its home before any node starts, so the directory carries every public key.
        self.directory = root / "directory.json"
        write_directory(
            self.directory,
            {
                name: Peer(tuple(f"http://127.0.0.1:{port}" for port in ports), NodeKey.load_or_create(Home(root / name).key_file).public_key)
                for name, ports in self.replica_ports.items()
            },
        )
        self._taken = taken

    @staticmethod
    def _fresh_port(taken: set[int]) -> int:
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        return port

    # starting and stopping

    async def llm(self, name: str = "llm", *, ttft: float = 0.0, tps: float = 0.0, tokens: int = 24) -> str:
        """Start a fake LLM process; its OpenAI base URL."""
        port = self._fresh_port(self._taken)
        args = ["emulator.cli", "fake-llm", "--port", str(port), "--ttft", f"{ttft:g}", "--tps", f"{tps:g}", "--tokens", str(tokens)]
        proc = Proc(name=name, args=args, port=port, output=self.root / f"{name}.out")
        self.procs[name] = proc
        await self._spawn(proc)
        return f"{proc.url}/v1"

    async def node(self, name: str, *flags: str, replica: int = 1) -> Proc:
        """Start node `name` (a fresh home the first time) with extra `emulator node` flags; replica 2 and on
        are further processes of the same name, home and key, each on a port of its own (`{name}#{replica}`)."""
        home, port = self.root / name, self.replica_ports[name][replica - 1]
        args = ["emulator.cli", "node", "--name", name, "--port", str(port), "--home", str(home), "--directory", str(self.directory), *flags]
        key = name if replica == 1 else f"{name}#{replica}"
        proc = Proc(name=key, args=args, port=port, output=self.root / f"{key}.out", home=home)
        self.procs[key] = proc
        await self._spawn(proc)
        return proc

    async def gunicorn_node(self, name: str, workers: int, **environ: str) -> Proc:
        """Start node `name` as gunicorn with aiohttp's worker, `workers` processes sharing its home's database."""
        args = [
            "gunicorn", "llm_provider.gunicorn:create_app", "--worker-class", "aiohttp.GunicornWebWorker",
            "--workers", str(workers), "--bind", f"127.0.0.1:{self.ports[name]}", "--graceful-timeout", "5",
        ]
        return await self._server_node(name, args, environ)

    async def uvicorn_node(self, name: str, workers: int, **environ: str) -> Proc:
        """Start node `name` as the ASGI app under uvicorn, `workers` processes sharing its home's database."""
        args = [
            "uvicorn", "llm_provider.asgi:create_app", "--factory", "--workers", str(workers),
            "--host", "127.0.0.1", "--port", str(self.ports[name]), "--timeout-graceful-shutdown", "5",
        ]
        return await self._server_node(name, args, {"LLMP_SHARED": "1", **environ})

    async def _server_node(self, name: str, args: list[str], environ: dict[str, str]) -> Proc:
        """A node run by a web server's own command line, configured through LLMP_* variables."""
        home, port = self.root / name, self.ports[name]
        env = {**os.environ, "LLMP_NAME": name, "LLMP_HOME": str(home), "LLMP_PORT": str(port), "LLMP_DIRECTORY": str(self.directory), **environ}
        proc = Proc(name=name, args=args, port=port, output=self.root / f"{name}.out", home=home, env=env)
        self.procs[name] = proc
        await self._spawn(proc)
        return proc

    async def restart(self, name: str) -> Proc:
        """Start `name` again: same command, same home, same port."""
        proc = self.procs[name]
        assert not proc.alive(), f"{name} is still running"
        await self._spawn(proc)
        return proc

    async def kill9(self, name: str) -> int:
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        return await self.exited(name)

    def freeze(self, name: str) -> None:
        """SIGSTOP: the process keeps its sockets (the kernel still accepts connections) and answers nothing."""
        os.killpg(self.procs[name].pid, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGCONT)

    async def exited(self, name: str, bound: float = STEP_S) -> int:
        proc = self.procs[name]
        assert proc.process is not None
        async with asyncio.timeout(bound):
            return await proc.process.wait()

    async def _spawn(self, proc: Proc) -> None:
        with proc.output.open("ab") as out:
            proc.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", *proc.args,
                cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, env=proc.env,
            )
        await self._ready(proc)

    async def _ready(self, proc: Proc) -> None:
        process = proc.process
        assert process is not None
        try:
            await wait_healthy(self.http, proc.url, lambda: process.returncode, timeout=READY_S)
        except AssertionError as error:
            raise AssertionError(f"{proc.name} never became ready: {error!r}\n{self.output_of(proc.name)}") from error

    def output_of(self, name: str) -> str:
        proc = self.procs[name]
        parts = [proc.output.read_text(errors="replace")[-4000:] if proc.output.exists() else ""]
        if proc.home is not None and Home(proc.home).log_file.exists():
            parts.append(Home(proc.home).log_file.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.alive():
                kill_group(proc.pid, proc.marker)
        for proc in self.procs.values():
            if proc.process is not None and proc.process.returncode is None:
                try:
                    async with asyncio.timeout(STEP_S):
                        await proc.process.wait()
                except TimeoutError:
                    pass

    # the seed's network

    async def network(
        self,
        *,
        llm: dict[str, Any] | None = None,
        llm_url: str | None = None,
        drivers: tuple[str, ...] = (DRIVER,),
        capacity: int = 1,
        client_flags: tuple[str, ...] = (),
        driver_flags: tuple[str, ...] = (),
        router: bool = True,
        client: bool = True,
    ) -> dict[str, Proc]:
        """A fake LLM (or the one at `llm_url`), the router fake.dev, driver(s) serving llama3 from it, the
        client fake3.dev; wired."""
        llm_url = llm_url or await self.llm(**(llm or {}))
        names = ([ROUTER] if router else []) + list(drivers) + ([CLIENT] if client else [])
        flags = {name: (driver_flags if name in drivers else client_flags if name == CLIENT else ()) for name in names}
        started = await asyncio.gather(*(self.node(name, *flags[name]) for name in names))
        nodes = {proc.name: proc for proc in started}
        if router:
            await nodes[ROUTER].admin("StartRouter")
        for name in drivers:
            if router:
                await nodes[name].admin({"SetRouter": {"node": ROUTER}})
            await nodes[name].admin({"RegisterOaiProviderEndpoint": {"endpoint": llm_url}}, "openai")
            await nodes[name].admin({"SetLocalDriver": {"model": MODEL, "is_public": True, "capacity": capacity}})
        if client:
            await nodes[CLIENT].admin({"SetRouter": {"node": ROUTER}})
        return nodes


# --- records, bodies, rows ---------------------------------------------------------------------


async def record(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    async with asyncio.timeout(STEP_S):
        async with http.get(f"{url}/jobs/{job_id}") as response:
            text = await response.text()
    assert response.status == 200, text
    body: dict[str, Any] = json.loads(text)
    return body


def job_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, **extra}


def db_row(database: Path, sql: str, *params: Any) -> tuple[Any, ...] | None:
    """One row from a node's SQLite file, read while the node runs (WAL lets readers in)."""
    connection = sqlite3.connect(database, timeout=STEP_S)
    try:
        row: tuple[Any, ...] | None = connection.execute(sql, params).fetchone()
        return row
    finally:
        connection.close()
