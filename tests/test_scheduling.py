"""Scheduling: routing by model, driver capacity, load spreading, gating and bounded queues,
RouterStatus, API keys, and node authentication of state-changing messages.

Every node is a real server on loopback (under each web host and database the conftest
parametrizes) with its own database; the LLMs are fake upstreams.  A `HeldUpstream` holds each request after its first chunk until the test releases it,
so "running", "queued" and "overlapping" are states the test sets up, never timing guesses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from sqlalchemy import select

from emulator.fake_llm import ChatRequest, FakeLlmSettings, FakeLlmStats, generate_completion
from llm_provider.directory import Peer
from llm_provider.signing import SIGNATURE_HEADER, NodeKey
from store.models import ApiKey, Base, DriverRegistration, Job, RoutedJob, ServedJob
from tests.cluster import first_update
from tests.conftest import NODE_SETUPS, Network, RunningNode, StartNode, StartUpstream, Upstream, serve_app
from tests.helpers import (
    GUARD_S,
    MODEL,
    assert_error_body,
    count_rows,
    get_json,
    store_of,
    submit,
)
from tests.helpers import migrated_database as migrated_database  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.sse_client import job_updates

pytestmark = pytest.mark.databases_only

BURST_GUARD_S = 20.0  # 50 jobs through 3 drivers one at a time: about a second when the code works


# --- a fake LLM that holds each request until the test lets it go ------------------------------------


@dataclass
class HeldRequest:
    model: str
    prompt: str
    started: float  # time.perf_counter() when the request reached the upstream
    finished: float | None = None  # ... and when the test released it (it counts as active until then)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class HeldUpstream(Upstream):
    """Streams `"<name>:<prompt>|"`, holds the request until released, then `" done"` and stop.

    `stats` counts requests and the requests in flight (`active`, `max_active`) as the fake LLM does.
    """

    name: str = ""
    rest: str = " done"  # streamed after the release, before the end
    held: list[HeldRequest] = field(default_factory=list)
    opened: bool = False  # after release_all, nothing is held any more
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_arrivals(self, count: int) -> list[HeldRequest]:
        """The first `count` requests, once that many have reached this upstream."""
        async with asyncio.timeout(GUARD_S), self.changed:
            await self.changed.wait_for(lambda: len(self.held) >= count)
        return self.held[:count]

    def request_for(self, prompt: str) -> HeldRequest:
        (found,) = [held for held in self.held if held.prompt == prompt]
        return found

    def release(self, prompt: str) -> None:
        self.request_for(prompt).release.set()

    def release_all(self) -> None:
        self.opened = True
        for held in self.held:
            held.release.set()

    def prompts(self) -> list[str]:
        return [held.prompt for held in self.held]


StartHeld = Callable[..., Awaitable[HeldUpstream]]


@pytest.fixture
async def start_held() -> AsyncIterator[StartHeld]:
    runners: list[web.AppRunner] = []
    upstreams: list[HeldUpstream] = []

    async def start(name: str, rest: str = " done") -> HeldUpstream:
        upstream: HeldUpstream

        async def chat_completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            held = HeldRequest(model=body["model"], prompt=body["messages"][-1]["content"], started=time.perf_counter())
            if upstream.opened:
                held.release.set()
            upstream.stats.requests += 1
            upstream.stats.enter()
            try:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)

                def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
                    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                    payload = {"id": "chatcmpl-held", "object": "chat.completion.chunk", "created": 0, "model": body["model"], "choices": [choice]}
                    return f"data: {json.dumps(payload)}\n\n".encode()

                await response.write(chunk({"role": "assistant", "content": f"{upstream.name}:{held.prompt}|"}, None))
                async with upstream.changed:
                    upstream.held.append(held)
                    upstream.changed.notify_all()
                await held.release.wait()
                held.finished = time.perf_counter()
                upstream.stats.leave()  # done generating: what follows is the tail of the reply
                if upstream.rest:
                    await response.write(chunk({"content": upstream.rest}, None))
                await response.write(chunk({}, "stop"))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionResetError:
                pass
            finally:
                if held.finished is None:
                    upstream.stats.leave()
            return response

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat_completions)
        runner, port = await serve_app(app)
        runners.append(runner)
        upstream = HeldUpstream(url=f"http://127.0.0.1:{port}/v1", stats=FakeLlmStats(), name=name, rest=rest)
        upstreams.append(upstream)
        return upstream

    yield start
    for upstream in upstreams:
        upstream.release_all()
    for runner in runners:
        await runner.cleanup()


# --- wiring and reading -------------------------------------------------------------------------------


async def start_router(start_node: StartNode, name: str = "fake.dev") -> RunningNode:
    router = await start_node(name)
    await router.admin("StartRouter")
    return router


async def start_driver(start_node: StartNode, name: str, router: RunningNode, upstream: Upstream, **serve: Any) -> RunningNode:
    """A node whose LLM is `upstream`, registered with `router` as serving `serve` (SetLocalDriver's fields)."""
    driver = await start_node(name)
    await driver.admin({"SetRouter": {"node": router.name}})
    await driver.admin({"RegisterOaiProviderEndpoint": {"endpoint": upstream.url}}, "openai")
    reply = await driver.admin({"SetLocalDriver": {"is_public": True, **serve}})
    assert reply.get("note") is None, reply  # the router heard of it
    return driver


async def start_client(start_node: StartNode, router: RunningNode, name: str = "fake3.dev") -> RunningNode:
    client = await start_node(name)
    await client.admin({"SetRouter": {"node": router.name}})
    return client


async def post_job(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any, CIMultiDict[str]]:
    async with http.post(f"{url}/jobs", json=body, headers=headers or {}) as response:
        return response.status, await response.json(content_type=None), response.headers.copy()


async def final_of(http: aiohttp.ClientSession, url: str, job_id: str, guard: float = GUARD_S) -> list[dict[str, Any]]:
    async with asyncio.timeout(guard):
        return await job_updates(http, url, job_id)


async def router_status(router: RunningNode) -> dict[str, Any]:
    return await router.admin("RouterStatus")


async def routed_status(router: RunningNode, job_id: str) -> str | None:
    async with store_of(router).reading() as session:
        job = await session.get(RoutedJob, job_id)
        return None if job is None else job.status


def held_text(upstream: str, prompt: str) -> str:
    return f"{upstream}:{prompt}| done"


# --- 1. routing by model ----------------------------------------------------------------------------


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
        results = await asyncio.gather(*(final_of(http, client.url, job["job_id"]) for job in created))
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


# --- 2. capacity ----------------------------------------------------------------------------------------


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
    updates = await final_of(http, client.url, jobs["job-1"])
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
        assert (await final_of(http, client.url, jobs[name]))[-1]["status"] == "succeeded"
    assert upstream.stats.max_active == 2 and upstream.stats.requests == 4
    held = {h.prompt: h for h in upstream.held}
    assert held["job-4"].started >= min(held["job-2"].finished or 0, held["job-3"].finished or 0)


# --- 2b. a driver whose LLM cannot take the job ----------------------------------------------------------


@pytest.fixture
async def overloaded() -> AsyncIterator[Upstream]:
    """An LLM endpoint that answers every request 503 with a plain-text body: busy, worth trying elsewhere."""
    stats = FakeLlmStats()

    async def chat_completions(request: web.Request) -> web.Response:
        stats.requests += 1
        return web.Response(status=503, text="overloaded, try again later")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner, port = await serve_app(app)
    try:
        yield Upstream(url=f"http://127.0.0.1:{port}/v1", stats=stats)
    finally:
        await runner.cleanup()


async def routed_row(router: RunningNode, job_id: str) -> RoutedJob:
    async with store_of(router).reading() as session:
        row = await session.get(RoutedJob, job_id)
    assert row is not None, job_id
    return row


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
    updates = await final_of(http, client.url, retried["job_id"])
    assert updates[-1]["status"] == "succeeded" and updates[-1]["driver"] == "fake2.dev", updates[-1]
    assert "".join(u["delta"] for u in updates) == "good:given back| done"
    assert overloaded.stats.requests == 1, "tried once on fake4.dev, then elsewhere (not back on the least-loaded driver)"
    row = await routed_row(router, retried["job_id"])
    assert (row.attempts, row.returned_by, row.driver_node) == (1, "fake4.dev", "fake2.dev")
    assert (await final_of(http, client.url, busy["job_id"]))[-1]["status"] == "succeeded"


async def test_a_job_no_driver_can_take_fails_after_its_attempts_with_the_llms_reason(
    start_node: StartNode, overloaded: Upstream, http: aiohttp.ClientSession
) -> None:
    router = await start_router(start_node)
    await start_driver(start_node, "fake4.dev", router, overloaded, model=MODEL, capacity=1)
    client = await start_client(start_node, router)

    created = await submit(http, client.url, {"model": MODEL, "prompt": "nobody can"})
    updates = await final_of(http, client.url, created["job_id"])
    final = updates[-1]
    assert final["status"] == "failed" and not "".join(u["delta"] for u in updates), final
    assert "gave up after 3 attempts" in final["error"] and "HTTP 503" in final["error"], final
    assert overloaded.stats.requests == 3  # the only driver, tried again with backoff, up to max_attempts
    row = await routed_row(router, created["job_id"])
    assert (row.status, row.attempts) == ("failed", 3)
    # three failures in a row cool the driver down
    (driver,) = (await router_status(router))["drivers"]
    assert driver["node"] == "fake4.dev" and driver["cooled_down_until"] is not None, driver


# --- 3. burst -------------------------------------------------------------------------------------------


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
    results = await asyncio.gather(*(final_of(http, client.url, job_id, BURST_GUARD_S) for job_id in job_ids))

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


# --- 4. gating ------------------------------------------------------------------------------------------


@dataclass
class GatedNet:
    router: RunningNode
    driver: RunningNode
    client: RunningNode
    upstream: HeldUpstream


@pytest.fixture
async def held_net(start_node: StartNode, start_held: StartHeld) -> GatedNet:
    """fake.dev routes; fake2.dev serves llama3 (capacity 1) from a held upstream; fake3.dev is a client."""
    router = await start_router(start_node)
    upstream = await start_held("llm")
    driver = await start_driver(start_node, "fake2.dev", router, upstream, model=MODEL, capacity=1)
    client = await start_client(start_node, router)
    return GatedNet(router=router, driver=driver, client=client, upstream=upstream)


async def stored_jobs(net: GatedNet) -> tuple[int, int]:
    return await count_rows(net.client, Job), await count_rows(net.router, RoutedJob)


async def test_gate_deny_and_allow_lists_refuse_with_the_reason_and_store_nothing(
    held_net: GatedNet, http: aiohttp.ClientSession
) -> None:
    net = held_net
    for gate, reason in (
        ({"deny": ["fake3.dev"]}, "fake3.dev is on this router's deny list"),
        ({"allow": ["fake2.dev"]}, "fake3.dev is not on this router's allow list"),
        ({"allow": [], "deny": []}, "fake3.dev is not on this router's allow list"),
    ):
        assert await net.router.admin({"SetGate": gate}) == {"ok": True, "note": None}
        status, body, _ = await post_job(http, net.client.url, {"model": MODEL, "prompt": "hi"})
        assert status == 403, (gate, body)
        assert reason in assert_error_body(body, "refused_by_gate")["message"]
        assert await stored_jobs(net) == (0, 0)
    assert net.upstream.stats.requests == 0

    # The same client, once on the allow list, is served: the refusals were the lists' doing.
    await net.router.admin({"SetGate": {"allow": ["fake2.dev", "fake3.dev"], "deny": ["evil.dev"]}})
    net.upstream.release_all()
    created = await submit(http, net.client.url, {"model": MODEL, "prompt": "hi"})
    assert (await final_of(http, net.client.url, created["job_id"]))[-1]["status"] == "succeeded"
    assert await stored_jobs(net) == (1, 1)


async def test_gate_max_in_flight_per_client_refuses_a_second_job_until_the_first_ends(
    held_net: GatedNet, start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"max_in_flight_per_client": 1}})
    first = await submit(http, net.client.url, {"model": MODEL, "prompt": "first"})
    await net.upstream.wait_arrivals(1)

    status, body, _ = await post_job(http, net.client.url, {"model": MODEL, "prompt": "second"})
    assert status == 403, body
    assert "fake3.dev already has 1 jobs in flight (limit 1)" in assert_error_body(body, "refused_by_gate")["message"]
    assert await stored_jobs(net) == (1, 1)
    # The limit is per client: another client's job is taken (it waits for the busy driver).
    other_client = await start_client(start_node, net.router, "fake4.dev")
    other = await submit(http, other_client.url, {"model": MODEL, "prompt": "other"})
    assert other["status"] == "queued"

    net.upstream.release_all()
    assert (await final_of(http, net.client.url, first["job_id"]))[-1]["status"] == "succeeded"
    third = await submit(http, net.client.url, {"model": MODEL, "prompt": "third"})
    for url, job in ((net.client.url, third), (other_client.url, other)):
        assert (await final_of(http, url, job["job_id"]))[-1]["status"] == "succeeded"
    assert net.upstream.prompts() == ["first", "other", "third"]


