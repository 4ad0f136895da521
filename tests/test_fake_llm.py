"""Tests for the embedded fake OpenAI-compatible LLM server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from emulator.fake_llm import EMBEDDING_WIDTH, STATS, WORDS, FakeLlmSettings, create_app, messages_seed

FAST = FakeLlmSettings(ttft=0.0, tokens_per_second=0.0, default_tokens=8)
MESSAGES = [{"role": "user", "content": "tell me a short story please"}]


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(create_app(FAST))


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {"model": "fake-llm", "messages": MESSAGES, **overrides}


async def read_sse(response: ClientResponse) -> list[Any]:
    """Parse an SSE body into decoded ``data:`` payloads, keeping ``[DONE]`` as a string."""
    raw = (await response.read()).decode()
    assert raw.endswith("\n\n")
    events: list[Any] = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        data = "\n".join(line[len("data: "):] for line in block.split("\n") if line.startswith("data: "))
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list[Any]) -> str:
    return "".join(
        event["choices"][0]["delta"].get("content", "")
        for event in events
        if isinstance(event, dict) and event["choices"]
    )


async def stream(client: TestClient, **overrides: Any) -> list[Any]:
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True, **overrides))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return await read_sse(response)


async def test_stream_shape_and_determinism(client: TestClient) -> None:
    first = await stream(client, seed=7)
    second = await stream(client, seed=7)
    other = await stream(client, seed=8)

    assert streamed_text(first) == streamed_text(second)
    assert streamed_text(first) != streamed_text(other)
    assert first[-1] == "[DONE]"
    chunks = first[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"]["content"] in WORDS
    content_chunks = chunks[:-1]
    assert len(content_chunks) == FAST.default_tokens
    assert all(c["choices"][0]["delta"]["content"].startswith(" ") for c in content_chunks[1:])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks)


async def test_seed_defaults_to_hash_of_messages(client: TestClient) -> None:
    unseeded = streamed_text(await stream(client))
    assert unseeded == streamed_text(await stream(client))
    assert unseeded == streamed_text(await stream(client, seed=messages_seed(MESSAGES)))
    other = [{"role": "user", "content": "another story"}]
    assert streamed_text(await stream(client, messages=other)) == streamed_text(await stream(client, seed=messages_seed(other)))
    assert streamed_text(await stream(client, messages=other)) != unseeded


async def test_max_tokens_cuts_with_length(client: TestClient) -> None:
    events = await stream(client, seed=1, max_tokens=3)
    assert len(streamed_text(events).split()) == 3
    assert events[-2]["choices"][0]["finish_reason"] == "length"

    events = await stream(client, seed=1, max_tokens=100)
    assert len(streamed_text(events).split()) == FAST.default_tokens
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_stop_string_ends_generation(client: TestClient) -> None:
    full = streamed_text(await stream(client, seed=3))
    stop = full.split(" ")[3]
    events = await stream(client, seed=3, stop=[" " + stop])
    text = streamed_text(events)
    assert text == full[: full.index(" " + stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_usage_chunk_only_when_requested(client: TestClient) -> None:
    without = await stream(client, seed=5)
    assert not any("usage" in e for e in without if isinstance(e, dict))

    events = await stream(client, seed=5, max_tokens=4, stream_options={"include_usage": True})
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    prompt_tokens = len(MESSAGES[0]["content"].split())
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 4,
        "total_tokens": prompt_tokens + 4,
    }
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "[DONE]"


async def test_non_stream_matches_stream(client: TestClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(seed=11, max_tokens=5))
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-llm"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == streamed_text(await stream(client, seed=11, max_tokens=5))
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        json.dumps({"messages": MESSAGES}).encode(),
        json.dumps({"model": "fake-llm"}).encode(),
        json.dumps({"model": "fake-llm", "messages": []}).encode(),
        json.dumps({"model": "fake-llm", "messages": [{"content": "hi"}]}).encode(),
    ],
)
async def test_invalid_requests_get_400(client: TestClient, payload: bytes) -> None:
    response = await client.post(
        "/v1/chat/completions", data=payload, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_fail_content_and_header_give_500(client: TestClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "FAIL"}], stream=True)
    )
    assert response.status == 500
    error = (await response.json())["error"]
    assert error["message"] == "fake upstream failure"
    assert error["type"] == "server_error"

    response = await client.post("/v1/chat/completions", json=chat_body(), headers={"X-Fake-Fail": "500"})
    assert response.status == 500
    assert (await response.json())["error"]["type"] == "server_error"
    assert client.app[STATS].requests == 2


async def test_models_and_healthz(client: TestClient) -> None:
    response = await client.get("/v1/models")
    assert await response.json() == {
        "object": "list",
        "data": [{"id": "fake-llm", "object": "model", "created": 0, "owned_by": "fake-llm"}],
    }
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.text() == "ok"


async def test_pacing_and_disconnect(aiohttp_client: Any) -> None:
    app = create_app(FakeLlmSettings(ttft=0.05, tokens_per_second=20.0, default_tokens=1000))
    client = await aiohttp_client(app)
    stats = app[STATS]
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    first = await response.content.readuntil(b"\n\n")
    assert loop.time() - started >= 0.05
    assert json.loads(first[len(b"data: "):])["choices"][0]["delta"]["role"] == "assistant"
    assert stats.active == 1
    response.close()
    async with asyncio.timeout(5):  # the server sees the disconnect at its next token, 50 ms later
        await stats.until_idle()
    assert stats.active == 0
    assert stats.max_active == 1


async def test_embeddings_are_deterministic_vectors_per_input(client: TestClient) -> None:
    response = await client.post("/v1/embeddings", json={"model": "fake-llm", "input": ["a b", "c"]})
    assert response.status == 200
    body = await response.json()
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(len(item["embedding"]) == EMBEDDING_WIDTH for item in body["data"])
    assert body["data"][0]["embedding"] != body["data"][1]["embedding"]
    again = await (await client.post("/v1/embeddings", json={"model": "fake-llm", "input": "a b"})).json()
    assert again["data"][0]["embedding"] == body["data"][0]["embedding"]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    refused = await client.post("/v1/embeddings", json={"model": "fake-llm", "input": 3})
    assert refused.status == 400


async def test_legacy_completions_stream_the_chat_answer_as_text(client: TestClient) -> None:
    chat = streamed_text(await stream(client, seed=3))
    response = await client.post("/v1/completions", json={"model": "fake-llm", "prompt": "x", "seed": 3, "stream": True})
    events = await read_sse(response)
    assert events[-1] == "[DONE]"
    assert all(event["object"] == "text_completion" for event in events[:-1])
    assert "".join(event["choices"][0]["text"] for event in events[:-1]) == chat
    whole = await (await client.post("/v1/completions", json={"model": "fake-llm", "prompt": ["x"], "seed": 3})).json()
    assert whole["choices"][0]["text"] == chat and whole["usage"]["completion_tokens"] == FAST.default_tokens
