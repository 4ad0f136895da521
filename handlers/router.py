"""The router process: which drivers serve which model, the queue, and the relay of updates.

| event                          | reads                       | decides                                 | writes                     | sends                          |
|--------------------------------|-----------------------------|-----------------------------------------|----------------------------|--------------------------------|
| StartRouter (admin)            |                             |                                         | config                     |                                |
| RegisterDriver (driver, beat)  | registrations               |                                         | registrations              | (dispatch)                     |
| RunJob (client's driver)       | routed_jobs, registrations  | a repeat? is the model on offer to it?  | routed_jobs (queued)       | (dispatch)                     |
| dispatch                       | queue, registrations, loads | least-loaded ready driver per job, not  | routed_jobs (running)      | RunJob → driver                |
|                                |                             | the one that gave it back if another is |                            |                                |
| JobUpdate (job's driver)       | routed_jobs (later chunks:  | from the job's driver? still running?   | routed_jobs (first, final) | JobUpdate → client, (dispatch) |
|                                | its relay route, in memory) |                                         |                            |                                |
| ReleaseJob (job's driver)      | routed_jobs, registrations  | retry (with backoff) or give up?        | routed_jobs, registrations | JobUpdate (failed) → client    |
| CancelJob (job's client)       | routed_jobs                 |                                         | routed_jobs                | CancelJob → driver             |
| ListModels (any node)          | registrations               | what is on offer to it                  |                            |                                |
| RouterView (any node)          | registrations, routed_jobs  | which drivers and queues it may see     |                            |                                |
| expire (every second)          | routed_jobs, registrations  | past deadline? driver silent too long?  | routed_jobs, registrations | JobUpdate (timed_out) → client |
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncSession

from handlers import accounting, budgets, metrics, tracing
from handlers.dispatch_policy import Driver, Health, RetryPolicy, TakeBack, Waiting, after_failure, assign
from handlers.config import config_for_update, read_config
from handlers.context import NodeContext, log
from handlers.errors import ErrorCode, HandlerError, PeerError, too_late, unknown_job, unknown_model
from handlers.relay_routes import RelayRoute
from schemas.jobs import FINAL_STATUSES, JobSpec, JobStatus, JobUpdate
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
from store import queue
from store.database import add_row
from store.models import DriverRegistration, RoutedJob

DRIVER_TTL_S = 20.0  # a driver re-registers every HEARTBEAT_S; silent this long, it is taken as gone
HEARTBEAT_S = 5.0
RUNNING_GRACE_S = 2.0  # the serving driver ends a job at its deadline; the router waits this much longer
QUEUE_FULL_RETRY_S = 1.0
RECONCILE_MARGIN_S = 2.0  # a RunJob may still be on its way when a driver lists what it serves
HAND_OVER_S = 5.0  # a driver that has not taken a job by then (frozen, overloaded) is skipped: the job is queued again
# A driver checks `accept_by` just before it commits a job; the router waits this much longer for its answer, since a
# job queued again while its driver has it is served twice (a commit under a burst of jobs took over 1 s in CI).
HAND_OVER_MARGIN_S = 5.0
# A driver that did not take a job it was handed is no reason to give the job up: it waits for another.
HAND_OVER_RETRIES = RetryPolicy(max_attempts=math.inf)
RELAY_TIMEOUT_S = 3.0  # an update for a client node that does not answer goes back to its driver, which retries


# Messages about a job need no check: only a router holds routed jobs.
_NEED_ROUTER = (RegisterDriver, RouterView)


class Assignment(NamedTuple):
    """A queued job given to a driver, to be handed over once the assignment is committed."""

    job_id: str
    driver: str
    spec: JobSpec
    arrived_at: float  # when the router queued it
    attempts: int  # earlier attempts: 0 for its first hand-over
    traceparent: str | None


async def handle(ctx: NodeContext, source: Source, message: Message) -> Ack | JobAccepted | ModelList | QueuePlace | RouterState:
    """A message from another node (admin messages come through `handlers.admin`)."""
    if isinstance(message, _NEED_ROUTER):
        await _require_router(ctx)
    match message:
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
    raise HandlerError(400, ErrorCode.UNSUPPORTED_MESSAGE, f"the router does not take {message.type}")  # type: ignore[attr-defined]


# --- admin messages ------------------------------------------------------------------------


async def start(ctx: NodeContext, message: StartRouter) -> Ack:
    async with ctx.store.writing() as session:
        (await config_for_update(session)).is_router = True
    return Ack()


async def set_gate(ctx: NodeContext, message: SetGate) -> Ack:
    await _require_router(ctx)
    async with ctx.store.writing() as session:
        config = await config_for_update(session)
        config.allow_clients, config.deny_clients = message.allow, message.deny
        config.max_in_flight_per_client, config.max_queue = message.max_in_flight_per_client, message.max_queue
    return Ack()


async def set_budget(ctx: NodeContext, message: SetBudget) -> Ack:
    await _require_router(ctx)
    await budgets.set_budget(ctx, message)
    return Ack()


async def status(ctx: NodeContext, message: RouterStatus) -> RouterState:
    await _require_router(ctx)
    return await state(ctx)


# --- events ---------------------------------------------------------------------------------


async def boot(ctx: NodeContext) -> None:
    """After a restart the queue is still in the store: hand out what waits."""
    async with ctx.store.reading() as session:
        models = await queue.queued_models(session)
    for model in models:
        await dispatch(ctx, model)


async def _require_router(ctx: NodeContext) -> None:
    async with ctx.store.reading() as session:
        if not (await read_config(session)).is_router:
            raise HandlerError(503, ErrorCode.NOT_A_ROUTER, f"{ctx.name} is not running a router (StartRouter)")


async def _register(ctx: NodeContext, node: str, message: RegisterDriver) -> None:
    """Replace what `node` serves, keeping its failure count across heartbeats (not across restarts)."""
    now = time.time()
    models = list(dict.fromkeys(message.models))
    async with ctx.store.writing() as session:
        await queue.drop_registrations(session, node, keep=models)
        known = {r.model: r for r in await queue.registrations_of(session, node)}
        for model in models:
            row = known.get(model) or DriverRegistration(node=node, model=model, failures=0, cooldown_until=0.0)
            row.is_public, row.capacity, row.last_seen = message.is_public, message.capacity, now
            if message.restarted:
                row.failures, row.cooldown_until = 0, 0.0
            session.add(row)
        lost = await queue.running_on(session, node, dispatched_before=message.as_of - RECONCILE_MARGIN_S, except_ids=message.serving)
    for job in lost:
        await _take_back(ctx, job, node, f"driver {node} no longer has the job", driver_failed=False)
    for model in models:
        ctx.spawn(dispatch(ctx, model), name=f"dispatch-{model}")


async def _offered(session: AsyncSession, client_node: str) -> list[ModelInfo]:
    """Models whose drivers are public, or are the asking node itself."""
    return [ModelInfo(id=model, drivers=count, owned_by="network") for model, count in await queue.offered(session, client_node)]


async def _enqueue(ctx: NodeContext, source: Source, offer: RunJob) -> JobAccepted:
    spec = offer.job
    if spec.client_node != source.node:
        raise HandlerError(403, ErrorCode.CLIENT_MISMATCH, f"{source.node} may not submit jobs for {spec.client_node}")
    async with ctx.store.writing() as session:
        config = await read_config(session)
        if not config.is_router:
            raise HandlerError(503, ErrorCode.NOT_A_ROUTER, f"{ctx.name} is not running a router (StartRouter)")
        if (earlier := await queue.job(session, spec.job_id)) is not None:
            if earlier.client_node != source.node:
                raise HandlerError(409, ErrorCode.DUPLICATE_JOB, f"job {spec.job_id} was already submitted by another node")
            # A repeat: the first answer was lost (a router replica died before it replied).
            return JobAccepted(job_id=spec.job_id, status=JobStatus.QUEUED if earlier.status == JobStatus.QUEUED else JobStatus.RUNNING)
        offered = [info.id for info in await _offered(session, source.node)]
        if spec.model not in offered:
            raise unknown_model(spec.model, offered)
        if (refusal := await ctx.gate(spec, source.node, session)) is not None:
            raise HandlerError(403, ErrorCode.REFUSED_BY_GATE, refusal)
        await budgets.check(session, source.node, spec.api_key_label, time.time())
        await _check_queue_room(session, spec.model, config.max_queue)
        await add_row(session, RoutedJob, {
            "id": spec.job_id, "client_node": source.node, "model": spec.model, "spec": spec.model_dump(mode="json"),
            "status": JobStatus.QUEUED, "attempts": 0, "streamed": False, "created_at": time.time(), "deadline": spec.deadline,
            "api_key_label": spec.api_key_label, "traceparent": tracing.traceparent_of(spec.job_id), "tokens_counted": False,
        })
        assignments = await _assign(session, spec.model, time.time())  # a free driver takes it in the same transaction
        if offer.too_late():  # last, just before the commit: the client was told its job failed
            raise too_late(spec.job_id)
    log.info("job %s queued for %s from %s", spec.job_id, spec.model, source.node)
    if assignments:
        ctx.spawn(_hand_over(ctx, spec.model, assignments), name=f"hand-over-{spec.job_id}")
    return JobAccepted(job_id=spec.job_id, status=JobStatus.QUEUED)


async def _check_queue_room(session: AsyncSession, model: str, limit: int) -> None:
    waiting = await queue.queued_count(session, model)
    if waiting >= limit:
        raise HandlerError(429, ErrorCode.QUEUE_FULL, f"the queue for {model} is full ({waiting} jobs waiting)", retry_after=QUEUE_FULL_RETRY_S)


async def _clients_job(session: AsyncSession, source: Source, job_id: str, for_update: bool = False) -> RoutedJob:
    """The job, if it is the asking node's."""
    job = await queue.job(session, job_id, for_update=for_update)
    if job is None:
        raise unknown_job(job_id)
    if job.client_node != source.node:
        raise HandlerError(403, ErrorCode.NOT_THE_JOBS_CLIENT, f"job {job_id} is not {source.node}'s")
    return job


