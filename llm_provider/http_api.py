"""A node's HTTP API, independent of the web framework: a request in, a reply out.

The aiohttp host (`llm_provider.http_app`) and the ASGI host (`llm_provider.asgi`) only turn their
framework's request into an `HttpRequest` and write the `JsonReply`, `ContentReply` or
`StreamReply` back.  The web page's routes are in `llm_provider.ui_api`.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from handlers import accounting, admin, api_keys, driver, jobs, metrics, node, strict_json, tracing, v1
from handlers.api_keys import Caller
from handlers.context import NodeContext, log
from handlers.errors import ErrorCode, HandlerError
from llm_provider import openapi, signing
from llm_provider.directory import Directory
from llm_provider.openapi import Auth, Operation, event_stream, json_body, operation, text
from schemas.jobs import ErrorBody, ErrorResponse, JobCreated, JobRecord, JobUpdate
from schemas.messages import ALL_PROCESSES, MESSAGE_TYPES, Envelope, MessageReply, Process, name_of
from schemas.node_api import Health
from schemas.openai_api import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    JobKind,
    JobOrder,
    JobRequest,
    OpenAiModelList,
)
from schemas.sse import encode_comment, encode_event
from schemas.usage import UsageQuery, UsageReport
from store.errors import StorageUnavailable

ENVELOPE_ALLOWANCE_BYTES = 64 * 1024  # a node message carries a client's body (up to the limit) and its envelope
SSE_RETRY_MS = 2000
SSE_HEARTBEAT_S = 15.0
STORAGE_RETRY_AFTER_S = 1.0  # a refused write is worth trying again soon: most storage faults are brief
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class HttpRequest:
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    remote: str
    params: Mapping[str, str] = field(default_factory=dict)  # from the path
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass
class JsonReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ContentReply:
    """A body of another type than JSON: the web page's files, a redirect, the metrics' text."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamReply:
    """An event stream; `abandoned` runs if the client hangs up before the stream ends."""

    chunks: AsyncIterator[bytes]
    abandoned: Callable[[], Awaitable[None]] | None = None


Reply = JsonReply | ContentReply | StreamReply


@dataclass
class NodeApi:
    """What the routes need: the handlers' context, and what a host checks before them."""

    ctx: NodeContext
    admin_token: str
    directory: Directory
    replay_guard: signing.ReplayGuard
    metrics_token: str  # read-only: lets a scraper outside loopback read /metrics, and nothing else

    @property
    def max_body_bytes(self) -> int:
        """A client's body may be this large."""
        return self.ctx.settings.max_body_bytes

    @property
    def max_message_bytes(self) -> int:
        """What a host reads at most: a node message, which carries a client's body in its envelope."""
        return self.ctx.settings.max_body_bytes + ENVELOPE_ALLOWANCE_BYTES


Route = Callable[[NodeApi, HttpRequest], Awaitable[Reply]]


# --- replies ---------------------------------------------------------------------------------


def json_reply(model: BaseModel, status: int = 200) -> JsonReply:
    return JsonReply(status, model.model_dump_json().encode())


def error_reply(status: int, code: str, message: str, details: Any = None, retry_after: float | None = None) -> JsonReply:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, code=code, details=details))
    reply = JsonReply(status, body.model_dump_json(exclude_none=True).encode())
    if retry_after is not None:
        reply.headers["Retry-After"] = f"{retry_after:.0f}"
    return reply


