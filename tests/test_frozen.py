"""Frozen, not dead: a node stopped with SIGSTOP keeps its sockets (the kernel still accepts connections) and
answers nothing until SIGCONT, as an overloaded or swapped-out process does; and a peer that accepts
connections and never answers at all.

Every node is a process of its own (`tests.cluster`); the LLM is a held upstream in this process, which
streams a first chunk and then waits for the test, so a job is mid-stream exactly when the test says.  Each
step awaits an HTTP answer, an SSE event or a process's state, under a bound: the bounds here are what the
recovery rules promise (a submission answered within 5 s, a job ended by its deadline), so a hang fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from handlers import delivery, router
from handlers.driver import ROUTER_ACCEPT_S
from llm_provider.directory import Directory
from llm_provider.homes import Home
from llm_provider.signing import NodeKey
from llm_provider.transport import REPLY_TIMEOUTS_S, HttpTransport
from schemas.jobs import JobSpec
from schemas.messages import ACCEPT_MARGIN_S, RegisterDriver, RunJob
from tests.cluster import CLIENT, DRIVER, ROUTER, Cluster, db_row, job_body, record
from tests.streams import STEP_S, final_of, job_stream, job_updates, next_update, submit, updates_to_final
from tests.upstreams import MODEL, HeldUpstream, gated_upstream

DEADLINE_S = 3.0  # the jobs' own `timeout`: short, so that the tests are


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No client-side timeouts: every wait in these tests is bounded by asyncio.timeout instead.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


@pytest.fixture
async def held() -> AsyncIterator[HeldUpstream]:
    async with gated_upstream(first="alpha", rest=" omega") as upstream:
        yield upstream


async def until_served_job_ends(cluster: Cluster, job_id: str, bound: float) -> str:
    """The serving driver's own record of the job once it has left `running`, within `bound` seconds."""
    async with asyncio.timeout(bound):
        while True:
            row = db_row(cluster.procs[DRIVER].database, "SELECT status FROM served_jobs WHERE id = ?", job_id)
            if row is not None and row[0] != "running":
                return str(row[0])
            await asyncio.sleep(0.1)  # another process's database: nothing to await


async def test_a_serving_driver_frozen_mid_job_the_job_ends_by_its_deadline_and_nothing_comes_twice(
    cluster: Cluster, http: aiohttp.ClientSession, held: HeldUpstream
) -> None:
    nodes = await cluster.network(llm_url=held.url)
    client = nodes[CLIENT].url
    job_id = (await submit(http, client, job_body("frozen driver", timeout=DEADLINE_S)))["job_id"]
    async with job_stream(http, client, job_id) as stream:
        async with asyncio.timeout(STEP_S):
            first = await next_update(stream)
        assert (first["delta"], first["driver"]) == ("alpha", DRIVER), first
        cluster.freeze(DRIVER)
        # The client's node and the router each end the job by its deadline (and a second or two of grace).
        async with asyncio.timeout(DEADLINE_S + STEP_S):
            rest = await updates_to_final(stream)
    assert [(u["seq"], u["is_final"], u["status"]) for u in rest] == [(1, True, "timed_out")], rest
    ended = await record(http, client, job_id)

    cluster.thaw(DRIVER)
    # Awake, the driver finds the job past its deadline: it reports it (the router relays that final, a repeat
    # for it), or finds that the router has ended it; the client's node, where the job has ended, keeps what it had.
    assert await until_served_job_ends(cluster, job_id, STEP_S) in {"timed_out", "failed"}
    assert await record(http, client, job_id) == ended
    async with asyncio.timeout(STEP_S):
        assert await job_updates(http, client, job_id) == [first, *rest]
    assert db_row(nodes[CLIENT].database, "SELECT count(*) FROM job_chunks WHERE job_id = ?", job_id) == (2,)
    assert held.arrivals == ["frozen driver"]


async def test_a_frozen_router_submissions_get_503_promptly_and_none_of_them_reaches_an_llm_after_it_wakes(
    cluster: Cluster, http: aiohttp.ClientSession, held: HeldUpstream
) -> None:
    nodes = await cluster.network(llm_url=held.url, capacity=1)
    client = nodes[CLIENT].url
    running = (await submit(http, client, job_body("running", timeout=60)))["job_id"]
    async with job_stream(http, client, running) as stream:
        async with asyncio.timeout(STEP_S):
            assert (await next_update(stream))["delta"] == "alpha"  # the only driver is busy with it
    waits_long = await submit(http, client, job_body("waits long", timeout=60))
    waits_briefly = await submit(http, client, job_body("waits briefly", timeout=DEADLINE_S))
    assert waits_long["status"] == waits_briefly["status"] == "queued"

    cluster.freeze(ROUTER)
    # A submission gets its answer: no router took it in time.
    async with asyncio.timeout(ROUTER_ACCEPT_S + ACCEPT_MARGIN_S + 1.0):
        async with http.post(f"{client}/jobs", json=job_body("refused")) as response:
            refusal = await response.json()
    assert response.status == 503 and refusal["error"]["code"] == "router_unreachable", refusal
    # A queued job ends by its deadline on the client's node, router or not.
    async with asyncio.timeout(DEADLINE_S + STEP_S):
        briefly = await job_updates(http, client, waits_briefly["job_id"])
    assert final_of(briefly)["status"] == "timed_out", briefly

    cluster.thaw(ROUTER)
    held.gate.set()
    # The router goes on where it was: the running job ends, the one queued with time left runs after it.
    async with asyncio.timeout(STEP_S):
        finals = [final_of(await job_updates(http, client, job))["status"] for job in (running, waits_long["job_id"])]
    assert finals == ["succeeded", "succeeded"]
    # The refused submission came to the router once it woke, too late: it was not taken, so no driver, and no
    # LLM, ever had it (it would have run after the job queued before it).
    assert db_row(nodes[ROUTER].database, "SELECT count(*) FROM routed_jobs") == (3,)
    assert held.arrivals == ["running", "waits long"]


