"""Logins to the node's web page for browsers elsewhere (a browser on the node's machine needs none).

`CreateUiLogin` makes a one-time token, shown once, inside a login path.  The browser that opens
that path first spends the token and gets a session cookie in its place.  Only SHA-256s of the
token and of the cookie are stored, so neither can be read back from the database.
"""

from __future__ import annotations

import secrets
import time

from sqlalchemy import select, update

from handlers.api_keys import digest
from handlers.context import NodeContext
from handlers.errors import ErrorCode, HandlerError
from schemas.messages import UiLoginCreated
from store.models import UiLogin

LOGIN_PATH = "/ui/login"
SESSION_S = 12 * 3600.0


async def create(ctx: NodeContext, valid_for: float) -> UiLoginCreated:
    token = secrets.token_urlsafe(32)
    now = time.time()
    async with ctx.store.writing() as session:
        session.add(UiLogin(token_hash=digest(token), session_hash=None, created_at=now, expires_at=now + valid_for))
    return UiLoginCreated(path=f"{LOGIN_PATH}?token={token}", expires_at=now + valid_for)


async def log_in(ctx: NodeContext, token: str) -> str:
    """Spend a login token: the new session's cookie; 403 if the token is unknown, spent or expired."""
    cookie = secrets.token_urlsafe(32)
    now = time.time()
    spend = (
        update(UiLogin)
        .where(UiLogin.token_hash == digest(token), UiLogin.session_hash.is_(None), UiLogin.expires_at > now)
        .values(session_hash=digest(cookie), expires_at=now + SESSION_S)
        .execution_options(synchronize_session=False)
    )
    async with ctx.store.writing() as session:
        spent = (await session.execute(spend)).rowcount  # type: ignore[attr-defined]
    if not spent:
        raise HandlerError(403, ErrorCode.LOGIN_REFUSED, "this login URL is unknown, used already or expired; get a new one with `emulator ui -p PORT`")
    return cookie


async def session_key(ctx: NodeContext, cookie: str) -> str | None:
    """What identifies a live session (the cookie's digest), or None if the cookie opens none."""
    key = digest(cookie)
    async with ctx.store.reading() as session:
        found = await session.scalar(select(UiLogin.session_hash).where(UiLogin.session_hash == key, UiLogin.expires_at > time.time()))
    return found