async def _queue_position(ctx: NodeContext, source: Source, job_id: str) -> QueuePlace:
    async with ctx.store.reading() as session:
        job = await _clients_job(session, source, job_id)
        if job.status != JobStatus.QUEUED:
            return QueuePlace(position=None)
        ahead = await queue.queued_count(session, job.model, before=job.created_at)
    return QueuePlace(position=ahead)


async def state(ctx: NodeContext, visible_to: str | None = None) -> RouterState:
    """Drivers (models, capacity, load, last seen, cool-down) and queue lengths; with `visible_to`, only
    the drivers on offer to that node (public, or itself) and the queues of their models."""
    async with ctx.store.reading() as session:
        registrations = await queue.all_registrations(session)
        loads = await queue.running_loads(session)
        queues = await queue.queue_lengths(session)
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
                await _requeue(ctx, job_id, driver, count_failure=True, policy=HAND_OVER_RETRIES)
                ctx.spawn(dispatch(ctx, model), name=f"dispatch-{model}")


async def _assign(session: AsyncSession, model: str, now: float) -> list[Assignment]:
    """Give the model's queued jobs to its ready drivers, as the dispatch policy decides, within the caller's transaction."""
    drivers = await queue.lock_ready_drivers(session, model, now)
    if not drivers:
        return []
    waiting = await queue.lock_waiting(session, model, now)
    if not waiting:  # most job ends, when drivers keep up with the queue
        return []
    chosen = assign(
        [Waiting(job.id, job.client_node, job.returned_by) for job in waiting],
        [Driver(d.node, d.capacity, d.is_public) for d in drivers],
        await queue.running_loads(session),
    )
    assignments: list[Assignment] = []
    for job in waiting:
        if (driver := chosen.get(job.id)) is None:
            continue
        await queue.hand_out(session, job.id, driver, now)
        spec = JobSpec.model_validate(job.spec)
        assignments.append(Assignment(job.id, driver, spec, job.created_at, job.attempts, job.traceparent))
    return assignments


