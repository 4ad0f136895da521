"""One node: store, transport and handlers behind the aiohttp host."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel

from handlers import liveness, metrics, news, upkeep
from handlers import node as node_handlers
from handlers.context import NodeContext
from handlers.settings import Settings
from llm_provider import logs, settings, signing
from llm_provider.directory import Directory, Peer
from llm_provider.homes import Home, home_from_environment
from llm_provider.http_api import NodeApi
from llm_provider.http_app import create_runner
from llm_provider.llm_client import AiohttpLlmClient
from llm_provider.log_format import LogFormat
from llm_provider.signing import NodeKey
from llm_provider.transport import HttpTransport
from schemas.messages import Message, Process, Source
from store.database import Store, sqlite_url


@dataclass
class NodeOptions:
    name: str
    port: int
    home: Path
    host: str = "127.0.0.1"
    directory_file: Path | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    database_url: str | None = None
    shared: bool = False  # other processes serve this node from the same database (workers, replicas)
    settings: Settings = field(default_factory=Settings)
    verbose: bool = False
    log_format: LogFormat = LogFormat.TEXT

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> NodeOptions:
        """For hosts that start a node from a factory (ASGI servers, gunicorn): LLMP_* variables, and the
        settings file LLMP_CONFIG names (`llm_provider.settings`)."""
        name = environ["LLMP_NAME"]
        directory = environ.get("LLMP_DIRECTORY")
        return cls(
            name=name,
            port=int(environ.get("LLMP_PORT", "8081")),
            host=environ.get("LLMP_HOST", "127.0.0.1"),
            home=home_from_environment(environ),
            directory_file=Path(directory).expanduser() if directory else None,
            database_url=environ.get("LLMP_DATABASE_URL"),
            shared=environ.get("LLMP_SHARED", "0") == "1",
            settings=settings.load(environ=environ),
            log_format=LogFormat(environ.get("LLMP_LOG_FORMAT", LogFormat.TEXT)),
        )


def configure_logging(options: NodeOptions) -> None:
    logs.configure(Home(options.home), options.name, options.verbose, options.log_format)


class NodeRuntime:
    """A node without its web host: the store, the transport, the handlers' context and upkeep."""

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.home = Home(options.home)
        self.url = f"http://{options.host}:{options.port}"
        self.ctx: NodeContext | None = None
        self.public_key: str | None = None
        self._transport: HttpTransport | None = None

    async def start(self) -> NodeApi:
        options = self.options
        token = self.home.admin_token()
        key = NodeKey.load_or_create(self.home.key_file)
        self.public_key = key.public_key
        store = Store.open(options.database_url or sqlite_url(self.home.database), shared=options.shared)
        store.on_commit = metrics.STORE_COMMIT.labels(options.name).observe
        await store.migrate()
        directory = Directory(options.peers, options.directory_file)
        self._transport = HttpTransport(options.name, key, directory, self._deliver_local)
        self.ctx = NodeContext(
            name=options.name,
            store=store,
            transport=self._transport,
            llm=AiohttpLlmClient(),
            settings=options.settings,
        )
        logs.identify_worker(self.ctx.worker)
        await store.listen(self.ctx.signals.notify)
        self.ctx.spawn(news.watch_the_store(self.ctx), name="news")
        await upkeep.announce(self.ctx)  # before the host takes a request: see announce
        self.ctx.spawn(self._upkeep(self.ctx), name="upkeep")
        self.ctx.spawn(metrics.sample_event_loop_lag(options.name), name="event-loop-lag")
        logging.getLogger("llm_provider").info(
            "node %s at %s (home %s); public key %s", options.name, self.url, self.home.path, key.public_key
        )
        return NodeApi(self.ctx, token, directory, signing.ReplayGuard(store), self.home.metrics_token())

    def note_in_home(self) -> None:
        """Where the node listens and which process serves it (`emulator up` watches that pid), once it listens:
        a process that failed to bind leaves the note of the one that did."""
        self.home.write_info(self.options.name, self.url)

    @staticmethod
    async def _upkeep(ctx: NodeContext) -> None:
        await upkeep.boot(ctx)
        await upkeep.run(ctx)

    async def _deliver_local(self, source: Source, target: Process, message: Message) -> BaseModel:
        assert self.ctx is not None
        return await node_handlers.deliver(self.ctx, source, target, message)

    async def drain(self) -> None:
        """SIGTERM: finish what is being served, within the grace period, before stopping."""
        if self.ctx is not None:
            await liveness.drain(self.ctx, self.ctx.settings.drain_grace)

    def close_streams(self) -> None:
        """Open event streams end now; their readers reconnect with Last-Event-ID."""
        if self.ctx is not None:
            self.ctx.closing = True
            self.ctx.signals.notify_all()

    async def stop(self) -> None:
        if self.ctx is not None:
            await self.ctx.close()
            await self.ctx.llm.close()
            await self.ctx.store.close()
        if self._transport is not None:
            await self._transport.close()


class Node(NodeRuntime):
    """The runtime behind the aiohttp host: `async with Node(options) as node:` serves until the block ends."""

    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> Node:
        api = await self.start()
        access_log = logging.getLogger("aiohttp.access") if self.options.verbose else None
        self._runner = create_runner(api, access_log)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.options.host, self.options.port, reuse_address=True).start()
        self.note_in_home()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close_streams()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.stop()


async def serve_forever(options: NodeOptions) -> None:
    configure_logging(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    async with Node(options) as node:
        await stop.wait()
        await node.drain()
