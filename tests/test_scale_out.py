"""Scaling out, with real processes: a node as several gunicorn workers over one database, and a router
as two replicas (one name, one key, one database) of which one is killed mid-run.

The fake LLM runs in the test process, so its counters and the requests it saw can be read directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import update

from handlers import liveness, router, upkeep
from store import notifications
from store.models import ServedJob, Worker
from tests.cluster import CLIENT, DRIVER, DRIVER2, ROUTER, Cluster
from tests.conftest import RunningNode, StartNode
from tests.databases import fresh_database, postgres_server
from tests.helpers import expected_completion, store_of
from tests.processes import children_of
from tests.streams import (
    STEP_S,
    assert_in_order,
    events,
    final_of,
    follow,
    job_stream,
    job_updates,
    next_update,
    submit,
    text_of,
    updates_to_final,
)
from tests.upstreams import MODEL, StartUpstream, Upstream, gated_upstream, recording_upstream

# The in-process tests here are about processes sharing one database (orphans, boot chores, readers), not hosts.
pytestmark = pytest.mark.databases_only


def answer_to(prompt: str) -> str:
    return "".join(expected_completion([{"role": "user", "content": prompt}])[0])


async def wire_driver(driver: Any, upstream: Upstream, router: str | None, capacity: int = 1) -> None:
    if router is not None:
        await driver.admin({"SetRouter": {"node": router}})
    await driver.admin({"RegisterOaiProviderEndpoint": {"endpoint": upstream.url}}, "openai")
    await driver.admin({"SetLocalDriver": {"model": MODEL, "is_public": True, "capacity": capacity}})


# --- several gunicorn workers per node --------------------------------------------------------------


async def sessions_per_worker(url: str, workers: int, stack: AsyncExitStack, each: int = 1) -> list[list[aiohttp.ClientSession]]:
    """`each` client sessions answered by each worker, every session one connection of its own (a request
    waits for it while another holds it): which worker accepts a new connection is the kernel's choice, so
    connections are opened until every worker has answered `each` of them."""
    found: dict[str, list[aiohttp.ClientSession]] = {}
    async with asyncio.timeout(STEP_S):
        while len(found) < workers or any(len(group) < each for group in found.values()):
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)))
            async with session.get(f"{url}/healthz") as response:
                worker = (await response.json())["worker"]
            if len(group := found.setdefault(worker, [])) < each:
                group.append(session)
    return list(found.values())


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
async def test_two_workers_serve_jobs_and_each_follows_what_the_other_writes(
    tmp_path: Path, http: aiohttp.ClientSession, start_upstream: StartUpstream, server: str
) -> None:
    """Two worker processes of one node: gunicorn with aiohttp's worker, or uvicorn running the ASGI app."""
    cluster = Cluster(tmp_path, http)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(cluster.close)
        held = await stack.enter_async_context(gated_upstream(first="alpha", rest=" omega"))
        start = cluster.gunicorn_node if server == "gunicorn" else cluster.uvicorn_node
        node = await start(DRIVER, workers=2)
        prompts = [f"worker job {i}" for i in range(8)]
        await wire_driver(node, held, router=None, capacity=len(prompts))
        # A session per job and worker: a stream holds its session's one connection to its end.
        first, second = await sessions_per_worker(node.url, 2, stack, each=len(prompts) // 2)

        # Each job is served by the worker that took it, and read from the other: its first chunk while the
        # LLM still holds the job (followed live, not replayed at the end), the rest once the LLM goes on.
        created = [await submit((first, second)[i % 2][i // 2], node.url, {"model": MODEL, "prompt": p}) for i, p in enumerate(prompts)]
        async with asyncio.timeout(STEP_S):
            streams = [
                await stack.enter_async_context(job_stream((second, first)[i % 2][i // 2], node.url, c["job_id"]))
                for i, c in enumerate(created)
            ]
        async with asyncio.timeout(STEP_S):
            heads = [await next_update(stream) for stream in streams]
        assert [(head["seq"], head["delta"], head["is_final"]) for head in heads] == [(0, "alpha", False)] * len(prompts), heads
        assert sorted(held.arrivals) == sorted(prompts)
        held.gate.set()
        async with asyncio.timeout(STEP_S):
            tails = [await updates_to_final(stream) for stream in streams]
        for head, tail in zip(heads, tails):
            updates = [head, *tail]
            assert_in_order(updates)
            assert final_of(updates)["status"] == "succeeded", updates
            assert text_of(updates) == "alpha omega"
        assert held.stats.requests == len(prompts)

        # A cancellation taken by one worker stops the job the other serves (an LLM that streams on and on).
        upstream = await start_upstream(ttft=0.0, tokens_per_second=40)
        await node.admin({"RegisterOaiProviderEndpoint": {"endpoint": upstream.url}}, "openai")
        slow = await submit(first[0], node.url, {"model": MODEL, "prompt": "long", "max_tokens": 10_000})
        async with asyncio.timeout(STEP_S):
            async with second[0].get(f"{node.url}/jobs/{slow['job_id']}/events") as response:
                async for _ in events(response):
                    break  # the job is streaming
        async with second[0].delete(f"{node.url}/jobs/{slow['job_id']}") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["status"] == "cancelled"
        async with asyncio.timeout(STEP_S):
            await upstream.stats.until_idle()  # the other worker closed its request to the LLM
        async with first[0].get(f"{node.url}/jobs/{slow['job_id']}") as response:
            assert (await response.json())["status"] == "cancelled"


async def test_a_job_whose_gunicorn_workers_were_killed_is_ended_by_the_workers_that_replace_them(
    tmp_path: Path, http: aiohttp.ClientSession, start_upstream: StartUpstream
) -> None:
    upstream = await start_upstream(ttft=0.0, tokens_per_second=2, default_tokens=1000)  # far longer than the test
    cluster = Cluster(tmp_path, http)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(cluster.close)
        node = await cluster.gunicorn_node(DRIVER, workers=2)
        await wire_driver(node, upstream, router=None)
        created = await submit(http, node.url, {"model": MODEL, "prompt": "interrupted", "timeout": 300})
        async with asyncio.timeout(STEP_S):
            async with http.get(f"{node.url}/jobs/{created['job_id']}/events") as response:
                async for _ in events(response):
                    break  # a worker is streaming it
        workers = children_of(node.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # gunicorn starts new workers; the job's process is gone
        # The new workers take the old ones for dead once they have been silent for WORKER_TTL_S, and settle the job.
        async with asyncio.timeout(liveness.WORKER_TTL_S + 2 * router.HEARTBEAT_S + STEP_S):
            while True:
                try:
                    updates = await job_updates(http, node.url, created["job_id"])
                    break
                except (aiohttp.ClientError, AssertionError):
                    await asyncio.sleep(0.1)  # no worker answers yet: nothing to await but the port
        final = final_of(updates)
        assert (final["status"], final["error"]) == ("failed", "the driver restarted mid-job")
        assert not workers & children_of(node.pid)


async def test_a_client_node_of_two_gunicorn_workers_gets_every_update_whichever_worker_it_reaches(
    tmp_path: Path, http: aiohttp.ClientSession, start_upstream: StartUpstream
) -> None:
    upstream = await start_upstream(ttft=0.0, tokens_per_second=200)
    cluster = Cluster(tmp_path, http)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(cluster.close)
        router, driver, client = await asyncio.gather(cluster.node(ROUTER), cluster.node(DRIVER), cluster.gunicorn_node(CLIENT, workers=2))
        await router.admin("StartRouter")
        await wire_driver(driver, upstream, router=ROUTER, capacity=4)
        await client.admin({"SetRouter": {"node": ROUTER}})
        sessions = [group[0] for group in await sessions_per_worker(client.url, 2, stack)]
        prompts = [f"through the router {i}" for i in range(12)]

        async def run(i: int, prompt: str) -> list[dict[str, Any]]:
            created = await submit(sessions[i % 2], client.url, {"model": MODEL, "prompt": prompt})
            return await follow(sessions[(i + 1) % 2], client.url, created["job_id"])

        for prompt, updates in zip(prompts, await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))):
            assert_in_order(updates)
            assert final_of(updates)["status"] == "succeeded", updates
            assert text_of(updates) == answer_to(prompt)


# --- router replicas -------------------------------------------------------------------------------


@pytest.fixture(params=["postgres", "sqlite"])
async def router_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[str]]:
    """`emulator node` flags for the replicas' one database: a fresh PostgreSQL database, or one SQLite file."""
    if request.param == "sqlite":
        yield ["--database-url", f"sqlite+aiosqlite:///{tmp_path / 'router.db'}"]
        return
    async with fresh_database(postgres_server()) as url:
        yield ["--database-url", url]


JOBS = 200
KILL_AFTER = 70
AT_ONCE = 24


async def test_two_router_replicas_split_the_work_and_one_killed_midway_loses_and_repeats_no_job(
    tmp_path: Path, http: aiohttp.ClientSession, router_database: list[str]
) -> None:
    cluster = Cluster(tmp_path, http, replicas={ROUTER: 2})
    async with AsyncExitStack() as stack:
        stack.push_async_callback(cluster.close)
        upstream = await stack.enter_async_context(recording_upstream(ttft=0.0, tokens_per_second=200))
        flags = ("--shared", "--verbose", *router_database)  # --verbose: each replica's access log shows its share
        replica1 = await cluster.node(ROUTER, *flags)
        replica2 = await cluster.node(ROUTER, *flags, replica=2)
        await replica1.admin("StartRouter")
        drivers = await asyncio.gather(cluster.node(DRIVER), cluster.node(DRIVER2))
        for driver in drivers:
            await wire_driver(driver, upstream, router=ROUTER, capacity=4)
        client = await cluster.node(CLIENT)
        await client.admin({"SetRouter": {"node": ROUTER}})

        prompts = [f"replicated job {i} {random.random()}" for i in range(JOBS)]
        finished = 0
        halfway = asyncio.Event()
        room = asyncio.Semaphore(AT_ONCE)

        async def run(prompt: str) -> list[dict[str, Any]]:
            nonlocal finished
            async with room:
                created = await submit(http, client.url, {"model": MODEL, "prompt": prompt})
                updates = await follow(http, client.url, created["job_id"], bound=60.0)
            finished += 1
            if finished == KILL_AFTER:
                halfway.set()
            return updates

        async def kill_one_midway() -> None:
            await halfway.wait()
            await cluster.kill9(replica1.name)

        results, _ = await asyncio.gather(asyncio.gather(*(run(p) for p in prompts)), kill_one_midway())

        assert finished == JOBS
        for prompt, updates in zip(prompts, results):
            assert_in_order(updates)
            assert final_of(updates)["status"] == "succeeded", (prompt, updates)
            assert text_of(updates) == answer_to(prompt)
        # None ran twice: the LLM saw each prompt exactly once.
        asked = Counter(request.body["messages"][-1]["content"] for request in upstream.requests)
        assert sorted(asked.values()) == [1] * JOBS and set(asked) == set(prompts)
        # Both replicas took part: senders take turns among a node's URLs, and each replica logged messages it took.
        for replica in (replica1, replica2):
            assert replica.output.read_text().count("POST /node/message") > 50, replica.name
        assert not replica1.alive() and replica2.alive()


# --- processes sharing a store: whose jobs are orphans ------------------------------------------------


async def served_by(node: RunningNode, job_id: str) -> tuple[str, str | None]:
    async with store_of(node).reading() as session:
        served = await session.get(ServedJob, job_id)
        assert served is not None
        return served.status, served.worker


async def test_a_process_booting_beside_a_live_sibling_leaves_its_jobs_and_settles_them_once_it_is_dead(
    start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    async with gated_upstream(first="alpha") as upstream:
        first = await start_node("solo.dev", shared=True)
        await wire_driver(first, upstream, router=None)
        created = await submit(http, first.url, {"model": MODEL, "prompt": "hi"})
        job_id = created["job_id"]
        async with asyncio.timeout(STEP_S):
            async with http.get(f"{first.url}/jobs/{job_id}/events") as response:
                async for _ in events(response):
                    break  # the first process is streaming it
        first_ctx = first.node.ctx
        assert first_ctx is not None
        assert await served_by(first, job_id) == ("running", first_ctx.worker)

        # A second process of the node boots: its sibling is alive, so the job is not an orphan.
        second = await start_node("solo.dev", shared=True, database_url=first.node.options.database_url)
        second_ctx = second.node.ctx
        assert second_ctx is not None
        await liveness.report_alive(first_ctx)
        await liveness.settle_orphans(second_ctx)
        assert await served_by(first, job_id) == ("running", first_ctx.worker)

        # The sibling falls silent past the limit, as a killed process does: now its job is settled, once.
        async with store_of(first).writing() as session:
            await session.execute(
                update(Worker).where(Worker.id == first_ctx.worker).values(last_seen=time.time() - liveness.WORKER_TTL_S - 1)
            )
        await liveness.settle_orphans(second_ctx)
        async with asyncio.timeout(STEP_S):
            updates = await job_updates(http, second.url, job_id)
        assert final_of(updates)["status"] == "failed" and "restarted" in updates[-1]["error"]
        async with asyncio.timeout(STEP_S):
            while (settled := await served_by(first, job_id))[0] == "running":  # written just after the final update
                await asyncio.sleep(0.01)
        assert settled == ("failed", second_ctx.worker)


async def test_a_job_taken_before_the_boot_chores_ran_is_no_orphan_to_a_sibling(
    start_node: StartNode, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers booting together (issue 14: a job ended `failed` right after boot): a process is alive in
    the store before it takes its first request, so a sibling's orphan sweep leaves its jobs alone even while
    its own boot chores (sweep, prune, heartbeat) have not run yet, as on a loaded machine."""
    chores = asyncio.Event()  # never set: every process's boot chores wait

    async def held_boot(ctx: Any) -> None:
        await chores.wait()

    monkeypatch.setattr(upkeep, "boot", held_boot)
    async with gated_upstream(first="alpha", rest=" omega") as upstream:
        first = await start_node("solo.dev", shared=True)
        second = await start_node("solo.dev", shared=True, database_url=first.node.options.database_url)
        first_ctx, second_ctx = first.node.ctx, second.node.ctx
        assert first_ctx is not None and second_ctx is not None
        await wire_driver(first, upstream, router=None)
        job_id = (await submit(http, first.url, {"model": MODEL, "prompt": "hi"}))["job_id"]
        async with asyncio.timeout(STEP_S):
            async with http.get(f"{first.url}/jobs/{job_id}/events") as response:
                async for _ in events(response):
                    break  # the first process is streaming it

        await liveness.settle_orphans(second_ctx)  # what the sibling's boot and heartbeats do
        assert await served_by(first, job_id) == ("running", first_ctx.worker)
        upstream.gate.set()
        async with asyncio.timeout(STEP_S):
            updates = await job_updates(http, second.url, job_id)
    assert final_of(updates)["status"] == "succeeded", updates
    assert text_of(updates) == "alpha omega"


async def test_a_reader_on_one_process_follows_the_chunks_another_process_of_the_node_writes(
    start_node: StartNode, http: aiohttp.ClientSession, node_setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL's safety-net poll (every second) would wake the reader too: put it out of reach of this test.
    monkeypatch.setattr(notifications, "POSTGRES_POLL_S", 3600.0)
    async with gated_upstream(first="alpha", rest=" omega") as upstream:
        first = await start_node("solo.dev", shared=True)
        await wire_driver(first, upstream, router=None)
        second = await start_node("solo.dev", shared=True, database_url=first.node.options.database_url)
        second_ctx = second.node.ctx
        assert second_ctx is not None
        created = await submit(http, first.url, {"model": MODEL, "prompt": "hi"})  # the first process serves it
        woken = second_ctx.signals.watch(created["job_id"])
        async with asyncio.timeout(STEP_S):
            async with http.get(f"{second.url}/jobs/{created['job_id']}/events") as response:
                stream = aiter(events(response))
                assert json.loads((await anext(stream)).data)["delta"] == "alpha"
                if node_setup == "postgres":
                    await woken.wait()  # only a NOTIFY from the other process sets it: SQLite readers look again instead
                upstream.gate.set()
                rest = [json.loads(event.data) async for event in stream]
    assert "".join(update["delta"] for update in rest) == " omega"
    assert final_of(rest)["status"] == "succeeded"
