"""Coalescing a stream without a node: what piles up while the consumer is busy goes out at once, nothing waits on a timer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from handlers.coalesce import batches


async def items(*values: int, fail: Exception | None = None) -> AsyncIterator[int]:
    for value in values:
        yield value
    if fail is not None:
        raise fail


async def test_a_consumer_gets_every_item_in_order_and_the_end_with_the_last() -> None:
    seen = []
    async for batch in batches(items(1, 2, 3)):
        seen.append(batch)
        await asyncio.sleep(0)  # the source may run ahead a step; nothing piles up
    assert [value for group, _ in seen for value in group] == [1, 2, 3]
    assert seen[-1][1] is True and all(not ended for _, ended in seen[:-1])


async def test_items_that_arrive_while_the_consumer_is_busy_come_together() -> None:
    source: asyncio.Queue[int | None] = asyncio.Queue()

    async def queued() -> AsyncIterator[int]:
        while (value := await source.get()) is not None:
            yield value

    stream = batches(queued())
    source.put_nowait(1)
    assert await anext(stream) == ([1], False)
    for value in (2, 3, 4):  # while the consumer "sends" 1
        source.put_nowait(value)
    source.put_nowait(None)
    await asyncio.sleep(0.01)  # let the read-ahead take them all
    assert await anext(stream) == ([2, 3, 4], True)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_a_source_that_fails_hands_over_what_came_first_then_raises() -> None:
    stream = batches(items(1, 2, fail=ValueError("broken")))
    await asyncio.sleep(0.01)
    assert await anext(stream) == ([1, 2], False)
    with pytest.raises(ValueError, match="broken"):
        await anext(stream)


async def test_an_empty_source_ends_with_one_empty_batch() -> None:
    assert [batch async for batch in batches(items())] == [([], True)]


async def test_a_consumer_that_stops_early_stops_the_read_ahead() -> None:
    endless_started = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        endless_started.set()
        while True:
            yield 0
            await asyncio.sleep(0)

    stream = batches(endless())
    assert isinstance(stream, AsyncGenerator)
    await anext(stream)
    await stream.aclose()
    assert endless_started.is_set()
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()] == []
