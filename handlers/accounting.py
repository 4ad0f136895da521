"""Usage accounting: each node counts the jobs it ended, per UTC day, role, client and model, in the
same transaction that ends each job; and reads it back for `GET /usage`.

What a job counts is what the LLM consumed and produced: its own usage where it reported one, else
an estimate marked as such (completion tokens: the chunks it streamed, one token each; prompt tokens:
a quarter of the prompt's characters).  A cancelled job, a job whose client hung up and a job cut
by its deadline count what was produced before the end.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from handlers import budgets
from handlers.context import NodeContext
from schemas.openai_api import JobKind, Usage
from schemas.usage import Role, TokenCount, UsageQuery, UsageReport, UsageRow
from store.database import insert_or_add
from store.models import UsageDay

CHARACTERS_PER_TOKEN = 4  # the usual rule of thumb for English text, where nothing better is known


async def record(
    session: AsyncSession, *, role: Role, day: str, client: str, model: str, tokens: TokenCount | None,
    label: str | None = None, jobs: int = 1,
) -> None:
    """Add `jobs` ended jobs and their tokens to the day's row (within the caller's transaction)."""
    tokens = tokens or TokenCount(estimated=True)
    key = {"day": day, "role": role.value, "client": client, "key_label": label or "", "model": model}
    amounts = {
        "jobs": jobs, "prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
        "estimated_jobs": int(tokens.estimated and jobs > 0),
    }
    await insert_or_add(session, UsageDay, key, amounts)


def counted(tokens: TokenCount | None, usage: Usage | None) -> TokenCount | None:
    """What a final update says the job consumed: the serving driver's count, else the LLM's usage."""
    if tokens is not None:
        return tokens
    return TokenCount.of(usage) if usage is not None else None


# --- estimates -----------------------------------------------------------------------------------


def estimate(kind: JobKind, body: dict[str, Any], output_chunks: int) -> TokenCount:
    """Tokens of a job whose LLM reported no usage: its prompt's characters / 4, and one per chunk of output."""
    prompt = math.ceil(_prompt_characters(kind, body) / CHARACTERS_PER_TOKEN)
    return TokenCount(prompt_tokens=prompt, completion_tokens=output_chunks, estimated=True)


def output_chunk_count(chunks: list[dict[str, Any]] | None) -> int:
    """How many of the LLM's chunks carried output: text, a tool call's fragment, a refusal, reasoning."""
    return sum(1 for chunk in chunks or [] if _carries_tokens(chunk))


def _carries_tokens(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and any(value not in (None, "", []) for key, value in delta.items() if key != "role"):
            return True
    return False


def _prompt_characters(kind: JobKind, body: dict[str, Any]) -> int:
    if kind is JobKind.CHAT:
        return sum(_text_length(message.get("content")) for message in body.get("messages") or [] if isinstance(message, dict))
    return _text_length(body.get("prompt" if kind is JobKind.COMPLETION else "input"))


def _text_length(value: Any) -> int:
    """Characters of text in a prompt: a string, a list of strings or token ids, or content parts (their `text`)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return CHARACTERS_PER_TOKEN  # a token id
    if isinstance(value, dict):
        return _text_length(value.get("text"))
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    return 0


# --- reading --------------------------------------------------------------------------------------


async def report(ctx: NodeContext, query: UsageQuery) -> UsageReport:
    conditions = []
    if query.client is not None:
        conditions.append(UsageDay.client == query.client)
    if query.model is not None:
        conditions.append(UsageDay.model == query.model)
    if query.role is not None:
        conditions.append(UsageDay.role == query.role.value)
    if query.label is not None:
        conditions.append(UsageDay.key_label == query.label)
    if query.since is not None:
        conditions.append(UsageDay.day >= query.since.isoformat())
    if query.until is not None:
        conditions.append(UsageDay.day <= query.until.isoformat())
    order = (UsageDay.day, UsageDay.role, UsageDay.client, UsageDay.key_label, UsageDay.model)
    async with ctx.store.reading() as session:
        rows = (await session.scalars(select(UsageDay).where(*conditions).order_by(*order))).all()
        states = await budgets.states(session, query.client)
    return UsageReport(
        usage=[
            UsageRow(
                day=dt.date.fromisoformat(row.day), role=Role(row.role), client=row.client, label=row.key_label or None,
                model=row.model, jobs=row.jobs, prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                estimated_jobs=row.estimated_jobs,
            )
            for row in rows
        ],
        budgets=states,
    )
