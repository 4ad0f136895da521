"""The ASGI host of a node: the same routes as the aiohttp host, for uvicorn, hypercorn and the like.

    LLMP_NAME=fake2.dev LLMP_HOME=~/.llm-provider/fake2.dev LLMP_PORT=8082 \\
    LLMP_DIRECTORY=~/.llm-provider/directory.json uvicorn 'llm_provider.asgi:create_app' --factory --port 8082

The node comes from the environment: LLMP_NAME, LLMP_HOME, LLMP_PORT (where the server listens,
for the node's note in its home), LLMP_HOST, LLMP_DIRECTORY, LLMP_DATABASE_URL, LLMP_SHARED=1 when
several server processes (workers) serve the node from one database (their metrics are then counted
together: `llm_provider.worker_metrics`), and LLMP_LOG_FORMAT=json to log JSON lines into the node's
home (otherwise the server's own logging applies).  Its limits come from LLMP_* variables
(LLMP_JOB_TIMEOUT, LLMP_MAX_ATTEMPTS, ...) and the TOML file LLMP_CONFIG names, as `emulator node`
reads them (`llm_provider.settings`).
The node starts and stops with the server's lifespan.
"""

from __future__ import annotations

import os

from llm_provider import worker_metrics

if os.environ.get("LLMP_SHARED") == "1":
    worker_metrics.count_together()  # before anything below imports prometheus-client: every worker counts for the node

import asyncio  # noqa: E402
from collections.abc import Awaitable, Callable, MutableMapping  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import parse_qsl  # noqa: E402

from llm_provider import http_api, routes  # noqa: E402
from llm_provider.http_api import ContentReply, HttpRequest, JsonReply, NodeApi, StreamReply  # noqa: E402
from llm_provider.log_format import LogFormat  # noqa: E402
from llm_provider.node import NodeOptions, NodeRuntime, configure_logging  # noqa: E402

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ROUTES = [(method, http_api.path_pattern(path), route) for method, path, route in routes.ROUTES]


class BodyTooLarge(Exception):
    pass


class NodeAsgi:
    """An ASGI application serving one node."""

    def __init__(self, options: NodeOptions) -> None:
        self.runtime = NodeRuntime(options)
        self.api: NodeApi | None = None
        if options.log_format is LogFormat.JSON:
            configure_logging(options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.api = await self.runtime.start()
                    self.runtime.note_in_home()
                except Exception as error:
                    await send({"type": "lifespan.startup.failed", "message": repr(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.runtime.drain()
                self.runtime.close_streams()
                await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.api is not None, "the ASGI server must run the lifespan protocol"
        method, path = scope["method"], scope["path"]
        matches = [(m, found, route) for m, pattern, route in _ROUTES if (found := pattern.match(path))]
        chosen = next(((found, route) for m, found, route in matches if m == method), None)
        if chosen is None:
            await _send_json(send, http_api.not_found(method, path, sorted({m for m, _, _ in matches})))
            return
        try:
            body = await _read_body(receive, self.api.max_message_bytes)
        except BodyTooLarge:
            await _send_json(send, http_api.too_large(self.api.max_message_bytes))
            return
        request = HttpRequest(
            headers={name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]},
            body=body,
            remote=(scope.get("client") or ("unknown", 0))[0],
            params=chosen[0].groupdict(),
            query=dict(parse_qsl(scope.get("query_string", b"").decode())),
        )
        reply = await http_api.answer(chosen[1], self.api, request)
        if isinstance(reply, JsonReply):
            await _send_json(send, reply)
        elif isinstance(reply, ContentReply):
            await _send_body(send, reply.status, reply.body, {"content-type": reply.content_type, **reply.headers})
        else:
            await _stream(reply, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


async def _send_json(send: Send, reply: JsonReply) -> None:
    await _send_body(send, reply.status, reply.body, {"content-type": "application/json", **reply.headers})


async def _send_body(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    headers = {"content-length": str(len(body)), **headers}
    await send({"type": "http.response.start", "status": status, "headers": _headers(headers)})
    await send({"type": "http.response.body", "body": body})


async def _stream(reply: StreamReply, receive: Receive, send: Send) -> None:
    """Send chunks as they come; a client that hangs up stops the stream (and runs `abandoned`)."""
    await send({"type": "http.response.start", "status": 200, "headers": _headers(http_api.SSE_HEADERS)})

    async def pump() -> None:
        async for chunk in reply.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def hang_up() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    streaming, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not streaming.done():
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
            if reply.abandoned is not None:
                await asyncio.shield(reply.abandoned())
        elif streaming.exception() is not None and reply.abandoned is not None:
            await reply.abandoned()  # the send failed: the client is gone
        await reply.chunks.aclose()  # type: ignore[attr-defined]


def create_app(options: NodeOptions | None = None) -> NodeAsgi:
    """The ASGI application factory (`uvicorn 'llm_provider.asgi:create_app' --factory`)."""
    return NodeAsgi(options or NodeOptions.from_environment())
