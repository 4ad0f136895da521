"""The driver process: where clients send jobs; it serves them with the node's LLM (`handlers.serving`)
or hands them to its router, and keeps what the client reads (`handlers.updates`).

| event                         | reads               | decides                                 | writes                  | sends                          |
|-------------------------------|---------------------|-----------------------------------------|-------------------------|--------------------------------|
| submit (client)               | config, jobs        | repeat? serve locally, forward, refuse  | jobs (+ served_jobs)    | RunJob → router                |
| cancel (client)               | jobs                | still running? where?                   | jobs, job_chunks        | CancelJob → router             |
| SetRouter / SetLocalDriver    | config              |                                         | config                  | RegisterDriver → router        |
| CreateUiLogin (admin)         |                     |                                         | ui_logins               |                                |
| RunJob (from our router)      | config              | do we serve this model?                 | served_jobs             | (starts serving)               |
| CancelJob (from our router)   | served_jobs         |                                         | served_jobs             | (stops serving)                |
| JobUpdate (from our router)   | jobs                | from the job's router? new?             | jobs, job_chunks        | wakes the job's readers        |
| serve (`serving.serve`)       | the LLM's stream    | retry elsewhere or fail?                | served_jobs             | JobUpdate per chunk, ReleaseJob|
| boot                          | served_jobs, workers| which jobs died with their process      | served_jobs             | ReleaseJob / JobUpdate, Register|
| keep_alive (every 5 s)        | served_jobs, workers| a sibling process silent too long?      | workers (+ served_jobs) | (settles its jobs)             |
| heartbeat (every 5 s)         | served_jobs         |                                         |                         | RegisterDriver (jobs served)   |
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from handlers import api_keys, liveness, serving, tracing, ui_logins, updates
from handlers.api_keys import Caller
from handlers.config import config_for_update, read_config
from handlers.context import NodeContext, log
from handlers.errors import ErrorCode, HandlerError, PeerError, unknown_job, unknown_model
from schemas.jobs import FINAL_STATUSES, JobCreated, JobSpec, JobStatus, JobUpdate
from schemas.messages import (
    Ack,
    ApiKeyCreated,
    CancelJob,
    CreateApiKey,
    CreateUiLogin,
    JobAccepted,
    JobUpdateMessage,
    ListModels,
    Message,
    ModelInfo,
    ModelList,
    RegisterDriver,
    RequireApiKeys,
    RevokeApiKey,
    RunJob,
    SetJobTimeout,
    SetLocalDriver,
    SetRouter,
    Source,
    UiLoginCreated,
)
from schemas.openai_api import JobOrder
from store.database import add_row
from store.models import Job, NodeConfig, ServedJob

ROUTER_ACCEPT_S = 3.0  # a client's submission waits this long (and ACCEPT_MARGIN_S) for the router to take it, then 503

# --- events ---------------------------------------------------------------------


async def submit(ctx: NodeContext, caller: Caller, order: JobOrder, idempotency_key: str | None = None) -> JobCreated:
    """A client's job: serve it with our own LLM, or hand it to our router.  One transaction decides and stores it."""
    if ctx.draining:
        raise HandlerError(503, ErrorCode.SHUTTING_DOWN, f"{ctx.name} is shutting down and takes no new jobs")
    try:
        async with ctx.store.writing() as session:
            config = await read_config(session)
            client = await api_keys.identify(session, config, caller)
            if idempotency_key is not None and (earlier := await _earlier_submission(session, client, idempotency_key)):
                return earlier
            spec = _new_spec(ctx, order, config, client)
            traceparent = tracing.new_traceparent(caller.traceparent)
            tracing.set_job(spec.job_id, traceparent)  # the rest of this request is about the job
            local = spec.model in config.driver_models
            if local:
                await add_row(session, Job, _job_row(client, spec, JobStatus.RUNNING, None, ctx.name, idempotency_key, traceparent))
                await add_row(session, ServedJob, serving.served_row(ctx, ctx.name, spec, traceparent))
            elif config.router_node is not None:
                # Stored before the router hears of it, so its first update always finds it.
                await add_row(session, Job, _job_row(client, spec, JobStatus.QUEUED, config.router_node, None, idempotency_key, traceparent))
            elif config.driver_models:
                raise unknown_model(spec.model, config.driver_models)
            else:
                raise HandlerError(503, ErrorCode.NO_ROUTER, "this node serves no model and has no router (SetRouter)")
    except IntegrityError:
        if idempotency_key is None:
            raise
        async with ctx.store.reading() as session:  # a concurrent submission with the same key won
            if earlier := await _earlier_submission(session, client, idempotency_key):
                return earlier
        raise
    ctx.signals.notify(spec.job_id)  # readers of every job (the web page) hear of a new one
    where = "served here" if local else f"to router {config.router_node}"
    log.info("job %s submitted by %s for %s, %s", spec.job_id, client, spec.model, where)
    if local:
        serving.start(ctx, spec, ctx.name, serving.endpoint_of(config))
        return _created(spec, JobStatus.RUNNING)
    return await _forward(ctx, spec, config.router_node)  # type: ignore[arg-type]


