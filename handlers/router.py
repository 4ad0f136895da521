"""The router process: which drivers serve which model, the queue, and the relay of updates.

| event                          | reads                       | decides                                 | writes                     | sends                          |
|--------------------------------|-----------------------------|-----------------------------------------|----------------------------|--------------------------------|
| StartRouter (admin)            |                             |                                         | config                     |                                |
| RegisterDriver (driver, beat)  | registrations               |                                         | registrations              | (dispatch)                     |
| RunJob (client's driver)       | routed_jobs, registrations  | a repeat? is the model on offer to it?  | routed_jobs (queued)       | (dispatch)                     |
| dispatch                       | queue, registrations, loads | least-loaded ready driver per job, not  | routed_jobs (running)      | RunJob → driver                |
|                                |                             | the one that gave it back if another is |                            |                                |
| JobUpdate (job's driver)       | routed_jobs                 | from the job's driver? still running?   | routed_jobs (first, final) | JobUpdate → client, (dispatch) |
| ReleaseJob (job's driver)      | routed_jobs, registrations  | retry (with backoff) or give up?        | routed_jobs, registrations | JobUpdate (failed) → client    |
| CancelJob (job's client)       | routed_jobs                 |                                         | routed_jobs                | CancelJob → driver             |
| ListModels (any node)          | registrations               | what is on offer to it                  |                            |                                |
| RouterView (any node)          | registrations, routed_jobs  | which drivers and queues it may see     |                            |                                |
| expire (every second)          | routed_jobs, registrations  | past deadline? driver silent too long?  | routed_jobs, registrations | JobUpdate (timed_out) → client |
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from typing import NamedTuple

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from handlers import accounting, budgets, metrics, tracing
from handlers.config import config_for_update, read_config
from handlers.context import NodeContext, log
from handlers.errors import HandlerError, PeerError, too_late, unknown_job, unknown_model
from schemas.jobs import FINAL_STATUSES, JobSpec, JobUpdate
from schemas.messages import (
    Ack,
    CancelJob,
    DriverState,
    JobAccepted,
    JobUpdateMessage,
    ListModels,
    Message,
    ModelInfo,
    ModelList,
    QueuePlace,
    QueuePosition,
    RegisterDriver,
    ReleaseJob,
    RouterState,
    RouterStatus,
    RouterView,
    RunJob,
    SetBudget,
    SetGate,
    Source,
    StartRouter,
)
from schemas.usage import Role, TokenCount, utc_day
from store.models import DriverRegistration, RoutedJob

DRIVER_TTL_S = 20.0  # a driver re-registers every HEARTBEAT_S; silent this long, it is taken as gone
HEARTBEAT_S = 5.0
RUNNING_GRACE_S = 2.0  # the serving driver ends a job at its deadline; the router waits this much longer
COOLDOWN_S = 30.0
FAILURES_BEFORE_COOLDOWN = 3
RETRY_BACKOFF_S = 0.2
QUEUE_FULL_RETRY_S = 1.0
RECONCILE_MARGIN_S = 2.0  # a RunJob may still be on its way when a driver lists what it serves
HAND_OVER_S = 5.0  # a driver that has not taken a job by then (frozen, overloaded) is skipped: the job is queued again
# A driver checks `accept_by` just before it commits a job; the router waits this much longer for its answer, since a
# job queued again while its driver has it is served twice (a commit under a burst of jobs took over 1 s in CI).
HAND_OVER_MARGIN_S = 5.0
RELAY_TIMEOUT_S = 3.0  # an update for a client node that does not answer goes back to its driver, which retries


# Messages about a job need no check: only a router holds routed jobs.
_NEED_ROUTER = (RegisterDriver, SetGate, SetBudget, RouterStatus, RouterView)


class Assignment(NamedTuple):
    """A queued job given to a driver, to be handed over once the assignment is committed."""

    job_id: str
    driver: str
    spec: JobSpec
    arrived_at: float  # when the router queued it
    attempts: int  # earlier attempts: 0 for its first hand-over
    traceparent: str | None


async def handle(ctx: NodeContext, source: Source, message: Message) -> Ack | JobAccepted | ModelList | QueuePlace | RouterState:
    if isinstance(message, _NEED_ROUTER):
        await _require_router(ctx)
    match message:
        case StartRouter():
            async with ctx.store.writing() as session:
                (await config_for_update(session)).is_router = True
            return Ack()
        case SetGate():
            async with ctx.store.writing() as session:
                config = await config_for_update(session)
                config.allow_clients, config.deny_clients = message.allow, message.deny
                config.max_in_flight_per_client, config.max_queue = message.max_in_flight_per_client, message.max_queue
            return Ack()
        case SetBudget():
            await budgets.set_budget(ctx, message)
            return Ack()
        case RouterStatus():
            return await state(ctx)
        case RouterView():
            return await state(ctx, visible_to=source.node)
        case QueuePosition(job_id=job_id):
            return await _queue_position(ctx, source, job_id)
        case RegisterDriver():
            await _register(ctx, source.node, message)
            return Ack()
        case RunJob():
            return await _enqueue(ctx, source, message)
        case JobUpdateMessage():
            await _relay(ctx, source, message)
            return Ack()
        case ReleaseJob(job_id=job_id, reason=reason):
            await _released(ctx, source, job_id, reason)
            return Ack()
        case CancelJob(job_id=job_id):
            await _cancel(ctx, source, job_id)
            return Ack()
        case ListModels():
            async with ctx.store.reading() as session:  # an empty list, not an error, when not routing
                return ModelList(models=await _offered(session, source.node))
    raise HandlerError(400, "unsupported_message", f"the router does not take {message.type}")  # type: ignore[attr-defined]


async def boot(ctx: NodeContext) -> None:
    """After a restart the queue is still in the store: hand out what waits."""
    async with ctx.store.reading() as session:
        models = (await session.scalars(select(RoutedJob.model).where(RoutedJob.status == "queued").distinct())).all()
    for model in models:
        await dispatch(ctx, model)


async def _require_router(ctx: NodeContext) -> None:
    async with ctx.store.reading() as session:
        if not (await read_config(session)).is_router:
            raise HandlerError(503, "not_a_router", f"{ctx.name} is not running a router (StartRouter)")


async def _register(ctx: NodeContext, node: str, message: RegisterDriver) -> None:
    """Replace what `node` serves, keeping its failure count across heartbeats (not across restarts)."""
    now = time.time()
    models = list(dict.fromkeys(message.models))
    async with ctx.store.writing() as session:
        await session.execute(
            delete(DriverRegistration).where(DriverRegistration.node == node, DriverRegistration.model.not_in(models))
        )
        known = {r.model: r for r in await session.scalars(select(DriverRegistration).where(DriverRegistration.node == node))}
        for model in models:
            row = known.get(model) or DriverRegistration(node=node, model=model, failures=0, cooldown_until=0.0)
            row.is_public, row.capacity, row.last_seen = message.is_public, message.capacity, now
            if message.restarted:
                row.failures, row.cooldown_until = 0, 0.0
            session.add(row)
        lost = (
            await session.scalars(
                select(RoutedJob).where(
                    RoutedJob.driver_node == node,
                    RoutedJob.status == "running",
                    RoutedJob.dispatched_at < message.as_of - RECONCILE_MARGIN_S,
                    RoutedJob.id.not_in(message.serving),
                )
            )
        ).all()
    for job in lost:
        await _take_back(ctx, job, node, f"driver {node} no longer has the job", driver_failed=False)
    for model in models:
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


async def _enqueue(ctx: NodeContext, source: Source, offer: RunJob) -> JobAccepted:
    spec = offer.job
    if spec.client_node != source.node:
        raise HandlerError(403, "client_mismatch", f"{source.node} may not submit jobs for {spec.client_node}")
    async with ctx.store.writing() as session:
        config = await read_config(session)
        if not config.is_router:
            raise HandlerError(503, "not_a_router", f"{ctx.name} is not running a router (StartRouter)")
        if (earlier := await session.get(RoutedJob, spec.job_id)) is not None:
            if earlier.client_node != source.node:
                raise HandlerError(409, "duplicate_job", f"job {spec.job_id} was already submitted by another node")
            # A repeat: the first answer was lost (a router replica died before it replied).
            return JobAccepted(job_id=spec.job_id, status="queued" if earlier.status == "queued" else "running")
        offered = [info.id for info in await _offered(session, source.node)]
        if spec.model not in offered:
            raise unknown_model(spec.model, offered)
        if (refusal := await ctx.gate(spec, source.node, session)) is not None:
            raise HandlerError(403, "refused_by_gate", refusal)
        await budgets.check(session, source.node, spec.api_key_label, time.time())
        await _check_queue_room(session, spec.model, config.max_queue)
        session.add(
            RoutedJob(
                id=spec.job_id,
                client_node=source.node,
                model=spec.model,
                spec=spec.model_dump(mode="json"),
                status="queued",
                attempts=0,
                streamed=False,
                created_at=time.time(),
                deadline=spec.deadline,
                api_key_label=spec.api_key_label,
                traceparent=tracing.traceparent_of(spec.job_id),
                tokens_counted=False,
            )
        )
        await session.flush()
        assignments = await _assign(session, spec.model, time.time())  # a free driver takes it in the same transaction
        if offer.too_late():  # last, just before the commit: the client was told its job failed
            raise too_late(spec.job_id)
    log.info("job %s queued for %s from %s", spec.job_id, spec.model, source.node)
    if assignments:
        ctx.spawn(_hand_over(ctx, spec.model, assignments), name=f"hand-over-{spec.job_id}")
    return JobAccepted(job_id=spec.job_id, status="queued")


async def _check_queue_room(session: AsyncSession, model: str, limit: int) -> None:
    waiting = await session.scalar(select(func.count()).where(RoutedJob.model == model, RoutedJob.status == "queued")) or 0
    if waiting >= limit:
        raise HandlerError(429, "queue_full", f"the queue for {model} is full ({waiting} jobs waiting)", retry_after=QUEUE_FULL_RETRY_S)


async def _clients_job(session: AsyncSession, source: Source, job_id: str, for_update: bool = False) -> RoutedJob:
    """The job, if it is the asking node's."""
    job = await session.get(RoutedJob, job_id, with_for_update=for_update)
    if job is None:
        raise unknown_job(job_id)
    if job.client_node != source.node:
        raise HandlerError(403, "not_the_jobs_client", f"job {job_id} is not {source.node}'s")
    return job


