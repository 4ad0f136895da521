"""What the scheduling tests share (test_dispatch, test_gating, test_router_status, test_node_auth,
test_api_keys): a fake LLM that holds each request until the test lets it go, wiring a router, drivers and
clients one by one, and signed node messages made by hand.

A `HeldUpstream` holds each request after its first chunk until the test releases it, so "running",
"queued" and "overlapping" are states the test sets up, never timing guesses.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from sqlalchemy import select

from emulator.fake_llm import FakeLlmStats
from llm_provider.signing import SIGNATURE_HEADER, NodeKey
from store.models import DriverRegistration, Job, RoutedJob
from tests.conftest import RunningNode, StartNode, Upstream, serve_app
from tests.helpers import GUARD_S, MODEL, count_rows, store_of
from tests.sse_client import job_updates


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
