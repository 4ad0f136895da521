"""The store: Alembic migrations, concurrent writers, and nodes that restart on their home, each on a SQLite file and on
PostgreSQL; and what only SQLite has: WAL, BEGIN IMMEDIATE, databases an older release left behind."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from handlers import updates
from handlers.config import config_for_update, read_config
from llm_provider.directory import Peer
from llm_provider.homes import Home
from llm_provider.node import Node, NodeOptions
from schemas.jobs import JobStatus, JobUpdate
from store import loop_sqlite
from store.database import Store, sqlite_url
from store.migrate import alembic_config
from store.models import DriverRegistration, Job, JobChunk, NodeConfig, RoutedJob, ServedJob
from tests.conftest import RunningNode, wire
from tests.databases import fresh_database, postgres_server
from tests.helpers import get_json
from tests.hosts import free_port
from tests.streams import GUARD_S, events, job_updates, run_job, submit
from tests.upstreams import MODEL, StartUpstream, Upstream, gated_upstream

FIRST_REVISION = "0001"


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


OpenStore = Callable[[str], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def postgres_url(request: pytest.FixtureRequest) -> str | None:
    """The backend a test runs on: None for SQLite, or the PostgreSQL server's URL."""
    return postgres_server() if request.param == "postgres" else None


@pytest.fixture
async def database_url(postgres_url: str | None, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: a SQLite file, or a new database on the PostgreSQL server (dropped afterwards)."""
    if postgres_url is None:
        yield sqlite_url(tmp_path / "node.db")
        return
    async with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture
async def open_store() -> AsyncIterator[OpenStore]:
    """`open_store(url)`: a Store, closed after the test; several on one URL are several processes or boots."""
    stores: list[Store] = []

    def open_(url: str) -> Store:
        store = Store.open(url)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


async def alembic_versions(store: Store) -> list[str]:
    async with store.reading() as session:
        return list(await session.scalars(text("SELECT version_num FROM alembic_version")))


async def table_names(store: Store) -> set[str]:
    async with store.read_engine.connect() as connection:
        return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))


def upgrade_with_alembic(path: Path, revision: str) -> None:
    """What an older release left behind: the schema at `revision`, made by the Alembic command with a sync URL."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.upgrade(config, revision)


# --- migrations ------------------------------------------------------------------------------------


async def test_fresh_database_is_migrated_to_the_alembic_head(database_url: str, open_store: OpenStore) -> None:
    store = open_store(database_url)
    await store.migrate()
    assert await alembic_versions(store) == [head_revision()]
    expected = {"alembic_version"} | {table.name for table in NodeConfig.metadata.sorted_tables}
    assert await table_names(store) == expected


async def test_migrating_twice_is_harmless_and_keeps_rows(database_url: str, open_store: OpenStore) -> None:
    store = open_store(database_url)
    await store.migrate()
    now = time.time()
    async with store.writing() as session:
        session.add(NodeConfig(id=1, is_router=True, router_node="fake.dev", driver_models=[MODEL], driver_is_public=True, driver_capacity=3))
        session.add(Job(id="j1", client="c", model=MODEL, spec={}, status="succeeded", next_seq=1, created_at=now, deadline=now + 60))
        session.add(JobChunk(job_id="j1", seq=0, delta="kept"))
    await store.migrate()
    again = open_store(database_url)  # as a restarted node would
    await again.migrate()
    assert await alembic_versions(again) == [head_revision()]
    async with again.reading() as session:
        config = await read_config(session)
        assert (config.is_router, config.router_node, config.driver_models, config.driver_capacity) == (True, "fake.dev", [MODEL], 3)
        assert (await session.get(Job, "j1")) is not None
        assert list(await session.scalars(select(JobChunk.delta))) == ["kept"]


# --- SQLite databases an older release left behind (built through the sqlite3 module) ---------------


async def test_database_from_the_first_revision_is_upgraded_keeping_its_data(tmp_path: Path, open_store: OpenStore) -> None:
    path = tmp_path / "node.db"
    upgrade_with_alembic(path, FIRST_REVISION)
    now = time.time()
    with sqlite3.connect(path) as old:
        assert old.execute("SELECT version_num FROM alembic_version").fetchall() == [(FIRST_REVISION,)]
        old.execute(
            "INSERT INTO jobs (id, client, model, spec, status, router_node, driver_node, next_seq, created_at, first_token_at,"
            " finished_at, deadline, finish_reason, usage, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old-job", "http:127.0.0.1", MODEL, json.dumps({"job_id": "old-job"}), "succeeded", "fake.dev", "fake2.dev", 2,
             now - 5, now - 4, now - 3, now + 55, "stop", json.dumps({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}), None),
        )
        old.executemany("INSERT INTO job_chunks (job_id, seq, delta) VALUES (?, ?, ?)", [("old-job", 0, "old text"), ("old-job", 1, "")])
        old.execute(
            "INSERT INTO node_config (id, is_router, router_node, driver_models, driver_is_public, driver_capacity, llm_endpoint,"
            " llm_api_key) VALUES (1, 1, 'fake.dev', ?, 1, 4, 'http://llm.example/v1', 'sk-old')",
            (json.dumps([MODEL]),),
        )
        old.execute(
            "INSERT INTO routed_jobs (id, client_node, model, spec, status, driver_node, created_at, dispatched_at, finished_at, deadline)"
            " VALUES ('routed', 'fake3.dev', ?, '{}', 'succeeded', 'fake2.dev', ?, ?, ?, ?)",
            (MODEL, now, now, now, now + 60),
        )
        old.execute(
            "INSERT INTO driver_registrations (node, model, is_public, capacity, last_seen) VALUES ('fake2.dev', ?, 1, 2, ?)", (MODEL, now)
        )
        old.execute(
            "INSERT INTO served_jobs (id, origin_node, spec, status, created_at, finished_at, deadline)"
            " VALUES ('served', 'fake.dev', '{}', 'succeeded', ?, ?, ?)",
            (now, now, now + 60),
        )
    old.close()

    store = open_store(sqlite_url(path))
    await store.migrate()

    assert await alembic_versions(store) == [head_revision()]
    async with store.reading() as session:
        job = await session.get(Job, "old-job")
        assert job is not None
        assert (job.status, job.router_node, job.driver_node, job.next_seq, job.finish_reason) == ("succeeded", "fake.dev", "fake2.dev", 2, "stop")
        assert job.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        assert list(await session.scalars(select(JobChunk.delta).order_by(JobChunk.seq))) == ["old text", ""]
        config = await read_config(session)
        assert (config.is_router, config.router_node, config.driver_models, config.driver_capacity) == (True, "fake.dev", [MODEL], 4)
        assert (config.llm_endpoint, config.llm_api_key) == ("http://llm.example/v1", "sk-old")
        routed = await session.get(RoutedJob, "routed")
        assert routed is not None and routed.status == "succeeded" and routed.attempts == 0 and routed.streamed is False
        registration = await session.get(DriverRegistration, ("fake2.dev", MODEL))
        assert registration is not None and registration.capacity == 2 and registration.failures == 0
        served = await session.get(ServedJob, "served")
        assert served is not None and served.streamed is False


