"""Reading SSE streams in tests the way a client does: over a real connection, event by event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from schemas.sse import ServerSentEvent, SSEDecoder


MAX_LINE_BYTES = 64 * 1024 * 1024  # a test reads chunks as large as a node passes on


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[ServerSentEvent]:
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
