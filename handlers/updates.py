"""A job's updates on its client's node: each chunk stored, then the job's readers woken."""

from __future__ import annotations

import functools
import time
from typing import Any

from sqlalchemy import Float, Integer, String, bindparam, func, insert, select
from sqlalchemy import Update as UpdateStatement
from sqlalchemy import update as sa_update
from sqlalchemy.ext.asyncio import AsyncSession

from handlers import accounting, metrics
from handlers.context import NodeContext, log
from handlers.errors import ErrorCode, HandlerError, unknown_job
from schemas.jobs import FINAL_STATUSES, JobSpec, JobStatus
from schemas.jobs import JobUpdate as Update
from schemas.messages import Source
from schemas.usage import Role, TokenCount, utc_day
from store.models import Job, JobChunk


async def record_from_router(ctx: NodeContext, source: Source, update: Update) -> None:
    if await record_update(ctx, update, router=source.node):
        return
    async with ctx.store.reading() as session:
        job = (await session.execute(select(Job.router_node, Job.status).where(Job.id == update.job_id))).first()
    if job is None:
        raise unknown_job(update.job_id)
    if job.router_node != source.node:
        raise HandlerError(403, ErrorCode.NOT_THE_JOBS_ROUTER, f"{source.node} is not the router of job {update.job_id}")
    if not update.is_final and job.status in FINAL_STATUSES:
        # Ended here (cancelled, timed out) while its driver still streams: the driver hears it and stops.
        raise HandlerError(409, ErrorCode.JOB_FINISHED, f"job {update.job_id} already ended: {job.status}")
    # otherwise a repeat: nothing to do


async def record_update(ctx: NodeContext, update: Update, router: str | None = None) -> bool:
    """Store one chunk for the job's readers and wake them; False if it changed nothing.

    Repeats and anything after the job's end change nothing; with `router`, neither does an
    update for a job that was not given to that router.  A final update always takes the
    sequence number right after the last chunk.
    """
    now = time.time()
    statement = _recording(update.is_final, router is not None, bool(update.driver), bool(update.delta or update.chunks))
    parameters: dict[str, Any] = {
        "p_job_id": update.job_id, "p_seq": update.seq, "p_router": router, "p_driver": update.driver, "p_now": now,
        "p_status": JobStatus.RUNNING,
    }
    if update.is_final:
        parameters |= {
            "p_status": update.status or JobStatus.FAILED,
            "p_finish_reason": update.finish_reason,
            "p_usage": update.usage.model_dump() if update.usage else None,
            "p_error": update.error,
            "p_llm_error": update.llm_error.model_dump() if update.llm_error else None,
        }

    async def write(session: AsyncSession) -> tuple[Any, TokenCount | None] | None:
        connection = await session.connection()
        job = (await connection.execute(statement, parameters)).first()
        if job is None:
            return None
        chunk = {"job_id": update.job_id, "seq": job.next_seq - 1, "delta": update.delta, "chunks": update.chunks}
        await connection.execute(_STORE_CHUNK, chunk)
        await ctx.store.announce(session, update.job_id)
        if not update.is_final:
            return job, None
        tokens = accounting.counted(update.tokens, update.usage) or await _estimate(session, update.job_id)
        await accounting.record(session, role=Role.CLIENT, day=utc_day(now), client=job.client, model=job.model, tokens=tokens)
        return job, tokens

    written = await ctx.store.write_soon(write)
    if written is None:
        return False
    ctx.signals.notify(update.job_id)
    job, tokens = written
    if update.is_final:
        status = update.status or JobStatus.FAILED
        first_token = None if job.first_token_at is None else job.first_token_at - job.created_at
        metrics.count_job(ctx.name, Role.CLIENT, job.model, status, tokens, now - job.created_at, first_token)
        log.info("job %s ended %s", update.job_id, status)
    return True


_STORE_CHUNK = insert(JobChunk)


@functools.cache
def _recording(is_final: bool, by_router: bool, names_driver: bool, has_output: bool) -> UpdateStatement:
    """The UPDATE that takes one update into the job's row, built once for each shape (it runs for every chunk);
    the values come as parameters.  RETURNING gives what the chunk's row and the job's end need."""
    conditions = [Job.id == bindparam("p_job_id"), Job.status.not_in(FINAL_STATUSES)]
    seq = bindparam("p_seq", type_=Integer)
    if not is_final:
        conditions.append(Job.next_seq <= seq)
    if by_router:
        conditions.append(Job.router_node == bindparam("p_router", type_=String))
    values: dict[Any, Any] = {Job.next_seq: Job.next_seq + 1 if is_final else seq + 1, Job.status: bindparam("p_status", type_=String)}
    if names_driver:
        values[Job.driver_node] = bindparam("p_driver", type_=String)
    now = bindparam("p_now", type_=Float)
    if has_output:
        values[Job.first_token_at] = func.coalesce(Job.first_token_at, now)
    if is_final:
        columns = Job.__table__.c
        values |= {
            Job.finished_at: now,
            Job.finish_reason: bindparam("p_finish_reason", type_=String),
            Job.usage: bindparam("p_usage", type_=columns.usage.type),
            Job.error: bindparam("p_error", type_=String),
            Job.llm_error: bindparam("p_llm_error", type_=columns.llm_error.type),
        }
    returned = (Job.next_seq, Job.client, Job.model, Job.created_at, Job.first_token_at)
    return sa_update(Job).where(*conditions).values(values).returning(*returned)


async def _estimate(session: AsyncSession, job_id: str) -> TokenCount:
    """A job that ended without a count from its driver (cancelled here, or ended by its deadline): its prompt,
    and the chunks that reached this node; nothing if it never reached a driver."""
    job = (await session.execute(select(Job.spec, Job.driver_node).where(Job.id == job_id))).one()
    rows = (await session.execute(select(JobChunk.delta, JobChunk.chunks).where(JobChunk.job_id == job_id))).all()
    produced = sum(accounting.output_chunk_count(row.chunks) if row.chunks is not None else int(bool(row.delta)) for row in rows)
    if job.driver_node is None and not produced:
        return TokenCount()
    spec = JobSpec.model_validate(job.spec)
    return accounting.estimate(spec.kind, spec.body, produced)
