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
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from pydantic import ValidationError

from handlers import strict_json
from handlers.assembly import adds_output, carries_output, choice_text, finish_chunk, finish_reason_of, has_finish_reason
from handlers.config import config_for_update
from handlers.context import NodeContext
from handlers.errors import LlmHttpError, LlmLineTooLong, LlmUnreachable, UpstreamError, UpstreamErrorKind
from schemas.jobs import JobSpec, LlmError
from schemas.messages import Ack, RegisterOaiProviderEndpoint
from schemas.openai_api import JobKind, OpenAiErrorBody, UpstreamChunk, Usage, upstream_body
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


async def register_endpoint(ctx: NodeContext, message: RegisterOaiProviderEndpoint) -> Ack:
    """Admin: the OpenAI-compatible endpoint this node's LLM answers at."""
    async with ctx.store.writing() as session:
        config = await config_for_update(session)
        config.llm_endpoint = message.endpoint.rstrip("/")
        config.llm_api_key = message.api_key
    return Ack()


def _url(endpoint: Endpoint | None, kind: JobKind) -> tuple[Endpoint, str]:
    if endpoint is None:
        raise UpstreamError(
            "this node has no LLM endpoint registered (RegisterOaiProviderEndpoint)", UpstreamErrorKind.CONNECTION
        )
    return endpoint, f"{endpoint.url}/{kind.value}"


async def stream_answer(ctx: NodeContext, endpoint: Endpoint | None, spec: JobSpec) -> AsyncIterator[Piece]:
    """Stream `spec` from the registered endpoint, one Piece per chunk that carries anything.  Leaving early
    (an error, the cut at max_tokens, the job's end) closes the upstream request."""
    endpoint, url = _url(endpoint, spec.kind)
    body = upstream_body(spec.kind, spec.model, spec.body, spec.stream_options)
    limit = ctx.settings.max_llm_event_bytes
    try:
        async with aclosing(ctx.llm.stream_lines(url, body, endpoint.headers(), limit)) as lines:
            async for piece in _pieces(spec.kind, lines, limit, TokenBudget.of(spec.body)):
                yield piece
    except LlmHttpError as error:
        raise _refusal(ctx, spec.kind, error.status, error.text) from error
    except LlmUnreachable as error:
        raise _unreachable(endpoint, error) from error
    except LlmLineTooLong as error:
        raise _too_large(error.limit) from error


async def fetch_answer(ctx: NodeContext, endpoint: Endpoint | None, spec: JobSpec) -> dict[str, Any]:
    """An answer that is not streamed (embeddings), whole."""
    endpoint, url = _url(endpoint, spec.kind)
    try:
        text = await ctx.llm.post(url, upstream_body(spec.kind, spec.model, spec.body), endpoint.headers())
    except LlmHttpError as error:
        raise _refusal(ctx, spec.kind, error.status, error.text) from error
    except LlmUnreachable as error:
        raise _unreachable(endpoint, error) from error
    return _json_object(text, "the LLM's answer")


def _json_object(text: str, what: str) -> dict[str, Any]:
    """`text` as a JSON object; anything else is a malformed answer (`what` names the part of it)."""
    try:
        value = strict_json.loads(text)
    except (ValueError, RecursionError) as error:
        raise UpstreamError(f"{what} is not JSON: {text[:ERROR_TEXT_LIMIT]!r}", UpstreamErrorKind.MALFORMED) from error
    if not isinstance(value, dict):
        raise UpstreamError(f"{what} is not a JSON object: {text[:ERROR_TEXT_LIMIT]!r}", UpstreamErrorKind.MALFORMED)
    return value


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


@dataclass
class TokenBudget:
    """The request's max_tokens (or max_completion_tokens, the smaller), which the network holds an LLM to.

    The network counts choice 0's output fragments (`assembly.adds_output`: a chunk of text, of a tool
    call, of reasoning), one token each, or the LLM's own usage count where a chunk reports one on the
    way and only one choice was asked for, whichever is more.  A chunk that takes the count past the
    budget is not kept: the answer ends there, `length`, as an LLM that honours max_tokens ends it."""

    limit: int | None
    use_usage: bool = True
    used: int = 0

    @classmethod
    def of(cls, body: dict[str, Any]) -> TokenBudget:
        limits = [value for value in (body.get("max_tokens"), body.get("max_completion_tokens")) if _is_count(value)]
        return cls(limit=min(limits) if limits else None, use_usage=body.get("n") in (None, 1))

    def goes_past(self, kind: JobKind, chunk: dict[str, Any]) -> bool:
        """Count `chunk`; whether it is output beyond the budget."""
        if self.limit is None:
            return False
        output = adds_output(kind, chunk)
        used = self.used + output
        reported = (chunk.get("usage") or {}).get("completion_tokens")
        if self.use_usage and _is_count(reported):
            used = max(used, reported)
        if output and used > self.limit:
            return True
        self.used = used
        return False


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


