"""How the network counts tokens, without a node: a job's budget of output, and usage estimated from text."""

from __future__ import annotations

import math
from typing import Any

from handlers.accounting import estimate, output_chunk_count
from handlers.openai import TokenBudget
from schemas.openai_api import JobKind
from schemas.usage import TokenCount
from tests.upstreams import chat_chunk, delta, usage_chunk


def test_the_budget_counts_output_fragments_or_the_llms_own_count_whichever_is_more() -> None:
    role, text = chat_chunk(delta(role="assistant", content="")), chat_chunk(delta(content="a"))
    finish, usage = chat_chunk(delta(finish_reason="length")), usage_chunk()
    budget = TokenBudget.of({"max_tokens": 5, "max_completion_tokens": 2})
    assert budget.limit == 2  # the smaller
    assert [budget.goes_past(JobKind.CHAT, chunk) for chunk in (role, text, text, finish, usage, text)] == [False] * 5 + [True]

    budget = TokenBudget.of({"max_tokens": 3})
    assert not budget.goes_past(JobKind.CHAT, text | {"usage": {"completion_tokens": 3}})  # several tokens in one chunk, says the LLM
    assert budget.goes_past(JobKind.CHAT, text)
    budget = TokenBudget.of({"max_tokens": 3, "n": 2})  # the LLM's count covers both choices: not choice 0's
    assert not budget.goes_past(JobKind.CHAT, text | {"usage": {"completion_tokens": 6}})
    assert TokenBudget.of({"max_tokens": True}).limit is None and TokenBudget.of({"max_tokens": -1}).limit is None


def test_tokens_of_a_prompt_are_estimated_from_its_text() -> None:
    parts = [{"type": "text", "text": "abc"}, {"type": "image_url", "image_url": {"url": "data:" + "x" * 1000}}]
    chat = {"messages": [{"role": "user", "content": "12345"}, {"role": "user", "content": parts}]}
    # 8 characters of text, the image aside: 2 tokens
    assert estimate(JobKind.CHAT, chat, 7) == TokenCount(prompt_tokens=math.ceil(8 / 4), completion_tokens=7, estimated=True)
    assert estimate(JobKind.COMPLETION, {"prompt": ["abcd", "efgh"]}, 0).prompt_tokens == 2
    assert estimate(JobKind.EMBEDDING, {"input": [1, 2, 3]}, 0).prompt_tokens == 3
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1}},
    ]
    assert output_chunk_count(chunks) == 2
