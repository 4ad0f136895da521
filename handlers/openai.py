"""The openai process: keeps the node's LLM endpoint and asks it for answers.

A job's body goes to the endpoint as the client sent it (`schemas.openai_api.upstream_body`);
what comes back is kept whole: each streamed chunk as the LLM sent it, or an embeddings result.
How a refusal is read:

| the LLM answers                                  | the job                                                    |
|--------------------------------------------------|------------------------------------------------------------|
| 401, 403, 404 (the driver's key or model)        | retried on another driver; in the end 502 naming the driver |
| 404, 405 without an OpenAI error body            | this LLM does not serve the endpoint: 404 naming both       |
| another 4xx but 408 and 429 (the client's error) | ends with the LLM's status and body, not retried           |
| 408, 429, 5xx, no answer                         | retried, unless the LLM said why in an OpenAI error body   |
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from handlers.assembly import carries_output, choice_text, finish_reason_of, has_finish_reason
from handlers.config import config_for_update
from handlers.context import NodeContext
from handlers.errors import HandlerError, LlmHttpError, LlmUnreachable, UpstreamError, UpstreamErrorKind
from schemas.jobs import JobSpec, LlmError
from schemas.messages import Ack, Message, RegisterOaiProviderEndpoint, Source
from schemas.openai_api import JobKind, OpenAiErrorBody, Usage, upstream_body
from schemas.sse import SSEDecoder

ERROR_TEXT_LIMIT = 2000
NOT_THE_CLIENTS = (401, 403, 404)  # the driver's key or model is wrong, not the client's request
RETRIED_4XX = (408, 429)
_SET_BY_CLIENTS_NODE = ("id", "object", "created")


@dataclass(frozen=True)
class Endpoint:
    """The registered LLM endpoint, as read from the node's configuration."""

    url: str
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        # The client's own headers never reach the LLM: only the key registered with the driver.
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class Piece:
    """What the LLM streamed since the last piece: its chunks, whole, and what the network reads from them."""

    chunks: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""  # choice 0's
    finish_reason: str | None = None  # choice 0's
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


def _url(endpoint: Endpoint | None, kind: JobKind) -> tuple[Endpoint, str]:
    if endpoint is None:
        raise UpstreamError(
            "this node has no LLM endpoint registered (RegisterOaiProviderEndpoint)", UpstreamErrorKind.CONNECTION
        )
    return endpoint, f"{endpoint.url}/{kind.value}"


async def stream_answer(ctx: NodeContext, endpoint: Endpoint | None, spec: JobSpec) -> AsyncIterator[Piece]:
    """Stream `spec` from the registered endpoint, one Piece per chunk that carries anything."""
    endpoint, url = _url(endpoint, spec.kind)
    body = upstream_body(spec.kind, spec.model, spec.body, spec.stream_options)
    try:
        async for piece in _pieces(spec.kind, ctx.llm.stream_lines(url, body, endpoint.headers())):
            yield piece
    except LlmHttpError as error:
        raise _refusal(ctx, spec.kind, error.status, error.text) from error
    except LlmUnreachable as error:
        raise _unreachable(endpoint, error) from error


async def fetch_answer(ctx: NodeContext, endpoint: Endpoint | None, spec: JobSpec) -> dict[str, Any]:
    """An answer that is not streamed (embeddings), whole."""
    endpoint, url = _url(endpoint, spec.kind)
    try:
        text = await ctx.llm.post(url, upstream_body(spec.kind, spec.model, spec.body), endpoint.headers())
    except LlmHttpError as error:
        raise _refusal(ctx, spec.kind, error.status, error.text) from error
    except LlmUnreachable as error:
        raise _unreachable(endpoint, error) from error
    try:
        answer = json.loads(text)
    except ValueError as error:
        raise UpstreamError(
            f"the LLM's answer is not JSON: {text[:ERROR_TEXT_LIMIT]!r}", UpstreamErrorKind.MALFORMED
        ) from error
    if not isinstance(answer, dict):
        raise UpstreamError(f"the LLM's answer is not a JSON object: {text[:ERROR_TEXT_LIMIT]!r}", UpstreamErrorKind.MALFORMED)
    return answer


