"""The aiohttp host of a node's HTTP API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from llm_provider import http_api, routes
from llm_provider.http_api import ContentReply, HttpRequest, JsonReply, NodeApi, Reply, Route

API = web.AppKey("api", NodeApi)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def unknown_routes_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        allowed = sorted(getattr(error, "allowed_methods", ()) or ())
        return await _write(request, http_api.not_found(request.method, request.path, allowed))


def _handler(route: Route) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return await _write(request, http_api.too_large(request.app[API].max_message_bytes))
        http_request = HttpRequest(
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
            remote=str(request.remote),
            params=dict(request.match_info),
            query=dict(request.query),
        )
        # A client that hangs up cancels this handler (the runner's handler_cancellation): the request's own work
        # completes all the same; only a stream being sent stops, and a streamed /v1 answer's job is cancelled.
        reply = await asyncio.shield(http_api.answer(route, request.app[API], http_request))
        return await _write(request, reply)

    return handle


async def _write(request: web.Request, reply: Reply) -> web.StreamResponse:
    if isinstance(reply, JsonReply):
        return web.Response(body=reply.body, status=reply.status, headers=reply.headers, content_type="application/json")
    if isinstance(reply, ContentReply):
        return web.Response(body=reply.body, status=reply.status, headers={**reply.headers, "Content-Type": reply.content_type})
    response = web.StreamResponse(headers=http_api.SSE_HEADERS)
    ended = False
    try:
        await response.prepare(request)
        async for chunk in reply.chunks:
            await response.write(chunk)
        ended = True
        await response.write_eof()
    except ConnectionResetError:
        if not ended and reply.abandoned is not None:
            await reply.abandoned()
    except asyncio.CancelledError:
        if not ended and reply.abandoned is not None:
            await asyncio.shield(reply.abandoned())
        raise
    finally:
        await reply.chunks.aclose()  # type: ignore[attr-defined]
    return response


def create_runner(api: NodeApi, access_log: logging.Logger | None) -> web.AppRunner:
    """The runner of a node's app: a client that hangs up mid-stream is noticed at once, not at the next write."""
    return web.AppRunner(create_app(api), access_log=access_log, handler_cancellation=True)


def create_app(api: NodeApi) -> web.Application:
    app = web.Application(middlewares=[unknown_routes_as_json], client_max_size=api.max_message_bytes)
    app[API] = api
    for method, path, route in routes.ROUTES:
        app.router.add_route(method, path, _handler(route))
    return app