async def test_a_full_queue_answers_429_and_stores_nothing(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"max_queue": 1}})
    running = await submit(http, net.client.url, {"model": MODEL, "prompt": "running"})
    await net.upstream.wait_arrivals(1)
    waiting = await submit(http, net.client.url, {"model": MODEL, "prompt": "waiting"})
    assert waiting["status"] == "queued"
    assert await stored_jobs(net) == (2, 2)

    status, body, _ = await post_job(http, net.client.url, {"model": MODEL, "prompt": "one too many"})
    assert status == 429, body
    assert "full" in assert_error_body(body, "queue_full")["message"]
    assert await stored_jobs(net) == (2, 2)

    # The router itself answers the refusal with Retry-After (seconds).
    raw = envelope("fake3.dev", "driver", "router", {"RunJob": {"job": job_spec("direct", "fake3.dev")}})
    status, body, headers = await post_envelope(http, net.router, raw, net.client)
    assert status == 429, body
    assert int(headers["Retry-After"]) >= 1
    assert await stored_jobs(net) == (2, 2)

    net.upstream.release_all()
    for job in (running, waiting):
        assert (await final_of(http, net.client.url, job["job_id"]))[-1]["status"] == "succeeded"
    assert net.upstream.prompts() == ["running", "waiting"]