class TakenBack(NamedTuple):
    job: RoutedJob
    outcome: TakeBack  # queued again (RETRY), or to be ended


async def _requeue(ctx: NodeContext, job_id: str, driver: str, count_failure: bool, policy: RetryPolicy) -> TakenBack | None:
    """Take the job back from `driver` and, if the retry policy allows, queue it again; a driver that keeps
    failing is cooled down for a while.  A job the policy gives up on is left for the caller to end.  None if
    the job is not running on `driver` (any more)."""
    now = time.time()
    async with ctx.store.writing() as session:
        if count_failure:
            for row in await queue.registrations_of(session, driver, for_update=True):
                health = after_failure(Health(row.failures, row.cooldown_until), now)
                if health.cooldown_until > row.cooldown_until:
                    log.warning("driver %s failed repeatedly; cooled down for %.0f s", driver, health.cooldown_until - now)
                row.failures, row.cooldown_until = health.failures, health.cooldown_until
        # Locked: on PostgreSQL a router replica may be ending this job at the same moment.
        job = await queue.job(session, job_id, for_update=True)
        if job is None or job.status != JobStatus.RUNNING or job.driver_node != driver:
            return None
        job.attempts += 1
        outcome = policy.take_back(streamed=job.streamed, attempts=job.attempts, driver_left=await queue.has_ready_driver(session, job.model, now))
        if outcome in (TakeBack.RETRY, TakeBack.FAIL_NO_DRIVER):
            # Queued even when no driver is left: ended so, it counts as never served (its driver had sent nothing).
            job.status, job.driver_node, job.dispatched_at, job.returned_by = JobStatus.QUEUED, None, None, driver
        return TakenBack(job, outcome)


