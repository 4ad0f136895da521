"""The driver process: where clients send jobs.

| event                         | reads               | decides                              | writes                    | sends                       |
|-------------------------------|---------------------|--------------------------------------|---------------------------|-----------------------------|
| submit (client)               | config              | serve locally, forward, or refuse    | jobs (+ served_jobs)      | RunJob → router             |
| SetRouter / SetLocalDriver    | config              |                                      | config                    | RegisterDriver → router     |
| RunJob (from our router)      | config              | do we serve this model?              | served_jobs               | (starts serving)            |
| JobUpdate (from our router)   | jobs                | is it from the job's router, new?    | jobs, job_chunks          | wakes the job's readers     |
| serve (after RunJob / submit) | served_jobs, config |                                      | served_jobs               | JobUpdate per chunk → origin|
"""

from __future__ import annotations

import asyncio
import time
import uuid

from sqlalchemy.exc import IntegrityError

from handlers import openai
from handlers.coalesce import batches
from handlers.config import config_for_update, read_config
from handlers.context import NodeContext, log
from handlers.errors import HandlerError, PeerError, UpstreamError, unknown_job, unknown_model
from schemas.jobs import FINAL_STATUSES, JobCreated, JobRequest, JobSpec, JobUpdate as Update
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
    SetLocalDriver,
    SetRouter,
    Source,
)
from store.models import Job, JobChunk, NodeConfig, ServedJob


# --- events ---------------------------------------------------------------------


async def submit(ctx: NodeContext, client: str, request: JobRequest) -> JobCreated:
    """A client's job: serve it with our own LLM, or hand it to our router."""
    async with ctx.store.reading() as session:
        config = await read_config(session)
    spec = _new_spec(ctx, request)
    if spec.model in config.driver_models:
        await _accept_local(ctx, client, spec)
        return _created(spec.job_id, "running")
    if config.router_node is None:
        if config.driver_models:
            raise unknown_model(spec.model, config.driver_models)
        raise HandlerError(503, "no_router", "this node serves no model and has no router (SetRouter)")
    return await _forward(ctx, client, spec, config.router_node)


async def handle(ctx: NodeContext, source: Source, message: Message) -> Ack | JobAccepted:
    match message:
        case SetRouter(node=node):
            config = await _update_config(ctx, router_node=node)
            return Ack(note=await _register(ctx, config))
        case SetLocalDriver():
            config = await _update_config(
                ctx, driver_models=message.model_names(), driver_is_public=message.is_public, driver_capacity=message.capacity
            )
            return Ack(note=await _register(ctx, config))
        case RunJob(job=spec):
            return await _accept_from_router(ctx, source, spec)
        case JobUpdate(update=update):
            await _record_remote_update(ctx, source, update)
            return Ack()
    raise HandlerError(400, "unsupported_message", f"the driver does not take {message.type}")  # type: ignore[attr-defined]


async def boot(ctx: NodeContext) -> None:
    """A restarted driver tells its router what it serves."""
    async with ctx.store.reading() as session:
        config = await read_config(session)
    note = await _register(ctx, config)
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


def _new_spec(ctx: NodeContext, request: JobRequest) -> JobSpec:
    now = time.time()
    timeout = min(request.timeout or ctx.settings.job_timeout, ctx.settings.max_job_timeout)
    return JobSpec(
        job_id=uuid.uuid4().hex,
        client_node=ctx.name,
        model=request.model,
        messages=request.chat_messages(),
        params=request.sampling(),
        created_at=now,
        deadline=now + timeout,
    )


def _created(job_id: str, status: str) -> JobCreated:
    return JobCreated(job_id=job_id, events_url=f"/jobs/{job_id}/events", status=status)  # type: ignore[arg-type]


def _job_row(client: str, spec: JobSpec, status: str, router: str | None, driver: str | None) -> Job:
    return Job(
        id=spec.job_id,
        client=client,
        model=spec.model,
        spec=spec.model_dump(mode="json"),
        status=status,
        router_node=router,
        driver_node=driver,
        next_seq=0,
        created_at=spec.created_at,
        deadline=spec.deadline,
    )


def _served_row(origin: str, spec: JobSpec) -> ServedJob:
    return ServedJob(
        id=spec.job_id,
        origin_node=origin,
        spec=spec.model_dump(mode="json"),
        status="running",
        created_at=time.time(),
        deadline=spec.deadline,
    )


async def _accept_local(ctx: NodeContext, client: str, spec: JobSpec) -> None:
    async with ctx.store.writing() as session:
        session.add(_job_row(client, spec, "running", router=None, driver=ctx.name))
        session.add(_served_row(ctx.name, spec))
    ctx.spawn(serve(ctx, spec.job_id), name=f"serve-{spec.job_id}")


async def _forward(ctx: NodeContext, client: str, spec: JobSpec, router: str) -> JobCreated:
    # The job is stored before the router hears of it, so its first update always finds it;
    # if the router refuses, the row goes again and the refusal leaves nothing behind.
    async with ctx.store.writing() as session:
        session.add(_job_row(client, spec, "queued", router=router, driver=None))
    try:
        reply = await ctx.transport.send("driver", router, "router", RunJob(job=spec))
    except PeerError as error:
        async with ctx.store.writing() as session:
            job = await session.get(Job, spec.job_id)
            if job is not None and job.next_seq == 0:
                await session.delete(job)
        if error.status == 503:
            raise HandlerError(503, "router_unreachable", f"router {router} is unreachable: {error.message}") from error
        raise
    return _created(spec.job_id, JobAccepted.model_validate(reply).status)