async def answer(route: Route, api: NodeApi, request: HttpRequest) -> Reply:
    """Run a route; every refusal becomes the one JSON error shape."""
    try:
        return await route(api, request)
    except HandlerError as error:
        if error.body is not None:
            return JsonReply(error.status, json.dumps(error.body).encode())
        return error_reply(error.status, error.code, error.message, error.details, error.retry_after)
    except StorageUnavailable as error:
        # Nothing of the request was stored; what the node had accepted before is kept, and goes on once the database does.
        message = f"{api.ctx.name} cannot store anything just now (its database says: {error}); nothing of this request was kept"
        return error_reply(503, "storage_unavailable", message, retry_after=STORAGE_RETRY_AFTER_S)
    except ValidationError as error:
        details = error.errors(include_url=False, include_context=False, include_input=False)
        return error_reply(422, "invalid_fields", "the request does not match its schema", details)
    except Exception:
        log.exception("a request failed")
        return error_reply(500, "internal_error", "the node failed to handle this request; see its log")


def too_large(limit: int) -> JsonReply:
    return error_reply(413, "body_too_large", f"request body over {limit} bytes")


def not_found(method: str, path: str, allowed: list[str]) -> JsonReply:
    if allowed:
        return error_reply(405, "method_not_allowed", f"{method} is not allowed on {path}; use {', '.join(allowed)}")
    return error_reply(404, "not_found", f"no route {path}")


# --- request parts ------------------------------------------------------------------------------


def read_json(request: HttpRequest, limit: int) -> Any:
    if len(request.body) > limit:
        raise HandlerError(413, ErrorCode.BODY_TOO_LARGE, f"request body over {limit} bytes")
    try:
        return strict_json.loads(request.body)
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, not JSON by the RFC
        raise HandlerError(400, ErrorCode.MALFORMED_JSON, f"the body is not valid JSON: {error}") from error


def bearer_of(request: HttpRequest) -> str | None:
    authorization = request.headers.get("authorization", "")
    if not authorization.startswith("Bearer "):
        return None
    return authorization.removeprefix("Bearer ").strip() or None


def caller_of(request: HttpRequest) -> Caller:
    return Caller(bearer=bearer_of(request), address=request.remote, traceparent=request.headers.get(tracing.HEADER))


def _require_admin(api: NodeApi, request: HttpRequest) -> None:
    presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(presented.encode(), api.admin_token.encode()):
        raise HandlerError(401, ErrorCode.ADMIN_TOKEN_REQUIRED, "admin commands need this node's admin token (Authorization: Bearer ...)")


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _last_event_id(request: HttpRequest) -> int:
    raw = request.headers.get("last-event-id") or request.query.get("after")
    if raw is None:
        return -1
    try:
        return int(raw)
    except ValueError as error:
        raise HandlerError(400, ErrorCode.BAD_LAST_EVENT_ID, f"Last-Event-ID must be a sequence number, got {raw!r}") from error


# --- client routes --------------------------------------------------------------------------------


@operation(Operation("Whether the node is up, and which of its processes answered", {200: json_body(Health)}))
async def healthz(api: NodeApi, request: HttpRequest) -> Reply:
    return json_reply(Health(node=api.ctx.name, worker=api.ctx.worker))


@operation(Operation(
    "Submit a job: a chat completion's body, or {model, prompt}", {202: json_body(JobCreated, "stored; read it at events_url")},
    request=json_body(JobRequest), headers=("Idempotency-Key", "traceparent"), auth=(Auth.API_KEY,),
))
async def submit_job(api: NodeApi, request: HttpRequest) -> Reply:
    return await submit_as(api, request, caller_of(request))


@operation(Operation("A job's record", {200: json_body(JobRecord)}, auth=(Auth.API_KEY,)))
async def get_job(api: NodeApi, request: HttpRequest) -> Reply:
    await api_keys.client_identity(api.ctx, caller_of(request))
    return await job_record(api, request)


@operation(Operation("Cancel a job end to end", {200: json_body(JobRecord, "the cancelled job's record")}, auth=(Auth.API_KEY,)))
async def cancel_job(api: NodeApi, request: HttpRequest) -> Reply:
    await api_keys.client_identity(api.ctx, caller_of(request))
    return await cancel(api, request)