# --- updates from drivers ------------------------------------------------------------------


async def _relay(ctx: NodeContext, source: Source, message: JobUpdateMessage) -> None:
    update_ = message.update
    if not update_.is_final and (route := ctx.relay_routes.get(update_.job_id)) is not None:
        await _relay_streaming(ctx, source, message, route)
        return
    async with ctx.store.querying() as connection:
        job = await queue.relay_view(connection, update_.job_id)
    if job is None:
        raise unknown_job(update_.job_id)
    if tracing.traceparent_of(job.id) is None:  # from a driver of an earlier version, which sends none
        tracing.set_job(job.id, job.traceparent)
    if job.driver_node != source.node:
        raise HandlerError(403, ErrorCode.NOT_THE_JOBS_DRIVER, f"job {update_.job_id} was not given to {source.node}")
    repeated_final = update_.is_final and job.status in FINAL_STATUSES  # the driver retries a final the client missed
    if job.status in FINAL_STATUSES and not repeated_final:
        raise HandlerError(409, ErrorCode.JOB_FINISHED, f"job {job.id} already ended: {job.status}")
    update_.driver = source.node
    tokens = accounting.counted(update_.tokens, update_.usage) if update_.is_final else None
    if update_.is_final:
        ctx.relay_routes.forget(job.id)
    if update_.is_final and not repeated_final:
        # The job ends here, its slot going to the next queued job, while its client hears: neither waits for the
        # other (a slow client holds no slot).  Should either fail, the driver sends the final again.
        ended_as = update_.status or JobStatus.FAILED
        await _both(_end_as_its_driver_says(ctx, job.id, job.model, ended_as, tokens), _pass_on(ctx, job.id, job.client_node, message))
        return
    if repeated_final and tokens is not None and not job.tokens_counted:
        # The router had ended it (cancelled, timed out); its driver says now what the LLM had produced.
        if await ctx.store.write_soon(lambda session: _add_late_tokens(session, job.id, tokens)):
            metrics.count_tokens(ctx.name, Role.ROUTER, job.model, tokens)
    if repeated_final and job.status == JobStatus.CANCELLED:
        return  # the client ended it itself: it needs no final
    await _pass_on(ctx, job.id, job.client_node, message)
    if update_.is_final:
        return
    if not job.streamed and not await ctx.store.write_soon(lambda session: _mark_streamed(session, job.id, source.node)):
        return  # it ended, or went to another driver, meanwhile
    # From now on the job stays with this driver and this client: its next chunks need no read.
    ctx.relay_routes.remember(job.id, RelayRoute(job.client_node, source.node, job.model, job.traceparent))