# --- configuration ------------------------------------------------------------------


async def _update_config(ctx: NodeContext, **values: object) -> NodeConfig:
    async with ctx.store.writing() as session:
        config = await config_for_update(session)
        for key, value in values.items():
            setattr(config, key, value)
    return config


async def _register(ctx: NodeContext, config: NodeConfig) -> str | None:
    """Tell the router what we serve; a note for the admin when that failed."""
    if config.router_node is None:
        return None
    message = RegisterDriver(models=config.driver_models, is_public=config.driver_is_public, capacity=config.driver_capacity)
    try:
        await ctx.transport.send("driver", config.router_node, "router", message)
    except PeerError as error:
        return f"saved, but router {config.router_node} was not told: {error.message}"
    return None


# --- serving ----------------------------------------------------------------------------


async def _accept_from_router(ctx: NodeContext, source: Source, spec: JobSpec) -> JobAccepted:
    async with ctx.store.reading() as session:
        config = await read_config(session)
    if source.node != config.router_node:
        raise HandlerError(403, "not_our_router", f"{source.node} is not this driver's router")
    if spec.model not in config.driver_models:
        raise unknown_model(spec.model, config.driver_models)
    try:
        async with ctx.store.writing() as session:
            session.add(_served_row(source.node, spec))
    except IntegrityError:
        return JobAccepted(job_id=spec.job_id, status="running")  # a repeated RunJob: already serving it
    ctx.spawn(serve(ctx, spec.job_id), name=f"serve-{spec.job_id}")
    return JobAccepted(job_id=spec.job_id, status="running")


async def serve(ctx: NodeContext, job_id: str) -> None:
    """Stream the job from our LLM to where it came from, then record how it ended."""
    async with ctx.store.reading() as session:
        served = await session.get(ServedJob, job_id)
    if served is None or served.status != "running":
        return
    spec = JobSpec.model_validate(served.spec)
    seq = 0
    finish_reason: str | None = None
    usage = None
    final: Update
    try:
        async with asyncio.timeout(max(0.0, spec.deadline - time.time())):
            async for pieces in batches(openai.stream_chat(ctx, spec)):
                delta = "".join(piece.delta for piece in pieces)
                for piece in pieces:
                    finish_reason = piece.finish_reason or finish_reason
                    usage = piece.usage or usage
                if delta:
                    await _deliver(ctx, served.origin_node, Update(job_id=job_id, seq=seq, delta=delta, driver=ctx.name))
                    seq += 1
        final = Update(job_id=job_id, seq=seq, is_final=True, status="succeeded", finish_reason=finish_reason, usage=usage)
    except TimeoutError:
        final = Update(job_id=job_id, seq=seq, is_final=True, status="timed_out", error="the job ran past its deadline")
    except UpstreamError as error:
        final = Update(job_id=job_id, seq=seq, is_final=True, status="failed", error=str(error))
    except PeerError as error:
        log.warning("job %s: %s stopped taking its updates (%s); serving stopped", job_id, served.origin_node, error.message)
        final = Update(job_id=job_id, seq=seq, is_final=True, status="failed", error=error.message)
    else:
        final.driver = ctx.name
        try:
            await _deliver(ctx, served.origin_node, final)
        except PeerError as error:
            log.warning("job %s: final update not delivered to %s: %s", job_id, served.origin_node, error.message)
    async with ctx.store.writing() as session:
        row = await session.get(ServedJob, job_id)
        if row is not None:
            row.status = final.status or "failed"
            row.finished_at = time.time()


async def _deliver(ctx: NodeContext, origin: str, update: Update) -> None:
    if origin == ctx.name:
        await record_update(ctx, update)
    else:
        await ctx.transport.send("driver", origin, "router", JobUpdate(update=update))


# --- updates for our clients ----------------------------------------------------------------


async def _record_remote_update(ctx: NodeContext, source: Source, update: Update) -> None:
    async with ctx.store.reading() as session:
        job = await session.get(Job, update.job_id)
    if job is None:
        raise unknown_job(update.job_id)
    if source.node != job.router_node:
        raise HandlerError(403, "not_the_jobs_router", f"{source.node} is not the router of job {update.job_id}")
    await record_update(ctx, update)


async def record_update(ctx: NodeContext, update: Update) -> None:
    """Store one chunk for the job's readers and wake them.  A repeated chunk is ignored."""
    now = time.time()
    async with ctx.store.writing() as session:
        job = await session.get(Job, update.job_id)
        if job is None:
            raise unknown_job(update.job_id)
        if job.status in FINAL_STATUSES or update.seq < job.next_seq:
            return
        session.add(JobChunk(job_id=job.id, seq=update.seq, delta=update.delta))
        job.next_seq = update.seq + 1
        job.driver_node = update.driver or job.driver_node
        if update.delta and job.first_token_at is None:
            job.first_token_at = now
        if update.is_final:
            job.status = update.status or "failed"
            job.finished_at = now
            job.finish_reason = update.finish_reason
            job.usage = update.usage.model_dump() if update.usage else None
            job.error = update.error
        else:
            job.status = "running"
    ctx.signals.notify(update.job_id)
