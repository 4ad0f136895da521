"""An OpenAI client cannot tell the network from the LLM: every field both ways, over every hop.

The official `openai` package talks to the client's node (fake3.dev), which routes through the
router (fake.dev) to the driver (fake2.dev), whose LLM is a scripted upstream: it answers what
each test scripts and keeps what it was sent, so every test also asserts what reached the LLM.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from pydantic import BaseModel

from store.models import Job, JobChunk, RoutedJob, ServedJob
from tests.conftest import Network, StartNode
from tests.helpers import count_rows, get_json
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import scripted_network as scripted_network  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.streams import GUARD_S, events, job_updates, submit
from tests.upstreams import MODEL, USAGE, Reply, ScriptedUpstream, chat_chunk, delta, usage_chunk
from tests.upstreams import scripted as scripted  # a fixture

CHAT = "chat/completions"
IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 1000

TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_CALL_CHUNKS = [
    chat_chunk(delta(role="assistant", content=None)),
    chat_chunk(delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}])),
    chat_chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}])),
    chat_chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}])),
    chat_chunk(delta(tool_calls=[{"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}])),
    chat_chunk(delta(finish_reason="tool_calls")),
    usage_chunk(),
]


@pytest.fixture
async def client(scripted_network: Network) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client, pointed at the client's node (fake3.dev)."""
    async with openai.AsyncOpenAI(base_url=f"{scripted_network.client.url}/v1", api_key="sk-client", max_retries=0, timeout=GUARD_S) as client:
        yield client


def sent_bodies(upstream: ScriptedUpstream, path: str = CHAT) -> list[Any]:
    return [sent.body for sent in upstream.sent if sent.path == path]


def text_chunks(*parts: str, finish_reason: str = "stop") -> list[dict[str, Any]]:
    chunks = [chat_chunk(delta(role="assistant", content=""))]
    chunks += [chat_chunk(delta(content=part)) for part in parts]
    return [*chunks, chat_chunk(delta(finish_reason=finish_reason)), usage_chunk()]


# --- requests pass through ----------------------------------------------------------------------------


async def test_every_request_field_reaches_the_llm_unchanged(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=text_chunks("It is sunny.")))
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "{\"sky\": \"clear\"}"},
            {"role": "user", "content": "And Paris?", "name": "ann"},
        ],
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "user": "user-7",
        "metadata": {"team": "blue"},
        "temperature": 5,  # out of OpenAI's range: the LLM's to refuse, not the network's
        "seed": 11,
        "max_completion_tokens": 40,
        "a_parameter_from_the_future": {"nested": [1, 2.5, None, "x"]},
        "stream": True,
        "stream_options": {"include_usage": False},
    }
    async with asyncio.timeout(GUARD_S), http.post(
        f"{scripted_network.client.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-client", "X-Secret": "mine"}
    ) as response:
        assert response.status == 200, await response.text()
        async for _ in events(response):
            pass
    [sent] = upstream.sent
    expected = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
    assert sent.body == expected | {"stream": True, "stream_options": {"include_usage": True}}
    # Client headers stay with the network: the LLM sees the driver's registered key (none here).
    assert "Authorization" not in sent.headers and "X-Secret" not in sent.headers


async def test_the_drivers_registered_key_reaches_the_llm(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    await scripted_network.driver.admin({"RegisterOaiProviderEndpoint": {"endpoint": upstream.url, "api_key": "sk-driver"}}, "openai")
    upstream.script(CHAT, Reply(chunks=text_chunks("hi")))
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert upstream.sent[0].headers["Authorization"] == "Bearer sk-driver"


async def test_jobs_take_the_same_body_and_ignore_stream(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=TOOL_CALL_CHUNKS))
    body = {"model": MODEL, "prompt": "weather?", "tools": TOOLS, "tool_choice": "required", "stream": False, "unknown": 1}
    created = await submit(http, scripted_network.client.url, body)
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, scripted_network.client.url, created["job_id"])
    assert upstream.sent[0].body == {
        "model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS, "tool_choice": "required", "unknown": 1,
        "stream": True, "stream_options": {"include_usage": True},
    }
    assert updates[-1]["status"] == "succeeded" and updates[-1]["finish_reason"] == "tool_calls"


