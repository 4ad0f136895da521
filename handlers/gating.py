"""Who a router serves.  One function decides, before anything is queued; swap it for your own rule
(an on-chain check, a payment) by setting `NodeContext.gate`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from handlers.config import read_config
from schemas.jobs import JobSpec, JobStatus
from store.models import RoutedJob

Gate = Callable[[JobSpec, str, AsyncSession], Awaitable[str | None]]
"""(job, requesting node, store session) → None to allow, or the reason for refusing."""


async def lists_and_limits(job: JobSpec, requester: str, session: AsyncSession) -> str | None:
    """The default gate: the allow and deny lists, and the per-client limit of jobs in flight."""
    config = await read_config(session)
    if requester in config.deny_clients:
        return f"{requester} is on this router's deny list"
    if config.allow_clients is not None and requester not in config.allow_clients:
        return f"{requester} is not on this router's allow list"
    if config.max_in_flight_per_client is not None:
        in_flight = await session.scalar(
            select(func.count()).where(RoutedJob.client_node == requester, RoutedJob.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
        )
        if (in_flight or 0) >= config.max_in_flight_per_client:
            return f"{requester} already has {in_flight} jobs in flight (limit {config.max_in_flight_per_client})"
    return None
