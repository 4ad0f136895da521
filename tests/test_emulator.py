"""The `emulator` command end to end: real processes from the installed console script, real HTTP on loopback.

Every process a test starts is killed in teardown, by its id, even when the test fails: the `up` process
(its own session) and the node and fake-LLM processes it spawned (each in a session of its own, so they
are found as `up`'s children, or by command lines naming the test's root or fake-LLM port once `up` is
gone, and killed one by one), and any node started by hand.  Nothing sleeps to synchronise: tests wait
for `up`'s `ready` line and other lines it prints, for processes to exit, and poll /healthz only where a
port opening has no event to wait on.  Every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest

from tests.helpers import get_json
from tests.hosts import free_port
from tests.processes import (
    EMULATOR,
    TIMEOUT_S,
    WOODCHUCK,
    RunningUp,
    is_listening,
    is_running,
    kill_group,
    pick_ports,
    run_cli,
    start_up,
    started_for,
    summary_of,
    wait_gone,
    wait_healthy,
)
from tests.streams import job_updates
from tests.upstreams import MODEL

WEB_PAGE_ROW = re.compile(r"^\s+(fake\d*\.dev)\s+(http://\S+/ui)\s+login: (http://\S+/ui/login\?token=\S+)$")
TABLE_ROW = re.compile(
    r"^(?P<name>fake\d*\.dev)\s+(?P<role>router \+ driver|router|driver|client)\s+(?P<url>http://\S+)\s+(?P<home>\S+)\s+(?P<log>\S+)$"
)


@dataclass(kw_only=True)
class Up(RunningUp):
    """A running `emulator up` with its fake LLM on `llm_port`; `table` is what it printed before `ready`."""

    llm_port: int
    nodes: int
    table: list[str] = field(default_factory=list)

    def wait_exit(self, timeout: float = TIMEOUT_S) -> int:
        code = self.proc.wait(timeout=timeout)
        self.expect_end()
        return code

    def expect_end(self) -> None:
        """Every line `up` printed is in `output` once this returns."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if self.lines.get(timeout=max(0.0, deadline - time.monotonic())) is None:
                self.lines.put(None)
                return
        raise AssertionError("the output of `emulator up` did not end")

    def home(self, name: str) -> Path:
        return self.root / name

    def pid_of(self, name: str) -> int:
        return int(json.loads((self.home(name) / "node.json").read_text())["pid"])


