"""A node's entry point for messages from other nodes (admin commands from its owner: `handlers.admin`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import BaseModel

from handlers import admin, driver, router, tracing
from handlers.context import NodeContext
from handlers.errors import ErrorCode, HandlerError
from schemas.messages import (
    TAKES_NODE_MESSAGES,
    CancelJob,
    Envelope,
    JobUpdateMessage,
    Message,
    Process,
    QueuePosition,
    ReleaseJob,
    RunJob,
    Source,
    name_of,
    parse_message,
)

Handler = Callable[[NodeContext, Source, Message], Awaitable[BaseModel]]

PROCESSES: dict[Process, Handler] = {"driver": driver.handle, "router": router.handle}  # the openai process takes no messages from nodes


async def deliver(ctx: NodeContext, source: Source, target: Process, message: Message) -> BaseModel:
    """A message between two processes of this node, or checked and parsed from another node (`receive`)."""
    handler = PROCESSES.get(target)
    if handler is None:
        raise HandlerError(400, ErrorCode.UNSUPPORTED_MESSAGE, f"the {target} process takes no messages from other processes")
    return await handler(ctx, source, message)


async def receive(ctx: NodeContext, envelope: Envelope, traceparent: str | None = None) -> BaseModel:
    """A message from another node, with the trace context its HTTP request carried.  Admin messages never come this way."""
    if admin.is_admin(envelope.body):
        name = name_of(envelope.body)
        raise HandlerError(403, ErrorCode.ADMIN_ONLY, f"{name} is an admin message; only {ctx.name} itself may send it")
    if envelope.target not in TAKES_NODE_MESSAGES:
        raise HandlerError(400, ErrorCode.UNSUPPORTED_MESSAGE, f"the {envelope.target} process takes no messages from other nodes")
    message = parse_message(envelope.target, envelope.body)
    if (job_id := job_of(message)) is not None:
        tracing.set_job(job_id, traceparent)
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
