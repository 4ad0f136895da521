"""Serving a job with the node's own LLM: streamed chunk by chunk to where it came from.

The job came from this node's own client (local path) or from its router (remote path); either
way its chunks go back as JobUpdates (`handlers.delivery`), the last with how it ended.  Crash rule:
a job is marked `streamed` before its first chunk leaves, so that after a crash (`handlers.liveness`)
a job that may have reached its client is never handed to another driver.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from sqlalchemy import Boolean, Float, String, Update, bindparam, delete, select
from sqlalchemy import update as sa_update
from sqlalchemy.ext.asyncio import AsyncSession

from handlers import accounting, metrics, openai, tracing
from handlers.coalesce import batches
from handlers.config import read_config
from handlers.context import NodeContext, ServingTask, StopReason, log
from handlers.delivery import FINAL_DELIVERY_GRACE_S, Undeliverable, again_while_unavailable, deliver
from handlers.errors import ErrorCode, HandlerError, PeerError, UpstreamError, UpstreamErrorKind, too_late, unknown_job, unknown_model
from schemas.jobs import JobSpec, JobStatus, JobUpdate, LlmError
from schemas.messages import JobAccepted, JobUpdateMessage, ReleaseJob, RunJob, Source
from schemas.openai_api import Usage
from schemas.usage import Role, TokenCount, utc_day
from store.database import add_row
from store.errors import StorageUnavailable
from store.models import NodeConfig, ServedJob

CLOCK_SLACK_S = 0.05
STORE_PATIENCE_S = 30.0  # the serving driver's own bookkeeping waits this long for a store that refuses writes


def served_row(ctx: NodeContext, origin: str, spec: JobSpec, traceparent: str | None) -> dict[str, Any]:
    """The `served_jobs` row of a job this node starts serving."""
    return {
        "id": spec.job_id, "origin_node": origin, "worker": ctx.worker, "spec": spec.model_dump(mode="json"),
        "status": JobStatus.RUNNING, "streamed": False, "created_at": time.time(), "deadline": spec.deadline,
        "traceparent": traceparent,
    }


async def accept_from_router(ctx: NodeContext, source: Source, offer: RunJob) -> JobAccepted:
    """RunJob from our router: store the job, then start serving it; not if the router stopped waiting for
    our answer (it has queued the job again, for another driver perhaps)."""
    spec = offer.job
    if ctx.draining:
        raise HandlerError(503, ErrorCode.SHUTTING_DOWN, f"{ctx.name} is shutting down and takes no new jobs")
    async with ctx.store.writing() as session:
        config = await read_config(session)
        if source.node != config.router_node:
            raise HandlerError(403, ErrorCode.NOT_OUR_ROUTER, f"{source.node} is not this driver's router")
        if spec.model not in config.driver_models:
            raise unknown_model(spec.model, config.driver_models)
        earlier = await session.scalar(_SERVED_STATUS, {"job_id": spec.job_id})
        if earlier == JobStatus.RUNNING:
            return JobAccepted(job_id=spec.job_id, status=JobStatus.RUNNING)  # a repeated RunJob: already serving it
        if earlier is not None:  # a new attempt at a job this driver had before
            await session.execute(_FORGET_SERVED, {"job_id": spec.job_id})
        await add_row(session, ServedJob, served_row(ctx, source.node, spec, tracing.traceparent_of(spec.job_id)))
        if offer.too_late():  # last, just before the commit
            raise too_late(spec.job_id)
    log.info("job %s serving %s for %s", spec.job_id, spec.model, source.node)
    start(ctx, spec, source.node, endpoint_of(config))
    return JobAccepted(job_id=spec.job_id, status=JobStatus.RUNNING)


_SERVED_STATUS = select(ServedJob.status).where(ServedJob.id == bindparam("job_id"))
_FORGET_SERVED = delete(ServedJob).where(ServedJob.id == bindparam("job_id"))


def endpoint_of(config: NodeConfig) -> openai.Endpoint | None:
    return None if config.llm_endpoint is None else openai.Endpoint(config.llm_endpoint, config.llm_api_key)


def start(ctx: NodeContext, spec: JobSpec, origin: str, endpoint: openai.Endpoint | None) -> None:
    job_id = spec.job_id
    entry = ServingTask(ctx.spawn(serve(ctx, spec, origin, endpoint), name=f"serve-{job_id}"))
    ctx.serving[job_id] = entry

    def forget(_: asyncio.Task[None]) -> None:
        if ctx.serving.get(job_id) is entry:
            del ctx.serving[job_id]

    entry.task.add_done_callback(forget)


def _stop_reason(ctx: NodeContext, job_id: str) -> StopReason | None:
    """Why the current task, serving `job_id`, was told to stop; None if it was not (the process is stopping)."""
    entry = ctx.serving.get(job_id)
    return entry.stop_reason if entry is not None and entry.task is asyncio.current_task() else None


async def end_cancelled(ctx: NodeContext, job_id: str) -> None:
    """End the job `cancelled` and stop its upstream request (which counts what the LLM produced).  Another
    process of the node may be serving it: that one stops at its next chunk, which finds the job ended."""
    try:
        await _set_served(ctx, job_id, status=JobStatus.CANCELLED)
    finally:
        if (entry := ctx.serving.get(job_id)) is not None:
            entry.stop(StopReason.CLIENT_CANCELLED)


async def cancel(ctx: NodeContext, source: Source, job_id: str) -> None:
    """CancelJob from where the job came from."""
    async with ctx.store.reading() as session:
        origin = await session.scalar(select(ServedJob.origin_node).where(ServedJob.id == job_id))
    if origin is None:
        raise unknown_job(job_id)
    if origin != source.node:
        raise HandlerError(403, ErrorCode.NOT_THE_JOBS_ORIGIN, f"job {job_id} did not come from {source.node}")
    await end_cancelled(ctx, job_id)


class Serving:
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
        self.tail: list[openai.Piece] = []  # what arrived together with the end: it travels in the final update
        self.started = time.time()
        self.first_output_at: float | None = None
        self.output_chunks = 0  # the LLM's chunks that carried output: the completion tokens, where it reports no usage

    async def stream(self) -> None:
        """Raises TimeoutError at the deadline, or when the LLM is silent longer than the job allows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, self.spec.deadline - time.time())
        async with asyncio.timeout_at(self._limit(deadline, self.spec.first_token_timeout)) as timer:
            if not self.spec.kind.streams:
                answer = await openai.fetch_answer(self.ctx, self.endpoint, self.spec)
                usage = answer.get("usage")
                self.tail = [openai.Piece(chunks=[answer], usage=Usage.model_validate(usage) if isinstance(usage, dict) else None)]
                self.usage = self.tail[0].usage
                return
            async for pieces, ended in batches(openai.stream_answer(self.ctx, self.endpoint, self.spec)):
                for piece in pieces:
                    self.finish_reason = piece.finish_reason or self.finish_reason
                    self.usage = piece.usage or self.usage
                    self.output_chunks += accounting.output_chunk_count(piece.chunks)
                if self.output_chunks and self.first_output_at is None:
                    self.first_output_at = time.time()
                if ended:
                    self.tail = pieces  # one message instead of two
                elif pieces:
                    await self.deliver(_update(self.job_id, self.seq, pieces, driver=self.ctx.name))
                    timer.reschedule(self._limit(deadline, self.spec.idle_timeout))

    @staticmethod
    def _limit(deadline: float, allowed: float | None) -> float:
        return deadline if allowed is None else min(deadline, asyncio.get_running_loop().time() + allowed)

    def timeout_reason(self) -> str:
        # The timer runs on the loop's clock; the deadline is wall-clock time, and the two may differ by a little.
        limit = self.spec.first_token_timeout if self.seq == 0 else self.spec.idle_timeout
        if limit is None or time.time() >= self.spec.deadline - CLOCK_SLACK_S:
            return "the job ran past its deadline"
        if self.seq == 0:
            return f"no first token within {limit} s"
        return f"no chunk came whole from the LLM for more than {limit} s"

    async def deliver(self, update: JobUpdate) -> None:
        if self.seq == 0 and self.origin != self.ctx.name:
            # Written before the chunk leaves: after a crash, a job that may have reached its client is never handed over.
            await _set_served(self.ctx, self.job_id, streamed=True, until=self.spec.deadline)
        await deliver(self.ctx, self.origin, update, self.spec.deadline)
        self.seq += 1

    def tokens(self, refused: bool = False) -> TokenCount:
        """What the LLM consumed and produced so far: its usage, or an estimate; none where it refused the request."""
        if self.usage is not None:
            return TokenCount.of(self.usage)
        if refused and self.output_chunks == 0:
            return TokenCount()
        return accounting.estimate(self.spec.kind, self.spec.body, self.output_chunks)

    def final(self, status: JobStatus, error: str | None = None, llm_error: LlmError | None = None, refused: bool = False) -> JobUpdate:
        return _update(
            self.job_id, self.seq, self.tail, driver=self.ctx.name, is_final=True, status=status,
            finish_reason=self.finish_reason if status == JobStatus.SUCCEEDED else None, usage=self.usage, error=error, llm_error=llm_error,
            tokens=self.tokens(refused),
        )

    async def end(self, status: JobStatus, tokens: TokenCount) -> None:
        """Record how the serving ended, and what it counts: once per serving, whoever ended the job."""
        first_token = None if self.first_output_at is None else self.first_output_at - self.started
        await _set_served(self.ctx, self.job_id, status=status, tokens=tokens, origin=self.origin, model=self.spec.model)
        metrics.count_job(self.ctx.name, Role.DRIVER, self.spec.model, status, tokens, time.time() - self.started, first_token)
        log.info("job %s ended %s here (%d prompt, %d completion tokens%s)", self.job_id, status, tokens.prompt_tokens,
                 tokens.completion_tokens, ", estimated" if tokens.estimated else "")