async def _queue_position(ctx: NodeContext, source: Source, job_id: str) -> QueuePlace:
    async with ctx.store.reading() as session:
        job = await _clients_job(session, source, job_id)
        if job.status != "queued":
            return QueuePlace(position=None)
        ahead = await session.scalar(
            select(func.count()).where(RoutedJob.model == job.model, RoutedJob.status == "queued", RoutedJob.created_at < job.created_at)
        )
    return QueuePlace(position=ahead or 0)


async def state(ctx: NodeContext, visible_to: str | None = None) -> RouterState:
    """Drivers (models, capacity, load, last seen, cool-down) and queue lengths; with `visible_to`, only
    the drivers on offer to that node (public, or itself) and the queues of their models."""
    async with ctx.store.reading() as session:
        registrations = (await session.scalars(select(DriverRegistration).order_by(DriverRegistration.node))).all()
        loads = dict(
            (await session.execute(
                select(RoutedJob.driver_node, func.count()).where(RoutedJob.status == "running").group_by(RoutedJob.driver_node)
            )).all()
        )
        queues = dict(
            (await session.execute(
                select(RoutedJob.model, func.count()).where(RoutedJob.status == "queued").group_by(RoutedJob.model)
            )).all()
        )
    now = time.time()
    if visible_to is not None:
        registrations = [row for row in registrations if row.is_public or row.node == visible_to]
        offered = {row.model for row in registrations}
        queues = {model: waiting for model, waiting in queues.items() if model in offered}
    drivers: dict[str, DriverState] = {}
    for row in registrations:
        driver = drivers.setdefault(
            row.node,
            DriverState(
                node=row.node, models=[], is_public=row.is_public, capacity=row.capacity, load=loads.get(row.node, 0),
                last_seen=row.last_seen, cooled_down_until=row.cooldown_until if row.cooldown_until > now else None,
            ),
        )
        driver.models.append(row.model)
    return RouterState(drivers=list(drivers.values()), queues=queues)


