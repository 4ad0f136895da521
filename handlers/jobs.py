"""Reading jobs for clients: the record, and the stream of updates (replayed from the store, then live)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from sqlalchemy import Select, bindparam, select

from handlers import tracing
from handlers.context import NodeContext
from handlers.errors import PeerError, unknown_job
from handlers.assembly import assemble
from schemas.jobs import FINAL_STATUSES, JobRecord, JobStatus, JobUpdate, LlmError, output_chunks
from schemas.openai_api import JobKind, Usage
from schemas.messages import QueuePlace, QueuePosition
from store.models import Job, JobChunk


async def record(ctx: NodeContext, job_id: str, with_queue_position: bool = False) -> JobRecord:
    async with ctx.store.reading() as session:
        job = await session.get(Job, job_id)
        if job is None:
            raise unknown_job(job_id)
        rows = (await session.execute(select(JobChunk.seq, JobChunk.delta, JobChunk.chunks).where(JobChunk.job_id == job_id).order_by(JobChunk.seq))).all()
    kind = JobKind(job.spec.get("kind", JobKind.CHAT))
    chunks = [chunk for row in rows for chunk in output_chunks(row.seq, row.delta, row.chunks)]
    usage = Usage.model_validate(job.usage) if job.usage else None
    response = whole_answer(
        kind, chunks, response_id=kind.id_prefix + job.id, created=int(job.created_at), model=job.model,
        finish_reason=job.finish_reason, usage=usage,
    )
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
        text="".join(row.delta for row in rows),
        response=response if chunks else None,
        finish_reason=job.finish_reason,
        usage=usage,
        error=job.error,
        llm_error=LlmError.model_validate(job.llm_error) if job.llm_error else None,
        queue_position=await _queue_position(ctx, job) if with_queue_position else None,
    )


def whole_answer(
    kind: JobKind, chunks: list[dict[str, Any]], *, response_id: str, created: int, model: str, finish_reason: str | None,
    usage: Usage | None,
) -> dict[str, Any]:
    """The answer a non-streamed request gets, from the job's chunks and what its final update said."""
    response = assemble(kind, chunks, response_id=response_id, created=created, model=model)
    for choice in response["choices"] if kind.streams else []:
        if choice["index"] == 0 and choice["finish_reason"] is None:
            choice["finish_reason"] = finish_reason  # a job stored before chunks were kept
    if usage is not None and response.get("usage") is None:
        response["usage"] = usage.model_dump()
    return response


async def _queue_position(ctx: NodeContext, job: Job) -> int | None:
    if job.status != JobStatus.QUEUED or job.router_node is None:
        return None
    try:
        with tracing.about(job.id, job.traceparent):
            reply = await ctx.transport.send("driver", job.router_node, "router", QueuePosition(job_id=job.id))
    except PeerError:
        return None
    return QueuePlace.model_validate(reply).position


async def follow(ctx: NodeContext, job_id: str, after_seq: int = -1, idle: float = 15.0) -> AsyncGenerator[JobUpdate | None, None]:
    """Every update after `after_seq`, in order, ending with the final one.

    Yields None after `idle` seconds without news, so a transport can send a heartbeat.
    """
    last = after_seq
    loop = asyncio.get_running_loop()
    heartbeat_at = loop.time() + idle
    while True:
        wake = ctx.signals.watch(job_id)
        async with ctx.store.querying() as connection:
            rows = (await connection.execute(_NEWS, {"job_id": job_id, "after_seq": last})).all()
        if not rows:
            raise unknown_job(job_id)
        job = rows[0]
        final_seq = job.next_seq - 1 if job.status in FINAL_STATUSES else None
        if final_seq is not None and last >= final_seq:
            ctx.signals.notify(job_id)  # nothing more will come: drop the job's wake-up event
            return  # the reader already has the final update
        for row in rows:
            if row.seq is None:
                break
            if row.seq == final_seq:
                ctx.signals.notify(job_id)  # nothing more will come: drop the job's wake-up event
                yield _final_update(row)
                return
            yield JobUpdate(job_id=job_id, seq=row.seq, delta=row.delta, chunks=row.chunks, driver=row.driver_node)
            last = row.seq
            heartbeat_at = loop.time() + idle
        if ctx.closing:
            return
        try:
            await asyncio.wait_for(wake.wait(), max(heartbeat_at - loop.time(), 0.0))
        except TimeoutError:
            heartbeat_at = loop.time() + idle
            yield None


# One statement, built once (a reader runs it at every wake-up): the job's state, joined with its chunks after
# `after_seq` (none: one row of NULLs).
_NEWS: Select[Any] = (
    select(
        Job.id, Job.status, Job.next_seq, Job.driver_node, Job.finish_reason, Job.usage, Job.error, Job.llm_error,
        JobChunk.seq, JobChunk.delta, JobChunk.chunks,
    )
    .outerjoin(JobChunk, (JobChunk.job_id == Job.id) & (JobChunk.seq > bindparam("after_seq")))
    .where(Job.id == bindparam("job_id"))
    .order_by(JobChunk.seq)
)


def _final_update(job: Any) -> JobUpdate:
    return JobUpdate(
        job_id=job.id,
        seq=job.seq,
        delta=job.delta,
        chunks=job.chunks,
        is_final=True,
        status=job.status,  # type: ignore[arg-type]
        driver=job.driver_node,
        finish_reason=job.finish_reason,
        usage=Usage.model_validate(job.usage) if job.usage else None,
        error=job.error,
        llm_error=LlmError.model_validate(job.llm_error) if job.llm_error else None,
    )
