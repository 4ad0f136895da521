"""The driver process: where clients send jobs, and where a node's own LLM serves them.

| event                         | reads               | decides                                 | writes                  | sends                          |
|-------------------------------|---------------------|-----------------------------------------|-------------------------|--------------------------------|
| submit (client)               | config, jobs        | repeat? serve locally, forward, refuse  | jobs (+ served_jobs)    | RunJob → router                |
| cancel (client)               | jobs                | still running? where?                   | jobs, job_chunks        | CancelJob → router             |
| SetRouter / SetLocalDriver    | config              |                                         | config                  | RegisterDriver → router        |
| RunJob (from our router)      | config              | do we serve this model?                 | served_jobs             | (starts serving)               |
| CancelJob (from our router)   | served_jobs         |                                         | served_jobs             | (stops serving)                |
| JobUpdate (from our router)   | jobs                | from the job's router? new?             | jobs, job_chunks        | wakes the job's readers        |
| serve (after RunJob / submit) | served_jobs, config | retry elsewhere or fail?                | served_jobs             | JobUpdate per chunk, ReleaseJob|
| boot                          | served_jobs         | which jobs died with the last process   | served_jobs             | ReleaseJob / JobUpdate, Register|
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy import update as sa_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from handlers import api_keys, openai
from handlers.api_keys import Caller
from handlers.coalesce import batches
from handlers.config import config_for_update, read_config
from handlers.context import NodeContext, log
from handlers.errors import HandlerError, PeerError, UpstreamError, unknown_job, unknown_model
from schemas.jobs import FINAL_STATUSES, JobCreated, JobRequest, JobSpec, Usage
from schemas.jobs import JobUpdate as Update
from schemas.messages import (
    Ack,
    ApiKeyCreated,
    CancelJob,
    CreateApiKey,
    JobAccepted,
    JobUpdate,
    ListModels,
    Message,
    ModelInfo,
    ModelList,
    RegisterDriver,
    ReleaseJob,
    RequireApiKeys,
    RevokeApiKey,
    RunJob,
    SetJobTimeout,
    SetLocalDriver,
    SetRouter,
    Source,
)
from store.models import Job, JobChunk, NodeConfig, ServedJob

DELIVERY_BACKOFF_S = 0.1
DELIVERY_BACKOFF_MAX_S = 2.0
FINAL_DELIVERY_GRACE_S = 5.0  # a timed_out update is sent at the deadline, and still needs a moment to arrive


# --- events ---------------------------------------------------------------------


async def submit(ctx: NodeContext, caller: Caller, request: JobRequest, idempotency_key: str | None = None) -> JobCreated:
    """A client's job: serve it with our own LLM, or hand it to our router.  One transaction decides and stores it."""
    if ctx.draining:
        raise HandlerError(503, "shutting_down", f"{ctx.name} is shutting down and takes no new jobs")
    try:
        async with ctx.store.writing() as session:
            config = await read_config(session)
            client = await api_keys.identify(session, config, caller)
            if idempotency_key is not None and (earlier := await _earlier_submission(session, client, idempotency_key)):
                return earlier
            spec = _new_spec(ctx, request, config)
            local = spec.model in config.driver_models
            if local:
                session.add_all([_job_row(client, spec, "running", None, ctx.name, idempotency_key), _served_row(ctx.name, spec)])
            elif config.router_node is not None:
                # Stored before the router hears of it, so its first update always finds it.
                session.add(_job_row(client, spec, "queued", config.router_node, None, idempotency_key))
            elif config.driver_models:
                raise unknown_model(spec.model, config.driver_models)
            else:
                raise HandlerError(503, "no_router", "this node serves no model and has no router (SetRouter)")
    except IntegrityError:
        if idempotency_key is None:
            raise
        async with ctx.store.reading() as session:  # a concurrent submission with the same key won
            if earlier := await _earlier_submission(session, client, idempotency_key):
                return earlier
        raise
    if local:
        _start_serving(ctx, spec, ctx.name, _endpoint(config))
        return _created(spec, "running")
    return await _forward(ctx, spec, config.router_node)  # type: ignore[arg-type]


