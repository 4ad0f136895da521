"""A node's entry points for messages: from other nodes, and admin commands from itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from handlers import driver, openai, router, tracing
from handlers.context import NodeContext
from handlers.errors import HandlerError
from schemas.messages import (
    ADMIN_MESSAGES,
    ADMIN_TARGET,
    CancelJob,
    Envelope,
    JobUpdateMessage,
    Message,
    Process,
    QueuePosition,
    ReleaseJob,
    RunJob,
    Source,
    parse_message,
    untag,
)

Handler = Callable[[NodeContext, Source, Message], Awaitable[BaseModel]]

PROCESSES: dict[Process, Handler] = {"driver": driver.handle, "router": router.handle, "openai": openai.handle}


async def deliver(ctx: NodeContext, source: Source, target: Process, message: Message) -> BaseModel:
    return await PROCESSES[target](ctx, source, message)


async def receive(ctx: NodeContext, envelope: Envelope, traceparent: str | None = None) -> BaseModel:
    """A message from another node, with the trace context its HTTP request carried.  Admin messages never come this way."""
    message = parse_message(envelope.target, envelope.body)
    if (job_id := job_of(message)) is not None:
        tracing.set_job(job_id, traceparent)
    if isinstance(message, ADMIN_MESSAGES):
        raise HandlerError(403, "admin_only", f"{message.type} is an admin message; only {ctx.name} itself may send it")  # type: ignore[attr-defined]
    return await deliver(ctx, envelope.source, envelope.target, message)


def job_of(message: Message) -> str | None:
    """The job a message is about, if any."""
    match message:
        case RunJob(job=spec):
            return spec.job_id
        case JobUpdateMessage(update=update):
            return update.job_id
        case CancelJob(job_id=job_id) | ReleaseJob(job_id=job_id) | QueuePosition(job_id=job_id):
            return job_id
    return None


async def admin(ctx: NodeContext, target: Process | None, raw: Any) -> BaseModel:
    """An admin command, already authenticated as coming from the node's owner."""
    if target is None:
        name = untag(raw).get("type") if isinstance(untag(raw), dict) else None
        if name not in ADMIN_TARGET:
            raise HandlerError(422, "not_an_admin_message", f"not an admin message; expected one of {', '.join(ADMIN_TARGET)}")
        target = ADMIN_TARGET[name]
    message = parse_message(target, raw)
    if not isinstance(message, ADMIN_MESSAGES):
        raise HandlerError(422, "not_an_admin_message", f"{message.type} is not an admin message")  # type: ignore[attr-defined]
    return await deliver(ctx, Source(node=ctx.name, process=target), target, message)


