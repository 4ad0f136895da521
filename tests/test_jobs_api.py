"""The client API of jobs: POST /jobs, GET /jobs/{id}, GET /jobs/{id}/events, /healthz and /v1/models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from handlers import jobs
from schemas.jobs import JobRecord
from store.models import Job, RoutedJob
from tests.conftest import Network, StartNode, start_network
from tests.helpers import count_rows, expected_completion, get_json
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.streams import GUARD_S, events, job_stream, job_updates, next_update, run_job, submit, text_of, updates_to_final
from tests.upstreams import MODEL, RecordingUpstream, gated_upstream, recording_upstream

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream(ttft=0.0, tokens_per_second=0) as upstream:
        yield upstream


@pytest.fixture
async def recorded_network(start_node: StartNode, upstream: RecordingUpstream) -> Network:
    """The seed's three nodes wired to an upstream that records what it was asked."""
    return await start_network(start_node, upstream)


def sent_upstream(network: Network) -> dict[str, Any]:
    """The body of the one chat request the recording upstream received."""
    upstream = network.upstream
    assert isinstance(upstream, RecordingUpstream)
    assert len(upstream.requests) == 1, upstream.requests
    body: dict[str, Any] = upstream.requests[0].body
    return body


# --- POST /jobs ---------------------------------------------------------------------------


