"""A mend for aiosqlite 0.22: a connection stopped twice leaves the second stop waiting forever.

`Connection.stop()` queues the end of the connection's thread and returns a future for it. SQLAlchemy
terminates a connection (one invalidated, or given up by a cancelled task) by closing it gracefully in
a shielded task and, if its waiter is cancelled meanwhile, by calling `stop()` at once. The graceful
`close()` then calls `stop()` once more: its end is queued behind the first one, which the thread
never reaches past, so `close()` awaits a future that never resolves. At a loop's shutdown that task
is never done, and the shutdown hangs (seen in CI; aiosqlite#369 and sqlalchemy#13039 are its kin).

Once stopped, a connection's thread is ending or gone: a second stop() has nothing to wait for.
"""

from __future__ import annotations

import asyncio

import aiosqlite

_stop = getattr(aiosqlite.Connection, "stop", None)  # 0.22 and later; earlier versions never wait on a stop


def _stop_once(self: aiosqlite.Connection) -> asyncio.Future[object] | None:
    if not self._running:
        return None
    assert _stop is not None
    result: asyncio.Future[object] | None = _stop(self)
    return result


def apply() -> None:
    if _stop is not None and aiosqlite.Connection.stop is _stop:
        aiosqlite.Connection.stop = _stop_once  # type: ignore[method-assign]
