"""An agent framework drives a tool round trip through three hops: LangChain's ChatOpenAI on node 3.

The client node fake3.dev gets LangChain's requests, the router fake.dev hands them to fake2.dev, whose
LLM is the scripted upstream: the first request gets a tool call, the second (with the tool's result)
a text answer.  The test asserts what LangChain reads from the network, and what the LLM received on
the way: the tools each time, then the assistant's tool call and the tool's result as LangChain sent them.

Nothing leaves the machine: the framework only talks to node 3 (no token counting, no tracing).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import tiktoken
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.conftest import Network
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import scripted_network as scripted_network  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.upstreams import MODEL, Reply, ScriptedUpstream, Sent, chat_chunk, delta, usage_chunk
from tests.upstreams import scripted as scripted  # a fixture

CALL_ID = "call_weather_1"
ARGUMENTS = '{"city": "Paris"}'
ANSWER = "It is sunny in Paris, 21 degrees."
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny, 21 degrees in {city}"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may reach the internet: LangSmith tracing stays off whatever the environment says, and
    token counting (tiktoken downloads its encodings) fails the test instead of downloading."""
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.setenv(name, "false")
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROXY", *PROXIES, *(p.lower() for p in PROXIES)):
        monkeypatch.delenv(name, raising=False)

    def no_download(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"tiktoken was asked for an encoding {args}: token counting would download it")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.setattr(tiktoken, "encoding_for_model", no_download)


def tool_call_reply() -> Reply:
    """The LLM's first answer: one tool call, streamed as OpenAI streams it (arguments in fragments)."""
    call = {"index": 0, "id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    return Reply(chunks=[
        chat_chunk(delta(role="assistant", content=None, tool_calls=[call])),
        chat_chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": ARGUMENTS[:9]}}])),
        chat_chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": ARGUMENTS[9:]}}])),
        chat_chunk(delta(finish_reason="tool_calls")),
        usage_chunk(),
    ])


def answer_reply() -> Reply:
    """The LLM's second answer: text that uses the tool's result."""
    return Reply(chunks=[
        chat_chunk(delta(role="assistant", content=ANSWER[:12])),
        chat_chunk(delta(content=ANSWER[12:])),
        chat_chunk(delta(finish_reason="stop")),
        usage_chunk(),
    ])


def chat_model(network: Network) -> Any:
    llm = ChatOpenAI(base_url=f"{network.client.url}/v1", api_key=SecretStr("x"), model=MODEL, max_retries=0, timeout=30)
    return llm.bind_tools([get_weather])


async def ask(model: Any, messages: list[BaseMessage], streamed: bool) -> AIMessage:
    if not streamed:
        answer = await model.ainvoke(messages)
        assert isinstance(answer, AIMessage), answer
        return answer
    whole: AIMessageChunk | None = None
    async for chunk in model.astream(messages):
        assert isinstance(chunk, AIMessageChunk), chunk
        whole = chunk if whole is None else whole + chunk
    assert whole is not None, "the stream carried no chunk"
    return whole


def chat_requests(upstream: ScriptedUpstream) -> list[Sent]:
    return [sent for sent in upstream.sent if sent.path == "chat/completions"]


def assert_tools_reached_the_llm(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    assert isinstance(tools, list) and len(tools) == 1, body
    assert tools[0]["type"] == "function", tools
    function = tools[0]["function"]
    assert function["name"] == "get_weather" and function["description"] == "The weather in a city.", function
    assert function["parameters"]["properties"] == {"city": {"type": "string"}}, function
    assert function["parameters"]["required"] == ["city"], function


@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "stream"])
async def test_langchain_tool_round_trip_through_three_hops(
    scripted_network: Network, scripted: ScriptedUpstream, streamed: bool
) -> None:
    scripted.script_next("chat/completions", tool_call_reply(), answer_reply())
    model = chat_model(scripted_network)
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Paris?")]

    # 1. the LLM asks for the tool; LangChain reads the call from the network's answer
    first = await ask(model, messages, streamed)
    assert first.tool_calls == [{"name": "get_weather", "args": {"city": "Paris"}, "id": CALL_ID, "type": "tool_call"}], first
    assert not first.invalid_tool_calls, first.invalid_tool_calls
    assert first.response_metadata.get("finish_reason") == "tool_calls", first.response_metadata

    # 2. the test runs the tool, and sends its result back with the conversation so far
    result = await get_weather.ainvoke(first.tool_calls[0])
    assert isinstance(result, ToolMessage) and result.tool_call_id == CALL_ID, result
    messages += [first, result]
    second = await ask(model, messages, streamed)
    assert second.content == ANSWER, second
    assert not second.tool_calls, second.tool_calls
    assert second.response_metadata.get("finish_reason") == "stop", second.response_metadata

    # What the LLM received: two requests, the tools on both, then the whole conversation on the second.
    requests = chat_requests(scripted)
    assert len(requests) == 2, [sent.body for sent in requests]
    for sent in requests:
        assert sent.body["model"] == MODEL and sent.body["stream"] is True, sent.body  # the driver always streams
        assert_tools_reached_the_llm(sent.body)
    assert [m["role"] for m in requests[0].body["messages"]] == ["user"], requests[0].body
    user, assistant, tool_message = requests[1].body["messages"]
    assert user == {"role": "user", "content": "What is the weather in Paris?"}, user
    assert assistant["role"] == "assistant" and not assistant.get("content"), assistant
    calls = assistant["tool_calls"]
    assert len(calls) == 1 and calls[0]["id"] == CALL_ID and calls[0]["type"] == "function", calls
    assert calls[0]["function"]["name"] == "get_weather", calls
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}, calls
    assert tool_message == {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21 degrees in Paris"}, tool_message
    assert scripted.queue["chat/completions"] == [], "a scripted reply was not asked for"
