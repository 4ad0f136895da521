"""News of jobs from the other processes that share this node's store (gunicorn workers, replicas).

A reader waits on its job's in-process event (`ctx.signals`), which only this process's writes set.
On PostgreSQL another process's write arrives as a NOTIFY (`Store.listen`); on SQLite, and as a
safety net on PostgreSQL, one task per process looks at the jobs its readers wait on, in one query
every `Store.poll_interval`, and wakes the readers of those that moved.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from handlers.context import NodeContext
from store.errors import StorageUnavailable
from store.models import Job


async def watch_the_store(ctx: NodeContext) -> None:
    interval = ctx.store.poll_interval
    if interval is None:
        return  # no other process writes this store
    seen: dict[str, int] = {}
    while True:
        await asyncio.sleep(interval)
        watched = ctx.signals.watched()
        if not watched:
            seen.clear()
            continue
        try:
            async with ctx.store.reading() as session:
                rows = await session.execute(select(Job.id, Job.next_seq).where(Job.id.in_(watched)))
                now: dict[str, int] = {job_id: next_seq for job_id, next_seq in rows}
        except StorageUnavailable:
            continue  # looked at again in a moment
        for job_id, next_seq in now.items():
            if seen.get(job_id) != next_seq:  # moved, or first seen: a reader may have read before the change
                ctx.signals.notify(job_id)
        seen = now
