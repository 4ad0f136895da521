"""SQLite for SQLAlchemy's asyncio engine, run on the event loop's own thread.

SQLAlchemy's aiosqlite dialect talks to a connection shaped like aiosqlite's; this module provides one
whose calls run `sqlite3` at once, in the caller's thread, instead of handing each statement to a
thread of its own.  On a node's hot path that hand-over cost more than the statement: about 0.2 ms of
CPU a statement (a queue, a thread's wake-up, a future resolved across threads), against 0.01–0.02 ms
for the statement itself in WAL mode with `synchronous=NORMAL`, where a commit does not wait for the
disk.

One cost stays on the loop: the commit that takes the write-ahead log past 1,000 pages copies it into
the database file (SQLite's automatic checkpoint, with two fsyncs), about 7 ms here, once every hundred
jobs or so on a busy node.  A checkpoint on a thread of its own was tried: run beside a busy writer, a
PASSIVE one never catches up with the end of the log, so the log is never started again and grows
without bound; a RESTART one would make the writers wait for it anyway.

What would block the loop is a lock held by another process (a gunicorn worker, a router replica, a
migration): SQLite's busy handler sleeps in C until the lock frees.  So the connection's real busy
timeout stays 0, and a statement SQLite refuses as busy is tried again after an `asyncio.sleep`, for as
long as `PRAGMA busy_timeout` asked: the wait a node's settings ask for, spent on the loop, not in it.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from sqlalchemy.engine import make_url

_BUSY_TIMEOUT = re.compile(r"\s*PRAGMA\s+busy_timeout\s*=\s*(\d+)\s*$", re.IGNORECASE)
_FIRST_RETRY_S = 0.001
_LONGEST_RETRY_S = 0.05


def _busy(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


class Cursor:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._cursor = connection._conn.cursor()

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> Cursor:
        wanted = _BUSY_TIMEOUT.match(sql)
        if wanted is not None:
            self._connection.lock_wait_s = int(wanted.group(1)) / 1000
            return self
        await self._connection.when_not_busy(lambda: self._cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any] | dict[str, Any]]) -> Cursor:
        rows = list(rows)
        await self._connection.when_not_busy(lambda: self._cursor.executemany(sql, rows))
        return self

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _RunNow:
    """Stands in for aiosqlite's queue of work for its thread, which SQLAlchemy uses to set the isolation level."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as error:
            future.set_exception(error)


class Connection:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self._connection: sqlite3.Connection | None = connection  # SQLAlchemy reads it as "still open"
        self._tx = _RunNow()
        self.lock_wait_s = 0.0

    async def when_not_busy(self, work: Callable[[], object]) -> None:
        """`work()`, again after a pause for as long as the database is busy, up to `lock_wait_s`."""
        pause, deadline = _FIRST_RETRY_S, None
        while True:
            try:
                work()
                return
            except sqlite3.OperationalError as error:
                if not _busy(error):
                    raise
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.lock_wait_s if deadline is None else deadline
                if loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LONGEST_RETRY_S)

    def cursor(self) -> Cursor:
        return Cursor(self)

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> Cursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        await self.when_not_busy(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """SQLAlchemy's terminate, for a connection it gives up on: there is no thread to stop, only the file to close."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, name: str, arity: int, function: Callable[..., Any], deterministic: bool = False) -> None:
        self._conn.create_function(name, arity, function, deterministic=deterministic)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Literal["DEFERRED", "EXCLUSIVE", "IMMEDIATE"] | None) -> None:
        self._conn.isolation_level = value


def connector(url: str) -> Callable[[], Any]:
    """An `async_creator` for `create_async_engine(url, ...)`: opens the URL's file on the calling thread."""
    path = make_url(url).database or ":memory:"

    async def connect() -> Connection:
        # timeout=0: SQLite never sleeps on a lock; `Connection.when_not_busy` waits instead.
        return Connection(sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False))

    return connect
