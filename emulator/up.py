"""`emulator up`: a whole network on one machine, one OS process per node, wired like the seed.

Node 1 (fake.dev) routes; node 2 (fake2.dev) drives an LLM serving `llama3`; node 3 (fake3.dev)
is a client of the router; nodes 4 and up are more drivers on the same LLM.
"""

from __future__ import annotations

import asyncio
import ctypes
import shlex
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from emulator.client import CommandError, send_admin, ui_login
from emulator.directory import Peer, write_directory
from emulator.homes import Home, default_root
from emulator.logs import LogFormat
from emulator.node import JobLimits
from emulator.signing import NodeKey

STARTUP_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0


@dataclass
class UpOptions:
    nodes: int
    base_port: int
    root: Path
    llm: str | None
    llm_port: int
    ttft: float
    tps: float
    model: str
    wire: bool
    fresh: bool
    verbose: bool
    limits: JobLimits
    log_format: LogFormat = LogFormat.TEXT


@dataclass
class NodePlan:
    index: int
    name: str
    port: int
    home: Home
    role: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def node_name(index: int) -> str:
    return "fake.dev" if index == 1 else f"fake{index}.dev"


def role_of(index: int, total: int) -> str:
    if total == 1:
        return "router + driver"
    if index == 1:
        return "router"
    if index == 3:
        return "client"
    return "driver"


def plan(options: UpOptions) -> list[NodePlan]:
    return [
        NodePlan(i, node_name(i), options.base_port + i - 1, Home(options.root / node_name(i)), role_of(i, options.nodes))
        for i in range(1, options.nodes + 1)
    ]


def node_command(node: NodePlan, options: UpOptions) -> list[str]:
    command = ["--name", node.name, "--port", str(node.port), "--home", str(node.home.path)]
    command += ["--directory", str(options.root / "directory.json"), *options.limits.flags()]
    if options.log_format is not LogFormat.TEXT:
        command += ["--log-format", options.log_format.value]
    return ["emulator", "node", *command] + (["--verbose"] if options.verbose else [])


def _argv(command: list[str]) -> list[str]:
    """Run our own CLI with this interpreter, whatever is on PATH."""
    return [sys.executable, "-m", "emulator.cli", *command[1:]]


async def _wait_healthy(session: aiohttp.ClientSession, name: str, url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
    while asyncio.get_running_loop().time() < deadline:
        if process.returncode is not None:
            raise CommandError(f"{name} exited with code {process.returncode} while starting; see {log}")
        try:
            async with session.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.05)  # polling a port that is not open yet: there is no event to await
    raise CommandError(f"{name} did not answer at {url} within {STARTUP_TIMEOUT_S:.0f} s; see {log}")


def _check_ports_free(ports: dict[int, str]) -> None:
    for port, owner in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as error:
                raise CommandError(f"port {port} ({owner}) is taken: {error.strerror}; stop what uses it or pick --base-port") from error


