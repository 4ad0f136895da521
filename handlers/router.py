"""The router process: which drivers serve which model, the queue, and the relay of updates.

| event                          | reads                            | decides                           | writes                  | sends                         |
|--------------------------------|----------------------------------|-----------------------------------|-------------------------|-------------------------------|
| StartRouter (admin)            |                                  |                                   | config                  |                               |
| RegisterDriver (from a driver) |                                  |                                   | driver_registrations    | (dispatch)                    |
| RunJob (from a client driver)  | config, registrations            | is the model on offer to it?      | routed_jobs (queued)    | (dispatch)                    |
| dispatch (after the above)     | queue, registrations, loads      | least-loaded ready driver per job | routed_jobs (running)   | RunJob → driver               |
| JobUpdate (from a driver)      | routed_jobs                      | from the job's driver?            | routed_jobs when final  | JobUpdate → client, (dispatch)|
| ListModels (from any node)     | registrations                    | what is on offer to it            |                         |                               |
"""

from __future__ import annotations

import random
import time
from collections import Counter

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from handlers.config import config_for_update, read_config
from handlers.context import NodeContext, log
from handlers.errors import HandlerError, PeerError, unknown_job, unknown_model
from schemas.jobs import JobSpec
from schemas.messages import (
    Ack,
    JobAccepted,
    JobUpdate,
    ListModels,
    Message,
    ModelInfo,
    ModelList,
    RegisterDriver,
    RunJob,
    Source,
    StartRouter,
)
from store.models import DriverRegistration, RoutedJob


async def handle(ctx: NodeContext, source: Source, message: Message) -> Ack | JobAccepted | ModelList:
    if not isinstance(message, StartRouter):
        await _require_router(ctx)
    match message:
        case StartRouter():
            async with ctx.store.writing() as session:
                (await config_for_update(session)).is_router = True
            return Ack()
        case RegisterDriver():
            await _register(ctx, source.node, message)
            return Ack()
        case RunJob(job=spec):
            return await _enqueue(ctx, source, spec)
        case JobUpdate():
            await _relay(ctx, source, message)
            return Ack()
        case ListModels():
            async with ctx.store.reading() as session:
                return ModelList(models=await _offered(session, source.node))
    raise HandlerError(400, "unsupported_message", f"the router does not take {message.type}")  # type: ignore[attr-defined]


async def _require_router(ctx: NodeContext) -> None:
    async with ctx.store.reading() as session:
        if not (await read_config(session)).is_router:
            raise HandlerError(503, "not_a_router", f"{ctx.name} is not running a router (StartRouter)")


async def _register(ctx: NodeContext, node: str, message: RegisterDriver) -> None:
    now = time.time()
    async with ctx.store.writing() as session:
        await session.execute(delete(DriverRegistration).where(DriverRegistration.node == node))
        for model in dict.fromkeys(message.models):
            session.add(DriverRegistration(node=node, model=model, is_public=message.is_public, capacity=message.capacity, last_seen=now))
    for model in message.models:
        ctx.spawn(dispatch(ctx, model), name=f"dispatch-{model}")


async def _offered(session: AsyncSession, client_node: str) -> list[ModelInfo]:
    """Models whose drivers are public, or are the asking node itself."""
    rows = await session.execute(
        select(DriverRegistration.model, func.count())
        .where(DriverRegistration.is_public | (DriverRegistration.node == client_node))
        .group_by(DriverRegistration.model)
        .order_by(DriverRegistration.model)
    )
    return [ModelInfo(id=model, drivers=count, owned_by="network") for model, count in rows]


