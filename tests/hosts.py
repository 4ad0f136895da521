"""Serving in this process on loopback: a node under each web host (aiohttp, and the ASGI application under
uvicorn and hypercorn), and any aiohttp application (the fake upstreams) on a free port."""

from __future__ import annotations

import asyncio
import io
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from llm_provider.asgi import NodeAsgi
from llm_provider.node import Node, NodeOptions, NodeRuntime

HOSTS = ["aiohttp", "uvicorn", "hypercorn"]
STOP_S = 60.0  # the graceful timeout, the node's drain (up to its grace) and its stop, with room to spare


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve `app` on a free loopback port: its runner (clean it up when done) and the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def _listening_socket(port: int) -> socket.socket:
    """Bound and listening before the server starts: clients may connect at once, and wait in the backlog."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY on accepted sockets
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def serve(host: str, options: NodeOptions) -> AsyncIterator[NodeRuntime]:
    if host == "aiohttp":
        async with Node(options) as node:
            yield node
        return
    app = NodeAsgi(options)
    sock = _listening_socket(options.port)
    started = asyncio.Event()
    stop = asyncio.Event()
    lifespan_app = _signal_startup(app, started)
    if host == "uvicorn":
        import uvicorn

        # uvicorn waits for open responses before the lifespan shutdown that ends the node's event streams;
        # hypercorn gives them 3 s (its graceful_timeout), and so does this test host.
        server = uvicorn.Server(uvicorn.Config(lifespan_app, lifespan="on", log_level="warning", timeout_graceful_shutdown=3))
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
    else:
        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn closes the descriptor it is given
        config.loglevel = "WARNING"
        task = asyncio.ensure_future(hypercorn_serve(lifespan_app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    await asyncio.wait({task, asyncio.ensure_future(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # the server failed to start: raise its error
    try:
        yield app.runtime
    finally:
        if host == "uvicorn":
            server.should_exit = True
        stop.set()
        try:
            async with asyncio.timeout(STOP_S):
                await task
        except TimeoutError:
            raise AssertionError(f"{host} did not stop within {STOP_S} s: {_pending_tasks()}") from None
        finally:
            sock.close()


def _pending_tasks() -> str:
    """What a server that does not stop is waiting for: every unfinished task, with where it waits."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=6, file=out)
    return out.getvalue()


def _signal_startup(app: NodeAsgi, started: asyncio.Event) -> NodeAsgi:
    """Wrap the app so the test knows when its lifespan startup is complete."""

    class Signalling(NodeAsgi):
        def __init__(self) -> None:
            self.__dict__ = app.__dict__

        async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
            if scope["type"] != "lifespan":
                return await app(scope, receive, send)

            async def sending(message):  # type: ignore[no-untyped-def]
                await send(message)
                if message["type"] == "lifespan.startup.complete":
                    started.set()

            return await app(scope, receive, sending)

    return Signalling()