# --- dispatch ----------------------------------------------------------------------------


async def dispatch(ctx: NodeContext, model: str) -> None:
    """Hand queued jobs of `model`, oldest first, to the least-loaded ready drivers."""
    async with ctx.store.writing() as session:
        assignments = await _assign(session, model, time.time())
    await _hand_over(ctx, model, assignments)


async def _hand_over(ctx: NodeContext, model: str, assignments: list[Assignment]) -> None:
    for job_id, driver, spec, arrived_at, attempts, traceparent in assignments:
        if attempts == 0:
            metrics.QUEUE_WAIT.labels(ctx.name, model).observe(max(time.time() - arrived_at, 0.0))
        with tracing.about(job_id, traceparent):
            offer = RunJob.offer(spec, HAND_OVER_S)
            try:
                await ctx.transport.send("router", driver, "driver", offer, timeout=offer.reply_timeout(HAND_OVER_MARGIN_S))
            except PeerError as error:
                log.warning("driver %s did not take job %s (%s); job requeued", driver, job_id, error.message)
                await _requeue(ctx, job_id, driver, count_failure=True)
                ctx.spawn(dispatch(ctx, model), name=f"dispatch-{model}")


async def _assign(session: AsyncSession, model: str, now: float) -> list[Assignment]:
    # On PostgreSQL the model's driver rows are locked, so router replicas assign one at a time per model,
    # and each takes queued jobs no other replica holds (SKIP LOCKED).  SQLite serializes writers anyway.
    drivers = (
        await session.scalars(
            select(DriverRegistration)
            .where(DriverRegistration.model == model, DriverRegistration.cooldown_until <= now)
            .with_for_update()
        )
    ).all()
    if not drivers:
        return []
    running = select(RoutedJob.driver_node, func.count()).where(RoutedJob.status == "running").group_by(RoutedJob.driver_node)
    loads: Counter[str] = Counter({node: count for node, count in await session.execute(running) if node is not None})
    queued = (
        await session.scalars(
            select(RoutedJob)
            .where(RoutedJob.model == model, RoutedJob.status == "queued", RoutedJob.deadline > now)  # the late are ended, not served
            .order_by(RoutedJob.created_at)
            .with_for_update(skip_locked=True)
        )
    ).all()
    assignments: list[Assignment] = []
    for job in queued:
        ready = [d for d in drivers if loads[d.node] < d.capacity and (d.is_public or d.node == job.client_node)]
        if not ready:
            continue
        # A job a driver gave back goes elsewhere if it can: the same LLM would likely fail it again.
        candidates = [d for d in ready if d.node != job.returned_by] or ready
        least = min(loads[d.node] / d.capacity for d in candidates)
        driver = random.choice([d for d in candidates if loads[d.node] / d.capacity == least]).node
        loads[driver] += 1
        job.status, job.driver_node, job.dispatched_at = "running", driver, now
        spec = JobSpec.model_validate(job.spec)
        assignments.append(Assignment(job.id, driver, spec, job.created_at, job.attempts, job.traceparent))
    return assignments


