"""A router's daily token budgets: per client node, and per API key, a key named by its (client node, label).

A budget counts the prompt and completion tokens of the jobs the router ended for it that UTC day
(its usage rows), so it holds across restarts and across router replicas sharing the store.  A job
may overshoot; the next submission is refused with 429 until the next day begins.
"""

from __future__ import annotations

import datetime as dt
import math
import time

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from handlers.context import NodeContext
from handlers.errors import ErrorCode, HandlerError
from schemas.messages import SetBudget
from schemas.usage import BudgetState, Role, utc_day
from store.database import insert_or_ignore
from store.models import Budget, UsageDay

NODE_WIDE = ""  # the key label of a client node's own budget


async def set_budget(ctx: NodeContext, message: SetBudget) -> None:
    key = {"client_node": message.client, "key_label": message.label or NODE_WIDE}
    async with ctx.store.writing() as session:
        await session.execute(delete(Budget).where(Budget.client_node == message.client, Budget.key_label == key["key_label"]))
        if message.daily_tokens is not None:
            await session.execute(insert_or_ignore(session, Budget).values(**key, daily_tokens=message.daily_tokens))


def name_of(client: str, label: str) -> str:
    return f"{client}/{label}" if label else client


async def check(session: AsyncSession, client: str, label: str | None, now: float) -> None:
    """Refuse a job of `client` (presented with API key `label`) if a budget of it is used up today."""
    labels = [NODE_WIDE] + ([label] if label else [])
    found = (await session.scalars(_BUDGETS_OF, {"client": client, "labels": labels})).all()
    if not found:
        return
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    for budget in sorted(found, key=lambda b: b.key_label):
        used = await _used(session, client, budget.key_label, today.isoformat())
        if used >= budget.daily_tokens:
            renews = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.UTC)
            name = name_of(client, budget.key_label)
            whose = f"API key {budget.key_label!r} of {client}" if budget.key_label else f"client node {client}"
            raise HandlerError(
                429, ErrorCode.BUDGET_EXHAUSTED,
                f"the daily token budget {name!r} ({whose}: {budget.daily_tokens} tokens) is used up ({used} tokens today); "
                f"it renews at {renews.isoformat()}",
                {"budget": name, "client": client, "label": budget.key_label or None, "daily_tokens": budget.daily_tokens,
                 "used_today": used, "renews_at": renews.isoformat()},
                retry_after=float(math.ceil(renews.timestamp() - now)),
            )


_BUDGETS_OF = select(Budget).where(Budget.client_node == bindparam("client"), Budget.key_label.in_(bindparam("labels", expanding=True)))


async def _used(session: AsyncSession, client: str, label: str, day: str) -> int:
    conditions = [UsageDay.day == day, UsageDay.role == Role.ROUTER.value, UsageDay.client == client]
    if label != NODE_WIDE:
        conditions.append(UsageDay.key_label == label)
    used = await session.scalar(select(func.sum(UsageDay.prompt_tokens + UsageDay.completion_tokens)).where(*conditions))
    return int(used or 0)


async def states(session: AsyncSession, client: str | None = None) -> list[BudgetState]:
    """Every budget (of `client`), and what it has used today."""
    query = select(Budget).order_by(Budget.client_node, Budget.key_label)
    if client is not None:
        query = query.where(Budget.client_node == client)
    today = utc_day(time.time())
    return [
        BudgetState(
            client=budget.client_node, label=budget.key_label or None, daily_tokens=budget.daily_tokens,
            used_today=await _used(session, budget.client_node, budget.key_label, today),
        )
        for budget in (await session.scalars(query)).all()
    ]