async def cancel(ctx: NodeContext, job_id: str) -> None:
    """The client gave up on its job: end it `cancelled` here, and tell whoever serves it."""
    async with ctx.store.reading() as session:
        job = await session.get(Job, job_id)
    if job is None:
        raise unknown_job(job_id)
    if job.status in FINAL_STATUSES:
        raise HandlerError(409, "job_finished", f"job {job_id} already ended: {job.status}")
    await record_update(ctx, Update(job_id=job_id, seq=job.next_seq, is_final=True, status="cancelled", error="cancelled by the client"))
    if job.router_node is None:
        _stop_serving(ctx, job_id)
        return
    try:
        await ctx.transport.send("driver", job.router_node, "router", CancelJob(job_id=job_id))
    except PeerError as error:
        log.warning("job %s: router %s not told of the cancellation: %s", job_id, job.router_node, error.message)


async def handle(ctx: NodeContext, source: Source, message: Message) -> Ack | JobAccepted | ApiKeyCreated:
    match message:
        case SetRouter(node=node):
            config = await _update_config(ctx, router_node=node)
            return Ack(note=await _register(ctx, config))
        case SetLocalDriver():
            config = await _update_config(
                ctx, driver_models=message.model_names(), driver_is_public=message.is_public, driver_capacity=message.capacity
            )
            return Ack(note=await _register(ctx, config))
        case SetJobTimeout(seconds=seconds):
            await _update_config(ctx, job_timeout=seconds)
            return Ack()
        case RequireApiKeys(required=required):
            await _update_config(ctx, require_api_keys=required)
            return Ack()
        case CreateApiKey(label=label):
            return await api_keys.create(ctx, label)
        case RevokeApiKey(label=label):
            await api_keys.revoke(ctx, label)
            return Ack()
        case RunJob(job=spec):
            return await _accept_from_router(ctx, source, spec)
        case CancelJob(job_id=job_id):
            await _cancel_served(ctx, source, job_id)
            return Ack()
        case JobUpdate(update=update):
            await _record_remote_update(ctx, source, update)
            return Ack()
    raise HandlerError(400, "unsupported_message", f"the driver does not take {message.type}")  # type: ignore[attr-defined]


async def boot(ctx: NodeContext) -> None:
    """After a restart: settle the jobs the last process was serving, then tell the router we are back."""
    async with ctx.store.reading() as session:
        orphans = (await session.scalars(select(ServedJob).where(ServedJob.status == "running"))).all()
    for served in orphans:
        if served.id not in ctx.serving:
            ctx.spawn(_settle_orphan(ctx, served), name=f"settle-{served.id}")
    await heartbeat(ctx, restarted=True)


async def heartbeat(ctx: NodeContext, restarted: bool = False) -> None:
    """Re-register with the router, so it knows this driver is alive."""
    async with ctx.store.reading() as session:
        config = await read_config(session)
    if config.driver_models:
        note = await _register(ctx, config, restarted)
        if note:
            log.warning("%s", note)


async def drain(ctx: NodeContext, grace: float) -> None:
    """Stop taking jobs, let those being served finish for `grace` seconds, then end the rest `failed`."""
    ctx.draining = True
    running = list(ctx.serving.values())
    if running:
        log.info("draining: waiting up to %.0f s for %d job(s)", grace, len(running))
        await asyncio.wait(running, timeout=grace)
    for job_id in list(ctx.serving):
        _stop_serving(ctx, job_id, reason="the serving node shut down")
    await asyncio.gather(*ctx.serving.values(), return_exceptions=True)


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


def _new_spec(ctx: NodeContext, request: JobRequest, config: NodeConfig) -> JobSpec:
    now = time.time()
    default = config.job_timeout or ctx.settings.job_timeout
    timeout = min(request.timeout or default, max(default, ctx.settings.max_job_timeout))
    return JobSpec(
        job_id=uuid.uuid4().hex,
        client_node=ctx.name,
        model=request.model,
        messages=request.chat_messages(),
        params=request.sampling(),
        created_at=now,
        deadline=now + timeout,
        first_token_timeout=request.first_token_timeout or ctx.settings.first_token_timeout,
        idle_timeout=request.idle_timeout or ctx.settings.idle_timeout,
    )