async def _enqueue(ctx: NodeContext, source: Source, spec: JobSpec) -> JobAccepted:
    if spec.client_node != source.node:
        raise HandlerError(403, "client_mismatch", f"{source.node} may not submit jobs for {spec.client_node}")
    async with ctx.store.writing() as session:
        offered = [info.id for info in await _offered(session, source.node)]
        if spec.model not in offered:
            raise unknown_model(spec.model, offered)
        if await session.get(RoutedJob, spec.job_id) is not None:
            raise HandlerError(409, "duplicate_job", f"job {spec.job_id} was already submitted")
        session.add(
            RoutedJob(
                id=spec.job_id,
                client_node=source.node,
                model=spec.model,
                spec=spec.model_dump(mode="json"),
                status="queued",
                created_at=time.time(),
                deadline=spec.deadline,
            )
        )
    ctx.spawn(dispatch(ctx, spec.model), name=f"dispatch-{spec.model}")
    return JobAccepted(job_id=spec.job_id, status="queued")


async def dispatch(ctx: NodeContext, model: str) -> None:
    """Hand queued jobs of `model`, oldest first, to the least-loaded drivers with a free slot."""
    async with ctx.store.writing() as session:
        assignments = await _assign(session, model)
    for job_id, driver, spec in assignments:
        try:
            await ctx.transport.send("router", driver, "driver", RunJob(job=spec))
        except PeerError as error:
            log.warning("driver %s refused job %s (%s); it is deregistered and the job requeued", driver, job_id, error.message)
            await _requeue(ctx, job_id, driver)
            ctx.spawn(dispatch(ctx, model), name=f"dispatch-{model}")


async def _assign(session: AsyncSession, model: str) -> list[tuple[str, str, JobSpec]]:
    drivers = (await session.scalars(select(DriverRegistration).where(DriverRegistration.model == model))).all()
    if not drivers:
        return []
    loads = Counter(
        dict(
            (
                await session.execute(
                    select(RoutedJob.driver_node, func.count()).where(RoutedJob.status == "running").group_by(RoutedJob.driver_node)
                )
            ).all()
        )
    )
    queued = (
        await session.scalars(
            select(RoutedJob).where(RoutedJob.model == model, RoutedJob.status == "queued").order_by(RoutedJob.created_at)
        )
    ).all()
    now = time.time()
    assignments: list[tuple[str, str, JobSpec]] = []
    for job in queued:
        ready = [d for d in drivers if loads[d.node] < d.capacity and (d.is_public or d.node == job.client_node)]
        if not ready:
            continue
        least = min(loads[d.node] / d.capacity for d in ready)
        driver = random.choice([d for d in ready if loads[d.node] / d.capacity == least]).node
        loads[driver] += 1
        job.status, job.driver_node, job.dispatched_at = "running", driver, now
        assignments.append((job.id, driver, JobSpec.model_validate(job.spec)))
    return assignments


async def _requeue(ctx: NodeContext, job_id: str, driver: str) -> None:
    async with ctx.store.writing() as session:
        await session.execute(delete(DriverRegistration).where(DriverRegistration.node == driver))
        job = await session.get(RoutedJob, job_id)
        if job is not None and job.status == "running" and job.driver_node == driver:
            job.status, job.driver_node, job.dispatched_at = "queued", None, None


async def _relay(ctx: NodeContext, source: Source, message: JobUpdate) -> None:
    update = message.update
    async with ctx.store.reading() as session:
        job = await session.get(RoutedJob, update.job_id)
    if job is None:
        raise unknown_job(update.job_id)
    if job.driver_node != source.node:
        raise HandlerError(403, "not_the_jobs_driver", f"job {update.job_id} was not given to {source.node}")
    update.driver = source.node
    try:
        await ctx.transport.send("router", job.client_node, "driver", message)
    except PeerError as error:
        log.warning("job %s: client node %s did not take update %d: %s", job.id, job.client_node, update.seq, error.message)
    if update.is_final:
        async with ctx.store.writing() as session:
            row = await session.get(RoutedJob, update.job_id)
            if row is not None:
                row.status, row.finished_at = update.status or "failed", time.time()
        ctx.spawn(dispatch(ctx, job.model), name=f"dispatch-{job.model}")
