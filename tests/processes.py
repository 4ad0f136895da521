"""Ports and processes for the tests that run real `emulator` processes on loopback.

Everything here reads /proc (Linux) and never sleeps to synchronise except where a process that is not our
child, or a port opening, gives no event to wait on; every wait is bounded.  Processes are killed one by one,
by id, and only after their command line shows they are still the ones we started.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.hosts import free_port

EMULATOR = Path(sys.executable).parent / "emulator"
TIMEOUT_S = 60.0  # the most any one step may take before the test fails instead of hanging
POLL_S = 0.05  # between polls of what sends no event (a port opening, another process's child exiting)
WOODCHUCK = "How much wood could a woodchuck chuck? Be concise."  # the seed's prompt
RUN_JOB_SUMMARY = re.compile(
    r"^job (?P<job_id>[0-9a-f]{16,}) · (?P<status>\w+) · driver (?P<driver>\S+) · first token (?P<ttft>\d+ ms|-) · total (?P<total>\d+) ms"
)


# --- ports ------------------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Whether a socket can bind 127.0.0.1:`port` now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def is_listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def pick_ports(nodes: int) -> tuple[int, int]:
    """A base port with `nodes` free ports from it, and a free port (for a fake LLM) outside that range."""
    for _ in range(200):
        base, spare = free_port(), free_port()
        span = range(base, base + nodes)
        if base + nodes <= 65535 and spare not in span and all(port_is_free(p) for p in [*span, spare]):
            return base, spare
    raise AssertionError(f"found no {nodes} consecutive free ports")


async def wait_healthy(
    http: aiohttp.ClientSession,
    url: str,
    exit_code: Callable[[], int | None] | None = None,
    timeout: float = TIMEOUT_S,
) -> None:
    """Poll `url`/healthz until it answers 200 (a port opening has no event to wait on).

    `exit_code` gives the starting process's exit code, None while it runs: its exit fails the wait at once.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exit_code is not None and (code := exit_code()) is not None:
            raise AssertionError(f"{url}: the process exited with code {code} while starting")
        try:
            async with http.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"{url} did not answer /healthz within {timeout:.0f} s")


# --- processes, from /proc ------------------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces; "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_ours(pid: int, marker: str = "emulator") -> bool:
    """Still the process we started (its pid not reused): its command line names `marker`."""
    return marker in cmdline(pid)


def kill_group(pid: int, marker: str = "emulator") -> None:
    """SIGKILL a process started in a session of its own (its group id is its pid), if it is still ours."""
    if not is_ours(pid, marker):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """The pids still running after `timeout`; processes we are not the parent of cannot be waited for."""
    deadline = time.monotonic() + timeout
    while (alive := {p for p in pids if is_running(p)}) and time.monotonic() < deadline:
        time.sleep(POLL_S)  # another process's child: no event to wait on
    return alive


def started_for(root: Path, llm_port: int | None = None) -> set[int]:
    """Running processes of one network, found by their command lines: nodes name its root, its fake LLM its port."""
    found: set[int] = set()
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = path.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        is_node = "emulator.cli" in argv and any(arg.startswith(str(root)) for arg in argv)
        is_llm = llm_port is not None and "emulator.cli" in argv and "fake-llm" in argv and str(llm_port) in argv
        if (is_node or is_llm) and is_running(int(path.parent.name)):
            found.add(int(path.parent.name))
    return found


# --- `emulator up` ----------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run the `emulator` console script to its end, its output captured."""
    return subprocess.run(
        [str(EMULATOR), *args], check=False, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
    )


def start_up(root: Path, base: int, nodes: int, *options: str) -> subprocess.Popen[str]:
    """Start `emulator up --nodes N` for the network under `root`, ports from `base`, in a session of its own, output piped."""
    argv = [str(EMULATOR), "up", "--nodes", str(nodes), "--base-port", str(base), "--root", str(root), *options]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "LLM_PROVIDER_ROOT": str(root), "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def summary_of(result: subprocess.CompletedProcess[str]) -> tuple[str, re.Match[str]]:
    """run-job's output: the answer as it streamed, then a summary line."""
    answer, _, last = result.stdout.rstrip("\n").rpartition("\n")
    match = RUN_JOB_SUMMARY.match(last)
    assert match, f"no summary line in run-job's output:\n{result.stdout}\nstderr:\n{result.stderr}"
    return answer, match


@dataclass(kw_only=True)
class RunningUp:
    """A running `emulator up`, its output read line by line on a thread; `kill()` ends it and what it started."""

    proc: subprocess.Popen[str]
    root: Path
    base: int
    llm_port: int | None = None  # the fake LLM's port, where `up` started one
    output: list[str] = field(default_factory=list)
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    children: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def transcript(self) -> str:
        return "\n".join(self.output)

    def expect(self, pattern: str, timeout: float = TIMEOUT_S) -> tuple[re.Match[str], list[str]]:
        """Read output until a line matches; the match and the lines read before it."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f} s; output:\n{self.transcript()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)  # keep the end visible to later reads
                raise AssertionError(
                    f"`emulator up` ended (code {self.proc.poll()}) before {pattern!r}; output:\n{self.transcript()}"
                )
            if match := re.search(pattern, line):
                return match, seen
            seen.append(line)

    def wait_ready(self) -> list[str]:
        """Read output to `ready` (the lines before it); the network's processes are known from then on."""
        _, before = self.expect(r"^ready$")
        self.children = children_of(self.proc.pid)
        return before

    def port(self, index: int) -> int:
        return self.base + index - 1

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port(index)}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "LLM_PROVIDER_ROOT": str(self.root)}

    def cli(self, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env(), timeout=timeout)

    def kill(self) -> None:
        """SIGKILL `up` and every process of its network, one by one, and reap `up`."""
        pids = self.children | started_for(self.root, self.llm_port)
        if self.proc.poll() is None:
            pids |= children_of(self.proc.pid)
        kill_group(self.proc.pid)
        for pid in pids:
            kill_group(pid)
        self.proc.wait(timeout=TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