@pytest.mark.parametrize("node_setup", NODE_SETUPS)  # a header, written by each host
async def test_a_full_queue_429_on_the_clients_node_carries_retry_after(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"max_queue": 1}})
    jobs = [await submit(http, net.client.url, {"model": MODEL, "prompt": "running"})]
    await net.upstream.wait_arrivals(1)
    jobs.append(await submit(http, net.client.url, {"model": MODEL, "prompt": "waiting"}))
    status, body, headers = await post_job(http, net.client.url, {"model": MODEL, "prompt": "one too many"})
    net.upstream.release_all()
    for job in jobs:
        assert (await final_of(http, net.client.url, job["job_id"]))[-1]["status"] == "succeeded"
    assert status == 429, body
    assert "Retry-After" in headers, dict(headers)
    assert int(headers["Retry-After"]) >= 1


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
                assert (await final_of(http, url, job["job_id"]))[-1]["status"] == "succeeded"
            peers[slow.name] = real


# --- 5. RouterStatus ---------------------------------------------------------------------------------------


def drivers_by_node(state: dict[str, Any]) -> dict[str, tuple[list[str], int, int]]:
    return {d["node"]: (d["models"], d["capacity"], d["load"]) for d in state["drivers"]}


async def test_router_status_reports_drivers_loads_and_queue_lengths(
    held_net: GatedNet, start_node: StartNode, start_held: StartHeld, http: aiohttp.ClientSession
) -> None:
    net = held_net
    other = await start_held("other")
    await start_driver(start_node, "fake4.dev", net.router, other, models=["mistral", "qwen"], capacity=3)

    idle = await router_status(net.router)
    assert drivers_by_node(idle) == {"fake2.dev": ([MODEL], 1, 0), "fake4.dev": (["mistral", "qwen"], 3, 0)}
    assert idle["queues"] == {}
    assert all(d["is_public"] and d["cooled_down_until"] is None and d["last_seen"] > 0 for d in idle["drivers"])

    first = await submit(http, net.client.url, {"model": MODEL, "prompt": "first"})
    await net.upstream.wait_arrivals(1)
    state = await router_status(net.router)
    assert drivers_by_node(state)["fake2.dev"] == ([MODEL], 1, 1)
    assert drivers_by_node(state)["fake4.dev"] == (["mistral", "qwen"], 3, 0)
    assert state["queues"] == {}

    second = await submit(http, net.client.url, {"model": MODEL, "prompt": "second"})
    state = await router_status(net.router)
    assert drivers_by_node(state)["fake2.dev"][2] == 1
    assert state["queues"] == {MODEL: 1}

    # The first ends; in the same commit the second takes the slot, before it reaches the LLM.
    net.upstream.release("first")
    await net.upstream.wait_arrivals(2)
    state = await router_status(net.router)
    assert drivers_by_node(state)["fake2.dev"][2] == 1
    assert state["queues"] == {}

    net.upstream.release_all()
    for job in (first, second):
        assert (await final_of(http, net.client.url, job["job_id"]))[-1]["status"] == "succeeded"


