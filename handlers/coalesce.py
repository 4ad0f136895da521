"""Read a stream ahead while its consumer is busy, and hand over everything that piled up at once.

Nothing waits on a timer: under no backpressure each item goes out alone, as soon
as it arrives; only items that arrive while the previous send is in flight are merged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _End:
    pass


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _ReadAhead(Generic[T]):
    def __init__(self, source: AsyncIterator[T]) -> None:
        self.queue: asyncio.Queue[T | _End | _Failed] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump(source))

    async def _pump(self, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                self.queue.put_nowait(item)
        except Exception as error:  # handed to the consumer, which re-raises it
            self.queue.put_nowait(_Failed(error))
        else:
            self.queue.put_nowait(_End())


async def batches(source: AsyncIterator[T]) -> AsyncIterator[tuple[list[T], bool]]:
    """(items that piled up, whether the source ended right after them)."""
    reader = _ReadAhead(source)
    try:
        while True:
            pending = [await reader.queue.get()]
            while not reader.queue.empty():
                pending.append(reader.queue.get_nowait())
            items = [item for item in pending if not isinstance(item, (_End, _Failed))]
            ended = any(isinstance(marker, _End) for marker in pending)
            if items or ended:
                yield items, ended
            for marker in pending:
                if isinstance(marker, _Failed):
                    raise marker.error
            if ended:
                return
    finally:
        reader.task.cancel()
        # Not `try: await reader.task except CancelledError`: that would also swallow a cancellation of the consumer.
        await asyncio.gather(reader.task, return_exceptions=True)
