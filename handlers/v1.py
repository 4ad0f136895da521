"""The OpenAI-compatible `/v1` API on top of jobs: a request becomes a job, the job's chunks its answer.

Streamed, the LLM's chunks go to the client as they came (with this job's `id` and `created`);
not streamed, they are assembled by OpenAI's rules (`handlers.assembly`).  A job that ends
without an answer becomes an HTTP error: the LLM's own status and body where it refused the
request, else 502 (failed), 504 (timed out) or 499 (cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from handlers import driver, jobs
from handlers.api_keys import Caller
from handlers.assembly import finish_chunk
from handlers.context import NodeContext
from handlers.errors import ErrorCode, HandlerError
from schemas.jobs import ErrorBody, JobStatus, JobUpdate, output_chunks
from schemas.openai_api import JobKind, JobOrder, OpenAiModel, OpenAiModelList

FAILURE_STATUS = {JobStatus.TIMED_OUT: 504, JobStatus.CANCELLED: 499, JobStatus.FAILED: 502}
ENDED_AS = {JobStatus.TIMED_OUT: ErrorCode.JOB_TIMED_OUT, JobStatus.CANCELLED: ErrorCode.JOB_CANCELLED, JobStatus.FAILED: ErrorCode.JOB_FAILED}


@dataclass(frozen=True)
class Answer:
    """The job behind one `/v1` request, and what its answer is labelled with."""

    kind: JobKind
    job_id: str
    created: int
    model: str
    wants_usage: bool

    @property
    def id(self) -> str:
        return self.kind.id_prefix + self.job_id

    def chunk(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        """A stored chunk as the client receives it; None if nothing of it is for this client."""
        fields = dict(fields)
        if not self.wants_usage:
            fields.pop("usage", None)  # the network always asks for usage; the client did not
            if not fields.get("choices"):
                return None
        return {"id": self.id, "object": self.kind.chunk_object, "created": self.created, "model": fields.pop("model", self.model), **fields}


async def start(ctx: NodeContext, caller: Caller, order: JobOrder, idempotency_key: str | None = None) -> Answer:
    created = await driver.submit(ctx, caller, order, idempotency_key)
    return Answer(order.kind, created.job_id, int(created.created_at), order.envelope.model, order.envelope.wants_usage())


async def first_update(ctx: NodeContext, answer: Answer, hold: float) -> JobUpdate | None:
    """The job's first update, if one comes within `hold` seconds (a refusal comes before any chunk)."""
    try:
        async with asyncio.timeout(hold), aclosing(jobs.follow(ctx, answer.job_id)) as updates:
            async for update in updates:
                if update is not None:
                    return update
    except TimeoutError:
        pass
    return None


@dataclass
class Events:
    """The `data:` payloads one update of the job makes, sent together; `last`: the answer ends with them."""

    payloads: list[dict[str, Any]]
    last: bool = False


async def stream(ctx: NodeContext, answer: Answer, first: JobUpdate | None = None) -> AsyncIterator[Events | None]:
    """A streamed answer, update by update (None: a heartbeat is due), from `first` if it was read already;
    `[DONE]` is the caller's."""
    finished: set[int] = set()
    usage_sent = False
    async with aclosing(_updates(ctx, answer.job_id, first)) as updates:
        async for update in updates:
            if update is None:
                yield None
                continue
            events = Events([])
            for stored in output_chunks(update.seq, update.delta, update.chunks):
                finished.update(choice.get("index", 0) for choice in stored.get("choices") or [] if choice.get("finish_reason"))
                usage_sent = usage_sent or stored.get("usage") is not None
                if (payload := answer.chunk(stored)) is not None:
                    events.payloads.append(payload)
            if not update.is_final:
                if events.payloads:
                    yield events
                continue
            events.last = True
            if update.status != JobStatus.SUCCEEDED:
                events.payloads.append({"error": error_object(update)})
            else:
                # A job stored before chunks were kept: its end and usage were kept beside the text.
                kept_beside: list[dict[str, Any]] = []
                if 0 not in finished:
                    kept_beside.append(finish_chunk(answer.kind, [0], update.finish_reason))
                if answer.wants_usage and not usage_sent and update.usage is not None:
                    kept_beside.append({"choices": [], "usage": update.usage.model_dump()})
                events.payloads += [payload for stored in kept_beside if (payload := answer.chunk(stored)) is not None]
            yield events
            return


async def _updates(ctx: NodeContext, job_id: str, first: JobUpdate | None) -> AsyncGenerator[JobUpdate | None, None]:
    if first is not None:
        yield first
        if first.is_final:
            return
    async with aclosing(jobs.follow(ctx, job_id, after_seq=-1 if first is None else first.seq)) as updates:
        async for update in updates:
            yield update


async def complete(ctx: NodeContext, answer: Answer) -> dict[str, Any]:
    """Wait for the whole job and assemble its answer; a job that did not succeed raises its HTTP error."""
    chunks: list[dict[str, Any]] = []
    async with aclosing(jobs.follow(ctx, answer.job_id)) as updates:
        async for update in updates:
            if update is None:
                continue
            chunks.extend(output_chunks(update.seq, update.delta, update.chunks))
            if update.is_final:
                if update.status != JobStatus.SUCCEEDED:
                    raise refusal(update)
                return jobs.whole_answer(
                    answer.kind, chunks, response_id=answer.id, created=answer.created, model=answer.model,
                    finish_reason=update.finish_reason, usage=update.usage,
                )
    raise HandlerError(502, ErrorCode.JOB_LOST, f"job {answer.job_id} ended without a final update")


def refusal(update: JobUpdate) -> HandlerError:
    """A job that ended without an answer, as the HTTP error the client gets."""
    if update.llm_error is not None:
        error = update.llm_error.body.get("error") or {}
        return HandlerError(update.llm_error.status, ErrorCode.LLM_REFUSED, str(error.get("message")), body=update.llm_error.body)
    status = update.status or JobStatus.FAILED
    return HandlerError(FAILURE_STATUS.get(status, 502), ENDED_AS.get(status, ErrorCode.JOB_FAILED), failure(update).message)


def error_object(update: JobUpdate) -> dict[str, Any]:
    """The `error` of an error event, for a streamed answer that had committed to 200."""
    if update.llm_error is not None and isinstance(update.llm_error.body.get("error"), dict):
        return dict(update.llm_error.body["error"])
    return failure(update).model_dump(exclude_none=True)


def failure(update: JobUpdate) -> ErrorBody:
    status = update.status or JobStatus.FAILED
    return ErrorBody(message=update.error or f"job {status}", type="server_error", code=ENDED_AS.get(status, ErrorCode.JOB_FAILED))


async def models(ctx: NodeContext) -> OpenAiModelList:
    return OpenAiModelList(data=[OpenAiModel(id=info.id, owned_by=info.owned_by) for info in await driver.models(ctx)])
