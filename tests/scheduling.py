"""What the scheduling tests share (test_dispatch, test_gating, test_router_status, test_node_auth,
test_api_keys): wiring a router, drivers and clients one by one, reading the router's rows, and signed node
messages made by hand.

Their LLMs are tests/upstreams.py's: mostly held upstreams (`start_held`), which hold each request after its
first chunk until the test releases it, so "running", "queued" and "overlapping" are states the test sets
up, never timing guesses.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from sqlalchemy import select

from llm_provider.signing import SIGNATURE_HEADER, NodeKey
from store.models import DriverRegistration, Job, RoutedJob
from tests.conftest import RunningNode, StartNode
from tests.helpers import count_rows, store_of
from tests.upstreams import MODEL, HeldUpstream, StartHeld, Upstream


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


async def router_status(router: RunningNode) -> dict[str, Any]:
    return await router.admin("RouterStatus")


async def routed_status(router: RunningNode, job_id: str) -> str | None:
    async with store_of(router).reading() as session:
        job = await session.get(RoutedJob, job_id)
        return None if job is None else job.status


def held_text(upstream: str, prompt: str) -> str:
    return f"{upstream}:{prompt}| done"


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