def _update(job_id: str, seq: int, pieces: list[openai.Piece], **fields: Any) -> JobUpdate:
    """One update carrying what `pieces` hold: every chunk whole, and choice 0's text."""
    chunks = [chunk for piece in pieces for chunk in piece.chunks]
    return JobUpdate(job_id=job_id, seq=seq, delta="".join(piece.text for piece in pieces), chunks=chunks, **fields)


async def serve(ctx: NodeContext, spec: JobSpec, origin: str, endpoint: openai.Endpoint | None) -> None:
    """Stream the job from our LLM to `origin` (this node, or the router), then record how it ended."""
    job_id = spec.job_id
    job = Serving(ctx, spec, origin, endpoint)
    try:
        await job.stream()
        final = job.final(JobStatus.SUCCEEDED)
    except TimeoutError:
        metrics.UPSTREAM_ERRORS.labels(ctx.name, spec.model, UpstreamErrorKind.TIMEOUT).inc()
        final = job.final(JobStatus.TIMED_OUT, job.timeout_reason())
    except UpstreamError as error:
        metrics.UPSTREAM_ERRORS.labels(ctx.name, spec.model, error.kind).inc()
        if error.retryable and job.seq == 0 and job.origin != ctx.name:
            await release(ctx, job, str(error))
            return
        final = job.final(JobStatus.FAILED, str(error), error.llm_error, refused=True)
    except Undeliverable as error:
        log.warning("job %s: its updates are not taken (%s); serving stopped", job_id, error)
        await job.end(JobStatus.FAILED, job.tokens())
        return
    except asyncio.CancelledError:
        match _stop_reason(ctx, job_id):
            case None:  # this process is stopping
                await job.end(JobStatus.CANCELLED, job.tokens())
                raise
            case StopReason.CLIENT_CANCELLED:
                await _cancelled(ctx, job)
                return
            case reason:
                final = job.final(JobStatus.FAILED, reason)
    except Exception as error:  # a fault of the driver's own: the job still ends, saying so, and the slot frees
        log.exception("job %s: serving failed", job_id)
        final = job.final(JobStatus.FAILED, f"the driver failed while serving the job: {error!r}")
    await finish(ctx, job, final)


