"""An LLM that misbehaves: whatever it sends, the job ends with a clear status and error, the driver is
free again, the upstream request is cut where the network stops reading, and nothing in the node fails.

The driver's LLM is a raw upstream (`tests.upstreams.raw_upstream`) that writes the bytes each test gives it,
over the seed's three nodes: client fake3.dev, router fake.dev, driver fake2.dev (capacity 1, so a slot that
is not freed leaves the next job queued until the guard fails the test).  Rules (README, "An LLM that
misbehaves"): before the first token the usual retry rules apply; after it the job ends `failed` with its
text so far; past max_tokens the stream is cut and ends `succeeded`, `length`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from handlers.settings import Settings
from tests.conftest import NODE_SETUPS, Network, StartNode, wire
from tests.helpers import get_json
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import raw_network as raw_network  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.streams import GUARD_S, events, job_updates, submit
from tests.upstreams import MODEL, RawReply, RawUpstream, chat_chunk, delta, sse, usage_chunk
from tests.upstreams import raw as raw  # a fixture

# What the driver makes of its LLM's bytes is no host's business; a large event on its way out to the client is.
pytestmark = pytest.mark.databases_only

ROLE = sse(chat_chunk(delta(role="assistant", content="")))
HEL = sse(chat_chunk(delta(role="assistant", content="Hel")))
LO = sse(chat_chunk(delta(content="lo")))
STOP = sse(chat_chunk(delta(finish_reason="stop")))
DONE = b"data: [DONE]\n\n"
EIGHT_MIB = 8 * 1024 * 1024


def writes(*pieces: bytes, pause: float = 0.0, then: bytes | None = None) -> Callable[[], AsyncGenerator[bytes, None]]:
    """A reply body: `pieces`, `pause` seconds apart (the upstream's pace, not a wait of the test's), then `then`
    over and over until the node hangs up."""

    async def body() -> AsyncGenerator[bytes, None]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(pause)
        while then is not None:
            yield then
            await asyncio.sleep(0.005)

    return body


async def run(http: aiohttp.ClientSession, network: Network, **fields: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A job on the client's node, followed to its end: (its updates, its record)."""
    created = await submit(http, network.client.url, {"model": MODEL, "prompt": "x", **fields})
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, network.client.url, created["job_id"])
    return updates, await get_json(http, f"{network.client.url}/jobs/{created['job_id']}")


async def assert_driver_free(http: aiohttp.ClientSession, network: Network, raw: RawUpstream) -> None:
    """The driver's one slot is free: the next job gets it, and an answer (or, for a driver the router cooled
    down after failures in a row, the router counts no job on it)."""
    [state] = (await network.router.admin("RouterStatus"))["drivers"]
    if state["cooled_down_until"] is not None:
        assert state["load"] == 0, state
        return
    raw.reply = RawReply(writes(HEL, LO, STOP, sse(usage_chunk()), DONE))
    _, record = await run(http, network)
    assert (record["status"], record["text"]) == ("succeeded", "Hello"), record


def assert_nothing_failed(caplog: pytest.LogCaptureFixture) -> None:
    """No task of a node died, nor logged an error (a misbehaving LLM is not the node's failure)."""
    errors = [record.getMessage() for record in caplog.records if record.name == "llm_provider" and record.levelno >= logging.ERROR]
    assert not errors, errors


# --- what the LLM sends instead of a stream ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    reply: RawReply
    error: str  # in the job's error
    text: str = ""  # kept
    requests: int = 1  # the LLM was asked this often: retried only where nothing reached the client


CASES = {
    "garbage bytes": Case(RawReply(writes(b"\x89\x00\xff\xfegarbage\r\n", b"\x01" * 100)), "not an event stream"),
    "garbage after the first token": Case(RawReply(writes(HEL, b"\xff\xfe\x00junk\n")), "not an event stream", text="Hel"),
    "a data line that is not JSON": Case(RawReply(writes(HEL, b"data: {not json\n\n")), "not JSON", text="Hel"),
    "a chunk not of OpenAI's shape": Case(RawReply(writes(HEL, b'data: {"choices": "x"}\n\n')), "not of OpenAI's shape", text="Hel"),
    "an end without [DONE] or a finish_reason": Case(RawReply(writes(HEL, LO)), "broke off before [DONE]", text="Hello"),
    "an end without [DONE] after the finish_reason": Case(RawReply(writes(HEL, STOP)), "broke off before [DONE]", text="Hel"),
    "HTTP 200 with an HTML body": Case(
        RawReply(writes(b"<!DOCTYPE html>\n<html><body>Please sign in</body></html>\n"), content_type="text/html"), "not an event stream"
    ),
    "llama.cpp's error line": Case(RawReply(writes(HEL, b'error: {"code": 500, "message": "kv cache full"}\n\n')), "kv cache full", text="Hel"),
    "an end before the first token": Case(RawReply(writes(ROLE)), "broke off before [DONE]", requests=3),
}


