"""What a node does on its own, not in answer to an event: recover at boot, then keep time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import delete, select

from handlers import driver, liveness, router, tracing, updates
from handlers.context import NodeContext, log
from schemas.jobs import ACTIVE_STATUSES, FINAL_STATUSES, JobStatus, JobUpdate
from store.errors import StorageUnavailable
from store.models import Job, RoutedJob, SeenNonce, ServedJob, UiLogin, Worker

SWEEP_INTERVAL_S = 0.5
PRUNE_INTERVAL_S = 60.0
SEEN_NONCE_RETENTION_S = 600.0  # well past any replay window: older messages are refused for their age
CLIENT_GRACE_S = 1.0  # the serving driver's own timed_out update, richer, normally arrives first



async def announce(ctx: NodeContext) -> None:
    """Before the process takes its first request.  Where processes share the store, a sibling settling
    orphans takes the jobs of every process it does not see alive there: this one must be seen before it
    serves a job, or a job it takes while its boot chores still run is settled as a dead process's."""
    if ctx.store.shared:
        await liveness.report_alive(ctx)


async def boot(ctx: NodeContext) -> None:
    """The chores of a restart; a store that refuses writes (full, read-only) is waited for, not given up on."""
    while True:
        try:
            await sweep(ctx)
            await prune(ctx)
            await router.boot(ctx)
            await driver.boot(ctx)
            return
        except StorageUnavailable as error:
            log.warning("upkeep: the boot chores wait for the store (%s); tried again in %.1f s", error, SWEEP_INTERVAL_S)
        await asyncio.sleep(SWEEP_INTERVAL_S)


async def run(ctx: NodeContext) -> None:
    """Sweep deadlines often, say we live now and then, prune rarely: each chore on a clock of its own, so
    one that waits on a peer (a heartbeat to a frozen router) holds up no other."""
    chores = [
        (SWEEP_INTERVAL_S, sweep), (router.HEARTBEAT_S, driver.keep_alive), (router.HEARTBEAT_S, driver.heartbeat), (PRUNE_INTERVAL_S, prune),
    ]
    await asyncio.gather(*(_every(ctx, interval, chore) for interval, chore in chores))


async def _every(ctx: NodeContext, interval: float, chore: Callable[[NodeContext], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await chore(ctx)
        except Exception:
            log.exception("upkeep: %s failed; it runs again in %.1f s", chore.__name__, interval)


async def sweep(ctx: NodeContext) -> None:
    now = time.time()
    await _expire_client_jobs(ctx, now)
    await router.expire(ctx, now)


async def _expire_client_jobs(ctx: NodeContext, now: float) -> None:
    async with ctx.store.reading() as session:
        overdue = select(Job.id, Job.traceparent).where(Job.status.in_(ACTIVE_STATUSES), Job.deadline < now - CLIENT_GRACE_S)
        late = (await session.execute(overdue)).all()
    for job_id, traceparent in late:
        final = JobUpdate(job_id=job_id, seq=0, is_final=True, status=JobStatus.TIMED_OUT, error="no answer before the job's deadline")
        with tracing.about(job_id, traceparent):
            await updates.record_update(ctx, final)


async def prune(ctx: NodeContext) -> None:
    """Finished jobs older than the retention period go, with their chunks; so do expired logins to the web page."""
    before = time.time() - ctx.settings.retention
    final = tuple(FINAL_STATUSES)
    async with ctx.store.writing() as session:
        await session.execute(delete(Job).where(Job.status.in_(final), Job.finished_at < before))
        await session.execute(delete(RoutedJob).where(RoutedJob.status.in_(final), RoutedJob.finished_at < before))
        await session.execute(delete(ServedJob).where(ServedJob.status.in_(final), ServedJob.finished_at < before))
        await session.execute(delete(SeenNonce).where(SeenNonce.sent_at < time.time() - SEEN_NONCE_RETENTION_S))
        await session.execute(delete(Worker).where(Worker.last_seen < before))
        await session.execute(delete(UiLogin).where(UiLogin.expires_at < time.time()))
