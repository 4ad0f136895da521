"""Dispatch: jobs go only to drivers that serve their model, within each driver's capacity, the oldest waiting
job first; a job a driver's LLM gives back is tried on another driver, and fails after its attempts; a burst
is spread over the drivers, each job served once; a slow client node does not hold a driver's slot.

Every node is a real server on loopback with its own database, on SQLite and on PostgreSQL (`databases_only`:
this is the router's logic and its queue, which no web host changes); the LLMs are fake upstreams.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import select

from emulator.fake_llm import ChatRequest, FakeLlmSettings, generate_completion
from llm_provider.directory import Peer
from llm_provider.signing import SIGNATURE_HEADER
from store.models import RoutedJob, ServedJob
from tests.conftest import RunningNode, StartNode
from tests.helpers import get_json, store_of
from tests.helpers import migrated_database as migrated_database  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.hosts import serve_app
from tests.scheduling import held_text, routed_row, routed_status, router_status, start_client, start_driver, start_router
from tests.streams import GUARD_S, first_update, follow, submit
from tests.upstreams import MODEL, StartHeld, StartUpstream, Upstream
from tests.upstreams import overloaded as overloaded  # a fixture
from tests.upstreams import start_held as start_held  # a fixture

pytestmark = pytest.mark.databases_only


async def test_jobs_go_only_to_drivers_that_serve_their_model(
    start_node: StartNode, start_held: StartHeld, http: aiohttp.ClientSession
) -> None:
    router = await start_router(start_node)
    upstreams = {name: await start_held(name) for name in ("a1", "a2", "b1")}
    await start_driver(start_node, "a1.dev", router, upstreams["a1"], model="a")
    await start_driver(start_node, "a2.dev", router, upstreams["a2"], model="a")
    await start_driver(start_node, "b1.dev", router, upstreams["b1"], model="b")
    client = await start_client(start_node, router)

    b_jobs = await asyncio.gather(*(submit(http, client.url, {"model": "b", "prompt": f"b-{i}"}) for i in range(12)))
    a_jobs = await asyncio.gather(*(submit(http, client.url, {"model": "a", "prompt": f"a-{i}"}) for i in range(12)))
    # Capacity 1 and held: each driver holds one job while the others wait, so both a-drivers have one now.
    for upstream in upstreams.values():
        await upstream.wait_arrivals(1)
        upstream.release_all()

    for prefix, created in (("b", b_jobs), ("a", a_jobs)):
        results = await asyncio.gather(*(follow(http, client.url, job["job_id"], GUARD_S) for job in created))
        for index, (job, updates) in enumerate(zip(created, results)):
            assert updates[-1]["status"] == "succeeded", updates[-1]
            drivers = {update["driver"] for update in updates}
            assert len(drivers) == 1, updates
            (driver,) = drivers
            if prefix == "b":
                assert driver == "b1.dev"
            else:
                assert driver in ("a1.dev", "a2.dev")
            assert "".join(u["delta"] for u in updates) == held_text(driver.removesuffix(".dev"), f"{prefix}-{index}")
            record = await get_json(http, f"{client.url}/jobs/{job['job_id']}")
            assert (record["driver"], record["router"], record["model"]) == (driver, "fake.dev", prefix)

    assert sorted(upstreams["b1"].prompts()) == sorted(f"b-{i}" for i in range(12))
    assert {held.model for held in upstreams["b1"].held} == {"b"}
    a_prompts = upstreams["a1"].prompts() + upstreams["a2"].prompts()
    assert sorted(a_prompts) == sorted(f"a-{i}" for i in range(12))  # every a-job once, none on b1
    assert {held.model for name in ("a1", "a2") for held in upstreams[name].held} == {"a"}
    assert upstreams["a1"].stats.requests >= 1 and upstreams["a2"].stats.requests >= 1
    assert upstreams["a1"].stats.requests + upstreams["a2"].stats.requests == 12
    assert upstreams["b1"].stats.requests == 12


async def test_a_driver_of_capacity_two_runs_two_jobs_at_once_and_queues_the_third(
    start_node: StartNode, start_held: StartHeld, http: aiohttp.ClientSession
) -> None:
    router = await start_router(start_node)
    upstream = await start_held("llm")
    await start_driver(start_node, "fake2.dev", router, upstream, model=MODEL, capacity=2)
    client = await start_client(start_node, router)

    jobs = {f"job-{i}": (await submit(http, client.url, {"model": MODEL, "prompt": f"job-{i}"}))["job_id"] for i in (1, 2)}
    first, second = await upstream.wait_arrivals(2)
    # Both reached the LLM, and neither has finished: the timelines overlap.
    assert {first.prompt, second.prompt} == {"job-1", "job-2"}
    assert first.finished is None and second.finished is None
    assert upstream.stats.active == 2 and upstream.stats.max_active == 2
    for name in ("job-1", "job-2"):  # their first chunks reached the client
        assert (await first_update(http, client.url, jobs[name]))["delta"] == f"llm:{name}|"

    for i in (3, 4):
        jobs[f"job-{i}"] = (await submit(http, client.url, {"model": MODEL, "prompt": f"job-{i}"}))["job_id"]
    for name, position in (("job-3", 0), ("job-4", 1)):
        record = await get_json(http, f"{client.url}/jobs/{jobs[name]}")
        assert (record["status"], record["queue_position"]) == ("queued", position), record
        assert await routed_status(router, jobs[name]) == "queued"
    for name in ("job-1", "job-2"):
        record = await get_json(http, f"{client.url}/jobs/{jobs[name]}")
        assert (record["status"], record["queue_position"]) == ("running", None), record
    assert upstream.stats.requests == 2

    upstream.release("job-1")
    updates = await follow(http, client.url, jobs["job-1"], GUARD_S)
    assert updates[-1]["status"] == "succeeded"
    third = (await upstream.wait_arrivals(3))[2]
    assert third.prompt == "job-3"  # the oldest waiting job, not job-4
    job_1 = upstream.request_for("job-1")
    assert job_1.finished is not None and third.started >= job_1.finished
    record = await get_json(http, f"{client.url}/jobs/{jobs['job-4']}")
    assert (record["status"], record["queue_position"]) == ("queued", 0), record
    assert upstream.stats.active == 2 and upstream.stats.requests == 3

    upstream.release_all()
    for name in ("job-2", "job-3", "job-4"):
        assert (await follow(http, client.url, jobs[name], GUARD_S))[-1]["status"] == "succeeded"
    assert upstream.stats.max_active == 2 and upstream.stats.requests == 4
    held = {h.prompt: h for h in upstream.held}
    assert held["job-4"].started >= min(held["job-2"].finished or 0, held["job-3"].finished or 0)


async def test_a_job_a_drivers_llm_gives_back_is_retried_on_another_driver(
    start_node: StartNode, start_held: StartHeld, overloaded: Upstream, http: aiohttp.ClientSession
) -> None:
    router = await start_router(start_node)
    healthy = await start_held("good")
    await start_driver(start_node, "fake2.dev", router, healthy, model=MODEL, capacity=2)
    client = await start_client(start_node, router)
    busy = await submit(http, client.url, {"model": MODEL, "prompt": "keeps fake2.dev half busy"})
    await healthy.wait_arrivals(1)
    # Least loaded now: fake4.dev (0 of 1) before fake2.dev (1 of 2), so the next job goes to fake4.dev first.
    await start_driver(start_node, "fake4.dev", router, overloaded, model=MODEL, capacity=1)

    retried = await submit(http, client.url, {"model": MODEL, "prompt": "given back"})
    await healthy.wait_arrivals(2)  # on fake2.dev, after fake4.dev's LLM answered 503
    healthy.release_all()
    updates = await follow(http, client.url, retried["job_id"], GUARD_S)
    assert updates[-1]["status"] == "succeeded" and updates[-1]["driver"] == "fake2.dev", updates[-1]
    assert "".join(u["delta"] for u in updates) == "good:given back| done"
    assert overloaded.stats.requests == 1, "tried once on fake4.dev, then elsewhere (not back on the least-loaded driver)"
    row = await routed_row(router, retried["job_id"])
    assert (row.attempts, row.returned_by, row.driver_node) == (1, "fake4.dev", "fake2.dev")
    assert (await follow(http, client.url, busy["job_id"], GUARD_S))[-1]["status"] == "succeeded"


async def test_a_job_no_driver_can_take_fails_after_its_attempts_with_the_llms_reason(
    start_node: StartNode, overloaded: Upstream, http: aiohttp.ClientSession
) -> None:
    router = await start_router(start_node)
    await start_driver(start_node, "fake4.dev", router, overloaded, model=MODEL, capacity=1)
    client = await start_client(start_node, router)

    created = await submit(http, client.url, {"model": MODEL, "prompt": "nobody can"})
    updates = await follow(http, client.url, created["job_id"], GUARD_S)
    final = updates[-1]
    assert final["status"] == "failed" and not "".join(u["delta"] for u in updates), final
    assert "gave up after 3 attempts" in final["error"] and "HTTP 503" in final["error"], final
    assert overloaded.stats.requests == 3  # the only driver, tried again with backoff, up to max_attempts
    row = await routed_row(router, created["job_id"])
    assert (row.status, row.attempts) == ("failed", 3)
    # three failures in a row cool the driver down
    (driver,) = (await router_status(router))["drivers"]
    assert driver["node"] == "fake4.dev" and driver["cooled_down_until"] is not None, driver


BURST_GUARD_S = 20.0  # 50 jobs through 3 drivers one at a time: about a second when the code works


BURST_TOKENS = 3


async def test_a_burst_of_fifty_jobs_is_spread_over_three_drivers_each_served_once(
    start_node: StartNode, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    router = await start_router(start_node)
    drivers: dict[str, Upstream] = {}
    nodes: dict[str, RunningNode] = {}
    for name in ("d1.dev", "d2.dev", "d3.dev"):
        # Every job takes the same ~20 ms of LLM time, so the free driver is the one that just finished.
        drivers[name] = await start_upstream(ttft=0.02, tokens_per_second=0, default_tokens=BURST_TOKENS)
        nodes[name] = await start_driver(start_node, name, router, drivers[name], model=MODEL, capacity=1)
    client = await start_client(start_node, router)

    prompts = [f"burst {i}" for i in range(50)]
    created = await asyncio.gather(*(submit(http, client.url, {"model": MODEL, "prompt": p}) for p in prompts))
    job_ids = [job["job_id"] for job in created]
    assert len(set(job_ids)) == 50
    results = await asyncio.gather(*(follow(http, client.url, job_id, BURST_GUARD_S) for job_id in job_ids))

    served_by: Counter[str] = Counter()
    settings = FakeLlmSettings(default_tokens=BURST_TOKENS)
    for prompt, updates in zip(prompts, results):
        assert updates[-1]["status"] == "succeeded", updates[-1]
        assert [u["seq"] for u in updates] == list(range(len(updates)))
        (driver,) = {u["driver"] for u in updates}
        served_by[driver] += 1
        expected = generate_completion(ChatRequest(model=MODEL, messages=[{"role": "user", "content": prompt}]), settings)
        assert "".join(u["delta"] for u in updates) == expected.text  # one generation, not two spliced
    assert sum(up.stats.requests for up in drivers.values()) == 50
    assert {name: up.stats.requests for name, up in drivers.items()} == dict(served_by)
    assert all(up.stats.max_active == 1 for up in drivers.values())  # capacity 1 held throughout
    assert min(served_by[name] for name in drivers) >= 10, served_by

    async with store_of(router).reading() as session:
        routed = (await session.scalars(select(RoutedJob))).all()
    assert sorted(job.id for job in routed) == sorted(job_ids)
    # Each went to one driver, the one that served it, at the first attempt.  (Their status is not
    # checked here: the router records a job's end only after its client took the final update,
    # see test_a_slow_client_node_does_not_hold_the_drivers_slot_after_the_job_ended.)
    records = await asyncio.gather(*(get_json(http, f"{client.url}/jobs/{job_id}") for job_id in job_ids))
    driver_of = {record["job_id"]: record["driver"] for record in records}
    assert {(job.id, job.driver_node, job.attempts) for job in routed} == {(job_id, driver_of[job_id], 0) for job_id in job_ids}
    served: list[str] = []
    for name in drivers:
        async with store_of(nodes[name]).reading() as session:
            served += list(await session.scalars(select(ServedJob.id)))
    assert sorted(served) == sorted(job_ids)  # each job on exactly one driver's books


@dataclass
class StallingProxy:
    """Passes node messages on to `target` only once `opened` is set: a node that is slow to answer."""

    url: str
    target: str
    opened: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def stalling_proxy(target: str) -> AsyncIterator[StallingProxy]:
    async def forward(request: web.Request) -> web.Response:
        data = await request.read()
        await proxy.opened.wait()
        headers = {name: request.headers[name] for name in (SIGNATURE_HEADER, "Content-Type") if name in request.headers}
        async with aiohttp.ClientSession() as session, session.post(f"{target}{request.path}", data=data, headers=headers) as answer:
            return web.Response(status=answer.status, body=await answer.read(), content_type=answer.content_type)

    app = web.Application()
    app.router.add_post("/node/message", forward)
    runner, port = await serve_app(app)
    proxy = StallingProxy(url=f"http://127.0.0.1:{port}", target=target)
    try:
        yield proxy
    finally:
        proxy.opened.set()
        await runner.cleanup()


# The driver is free in milliseconds once its job ended; a send stalled behind the slow node would hold it
# for the transport's 30 s timeout.  5 s tells the two apart, even on a loaded machine.
STALL_GUARD_S = 5.0


async def test_a_slow_client_node_does_not_hold_the_drivers_slot_after_the_job_ended(
    start_node: StartNode, start_held: StartHeld, http: aiohttp.ClientSession
) -> None:
    router = await start_router(start_node)
    upstream = await start_held("llm", rest="")  # after the release only the end: the final update is all that is left
    await start_driver(start_node, "fake2.dev", router, upstream, model=MODEL, capacity=1)
    slow = await start_client(start_node, router, "fake3.dev")
    other = await start_client(start_node, router, "fake4.dev")
    first = await submit(http, slow.url, {"model": MODEL, "prompt": "slow client's"})
    assert (await first_update(http, slow.url, first["job_id"]))["delta"] == "llm:slow client's|"
    waiting = await submit(http, other.url, {"model": MODEL, "prompt": "other client's"})
    assert waiting["status"] == "queued"
    peers = router.node.options.peers  # the directory every node of this test reads
    real = peers[slow.name]
    async with stalling_proxy(real.url) as proxy:
        peers[slow.name] = Peer.at(proxy.url, real.public_key)  # fake3.dev now answers late
        try:
            upstream.release("slow client's")
            try:
                async with asyncio.timeout(STALL_GUARD_S), upstream.changed:
                    await upstream.changed.wait_for(lambda: len(upstream.held) >= 2)
            except TimeoutError:
                pytest.fail(f"the LLM finished fake3.dev's job, yet fake4.dev's queued job did not start within {STALL_GUARD_S} s")
        finally:
            proxy.opened.set()
            upstream.release_all()
            for url, job in ((slow.url, first), (other.url, waiting)):
                assert (await follow(http, url, job["job_id"], GUARD_S))[-1]["status"] == "succeeded"
            peers[slow.name] = real