async def test_a_frozen_client_node_its_driver_ends_the_job_by_its_deadline_without_piling_up_retries(
    cluster: Cluster, http: aiohttp.ClientSession, held: HeldUpstream
) -> None:
    nodes = await cluster.network(llm_url=held.url)
    client = nodes[CLIENT].url
    job_id = (await submit(http, client, job_body("frozen client", timeout=DEADLINE_S)))["job_id"]
    async with job_stream(http, client, job_id) as stream:
        async with asyncio.timeout(STEP_S):
            assert (await next_update(stream))["delta"] == "alpha"
    cluster.freeze(CLIENT)
    # The driver ends the job at its deadline and offers the final for a few seconds more; each attempt waits
    # a few seconds for the router, which waits for the client node, then backs off: then it gives up.
    bound = DEADLINE_S + delivery.FINAL_DELIVERY_GRACE_S + router.RELAY_TIMEOUT_S + ACCEPT_MARGIN_S + STEP_S / 3
    assert await until_served_job_ends(cluster, job_id, bound) == "timed_out"
    log = Home(cluster.root / DRIVER).log_file.read_text()
    retries = sum(1 for line in log.splitlines() if job_id in line and "retried in" in line)
    cluster.thaw(CLIENT)

    assert 1 <= retries <= 6, log
    async with asyncio.timeout(STEP_S):
        updates = await job_updates(http, client, job_id)
    final = final_of(updates)
    assert final["status"] == "timed_out", final
    assert [u["seq"] for u in updates] == [0, 1]


# --- a peer that accepts connections and never answers -------------------------------------------


class SilentPeer:
    """Listens where a node should, takes every connection and reads what comes, and never answers."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []  # what came on each connection
        self.open = 0
        self.most_open = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._take, "127.0.0.1", port)

    def connections_carrying(self, text: str) -> int:
        return sum(1 for data in self.received if text.encode() in data)

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received.append(data := bytearray())
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while chunk := await reader.read(65536):  # until the sender hangs up, when it stops waiting
                data += chunk
        finally:
            self.open -= 1
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_a_peer_that_never_answers_costs_each_message_its_own_timeout_and_no_growing_retries(
    cluster: Cluster, http: aiohttp.ClientSession, held: HeldUpstream
) -> None:
    silent = SilentPeer()
    await silent.start(cluster.ports[ROUTER])  # the router's address and key are in the directory; it answers nothing
    async with AsyncExitStack() as stack:
        stack.push_async_callback(silent.close)
        nodes = await cluster.network(llm_url=held.url, router=False)
        client, driver = nodes[CLIENT], nodes[DRIVER]

        async def submission() -> tuple[int, dict[str, Any]]:
            async with asyncio.timeout(ROUTER_ACCEPT_S + ACCEPT_MARGIN_S + 1.0):
                async with http.post(f"{client.url}/jobs", json=job_body("to nobody")) as response:
                    return response.status, await response.json()

        async def admin() -> dict[str, Any]:
            async with asyncio.timeout(REPLY_TIMEOUTS_S[RegisterDriver] + 1.0):
                return await driver.admin({"SetRouter": {"node": ROUTER}})

        # A submission gets 503 once the router has not taken the job in time; an admin command that tells the
        # router reports that it could not, within the message's own timeout.
        (status, refusal), admin_reply = await asyncio.gather(submission(), admin())
        assert status == 503 and refusal["error"]["code"] == "router_unreachable", refusal
        assert "was not told" in admin_reply["note"], admin_reply
        assert 1 <= silent.connections_carrying('"RunJob"') <= 2  # the offer, and one repeat at most

        # A job the router gave the driver (sent as the router would, signed with its key): the driver serves
        # it and offers its first chunk to the silent router, one attempt at a time, until the job's deadline;
        # then the final, for a few seconds more.
        job = JobSpec(
            job_id="f" * 32, client_node=CLIENT, model=MODEL, body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            created_at=time.time(), deadline=time.time() + DEADLINE_S,
        )
        as_router = HttpTransport(ROUTER, NodeKey.load_or_create(Home(cluster.root / ROUTER).key_file), Directory({}, cluster.directory), _nothing)
        stack.push_async_callback(as_router.close)
        offer = RunJob.offer(job, 5.0)
        assert (await as_router.send("router", DRIVER, "driver", offer, timeout=offer.reply_timeout()))["status"] == "running"
        bound = DEADLINE_S + delivery.FINAL_DELIVERY_GRACE_S + router.RELAY_TIMEOUT_S + ACCEPT_MARGIN_S + STEP_S / 3
        assert await until_served_job_ends(cluster, job.job_id, bound) == "timed_out"
        # Every attempt waited its turn: one connection at a time from the driver (and its heartbeats).
        assert silent.most_open <= 3, silent.most_open
        assert held.arrivals == ["hi"]


async def _nothing(*_: Any) -> Any:
    raise AssertionError("the test's stand-in router delivers nothing locally")