async def test_router_status_on_a_node_that_does_not_route_is_refused(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    token = held_net.client.node.home.admin_token()
    async with http.post(f"{held_net.client.url}/admin", json="RouterStatus", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 503
        assert_error_body(await response.json(), "not_a_router")


# --- 6. API keys ---------------------------------------------------------------------------------------------


async def admin_raw(node: RunningNode, http: aiohttp.ClientSession, message: Any) -> tuple[int, Any]:
    token = node.node.home.admin_token()
    async with http.post(f"{node.url}/admin", json=message, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


def database_bytes(node: RunningNode) -> bytes:
    """The node's SQLite file and its write-ahead log, as they are on disk."""
    database = node.node.home.database
    return b"".join(path.read_bytes() for path in (database, database.with_name(database.name + "-wal")) if path.exists())


@pytest.mark.parametrize("node_setup", NODE_SETUPS)  # the Authorization header, read by each host
async def test_api_keys_are_required_shown_once_stored_hashed_and_revocable(network: Network, http: aiohttp.ClientSession) -> None:
    client = network.client
    job = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert await client.admin("RequireApiKeys") == {"ok": True, "note": None}

    for headers in ({}, {"Authorization": "Bearer llmp-not-a-key"}, {"Authorization": "llmp-no-bearer"}):
        status, body, _ = await post_job(http, client.url, job, headers)
        assert status == 401, (headers, body)
        assert_error_body(body, "invalid_api_key")
    async with http.post(f"{client.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.status == 401
    async with http.get(f"{client.url}/v1/models") as response:
        assert response.status == 401
    assert await count_rows(client, Job) == 0
    assert await count_rows(network.router, RoutedJob) == 0

    created = await client.admin({"CreateApiKey": {"label": "alice"}})
    key = created["key"]
    assert created["label"] == "alice" and isinstance(key, str) and len(key) >= 32
    # Shown once: asking again for the same label is refused, and the refusal does not repeat the key.
    status, body = await admin_raw(client, http, {"CreateApiKey": {"label": "alice"}})
    assert status == 409 and key not in json.dumps(body)
    assert_error_body(body, "key_exists")

    bearer = {"Authorization": f"Bearer {key}"}
    status, body, _ = await post_job(http, client.url, job, bearer)
    assert status == 202, body
    job_id = body["job_id"]
    async with aiohttp.ClientSession(headers=bearer) as keyed:
        updates = await final_of(keyed, client.url, job_id)
        assert updates[-1]["status"] == "succeeded"
        record = await get_json(keyed, f"{client.url}/jobs/{job_id}")
    assert record["client"] == "key:alice"
    async with http.get(f"{client.url}/jobs/{job_id}") as response:
        assert response.status == 401  # without the key, not even the record

    digest = hashlib.sha256(key.encode()).hexdigest()
    async with store_of(client).reading() as session:
        rows = [(row.label, row.key_hash) for row in await session.scalars(select(ApiKey))]
    assert rows == [("alice", digest)]
    for table in Base.metadata.sorted_tables:  # nowhere in the node's database, whatever it runs on
        async with store_of(client).reading() as session:
            contents = (await session.execute(select(table))).all()
        assert key not in repr(contents), table.name
    if store_of(client).url.startswith("sqlite"):  # and not in the file itself, read without the node
        with sqlite3.connect(client.node.home.database) as connection:
            assert connection.execute("SELECT label, key_hash FROM api_keys").fetchall() == [("alice", digest)]
        on_disk = database_bytes(client)
        assert digest.encode() in on_disk  # the search below looks where the keys are
        assert key.encode() not in on_disk
        assert key.removeprefix("llmp-").encode() not in on_disk

    assert await client.admin({"RevokeApiKey": {"label": "alice"}}) == {"ok": True, "note": None}
    status, body, _ = await post_job(http, client.url, job, bearer)
    assert status == 401, body
    assert_error_body(body, "invalid_api_key")
    async with http.get(f"{client.url}/jobs/{job_id}", headers=bearer) as response:
        assert response.status == 401
    assert await count_rows(client, Job) == 1
    assert await count_rows(client, ApiKey) == 0


# --- 7. node authentication -------------------------------------------------------------------------------


def envelope(
    source_node: str, source_process: str, target: str, body: Any, sent_at: float | None = None, destination: str = "fake.dev"
) -> dict[str, Any]:
    return {
        "source": {"node": source_node, "process": source_process},
        "destination": destination,
        "target": target,
        "sent_at": time.time() if sent_at is None else sent_at,
        "nonce": secrets.token_hex(16),
        "body": body,
    }


def signed(raw: dict[str, Any], signer: RunningNode) -> tuple[bytes, dict[str, str]]:
    data = json.dumps(raw).encode()
    return data, {SIGNATURE_HEADER: NodeKey.load_or_create(signer.node.home.key_file).sign(data), "Content-Type": "application/json"}


async def post_signed(
    http: aiohttp.ClientSession, to: RunningNode, data: bytes, headers: dict[str, str]
) -> tuple[int, Any, CIMultiDict[str]]:
    async with http.post(f"{to.url}/node/message", data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None), response.headers.copy()


async def post_envelope(
    http: aiohttp.ClientSession, to: RunningNode, raw: dict[str, Any], signer: RunningNode
) -> tuple[int, Any, CIMultiDict[str]]:
    return await post_signed(http, to, *signed({**raw, "destination": to.name}, signer))


def job_spec(job_id: str, client_node: str, model: str = MODEL) -> dict[str, Any]:
    now = time.time()
    return {
        "job_id": job_id, "client_node": client_node, "model": model,
        "messages": [{"role": "user", "content": "hello"}], "created_at": now, "deadline": now + 60,
    }


def register(models: list[str], capacity: int) -> dict[str, Any]:
    return {"RegisterDriver": {"models": models, "is_public": True, "capacity": capacity, "as_of": time.time()}}


async def registrations(router: RunningNode) -> list[tuple[str, str, int]]:
    async with store_of(router).reading() as session:
        rows = await session.scalars(select(DriverRegistration).order_by(DriverRegistration.node, DriverRegistration.model))
        return [(row.node, row.model, row.capacity) for row in rows]


async def test_a_node_signing_in_another_nodes_name_is_refused_and_changes_nothing(
    held_net: GatedNet, http: aiohttp.ClientSession
) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"deny": ["fake3.dev"]}})
    before = await registrations(net.router)
    assert before == [("fake2.dev", MODEL, 1)]
    # fake3.dev, with its own valid key, claims to be the driver fake2.dev: to take its registration
    # over, and to slip a job past the deny list in fake2.dev's name.
    for body in (register(["stolen"], 99), {"RunJob": {"job": job_spec("smuggled", "fake2.dev")}}):
        status, reply, _ = await post_envelope(http, net.router, envelope("fake2.dev", "driver", "router", body), net.client)
        assert status == 401, reply
        assert_error_body(reply, "bad_signature")
    assert await registrations(net.router) == before
    assert await count_rows(net.router, RoutedJob) == 0
    # Signed in its own name, the same job is the deny list's to refuse.
    status, reply, _ = await post_envelope(
        http, net.router, envelope("fake3.dev", "driver", "router", {"RunJob": {"job": job_spec("own", "fake3.dev")}}), net.client
    )
    assert status == 403
    assert_error_body(reply, "refused_by_gate")
    assert await count_rows(net.router, RoutedJob) == 0


async def test_a_replayed_registration_is_refused_and_does_not_undo_a_newer_one(
    held_net: GatedNet, http: aiohttp.ClientSession
) -> None:
    net = held_net
    data, headers = signed(envelope("fake2.dev", "driver", "router", register([MODEL, "old"], 5)), net.driver)
    status, reply, _ = await post_signed(http, net.router, data, headers)  # the original, as the driver sent it
    assert status == 200, reply
    assert await registrations(net.router) == [("fake2.dev", MODEL, 5), ("fake2.dev", "old", 5)]

    await net.driver.admin({"SetLocalDriver": {"model": MODEL, "is_public": True, "capacity": 2}})
    assert await registrations(net.router) == [("fake2.dev", MODEL, 2)]
    status, reply, _ = await post_signed(http, net.router, data, headers)  # the same bytes, the same signature
    assert status == 401, reply
    assert "replayed" in assert_error_body(reply, "replayed_message")["message"]
    assert await registrations(net.router) == [("fake2.dev", MODEL, 2)]

    # A replayed job submission is refused as a replay (401), not merely as a duplicate, and adds nothing.
    data, headers = signed(envelope("fake3.dev", "driver", "router", {"RunJob": {"job": job_spec("once", "fake3.dev")}}), net.client)
    status, reply, _ = await post_signed(http, net.router, data, headers)
    assert status == 200 and reply["job_id"] == "once"
    status, reply, _ = await post_signed(http, net.router, data, headers)
    assert status == 401
    assert_error_body(reply, "replayed_message")
    assert await count_rows(net.router, RoutedJob) == 1



async def test_a_runjob_sent_again_after_a_lost_answer_is_the_same_job(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    """A client node whose router replica died before answering sends the RunJob again, in a fresh envelope
    (a retry, not a replay): the router answers for the job it has, and hands it out once."""
    net = held_net
    spec = job_spec("sent-twice", "fake3.dev")
    replies = []
    for _ in range(2):
        status, reply, _ = await post_envelope(http, net.router, envelope("fake3.dev", "driver", "router", {"RunJob": {"job": spec}}), net.client)
        assert status == 200, reply
        replies.append(reply["job_id"])
    assert replies == ["sent-twice", "sent-twice"]
    assert await count_rows(net.router, RoutedJob) == 1
    (held,) = await net.upstream.wait_arrivals(1)
    assert held.prompt == "hello"
    # Another node may not claim the job's id.
    raw = envelope("fake2.dev", "driver", "router", {"RunJob": {"job": job_spec("sent-twice", "fake2.dev")}})
    status, reply, _ = await post_envelope(http, net.router, raw, net.driver)
    assert status == 409, reply
    assert_error_body(reply, "duplicate_job")
    assert await count_rows(net.router, RoutedJob) == 1
    assert net.upstream.stats.requests == 1

async def test_envelopes_sent_outside_the_replay_window_are_refused(
    start_node: StartNode, start_held: StartHeld, http: aiohttp.ClientSession
) -> None:
    before_boot = time.time()
    router = await start_router(start_node)
    upstream = await start_held("llm")
    driver = await start_driver(start_node, "fake2.dev", router, upstream, model=MODEL, capacity=1)
    assert await registrations(router) == [("fake2.dev", MODEL, 1)]
    now = time.time()
    for name, sent_at in (
        ("two minutes old", now - 120),
        ("two minutes ahead", now + 120),
        ("before the router booted", before_boot - 3),  # within 60 s, but older than the process
    ):
        raw = envelope("fake2.dev", "driver", "router", register(["late"], 7), sent_at=sent_at)
        status, reply, _ = await post_envelope(http, router, raw, driver)
        assert status == 401, (name, reply)
        assert "too old, or from the future" in assert_error_body(reply, "replayed_message")["message"], name
    assert await registrations(router) == [("fake2.dev", MODEL, 1)]
    # The same message, sent now, is taken: only the time was at fault.
    status, reply, _ = await post_envelope(http, router, envelope("fake2.dev", "driver", "router", register(["late"], 7)), driver)
    assert status == 200, reply
    assert await registrations(router) == [("fake2.dev", "late", 7)]


async def test_an_envelope_for_one_router_replayed_to_another_is_refused(
    held_net: GatedNet, start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    net = held_net
    second_router = await start_router(start_node, "fake5.dev")
    data, headers = signed(envelope("fake2.dev", "driver", "router", register([MODEL], 4)), net.driver)
    status, reply, _ = await post_signed(http, net.router, data, headers)
    assert status == 200, reply
    status, reply, _ = await post_signed(http, second_router, data, headers)  # fake2.dev never registered with fake5.dev
    assert await registrations(second_router) == []
    assert status == 401, reply


async def test_a_message_one_replica_took_is_refused_as_a_replay_by_the_other(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    # Two processes of one router: one name, one home (key, admin token) and one database.
    first = await start_node("fake.dev", shared=True)
    await first.admin("StartRouter")
    second = await start_node("fake.dev", shared=True, database_url=first.node.options.database_url)
    driver = await start_node("fake2.dev")
    data, headers = signed(envelope("fake2.dev", "driver", "router", register([MODEL], 2)), driver)
    status, reply, _ = await post_signed(http, first, data, headers)
    assert status == 200, reply
    status, reply, _ = await post_signed(http, second, data, headers)
    assert status == 401, reply
    assert "replayed" in assert_error_body(reply, "replayed_message")["message"]
    # The second replica takes fresh messages, into the one database both serve.
    status, reply, _ = await post_envelope(http, second, envelope("fake2.dev", "driver", "router", register([MODEL], 3)), driver)
    assert status == 200, reply
    assert await registrations(first) == [("fake2.dev", MODEL, 3)]
