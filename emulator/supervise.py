"""`emulator up` watching its network: the processes it started, and a node a user started again by hand.

A node runs if the process `up` started for it runs, or else the process its home's `node.json` names
(every node writes its pid there when it boots, however it was started).  `up` goes on while any node
runs; with `--restart` it starts a node whose process exited again by itself, after a backoff, and
keeps going until it is stopped.  Stopping stops every node of the network, those started by hand too.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from handlers.os_processes import pid_alive
from llm_provider.homes import Home

POLL_S = 0.5  # a process started by hand is not our child: nothing tells us when it ends, so we look
STOP_GRACE_S = 10.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a process that ran this long before it exited starts its backoff afresh
PR_SET_PDEATHSIG = 1


@dataclass
class Watched:
    """One process of the network: a node (with a home) or the embedded fake LLM."""

    name: str
    argv: list[str]  # how `up` starts it
    log: Path
    home: Home | None = None  # a node's: its node.json names the process serving it, whoever started it
    hand_command: str | None = None  # what a user types to start it again
    process: asyncio.subprocess.Process | None = None  # started by `up`, while it runs
    by_hand: int | None = None  # the pid of a process started by someone else, while it runs
    started_at: float = 0.0
    quick_exits: int = 0  # exits in a row, each before STABLE_S
    restart_at: float | None = None

    @property
    def is_node(self) -> bool:
        return self.home is not None

    def running(self) -> bool:
        return (self.process is not None and self.process.returncode is None) or self.by_hand is not None


def _die_with_parent() -> None:
    """Children get SIGTERM when `up` dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _looks_like_a_node(pid: int) -> bool:
    """A pid from a node.json is an `emulator` process, not one that got the number since (where /proc tells)."""
    if not Path("/proc/self").exists():
        return True
    try:
        return b"emulator" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Supervisor:
    def __init__(self, watched: list[Watched], restart: bool) -> None:
        self.watched = watched
        self.restart = restart

    async def start(self, item: Watched) -> asyncio.subprocess.Process:
        item.log.parent.mkdir(parents=True, exist_ok=True)
        with item.log.open("ab") as log:
            item.process = await asyncio.create_subprocess_exec(
                *item.argv, stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_parent
            )
        item.started_at = time.monotonic()
        return item.process

    async def watch(self, stop: asyncio.Event) -> int:
        """Until `stop` is set (0), or no node runs and none will be restarted (1)."""
        while not stop.is_set():
            self._look()
            if not any(item.running() or item.restart_at is not None for item in self.watched if item.is_node):
                print("\n!! no node of the network runs any more.", flush=True)
                return 1
            await self._restart_due()
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except TimeoutError:
                pass
        return 0

    def _look(self) -> None:
        for item in self.watched:
            if item.process is not None and item.process.returncode is not None:
                code, item.process = item.process.returncode, None
                self._went_down(item, f"exited with code {code}")
            elif item.by_hand is not None and not pid_alive(item.by_hand):
                gone, item.by_hand = item.by_hand, None
                self._went_down(item, f"(pid {gone}, started by hand) exited")
            if not item.running() and (found := self._started_by_hand(item)) is not None:
                item.by_hand, item.started_at, item.restart_at = found, time.monotonic(), None
                print(f"   {item.name} runs again (pid {found}, started by hand); `up` watches it.", flush=True)

    @staticmethod
    def _started_by_hand(item: Watched) -> int | None:
        if item.home is None:
            return None
        try:
            pid = int(json.loads(item.home.info_file.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid if pid != os.getpid() and pid_alive(pid) and _looks_like_a_node(pid) else None

    def _went_down(self, item: Watched, what: str) -> None:
        print(f"\n!! {item.name} {what}; the others keep running.", flush=True)
        if self.restart:
            quick = time.monotonic() - item.started_at < STABLE_S
            item.quick_exits = item.quick_exits + 1 if quick else 1
            delay = min(BACKOFF_FIRST_S * 2 ** (item.quick_exits - 1), BACKOFF_MAX_S)
            item.restart_at = time.monotonic() + delay
            print(f"   restarting it in {delay:g} s", flush=True)
        elif item.hand_command is not None:
            print(f"   start it again with: {item.hand_command}", flush=True)

    async def _restart_due(self) -> None:
        now = time.monotonic()
        for item in self.watched:
            if item.restart_at is None or now < item.restart_at or item.running():
                continue
            item.restart_at = None
            try:
                process = await self.start(item)
            except OSError as error:
                print(f"   {item.name} did not start: {error}", flush=True)
                self._went_down(item, "could not be restarted")
                continue
            print(f"   restarted {item.name} (pid {process.pid})", flush=True)

    async def stop_all(self) -> None:
        """SIGTERM every process of the network, ours and those started by hand; SIGKILL what is left after
        STOP_GRACE_S."""
        for item in self.watched:
            if not item.running():
                item.by_hand = self._started_by_hand(item)
        ours = [item.process for item in self.watched if item.process is not None and item.process.returncode is None]
        theirs = {item.name: item.by_hand for item in self.watched if item.by_hand is not None}
        for process in ours:
            process.send_signal(signal.SIGTERM)
        for pid in theirs.values():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in ours)), STOP_GRACE_S)
        except TimeoutError:
            for process in ours:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in ours))
        while (left := [pid for pid in theirs.values() if pid_alive(pid)]) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S / 5)  # not our children: no exit to await
        for pid in left:
            _signal(pid, signal.SIGKILL)
        for name, pid in theirs.items():
            print(f"stopped {name} (pid {pid}, started by hand)", flush=True)
        print("stopped all processes", flush=True)


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
