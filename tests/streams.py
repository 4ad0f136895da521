"""Jobs as a client submits and reads them, over a real connection, event by event: the one set of stream
helpers, for nodes in this process and nodes run as processes alike.

Every read is bounded, against hangs only: `GUARD_S` where the nodes run in this process (every outcome comes
in milliseconds on loopback when the code works), `STEP_S` where they are processes of their own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from schemas.sse import ServerSentEvent, SSEDecoder

GUARD_S = 5.0  # any one awaited outcome of nodes in this process
STEP_S = 15.0  # any one awaited outcome (a reply, a final event, an exit) of processes, or the test fails
SUBMIT_GUARD_S = 15.0  # POST /jobs answers once the job is stored (and, routed, accepted): this only catches hangs
MAX_LINE_BYTES = 64 * 1024 * 1024  # a test reads chunks as large as a node passes on


# --- submitting -------------------------------------------------------------------------------------------


async def submit(http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST /jobs and return the 202 body."""
    async with asyncio.timeout(SUBMIT_GUARD_S), http.post(f"{url}/jobs", json=body, headers=headers or {}) as response:
        text = await response.text()
        assert response.status == 202, text
        created: dict[str, Any] = json.loads(text)
    return created


# --- reading a stream -------------------------------------------------------------------------------------


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[ServerSentEvent]:
    """Any SSE response's events, as they come."""
    decoder = SSEDecoder()
    while line := await response.content.readline(max_line_length=MAX_LINE_BYTES):
        event = decoder.feed_line(line.decode())
        if event is not None:
            yield event


async def job_updates(session: aiohttp.ClientSession, url: str, job_id: str, last_event_id: int | None = None) -> list[dict[str, Any]]:
    """Every JobUpdate of a job until the final one."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    updates: list[dict[str, Any]] = []
    async with session.get(f"{url}/jobs/{job_id}/events", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for event in events(response):
            assert event.event == "job_update"
            update = json.loads(event.data)
            assert event.id == str(update["seq"])
            updates.append(update)
            if update["is_final"]:
                break
    return updates


async def follow(http: aiohttp.ClientSession, url: str, job_id: str, bound: float = STEP_S, last_event_id: int | None = None) -> list[dict[str, Any]]:
    """Every update of the job (after `last_event_id`) up to the final one, within `bound` seconds."""
    async with asyncio.timeout(bound):
        return await job_updates(http, url, job_id, last_event_id)


async def run_job(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Submit a job and read its events to the final one: (202 body, updates)."""
    created = await submit(http, url, body)
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, url, created["job_id"])
    return created, updates


async def run_to_end(http: aiohttp.ClientSession, url: str, body: dict[str, Any], bound: float = STEP_S) -> list[dict[str, Any]]:
    """Submit a job and read its events to the final one, within `bound` seconds: the updates."""
    created = await submit(http, url, body)
    return await follow(http, url, created["job_id"], bound)


@dataclass
class Followed:
    """A submitted job whose events `reader` collects in the background, from its first to its final one."""

    job_id: str
    reader: asyncio.Task[list[dict[str, Any]]]


@asynccontextmanager
async def followed(http: aiohttp.ClientSession, url: str, body: dict[str, Any], bound: float = STEP_S) -> AsyncIterator[Followed]:
    """Submit a job and follow it at once (`await job.reader`: every update, within `bound`); the reader is cancelled on the way out."""
    created = await submit(http, url, body)
    reader = asyncio.create_task(follow(http, url, created["job_id"], bound))
    try:
        yield Followed(created["job_id"], reader)
    finally:
        reader.cancel()


@asynccontextmanager
async def job_stream(http: aiohttp.ClientSession, url: str, job_id: str) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
    """The job's event stream, held open to be read an update at a time (`next_update`, `updates_to_final`)."""
    async with http.get(f"{url}/jobs/{job_id}/events") as response:
        assert response.status == 200, await response.text()
        yield aiter(events(response))


async def next_update(stream: AsyncIterator[ServerSentEvent]) -> dict[str, Any]:
    event = await anext(stream)
    assert event.event == "job_update"
    update: dict[str, Any] = json.loads(event.data)
    assert event.id == str(update["seq"])
    return update


async def updates_to_final(stream: AsyncIterator[ServerSentEvent]) -> list[dict[str, Any]]:
    """The stream's updates from here to the final one, inclusive."""
    updates = [await next_update(stream)]
    while not updates[-1]["is_final"]:
        updates.append(await next_update(stream))
    return updates


async def first_updates(http: aiohttp.ClientSession, url: str, job_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The job's first `count` updates (the first names the serving driver), then hang up."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(STEP_S):
        async with http.get(f"{url}/jobs/{job_id}/events") as response:
            assert response.status == 200
            async for event in events(response):
                seen.append(json.loads(event.data))
                if len(seen) == count:
                    response.close()
                    return seen
    raise AssertionError(f"the event stream ended after {len(seen)} updates: {seen}")


async def first_update(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    return (await first_updates(http, url, job_id))[0]


# --- what was read ----------------------------------------------------------------------------------------


def final_of(updates: list[dict[str, Any]]) -> dict[str, Any]:
    assert updates and updates[-1]["is_final"], updates
    assert [u for u in updates if u["is_final"]] == [updates[-1]], "exactly one final update"
    return updates[-1]


def text_of(updates: list[dict[str, Any]]) -> str:
    return "".join(u.get("delta", "") for u in updates)


def assert_in_order(updates: list[dict[str, Any]], first_seq: int = 0) -> None:
    assert [u["seq"] for u in updates] == list(range(first_seq, first_seq + len(updates))), [u["seq"] for u in updates]
