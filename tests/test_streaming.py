"""Streaming is real: chunks reach readers while the upstream is still generating; the OpenAI API works with `openai`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Network
from tests.helpers import expected_completion, get_json
from tests.helpers import gated_network as gated_network  # a fixture
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.streams import GUARD_S, events, submit
from tests.upstreams import MODEL, HeldUpstream
from tests.upstreams import gated as gated  # a fixture

SEED = 11
HELLO = [{"role": "user", "content": "hello"}]


# --- the jobs API ------------------------------------------------------------------------------
# The upstream sends its first token, then holds the request until the test has read that token from the
# client node.  A chunk held back anywhere (driver, router, client node, SSE writer) leaves the reader waiting
# until GUARD_S fails the test: no clock is read.


async def test_first_job_update_arrives_while_the_upstream_still_holds_the_rest(
    gated_network: Network, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    created = await submit(http, gated_network.client.url, {"model": MODEL, "prompt": "hello"})
    updates: list[dict[str, Any]] = []
    async with asyncio.timeout(GUARD_S), http.get(f"{gated_network.client.url}{created['events_url']}") as response:
        async for event in events(response):
            update = json.loads(event.data)
            updates.append(update)
            if update["delta"]:
                gated.gate.set()  # the first token is here: let the upstream go on
            if update["is_final"]:
                break
    # Each upstream token travels as its own update, the first one before the upstream sent the second.
    assert [u["delta"] for u in updates if u["delta"]] == ["alpha", " omega"]
    assert updates[-1]["status"] == "succeeded"


async def test_first_chat_chunk_arrives_while_the_upstream_still_holds_the_rest(
    gated_network: Network, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "messages": HELLO, "stream": True}
    contents: list[str] = []
    finish_reasons: list[str] = []
    async with asyncio.timeout(GUARD_S), http.post(f"{gated_network.client.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for event in events(response):
            if event.data == "[DONE]":
                break
            choice = json.loads(event.data)["choices"][0]
            if choice["delta"].get("content"):
                contents.append(choice["delta"]["content"])
                gated.gate.set()
            if choice["finish_reason"]:
                finish_reasons.append(choice["finish_reason"])
    assert contents == ["alpha", " omega"]
    assert finish_reasons == ["stop"]


# --- the official openai client -------------------------------------------------------------------


@pytest.fixture
async def oai(network: Network) -> AsyncIterator[openai.AsyncOpenAI]:
    """`openai.AsyncOpenAI` pointed at the client node fake3.dev, which routes to fake2.dev's LLM."""
    async with openai.AsyncOpenAI(base_url=f"{network.client.url}/v1", api_key="unused", max_retries=0, timeout=GUARD_S) as client:
        yield client


async def test_openai_client_streams_a_completion_through_the_router(oai: openai.AsyncOpenAI, network: Network, http: aiohttp.ClientSession) -> None:
    tokens, _ = expected_completion(HELLO, seed=SEED)
    stream = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], seed=SEED, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    with_choices = [chunk for chunk in chunks if chunk.choices]
    contents = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
    assert "".join(contents) == "".join(tokens)
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (1, len(tokens))
    assert len({chunk.id for chunk in chunks}) == 1
    # The completion is a job of fake3.dev that fake2.dev's LLM served through fake.dev.
    job_id = chunks[0].id.removeprefix("chatcmpl-")
    record = await get_json(http, f"{network.client.url}/jobs/{job_id}")
    assert (record["router"], record["driver"], record["status"]) == ("fake.dev", "fake2.dev", "succeeded")


async def test_openai_stream_without_include_usage_has_no_usage_chunk(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_non_stream_equals_stream_for_the_same_seed(oai: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "write something"}]
    stream = await oai.chat.completions.create(model=MODEL, messages=messages, seed=SEED, stream=True)
    streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    completion = await oai.chat.completions.create(model=MODEL, messages=messages, seed=SEED)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == streamed != ""
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == len(streamed.split())


async def test_openai_max_tokens_ends_with_length(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, seed=SEED)
    assert completion.choices[0].finish_reason == "length"
    assert len((completion.choices[0].message.content or "").split()) == 3


async def test_openai_models_list_contains_llama3(oai: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in oai.models.list()]
    assert MODEL in models


async def test_openai_unknown_model_raises_not_found(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await oai.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 404
    assert "gpt-99" in raised.value.message