async def test_answers_the_network_cannot_read_end_the_job_failed_with_their_text(
    raw_network: Network, raw: RawUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # One network for every case, in turn (the last one cools the driver down, as three failures in a row do).
    for name, case in CASES.items():
        raw.reply, raw.stats.requests = case.reply, 0
        updates, record = await run(http, raw_network)

        final = updates[-1]
        assert (final["status"], record["status"]) == ("failed", "failed"), (name, final)
        assert case.error in final["error"] and record["error"] == final["error"], (name, final)
        assert record["text"] == case.text == "".join(update["delta"] for update in updates), (name, record)
        assert raw.stats.requests == case.requests, name  # retried only where nothing had reached the client
        await assert_driver_free(http, raw_network, raw)
    assert_nothing_failed(caplog)


# --- too slow, too large, too long --------------------------------------------------------------------------


async def test_an_llm_that_sends_a_byte_a_beat_times_out_at_the_idle_limit(
    raw_network: Network, raw: RawUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # A whole chunk, then the next one byte at a time, 4 bytes per idle limit: bytes are not chunks.
    raw.reply = RawReply(writes(HEL, *(bytes([byte]) for byte in LO), pause=0.25))
    updates, record = await run(http, raw_network, idle_timeout=1)

    assert (updates[-1]["status"], record["status"]) == ("timed_out", "timed_out"), updates[-1]
    assert "no chunk came whole from the LLM for more than 1.0 s" in record["error"]
    assert record["text"] == "Hel"
    async with asyncio.timeout(GUARD_S):
        await raw.cut.wait()  # the upstream request was dropped, not left to trickle on
    await assert_driver_free(http, raw_network, raw)
    assert_nothing_failed(caplog)


async def test_a_10_mb_line_is_cut_at_the_event_limit_and_the_upstream_with_it(
    raw_network: Network, raw: RawUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    raw.reply = RawReply(writes(HEL, b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"x" * 10_000_000, then=LO))
    updates, record = await run(http, raw_network)

    assert (updates[-1]["status"], record["status"]) == ("failed", "failed"), updates[-1]
    assert f"over {EIGHT_MIB} bytes" in record["error"] and record["text"] == "Hel", record
    async with asyncio.timeout(GUARD_S):
        await raw.cut.wait()  # the rest of the line, and what followed, was never read
    await assert_driver_free(http, raw_network, raw)
    assert_nothing_failed(caplog)


@pytest.mark.parametrize("node_setup", NODE_SETUPS)  # written out by each host
async def test_a_chunk_of_a_mebibyte_passes_whole(raw_network: Network, raw: RawUpstream, http: aiohttp.ClientSession) -> None:
    # aiohttp's own line limit is 128 KiB; the node's is 8 MiB (a base64 image in a chunk, a long tool call).
    big = "y" * 1024 * 1024
    raw.reply = RawReply(writes(HEL, sse(chat_chunk(delta(content=big))), STOP, DONE))
    _, record = await run(http, raw_network)
    assert record["status"] == "succeeded" and record["text"] == "Hel" + big


async def test_the_event_limit_is_the_nodes_to_set_and_holds_for_an_event_of_many_lines(
    start_node: StartNode, raw: RawUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    router, client = await start_node("fake.dev"), await start_node("fake3.dev")
    driver = await start_node("fake2.dev", settings=Settings(max_llm_event_bytes=64 * 1024))
    await wire(router, driver, client, raw)
    network = Network(router=router, driver=driver, client=client, upstream=raw)
    # One valid event of 20 lines, 8 KiB of JSON whitespace each: no line is over the limit, the event is.
    padding = b"".join(b"data: " + b" " * 8192 + b"\n" for _ in range(20))
    raw.reply = RawReply(writes(HEL, b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}}]\n' + padding + b"data: }\n\n", STOP, DONE))
    _, record = await run(http, network)

    assert record["status"] == "failed" and "over 65536 bytes" in record["error"] and record["text"] == "Hel", record
    await assert_driver_free(http, network, raw)
    assert_nothing_failed(caplog)


# --- past max_tokens ----------------------------------------------------------------------------------------


def endless_tokens() -> Callable[[], AsyncGenerator[bytes, None]]:
    async def body() -> AsyncGenerator[bytes, None]:
        yield ROLE
        for count in range(100_000):  # an LLM that ignores max_tokens; the node hangs up long before the end
            yield sse(chat_chunk(delta(content=f"t{count} ")))
            await asyncio.sleep(0.005)

    return body


async def test_a_stream_past_max_tokens_is_cut_and_ends_succeeded_with_length(
    raw_network: Network, raw: RawUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    raw.reply = RawReply(endless_tokens())
    updates, record = await run(http, raw_network, max_tokens=3)

    assert (updates[-1]["status"], updates[-1]["finish_reason"]) == ("succeeded", "length"), updates[-1]
    assert record["text"] == "t0 t1 t2 " and record["finish_reason"] == "length"
    assert record["response"]["choices"][0]["finish_reason"] == "length"
    async with asyncio.timeout(GUARD_S):
        await raw.cut.wait()

    # The same through /v1, streamed, with max_completion_tokens: the last chunk ends the choice with `length`.
    raw.cut.clear()
    payloads: list[Any] = []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "max_completion_tokens": 2}
    async with asyncio.timeout(GUARD_S), http.post(f"{raw_network.client.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        async for event in events(response):
            payloads.append(event.data if event.data == "[DONE]" else json.loads(event.data))
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]) == "t0 t1 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    await raw.cut.wait()
    await assert_driver_free(http, raw_network, raw)
    assert_nothing_failed(caplog)
