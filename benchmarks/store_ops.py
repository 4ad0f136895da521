"""What one store operation costs: the floor under every handler's latency.

    python benchmarks/store_ops.py

Times, on one SQLite file in WAL mode, the operations the hot path makes (a read of the node's
configuration, the per-chunk write of `record_update`) through the node's `Store` (SQLAlchemy 2
async on `store/loop_sqlite.py`'s connections), through a bare SQLAlchemy connection, and through
aiosqlite alone (a thread per connection, which the store used before: the hand-over is its cost).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite
from sqlalchemy import insert, select, update

from handlers.config import read_config
from store.database import Store, sqlite_url
from store.models import Job, JobChunk, NodeConfig

ROUNDS = 500


async def timed(label: str, operation: Callable[[int], Awaitable[object]]) -> None:
    samples = []
    for i in range(ROUNDS):
        started = time.perf_counter()
        await operation(i)
        samples.append(time.perf_counter() - started)
    samples.sort()
    print(f"| {label} | {statistics.median(samples) * 1000:.3f} | {samples[int(ROUNDS * 0.99)] * 1000:.3f} |")


async def main() -> None:
    path = Path(tempfile.mkdtemp()) / "node.db"
    store = Store.open(sqlite_url(path))
    await store.migrate()
    async with store.writing() as session:
        session.add(Job(id="job", client="c", model="m", spec={}, status="running", next_seq=0, created_at=0, deadline=0))

    async def store_read(_: int) -> object:
        async with store.reading() as session:
            return await read_config(session)

    async def bare_read(_: int) -> object:
        async with store.read_engine.connect() as connection:
            return (await connection.execute(select(NodeConfig).where(NodeConfig.id == 1))).first()

    async def store_chunk_write(_: int) -> object:
        async def write(session):  # type: ignore[no-untyped-def]
            seq = await session.scalar(
                update(Job).where(Job.id == "job").values(next_seq=Job.next_seq + 1).returning(Job.next_seq)
                .execution_options(synchronize_session=False)
            )
            await session.execute(insert(JobChunk).values(job_id="job", seq=seq - 1, delta="x"))

        return await store.write_soon(write)

    raw = await aiosqlite.connect(path)

    async def aiosqlite_read(_: int) -> object:
        async with raw.execute("SELECT * FROM node_config WHERE id = 1") as cursor:
            return await cursor.fetchone()

    print("| operation | p50 ms | p99 ms |\n|---|---|---|")
    await timed("read the config: Store.reading() + ORM get", store_read)
    await timed("read the config: bare SQLAlchemy async connection", bare_read)
    await timed("read the config: aiosqlite alone", aiosqlite_read)
    await timed("store one chunk: UPDATE..RETURNING + INSERT, one commit", store_chunk_write)
    await raw.close()
    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
