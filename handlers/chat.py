"""OpenAI-compatible chat completions on top of jobs: a request becomes a job, its updates become chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from handlers import driver, jobs
from handlers.api_keys import Caller
from handlers.context import NodeContext
from handlers.errors import HandlerError
from schemas.jobs import ErrorBody, JobRequest, JobUpdate
from schemas.openai_api import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionMessage,
    OpenAiModel,
    OpenAiModelList,
)

FAILURE_STATUS = {"timed_out": 504, "cancelled": 499, "failed": 502}


def job_request(request: ChatCompletionRequest) -> JobRequest:
    return JobRequest(
        model=request.model,
        messages=request.messages,
        max_tokens=request.max_tokens or request.max_completion_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop,
        seed=request.seed,
    )


async def start(ctx: NodeContext, caller: Caller, request: ChatCompletionRequest) -> tuple[str, int]:
    """Submit the job; its id and creation time (seconds) for the completion's `id` and `created`."""
    created = await driver.submit(ctx, caller, job_request(request))
    return created.job_id, int(created.created_at)


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


async def stream(
    ctx: NodeContext, job_id: str, created: int, request: ChatCompletionRequest
) -> AsyncIterator[dict[str, Any] | None]:
    """The `data:` payloads of a streamed completion (None: a heartbeat is due); [DONE] is the caller's."""
    base: dict[str, Any] = {"id": completion_id(job_id), "created": created, "model": request.model}
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    first = True
    async for update in jobs.follow(ctx, job_id):
        if update is None:
            yield None
            continue
        if update.delta or first:
            delta = ChunkDelta(role="assistant" if first else None, content=update.delta)
            first = False
            yield _chunk(base, delta, None)
        if update.is_final:
            if update.status != "succeeded":
                yield {"error": failure(update).model_dump(exclude_none=True)}
                return
            yield _chunk(base, ChunkDelta(), update.finish_reason)
            if include_usage and update.usage is not None:
                yield ChatCompletionChunk(**base, choices=[], usage=update.usage).model_dump(exclude_none=True)
            return


def _chunk(base: dict[str, Any], delta: ChunkDelta, finish_reason: str | None) -> dict[str, Any]:
    chunk = ChatCompletionChunk(**base, choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)])
    payload = chunk.model_dump(exclude_none=True)
    payload["choices"][0]["finish_reason"] = finish_reason
    return payload


async def complete(ctx: NodeContext, job_id: str, created: int, request: ChatCompletionRequest) -> ChatCompletion:
    """Wait for the whole job; a job that did not succeed becomes the matching HTTP error."""
    text: list[str] = []
    async for update in jobs.follow(ctx, job_id):
        if update is None:
            continue
        text.append(update.delta)
        if update.is_final:
            if update.status != "succeeded":
                error = failure(update)
                raise HandlerError(FAILURE_STATUS.get(update.status or "failed", 502), error.code or "job_failed", error.message)
            return ChatCompletion(
                id=completion_id(job_id),
                created=created,
                model=request.model,
                choices=[CompletionChoice(message=CompletionMessage(content="".join(text)), finish_reason=update.finish_reason)],
                usage=update.usage,
            )
    raise HandlerError(502, "job_lost", f"job {job_id} ended without a final update")


def failure(update: JobUpdate) -> ErrorBody:
    status = update.status or "failed"
    return ErrorBody(message=update.error or f"job {status}", type="server_error", code=f"job_{status}")


async def models(ctx: NodeContext) -> OpenAiModelList:
    return OpenAiModelList(data=[OpenAiModel(id=info.id, owned_by=info.owned_by) for info in await driver.models(ctx)])
