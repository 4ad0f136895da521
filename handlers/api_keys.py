"""Keys for HTTP clients of a node.  Only a key's SHA-256 is stored; the key is shown once, at creation."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from handlers.config import read_config
from handlers.context import NodeContext
from handlers.errors import ErrorCode, HandlerError
from schemas.messages import ApiKeyCreated
from schemas.ui import UI_CLIENT
from store.models import ApiKey, NodeConfig

KEY_PREFIX = "llmp-"


@dataclass(frozen=True)
class Caller:
    """An HTTP client as the host saw it: the key it presented, if any, its address, and the W3C trace
    context it sent (`traceparent`), which a job it submits continues; or the node's own web page,
    whose access the page's routes have checked (loopback, or a login session)."""

    bearer: str | None
    address: str
    is_ui: bool = False
    traceparent: str | None = None


def digest(secret: str) -> str:
    """What is stored of a secret (an API key, a login token, a session cookie)."""
    return hashlib.sha256(secret.encode()).hexdigest()


async def create(ctx: NodeContext, label: str) -> ApiKeyCreated:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        async with ctx.store.writing() as session:
            session.add(ApiKey(label=label, key_hash=digest(key), created_at=time.time()))
    except IntegrityError as error:
        raise HandlerError(409, ErrorCode.KEY_EXISTS, f"an API key labelled {label!r} exists; revoke it first") from error
    return ApiKeyCreated(label=label, key=key)


async def revoke(ctx: NodeContext, label: str) -> None:
    async with ctx.store.writing() as session:
        result = await session.execute(delete(ApiKey).where(ApiKey.label == label))
    if not result.rowcount:  # type: ignore[attr-defined]
        raise HandlerError(404, ErrorCode.KEY_NOT_FOUND, f"no API key labelled {label!r}")


async def identify(session: AsyncSession, config: NodeConfig, caller: Caller) -> str:
    """`key:<label>` for a valid key; the caller's address where keys are not required (OpenAI
    clients always send some key, so an unknown one is no error there); else 401.  The web page is `ui`."""
    if caller.is_ui:
        return UI_CLIENT
    label = await session.scalar(select(ApiKey.label).where(ApiKey.key_hash == digest(caller.bearer))) if caller.bearer else None
    if label is not None:
        return f"key:{label}"
    if config.require_api_keys:
        raise HandlerError(401, ErrorCode.INVALID_API_KEY, "this node needs a valid API key: Authorization: Bearer <key>")
    return f"http:{caller.address}"


def key_label(client: str) -> str | None:
    """The label of the API key an identity (`identify`) stands for; None for a client without a key."""
    return client.removeprefix("key:") if client.startswith("key:") else None


async def client_identity(ctx: NodeContext, caller: Caller) -> str:
    async with ctx.store.reading() as session:
        return await identify(session, await read_config(session), caller)
