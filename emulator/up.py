"""`emulator up`: a whole network on one machine, one OS process per node, wired like the seed.

Node 1 (fake.dev) routes; node 2 (fake2.dev) drives an LLM serving `llama3`; node 3 (fake3.dev)
is a client of the router; nodes 4 and up are more drivers on the same LLM.
"""

from __future__ import annotations

import asyncio
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
from emulator.supervise import Supervisor, Watched
from handlers.settings import Settings
from llm_provider import settings as node_settings
from llm_provider.directory import Peer, write_directory
from llm_provider.homes import Home, default_root
from llm_provider.log_format import LogFormat
from llm_provider.signing import NodeKey

STARTUP_TIMEOUT_S = 30.0


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
    settings: Settings
    log_format: LogFormat = LogFormat.TEXT
    restart: bool = False  # start a node whose process exited again, by itself


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
    command += ["--directory", str(options.root / "directory.json"), *node_settings.as_flags(options.settings, otherwise=node_settings.load())]
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
    if options.restart:
        print("\nA node whose process exits is started again (--restart).")
    print("\nCtrl-C stops every node of the network, those started again by hand too.", flush=True)


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
    supervisor = Supervisor([], options.restart)
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
                fake = Watched(name="the fake LLM", argv=_argv(llm_args), log=options.root / "fake-llm.log")
                supervisor.watched.append(fake)
                process = await supervisor.start(fake)
                llm_root = f"http://127.0.0.1:{options.llm_port}"
                await _wait_healthy(session, "the fake LLM", llm_root, process, fake.log)
                llm = llm_root + "/v1"
            started = []
            for node in nodes:
                command = node_command(node, options)
                item = Watched(name=node.name, argv=_argv(command), log=node.home.log_file, home=node.home, hand_command=shlex.join(command))
                supervisor.watched.append(item)
                started.append(await supervisor.start(item))
            for node, process in zip(nodes, started):
                await _wait_healthy(session, node.name, node.url, process, node.home.log_file)
            if options.wire:
                for node, message in _wiring(nodes, llm, options.model):
                    await send_admin(node.url, node.home.admin_token(), message)
            logins = {node.name: (await ui_login(node.url, node.home.admin_token())).path for node in nodes}
        _print_table(nodes, options, llm, llm_command, logins)
        print("ready", flush=True)
        return await supervisor.watch(stop)
    finally:
        await supervisor.stop_all()
