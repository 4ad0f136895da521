"""The aiohttp host: turns HTTP requests into handler events and their results into responses or SSE."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from emulator import signing
from emulator.directory import Directory
from handlers import api_keys, chat, driver, jobs, node
from handlers.api_keys import Caller
from handlers.context import NodeContext, log
from handlers.errors import HandlerError
from schemas.jobs import ErrorBody, ErrorResponse, JobRequest
from schemas.messages import Envelope, Process
from schemas.openai_api import ChatCompletionRequest
from schemas.sse import encode_comment, encode_event

CONTEXT = web.AppKey("context", NodeContext)
ADMIN_TOKEN = web.AppKey("admin_token", str)
DIRECTORY = web.AppKey("directory", Directory)
REPLAY_GUARD = web.AppKey("replay_guard", signing.ReplayGuard)

MAX_BODY_BYTES = 1024 * 1024
SSE_RETRY_MS = 2000
SSE_HEARTBEAT_S = 15.0
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, details: Any = None, kind: str = "invalid_request_error") -> web.Response:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind if status < 500 else "server_error", code=code, details=details))
    return web.json_response(body.model_dump(exclude_none=True), status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HandlerError as error:
        response = error_response(error.status, error.code, error.message, error.details)
        if error.retry_after is not None:
            response.headers["Retry-After"] = f"{error.retry_after:.0f}"
        return response
    except ValidationError as error:
        details = error.errors(include_url=False, include_context=False, include_input=False)
        return error_response(422, "invalid_fields", "the request does not match its schema", details)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, error.reason.lower().replace(" ", "_"), error.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "the node failed to handle this request; see its log")


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise HandlerError(400, "malformed_json", f"the body is not valid JSON: {error}") from error


def reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json(), status=status, content_type="application/json")


def caller_of(request: web.Request) -> Caller:
    authorization = request.headers.get("Authorization", "")
    bearer = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else None
    return Caller(bearer=bearer or None, address=str(request.remote))


async def client_of(request: web.Request) -> str:
    """The HTTP client, by API key where the node has keys; 401 where it requires one and got none."""
    return await api_keys.client_identity(request.app[CONTEXT], caller_of(request))


# --- client API -----------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node": request.app[CONTEXT].name})


async def submit_job(request: web.Request) -> web.Response:
    job_request = JobRequest.model_validate(await read_json(request))
    key = request.headers.get("Idempotency-Key")
    created = await driver.submit(request.app[CONTEXT], caller_of(request), job_request, key)
    return reply(created, status=202)


async def cancel_job(request: web.Request) -> web.Response:
    await client_of(request)
    ctx = request.app[CONTEXT]
    job_id = request.match_info["job_id"]
    await driver.cancel(ctx, job_id)
    return reply(await jobs.record(ctx, job_id))


async def get_job(request: web.Request) -> web.Response:
    await client_of(request)
    return reply(await jobs.record(request.app[CONTEXT], request.match_info["job_id"], with_queue_position=True))


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    if raw is None:
        return -1
    try:
        return int(raw)
    except ValueError as error:
        raise HandlerError(400, "bad_last_event_id", f"Last-Event-ID must be a sequence number, got {raw!r}") from error


async def job_events(request: web.Request) -> web.StreamResponse:
    await client_of(request)
    ctx = request.app[CONTEXT]
    job_id = request.match_info["job_id"]
    after = _last_event_id(request)
    await jobs.record(ctx, job_id)  # 404 before the stream starts
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        await response.write(encode_comment(f"job {job_id}") + f"retry: {SSE_RETRY_MS}\n\n".encode())
        async for update in jobs.follow(ctx, job_id, after, idle=SSE_HEARTBEAT_S):
            if update is None:
                await response.write(encode_comment("heartbeat"))
            else:
                await response.write(encode_event(update.model_dump_json(exclude_none=True), event="job_update", event_id=str(update.seq)))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the reader left; the job goes on, and a reader may come back with Last-Event-ID
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    completion_request = ChatCompletionRequest.model_validate(await read_json(request))
    job_id, created = await chat.start(ctx, caller_of(request), completion_request)
    if not completion_request.stream:
        return reply(await chat.complete(ctx, job_id, created, completion_request))
    response = web.StreamResponse(headers=SSE_HEADERS)
    finished = False
    try:
        await response.prepare(request)
        async for payload in chat.stream(ctx, job_id, created, completion_request):
            if payload is None:
                await response.write(encode_comment("heartbeat"))
            else:
                await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
        finished = True
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        # An OpenAI stream cannot be resumed: a client that hangs up has given up on the job.
        if not finished:
            await _cancel_quietly(ctx, job_id)
    except asyncio.CancelledError:
        if not finished:
            await asyncio.shield(_cancel_quietly(ctx, job_id))
        raise
    return response


async def _cancel_quietly(ctx: NodeContext, job_id: str) -> None:
    try:
        await driver.cancel(ctx, job_id)
    except HandlerError:
        pass  # it ended meanwhile


async def list_models(request: web.Request) -> web.Response:
    await client_of(request)
    return reply(await chat.models(request.app[CONTEXT]))


# --- nodes and admin ---------------------------------------------------------------------


async def node_message(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    raw = await request.read()
    envelope = Envelope.model_validate(await read_json(request))
    peer = request.app[DIRECTORY].peer(envelope.source.node)
    signing.authenticate(
        peer.public_key if peer else None, envelope.source.node, raw, request.headers.get(signing.SIGNATURE_HEADER),
        request.app[REPLAY_GUARD], envelope.sent_at, envelope.nonce,
    )
    return reply(await node.receive(ctx, envelope))


async def admin_message(request: web.Request) -> web.Response:
    presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(presented.encode(), request.app[ADMIN_TOKEN].encode()):
        raise HandlerError(401, "admin_token_required", "admin commands need this node's admin token (Authorization: Bearer ...)")
    target = request.match_info.get("process")
    if target is not None and target not in node.PROCESSES:
        raise HandlerError(404, "unknown_process", f"no process {target!r}; processes: {', '.join(node.PROCESSES)}")
    process: Process | None = target  # type: ignore[assignment]
    return reply(await node.admin(request.app[CONTEXT], process, await read_json(request)))


def create_app(ctx: NodeContext, admin_token: str, directory: Directory) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = ctx
    app[ADMIN_TOKEN] = admin_token
    app[DIRECTORY] = directory
    app[REPLAY_GUARD] = signing.ReplayGuard()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/jobs", submit_job)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_delete("/jobs/{job_id}", cancel_job)
    app.router.add_get("/jobs/{job_id}/events", job_events)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/node/message", node_message)
    app.router.add_post("/admin", admin_message)
    app.router.add_post("/admin/{process}", admin_message)
    return app