async def test_node_started_on_an_old_database_serves_its_records(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    home = tmp_path / "old-node"
    home.mkdir()
    upgrade_with_alembic(home / "node.db", FIRST_REVISION)
    now = time.time()
    with sqlite3.connect(home / "node.db") as old:
        old.execute(
            "INSERT INTO jobs (id, client, model, spec, status, next_seq, created_at, first_token_at, finished_at, deadline,"
            " finish_reason) VALUES ('kept', 'c', ?, '{}', 'succeeded', 2, ?, ?, ?, ?, 'stop')",
            (MODEL, now - 3, now - 2, now - 1, now + 60),
        )
        old.executemany("INSERT INTO job_chunks (job_id, seq, delta) VALUES ('kept', ?, ?)", [(0, "from before"), (1, "")])
    old.close()
    async with Node(NodeOptions(name="old.dev", port=free_port(), home=home)) as node:
        record = await get_json(http, f"{node.url}/jobs/kept")
        assert (record["status"], record["text"], record["finish_reason"]) == ("succeeded", "from before", "stop")
        # Assembled from the text alone, as chunks were not kept then.
        assert record["response"]["choices"] == [
            {"index": 0, "message": {"role": "assistant", "content": "from before"}, "logprobs": None, "finish_reason": "stop"}
        ]
        async with asyncio.timeout(GUARD_S):
            updates = await job_updates(http, node.url, "kept")
    assert [(u["seq"], u["delta"], u["is_final"]) for u in updates] == [(0, "from before", False), (1, "", True)]
    assert "chunks" not in updates[0]  # nothing is made up for a reader of /jobs


# --- concurrent writers ------------------------------------------------------------------------------


async def test_writers_from_two_stores_on_one_database_queue_and_lose_no_update(database_url: str, open_store: OpenStore) -> None:
    """Two stores are two processes' worth of connections: read-then-write transactions must queue, not fail
    ("database is locked") nor overwrite each other (PostgreSQL: the handlers' read locks the row)."""
    first, second = open_store(database_url), open_store(database_url)
    await first.migrate()
    async with first.writing() as session:
        await config_for_update(session)  # the defaults: capacity 1

    async def increment(store: Store) -> None:
        async with store.writing() as session:
            (await config_for_update(session)).driver_capacity += 1

    try:
        await asyncio.gather(*(increment(store) for _ in range(10) for store in (first, second)))
    except OperationalError as error:
        pytest.fail(f"a writer failed: {error}")
    async with second.reading() as session:
        assert (await read_config(session)).driver_capacity == 21  # no increment lost



def queued_job(job_id: str) -> Job:
    return Job(id=job_id, client="c", model=MODEL, spec={}, status="queued", next_seq=0, created_at=0, deadline=0)


async def test_small_writes_in_flight_share_transactions_and_a_failing_one_fails_alone(database_url: str, open_store: OpenStore) -> None:
    store = open_store(database_url)
    await store.migrate()

    async def add(job_id: str) -> str:
        async def write(session: AsyncSession) -> str:
            session.add(queued_job(job_id))
            return job_id

        result: str = await store.write_soon(write)
        return result

    first = [f"j{i}" for i in range(50)]
    assert await asyncio.gather(*(add(job_id) for job_id in first)) == first
    assert store.write_soon_transactions <= 2, "50 writes in flight at once must share their commits"

    # "j0" exists: its batch fails as a whole, then each write runs alone and only "j0" fails.
    results = await asyncio.gather(add("k1"), add("j0"), add("k2"), return_exceptions=True)
    assert results[0] == "k1" and results[2] == "k2", results
    assert isinstance(results[1], IntegrityError), results
    async with store.reading() as session:
        assert set(await session.scalars(select(Job.id))) == {*first, "k1", "k2"}

def flusher() -> asyncio.Task[None]:
    [flush] = [task for task in asyncio.all_tasks() if task.get_coro().__qualname__ == "GroupCommit._flush"]  # type: ignore[union-attr]
    return flush


async def test_a_commit_cut_short_by_shutdown_cancels_its_writers_and_the_writes_behind_it_still_commit(
    database_url: str, open_store: OpenStore
) -> None:
    """A process stopping cancels every task at once: the group commit's among them, mid-commit.  Writers whose
    write was in that commit must not wait for it forever (a serving task ending a job as its process stops
    writes once more, and a writer that never returns hangs the whole shutdown); writes behind it commit."""
    store = open_store(database_url)
    await store.migrate()
    in_commit, hold = asyncio.Event(), asyncio.Event()

    async def held(session: AsyncSession) -> None:
        in_commit.set()
        await hold.wait()

    first = asyncio.ensure_future(store.write_soon(held))
    async with asyncio.timeout(GUARD_S):
        await in_commit.wait()
    behind = asyncio.ensure_future(store.write_soon(lambda session: session.execute(text("SELECT 1"))))
    await asyncio.sleep(0)  # `behind` queues behind the commit in flight
    flusher().cancel()
    async with asyncio.timeout(GUARD_S):
        results = await asyncio.gather(first, behind, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and not isinstance(results[1], BaseException), results
    assert await store.write_soon(lambda session: session.execute(text("SELECT 1"))) is not None  # and later writes commit


async def test_writes_commit_even_when_the_group_commit_is_cancelled_before_it_began(
    database_url: str, open_store: OpenStore
) -> None:
    """Cancelled before its first step, a task never runs its body, not even a `finally`: the writes it was
    started for must still commit, and later writes too."""
    store = open_store(database_url)
    await store.migrate()
    first = asyncio.ensure_future(store.write_soon(lambda session: session.execute(text("SELECT 1"))))
    await asyncio.sleep(0)  # `first` has queued its write and started the group commit, which has not begun
    flusher().cancel()
    async with asyncio.timeout(GUARD_S):
        assert await first is not None
        assert await store.write_soon(lambda session: session.execute(text("SELECT 1"))) is not None


async def test_a_sqlite_writer_waits_for_another_connection_s_lock_while_the_event_loop_runs_on(tmp_path: Path, open_store: OpenStore) -> None:
    """SQLite runs on the event loop's thread (store/loop_sqlite.py): a lock held elsewhere is waited for with the loop
    free, and the write goes in once the lock is let go."""
    store = open_store(sqlite_url(tmp_path / "node.db"))
    await store.migrate()
    other = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    writing = asyncio.ensure_future(store.write_soon(config_for_update))
    for _ in range(20):  # the loop keeps turning while the write waits
        await asyncio.sleep(0.005)
    assert not writing.done()
    other.execute("COMMIT")
    other.close()
    async with asyncio.timeout(GUARD_S):
        assert (await writing).driver_capacity == 1


async def test_a_sqlite_lock_held_past_the_busy_timeout_refuses_the_statement(tmp_path: Path) -> None:
    connection = await loop_sqlite.connector(sqlite_url(tmp_path / "node.db"))()
    await connection.execute("PRAGMA busy_timeout=100")
    other = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        await connection.execute("BEGIN IMMEDIATE")
    assert time.monotonic() - started >= 0.05  # it waited (about 0.1 s), rather than failing at once
    other.execute("ROLLBACK")
    await connection.execute("BEGIN IMMEDIATE")  # free again: taken at once
    await connection.rollback()
    await connection.close()
    other.close()


# --- SQLite only: its pragmas, and BEGIN IMMEDIATE (PostgreSQL writers lock rows instead) -------------


async def test_sqlite_runs_in_wal_mode(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(sqlite_url(tmp_path / "node.db"))
    await store.migrate()
    async with store.reading() as session:
        assert (await session.scalar(text("PRAGMA journal_mode"))) == "wal"
    async with store.writing() as session:
        assert (await session.scalar(text("PRAGMA journal_mode"))) == "wal"
        assert (await session.scalar(text("PRAGMA foreign_keys"))) == 1


async def test_sqlite_begin_immediate_serialises_whole_write_transactions(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(sqlite_url(tmp_path / "node.db"))
    await store.migrate()
    now = time.time()

    async def write(job_id: str) -> None:
        async with store.writing() as session:
            before = await session.scalar(select(func.count()).select_from(Job))
            session.add(Job(id=job_id, client="c", model=MODEL, spec={"seen": before}, status="queued", next_seq=0, created_at=now, deadline=now + 60))

    await asyncio.gather(write("a"), write("b"))
    async with store.reading() as session:
        specs = {job.id: job.spec["seen"] for job in await session.scalars(select(Job))}
    assert set(specs) == {"a", "b"}
    assert sorted(specs.values()) == [0, 1]  # serialised: the second saw the first


# --- restarts ----------------------------------------------------------------------------------------


class Cluster:
    """Nodes on fixed ports, homes and databases that a test may stop and start again, sharing one directory.

    On SQLite a node keeps its home's file; on PostgreSQL each name gets a fresh database, kept across its restarts.
    """

    def __init__(self, root: Path, postgres_url: str | None, databases: AsyncExitStack) -> None:
        self.root = root
        self.postgres_url = postgres_url
        self.databases = databases
        self.peers: dict[str, Peer] = {}
        self.ports: dict[str, int] = {}
        self.postgres_databases: dict[str, str] = {}
        self.running: dict[str, Node] = {}

    def database_url(self, name: str) -> str:
        return self.postgres_databases.get(name) or sqlite_url(Home(self.root / name).database)

    async def start(self, name: str) -> RunningNode:
        port = self.ports.setdefault(name, free_port())
        if self.postgres_url is not None and name not in self.postgres_databases:
            self.postgres_databases[name] = await self.databases.enter_async_context(fresh_database(self.postgres_url))
        database_url = self.postgres_databases.get(name)  # None: the home's SQLite file
        node = Node(NodeOptions(name=name, port=port, home=self.root / name, peers=self.peers, database_url=database_url))
        await node.__aenter__()
        self.running[name] = node
        self.peers[name] = Peer.at(node.url, node.public_key)
        return RunningNode(name=name, url=node.url, home=self.root / name, node=node)

    async def stop(self, name: str) -> None:
        await self.running.pop(name).__aexit__(None, None, None)

    async def restart(self, name: str) -> RunningNode:
        await self.stop(name)
        return await self.start(name)

    async def close(self) -> None:
        for name in list(self.running):
            await self.stop(name)


@pytest.fixture
async def cluster(tmp_path: Path, postgres_url: str | None) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as databases:  # dropped after the nodes have stopped
        nodes = Cluster(tmp_path, postgres_url, databases)
        try:
            yield nodes
        finally:
            await nodes.close()


@pytest.fixture
async def fast_upstream(start_upstream: StartUpstream) -> Upstream:
    return await start_upstream(ttft=0.0, tokens_per_second=0)


async def seed_network(cluster: Cluster, upstream: Upstream) -> tuple[RunningNode, RunningNode, RunningNode]:
    router, driver, client = await cluster.start("fake.dev"), await cluster.start("fake2.dev"), await cluster.start("fake3.dev")
    await wire(router, driver, client, upstream)
    return router, driver, client


async def stored_config(database_url: str) -> dict[str, Any]:
    """The node_config row, read from the node's database while the node is stopped."""
    store = Store.open(database_url)
    try:
        async with store.reading() as session:
            config = await read_config(session)
            return {
                "is_router": config.is_router,
                "router_node": config.router_node,
                "driver_models": config.driver_models,
                "driver_is_public": config.driver_is_public,
                "llm_endpoint": config.llm_endpoint,
            }
    finally:
        await store.close()


async def test_restarted_driver_keeps_its_configuration_and_serves_jobs(
    cluster: Cluster, fast_upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    _, driver, client = await seed_network(cluster, fast_upstream)
    token = driver.node.home.admin_token()
    await cluster.stop("fake2.dev")
    assert await stored_config(cluster.database_url("fake2.dev")) == {
        "is_router": False,
        "router_node": "fake.dev",
        "driver_models": [MODEL],
        "driver_is_public": True,
        "llm_endpoint": fast_upstream.url,
    }
    driver = await cluster.start("fake2.dev")
    assert driver.node.home.admin_token() == token
    created, updates = await run_job(http, client.url, {"model": MODEL, "prompt": "after restart"})
    assert updates[-1]["status"] == "succeeded"
    assert updates[-1]["driver"] == "fake2.dev"
    _, local = await run_job(http, driver.url, {"model": MODEL, "prompt": "served locally"})
    assert local[-1]["status"] == "succeeded"
    assert fast_upstream.stats.requests == 2


async def test_restarted_router_keeps_its_role_and_routes_jobs(
    cluster: Cluster, fast_upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    _, _, client = await seed_network(cluster, fast_upstream)
    await cluster.stop("fake.dev")
    assert (await stored_config(cluster.database_url("fake.dev")))["is_router"] is True
    await cluster.start("fake.dev")
    created, updates = await run_job(http, client.url, {"model": MODEL, "prompt": "hello"})
    assert updates[-1]["status"] == "succeeded"
    record = await get_json(http, f"{client.url}/jobs/{created['job_id']}")
    assert (record["router"], record["driver"]) == ("fake.dev", "fake2.dev")


async def test_finished_job_is_readable_after_the_client_node_restarts(
    cluster: Cluster, fast_upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    _, _, client = await seed_network(cluster, fast_upstream)
    created, updates = await run_job(http, client.url, {"model": MODEL, "prompt": "remember me"})
    before = await get_json(http, f"{client.url}/jobs/{created['job_id']}")
    client = await cluster.restart("fake3.dev")
    assert await get_json(http, f"{client.url}/jobs/{created['job_id']}") == before
    async with asyncio.timeout(GUARD_S):
        assert await job_updates(http, client.url, created["job_id"]) == updates
    _, again = await run_job(http, client.url, {"model": MODEL, "prompt": "and a new one"})
    assert again[-1]["status"] == "succeeded"


async def test_stopping_a_node_ends_the_event_streams_of_its_running_jobs(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with gated_upstream(first="alpha") as upstream:
        router, driver_node, client = await cluster.start("fake.dev"), await cluster.start("fake2.dev"), await cluster.start("fake3.dev")
        await wire(router, driver_node, client, upstream)
        created = await submit(http, client.url, {"model": MODEL, "prompt": "hi"})
        ctx = client.node.ctx
        assert ctx is not None
        ended = False
        async with http.get(f"{client.url}{created['events_url']}") as response:
            stream = aiter(events(response))
            async with asyncio.timeout(GUARD_S):
                assert json.loads((await anext(stream)).data)["delta"] == "alpha"
            stopping = asyncio.create_task(cluster.stop("fake3.dev"))
            try:
                async with asyncio.timeout(2.0):  # a bound on a hang, not a timing assertion
                    try:
                        async for _ in stream:
                            pass
                    except aiohttp.ClientPayloadError:
                        pass  # the connection was closed: that ends the stream too
                ended = True
            except TimeoutError:
                ended = False
            finally:
                if not ended and not stopping.done():
                    # Let a stuck shutdown finish now: end the job on the client, which wakes its reader.
                    final = JobUpdate(job_id=created["job_id"], seq=1, is_final=True, status=JobStatus.FAILED, error="test cleanup")
                    await updates.record_update(ctx, final)
                await stopping
    assert ended