async def _requeue(
    ctx: NodeContext, job_id: str, driver: str, count_failure: bool, attempts_allowed: float = math.inf
) -> RoutedJob | None:
    """Take the job back from `driver` and queue it again; a driver that keeps failing is cooled down for a
    while.  A job out of attempts stays with `driver` for the caller to end: queued, a dispatch could hand
    it out first.  None if the job is not running on `driver` (any more)."""
    now = time.time()
    async with ctx.store.writing() as session:
        if count_failure:
            for row in await session.scalars(select(DriverRegistration).where(DriverRegistration.node == driver).with_for_update()):
                row.failures += 1
                if row.failures >= FAILURES_BEFORE_COOLDOWN:
                    row.cooldown_until, row.failures = now + COOLDOWN_S, 0
                    log.warning("driver %s failed repeatedly; cooled down for %.0f s", driver, COOLDOWN_S)
        # Locked: on PostgreSQL a router replica may be ending this job at the same moment.
        job = await session.get(RoutedJob, job_id, with_for_update=True)
        if job is None or job.status != "running" or job.driver_node != driver:
            return None
        job.attempts += 1
        if job.attempts < attempts_allowed:
            job.status, job.driver_node, job.dispatched_at, job.returned_by = "queued", None, None, driver
        return job


# --- updates from drivers ------------------------------------------------------------------