# --- answers come back whole --------------------------------------------------------------------------


async def test_a_streamed_tool_call_arrives_chunk_by_chunk_with_every_field(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=TOOL_CALL_CHUNKS))
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather in Paris and Oslo?"}], tools=TOOLS, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    received = [chunk.model_dump(exclude_unset=True) async for chunk in stream]
    # The LLM's chunks, in order and whole; only the envelope is the network's (one id and time for the answer).
    assert [{k: v for k, v in c.items() if k not in ("id", "created")} for c in received] == [
        {k: v for k, v in c.items() if k not in ("id", "created")} for c in TOOL_CALL_CHUNKS
    ]
    assert len({c["id"] for c in received}) == 1 and received[0]["id"].startswith("chatcmpl-")
    assert upstream.sent[0].body["tools"] == TOOLS


async def test_a_tool_call_not_streamed_is_assembled_by_index(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=TOOL_CALL_CHUNKS))
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=TOOLS,  # type: ignore[arg-type]
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(call.id, call.function.name, json.loads(call.function.arguments)) for call in choice.message.tool_calls or []]  # type: ignore[union-attr]
    assert calls == [("call_1", "get_weather", {"city": "Paris"}), ("call_2", "get_weather", {"city": "Oslo"})]
    assert completion.usage is not None and completion.usage.total_tokens == USAGE["total_tokens"]
    assert upstream.sent[0].body["tools"] == TOOLS


async def test_a_two_turn_tool_conversation(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=TOOL_CALL_CHUNKS[:4] + TOOL_CALL_CHUNKS[5:]))
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    assistant = first.choices[0].message
    [call] = assistant.tool_calls or []
    messages += [assistant.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    upstream.script(CHAT, Reply(chunks=text_chunks("Sunny ", "in Paris.")))
    second = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    assert second.choices[0].message.content == "Sunny in Paris."
    sent = sent_bodies(upstream)[1]["messages"]
    assert sent[1] == {  # as the client sent it: its SDK leaves out the null content
    "role": "assistant",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    }
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}


class Weather(BaseModel):
    city: str
    sky: str


async def test_parse_with_a_pydantic_response_format(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=text_chunks('{"city": "Paris", ', '"sky": "clear"}')))
    completion = await client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], response_format=Weather
    )
    assert completion.choices[0].message.parsed == Weather(city="Paris", sky="clear")
    response_format = upstream.sent[0].body["response_format"]
    assert response_format["type"] == "json_schema" and response_format["json_schema"]["name"] == "Weather"
    assert response_format["json_schema"]["schema"]["properties"].keys() == {"city", "sky"}


N_CHUNKS = [
    chat_chunk(delta(0, role="assistant", content="Yes"), delta(1, role="assistant", content="No")),
    chat_chunk(delta(1, content=", never."), system_fingerprint="fp_1"),
    chat_chunk(delta(0, content=", always.")),
    chat_chunk(delta(1, finish_reason="stop"), delta(0, finish_reason="length")),
    usage_chunk(),
]


async def test_n_choices_come_back_streamed_and_whole(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=N_CHUNKS))
    completion = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], n=2)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "Yes, always.", "length"), (1, "No, never.", "stop")
    ]
    assert completion.system_fingerprint == "fp_1"
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], n=2, stream=True)
    by_choice: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            by_choice[choice.index] = by_choice.get(choice.index, "") + (choice.delta.content or "")
    assert by_choice == {0: "Yes, always.", 1: "No, never."}
    assert [body["n"] for body in sent_bodies(upstream)] == [2, 2]


def token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": [{"token": text, "logprob": logprob, "bytes": None}]}


