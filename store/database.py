"""Engines and sessions.  SQLite runs in WAL mode; a write transaction starts with
BEGIN IMMEDIATE so that two writers queue on the lock instead of failing when one
upgrades a read snapshot to a write.

A database that refuses work (its disk full, its file read-only, its lock held by another process
past `SQLITE_LOCK_WAIT_MS`, its server gone) raises `StorageUnavailable`; after a refused write
every pooled connection is closed, so that the next one sees the database as it is by then (SQLite
keeps a file opened read-only as long as any connection of the process has it open)."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Insert, event, insert
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from store import loop_sqlite, migrate, notifications
from store.errors import StorageUnavailable
from store.group_commit import GroupCommit, Work
from store.models import Base

SQLITE_BUSY_TIMEOUT_MS = 30_000  # at connect: switching to WAL, and migrations, which a sibling process may be running
SQLITE_LOCK_WAIT_MS = 5_000  # a write transaction waits this long for the lock; held longer, the store is unavailable


def _refusal(error: Exception) -> bool:
    """Whether an error is the database refusing work (rather than the work being wrong)."""
    if isinstance(error, sa_exc.DBAPIError):
        return isinstance(error, sa_exc.OperationalError) or error.connection_invalidated
    return isinstance(error, sa_exc.TimeoutError)  # no pooled connection came free


@contextmanager
def _refusal_as_unavailable() -> Iterator[None]:
    """The database refusing work, raised within the block, becomes `StorageUnavailable` in its own words."""
    try:
        yield
    except Exception as error:
        if not _refusal(error):
            raise
        raise StorageUnavailable(_describe(error)) from error


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _configure_sqlite(engine: AsyncEngine, begin: str | None, lock_wait_ms: int = SQLITE_LOCK_WAIT_MS) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # First: switching to WAL takes a lock that a sibling process booting at the same time may hold.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={lock_wait_ms}")
        cursor.close()

    if begin is not None:

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql(begin)


def _describe(error: Exception) -> str:
    """The database's own words, without SQLAlchemy's statement and parameters."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__


def insert_or_ignore(session: AsyncSession, model: type[Base]) -> Insert:
    """An INSERT that skips rows whose key is taken, in the words of the session's database; its
    rowcount says how many went in."""
    return _insert_or_ignore(session.get_bind().dialect.name, model)


@functools.cache
def _insert_or_ignore(dialect_name: str, model: type[Base]) -> Insert:
    """Built once per table; `.values()` makes a new statement of it each time."""
    dialect = sqlite if dialect_name == "sqlite" else postgresql
    return dialect.insert(model).on_conflict_do_nothing()


async def add_row(session: AsyncSession, model: type[Base], values: Mapping[str, Any]) -> None:
    """INSERT one row within the session's transaction, without the ORM's unit of work: for the rows a hot
    path writes and does not use as objects afterwards."""
    await (await session.connection()).execute(_insert(model), values)


@functools.cache
def _insert(model: type[Base]) -> Insert:
    return insert(model)


async def insert_or_add(session: AsyncSession, model: type[Base], key: Mapping[str, Any], amounts: Mapping[str, int]) -> None:
    """INSERT the row `key` with `amounts`, or add the amounts to the row's where `key` exists."""
    statement = _insert_or_add(session.get_bind().dialect.name, model, tuple(key), tuple(amounts))
    await (await session.connection()).execute(statement, {**key, **amounts})


@functools.cache
def _insert_or_add(dialect_name: str, model: type[Base], key: tuple[str, ...], amounts: tuple[str, ...]) -> Insert:
    """Built once per shape (it runs as each job ends); the values come as parameters."""
    dialect = sqlite if dialect_name == "sqlite" else postgresql
    statement = dialect.insert(model)
    table = model.__table__
    return statement.on_conflict_do_update(
        index_elements=list(key), set_={name: table.c[name] + statement.excluded[name] for name in amounts}
    )