async def _relay(ctx: NodeContext, source: Source, message: JobUpdateMessage) -> None:
    update_ = message.update
    columns = (
        RoutedJob.id, RoutedJob.driver_node, RoutedJob.client_node, RoutedJob.status, RoutedJob.streamed, RoutedJob.model,
        RoutedJob.traceparent, RoutedJob.tokens_counted,
    )
    async with ctx.store.reading() as session:
        job = (await session.execute(select(*columns).where(RoutedJob.id == update_.job_id))).first()
    if job is None:
        raise unknown_job(update_.job_id)
    if tracing.traceparent_of(job.id) is None:  # from a driver of an earlier version, which sends none
        tracing.set_job(job.id, job.traceparent)
    if job.driver_node != source.node:
        raise HandlerError(403, "not_the_jobs_driver", f"job {update_.job_id} was not given to {source.node}")
    repeated_final = update_.is_final and job.status in FINAL_STATUSES  # the driver retries a final the client missed
    if job.status in FINAL_STATUSES and not repeated_final:
        raise HandlerError(409, "job_finished", f"job {job.id} already ended: {job.status}")
    update_.driver = source.node
    tokens = accounting.counted(update_.tokens, update_.usage) if update_.is_final else None
    if update_.is_final and not repeated_final:
        # The slot frees, and the next queued job takes it, before the client hears: a slow client holds nothing.
        ended_as = update_.status or "failed"
        ending = await ctx.store.write_soon(lambda session: _finish_and_assign(session, job.id, ended_as, job.model, tokens))
        if ending is not None:
            _count_ended(ctx, job.model, ended_as, tokens, ending)
            log.info("job %s ended %s", job.id, ended_as)
            if ending.assignments:
                ctx.spawn(_hand_over(ctx, job.model, ending.assignments), name=f"hand-over-{job.model}")
    elif repeated_final and tokens is not None and not job.tokens_counted:
        # The router had ended it (cancelled, timed out); its driver says now what the LLM had produced.
        if await ctx.store.write_soon(lambda session: _add_late_tokens(session, job.id, tokens)):
            metrics.count_tokens(ctx.name, Role.ROUTER, job.model, tokens)
    if repeated_final and job.status == "cancelled":
        return  # the client ended it itself: it needs no final
    try:
        await ctx.transport.send("router", job.client_node, "driver", message, timeout=RELAY_TIMEOUT_S)
    except PeerError as error:
        # Not swallowed: the driver keeps the update and tries again (with backoff), so a client
        # node that restarts misses no chunk.
        status = 503 if error.status == 503 else 502
        raise HandlerError(status, "client_unreachable", f"client node {job.client_node}: {error.message}") from error
    if not update_.is_final and not job.streamed:
        await ctx.store.write_soon(lambda session: _mark_streamed(session, job.id, source.node))


class _Ending(NamedTuple):
    arrived_at: float  # when the router queued the job
    assignments: list[Assignment]  # of the slot it freed


