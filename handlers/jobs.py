"""Reading jobs for clients: the record, and the stream of updates (replayed from the store, then live)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select

from handlers.context import NodeContext
from handlers.errors import PeerError, unknown_job
from schemas.messages import QueuePlace, QueuePosition
from schemas.jobs import FINAL_STATUSES, JobRecord, JobUpdate, Usage
from store.models import Job, JobChunk


async def record(ctx: NodeContext, job_id: str, with_queue_position: bool = False) -> JobRecord:
    async with ctx.store.reading() as session:
        job = await session.get(Job, job_id)
        if job is None:
            raise unknown_job(job_id)
        text = "".join(await session.scalars(select(JobChunk.delta).where(JobChunk.job_id == job_id).order_by(JobChunk.seq)))
    return JobRecord(
        job_id=job.id,
        model=job.model,
        status=job.status,  # type: ignore[arg-type]
        client=job.client,
        router=job.router_node,
        driver=job.driver_node,
        created_at=job.created_at,
        first_token_at=job.first_token_at,
        finished_at=job.finished_at,
        deadline=job.deadline,
        text=text,
        finish_reason=job.finish_reason,
        usage=Usage.model_validate(job.usage) if job.usage else None,
        error=job.error,
        queue_position=await _queue_position(ctx, job) if with_queue_position else None,
    )


async def _queue_position(ctx: NodeContext, job: Job) -> int | None:
    if job.status != "queued" or job.router_node is None:
        return None
    try:
        reply = await ctx.transport.send("driver", job.router_node, "router", QueuePosition(job_id=job.id))
    except PeerError:
        return None
    return QueuePlace.model_validate(reply).position


async def follow(ctx: NodeContext, job_id: str, after_seq: int = -1, idle: float = 15.0) -> AsyncIterator[JobUpdate | None]:
    """Every update after `after_seq`, in order, ending with the final one.

    Yields None after `idle` seconds without news, so a transport can send a heartbeat.
    """
    last = after_seq
    columns = (Job.id, Job.status, Job.next_seq, Job.driver_node, Job.finish_reason, Job.usage, Job.error)
    while True:
        wake = ctx.signals.watch(job_id)
        async with ctx.store.reading() as session:
            job = (await session.execute(select(*columns).where(Job.id == job_id))).first()
            if job is None:
                raise unknown_job(job_id)
            chunks = (
                await session.scalars(select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.seq > last).order_by(JobChunk.seq))
            ).all()
        final_seq = job.next_seq - 1 if job.status in FINAL_STATUSES else None
        if final_seq is not None and last >= final_seq:
            return  # the reader already has the final update
        for chunk in chunks:
            if chunk.seq == final_seq:
                yield _final_update(job, chunk)
                return
            yield JobUpdate(job_id=job_id, seq=chunk.seq, delta=chunk.delta, driver=job.driver_node)
            last = chunk.seq
        if ctx.closing:
            return
        try:
            await asyncio.wait_for(wake.wait(), idle)
        except TimeoutError:
            yield None


def _final_update(job: Any, chunk: JobChunk) -> JobUpdate:
    return JobUpdate(
        job_id=job.id,
        seq=chunk.seq,
        delta=chunk.delta,
        is_final=True,
        status=job.status,  # type: ignore[arg-type]
        driver=job.driver_node,
        finish_reason=job.finish_reason,
        usage=Usage.model_validate(job.usage) if job.usage else None,
        error=job.error,
    )