@dataclass
class Store:
    """A node's database: `reading()` for queries (`querying()` for Core ones), `writing()` for transactions that commit.

    `shared`: other processes of the same node (gunicorn workers, router replicas) use it too, so
    what one writes must wake readers in the others (`announce`, `listen`, `poll_interval`).
    """

    url: str
    read_engine: AsyncEngine
    write_engine: AsyncEngine
    _read_sessions: async_sessionmaker[AsyncSession]
    _write_sessions: async_sessionmaker[AsyncSession]
    shared: bool = False
    on_commit: Callable[[float], None] | None = None  # told how long each commit took (seconds), for metrics
    is_sqlite: bool = field(init=False)
    _group: GroupCommit = field(init=False)
    _listener: notifications.Listener | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._group = GroupCommit(self.writing)
        self.is_sqlite = _is_sqlite(self.url)

    @classmethod
    def open(cls, url: str, shared: bool = False) -> Store:
        if _is_sqlite(url):
            # Reads run in autocommit: each statement sees the newest commit, with no BEGIN/ROLLBACK round trips.
            read_engine = create_async_engine(
                url, async_creator=loop_sqlite.connector(url), pool_size=8, max_overflow=8, pool_use_lifo=True,
                isolation_level="AUTOCOMMIT", pool_reset_on_return=None,
            )
            # One writer connection per process: writers queue in the pool, not in SQLite's busy loop.
            # Every write transaction ends in an explicit commit or rollback, so the pool need not reset it.
            write_engine = create_async_engine(
                url, async_creator=loop_sqlite.connector(url), pool_size=1, max_overflow=0, pool_timeout=60, pool_reset_on_return=None
            )
            _configure_sqlite(read_engine, None)
            _configure_sqlite(write_engine, "BEGIN IMMEDIATE")
        else:
            # A fixed pool: connections opened for a burst and closed after it cost the server ~3 ms each.
            read_engine = write_engine = create_async_engine(url, pool_size=32, max_overflow=0, pool_timeout=60)
        return cls(
            url=url,
            read_engine=read_engine,
            write_engine=write_engine,
            _read_sessions=async_sessionmaker(read_engine, expire_on_commit=False),
            _write_sessions=async_sessionmaker(write_engine, expire_on_commit=False),
            shared=shared,
        )

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (never drops data).  A database already there
        is only read, so that a node boots on a database it cannot write to (and answers 503 to writes)."""
        async with self.read_engine.connect() as connection:
            if await connection.run_sync(migrate.is_at_head):
                return
        if self.is_sqlite:
            # Its own engine: a sibling process may hold the lock for its own migration, far longer than a write waits.
            engine = create_async_engine(self.url, async_creator=loop_sqlite.connector(self.url), poolclass=NullPool)
            _configure_sqlite(engine, "BEGIN IMMEDIATE", lock_wait_ms=SQLITE_BUSY_TIMEOUT_MS)
        else:
            engine = self.write_engine
        try:
            async with engine.connect() as connection:
                await connection.run_sync(migrate.upgrade_to_head)
                await connection.commit()
        finally:
            if engine is not self.write_engine:
                await engine.dispose()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        with _refusal_as_unavailable():
            async with self._read_sessions() as session:
                yield session

    @asynccontextmanager
    async def querying(self) -> AsyncIterator[AsyncConnection]:
        """A connection for Core queries that need no ORM session (cheaper to open: a reader's every wake-up)."""
        with _refusal_as_unavailable():
            async with self.read_engine.connect() as connection:
                yield connection

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._write_sessions() as session:
                transaction = await session.begin()
                try:
                    yield session
                except BaseException:
                    await transaction.rollback()
                    raise
                started = time.perf_counter()
                await transaction.commit()
                if self.on_commit is not None:
                    self.on_commit(time.perf_counter() - started)
        except Exception as error:
            if not _refusal(error):
                raise
            await self._reconnect()
            raise StorageUnavailable(_describe(error)) from error

    async def _reconnect(self) -> None:
        """Close every pooled connection: the next ones open the database anew."""
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()

    async def write_soon(self, work: Work) -> Any:
        """`work(session)` in a write transaction it may share with other small writes (group commit)."""
        return await self._group.run(work)

    @property
    def write_soon_transactions(self) -> int:
        """Transactions `write_soon` has begun in this process (a figure for benchmarks and tests)."""
        return self._group.transactions

    # --- news between processes of a shared store ---

    @property
    def poll_interval(self) -> float | None:
        """How often a process looks in the store for what other processes wrote (None: none do)."""
        if not self.shared:
            return None
        return notifications.SQLITE_POLL_S if self.is_sqlite else notifications.POSTGRES_POLL_S

    async def announce(self, session: AsyncSession, job_id: str) -> None:
        """Within a write: wake other processes' readers of `job_id` at commit."""
        if self.shared and not self.is_sqlite:
            await notifications.announce(session, job_id)

    async def listen(self, on_news: Callable[[str], None]) -> None:
        """Have `on_news(job_id)` called for what other processes announce."""
        if self.shared and not self.is_sqlite and self._listener is None:
            self._listener = await notifications.Listener.start(self.url, on_news)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        await self.read_engine.dispose()
        if self.write_engine is not self.read_engine:
            await self.write_engine.dispose()