async def finish(ctx: NodeContext, job: Serving, final: JobUpdate) -> None:
    """Deliver the job's final update, then record how its serving ended."""
    try:
        await deliver(ctx, job.origin, final, job.spec.deadline + FINAL_DELIVERY_GRACE_S)
    except (Undeliverable, StorageUnavailable) as error:
        log.warning("job %s: final update not delivered to %s: %s", final.job_id, job.origin, error)
    await job.end(final.status or JobStatus.FAILED, final.tokens or job.tokens())


async def _cancelled(ctx: NodeContext, job: Serving) -> None:
    """The client gave up: the job is counted with what the LLM produced until now, and the router, which
    ended it already, hears what that was (once, as a final update it keeps for its accounting)."""
    tokens = job.tokens()
    await job.end(JobStatus.CANCELLED, tokens)
    if job.origin == ctx.name:
        return
    final = JobUpdate(job_id=job.job_id, seq=job.seq, is_final=True, status=JobStatus.CANCELLED, driver=ctx.name, tokens=tokens)
    try:
        await ctx.transport.send("driver", job.origin, "router", JobUpdateMessage(update=final))
    except PeerError as error:
        log.info("job %s: router %s did not take the count of the cancelled job: %s", job.job_id, job.origin, error.message)


async def release(ctx: NodeContext, job: Serving, reason: str) -> None:
    """Nothing reached the client yet: the router may give the job to another driver."""
    try:
        await ctx.transport.send("driver", job.origin, "router", ReleaseJob(job_id=job.job_id, reason=reason))
    except PeerError as error:
        log.warning("job %s: router %s did not take it back: %s", job.job_id, job.origin, error.message)
    await job.end(JobStatus.FAILED, job.tokens(refused=True))


