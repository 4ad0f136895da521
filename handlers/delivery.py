"""Delivering a served job's updates to where the job came from: this node's own client, or the router.

A store that refuses writes, or a router that answers 503 (restarting), is tried again with backoff until
the job's deadline.  Repeats are safe: receivers ignore the seqs they know.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from handlers import router, updates
from handlers.context import NodeContext, log
from handlers.errors import PeerError
from schemas.jobs import JobUpdate
from schemas.messages import ACCEPT_MARGIN_S, JobUpdateMessage
from store.errors import StorageUnavailable

DELIVERY_BACKOFF_S = 0.1
DELIVERY_BACKOFF_MAX_S = 2.0
DELIVERY_TIMEOUT_S = 10.0  # the longest one attempt to deliver an update waits for the router
FINAL_DELIVERY_GRACE_S = 5.0  # a timed_out update is sent at the deadline, and still needs a moment to arrive


class Undeliverable(Exception):
    """The job's origin takes no more of its updates: the router refused them (the job ended there, or went to
    another driver), or did not answer before the deadline; on the local path, the job ended meanwhile."""


async def deliver(ctx: NodeContext, origin: str, update: JobUpdate, deadline: float) -> None:
    """Raises Undeliverable, or StorageUnavailable if this node's store refused the update until `deadline`."""

    async def attempt() -> None:
        if origin != ctx.name:
            # Each attempt ends by the deadline, yet waits long enough for the router to say that the client
            # node does not answer (it waits RELAY_TIMEOUT_S for it) before we give up on the router.
            wait = min(DELIVERY_TIMEOUT_S, max(deadline - time.time(), router.RELAY_TIMEOUT_S + ACCEPT_MARGIN_S))
            await ctx.transport.send("driver", origin, "router", JobUpdateMessage(update=update), timeout=wait)
        elif not await updates.record_update(ctx, update) and not update.is_final:
            raise Undeliverable(f"job {update.job_id} already ended")  # cancelled, perhaps through another process of this node

    try:
        await again_while_unavailable(f"job {update.job_id}: update {update.seq} to {origin}", attempt, deadline)
    except PeerError as error:
        raise Undeliverable(f"{origin}: {error.message}") from error


async def again_while_unavailable(what: str, attempt: Callable[[], Awaitable[None]], deadline: float) -> None:
    """`attempt()`, and again with backoff while the store refuses writes or the peer answers 503, until `deadline`."""
    backoff = DELIVERY_BACKOFF_S
    while True:
        try:
            await attempt()
            return
        except PeerError as error:
            if error.status != 503 or time.time() + backoff > deadline:
                raise
            reason = error.message
        except StorageUnavailable as error:
            if time.time() + backoff > deadline:
                raise
            reason = f"the store is unavailable: {error}"
        log.warning("%s: %s; retried in %.1f s", what, reason, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, DELIVERY_BACKOFF_MAX_S)
