"""Fixtures that start real things: a fake LLM upstream and llm-provider nodes on loopback ports.

Where in-process nodes run (`node_setup`, which `start_node`, `make_network` and `network` use):

- by default under every web host (aiohttp, and the ASGI app under uvicorn and hypercorn) and on
  PostgreSQL (aiohttp host): `NODE_SETUPS`.  That is for the HTTP contract, which each host serves.
- `pytest.mark.databases_only` (on a test, or a module's `pytestmark`): one host on each database,
  `DATABASES` (aiohttp on SQLite, aiohttp on PostgreSQL).  That is for scheduling, queue and store logic,
  which no host changes but the database does (`SKIP LOCKED`, locking, shared processes).
- a test's own `@pytest.mark.parametrize("node_setup", [...])` wins over both: one host for a test that
  reads nothing host-specific, or `NODE_SETUPS` for a test of the HTTP contract in a `databases_only` module.

Tests that need no node live in tests/unit/; whole networks as real processes in tests/cluster.py.  The fake
upstreams are tests/upstreams.py's, the helpers that submit jobs and read their streams tests/streams.py's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emulator.client import send_admin
from llm_provider.directory import Peer
from llm_provider.node import NodeOptions, NodeRuntime
from tests.cluster import Cluster
from tests.databases import fresh_database, postgres_server
from tests.hosts import HOSTS, free_port, serve
from tests.upstreams import MODEL, StartUpstream, Upstream
from tests.upstreams import start_upstream as start_upstream  # a fixture, for every test


@dataclass
class RunningNode:
    name: str
    url: str
    home: Path
    node: NodeRuntime

    async def admin(self, message: Any, process: str | None = None) -> dict[str, Any]:
        return await send_admin(self.url, self.node.home.admin_token(), message, process)


@dataclass
class Network:
    """The seed's three nodes: router, driver with an LLM, client."""

    router: RunningNode
    driver: RunningNode
    client: RunningNode
    upstream: Upstream


StartNode = Callable[..., Awaitable[RunningNode]]


@pytest.fixture
async def start_node(tmp_path: Path, node_setup: str) -> AsyncIterator[StartNode]:
    """Start a node as a real server (aiohttp, or the ASGI app under uvicorn or hypercorn) with its own
    home and database: a SQLite file, or a fresh PostgreSQL database for the "postgres" setup.
    Every node started by one test shares a directory (peers), so names resolve.
    """
    peers: dict[str, Peer] = {}
    host = "aiohttp" if node_setup == "postgres" else node_setup
    server = postgres_server() if node_setup == "postgres" else None
    async with AsyncExitStack() as stack:

        async def start(name: str, **options: Any) -> RunningNode:
            port = options.pop("port", None) or free_port()
            home = tmp_path / name
            if server is not None and "database_url" not in options:
                options["database_url"] = await stack.enter_async_context(fresh_database(server))
            node = await stack.enter_async_context(serve(host, NodeOptions(name=name, port=port, home=home, peers=peers, **options)))
            peers[name] = Peer.at(node.url, node.public_key)
            return RunningNode(name=name, url=node.url, home=home, node=node)

        yield start


NODE_SETUPS = [*HOSTS, "postgres"]  # every web host on SQLite, and aiohttp on PostgreSQL
DATABASES = ["aiohttp", "postgres"]  # one host on each database


@pytest.fixture(params=NODE_SETUPS)
def node_setup(request: pytest.FixtureRequest) -> str:
    """Every test with in-process nodes runs under each web host, and on PostgreSQL (aiohttp host),
    unless it is marked `databases_only` (see the module's docstring)."""
    setup: str = request.param
    return setup


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A `databases_only` test runs on `DATABASES`: it is given that parametrization before pytest
    applies the fixture's own params (which a test's parametrize of `node_setup` replaces)."""
    if "node_setup" not in metafunc.fixturenames or metafunc.definition.get_closest_marker("databases_only") is None:
        return
    if any("node_setup" in _argnames(mark) for mark in metafunc.definition.iter_markers("parametrize")):
        return  # the test's own choice
    metafunc.definition.add_marker(pytest.mark.parametrize("node_setup", DATABASES))


def _argnames(mark: pytest.Mark) -> list[str]:
    names = mark.args[0] if mark.args else mark.kwargs["argnames"]
    return [name.strip() for name in names.split(",")] if isinstance(names, str) else list(names)


async def wire(router: RunningNode, driver: RunningNode, client: RunningNode, upstream: Upstream, model: str = MODEL) -> None:
    """The seed's admin commands, in the seed's order."""
    await router.admin("StartRouter")
    await driver.admin({"SetRouter": {"node": router.name}})
    await driver.admin({"RegisterOaiProviderEndpoint": {"endpoint": upstream.url}}, "openai")
    await driver.admin({"SetLocalDriver": {"model": model, "is_public": True}})
    await client.admin({"SetRouter": {"node": router.name}})


async def start_network(start_node: StartNode, upstream: Upstream) -> Network:
    """Start fake.dev, fake2.dev and fake3.dev and wire them to `upstream` (any OpenAI-compatible one)."""
    router = await start_node("fake.dev")
    driver = await start_node("fake2.dev")
    client = await start_node("fake3.dev")
    await wire(router, driver, client, upstream)
    return Network(router=router, driver=driver, client=client, upstream=upstream)


@pytest.fixture
async def make_network(start_node: StartNode, start_upstream: StartUpstream) -> Callable[..., Awaitable[Network]]:
    """`await make_network(ttft=..., tokens_per_second=...)`: fake.dev, fake2.dev, fake3.dev wired to a fake LLM."""

    async def make(**upstream_settings: Any) -> Network:
        return await start_network(start_node, await start_upstream(**upstream_settings))

    return make


@pytest.fixture
async def network(make_network: Callable[..., Awaitable[Network]]) -> Network:
    return await make_network(ttft=0.0, tokens_per_second=0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def cluster(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Cluster]:
    """Real node processes for one test (`tests.cluster`), every one killed at its end."""
    cluster = Cluster(tmp_path, http)
    try:
        yield cluster
    finally:
        await cluster.close()