async def _set_served(
    ctx: NodeContext, job_id: str, status: JobStatus | None = None, streamed: bool | None = None,
    tokens: TokenCount | None = None, origin: str | None = None, model: str | None = None, until: float | None = None,
) -> None:
    """Record how the job stands on this driver; with `tokens`, count it (for `origin` and `model`) in the same
    transaction, whether or not it still ran (another process may have ended it).  A store that refuses writes
    is tried again until `until` (STORE_PATIENCE_S from now by default)."""
    statement = _marking(streamed is not None, status is not None)
    parameters = {"p_job_id": job_id, "p_streamed": streamed, "p_status": status, "p_now": time.time()}

    async def write(session: AsyncSession) -> None:
        await (await session.connection()).execute(statement, parameters)
        if tokens is not None and origin is not None and model is not None:
            day = utc_day(time.time())
            await accounting.record(session, role=Role.DRIVER, day=day, client=origin, model=model, tokens=tokens)

    async def attempt() -> None:
        await ctx.store.write_soon(write)

    await again_while_unavailable(f"job {job_id}: its record on the driver", attempt, until or time.time() + STORE_PATIENCE_S)


@functools.cache
def _marking(streamed: bool, ends: bool) -> Update:
    """The UPDATE of a running served job, built once for each shape; the values come as parameters."""
    values: dict[Any, Any] = {}
    if streamed:
        values[ServedJob.streamed] = bindparam("p_streamed", type_=Boolean)
    if ends:
        values |= {ServedJob.status: bindparam("p_status", type_=String), ServedJob.finished_at: bindparam("p_now", type_=Float)}
    return sa_update(ServedJob).where(ServedJob.id == bindparam("p_job_id"), ServedJob.status == JobStatus.RUNNING).values(values)