async def test_submit_answers_202_with_job_id_events_url_and_status(network: Network, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{network.client.url}/jobs", json={"model": MODEL, "prompt": "hello"}) as response:
        assert response.status == 202, await response.text()
        assert response.content_type == "application/json"
        created = await response.json()
    assert isinstance(created["job_id"], str) and created["job_id"]
    assert created["events_url"] == f"/jobs/{created['job_id']}/events"
    assert created["status"] in {"queued", "running"}
    async with asyncio.timeout(GUARD_S):
        await job_updates(http, network.client.url, created["job_id"])


async def test_prompt_becomes_one_user_message_for_the_upstream(recorded_network: Network, http: aiohttp.ClientSession) -> None:
    _, updates = await run_job(http, recorded_network.client.url, {"model": MODEL, "prompt": "hello"})
    assert sent_upstream(recorded_network)["messages"] == HELLO
    tokens, _ = expected_completion(HELLO)
    assert text_of(updates) == "".join(tokens)


async def test_messages_form_is_sent_to_the_upstream_as_given(recorded_network: Network, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]
    _, updates = await run_job(http, recorded_network.client.url, {"model": MODEL, "messages": messages})
    assert updates[-1]["status"] == "succeeded"
    assert sent_upstream(recorded_network)["messages"] == messages
    tokens, _ = expected_completion(messages)
    assert text_of(updates) == "".join(tokens)


async def test_prompt_and_equivalent_messages_give_the_same_text(network: Network, http: aiohttp.ClientSession) -> None:
    _, by_prompt = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello"})
    _, by_messages = await run_job(http, network.client.url, {"model": MODEL, "messages": HELLO})
    assert text_of(by_prompt) == text_of(by_messages) != ""


async def test_sampling_parameters_reach_the_upstream(recorded_network: Network, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "hello", "seed": 7, "max_tokens": 5, "temperature": 0.25, "top_p": 0.5, "stop": ["zzz"]}
    _, updates = await run_job(http, recorded_network.client.url, body)
    assert updates[-1]["status"] == "succeeded"
    sent = sent_upstream(recorded_network)  # exactly one request
    assert sent["model"] == MODEL
    assert sent["messages"] == HELLO
    assert sent["stream"] is True
    assert (sent["seed"], sent["max_tokens"], sent["temperature"], sent["top_p"], sent["stop"]) == (7, 5, 0.25, 0.5, ["zzz"])


async def test_unset_sampling_parameters_are_not_sent_upstream(recorded_network: Network, http: aiohttp.ClientSession) -> None:
    await run_job(http, recorded_network.client.url, {"model": MODEL, "prompt": "hello"})
    sent = sent_upstream(recorded_network)
    assert not {"seed", "max_tokens", "temperature", "top_p", "stop"} & set(sent)


async def test_equal_seed_gives_equal_text_and_other_seed_differs(network: Network, http: aiohttp.ClientSession) -> None:
    _, first = await run_job(http, network.client.url, {"model": MODEL, "prompt": "one", "seed": 42})
    _, again = await run_job(http, network.client.url, {"model": MODEL, "prompt": "two", "seed": 42})
    _, other = await run_job(http, network.client.url, {"model": MODEL, "prompt": "one", "seed": 43})
    assert text_of(first) == text_of(again)
    assert text_of(first) != text_of(other)
    tokens, _ = expected_completion(HELLO, seed=42)
    assert text_of(first) == "".join(tokens)


async def test_max_tokens_three_gives_three_tokens_and_finish_reason_length(network: Network, http: aiohttp.ClientSession) -> None:
    created, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello", "max_tokens": 3, "seed": 1})
    final = updates[-1]
    assert final["status"] == "succeeded"
    assert final["finish_reason"] == "length"
    assert len(text_of(updates).split()) == 3
    assert final["usage"]["completion_tokens"] == 3
    record = await get_json(http, f"{network.client.url}/jobs/{created['job_id']}")
    assert record["finish_reason"] == "length"


# --- GET /jobs/{id} -------------------------------------------------------------------------


async def test_record_after_completion(network: Network, http: aiohttp.ClientSession) -> None:
    created, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello"})
    record = await get_json(http, f"{network.client.url}/jobs/{created['job_id']}")
    assert record["job_id"] == created["job_id"]
    assert record["model"] == MODEL
    assert record["status"] == "succeeded"
    assert record["driver"] == "fake2.dev"
    assert record["router"] == "fake.dev"
    assert record["text"] == text_of(updates) != ""
    assert record["finish_reason"] == "stop"
    assert record.get("error") is None
    assert record["created_at"] <= record["first_token_at"] <= record["finished_at"] < record["deadline"]
    usage = record["usage"]
    assert usage["completion_tokens"] == 24
    assert usage["prompt_tokens"] == 1
    assert usage["total_tokens"] == 25


# --- GET /jobs/{id}/events --------------------------------------------------------------------


async def test_events_are_job_updates_with_consecutive_seqs_ending_final(network: Network, http: aiohttp.ClientSession) -> None:
    created = await submit(http, network.client.url, {"model": MODEL, "prompt": "hello"})
    seen: list[tuple[str, str | None, dict[str, Any]]] = []
    async with asyncio.timeout(GUARD_S), http.get(f"{network.client.url}{created['events_url']}") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for event in events(response):
            seen.append((event.event, event.id, json.loads(event.data)))
    # The stream ends by itself after the final update.
    assert seen
    assert {name for name, _, _ in seen} == {"job_update"}
    assert [event_id for _, event_id, _ in seen] == [str(update["seq"]) for _, _, update in seen]
    updates = [update for _, _, update in seen]
    assert [u["seq"] for u in updates] == list(range(len(updates)))
    assert [u["is_final"] for u in updates] == [False] * (len(updates) - 1) + [True]
    assert updates[-1]["status"] == "succeeded"
    assert updates[-1]["driver"] == "fake2.dev"
    assert all(u["job_id"] == created["job_id"] for u in updates)


async def test_second_reader_after_finish_gets_the_same_full_stream(network: Network, http: aiohttp.ClientSession) -> None:
    created, first = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello"})
    async with asyncio.timeout(GUARD_S):
        second = await job_updates(http, network.client.url, created["job_id"])
    assert second == first


async def test_concurrent_readers_of_a_running_job_get_the_same_stream(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    # The gated upstream holds the job running after its first chunk until every reader is connected.
    async with gated_upstream(first="alpha", rest=" omega") as upstream:
        net = await start_network(start_node, upstream)
        created = await submit(http, net.client.url, {"model": MODEL, "prompt": "hello"})
        async with asyncio.timeout(GUARD_S), AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(job_stream(http, net.client.url, created["job_id"])) for _ in range(3)]
            heads = [await next_update(stream) for stream in streams]
            assert (await get_json(http, f"{net.client.url}/jobs/{created['job_id']}"))["status"] == "running"
            upstream.gate.set()
            tails = await asyncio.gather(*(updates_to_final(stream) for stream in streams))
    first, second, third = ([head, *tail] for head, tail in zip(heads, tails))
    assert first == second == third
    assert first[-1]["status"] == "succeeded"
    assert text_of(first) == "alpha omega"


@pytest.mark.parametrize("resume_at", ["first", "last_chunk"])
async def test_last_event_id_replays_only_later_seqs(network: Network, http: aiohttp.ClientSession, resume_at: str) -> None:
    created, full = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello", "max_tokens": 8})
    assert len(full) >= 2
    after = full[0]["seq"] if resume_at == "first" else full[-2]["seq"]
    async with asyncio.timeout(GUARD_S):
        resumed = await job_updates(http, network.client.url, created["job_id"], last_event_id=after)
    assert resumed == [u for u in full if u["seq"] > after]
    assert resumed and resumed[-1]["is_final"]


async def test_after_query_parameter_resumes_like_last_event_id(network: Network, http: aiohttp.ClientSession) -> None:
    created, full = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello", "max_tokens": 8})
    resumed: list[dict[str, Any]] = []
    async with asyncio.timeout(GUARD_S), http.get(f"{network.client.url}/jobs/{created['job_id']}/events?after=1") as response:
        async for event in events(response):
            resumed.append(json.loads(event.data))
    assert resumed == [u for u in full if u["seq"] > 1]


async def test_resuming_after_the_final_event_ends_the_stream(network: Network, http: aiohttp.ClientSession) -> None:
    created, full = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello", "max_tokens": 2})
    ctx = network.client.node.ctx
    assert ctx is not None
    # The same generator GET /jobs/{id}/events streams from; a short idle makes a heartbeat (None) come at once.
    stream = jobs.follow(ctx, created["job_id"], full[-1]["seq"], idle=0.05)
    try:
        async with asyncio.timeout(GUARD_S):
            first = await anext(stream, "ended")
    finally:
        await stream.aclose()
    assert first == "ended"


# --- the local path ---------------------------------------------------------------------------


async def test_job_on_the_driver_node_is_served_locally(network: Network, http: aiohttp.ClientSession) -> None:
    created, updates = await run_job(http, network.driver.url, {"model": MODEL, "prompt": "hello", "seed": 5})
    assert created["status"] == "running"
    assert updates[-1]["status"] == "succeeded"
    record = await get_json(http, f"{network.driver.url}/jobs/{created['job_id']}")
    assert record.get("router") is None
    assert record["driver"] == "fake2.dev"
    assert record["status"] == "succeeded"
    tokens, _ = expected_completion(HELLO, seed=5)
    assert record["text"] == text_of(updates) == "".join(tokens)
    # The router never heard of it, and the client node holds no copy.
    assert await count_rows(network.router, RoutedJob) == 0
    assert await count_rows(network.client, Job) == 0


async def test_local_job_record_matches_the_jobrecord_schema(network: Network, http: aiohttp.ClientSession) -> None:
    created, _ = await run_job(http, network.driver.url, {"model": MODEL, "prompt": "hello"})
    record = await get_json(http, f"{network.driver.url}/jobs/{created['job_id']}")
    assert "router" in record and record["router"] is None
    JobRecord.model_validate(record)


async def test_remote_job_is_routed_and_recorded_by_the_router(network: Network, http: aiohttp.ClientSession) -> None:
    created, _ = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hello"})
    async with network.router.node.ctx.store.reading() as session:  # type: ignore[union-attr]
        routed = await session.get(RoutedJob, created["job_id"])
    assert routed is not None
    assert (routed.client_node, routed.driver_node, routed.model) == ("fake3.dev", "fake2.dev", MODEL)
    assert await count_rows(network.driver, Job) == 0


# --- /healthz and /v1/models ---------------------------------------------------------------------


async def test_healthz_names_each_node(network: Network, http: aiohttp.ClientSession) -> None:
    for node in (network.router, network.driver, network.client):
        assert node.node.ctx is not None
        assert await get_json(http, f"{node.url}/healthz") == {"status": "ok", "node": node.name, "worker": node.node.ctx.worker}


async def test_models_on_client_node_come_through_the_router(network: Network, http: aiohttp.ClientSession) -> None:
    listing = await get_json(http, f"{network.client.url}/v1/models")
    assert listing["object"] == "list"
    models = {model["id"]: model for model in listing["data"]}
    assert MODEL in models
    assert models[MODEL]["object"] == "model"
    assert models[MODEL]["owned_by"] == "network"  # the router's answer, not a local driver


async def test_models_on_driver_node_list_its_own_model(network: Network, http: aiohttp.ClientSession) -> None:
    listing = await get_json(http, f"{network.driver.url}/v1/models")
    models = {model["id"]: model for model in listing["data"]}
    assert list(models) == [MODEL]
    assert models[MODEL]["owned_by"] == "fake2.dev"


async def test_models_on_unconfigured_node_are_empty(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    lone = await start_node("lone.dev")
    assert await get_json(http, f"{lone.url}/v1/models") == {"object": "list", "data": []}