async def cancel(ctx: NodeContext, job_id: str) -> None:
    """The client gave up on its job: end it `cancelled` here, and tell whoever serves it."""
    async with ctx.store.reading() as session:
        job = await session.get(Job, job_id)
    if job is None:
        raise unknown_job(job_id)
    tracing.set_job(job_id, job.traceparent)
    if job.status in FINAL_STATUSES:
        raise HandlerError(409, ErrorCode.JOB_FINISHED, f"job {job_id} already ended: {job.status}")
    await updates.record_update(ctx, JobUpdate(job_id=job_id, seq=job.next_seq, is_final=True, status=JobStatus.CANCELLED, error="cancelled by the client"))
    if job.router_node is None:
        await serving.end_cancelled(ctx, job_id)
        return
    try:
        await ctx.transport.send("driver", job.router_node, "router", CancelJob(job_id=job_id))
    except PeerError as error:
        log.warning("job %s: router %s not told of the cancellation: %s", job_id, job.router_node, error.message)


async def handle(ctx: NodeContext, source: Source, message: Message) -> Ack | JobAccepted:
    """A message from another node (admin messages come through `handlers.admin`)."""
    match message:
        case RunJob():
            return await serving.accept_from_router(ctx, source, message)
        case CancelJob(job_id=job_id):
            await serving.cancel(ctx, source, job_id)
            return Ack()
        case JobUpdateMessage(update=update):
            await updates.record_from_router(ctx, source, update)
            return Ack()
    raise HandlerError(400, ErrorCode.UNSUPPORTED_MESSAGE, f"the driver does not take {message.type}")  # type: ignore[attr-defined]


# --- admin messages ------------------------------------------------------------------------


async def set_router(ctx: NodeContext, message: SetRouter) -> Ack:
    config = await _update_config(ctx, router_node=message.node)
    return Ack(note=await _register(ctx, config))


async def set_local_driver(ctx: NodeContext, message: SetLocalDriver) -> Ack:
    config = await _update_config(
        ctx, driver_models=message.model_names(), driver_is_public=message.is_public, driver_capacity=message.capacity
    )
    return Ack(note=await _register(ctx, config))


async def set_job_timeout(ctx: NodeContext, message: SetJobTimeout) -> Ack:
    await _update_config(ctx, job_timeout=message.seconds)
    return Ack()


async def require_api_keys(ctx: NodeContext, message: RequireApiKeys) -> Ack:
    await _update_config(ctx, require_api_keys=message.required)
    return Ack()


async def create_api_key(ctx: NodeContext, message: CreateApiKey) -> ApiKeyCreated:
    return await api_keys.create(ctx, message.label)


async def revoke_api_key(ctx: NodeContext, message: RevokeApiKey) -> Ack:
    await api_keys.revoke(ctx, message.label)
    return Ack()


async def create_ui_login(ctx: NodeContext, message: CreateUiLogin) -> UiLoginCreated:
    return await ui_logins.create(ctx, message.valid_for)


async def boot(ctx: NodeContext) -> None:
    """After a restart: settle the jobs the last process was serving, then tell the router we are back.
    (A process sharing the store said it is alive before it took any request: `upkeep.announce`.)"""
    await liveness.settle_orphans(ctx)
    await _tell_router_we_live(ctx, restarted=not ctx.store.shared)  # a new worker beside live siblings is no restart


async def keep_alive(ctx: NodeContext) -> None:
    """Every few seconds: alive to the processes sharing the store, settling a dead one's jobs."""
    if ctx.store.shared:
        await liveness.report_alive(ctx)
        await liveness.settle_orphans(ctx)


async def heartbeat(ctx: NodeContext) -> None:
    """Every few seconds: alive to the router, listing the jobs served."""
    await _tell_router_we_live(ctx)


async def _tell_router_we_live(ctx: NodeContext, restarted: bool = False) -> None:
    async with ctx.store.reading() as session:
        config = await read_config(session)
    if config.driver_models:
        note = await _register(ctx, config, restarted)
        if note:
            log.warning("%s", note)


