"""The openai process: keeps the node's LLM endpoint and streams completions from it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from handlers.config import config_for_update
from handlers.context import NodeContext
from handlers.errors import HandlerError, LlmHttpError, LlmUnreachable, UpstreamError
from schemas.jobs import JobSpec, Usage
from schemas.messages import Ack, Message, RegisterOaiProviderEndpoint, Source
from schemas.openai_api import ChatCompletionChunk, upstream_body
from schemas.sse import SSEDecoder

ERROR_TEXT_LIMIT = 300


@dataclass(frozen=True)
class Endpoint:
    """The registered LLM endpoint, as read from the node's configuration."""

    url: str
    api_key: str | None = None


@dataclass(frozen=True)
class Piece:
    """What one upstream chunk contributes to a job."""

    delta: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


async def handle(ctx: NodeContext, source: Source, message: Message) -> Ack:
    match message:
        case RegisterOaiProviderEndpoint(endpoint=endpoint, api_key=api_key):
            async with ctx.store.writing() as session:
                config = await config_for_update(session)
                config.llm_endpoint = endpoint.rstrip("/")
                config.llm_api_key = api_key
            return Ack()
    raise HandlerError(400, "unsupported_message", f"the openai process does not take {message.type}")  # type: ignore[attr-defined]


async def stream_chat(ctx: NodeContext, endpoint: Endpoint | None, spec: JobSpec) -> AsyncIterator[Piece]:
    """Stream `spec` from the registered endpoint, one Piece per upstream chunk that carries anything."""
    if endpoint is None:
        raise UpstreamError("this node has no LLM endpoint registered (RegisterOaiProviderEndpoint)")
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    body = upstream_body(spec.model, spec.messages, spec.params.model_dump())
    try:
        async for piece in _pieces(ctx.llm.stream_lines(f"{endpoint.url}/chat/completions", body, headers)):
            yield piece
    except LlmHttpError as error:
        raise _refusal(error.status, error.text) from error
    except LlmUnreachable as error:
        raise UpstreamError(f"LLM endpoint {endpoint.url} failed: {error}", retryable=True) from error


def _refusal(status: int, text: str) -> UpstreamError:
    """An error answer: the endpoint's own message where it gave one (OpenAI's error shape)."""
    try:
        message = str(json.loads(text)["error"]["message"])
        refused = True  # the endpoint read the request and said no: asking again gets the same answer
    except (ValueError, KeyError, TypeError):
        message, refused = text, False
    retryable = not refused and status not in (400, 401, 403, 404, 413, 422)
    return UpstreamError(f"LLM endpoint answered HTTP {status}: {message[:ERROR_TEXT_LIMIT]}", retryable=retryable)


async def _pieces(lines: AsyncIterator[bytes]) -> AsyncIterator[Piece]:
    """The pieces of a streamed answer, which must end with a finish_reason and `[DONE]`."""
    decoder = SSEDecoder()
    finished = False
    async for line in lines:
        event = decoder.feed_line(line.decode())
        if event is None:
            continue
        if event.data.strip() == "[DONE]":
            if not finished:
                raise UpstreamError("the LLM ended its answer without a finish_reason (cut short, or the prompt did not fit)")
            return
        chunk = ChatCompletionChunk.model_validate_json(event.data)
        if chunk.model_extra and "error" in chunk.model_extra:
            raise UpstreamError(f"the LLM reported an error mid-answer: {str(chunk.model_extra['error'])[:ERROR_TEXT_LIMIT]}")
        choice = chunk.choices[0] if chunk.choices else None
        piece = Piece(
            delta=(choice.delta.content or "") if choice else "",
            finish_reason=choice.finish_reason if choice else None,
            usage=chunk.usage,
        )
        finished = finished or piece.finish_reason is not None
        if piece != Piece():
            yield piece
    raise UpstreamError("the LLM's stream broke off before [DONE]", retryable=True)