async def _relay_streaming(ctx: NodeContext, source: Source, message: JobUpdateMessage, route: RelayRoute) -> None:
    """A chunk of a job already streaming to its client.  Had another router process ended the job meanwhile
    (cancelled, timed out), the client's node, which ended it too, refuses the chunk (409), and so does this
    router, to the driver, which stops; its final update reads the row."""
    update_ = message.update
    if tracing.traceparent_of(update_.job_id) is None:
        tracing.set_job(update_.job_id, route.traceparent)
    if route.driver_node != source.node:
        raise HandlerError(403, ErrorCode.NOT_THE_JOBS_DRIVER, f"job {update_.job_id} was not given to {source.node}")
    update_.driver = source.node
    await _pass_on(ctx, update_.job_id, route.client_node, message)


async def _pass_on(ctx: NodeContext, job_id: str, client_node: str, message: JobUpdateMessage) -> None:
    try:
        await ctx.transport.send("router", client_node, "driver", message, timeout=RELAY_TIMEOUT_S)
    except PeerError as error:
        if error.code == ErrorCode.JOB_FINISHED:
            ctx.relay_routes.forget(job_id)
            raise HandlerError(409, ErrorCode.JOB_FINISHED, f"job {job_id} already ended on its client's node") from error
        # Not swallowed: the driver keeps the update and tries again (with backoff), so a client
        # node that restarts misses no chunk.
        status = 503 if error.status == 503 else 502
        raise HandlerError(status, ErrorCode.CLIENT_UNREACHABLE, f"client node {client_node}: {error.message}") from error


