"""The router's queue in the store: registered drivers (`driver_registrations`) and routed jobs (`routed_jobs`).

Every statement the router runs on them is here, each within the caller's transaction; what to do with
what they return is the router's (`handlers.router`) and its policy's (`handlers.dispatch_policy`).
Rows are locked where router replicas on PostgreSQL could race: a model's driver rows while jobs are
assigned (so replicas assign one at a time per model), queued jobs with SKIP LOCKED (each replica takes
jobs no other holds), and a job while it is taken back.  SQLite serializes writers anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

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


# --- drivers ----------------------------------------------------------------------------------


async def registrations_of(session: AsyncSession, node: str, *, for_update: bool = False) -> Sequence[DriverRegistration]:
    statement = select(DriverRegistration).where(DriverRegistration.node == node)
    return (await session.scalars(statement.with_for_update() if for_update else statement)).all()


async def drop_registrations(session: AsyncSession, node: str, keep: Sequence[str] = ()) -> None:
    """Forget what `node` serves, but for the models in `keep`."""
    await session.execute(delete(DriverRegistration).where(DriverRegistration.node == node, DriverRegistration.model.not_in(keep)))


async def all_registrations(session: AsyncSession) -> Sequence[DriverRegistration]:
    return (await session.scalars(select(DriverRegistration).order_by(DriverRegistration.node))).all()


async def offered(session: AsyncSession, client_node: str) -> list[tuple[str, int]]:
    """(model, number of drivers) of the models whose drivers are public, or are the asking node itself."""
    rows = await session.execute(
        select(DriverRegistration.model, func.count())
        .where(DriverRegistration.is_public | (DriverRegistration.node == client_node))
        .group_by(DriverRegistration.model)
        .order_by(DriverRegistration.model)
    )
    return [(model, count) for model, count in rows]


async def lock_ready_drivers(session: AsyncSession, model: str, now: float) -> Sequence[DriverRegistration]:
    """The model's drivers not cooled down, locked until the caller's commit."""
    return (
        await session.scalars(
            select(DriverRegistration)
            .where(DriverRegistration.model == model, DriverRegistration.cooldown_until <= now)
            .with_for_update()
        )
    ).all()


async def has_ready_driver(session: AsyncSession, model: str, now: float) -> bool:
    ready = await session.scalar(
        select(func.count()).where(DriverRegistration.model == model, DriverRegistration.cooldown_until <= now)
    )
    return bool(ready)


async def silent_drivers(session: AsyncSession, last_seen_before: float) -> Sequence[str]:
    return (await session.scalars(select(DriverRegistration.node).where(DriverRegistration.last_seen < last_seen_before).distinct())).all()


async def driver_works(session: AsyncSession, node: str) -> None:
    """Part of a job `node` serves reached its client: its failures in a row start again."""
    await session.execute(
        update(DriverRegistration)
        .where(DriverRegistration.node == node, DriverRegistration.failures > 0)
        .values(failures=0)
        .execution_options(synchronize_session=False)
    )


# --- loads and queues ---------------------------------------------------------------------------


async def running_loads(session: AsyncSession) -> dict[str, int]:
    """Jobs running on each driver."""
    running = select(RoutedJob.driver_node, func.count()).where(RoutedJob.status == JobStatus.RUNNING).group_by(RoutedJob.driver_node)
    return {node: count for node, count in await session.execute(running) if node is not None}


async def queue_lengths(session: AsyncSession) -> dict[str, int]:
    queued = select(RoutedJob.model, func.count()).where(RoutedJob.status == JobStatus.QUEUED).group_by(RoutedJob.model)
    return {model: count for model, count in await session.execute(queued)}


async def queued_count(session: AsyncSession, model: str, *, before: float | None = None) -> int:
    """Jobs waiting for `model`; with `before`, only those queued earlier."""
    condition = (RoutedJob.model == model) & (RoutedJob.status == JobStatus.QUEUED)
    if before is not None:
        condition &= RoutedJob.created_at < before
    return await session.scalar(select(func.count()).where(condition)) or 0


async def queued_models(session: AsyncSession) -> Sequence[str]:
    return (await session.scalars(select(RoutedJob.model).where(RoutedJob.status == JobStatus.QUEUED).distinct())).all()


async def lock_waiting(session: AsyncSession, model: str, now: float) -> Sequence[RoutedJob]:
    """The model's queued jobs still within their deadline (the late are ended, not served), oldest first;
    locked, skipping those another router replica holds."""
    return (
        await session.scalars(
            select(RoutedJob)
            .where(RoutedJob.model == model, RoutedJob.status == JobStatus.QUEUED, RoutedJob.deadline > now)
            .order_by(RoutedJob.created_at)
            .with_for_update(skip_locked=True)
        )
    ).all()


# --- jobs -----------------------------------------------------------------------------------------


async def job(session: AsyncSession, job_id: str, *, for_update: bool = False) -> RoutedJob | None:
    return await session.get(RoutedJob, job_id, with_for_update=for_update)


# id, driver_node, client_node, status, streamed, model, traceparent, tokens_counted
RelayView = Row[str, str | None, str, str, bool, str, str | None, bool]


async def relay_view(session: AsyncSession, job_id: str) -> RelayView | None:
    """What relaying an update of the job needs to know of it."""
    return (await session.execute(select(*_RELAY_COLUMNS).where(RoutedJob.id == job_id))).first()


async def running_on(session: AsyncSession, node: str, *, dispatched_before: float | None = None, except_ids: Sequence[str] = ()) -> Sequence[RoutedJob]:
    """Jobs running on driver `node`; with `dispatched_before`, only those handed over earlier, and not in `except_ids`."""
    condition = (RoutedJob.driver_node == node) & (RoutedJob.status == JobStatus.RUNNING)
    if dispatched_before is not None:
        condition &= (RoutedJob.dispatched_at < dispatched_before) & RoutedJob.id.not_in(except_ids)
    return (await session.scalars(select(RoutedJob).where(condition))).all()


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


async def end(session: AsyncSession, job_id: str, status: JobStatus, now: float, *, tokens_counted: bool) -> Ended | None:
    """End the job as `status`, unless it has ended already (another event, or another replica, came first)."""
    ended = (
        await session.execute(
            update(RoutedJob)
            .where(RoutedJob.id == job_id, RoutedJob.status.not_in(FINAL_STATUSES))
            .values(status=status, finished_at=now, tokens_counted=tokens_counted)
            .returning(RoutedJob.client_node, RoutedJob.api_key_label, RoutedJob.created_at)
            .execution_options(synchronize_session=False)
        )
    ).first()
    return None if ended is None else Ended(*ended)


async def count_late_tokens(session: AsyncSession, job_id: str) -> LateCounted | None:
    """Mark the tokens of a job the router had ended as counted now; None if they were already."""
    counted = (
        await session.execute(
            update(RoutedJob)
            .where(RoutedJob.id == job_id, RoutedJob.tokens_counted.is_(False))
            .values(tokens_counted=True)
            .returning(RoutedJob.client_node, RoutedJob.api_key_label, RoutedJob.model, RoutedJob.finished_at)
            .execution_options(synchronize_session=False)
        )
    ).first()
    return None if counted is None else LateCounted(*counted)


async def mark_streamed(session: AsyncSession, job_id: str, driver: str) -> bool:
    """Part of the job reached its client from `driver`: it can no longer go to another driver.  False if it no
    longer runs on `driver` (it ended, or was taken back, meanwhile)."""
    marked = await session.execute(
        update(RoutedJob)
        .where(RoutedJob.id == job_id, RoutedJob.driver_node == driver, RoutedJob.status == JobStatus.RUNNING)
        .values(streamed=True)
        .execution_options(synchronize_session=False)
    )
    return bool(marked.rowcount)  # type: ignore[attr-defined]
