"""Group commit: small writes that arrive while a commit is running share the next one.

Under load most chunks of most jobs travel in a few transactions instead of one each; with no
load a write commits at once, alone.  No write waits for more than the commit before its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from store.errors import StorageUnavailable

Work = Callable[[AsyncSession], Awaitable[Any]]
Write = tuple[Work, "asyncio.Future[Any]"]


class GroupCommit:
    def __init__(self, transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]]) -> None:
        self._transaction = transaction
        self._pending: list[Write] = []
        self._flusher: asyncio.Task[None] | None = None  # held here: the loop keeps only a weak reference to a task
        self.transactions = 0  # begun so far: with many writes in flight, far fewer than writes

    async def run(self, work: Work) -> Any:
        """Run `work` in a write transaction, shared with whatever else is waiting; its result once committed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((work, future))
        self._start_flusher()
        return await future

    def _start_flusher(self) -> None:
        if not self._pending or (self._flusher is not None and not self._flusher.done()):
            return
        in_commit: list[Write] = []
        self._flusher = asyncio.get_running_loop().create_task(self._flush(in_commit))
        self._flusher.add_done_callback(lambda _: self._flusher_ended(in_commit))

    async def _flush(self, in_commit: list[Write]) -> None:
        while self._pending:
            in_commit.extend(self._pending)
            self._pending = []
            await self._commit(in_commit)
            in_commit.clear()

    def _flusher_ended(self, in_commit: list[Write]) -> None:
        """A done callback, so it runs even for a flusher cancelled before it began (a stopping process cancels
        every task at once).  A commit cut short commits nothing its writers could wait for; writes queued
        behind it get a flusher of their own.  A writer left waiting would hang the shutdown."""
        for _, future in in_commit:
            future.cancel()
        in_commit.clear()
        self._start_flusher()

    async def _commit(self, batch: list[Write]) -> None:
        self.transactions += 1
        try:
            async with self._transaction() as session:
                results = [await work(session) for work, _ in batch]
        except Exception as error:
            if len(batch) > 1 and not isinstance(error, StorageUnavailable):
                for item in batch:  # one bad write must not sink the others: each again, alone
                    await self._commit([item])
                return
            for _, future in batch:  # the store itself refused: alone, each would be refused again
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