@operation(Operation(
    "A job's updates as Server-Sent Events, replayed from the store, then live",
    {200: event_stream(JobUpdate, "`event: job_update`, `id: <seq>`, `data:` one update; the last has is_final")},
    headers=("Last-Event-ID",), auth=(Auth.API_KEY,),
))
async def job_events(api: NodeApi, request: HttpRequest) -> Reply:
    await api_keys.client_identity(api.ctx, caller_of(request))
    return await job_stream(api, request)


# The jobs API behind its access check, which is the caller's: API keys here, the page's own in `llm_provider.ui_api`.


async def submit_as(api: NodeApi, request: HttpRequest, caller: Caller) -> Reply:
    order = JobOrder.read(JobKind.CHAT, read_json(request, api.max_body_bytes), jobs_api=True)
    created = await driver.submit(api.ctx, caller, order, request.headers.get("idempotency-key"))
    return json_reply(created, status=202)


async def job_record(api: NodeApi, request: HttpRequest) -> Reply:
    return json_reply(await jobs.record(api.ctx, request.params["job_id"], with_queue_position=True))


async def cancel(api: NodeApi, request: HttpRequest) -> Reply:
    await driver.cancel(api.ctx, request.params["job_id"])
    return json_reply(await jobs.record(api.ctx, request.params["job_id"]))


async def job_stream(api: NodeApi, request: HttpRequest) -> Reply:
    job_id, after = request.params["job_id"], _last_event_id(request)
    await jobs.record(api.ctx, job_id)  # 404 before the stream starts

    async def chunks() -> AsyncIterator[bytes]:
        with _open_stream(api):
            yield encode_comment(f"job {job_id}") + f"retry: {SSE_RETRY_MS}\n\n".encode()
            async for update in jobs.follow(api.ctx, job_id, after, idle=SSE_HEARTBEAT_S):
                if update is None:
                    yield encode_comment("heartbeat")
                else:
                    yield encode_event(update.model_dump_json(exclude_none=True), event="job_update", event_id=str(update.seq))

    # A reader that leaves changes nothing: the job goes on, and the reader may come back with Last-Event-ID.
    return StreamReply(chunks())


_WHOLE = "the whole answer (not streamed)"
_STREAMED = "`data:` chunks as the LLM streamed them, then `data: [DONE]` (stream: true)"
_OPENAI_OPERATIONS = {
    JobKind.CHAT: Operation(
        "OpenAI chat completions, as a job",
        {200: [json_body(ChatCompletion, _WHOLE), event_stream(ChatCompletionChunk, _STREAMED)]},
        request=json_body(ChatCompletionRequest), headers=("Idempotency-Key", "traceparent"), auth=(Auth.API_KEY,),
    ),
    JobKind.COMPLETION: Operation(
        "OpenAI (legacy) completions, as a job",
        {200: [json_body(ChatCompletion, _WHOLE), event_stream(ChatCompletionChunk, _STREAMED)]},
        request=json_body(CompletionRequest), headers=("Idempotency-Key", "traceparent"), auth=(Auth.API_KEY,),
    ),
    JobKind.EMBEDDING: Operation(
        "OpenAI embeddings, as a job", {200: json_body(EmbeddingList)}, request=json_body(EmbeddingRequest),
        headers=("Idempotency-Key", "traceparent"), auth=(Auth.API_KEY,),
    ),
}


def openai_endpoint(kind: JobKind) -> Route:
    """`POST /v1/<kind>`: the request runs as a job; its answer streams back, or comes whole."""

    @operation(_OPENAI_OPERATIONS[kind])
    async def answer_request(api: NodeApi, request: HttpRequest) -> Reply:
        order = JobOrder.read(kind, read_json(request, api.max_body_bytes))
        answer = await v1.start(api.ctx, caller_of(request), order, request.headers.get("idempotency-key"))
        if not (order.envelope.stream and kind.streams):
            return JsonReply(200, json.dumps(await v1.complete(api.ctx, answer)).encode())
        # The status waits for the first chunk, so that the LLM's refusal reaches the client as its own.
        first = await v1.first_update(api.ctx, answer, api.ctx.settings.status_hold)
        if first is not None and first.is_final and first.status != "succeeded":
            raise v1.refusal(first)
        return StreamReply(_openai_stream(api, answer, first), _cancel_on_hang_up(api, answer.job_id))

    return answer_request