SSE_FIELDS = frozenset({"data", "event", "id", "retry"})


async def _pieces(kind: JobKind, lines: AsyncIterator[bytes], limit: int, budget: TokenBudget) -> AsyncIterator[Piece]:
    """The pieces of a streamed answer, which must end with a finish_reason and `[DONE]`.  A chunk that
    carries only the assistant's role waits for the next, so that nothing leaves before the first token.
    Anything the network cannot read ends it: a line that is not server-sent events, an event over `limit`
    bytes, a chunk that is not a JSON object of OpenAI's shape, an error the LLM reports."""
    decoder = SSEDecoder()
    finished = False
    unfinished: set[int] = set()  # choices seen without their finish_reason, for the cut at max_tokens
    held: list[dict[str, Any]] = []
    event_bytes = 0  # of the event being read: its lines pile up in the decoder until a blank line
    async for raw in lines:
        if not raw.startswith(b":"):  # a comment is not kept, so not counted
            event_bytes += len(raw)
        if event_bytes > limit:
            raise _too_large(limit)
        line = raw.decode(errors="replace")
        _check_sse(line, raw)
        event = decoder.feed_line(line)
        if line.strip("\r\n") == "":
            event_bytes = 0
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
        chunk = _chunk(event.data)
        if budget.goes_past(kind, chunk):
            yield _piece(kind, [*held, finish_chunk(kind, sorted(unfinished) or [0], "length")])
            return
        held.append({key: value for key, value in chunk.items() if key not in _SET_BY_CLIENTS_NODE})
        for choice in chunk.get("choices") or []:
            (unfinished.discard if choice.get("finish_reason") is not None else unfinished.add)(choice.get("index", 0))
        finished = finished or has_finish_reason(chunk)
        if carries_output(chunk):
            yield _piece(kind, held)
            held = []
    raise UpstreamError("the LLM's stream broke off before [DONE]", UpstreamErrorKind.CONNECTION, retryable=True)


def _check_sse(line: str, raw: bytes) -> None:
    """A line of server-sent events: blank, a comment, or a field OpenAI-compatible servers send."""
    text = line.rstrip("\r\n")
    if text == "" or text.startswith(":"):
        return
    name, _, value = text.partition(":")
    if name in SSE_FIELDS:
        return
    if name == "error":  # llama.cpp's server reports a failure mid-stream this way
        raise UpstreamError(f"the LLM reported an error mid-answer: {value.strip()[:ERROR_TEXT_LIMIT]}", UpstreamErrorKind.SERVER_ERROR)
    raise UpstreamError(f"the LLM's answer is not an event stream; it sent {raw[:200]!r}", UpstreamErrorKind.MALFORMED)


def _chunk(data: str) -> dict[str, Any]:
    """One `data:` event as a chunk the network can read."""
    chunk = _json_object(data, "a chunk the LLM sent")
    if "error" in chunk:
        raise UpstreamError(
            f"the LLM reported an error mid-answer: {str(chunk['error'])[:ERROR_TEXT_LIMIT]}", UpstreamErrorKind.SERVER_ERROR
        )
    try:
        UpstreamChunk.model_validate(chunk)
    except ValidationError as error:
        raise UpstreamError(
            f"the LLM sent a chunk not of OpenAI's shape ({_first_problem(error)}): {data[:ERROR_TEXT_LIMIT]!r}", UpstreamErrorKind.MALFORMED
        ) from error
    return chunk


def _first_problem(error: ValidationError) -> str:
    problem = error.errors(include_url=False)[0]
    return f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError(
        f"the LLM sent an event over {limit} bytes (the node's --max-llm-event-bytes); the answer was cut there", UpstreamErrorKind.MALFORMED
    )


def _piece(kind: JobKind, chunks: list[dict[str, Any]]) -> Piece:
    usage = next((chunk["usage"] for chunk in reversed(chunks) if chunk.get("usage") is not None), None)
    return Piece(
        chunks=chunks,
        text="".join(choice_text(kind, chunk) for chunk in chunks),
        finish_reason=next((reason for chunk in chunks if (reason := finish_reason_of(chunk)) is not None), None),
        usage=Usage.model_validate(usage) if isinstance(usage, dict) else None,
    )
