"""What the node's web page shows: the network as this node sees it, its recent jobs, and both live."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from enum import StrEnum

from pydantic import BaseModel
from sqlalchemy import select

from handlers import router
from handlers.config import read_config
from handlers.context import NodeContext
from handlers.errors import PeerError
from schemas.jobs import JobStatus
from schemas.messages import RouterState, RouterView
from schemas.ui import JobList, JobRow, NetworkNode, NetworkView, NodeRole
from store.models import Job, NodeConfig

RECENT_JOBS = 50
NETWORK_REFRESH_S = 1.0  # news of the router's drivers and queues comes by no event here: it is asked this often
JOBS_SETTLE_S = 0.2  # a streaming job wakes the page at most this often: its chunks come together
HEARTBEAT_S = 15.0


class LiveEvent(StrEnum):
    """The events of the page's live stream; each carries the whole view, sent when it changed."""

    NETWORK = "network"  # a NetworkView
    JOBS = "jobs"  # a JobList


def roles_of(ctx: NodeContext, config: NodeConfig) -> list[NodeRole]:
    roles = [NodeRole.ROUTER] if config.is_router else []
    if config.driver_models:
        roles.append(NodeRole.DRIVER)
    if config.router_node not in (None, ctx.name):  # a router that routes its own node's jobs is no client of another
        roles.append(NodeRole.CLIENT)
    return roles


async def network(ctx: NodeContext, peers: list[str]) -> NetworkView:
    """This node, its router's drivers and queues (this node's own if it routes), and the nodes it knows
    of: from the router, and `peers` (its directory)."""
    async with ctx.store.reading() as session:
        config = await read_config(session)
    state, router_error = RouterState(drivers=[], queues={}), None
    if config.is_router:
        state = await router.state(ctx)
    elif config.router_node is not None:
        try:
            state = RouterState.model_validate(await ctx.transport.send("driver", config.router_node, "router", RouterView()))
        except PeerError as error:
            router_error = error.message
    roles = roles_of(ctx, config)
    known: dict[str, set[NodeRole]] = {name: set() for name in peers}
    known[ctx.name] = set(roles)
    if config.router_node is not None:
        known.setdefault(config.router_node, set()).add(NodeRole.ROUTER)
    for driver in state.drivers:
        known.setdefault(driver.node, set()).add(NodeRole.DRIVER)
    offered = {model for d in state.drivers if d.is_public or d.node == ctx.name for model in d.models} if config.router_node else set()
    return NetworkView(
        node=ctx.name,
        roles=roles,
        router=config.router_node,
        models=config.driver_models,
        capacity=config.driver_capacity if config.driver_models else None,
        nodes=[NetworkNode(name=name, roles=[role for role in NodeRole if role in known[name]]) for name in sorted(known)],
        drivers=state.drivers,
        queues=state.queues,
        reachable_models=sorted(offered | set(config.driver_models)),
        router_error=router_error,
    )


async def recent_jobs(ctx: NodeContext, limit: int = RECENT_JOBS) -> JobList:
    """The jobs clients gave this node, newest first."""
    columns = (
        Job.id, Job.status, Job.model, Job.client, Job.router_node, Job.driver_node, Job.created_at, Job.first_token_at,
        Job.finished_at, Job.usage, Job.next_seq,
    )
    async with ctx.store.reading() as session:
        rows = (await session.execute(select(*columns).order_by(Job.created_at.desc()).limit(limit))).all()
    return JobList(
        jobs=[
            JobRow(
                job_id=row.id, status=row.status, model=row.model, client=row.client, router=row.router_node, driver=row.driver_node,
                created_at=row.created_at, first_token_at=row.first_token_at, finished_at=row.finished_at,
                tokens=(row.usage or {}).get("completion_tokens"), chunks=row.next_seq,
            )
            for row in rows
        ]
    )


async def live(ctx: NodeContext, peers: Callable[[], list[str]]) -> AsyncIterator[tuple[LiveEvent, str] | None]:
    """Both views at once (as JSON), then each again whenever it changes; None when a heartbeat is due.

    Jobs are read again at news of any job, and with every look at the network (for news written by
    other processes of the node).  The network changes on the router, which sends no news of it: it is
    asked every NETWORK_REFRESH_S, and at once when a job here starts or ends (a driver's load moves).
    """
    loop = asyncio.get_running_loop()
    sent: dict[LiveEvent, str] = {}
    statuses: list[tuple[str, JobStatus]] = []
    network_due = heartbeat_due = loop.time()
    while not ctx.closing:
        news = ctx.signals.watch_any()
        jobs = await recent_jobs(ctx)
        views: list[tuple[LiveEvent, BaseModel]] = [(LiveEvent.JOBS, jobs)]
        now_statuses = [(job.job_id, job.status) for job in jobs.jobs]
        if loop.time() >= network_due or now_statuses != statuses:
            views.append((LiveEvent.NETWORK, await network(ctx, peers())))
            network_due = loop.time() + NETWORK_REFRESH_S
        statuses = now_statuses
        for event, view in views:
            text = view.model_dump_json()
            if sent.get(event) != text:
                sent[event] = text
                heartbeat_due = loop.time() + HEARTBEAT_S
                yield event, text
        if loop.time() >= heartbeat_due:
            heartbeat_due = loop.time() + HEARTBEAT_S
            yield None
        try:
            await asyncio.wait_for(news.wait(), max(network_due - loop.time(), 0.0))
        except TimeoutError:
            continue
        await asyncio.sleep(JOBS_SETTLE_S)