async def test_logprobs_reasoning_and_refusal_come_back(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=[
        chat_chunk(delta(role="assistant", reasoning_content="Think")),
        chat_chunk(delta(reasoning_content="ing.")),
        chat_chunk(delta(content="Hel", logprobs={"content": [token("Hel", -0.5)], "refusal": None})),
        chat_chunk(delta(content="lo", logprobs={"content": [token("lo", -0.25)], "refusal": None})),
        chat_chunk(delta(refusal="")),
        chat_chunk(delta(finish_reason="stop")),
        usage_chunk(),
    ]))
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1
    )
    [choice] = completion.choices
    assert choice.message.content == "Hello"
    assert choice.message.model_extra == {"reasoning_content": "Thinking."}
    assert choice.logprobs is not None and [(t.token, t.logprob) for t in choice.logprobs.content or []] == [("Hel", -0.5), ("lo", -0.25)]
    assert upstream.sent[0].body["logprobs"] is True and upstream.sent[0].body["top_logprobs"] == 1


async def test_usage_comes_only_to_a_client_that_asked(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=text_chunks("a", "b")))
    plain = [chunk async for chunk in await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)]
    assert all(chunk.usage is None and chunk.choices for chunk in plain)
    asked = [
        chunk async for chunk in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True, stream_options={"include_usage": True}
        )
    ]
    assert asked[-1].choices == [] and asked[-1].usage is not None and asked[-1].usage.total_tokens == USAGE["total_tokens"]


# --- the jobs API -------------------------------------------------------------------------------------


async def test_a_tool_call_job_replays_the_same_from_last_event_id(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=TOOL_CALL_CHUNKS))
    url = scripted_network.client.url
    created = await submit(http, url, {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS})
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, url, created["job_id"])
        replayed = await job_updates(http, url, created["job_id"], last_event_id=updates[0]["seq"])
    assert replayed == updates[1:]
    chunks = [chunk for update in updates for chunk in update["chunks"]]
    assert chunks == [{k: v for k, v in c.items() if k not in ("id", "object", "created")} for c in TOOL_CALL_CHUNKS]
    assert all(update["delta"] == "" for update in updates)  # no text: tool calls only
    record = await get_json(http, f"{url}/jobs/{created['job_id']}")
    [choice] = record["response"]["choices"]
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
    ]
    assert record["finish_reason"] == "tool_calls" and record["usage"]["total_tokens"] == USAGE["total_tokens"]


# --- the LLM's refusals keep their meaning --------------------------------------------------------------

LLM_400 = {"error": {"message": "temperature must be at most 2", "type": "invalid_request_error", "param": "temperature", "code": "bad_temperature"}}


async def test_an_llm_400_is_the_clients_bad_request_streamed_or_not(scripted_network: Network, client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(body=LLM_400, status=400))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5, stream=stream)
        assert raised.value.status_code == 400
        assert raised.value.body == LLM_400["error"]  # the LLM's own body, whole
    assert len(upstream.sent) == 2  # once per request: the client's error is not retried on another driver
    created = await submit(http, scripted_network.client.url, {"model": MODEL, "prompt": "x", "temperature": 5})
    async with asyncio.timeout(GUARD_S):
        final = (await job_updates(http, scripted_network.client.url, created["job_id"]))[-1]
    assert final["status"] == "failed" and final["llm_error"] == {"status": 400, "body": LLM_400}
    record = await get_json(http, f"{scripted_network.client.url}/jobs/{created['job_id']}")
    assert record["llm_error"] == {"status": 400, "body": LLM_400}


async def test_an_llm_401_is_a_502_naming_the_driver(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(body={"error": {"message": "bad key", "type": "auth", "param": None, "code": None}}, status=401))
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 502
    assert "fake2.dev" in raised.value.message and "401" in raised.value.message


