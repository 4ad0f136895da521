"""Wake-ups between processes that share a node's database.

A reader of a job's stream waits on an in-process event; when another process (a gunicorn worker,
a router replica) writes the job's next chunk, that event must be set from the database.  On
PostgreSQL the writer NOTIFYs in its transaction (delivered at commit) and each process LISTENs on
one connection of its own; SQLite has no such thing, so one task per process looks at the watched
jobs every SQLITE_POLL_S instead (`handlers.news`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

CHANNEL = "llmp_jobs"
SQLITE_POLL_S = 0.05
POSTGRES_POLL_S = 1.0  # a safety net only: a notification lost with a dropped connection costs at most this


async def announce(session: AsyncSession, job_id: str) -> None:
    """Tell the other processes `job_id` has news, once this transaction commits (PostgreSQL only)."""
    await session.execute(select(func.pg_notify(CHANNEL, job_id)))


class Listener:
    """One PostgreSQL connection LISTENing for job news; `on_news(job_id)` runs for each."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    @classmethod
    async def start(cls, url: str, on_news: Callable[[str], None]) -> Listener:
        import asyncpg

        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = await asyncpg.connect(dsn)
        await connection.add_listener(CHANNEL, lambda _connection, _pid, _channel, payload: on_news(payload))
        return cls(connection)

    async def close(self) -> None:
        await self._connection.close()
