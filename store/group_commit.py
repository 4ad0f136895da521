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


class GroupCommit:
    def __init__(self, transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]]) -> None:
        self._transaction = transaction
        self._pending: list[tuple[Work, asyncio.Future[Any]]] = []
        self._flushing = False
        self.transactions = 0  # begun so far: with many writes in flight, far fewer than writes

    async def run(self, work: Work) -> Any:
        """Run `work` in a write transaction, shared with whatever else is waiting; its result once committed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((work, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        batch: list[tuple[Work, asyncio.Future[Any]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._commit(batch)
                batch = []
        finally:
            self._flushing = False
            if batch:
                # Cancelled mid-commit (the process is stopping): no commit comes for the writes in this batch
                # or behind it, so their writers must not wait for one (a writer waiting forever hangs the shutdown).
                for _, future in [*batch, *self._pending]:
                    future.cancel()
                self._pending = []

    async def _commit(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> None:
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