async def _finish_and_assign(
    session: AsyncSession, job_id: str, status: str, model: str, tokens: TokenCount | None
) -> _Ending | None:
    """End the job, count it, and give its slot to the queue; None if it had ended already (another event,
    or another replica, came first).  Without `tokens` (the router ends it itself) it counts none yet: its
    driver may say later what the LLM produced (`_add_late_tokens`)."""
    now = time.time()
    ended = (
        await session.execute(
            update(RoutedJob)
            .where(RoutedJob.id == job_id, RoutedJob.status.not_in(FINAL_STATUSES))
            .values(status=status, finished_at=now, tokens_counted=tokens is not None)
            .returning(RoutedJob.client_node, RoutedJob.api_key_label, RoutedJob.created_at)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if ended is None:
        return None
    await accounting.record(
        session, role=Role.ROUTER, day=utc_day(now), client=ended.client_node, label=ended.api_key_label, model=model,
        tokens=tokens,
    )
    return _Ending(ended.created_at, await _assign(session, model, now))


async def _add_late_tokens(session: AsyncSession, job_id: str, tokens: TokenCount) -> bool:
    """Add the tokens of a job the router ended before its driver said what the LLM produced, once."""
    counted = (
        await session.execute(
            update(RoutedJob)
            .where(RoutedJob.id == job_id, RoutedJob.tokens_counted.is_(False))
            .values(tokens_counted=True)
            .returning(RoutedJob.client_node, RoutedJob.api_key_label, RoutedJob.model, RoutedJob.finished_at)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if counted is None:
        return False
    await accounting.record(
        session, role=Role.ROUTER, day=utc_day(counted.finished_at or time.time()), client=counted.client_node,
        label=counted.api_key_label, model=counted.model, tokens=tokens, jobs=0,
    )
    return True


def _count_ended(ctx: NodeContext, model: str, status: str, tokens: TokenCount | None, ending: _Ending) -> None:
    metrics.count_job(ctx.name, Role.ROUTER, model, status, tokens, time.time() - ending.arrived_at)


async def _mark_streamed(session: AsyncSession, job_id: str, driver: str) -> None:
    """Part of the job reached its client: it can no longer go to another driver; and its driver works."""
    await session.execute(update(RoutedJob).where(RoutedJob.id == job_id).values(streamed=True).execution_options(synchronize_session=False))
    await session.execute(
        update(DriverRegistration)
        .where(DriverRegistration.node == driver, DriverRegistration.failures > 0)
        .values(failures=0)
        .execution_options(synchronize_session=False)
    )


async def _to_client(ctx: NodeContext, client_node: str, message: JobUpdateMessage) -> None:
    try:
        await ctx.transport.send("router", client_node, "driver", message, timeout=RELAY_TIMEOUT_S)
    except PeerError as error:
        log.warning("job %s: client node %s did not take update %d: %s", message.update.job_id, client_node, message.update.seq, error.message)


async def _end(ctx: NodeContext, job: RoutedJob, status: str, error: str) -> None:
    """End a job from the router: the client hears it as the job's final update; its slot goes to the queue.
    Nothing happens if the job has ended already (its final arrived, or another replica ended it)."""
    # Never handed out, it consumed nothing; else its driver may still say what it produced (`_add_late_tokens`).
    tokens = TokenCount() if job.status == "queued" else None
    with tracing.about(job.id, job.traceparent):
        ending = await ctx.store.write_soon(lambda session: _finish_and_assign(session, job.id, status, job.model, tokens))
        if ending is None:
            return
        _count_ended(ctx, job.model, status, tokens, ending)
        log.info("job %s ended %s by the router: %s", job.id, status, error)
        if ending.assignments:
            ctx.spawn(_hand_over(ctx, job.model, ending.assignments), name=f"hand-over-{job.model}")
        final = JobUpdate(job_id=job.id, seq=0, is_final=True, status=status, driver=job.driver_node, error=error)  # type: ignore[arg-type]
        await _to_client(ctx, job.client_node, JobUpdateMessage(update=final))


async def _released(ctx: NodeContext, source: Source, job_id: str, reason: str) -> None:
    """The job's driver could not serve it (its LLM refused or failed before the first chunk)."""
    async with ctx.store.reading() as session:
        job = await session.get(RoutedJob, job_id)
    if job is None:
        raise unknown_job(job_id)
    if job.driver_node != source.node:
        raise HandlerError(403, "not_the_jobs_driver", f"job {job_id} is not with {source.node}")
    if job.status != "running":
        raise HandlerError(409, "job_finished", f"job {job_id} already ended: {job.status}")
    await _take_back(ctx, job, source.node, reason, driver_failed=True)


async def _has_ready_driver(ctx: NodeContext, model: str) -> bool:
    async with ctx.store.reading() as session:
        ready = await session.scalar(
            select(func.count()).where(DriverRegistration.model == model, DriverRegistration.cooldown_until <= time.time())
        )
    return bool(ready)


async def _dispatch_later(ctx: NodeContext, model: str, delay: float) -> None:
    # The job waits in the stored queue meanwhile: a restart dispatches it at boot.
    await asyncio.sleep(delay)
    await dispatch(ctx, model)


async def _cancel(ctx: NodeContext, source: Source, job_id: str) -> None:
    """Counted at once, without tokens: the serving driver says what the LLM produced once it has stopped."""
    async with ctx.store.writing() as session:
        job = await _clients_job(session, source, job_id, for_update=True)
        if job.status in FINAL_STATUSES:
            return
        if tracing.traceparent_of(job_id) is None:  # from a client node of an earlier version, which sends none
            tracing.set_job(job_id, job.traceparent)
        was_running, driver = job.status == "running", job.driver_node
        job.status, job.finished_at = "cancelled", time.time()
        await accounting.record(
            session, role=Role.ROUTER, day=utc_day(job.finished_at), client=job.client_node, label=job.api_key_label,
            model=job.model, tokens=None if was_running else TokenCount(),
        )
        job.tokens_counted = not was_running
    nothing = None if was_running else TokenCount()
    metrics.count_job(ctx.name, Role.ROUTER, job.model, "cancelled", nothing, job.finished_at - job.created_at)
    log.info("job %s cancelled by its client", job_id)
    if was_running and driver is not None:
        try:
            await ctx.transport.send("router", driver, "driver", CancelJob(job_id=job_id))
        except PeerError as error:
            log.warning("job %s: driver %s not told of the cancellation: %s", job_id, driver, error.message)
        ctx.spawn(dispatch(ctx, job.model), name=f"dispatch-{job.model}")


# --- upkeep ------------------------------------------------------------------------------------


async def expire(ctx: NodeContext, now: float) -> None:
    """End jobs past their deadline, and take jobs back from drivers that went silent."""
    async with ctx.store.reading() as session:
        if not (await read_config(session)).is_router:
            return
        late = (
            await session.scalars(
                select(RoutedJob).where(
                    ((RoutedJob.status == "queued") & (RoutedJob.deadline < now))
                    | ((RoutedJob.status == "running") & (RoutedJob.deadline < now - RUNNING_GRACE_S))
                )
            )
        ).all()
        silent = (await session.scalars(select(DriverRegistration.node).where(DriverRegistration.last_seen < now - DRIVER_TTL_S).distinct())).all()
    # At once: a client node that does not answer holds up its own jobs' ends, not the others'.
    await asyncio.gather(
        *(_end(ctx, job, "timed_out", "the job ran past its deadline" + (" while queued" if job.status == "queued" else "")) for job in late)
    )
    for node in silent:
        await _driver_lost(ctx, node)


async def _driver_lost(ctx: NodeContext, node: str) -> None:
    log.warning("driver %s has not been heard from in %.0f s; deregistered", node, DRIVER_TTL_S)
    async with ctx.store.writing() as session:
        await session.execute(delete(DriverRegistration).where(DriverRegistration.node == node))
        stranded = (await session.scalars(select(RoutedJob).where(RoutedJob.driver_node == node, RoutedJob.status == "running"))).all()
    for job in stranded:
        await _take_back(ctx, job, node, f"driver {node} went silent mid-job", driver_failed=False)


async def _take_back(ctx: NodeContext, job: RoutedJob, driver: str, reason: str, *, driver_failed: bool) -> None:
    """A running job `driver` no longer serves.  If part of it reached the client it ends `failed`: another
    generation would not continue the same text.  Otherwise it is queued again, for another driver if one
    is ready, after a backoff, while attempts remain.  `driver_failed` counts towards the driver's cool-down."""
    with tracing.about(job.id, job.traceparent):
        await _take_back_job(ctx, job, driver, reason, driver_failed=driver_failed)


async def _take_back_job(ctx: NodeContext, job: RoutedJob, driver: str, reason: str, *, driver_failed: bool) -> None:
    if job.streamed:
        await _end(ctx, job, "failed", f"{reason} (after part of the answer was sent)")
        return
    requeued = await _requeue(ctx, job.id, driver, count_failure=driver_failed, attempts_allowed=ctx.settings.max_attempts)
    if requeued is None:  # it ended, or moved on, meanwhile
        return
    if requeued.status == "running":  # out of attempts
        await _end(ctx, requeued, "failed", f"gave up after {requeued.attempts} attempts; last: {reason}")
    elif not await _has_ready_driver(ctx, requeued.model):
        await _end(ctx, requeued, "failed", f"no driver left to retry on; last: {reason}")
    else:
        log.info("job %s taken back from %s (%s); retry %d", job.id, driver, reason, requeued.attempts)
        backoff = RETRY_BACKOFF_S * 2 ** (requeued.attempts - 1)
        ctx.spawn(_dispatch_later(ctx, requeued.model, backoff), name=f"retry-{job.id}")