def _created(job: JobSpec | Job, status: str) -> JobCreated:
    job_id = job.job_id if isinstance(job, JobSpec) else job.id
    return JobCreated(job_id=job_id, events_url=f"/jobs/{job_id}/events", status=status, created_at=job.created_at)  # type: ignore[arg-type]


async def _earlier_submission(session: AsyncSession, client: str, key: str) -> JobCreated | None:
    job = await session.scalar(select(Job).where(Job.client == client, Job.idempotency_key == key))
    return None if job is None else _created(job, job.status)


def _job_row(client: str, spec: JobSpec, status: str, router: str | None, driver: str | None, key: str | None) -> Job:
    return Job(
        id=spec.job_id,
        client=client,
        idempotency_key=key,
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
        streamed=False,
        created_at=time.time(),
        deadline=spec.deadline,
    )


async def _forward(ctx: NodeContext, spec: JobSpec, router: str) -> JobCreated:
    """Hand the stored job to the router; if it refuses, the row goes again and the refusal leaves nothing behind."""
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
        serving=sorted(ctx.serving), as_of=time.time(),
    )
    try:
        await ctx.transport.send("driver", config.router_node, "router", message)
    except PeerError as error:
        return f"saved, but router {config.router_node} was not told: {error.message}"
    return None


# --- serving ----------------------------------------------------------------------------


async def _accept_from_router(ctx: NodeContext, source: Source, spec: JobSpec) -> JobAccepted:
    if ctx.draining:
        raise HandlerError(503, "shutting_down", f"{ctx.name} is shutting down and takes no new jobs")
    async with ctx.store.writing() as session:
        config = await read_config(session)
        if source.node != config.router_node:
            raise HandlerError(403, "not_our_router", f"{source.node} is not this driver's router")
        if spec.model not in config.driver_models:
            raise unknown_model(spec.model, config.driver_models)
        earlier = await session.get(ServedJob, spec.job_id)
        if earlier is not None and earlier.status == "running":
            return JobAccepted(job_id=spec.job_id, status="running")  # a repeated RunJob: already serving it
        if earlier is not None:  # a new attempt at a job this driver had before
            await session.delete(earlier)
            await session.flush()
        session.add(_served_row(source.node, spec))
    _start_serving(ctx, spec, source.node, _endpoint(config))
    return JobAccepted(job_id=spec.job_id, status="running")


def _endpoint(config: NodeConfig) -> openai.Endpoint | None:
    return None if config.llm_endpoint is None else openai.Endpoint(config.llm_endpoint, config.llm_api_key)


def _start_serving(ctx: NodeContext, spec: JobSpec, origin: str, endpoint: openai.Endpoint | None) -> None:
    job_id = spec.job_id
    task = ctx.spawn(serve(ctx, spec, origin, endpoint), name=f"serve-{job_id}")
    ctx.serving[job_id] = task
    task.add_done_callback(lambda _: ctx.serving.pop(job_id, None))


def _stop_serving(ctx: NodeContext, job_id: str, reason: str | None = None) -> None:
    """Cancel the upstream request; with a reason, the job's origin hears it failed."""
    task = ctx.serving.get(job_id)
    if task is not None:
        task.cancel(reason)


async def _cancel_served(ctx: NodeContext, source: Source, job_id: str) -> None:
    async with ctx.store.writing() as session:
        served = await session.get(ServedJob, job_id)
        if served is None:
            raise unknown_job(job_id)
        if served.origin_node != source.node:
            raise HandlerError(403, "not_the_jobs_origin", f"job {job_id} did not come from {source.node}")
        if served.status == "running":
            served.status, served.finished_at = "cancelled", time.time()
    _stop_serving(ctx, job_id)