async def models(ctx: NodeContext) -> list[ModelInfo]:
    """Models this node can reach: its own, then those its router offers it."""
    async with ctx.store.reading() as session:
        config = await read_config(session)
    found = {name: ModelInfo(id=name, drivers=1, owned_by=ctx.name) for name in config.driver_models}
    if config.router_node is not None:
        try:
            reply = await ctx.transport.send("driver", config.router_node, "router", ListModels())
        except PeerError as error:
            log.warning("router %s did not list models: %s", config.router_node, error.message)
        else:
            for info in ModelList.model_validate(reply).models:
                found.setdefault(info.id, info)
    return list(found.values())


# --- submission -------------------------------------------------------------------


def _new_spec(ctx: NodeContext, order: JobOrder, config: NodeConfig, client: str) -> JobSpec:
    now = time.time()
    request = order.envelope
    default = config.job_timeout or ctx.settings.job_timeout
    timeout = min(request.timeout or default, max(default, ctx.settings.max_job_timeout))
    return JobSpec(
        job_id=uuid.uuid4().hex,
        client_node=ctx.name,
        model=request.model,
        kind=order.kind,
        body=order.body,
        stream_options=request.stream_options.model_dump() if request.stream_options else None,
        created_at=now,
        deadline=now + timeout,
        first_token_timeout=request.first_token_timeout or ctx.settings.first_token_timeout,
        idle_timeout=request.idle_timeout or ctx.settings.idle_timeout,
        api_key_label=api_keys.key_label(client),
    )


def _created(job: JobSpec | Job, status: JobStatus) -> JobCreated:
    job_id = job.job_id if isinstance(job, JobSpec) else job.id
    return JobCreated(job_id=job_id, events_url=f"/jobs/{job_id}/events", status=status, created_at=job.created_at)


async def _earlier_submission(session: AsyncSession, client: str, key: str) -> JobCreated | None:
    job = await session.scalar(select(Job).where(Job.client == client, Job.idempotency_key == key))
    return None if job is None else _created(job, JobStatus(job.status))


def _job_row(
    client: str, spec: JobSpec, status: JobStatus, router: str | None, driver: str | None, key: str | None, traceparent: str
) -> dict[str, Any]:
    """The `jobs` row of a client's new job."""
    return {
        "id": spec.job_id, "client": client, "idempotency_key": key, "model": spec.model, "spec": spec.model_dump(mode="json"),
        "status": status, "router_node": router, "driver_node": driver, "next_seq": 0, "created_at": spec.created_at,
        "deadline": spec.deadline, "traceparent": traceparent,
    }


async def _forward(ctx: NodeContext, spec: JobSpec, router: str) -> JobCreated:
    """Hand the stored job to the router; if it refuses, or has not taken it by the offer's `accept_by` (it is
    frozen, say), the row goes again, the client gets the error, and a router that comes to the offer later
    refuses it."""
    offer = RunJob.offer(spec, ROUTER_ACCEPT_S)
    try:
        try:
            reply = await ctx.transport.send("driver", router, "router", offer, timeout=offer.reply_timeout())
        except PeerError as error:
            if not error.unreachable or offer.too_late():
                raise
            # It may have been taken before the answer was lost: the router takes a repeat as the same job,
            # and another replica of it may answer this time.
            reply = await ctx.transport.send("driver", router, "router", offer, timeout=offer.reply_timeout())
    except PeerError as error:
        async with ctx.store.writing() as session:
            job = await session.get(Job, spec.job_id)
            if job is not None and job.next_seq == 0:
                await session.delete(job)
        if error.status == 503:
            raise HandlerError(503, ErrorCode.ROUTER_UNREACHABLE, f"router {router} is unreachable: {error.message}") from error
        raise error.passed_on() from error  # the router's refusal (no such model, queue full, ...) is the client's answer
    return _created(spec, JobAccepted.model_validate(reply).status)


# --- configuration ------------------------------------------------------------------


async def _update_config(ctx: NodeContext, **values: object) -> NodeConfig:
    async with ctx.store.writing() as session:
        config = await config_for_update(session)
        for key, value in values.items():
            setattr(config, key, value)
    return config


async def _register(ctx: NodeContext, config: NodeConfig, restarted: bool = False) -> str | None:
    """Tell the router what we serve; a note for the admin when that failed."""
    if config.router_node is None:
        return None
    message = RegisterDriver(
        models=config.driver_models, is_public=config.driver_is_public, capacity=config.driver_capacity, restarted=restarted,
        serving=await liveness.serving_now(ctx), as_of=time.time(),
    )
    try:
        await ctx.transport.send("driver", config.router_node, "router", message)
    except PeerError as error:
        return f"saved, but router {config.router_node} was not told: {error.message}"
    return None


# --- serving ----------------------------------------------------------------------------