async def _end_as_its_driver_says(ctx: NodeContext, job_id: str, model: str, status: JobStatus, tokens: TokenCount | None) -> None:
    """The driver's final update of a running job: end it, count it, and hand its slot to the queue."""
    ending = await ctx.store.write_soon(lambda session: _finish_and_assign(session, job_id, status, model, tokens))
    if ending is None:
        return
    _count_ended(ctx, model, status, tokens, ending)
    log.info("job %s ended %s", job_id, status)
    if ending.assignments:
        ctx.spawn(_hand_over(ctx, model, ending.assignments), name=f"hand-over-{model}")


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run both to their end; then raise what failed (the second's error first: it is what the sender acts on)."""
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    for outcome in reversed(outcomes):
        if isinstance(outcome, BaseException):
            raise outcome


class _Ending(NamedTuple):
    arrived_at: float  # when the router queued the job
    assignments: list[Assignment]  # of the slot it freed


async def _finish_and_assign(
    session: AsyncSession, job_id: str, status: JobStatus, model: str, tokens: TokenCount | None
) -> _Ending | None:
    """End the job, count it, and give its slot to the queue; None if it had ended already (another event,
    or another replica, came first).  Without `tokens` (the router ends it itself) it counts none yet: its
    driver may say later what the LLM produced (`_add_late_tokens`)."""
    now = time.time()
    ended = await queue.end(session, job_id, status, now, tokens_counted=tokens is not None)
    if ended is None:
        return None
    await accounting.record(
        session, role=Role.ROUTER, day=utc_day(now), client=ended.client_node, label=ended.api_key_label, model=model,
        tokens=tokens,
    )
    return _Ending(ended.created_at, await _assign(session, model, now))


async def _add_late_tokens(session: AsyncSession, job_id: str, tokens: TokenCount) -> bool:
    """Add the tokens of a job the router ended before its driver said what the LLM produced, once."""
    counted = await queue.count_late_tokens(session, job_id)
    if counted is None:
        return False
    await accounting.record(
        session, role=Role.ROUTER, day=utc_day(counted.finished_at or time.time()), client=counted.client_node,
        label=counted.api_key_label, model=counted.model, tokens=tokens, jobs=0,
    )
    return True


def _count_ended(ctx: NodeContext, model: str, status: JobStatus, tokens: TokenCount | None, ending: _Ending) -> None:
    metrics.count_job(ctx.name, Role.ROUTER, model, status, tokens, time.time() - ending.arrived_at)


async def _mark_streamed(session: AsyncSession, job_id: str, driver: str) -> bool:
    """Part of the job reached its client: it can no longer go to another driver; and its driver works.
    False if the job no longer runs on `driver`."""
    if not await queue.mark_streamed(session, job_id, driver):
        return False
    await queue.driver_works(session, driver)
    return True


async def _to_client(ctx: NodeContext, client_node: str, message: JobUpdateMessage) -> None:
    try:
        await ctx.transport.send("router", client_node, "driver", message, timeout=RELAY_TIMEOUT_S)
    except PeerError as error:
        log.warning("job %s: client node %s did not take update %d: %s", message.update.job_id, client_node, message.update.seq, error.message)


async def _end(ctx: NodeContext, job: RoutedJob, status: JobStatus, error: str) -> None:
    """End a job from the router: the client hears it as the job's final update; its slot goes to the queue.
    Nothing happens if the job has ended already (its final arrived, or another replica ended it)."""
    # Never handed out, it consumed nothing; else its driver may still say what it produced (`_add_late_tokens`).
    tokens = TokenCount() if job.status == JobStatus.QUEUED else None
    ctx.relay_routes.forget(job.id)
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
        job = await queue.job(session, job_id)
    if job is None:
        raise unknown_job(job_id)
    if job.driver_node != source.node:
        raise HandlerError(403, ErrorCode.NOT_THE_JOBS_DRIVER, f"job {job_id} is not with {source.node}")
    if job.status != JobStatus.RUNNING:
        raise HandlerError(409, ErrorCode.JOB_FINISHED, f"job {job_id} already ended: {job.status}")
    await _take_back(ctx, job, source.node, reason, driver_failed=True)


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
        was_running, driver = job.status == JobStatus.RUNNING, job.driver_node
        ctx.relay_routes.forget(job_id)
        job.status, job.finished_at = JobStatus.CANCELLED, time.time()
        await accounting.record(
            session, role=Role.ROUTER, day=utc_day(job.finished_at), client=job.client_node, label=job.api_key_label,
            model=job.model, tokens=None if was_running else TokenCount(),
        )
        job.tokens_counted = not was_running
    nothing = None if was_running else TokenCount()
    metrics.count_job(ctx.name, Role.ROUTER, job.model, JobStatus.CANCELLED, nothing, job.finished_at - job.created_at)
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
        late = await queue.late_jobs(session, now, RUNNING_GRACE_S)
        silent = await queue.silent_drivers(session, now - DRIVER_TTL_S)
    # At once: a client node that does not answer holds up its own jobs' ends, not the others'.
    await asyncio.gather(
        *(_end(ctx, job, JobStatus.TIMED_OUT, "the job ran past its deadline" + (" while queued" if job.status == JobStatus.QUEUED else "")) for job in late)
    )
    for node in silent:
        await _driver_lost(ctx, node)


async def _driver_lost(ctx: NodeContext, node: str) -> None:
    log.warning("driver %s has not been heard from in %.0f s; deregistered", node, DRIVER_TTL_S)
    async with ctx.store.writing() as session:
        await queue.drop_registrations(session, node)
        stranded = await queue.running_on(session, node)
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
        await _end(ctx, job, JobStatus.FAILED, f"{reason} (after part of the answer was sent)")
        return
    policy = RetryPolicy(max_attempts=ctx.settings.max_attempts)
    taken = await _requeue(ctx, job.id, driver, count_failure=driver_failed, policy=policy)
    if taken is None:  # it ended, or moved on, meanwhile
        return
    match taken.outcome:
        case TakeBack.RETRY:
            log.info("job %s taken back from %s (%s); retry %d", job.id, driver, reason, taken.job.attempts)
            backoff = policy.backoff(taken.job.attempts)
            ctx.spawn(_dispatch_later(ctx, taken.job.model, backoff), name=f"retry-{job.id}")
        case TakeBack.FAIL_OUT_OF_ATTEMPTS:
            await _end(ctx, taken.job, JobStatus.FAILED, f"gave up after {taken.job.attempts} attempts; last: {reason}")
        case TakeBack.FAIL_NO_DRIVER:
            await _end(ctx, taken.job, JobStatus.FAILED, f"no driver left to retry on; last: {reason}")
        case TakeBack.FAIL_STREAMED:
            await _end(ctx, taken.job, JobStatus.FAILED, f"{reason} (after part of the answer was sent)")
