"""The router's queue in the store: registered drivers (`driver_registrations`) and routed jobs (`routed_jobs`).

Every statement the router runs on them is here, each within the caller's transaction; what to do with
what they return is the router's (`handlers.router`) and its policy's (`handlers.dispatch_policy`).
Rows are locked where router replicas on PostgreSQL could race: a model's driver rows while jobs are
assigned (so replicas assign one at a time per model), queued jobs with SKIP LOCKED (each replica takes
jobs no other holds), and a job while it is taken back.  SQLite serializes writers anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import Boolean, Float, Row, String, bindparam, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from schemas.jobs import FINAL_STATUSES, JobStatus
from store.models import DriverRegistration, RoutedJob

# What a relayed update needs of its job: read once per update, so only these columns.
_RELAY_COLUMNS = (
    RoutedJob.id, RoutedJob.driver_node, RoutedJob.client_node, RoutedJob.status, RoutedJob.streamed, RoutedJob.model,
    RoutedJob.traceparent, RoutedJob.tokens_counted,
)


class Ended(NamedTuple):
    """A job the router just ended: whose it was, and when it was queued."""

    client_node: str
    api_key_label: str | None
    created_at: float


class LateCounted(NamedTuple):
    client_node: str
    api_key_label: str | None
    model: str
    finished_at: float | None


# Statements are built once, here, with their values as parameters: building one costs more than running it.

# --- drivers ----------------------------------------------------------------------------------


_REGISTRATIONS_OF = select(DriverRegistration).where(DriverRegistration.node == bindparam("node"))


async def registrations_of(session: AsyncSession, node: str, *, for_update: bool = False) -> Sequence[DriverRegistration]:
    statement = _REGISTRATIONS_OF.with_for_update() if for_update else _REGISTRATIONS_OF
    return (await session.scalars(statement, {"node": node})).all()


async def drop_registrations(session: AsyncSession, node: str, keep: Sequence[str] = ()) -> None:
    """Forget what `node` serves, but for the models in `keep`."""
    await session.execute(delete(DriverRegistration).where(DriverRegistration.node == node, DriverRegistration.model.not_in(keep)))


async def all_registrations(session: AsyncSession) -> Sequence[DriverRegistration]:
    return (await session.scalars(select(DriverRegistration).order_by(DriverRegistration.node))).all()


_OFFERED = (
    select(DriverRegistration.model, func.count())
    .where(DriverRegistration.is_public | (DriverRegistration.node == bindparam("client_node")))
    .group_by(DriverRegistration.model)
    .order_by(DriverRegistration.model)
)


async def offered(session: AsyncSession, client_node: str) -> list[tuple[str, int]]:
    """(model, number of drivers) of the models whose drivers are public, or are the asking node itself."""
    return [(model, count) for model, count in await session.execute(_OFFERED, {"client_node": client_node})]


_READY = (DriverRegistration.model == bindparam("model"), DriverRegistration.cooldown_until <= bindparam("now", type_=Float))
_LOCK_READY_DRIVERS = (
    select(DriverRegistration.node, DriverRegistration.capacity, DriverRegistration.is_public).where(*_READY).with_for_update()
)
_READY_DRIVERS = select(func.count()).where(*_READY)


# node, capacity, is_public
ReadyDriver = Row[str, int, bool]


async def lock_ready_drivers(session: AsyncSession, model: str, now: float) -> Sequence[ReadyDriver]:
    """The model's drivers not cooled down, locked until the caller's commit."""
    return (await session.execute(_LOCK_READY_DRIVERS, {"model": model, "now": now})).all()


async def has_ready_driver(session: AsyncSession, model: str, now: float) -> bool:
    return bool(await session.scalar(_READY_DRIVERS, {"model": model, "now": now}))


async def silent_drivers(session: AsyncSession, last_seen_before: float) -> Sequence[str]:
    return (await session.scalars(select(DriverRegistration.node).where(DriverRegistration.last_seen < last_seen_before).distinct())).all()


_DRIVER_WORKS = (
    update(DriverRegistration)
    .where(DriverRegistration.node == bindparam("p_node"), DriverRegistration.failures > 0)
    .values(failures=0)
    .execution_options(synchronize_session=False)
)


async def driver_works(session: AsyncSession, node: str) -> None:
    """Part of a job `node` serves reached its client: its failures in a row start again."""
    await session.execute(_DRIVER_WORKS, {"p_node": node})


# --- loads and queues ---------------------------------------------------------------------------


_RUNNING_LOADS = select(RoutedJob.driver_node, func.count()).where(RoutedJob.status == JobStatus.RUNNING).group_by(RoutedJob.driver_node)
_QUEUE_LENGTHS = select(RoutedJob.model, func.count()).where(RoutedJob.status == JobStatus.QUEUED).group_by(RoutedJob.model)
_QUEUED = (RoutedJob.model == bindparam("model")) & (RoutedJob.status == JobStatus.QUEUED)
_QUEUED_COUNT = select(func.count()).where(_QUEUED)
_QUEUED_COUNT_BEFORE = select(func.count()).where(_QUEUED & (RoutedJob.created_at < bindparam("before", type_=Float)))
_QUEUED_MODELS = select(RoutedJob.model).where(RoutedJob.status == JobStatus.QUEUED).distinct()
_LOCK_WAITING = (
    select(
        RoutedJob.id, RoutedJob.client_node, RoutedJob.returned_by, RoutedJob.spec, RoutedJob.created_at, RoutedJob.attempts,
        RoutedJob.traceparent,
    )
    .where(_QUEUED, RoutedJob.deadline > bindparam("now", type_=Float))
    .order_by(RoutedJob.created_at)
    .with_for_update(skip_locked=True)
)


async def running_loads(session: AsyncSession) -> dict[str, int]:
    """Jobs running on each driver."""
    return {node: count for node, count in await session.execute(_RUNNING_LOADS) if node is not None}


async def queue_lengths(session: AsyncSession) -> dict[str, int]:
    return {model: count for model, count in await session.execute(_QUEUE_LENGTHS)}


async def queued_count(session: AsyncSession, model: str, *, before: float | None = None) -> int:
    """Jobs waiting for `model`; with `before`, only those queued earlier."""
    if before is None:
        return await session.scalar(_QUEUED_COUNT, {"model": model}) or 0
    return await session.scalar(_QUEUED_COUNT_BEFORE, {"model": model, "before": before}) or 0


async def queued_models(session: AsyncSession) -> Sequence[str]:
    return (await session.scalars(_QUEUED_MODELS)).all()


# id, client_node, returned_by, spec, created_at, attempts, traceparent
WaitingJob = Row[str, str, str | None, dict[str, Any], float, int, str | None]


async def lock_waiting(session: AsyncSession, model: str, now: float) -> Sequence[WaitingJob]:
    """The model's queued jobs still within their deadline (the late are ended, not served), oldest first;
    locked, skipping those another router replica holds."""
    return (await session.execute(_LOCK_WAITING, {"model": model, "now": now})).all()


_HAND_OUT = (
    update(RoutedJob)
    .where(RoutedJob.id == bindparam("job_id"))
    .values(status=JobStatus.RUNNING, driver_node=bindparam("p_driver", type_=String), dispatched_at=bindparam("p_now", type_=Float))
    .execution_options(synchronize_session=False)
)


async def hand_out(session: AsyncSession, job_id: str, driver: str, now: float) -> None:
    """A waiting job (locked by `lock_waiting`) goes to `driver`."""
    await session.execute(_HAND_OUT, {"job_id": job_id, "p_driver": driver, "p_now": now})


# --- jobs -----------------------------------------------------------------------------------------


async def job(session: AsyncSession, job_id: str, *, for_update: bool = False) -> RoutedJob | None:
    return await session.get(RoutedJob, job_id, with_for_update=for_update)


# id, driver_node, client_node, status, streamed, model, traceparent, tokens_counted
RelayView = Row[str, str | None, str, str, bool, str, str | None, bool]


_RELAY_VIEW = select(*_RELAY_COLUMNS).where(RoutedJob.id == bindparam("job_id"))
_RUNS_ON = (RoutedJob.driver_node == bindparam("node")) & (RoutedJob.status == JobStatus.RUNNING)
_RUNNING_ON = select(RoutedJob).where(_RUNS_ON)
_RUNNING_ON_SINCE = select(RoutedJob).where(
    _RUNS_ON,
    RoutedJob.dispatched_at < bindparam("before", type_=Float),
    RoutedJob.id.not_in(bindparam("except_ids", expanding=True)),
)


async def relay_view(connection: AsyncConnection, job_id: str) -> RelayView | None:
    """What relaying an update of the job needs to know of it (a Core query: it runs for most updates)."""
    return (await connection.execute(_RELAY_VIEW, {"job_id": job_id})).first()


async def running_on(session: AsyncSession, node: str, *, dispatched_before: float | None = None, except_ids: Sequence[str] = ()) -> Sequence[RoutedJob]:
    """Jobs running on driver `node`; with `dispatched_before`, only those handed over earlier, and not in `except_ids`."""
    if dispatched_before is None:
        return (await session.scalars(_RUNNING_ON, {"node": node})).all()
    parameters = {"node": node, "before": dispatched_before, "except_ids": list(except_ids)}
    return (await session.scalars(_RUNNING_ON_SINCE, parameters)).all()


async def late_jobs(session: AsyncSession, now: float, running_grace: float) -> Sequence[RoutedJob]:
    """Queued jobs past their deadline, and running ones past it by more than `running_grace`."""
    return (
        await session.scalars(
            select(RoutedJob).where(
                ((RoutedJob.status == JobStatus.QUEUED) & (RoutedJob.deadline < now))
                | ((RoutedJob.status == JobStatus.RUNNING) & (RoutedJob.deadline < now - running_grace))
            )
        )
    ).all()


_END = (
    update(RoutedJob)
    .where(RoutedJob.id == bindparam("job_id"), RoutedJob.status.not_in(FINAL_STATUSES))
    .values(
        status=bindparam("p_status", type_=String), finished_at=bindparam("p_now", type_=Float),
        tokens_counted=bindparam("p_tokens_counted", type_=Boolean),
    )
    .returning(RoutedJob.client_node, RoutedJob.api_key_label, RoutedJob.created_at)
    .execution_options(synchronize_session=False)
)
_COUNT_LATE_TOKENS = (
    update(RoutedJob)
    .where(RoutedJob.id == bindparam("job_id"), RoutedJob.tokens_counted.is_(False))
    .values(tokens_counted=True)
    .returning(RoutedJob.client_node, RoutedJob.api_key_label, RoutedJob.model, RoutedJob.finished_at)
    .execution_options(synchronize_session=False)
)
_MARK_STREAMED = (
    update(RoutedJob)
    .where(RoutedJob.id == bindparam("job_id"), RoutedJob.driver_node == bindparam("driver"), RoutedJob.status == JobStatus.RUNNING)
    .values(streamed=True)
    .execution_options(synchronize_session=False)
)


async def end(session: AsyncSession, job_id: str, status: JobStatus, now: float, *, tokens_counted: bool) -> Ended | None:
    """End the job as `status`, unless it has ended already (another event, or another replica, came first)."""
    parameters = {"job_id": job_id, "p_status": status, "p_now": now, "p_tokens_counted": tokens_counted}
    ended = (await session.execute(_END, parameters)).first()
    return None if ended is None else Ended(*ended)


async def count_late_tokens(session: AsyncSession, job_id: str) -> LateCounted | None:
    """Mark the tokens of a job the router had ended as counted now; None if they were already."""
    counted = (await session.execute(_COUNT_LATE_TOKENS, {"job_id": job_id})).first()
    return None if counted is None else LateCounted(*counted)


async def mark_streamed(session: AsyncSession, job_id: str, driver: str) -> bool:
    """Part of the job reached its client from `driver`: it can no longer go to another driver.  False if it no
    longer runs on `driver` (it ended, or was taken back, meanwhile)."""
    marked = await session.execute(_MARK_STREAMED, {"job_id": job_id, "driver": driver})
    return bool(marked.rowcount)  # type: ignore[attr-defined]