class Processes:
    """What a test started; all of it is killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ups: list[Up] = []
        self.others: list[subprocess.Popen[Any]] = []

    def up(self, nodes: int = 3, *extra: str, ready: bool = True, ports: tuple[int, int] | None = None) -> Up:
        base, llm_port = ports or pick_ports(nodes)
        root = self.tmp_path / f"net{len(self.ups) + 1}"
        proc = start_up(root, base, nodes, "--llm-port", str(llm_port), *extra)
        running = Up(proc=proc, root=root, base=base, llm_port=llm_port, nodes=nodes)
        self.ups.append(running)
        if ready:
            running.table = running.wait_ready()
        return running

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        self.others.append(proc)
        return proc

    def kill_all(self) -> None:
        for running in self.ups:
            running.kill()
        for proc in self.others:
            kill_group(proc.pid)
            proc.wait(timeout=TIMEOUT_S)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


async def cli(up: Up, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(up.cli, *args, timeout=timeout)


def assert_job_ran(result: subprocess.CompletedProcess[str], driver: str) -> tuple[str, str]:
    """A run-job that succeeded on `driver`: its answer and job id."""
    assert result.returncode == 0, f"run-job failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    answer, summary = summary_of(result)
    assert answer.strip(), f"run-job printed no answer:\n{result.stdout}"
    assert summary["status"] == "succeeded", summary.string
    assert summary["driver"] == driver, summary.string
    assert summary["ttft"] != "-", summary.string
    return answer, summary["job_id"]


def assert_readable_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, f"expected a failure:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("emulator: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle.lower() in result.stderr.lower(), result.stderr


def table_rows(up: Up) -> list[tuple[str, ...]]:
    return [tuple(m.groups()) for line in up.table if (m := TABLE_ROW.match(line))]


def hand_commands(up: Up) -> dict[str, list[str]]:
    """The `emulator node ...` lines of the table, by node name."""
    commands: dict[str, list[str]] = {}
    for line in up.table:
        if line.strip().startswith("emulator node "):
            argv = shlex.split(line)
            commands[argv[argv.index("--name") + 1]] = argv
    return commands


def expected_row(up: Up, index: int, name: str, role: str) -> tuple[str, ...]:
    home = up.root / name
    return (name, role, up.url(index), str(home), str(home / "node.log"))


async def assert_login_works_once(http: aiohttp.ClientSession, login_url: str) -> None:
    """The URL, opened by a browser that asks for the node by another name than a loopback one, lets it in once."""
    away = {"Host": f"node.example:{urlsplit(login_url).port}"}
    async with http.get(login_url, headers=away, allow_redirects=False) as response:
        assert response.status == 303 and "HttpOnly" in response.headers["Set-Cookie"], response.status
    async with http.get(login_url, headers=away, allow_redirects=False) as response:
        assert response.status == 403, "a login URL worked twice"


# --- 1. the seed's whole flow ------------------------------------------------------------------


async def test_up_runs_the_seed_network_and_stops_it_on_ctrl_c(processes: Processes, http: aiohttp.ClientSession) -> None:
    up = processes.up(3)
    names = ["fake.dev", "fake2.dev", "fake3.dev"]

    # the table: names, roles, URLs, homes, logs; the hand-start commands; the suggested run-job
    assert table_rows(up) == [
        expected_row(up, 1, "fake.dev", "router"),
        expected_row(up, 2, "fake2.dev", "driver"),
        expected_row(up, 3, "fake3.dev", "client"),
    ], up.transcript()
    commands = hand_commands(up)
    assert sorted(commands) == sorted(names), up.transcript()
    for index, name in enumerate(names, start=1):
        argv = commands[name]
        assert argv[:2] == ["emulator", "node"]
        assert argv[argv.index("--port") + 1] == str(up.base + index - 1)
        assert argv[argv.index("--home") + 1] == str(up.root / name)
    assert f"emulator run-job -p {up.base + 2} {MODEL} How much wood" in up.transcript()
    assert f"LLM: http://127.0.0.1:{up.llm_port}/v1" in up.transcript()

    # one home and one OS process per node, all children of `up`
    pids = {}
    for index, name in enumerate(names, start=1):
        home = up.home(name)
        assert (home / "node.db").is_file() and (home / "node.log").is_file(), sorted(p.name for p in home.iterdir())
        info = json.loads((home / "node.json").read_text())
        assert info["name"] == name and info["url"] == up.url(index)
        pids[name] = int(info["pid"])
    assert len(set(pids.values())) == 3
    assert set(pids.values()) <= up.children, (pids, up.children)
    assert all(is_running(pid) for pid in pids.values())
    directory = json.loads((up.root / "directory.json").read_text())
    assert sorted(directory) == sorted(names), directory
    for index, name in enumerate(names, start=1):  # an entry is the node's URL, or an object with it
        assert (directory[name] if isinstance(directory[name], str) else directory[name]["url"]) == up.url(index), directory

    # the seed's job, through the CLI
    result = await cli(up, "run-job", "-p", str(up.base + 2), MODEL, *WOODCHUCK.split())
    answer, job_id = assert_job_ran(result, driver="fake2.dev")

    # the same network over plain HTTP, and through the official OpenAI client
    models = await get_json(http, f"{up.url(3)}/v1/models")
    assert MODEL in [m["id"] for m in models["data"]], models
    record = await get_json(http, f"{up.url(3)}/jobs/{job_id}")
    assert record["status"] == "succeeded" and record["driver"] == "fake2.dev", record
    assert record["text"].strip() == answer.strip()

    def openai_stream() -> list[Any]:
        client = openai.OpenAI(base_url=f"{up.url(3)}/v1", api_key="x", timeout=TIMEOUT_S, max_retries=0)
        try:
            stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True)
            return list(stream)
        finally:
            client.close()

    chunks = await asyncio.to_thread(openai_stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip(), chunks
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2, "the completion did not stream in chunks"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"], chunks

    # every node's web page, with a one-time login URL for a browser elsewhere; `emulator ui` makes more
    pages = [m.groups() for line in up.table if (m := WEB_PAGE_ROW.match(line))]
    assert [(name, page) for name, page, _ in pages] == [(name, f"{up.url(i)}/ui") for i, name in enumerate(names, start=1)], up.transcript()
    async with http.get(pages[2][1]) as response:
        assert response.status == 200 and response.content_type == "text/html", response.status
    await assert_login_works_once(http, pages[2][2])
    result = await cli(up, "ui", "-p", str(up.base + 2), "--host", "node.example")
    assert result.returncode == 0, result.stderr
    assert f"page:  http://node.example:{up.base + 2}/ui" in result.stdout, result.stdout
    login = re.search(r"^login: (\S+)", result.stdout, re.MULTILINE)
    assert login and login[1].startswith(f"http://node.example:{up.base + 2}/ui/login?token="), result.stdout
    await assert_login_works_once(http, login[1].replace("node.example", "127.0.0.1"))

    # Ctrl-C: every process goes, and `up` says so
    fake_llm = up.children - set(pids.values())
    assert len(fake_llm) == 1, up.children
    up.proc.send_signal(signal.SIGINT)
    assert up.wait_exit() == 0, up.transcript()
    assert "stopped all processes" in up.output, up.transcript()
    assert not wait_gone(up.children), "processes left running after Ctrl-C"
    for port in (up.base, up.base + 1, up.base + 2, up.llm_port):
        assert not is_listening(port), f"something still listens on port {port}"


# --- 2. wiring by hand -------------------------------------------------------------------------


async def test_no_wire_then_the_seeds_admin_commands_by_hand(processes: Processes) -> None:
    up = processes.up(3, "--no-wire")
    b, llm = up.base, up.llm_port

    # unwired, the client node has nowhere to send a job; and mistakes a user makes typing admin commands
    refused, bad_json, unknown, unknown_json, wrong_token = await asyncio.gather(
        cli(up, "run-job", "-p", str(b + 2), MODEL, *WOODCHUCK.split()),
        cli(up, "admin", "-p", str(b), '{"SetRouter": {"node": "fake.dev"}'),
        cli(up, "admin", "-p", str(b), "Bogus"),
        cli(up, "admin", "-p", str(b), '{"Bogus": {}}'),
        cli(up, "admin", "-p", str(b), "--token", "wrong", "StartRouter"),
    )
    assert_readable_failure(refused, "no router")
    assert refused.stdout == ""
    assert_readable_failure(bad_json, "JSON")
    assert_readable_failure(unknown, "not an admin message", "StartRouter")
    assert_readable_failure(unknown_json, "not an admin message")
    assert_readable_failure(wrong_token, "401", "admin token")

    # the seed's commands, exactly as typed
    seed = [
        ("admin", "-p", str(b), "StartRouter"),
        ("admin", "-p", str(b + 1), '{"SetRouter": {"node": "fake.dev"}}'),
        ("message", "-p", str(b + 1), "openai", f'{{"RegisterOaiProviderEndpoint": {{"endpoint": "http://127.0.0.1:{llm}/v1"}}}}'),
        ("admin", "-p", str(b + 1), '{"SetLocalDriver": {"model": "llama3", "is_public": true}}'),
        ("admin", "-p", str(b + 2), '{"SetRouter": {"node": "fake.dev"}}'),
    ]
    for command in seed:
        result = await cli(up, *command)
        assert result.returncode == 0, f"{shlex.join(command)}:\n{result.stdout}\n{result.stderr}"
        assert json.loads(result.stdout)["ok"] is True, result.stdout

    assert_job_ran(await cli(up, "run-job", "-p", str(b + 2), MODEL, *WOODCHUCK.split()), driver="fake2.dev")

    # SIGTERM stops everything too
    up.proc.send_signal(signal.SIGTERM)
    assert up.wait_exit() == 0, up.transcript()
    assert "stopped all processes" in up.output
    assert not wait_gone(up.children)


# --- 3. a node that dies -----------------------------------------------------------------------


async def test_a_killed_node_is_reported_and_can_be_started_again_by_hand(processes: Processes, http: aiohttp.ClientSession) -> None:
    up = processes.up(3)
    dead = up.pid_of("fake2.dev")
    os.kill(dead, signal.SIGKILL)

    up.expect(r"fake2\.dev exited with code -9")
    match, _ = up.expect(r"start it again with: (emulator node .*)$")
    command = shlex.split(match[1])
    assert command[command.index("--name") + 1] == "fake2.dev"
    assert command[command.index("--port") + 1] == str(up.base + 1)
    assert command[command.index("--home") + 1] == str(up.home("fake2.dev"))

    # `up` goes on, and so do the others
    assert up.proc.poll() is None, up.transcript()
    for index in (1, 3):
        health = await get_json(http, f"{up.url(index)}/healthz")
        assert health["status"] == "ok"

    # the printed command, run as a user would (the installed script in place of `emulator`)
    hand = processes.start([str(EMULATOR), *command[1:]], env=up.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await wait_healthy(http, up.url(2), hand.poll)
    assert up.pid_of("fake2.dev") == hand.pid
    assert_job_ran(await cli(up, "run-job", "-p", str(up.base + 2), MODEL, *WOODCHUCK.split()), driver="fake2.dev")

    hand.send_signal(signal.SIGTERM)
    assert hand.wait(timeout=TIMEOUT_S) == 0
    up.proc.send_signal(signal.SIGINT)
    assert up.wait_exit() == 0, up.transcript()
    assert "fake2.dev exited" in up.transcript() and "stopped all processes" in up.output


async def test_up_watches_nodes_started_again_by_hand_and_stops_them_on_ctrl_c(
    processes: Processes, http: aiohttp.ClientSession
) -> None:
    """Issue 14: once every node `up` started had died, it stopped, though each had been started again by hand."""
    up = processes.up(2)  # fake.dev routes, fake2.dev drives
    commands = hand_commands(up)
    hands: dict[str, subprocess.Popen[Any]] = {}
    for index, name in ((1, "fake.dev"), (2, "fake2.dev")):
        os.kill(up.pid_of(name), signal.SIGKILL)
        up.expect(rf"{re.escape(name)} exited with code -9")
        hand = processes.start([str(EMULATOR), *commands[name][1:]], env=up.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_healthy(http, up.url(index), hand.poll)
        up.expect(rf"{re.escape(name)} runs again \(pid {hand.pid}, started by hand\)")
        hands[name] = hand

    # Every process `up` started for a node is gone; `up` still watches the network, which works.
    assert up.proc.poll() is None, up.transcript()
    assert_job_ran(await cli(up, "run-job", "-p", str(up.base), MODEL, *WOODCHUCK.split()), driver="fake2.dev")

    # A node started by hand that exits is reported like any other.
    hands["fake2.dev"].send_signal(signal.SIGTERM)
    assert hands["fake2.dev"].wait(timeout=TIMEOUT_S) == 0
    up.expect(rf"fake2\.dev \(pid {hands['fake2.dev'].pid}, started by hand\) exited")
    assert up.proc.poll() is None, up.transcript()

    # Ctrl-C stops the network, the node started by hand included.
    up.proc.send_signal(signal.SIGINT)
    assert up.wait_exit() == 0, up.transcript()
    assert hands["fake.dev"].wait(timeout=TIMEOUT_S) == 0, "the node started by hand was not stopped"
    assert f"stopped fake.dev (pid {hands['fake.dev'].pid}, started by hand)" in up.output, up.transcript()
    assert "stopped all processes" in up.output


async def test_up_with_restart_starts_a_dead_node_again_with_backoff(processes: Processes, http: aiohttp.ClientSession) -> None:
    up = processes.up(3, "--restart")
    for attempt, backoff in ((1, "1"), (2, "2")):  # killed again at once: the second wait is longer
        os.kill(up.pid_of("fake2.dev"), signal.SIGKILL)
        up.expect(r"fake2\.dev exited with code -9")
        up.expect(rf"restarting it in {backoff} s$")
        match, _ = up.expect(r"restarted fake2\.dev \(pid (\d+)\)$")
        await wait_healthy(http, up.url(2))
        assert up.pid_of("fake2.dev") == int(match[1]), attempt
    assert_job_ran(await cli(up, "run-job", "-p", str(up.base + 2), MODEL, *WOODCHUCK.split()), driver="fake2.dev")
    assert "start it again with" not in up.transcript()

    restarted = up.pid_of("fake2.dev")
    up.proc.send_signal(signal.SIGINT)
    assert up.wait_exit() == 0, up.transcript()
    assert not wait_gone({restarted}), "the restarted node outlived `up`"


# --- 4. other sizes ----------------------------------------------------------------------------


async def test_a_single_node_routes_and_drives(processes: Processes) -> None:
    up = processes.up(1)
    assert table_rows(up) == [expected_row(up, 1, "fake.dev", "router + driver")], up.transcript()
    assert f"emulator run-job -p {up.base} {MODEL}" in up.transcript()
    assert_job_ran(await cli(up, "run-job", "-p", str(up.base), MODEL, *WOODCHUCK.split()), driver="fake.dev")


async def test_four_nodes_share_jobs_between_two_drivers(processes: Processes, http: aiohttp.ClientSession) -> None:
    up = processes.up(4, "--tps", "200")
    assert table_rows(up) == [
        expected_row(up, 1, "fake.dev", "router"),
        expected_row(up, 2, "fake2.dev", "driver"),
        expected_row(up, 3, "fake3.dev", "client"),
        expected_row(up, 4, "fake4.dev", "driver"),
    ], up.transcript()

    async def one_job(n: int) -> list[dict[str, Any]]:
        async with http.post(f"{up.url(3)}/jobs", json={"model": MODEL, "prompt": f"job {n}"}) as response:
            assert response.status == 202, await response.text()
            created = await response.json()
        return await job_updates(http, up.url(3), created["job_id"])

    results = await asyncio.wait_for(asyncio.gather(*(one_job(n) for n in range(8))), TIMEOUT_S)
    for updates in results:
        final = updates[-1]
        assert final["status"] == "succeeded", final
        assert "".join(u.get("delta", "") for u in updates).strip()
    assert {updates[-1]["driver"] for updates in results} == {"fake2.dev", "fake4.dev"}


# --- bugs found ----------------------------------------------------------------------------------


def test_cli_against_a_node_that_is_not_running_says_so(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "LLM_PROVIDER_ROOT": str(tmp_path)}
    assert_readable_failure(run_cli("run-job", "-p", str(port), MODEL, "hi", env=env), str(port))
    assert_readable_failure(run_cli("admin", "-p", str(port), "--token", "x", "StartRouter", env=env), str(port))


def test_up_with_a_taken_port_fails_readably_and_leaves_nothing_running(processes: Processes) -> None:
    base, llm_port = pick_ports(3)
    # the node on base+1 cannot bind; this socket is bound but not listening, so nothing answers there either
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 1))
        up = processes.up(3, ready=False, ports=(base, llm_port))
        code = up.wait_exit()
    transcript = up.transcript()
    assert not started_for(up.root, up.llm_port), "`up` left processes running"
    assert code != 0, transcript
    assert "ready" not in up.output
    assert "Traceback" not in transcript, transcript
    # refused before anything starts: the message names the port and the node that needs it
    assert f"port {base + 1} (fake2.dev) is taken" in transcript, transcript


def test_up_with_a_port_held_by_a_silent_listener_gives_up_promptly(processes: Processes) -> None:
    base, llm_port = pick_ports(3)
    with socket.socket() as silent:  # accepts connections (the kernel does, from the backlog), never answers
        silent.bind(("127.0.0.1", base + 1))
        silent.listen(16)
        up = processes.up(3, ready=False, ports=(base, llm_port))
        code = up.wait_exit(timeout=8)  # the node cannot bind and exits within a second or so
    assert code != 0, up.transcript()
    assert "ready" not in up.output
    assert not started_for(up.root, up.llm_port), "`up` left processes running"


def test_up_stops_its_processes_when_its_terminal_hangs_up(processes: Processes) -> None:
    up = processes.up(3)
    assert len(up.children) == 4, up.children  # three nodes and the fake LLM
    up.proc.send_signal(signal.SIGHUP)
    up.wait_exit()
    # `up` waits for its children before it exits, so none may be left by now
    assert not {pid for pid in up.children if is_running(pid)}, "processes orphaned by SIGHUP:\n" + up.transcript()
    assert "stopped all processes" in up.output, up.transcript()


async def test_a_restarted_driver_takes_jobs_at_once_even_after_failed_hand_offs(
    processes: Processes, http: aiohttp.ClientSession
) -> None:
    up = processes.up(3)
    os.kill(up.pid_of("fake2.dev"), signal.SIGKILL)
    match, _ = up.expect(r"start it again with: (emulator node .*)$")

    # a job while fake2.dev is down: the router cannot hand it over (twice) and cools the driver down
    async with http.post(f"{up.url(3)}/jobs", json={"model": MODEL, "prompt": "hi", "timeout": 1}) as response:
        assert response.status == 202, await response.text()
        created = await response.json()
    updates = await job_updates(http, up.url(3), created["job_id"])
    assert updates[-1]["status"] == "timed_out", updates[-1]
    assert "cooled down" in (up.home("fake.dev") / "node.log").read_text()

    hand = processes.start([str(EMULATOR), *shlex.split(match[1])[1:]], env=up.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await wait_healthy(http, up.url(2), hand.poll)
    # a job takes about a second here, CLI start included; 6 s is plenty unless the router still shuns the driver
    assert_job_ran(await cli(up, "run-job", "-p", str(up.base + 2), MODEL, *WOODCHUCK.split(), timeout=6), driver="fake2.dev")