def _unreachable(endpoint: Endpoint, error: LlmUnreachable) -> UpstreamError:
    return UpstreamError(f"LLM endpoint {endpoint.url} failed: {error}", UpstreamErrorKind.CONNECTION, retryable=True)


def _openai_error(text: str) -> dict[str, Any] | None:
    """The body, if it is OpenAI's error shape."""
    try:
        body = json.loads(text)
        OpenAiErrorBody.model_validate(body)
    except ValueError:
        return None
    return body  # type: ignore[no-any-return]


def _refusal(ctx: NodeContext, kind: JobKind, status: int, text: str) -> UpstreamError:
    body = _openai_error(text)
    message = body["error"]["message"] if body else text[:ERROR_TEXT_LIMIT]
    if status in (404, 405) and body is None:
        said = f"driver {ctx.name}'s LLM does not serve /v1/{kind.value} (HTTP {status})"
        error = {"message": said, "type": "invalid_request_error", "param": None, "code": "endpoint_not_served"}
        return UpstreamError(said, UpstreamErrorKind.REFUSED, llm_error=LlmError(status=404, body={"error": error}))
    if status in NOT_THE_CLIENTS:
        return UpstreamError(
            f"driver {ctx.name}'s LLM answered HTTP {status}: {message}", UpstreamErrorKind.REFUSED, retryable=True
        )
    if 400 <= status < 500 and status not in RETRIED_4XX:
        if body is None:
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return UpstreamError(
            f"the LLM refused the request (HTTP {status}): {message}", UpstreamErrorKind.REFUSED,
            llm_error=LlmError(status=status, body=body),
        )
    # The endpoint read the request and said why: asking again gets the same answer.
    failure = UpstreamErrorKind.SERVER_ERROR if status >= 500 else UpstreamErrorKind.REFUSED
    return UpstreamError(f"LLM endpoint answered HTTP {status}: {message}", failure, retryable=body is None)


async def _pieces(kind: JobKind, lines: AsyncIterator[bytes]) -> AsyncIterator[Piece]:
    """The pieces of a streamed answer, which must end with a finish_reason and `[DONE]`.  A chunk that
    carries only the assistant's role waits for the next, so that nothing leaves before the first token."""
    decoder = SSEDecoder()
    finished = False
    held: list[dict[str, Any]] = []
    async for line in lines:
        event = decoder.feed_line(line.decode(errors="replace"))
        if event is None:
            continue
        if event.data.strip() == "[DONE]":
            if not finished:
                raise UpstreamError(
                    "the LLM ended its answer without a finish_reason (cut short, or the prompt did not fit)",
                    UpstreamErrorKind.MALFORMED,
                )
            if held:
                yield _piece(kind, held)
            return
        try:
            chunk = json.loads(event.data)
        except ValueError as error:
            raise UpstreamError(
                f"the LLM sent a chunk that is not JSON: {event.data[:ERROR_TEXT_LIMIT]!r}", UpstreamErrorKind.MALFORMED
            ) from error
        if not isinstance(chunk, dict):
            raise UpstreamError(
                f"the LLM sent a chunk that is not a JSON object: {event.data[:ERROR_TEXT_LIMIT]!r}", UpstreamErrorKind.MALFORMED
            )
        if "error" in chunk:
            raise UpstreamError(
                f"the LLM reported an error mid-answer: {str(chunk['error'])[:ERROR_TEXT_LIMIT]}", UpstreamErrorKind.SERVER_ERROR
            )
        held.append({key: value for key, value in chunk.items() if key not in _SET_BY_CLIENTS_NODE})
        finished = finished or has_finish_reason(chunk)
        if carries_output(chunk):
            yield _piece(kind, held)
            held = []
    raise UpstreamError("the LLM's stream broke off before [DONE]", UpstreamErrorKind.CONNECTION, retryable=True)


def _piece(kind: JobKind, chunks: list[dict[str, Any]]) -> Piece:
    usage = next((chunk["usage"] for chunk in reversed(chunks) if chunk.get("usage") is not None), None)
    return Piece(
        chunks=chunks,
        text="".join(choice_text(kind, chunk) for chunk in chunks),
        finish_reason=next((reason for chunk in chunks if (reason := finish_reason_of(chunk)) is not None), None),
        usage=Usage.model_validate(usage) if isinstance(usage, dict) else None,
    )