class _Serving:
    """One job being streamed from the LLM to its origin; counts what was delivered."""

    def __init__(self, ctx: NodeContext, spec: JobSpec, origin: str, endpoint: openai.Endpoint | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.job_id = spec.job_id
        self.origin = origin
        self.spec = spec
        self.seq = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.tail = ""  # text that arrived together with the end: it travels in the final update

    async def stream(self) -> None:
        """Raises TimeoutError at the deadline, or when the LLM is silent longer than the job allows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, self.spec.deadline - time.time())
        async with asyncio.timeout_at(self._limit(deadline, self.spec.first_token_timeout)) as timer:
            async for pieces, ended in batches(openai.stream_chat(self.ctx, self.endpoint, self.spec)):
                for piece in pieces:
                    self.finish_reason = piece.finish_reason or self.finish_reason
                    self.usage = piece.usage or self.usage
                delta = "".join(piece.delta for piece in pieces)
                if ended:
                    self.tail = delta  # one message instead of two
                elif delta:
                    await self.deliver(Update(job_id=self.job_id, seq=self.seq, delta=delta, driver=self.ctx.name))
                    timer.reschedule(self._limit(deadline, self.spec.idle_timeout))

    @staticmethod
    def _limit(deadline: float, allowed: float | None) -> float:
        return deadline if allowed is None else min(deadline, asyncio.get_running_loop().time() + allowed)

    def timeout_reason(self) -> str:
        if time.time() >= self.spec.deadline:
            return "the job ran past its deadline"
        if self.seq == 0:
            return f"no first token within {self.spec.first_token_timeout} s"
        return f"the LLM was silent for more than {self.spec.idle_timeout} s"

    async def deliver(self, update: Update) -> None:
        if self.seq == 0 and self.origin != self.ctx.name:
            # Written before the chunk leaves: after a crash, a job that may have reached its client is never handed over.
            await _set_served(self.ctx, self.job_id, streamed=True)
        await _deliver(self.ctx, self.origin, update, self.spec.deadline)
        self.seq += 1

    def final(self, status: str, error: str | None = None) -> Update:
        return Update(
            job_id=self.job_id, seq=self.seq, delta=self.tail, is_final=True, status=status, driver=self.ctx.name,  # type: ignore[arg-type]
            finish_reason=self.finish_reason if status == "succeeded" else None, usage=self.usage, error=error,
        )


async def serve(ctx: NodeContext, spec: JobSpec, origin: str, endpoint: openai.Endpoint | None) -> None:
    """Stream the job from our LLM to `origin` (this node, or the router), then record how it ended."""
    job_id = spec.job_id
    job = _Serving(ctx, spec, origin, endpoint)
    try:
        await job.stream()
        final = job.final("succeeded")
    except TimeoutError:
        final = job.final("timed_out", job.timeout_reason())
    except UpstreamError as error:
        if error.retryable and job.seq == 0 and job.origin != ctx.name:
            await _release(ctx, job, str(error))
            return
        final = job.final("failed", str(error))
    except PeerError as error:
        log.warning("job %s: %s stopped taking its updates (%s); serving stopped", job_id, job.origin, error.message)
        await _set_served(ctx, job_id, status="failed")
        return
    except asyncio.CancelledError as cancelled:
        reason = cancelled.args[0] if cancelled.args else None
        if reason is None:  # cancelled by the client: its side already knows
            await _set_served(ctx, job_id, status="cancelled")
            raise
        final = job.final("failed", reason)
    await _finish(ctx, job.origin, final, job.spec.deadline + FINAL_DELIVERY_GRACE_S)


async def _finish(ctx: NodeContext, origin: str, final: Update, deadline: float) -> None:
    try:
        await _deliver(ctx, origin, final, deadline)
    except PeerError as error:
        log.warning("job %s: final update not delivered to %s: %s", final.job_id, origin, error.message)
    await _set_served(ctx, final.job_id, status=final.status or "failed")


async def _release(ctx: NodeContext, job: _Serving, reason: str) -> None:
    """Nothing reached the client yet: the router may give the job to another driver."""
    try:
        await ctx.transport.send("driver", job.origin, "router", ReleaseJob(job_id=job.job_id, reason=reason))
    except PeerError as error:
        log.warning("job %s: router %s did not take it back: %s", job.job_id, job.origin, error.message)
    await _set_served(ctx, job.job_id, status="failed")


async def _set_served(ctx: NodeContext, job_id: str, status: str | None = None, streamed: bool | None = None) -> None:
    values: dict[str, Any] = {}
    if streamed is not None:
        values["streamed"] = streamed
    if status is not None:
        values |= {"status": status, "finished_at": time.time()}
    statement = sa_update(ServedJob).where(ServedJob.id == job_id, ServedJob.status == "running").values(values)
    await ctx.store.write_soon(lambda session: session.execute(statement.execution_options(synchronize_session=False)))


async def _settle_orphan(ctx: NodeContext, served: ServedJob) -> None:
    """A job the previous process was serving when it died."""
    if not served.streamed and served.origin_node != ctx.name:
        job = _Serving(ctx, JobSpec.model_validate(served.spec), served.origin_node)
        await _release(ctx, job, "the driver restarted before it sent anything")
        return
    final = Update(job_id=served.id, seq=0, is_final=True, status="failed", driver=ctx.name, error="the driver restarted mid-job")
    await _finish(ctx, served.origin_node, final, served.deadline)


async def _deliver(ctx: NodeContext, origin: str, update: Update, deadline: float) -> None:
    """To this node's own client, or to the router; a router that is down (restarting) is tried
    again with backoff until the job's deadline.  Repeats are safe: receivers ignore known seqs."""
    if origin == ctx.name:
        await record_update(ctx, update)
        return
    backoff = DELIVERY_BACKOFF_S
    while True:
        try:
            await ctx.transport.send("driver", origin, "router", JobUpdate(update=update))
            return
        except PeerError as error:
            if error.status != 503 or time.time() + backoff > deadline:
                raise
            log.info("job %s: router %s unreachable, update %d retried in %.1f s", update.job_id, origin, update.seq, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, DELIVERY_BACKOFF_MAX_S)


# --- updates for our clients ----------------------------------------------------------------


async def _record_remote_update(ctx: NodeContext, source: Source, update: Update) -> None:
    if await record_update(ctx, update, router=source.node):
        return
    async with ctx.store.reading() as session:
        router = await session.scalar(select(Job.router_node).where(Job.id == update.job_id))
        exists = router is not None or await session.get(Job, update.job_id) is not None
    if not exists:
        raise unknown_job(update.job_id)
    if router != source.node:
        raise HandlerError(403, "not_the_jobs_router", f"{source.node} is not the router of job {update.job_id}")
    # otherwise a repeat, or news of a job that already ended: nothing to do


async def record_update(ctx: NodeContext, update: Update, router: str | None = None) -> bool:
    """Store one chunk for the job's readers and wake them; False if it changed nothing.

    Repeats and anything after the job's end change nothing; with `router`, neither does an
    update for a job that was not given to that router.  A final update always takes the
    sequence number right after the last chunk.
    """
    now = time.time()
    conditions = [Job.id == update.job_id, Job.status.not_in(FINAL_STATUSES)]
    if not update.is_final:
        conditions.append(Job.next_seq <= update.seq)
    if router is not None:
        conditions.append(Job.router_node == router)
    values: dict[str, Any] = {"next_seq": Job.next_seq + 1 if update.is_final else update.seq + 1, "status": "running"}
    if update.driver:
        values["driver_node"] = update.driver
    if update.delta:
        values["first_token_at"] = func.coalesce(Job.first_token_at, now)
    if update.is_final:
        values |= {
            "status": update.status or "failed",
            "finished_at": now,
            "finish_reason": update.finish_reason,
            "usage": update.usage.model_dump() if update.usage else None,
            "error": update.error,
        }
    statement = sa_update(Job).where(*conditions).values(values).returning(Job.next_seq)

    async def write(session: AsyncSession) -> bool:
        next_seq = await session.scalar(statement.execution_options(synchronize_session=False))
        if next_seq is None:
            return False
        await session.execute(insert(JobChunk).values(job_id=update.job_id, seq=next_seq - 1, delta=update.delta))
        return True

    if not await ctx.store.write_soon(write):
        return False
    ctx.signals.notify(update.job_id)
    return True
