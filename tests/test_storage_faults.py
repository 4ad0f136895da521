"""A node whose database refuses writes: its disk full, its file read-only, its write lock held by another process.

In each case submissions answer 503 `storage_unavailable` and store nothing, nothing the node had accepted
is lost, and the node recovers by itself once the fault clears.  The faults are real for a node run as
root, as tests are: RLIMIT_FSIZE (set on the running node with prlimit) stops root's writes too; a file's
mode stops a process only without CAP_DAC_OVERRIDE, so that node runs without it, as any unprivileged user
does; SQLite's lock is held by a process of its own.

The node is a process (`emulator node --verbose`) whose log the test reads from a pipe, line by line (a
pipe, unlike the node's log file, is no file a size limit stops): that is how the test knows the node met
the fault, without sleeping.  Its LLM is the gated upstream, so that a job is in flight when the fault comes.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emulator.client import send_admin
from llm_provider.homes import Home
from tests.cluster import READY_S, REPO, job_body, record
from tests.hosts import free_port
from tests.processes import kill_group, wait_healthy
from tests.streams import STEP_S, final_of, first_update, follow, run_to_end, submit, text_of
from tests.upstreams import MODEL, HeldUpstream, StartUpstream
from tests.upstreams import gated as gated  # a fixture
from tests.upstreams import start_upstream as start_upstream  # a fixture

NAME = "solo.dev"
PR_CAPBSET_DROP = 24  # prctl(2)
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # capability.h


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No client-side timeouts: every wait is bounded by asyncio.timeout instead.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


def without_permission_override() -> None:
    """In the node's process before it starts: root loses what lets it write a file whose mode says read-only."""
    if os.geteuid() != 0:
        return  # an unprivileged user obeys file modes already
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability})")


@dataclass
class NodeProcess:
    """`emulator node` on a port of its own, serving `llama3` with its own LLM; its log read from a pipe."""

    home: Path
    port: int
    preexec_fn: Callable[[], None] | None = None
    process: asyncio.subprocess.Process | None = None
    log: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return Home(self.home).database

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, http: aiohttp.ClientSession) -> None:
        argv = [sys.executable, "-m", "emulator.cli", "node", "--name", NAME, "--port", str(self.port), "--home", str(self.home), "--verbose"]
        self.process = process = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=self.preexec_fn,
        )
        asyncio.get_running_loop().create_task(self._read_log(process))
        await wait_healthy(http, self.url, lambda: process.returncode, timeout=READY_S)

    async def _read_log(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():  # read to the end, so the node never blocks on a full pipe
            self.log.put_nowait(line.decode(errors="replace"))

    async def logged(self, text: str) -> str:
        """The next line of the node's log that says `text`."""
        async with asyncio.timeout(STEP_S):
            while text not in (line := await self.log.get()):
                pass
        return line

    async def admin(self, message: Any, process: str | None = None) -> None:
        await send_admin(self.url, Home(self.home).admin_token(), message, process)

    async def serve_with(self, llm_url: str) -> None:
        await self.admin({"RegisterOaiProviderEndpoint": {"endpoint": llm_url}}, "openai")
        await self.admin({"SetLocalDriver": {"model": MODEL, "is_public": True}})

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            kill_group(self.pid)
            async with asyncio.timeout(STEP_S):
                await self.process.wait()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeProcess]:
    node = NodeProcess(home=tmp_path / NAME, port=free_port())
    try:
        yield node
    finally:
        await node.kill()


def jobs_stored(node: NodeProcess) -> tuple[int, int]:
    """(jobs, chunks) in the node's database, read beside it (WAL lets a reader in whatever the writer's state)."""
    with sqlite3.connect(node.database, timeout=STEP_S) as connection:
        return connection.execute("SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_chunks)").fetchone()  # type: ignore[no-any-return]


async def refused(http: aiohttp.ClientSession, node: NodeProcess, says: str) -> None:
    """A submission is answered 503 `storage_unavailable`, in the database's words, and stores nothing."""
    before = jobs_stored(node)
    async with asyncio.timeout(STEP_S), http.post(f"{node.url}/jobs", json=job_body("refused")) as response:
        body = json.loads(await response.text())
    assert response.status == 503, body
    assert body["error"]["code"] == "storage_unavailable" and says in body["error"]["message"], body
    assert response.headers["Retry-After"] == "1"
    assert jobs_stored(node) == before


