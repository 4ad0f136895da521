"""Whether the processes serving jobs are alive: heartbeats, orphans, drain.

Several processes may share one store (gunicorn workers, router replicas).  Each reports itself alive;
the jobs a dead one was serving (the previous process on this store, or a sibling silent for
WORKER_TTL_S) are settled by a live one: they end `failed`, or go back to the router if nothing of
them had left.  A process that stops drains first: it takes no new job and lets those it serves finish.
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select
from sqlalchemy import update as sa_update

from handlers import serving, tracing
from handlers.context import NodeContext, StopReason, log
from schemas.jobs import JobSpec, JobStatus, JobUpdate
from schemas.usage import TokenCount
from store.models import ServedJob, Worker

WORKER_TTL_S = 15.0  # a process sharing the store reports every few seconds; silent this long, it is dead


async def report_alive(ctx: NodeContext) -> None:
    """This process's heartbeat, for the others sharing the store."""
    now = time.time()
    async with ctx.store.writing() as session:
        worker = await session.get(Worker, ctx.worker)
        if worker is None:
            session.add(Worker(id=ctx.worker, started_at=now, last_seen=now))
        else:
            worker.last_seen = now


async def serving_now(ctx: NodeContext) -> list[str]:
    """Every job this node serves, whichever of its processes serves it."""
    async with ctx.store.reading() as session:
        return list(await session.scalars(select(ServedJob.id).where(ServedJob.status == JobStatus.RUNNING).order_by(ServedJob.id)))


async def settle_orphans(ctx: NodeContext) -> None:
    """Jobs whose serving process died end, or go back to the router.  Alone on its store, a process
    takes every job it is not serving as the last process's; sharing it, only those of processes
    not seen for WORKER_TTL_S.  Each orphan is claimed in one UPDATE, so one process settles it."""
    if ctx.store.shared:
        live = select(Worker.id).where(Worker.last_seen >= time.time() - WORKER_TTL_S)
        dead = ServedJob.worker.is_(None) | ServedJob.worker.not_in(live)
    else:
        dead = ServedJob.worker.is_(None) | (ServedJob.worker != ctx.worker)
    claim = sa_update(ServedJob).where(ServedJob.status == JobStatus.RUNNING, dead).values(worker=ctx.worker).returning(ServedJob)
    async with ctx.store.writing() as session:
        orphans = (await session.scalars(claim.execution_options(synchronize_session=False))).all()
    for served in orphans:
        ctx.spawn(_settle_orphan(ctx, served), name=f"settle-{served.id}")


async def _settle_orphan(ctx: NodeContext, served: ServedJob) -> None:
    """What the dead process produced died with it, so the job counts no tokens."""
    with tracing.about(served.id, served.traceparent):
        job = serving.Serving(ctx, JobSpec.model_validate(served.spec), served.origin_node)
        if not served.streamed and served.origin_node != ctx.name:
            await serving.release(ctx, job, "the driver restarted before it sent anything")
            return
        final = JobUpdate(
            job_id=served.id, seq=0, is_final=True, status=JobStatus.FAILED, driver=ctx.name, error="the driver restarted mid-job",
            tokens=TokenCount(estimated=True),
        )
        await serving.finish(ctx, job, final)


async def drain(ctx: NodeContext, grace: float) -> None:
    """Stop taking jobs, let those being served finish for `grace` seconds, then end the rest `failed`."""
    ctx.draining = True
    running = [entry.task for entry in ctx.serving.values()]
    if running:
        log.info("draining: waiting up to %.0f s for %d job(s)", grace, len(running))
        await asyncio.wait(running, timeout=grace)
    left = list(ctx.serving.values())
    for entry in left:
        entry.stop(StopReason.NODE_SHUT_DOWN)
    await asyncio.gather(*(entry.task for entry in left), return_exceptions=True)