async def test_a_refusal_after_the_first_chunk_is_an_error_event(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=[chat_chunk(delta(role="assistant", content="Hal")), {"error": {"message": "overloaded"}}], done=False))
    payloads: list[Any] = []
    async with asyncio.timeout(GUARD_S), http.post(
        f"{scripted_network.client.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    ) as response:
        assert response.status == 200
        async for event in events(response):
            payloads.append(event.data if event.data == "[DONE]" else json.loads(event.data))
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hal"}
    assert "overloaded" in payloads[1]["error"]["message"] and payloads[2:] == ["[DONE]"]


# --- more endpoints -------------------------------------------------------------------------------------

EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}, {"object": "embedding", "index": 1, "embedding": [0.125, 1.0]}],
    "model": MODEL,
    "usage": {"prompt_tokens": 4, "total_tokens": 4},
}


async def test_embeddings_through_three_hops_and_kept_for_a_retry(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    upstream.script("embeddings", Reply(body=EMBEDDINGS))
    for _ in range(2):  # the retry, with the same Idempotency-Key, gets the kept result
        result = await client.embeddings.create(
            model=MODEL, input=["a", "b"], encoding_format="float", extra_headers={"Idempotency-Key": "embed-1"}
        )
        assert [item.embedding for item in result.data] == [[0.5, -0.25], [0.125, 1.0]]
        assert result.usage.total_tokens == 4
    assert sent_bodies(upstream, "embeddings") == [{"model": MODEL, "input": ["a", "b"], "encoding_format": "float"}]
    assert await count_rows(scripted_network.client, Job) == 1


async def test_an_llm_without_the_endpoint_is_a_404_naming_driver_and_endpoint(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await client.embeddings.create(model=MODEL, input="a")
    assert "fake2.dev" in raised.value.message and "/v1/embeddings" in raised.value.message


def completion_chunk(text: str, finish_reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    return {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": MODEL, "choices": [
        {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    ], "usage": None}


async def test_legacy_completions_streamed_and_whole(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    upstream: ScriptedUpstream = scripted_network.upstream  # type: ignore[assignment]
    legacy_logprobs = {"tokens": [" sky"], "token_logprobs": [-0.5], "top_logprobs": [{" sky": -0.5}], "text_offset": [3]}
    upstream.script("completions", Reply(chunks=[
        completion_chunk("The", logprobs=legacy_logprobs), completion_chunk(" sky"), completion_chunk("", "stop"),
        {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": MODEL, "choices": [], "usage": USAGE},
    ]))
    whole = await client.completions.create(model=MODEL, prompt=["The", "A"], max_tokens=2, logprobs=1)
    assert whole.object == "text_completion" and whole.choices[0].text == "The sky" and whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.tokens == [" sky"]
    streamed = [chunk async for chunk in await client.completions.create(model=MODEL, prompt="The", stream=True)]
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == "The sky"
    assert [body["prompt"] for body in sent_bodies(upstream, "completions")] == [["The", "A"], "The"]


# --- bad input ------------------------------------------------------------------------------------------


async def test_a_message_without_role_reaches_no_llm_and_stores_nothing(scripted_network: Network, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        await client.chat.completions.create(model=MODEL, messages=[{"content": "hi"}])  # type: ignore[list-item, typeddict-item]
    assert scripted_network.upstream.stats.requests == 0
    for node, table in ((scripted_network.client, Job), (scripted_network.client, JobChunk), (scripted_network.router, RoutedJob), (scripted_network.driver, ServedJob)):
        assert await count_rows(node, table) == 0


async def test_an_image_too_big_for_a_small_node_is_413(start_node: StartNode, scripted: ScriptedUpstream, http: aiohttp.ClientSession) -> None:
    from handlers.settings import Settings

    node = await start_node("small.dev", settings=Settings(max_body_bytes=len(IMAGE)))
    await node.admin({"RegisterOaiProviderEndpoint": {"endpoint": scripted.url}}, "openai")
    await node.admin({"SetLocalDriver": {"model": MODEL}})
    image_part: Any = {"type": "image_url", "image_url": {"url": IMAGE}}
    async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, timeout=GUARD_S) as client:
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [image_part]}])
    assert raised.value.status_code == 413
    assert scripted.stats.requests == 0 and await count_rows(node, Job) == 0