async def _openai_stream(api: NodeApi, answer: v1.Answer, first: JobUpdate | None) -> AsyncIterator[bytes]:
    """One write for the events of one update (a write is a system call, which on loopback costs more than the rest)."""
    with _open_stream(api):
        async for events in v1.stream(api.ctx, answer, first):
            if events is None:
                yield encode_comment("heartbeat")
                continue
            data = b"".join(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n" for payload in events.payloads)
            if events.last:
                yield data + _DONE
                return
            yield data
        yield _DONE  # the job was followed no further (the node is stopping) before its final update


_DONE = b"data: [DONE]\n\n"


def _open_stream(api: NodeApi) -> AbstractContextManager[Any]:
    """Counts the stream as open while its body is being sent."""
    return metrics.OPEN_STREAMS.labels(api.ctx.name).track_inprogress()


def _cancel_on_hang_up(api: NodeApi, job_id: str) -> Callable[[], Awaitable[None]]:
    async def abandoned() -> None:
        # An OpenAI stream cannot be resumed: a client that hangs up has given up on the job.
        try:
            await driver.cancel(api.ctx, job_id)
        except HandlerError:
            pass  # it ended meanwhile

    return abandoned


@operation(Operation("Models this node can reach", {200: json_body(OpenAiModelList)}, auth=(Auth.API_KEY,)))
async def list_models(api: NodeApi, request: HttpRequest) -> Reply:
    await api_keys.client_identity(api.ctx, caller_of(request))
    return json_reply(await v1.models(api.ctx))


# --- nodes and admin -------------------------------------------------------------------------------


@operation(Operation(
    "A message from another node, signed by it", {200: json_body(MessageReply, "the receiving process's answer")},
    request=json_body(Envelope), headers=(signing.SIGNATURE_HEADER, "traceparent"),
))
async def node_message(api: NodeApi, request: HttpRequest) -> Reply:
    raw = read_json(request, api.max_message_bytes)
    kind = _message_type(raw)
    try:
        envelope = Envelope.model_validate(raw)
        if envelope.destination != api.ctx.name:
            raise HandlerError(401, ErrorCode.WRONG_DESTINATION, f"the envelope is for {envelope.destination}, not {api.ctx.name}")
        peer = api.directory.peer(envelope.source.node)
        await signing.authenticate(
            peer.public_key if peer else None, envelope.source.node, request.body,
            request.headers.get(signing.SIGNATURE_HEADER.lower()), api.replay_guard, envelope.sent_at, envelope.nonce,
        )
        metrics.MESSAGE_DELAY.labels(api.ctx.name, kind).observe(max(time.time() - envelope.sent_at, 0.0))
        reply = json_reply(await node.receive(api.ctx, envelope, request.headers.get(tracing.HEADER)))
    except HandlerError as error:
        metrics.MESSAGES_REFUSED.labels(api.ctx.name, kind, error.code).inc()
        raise
    except ValidationError:
        metrics.MESSAGES_REFUSED.labels(api.ctx.name, kind, "invalid_fields").inc()
        raise
    metrics.MESSAGES_RECEIVED.labels(api.ctx.name, kind).inc()
    return reply


def _message_type(raw: Any) -> str:
    """The type of the message in an envelope, for the metrics; "unknown" for anything but a message type we know
    (the sender may not be authenticated yet: what it sends must not grow the metrics without bound)."""
    name = name_of(raw.get("body")) if isinstance(raw, dict) else None
    return name if name in MESSAGE_TYPES else "unknown"


@operation(Operation(
    "An admin command from the node's owner", {200: json_body(MessageReply)},
    request=json_body(
        admin.AdminMessage, 'a message as {"type": NAME, ...fields}, or in the seed\'s form: "StartRouter", {"SetRouter": {...}}'
    ),
    auth=(Auth.ADMIN,),
))
async def admin_message(api: NodeApi, request: HttpRequest) -> Reply:
    _require_admin(api, request)
    target = request.params.get("process")
    if target is not None and target not in ALL_PROCESSES:
        raise HandlerError(404, ErrorCode.UNKNOWN_PROCESS, f"no process {target!r}; processes: {', '.join(ALL_PROCESSES)}")
    process: Process | None = target  # type: ignore[assignment]
    return json_reply(await admin.run(api.ctx, process, read_json(request, api.max_body_bytes)))


@operation(Operation(
    "The node's metrics, in Prometheus' text format", {200: text("Prometheus text exposition format 0.0.4")},
    auth=(Auth.METRICS,),
    description="Open on loopback; from elsewhere only with the node's read-only metrics token (never the admin token).",
))
async def node_metrics(api: NodeApi, request: HttpRequest) -> Reply:
    require_reader(api, request)
    return ContentReply(200, await metrics.exposition(api.ctx), metrics.CONTENT_TYPE)


def require_reader(api: NodeApi, request: HttpRequest) -> None:
    """What only watches the node (metrics) is open on loopback; from elsewhere it takes the read-only metrics
    token.  Never the admin token: a scraper's credentials must not send admin messages, nor stand in for them."""
    if is_loopback(request.remote):
        return
    presented = bearer_of(request) or ""
    if not hmac.compare_digest(presented.encode(), api.metrics_token.encode()):
        raise HandlerError(
            401, ErrorCode.METRICS_TOKEN_REQUIRED,
            "open on loopback only; from elsewhere this needs the node's metrics token (Authorization: Bearer ...)",
        )


@operation(Operation(
    "Usage of the jobs this node ended, per UTC day, role, client and model; and its budgets", {200: json_body(UsageReport)},
    query=UsageQuery, auth=(Auth.ADMIN,),
))
async def usage_report(api: NodeApi, request: HttpRequest) -> Reply:
    _require_admin(api, request)
    return json_reply(await accounting.report(api.ctx, UsageQuery.model_validate(dict(request.query))))


@operation(Operation("This document: the node's HTTP API, OpenAPI 3.1", {200: text("the OpenAPI document", "application/json")}))
async def openapi_document(api: NodeApi, request: HttpRequest) -> Reply:
    return JsonReply(200, _openapi_bytes())


@functools.cache
def _openapi_bytes() -> bytes:
    from llm_provider import routes  # every route the node serves, its web page's too; that module imports this one

    return json.dumps(openapi.document(routes.ROUTES), separators=(",", ":")).encode()


ROUTES: list[tuple[str, str, Route]] = [
    ("GET", "/healthz", healthz),
    ("POST", "/jobs", submit_job),
    ("GET", "/jobs/{job_id}", get_job),
    ("DELETE", "/jobs/{job_id}", cancel_job),
    ("GET", "/jobs/{job_id}/events", job_events),
    ("POST", "/v1/chat/completions", openai_endpoint(JobKind.CHAT)),
    ("POST", "/v1/completions", openai_endpoint(JobKind.COMPLETION)),
    ("POST", "/v1/embeddings", openai_endpoint(JobKind.EMBEDDING)),
    ("GET", "/v1/models", list_models),
    ("POST", "/node/message", node_message),
    ("POST", "/admin", admin_message),
    ("POST", "/admin/{process}", admin_message),
    ("GET", "/metrics", node_metrics),
    ("GET", "/usage", usage_report),
    ("GET", "/openapi.json", openapi_document),
]


def path_pattern(template: str) -> re.Pattern[str]:
    """`/jobs/{job_id}` → a regex with a named group per parameter."""
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$")