async def in_flight(http: aiohttp.ClientSession, node: NodeProcess) -> str:
    """A job whose first chunk is stored while the gated upstream holds the rest."""
    job_id: str = (await submit(http, node.url, job_body("accepted before the fault", timeout=60)))["job_id"]
    assert (await first_update(http, node.url, job_id))["delta"] == "alpha"
    return job_id


async def finishes_whole(http: aiohttp.ClientSession, node: NodeProcess, job_id: str) -> None:
    updates = await follow(http, node.url, job_id)
    assert final_of(updates)["status"] == "succeeded" and text_of(updates) == "alpha omega", updates
    assert (await record(http, node.url, job_id))["text"] == "alpha omega"


async def takes_jobs_again(http: aiohttp.ClientSession, node: NodeProcess) -> None:
    after = await run_to_end(http, node.url, job_body("after the fault"))
    assert final_of(after)["status"] == "succeeded" and text_of(after) == "alpha omega", after


async def test_a_full_disk_refuses_submissions_keeps_what_it_accepted_and_recovers(
    node: NodeProcess, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    await node.start(http)
    await node.serve_with(gated.url)
    accepted = await in_flight(http, node)

    # The node can no longer write past the first 4 KiB of any file: its database and log files are larger.
    resource.prlimit(node.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    await refused(http, node, "disk")
    gated.gate.set()  # the rest of the accepted job comes while nothing can be stored
    await node.logged("the store is unavailable")  # its chunk was refused, and is being tried again

    resource.prlimit(node.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    await finishes_whole(http, node, accepted)
    await takes_jobs_again(http, node)


async def test_a_write_lock_held_by_another_process_refuses_submissions_and_the_node_recovers(
    node: NodeProcess, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    await node.start(http)
    await node.serve_with(gated.url)
    accepted = await in_flight(http, node)

    hold = "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.readline()"
    locker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", hold, str(node.database), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert locker.stdout is not None and locker.stdin is not None
        async with asyncio.timeout(STEP_S):
            assert await locker.stdout.readline() == b"locked\n"
        await refused(http, node, "database is locked")  # after the node waited its while for the lock
        gated.gate.set()
        await node.logged("database is locked; retried")  # the accepted job's chunk waits for the lock too
        locker.stdin.write(b"release\n")  # the lock holder ends: its transaction, never committed, goes
        async with asyncio.timeout(STEP_S):
            await locker.wait()
    finally:
        if locker.returncode is None:
            locker.kill()
            await locker.wait()

    await finishes_whole(http, node, accepted)
    await takes_jobs_again(http, node)


async def test_a_read_only_database_is_read_refuses_submissions_and_the_node_recovers(
    node: NodeProcess, gated: HeldUpstream, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    node.preexec_fn = without_permission_override
    await node.start(http)
    await node.serve_with((await start_upstream(ttft=0.0, tokens_per_second=0, default_tokens=3)).url)
    done = await run_to_end(http, node.url, job_body("finished before the fault"))
    assert final_of(done)["status"] == "succeeded"
    await node.serve_with(gated.url)
    accepted = await in_flight(http, node)

    # The node dies, and comes back to a database file it may only read (its WAL beside it, as the crash left it).
    await node.kill()
    node.database.chmod(0o444)
    await node.start(http)  # boots all the same

    assert (await record(http, node.url, done[0]["job_id"]))["text"] == text_of(done)  # what was stored is there
    assert (await record(http, node.url, accepted))["text"] == "alpha"
    await refused(http, node, "readonly")
    await node.logged("the boot chores wait for the store")  # it cannot yet end the job the crash cut short

    node.database.chmod(0o644)
    # By itself, the node takes writes again: it ends the job the crash cut short, as after any restart.
    updates = await follow(http, node.url, accepted)
    assert final_of(updates)["status"] == "failed" and "restarted" in final_of(updates)["error"] and text_of(updates) == "alpha"
    gated.gate.set()
    await takes_jobs_again(http, node)