def _die_with_parent() -> None:
    """Children get SIGTERM when `up` dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wiring(nodes: list[NodePlan], llm: str, model: str) -> list[tuple[NodePlan, Any]]:
    router = nodes[0].name
    steps: list[tuple[NodePlan, Any]] = [(nodes[0], "StartRouter")]
    for node in nodes:
        steps.append((node, {"SetRouter": {"node": router}}))
        if node.role in ("driver", "router + driver"):
            steps.append((node, {"RegisterOaiProviderEndpoint": {"endpoint": llm}}))
            steps.append((node, {"SetLocalDriver": {"model": model, "is_public": True}}))
    return steps


def _print_table(nodes: list[NodePlan], options: UpOptions, llm: str, llm_command: str | None, logins: dict[str, str]) -> None:
    rows = [("NAME", "ROLE", "URL", "HOME", "LOG")] + [
        (n.name, n.role, n.url, str(n.home.path), str(n.home.log_file)) for n in nodes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\nLLM: {llm}" + (f"  (embedded fake: {llm_command})" if llm_command else ""))
    print("\nStart a node by hand (same home, same port):")
    for node in nodes:
        print("  " + shlex.join(node_command(node, options)))
    client = next((n for n in nodes if n.role == "client"), nodes[-1])
    print("\nTry:")
    print(f"  emulator run-job -p {client.port} {options.model} How much wood could a woodchuck chuck? Be concise.")
    print(f"  curl -N {client.url}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{options.model}\", \"stream\": true, \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'")
    print(f"  curl {client.url}/v1/models")
    root = "" if options.root == default_root() else f" --root {shlex.quote(str(options.root))}"
    print(f"  emulator usage -p {nodes[0].port}{root}    # who used what, as the router counted it")
    print(f"  emulator logs {nodes[0].name} -f{root}    # follow a node's log (--log-format json: with job and trace ids)")
    print("\nWeb pages (open as they are on this machine; a login URL lets one browser in from elsewhere, once, within 10 minutes):")
    width = max(len(n.name) for n in nodes)
    for node in nodes:
        print(f"  {node.name.ljust(width)}  {node.url}/ui  login: {node.url}{logins[node.name]}")
    print("\nCtrl-C stops every process started here.", flush=True)


async def up(options: UpOptions) -> int:
    if options.fresh and options.root.exists():
        shutil.rmtree(options.root)
    options.root.mkdir(parents=True, exist_ok=True)
    nodes = plan(options)
    ports = {n.port: n.name for n in nodes} | ({} if options.llm else {options.llm_port: "the fake LLM"})
    _check_ports_free(ports)
    # Keys are made before the nodes start, so the directory can carry every public key.
    keys = {n.name: NodeKey.load_or_create(n.home.key_file).public_key for n in nodes}
    write_directory(options.root / "directory.json", {n.name: Peer.at(n.url, keys[n.name]) for n in nodes})
    processes: dict[str, asyncio.subprocess.Process] = {}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    try:
        llm, llm_command = options.llm, None
        async with aiohttp.ClientSession() as session:
            if llm is None:
                llm_args = ["emulator", "fake-llm", "--port", str(options.llm_port), "--ttft", str(options.ttft), "--tps", str(options.tps)]
                llm_command = shlex.join(llm_args)
                log_path = options.root / "fake-llm.log"
                with log_path.open("ab") as log:
                    processes["fake-llm"] = await asyncio.create_subprocess_exec(
                        *_argv(llm_args), stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_parent
                    )
                llm_root = f"http://127.0.0.1:{options.llm_port}"
                await _wait_healthy(session, "the fake LLM", llm_root, processes["fake-llm"], log_path)
                llm = llm_root + "/v1"
            for node in nodes:
                node.home.path.mkdir(parents=True, exist_ok=True)
                with node.home.log_file.open("ab") as log:
                    processes[node.name] = await asyncio.create_subprocess_exec(
                        *_argv(node_command(node, options)), stdout=log, stderr=log, start_new_session=True,
                        preexec_fn=_die_with_parent,
                    )
            for node in nodes:
                await _wait_healthy(session, node.name, node.url, processes[node.name], node.home.log_file)
            if options.wire:
                for node, message in _wiring(nodes, llm, options.model):
                    await send_admin(node.url, node.home.admin_token(), message)
            logins = {node.name: (await ui_login(node.url, node.home.admin_token())).path for node in nodes}
        _print_table(nodes, options, llm, llm_command, logins)
        print("ready", flush=True)
        await _supervise(processes, nodes, options, stop)
        return 0
    finally:
        await _stop_all(processes)


async def _supervise(
    processes: dict[str, asyncio.subprocess.Process], nodes: list[NodePlan], options: UpOptions, stop: asyncio.Event
) -> None:
    by_name = {n.name: n for n in nodes}
    waits = {asyncio.ensure_future(p.wait()): name for name, p in processes.items()}
    stopping = asyncio.ensure_future(stop.wait())
    while waits:
        done, _ = await asyncio.wait([*waits, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            break
        for finished in done:
            name = waits.pop(finished)
            print(f"\n!! {name} exited with code {processes[name].returncode}; the others keep running.", flush=True)
            if name in by_name:
                print(f"   start it again with: {shlex.join(node_command(by_name[name], options))}", flush=True)
    for pending in waits:
        pending.cancel()
    stopping.cancel()


async def _stop_all(processes: dict[str, asyncio.subprocess.Process]) -> None:
    running = [p for p in processes.values() if p.returncode is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), STOP_GRACE_S)
    except TimeoutError:
        for process in running:
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*(p.wait() for p in running))
    print("stopped all processes", flush=True)
