"""Streamed chunks → the whole answer, by OpenAI's rules (what a non-streamed request would have got).

Per choice index: text fields are joined (`content`, `refusal`, `reasoning_content`, a legacy
completion's `text`, a tool call's `arguments`), tool calls are joined by their `index`, log
probabilities are concatenated, and identity fields (`role`, `id`, `type`, `index`,
`finish_reason`) take the last value given.  Top-level fields (`usage`, `system_fingerprint`,
...) take the last value given.  Pure functions: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from schemas.openai_api import JobKind

# Given once, or repeated whole (llama.cpp repeats a tool call's id and name in every fragment), never continued.
_REPLACED = frozenset({"role", "id", "type", "index", "name", "finish_reason", "object", "created", "model"})
_CHUNK_ENVELOPE = frozenset({"id", "object", "created", "choices"})


def merge(into: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """Add one streamed fragment to what was assembled so far (in place; also returned)."""
    for key, value in fragment.items():
        if value is None:
            into.setdefault(key, None)
            continue
        held = into.get(key)
        if held is None or key in _REPLACED:
            into[key] = copy.deepcopy(value)
        elif isinstance(held, str) and isinstance(value, str):
            into[key] = held + value
        elif isinstance(held, dict) and isinstance(value, dict):
            merge(held, value)
        elif isinstance(held, list) and isinstance(value, list):
            _merge_list(held, value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def _merge_list(held: list[Any], items: list[Any]) -> None:
    """Entries with an `index` (tool calls) continue the entry of the same index; others are appended."""
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if isinstance(index, int):
            same = next((entry for entry in held if isinstance(entry, dict) and entry.get("index") == index), None)
            if same is not None:
                merge(same, item)
                continue
        held.append(copy.deepcopy(item))


def assemble(kind: JobKind, chunks: Iterable[dict[str, Any]], *, response_id: str, created: int, model: str) -> dict[str, Any]:
    """The whole answer from its chunks (without `id`, `object`, `created`: those are given)."""
    if kind is JobKind.EMBEDDING:
        result = next(iter(chunks), {})
        return {"object": "list", **result, "model": result.get("model", model)}
    top: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        top.update({key: value for key, value in chunk.items() if key not in _CHUNK_ENVELOPE and value is not None})
        for choice in chunk.get("choices") or []:
            merge(choices.setdefault(int(choice.get("index", 0)), {}), choice)
    return {
        "id": response_id,
        "object": kind.response_object,
        "created": created,
        "model": top.pop("model", model),
        "choices": [_whole_choice(kind, index, choices[index]) for index in sorted(choices)],
        **top,
    }


def _whole_choice(kind: JobKind, index: int, merged: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": index, **merged}
    choice.setdefault("logprobs", None)
    choice.setdefault("finish_reason", None)
    if kind is JobKind.CHAT:
        message = choice.pop("delta", None) or {}
        message.setdefault("role", "assistant")
        message.setdefault("content", None)
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict):
                call.pop("index", None)  # it only orders a stream's fragments
        choice["message"] = message
    else:
        choice.setdefault("text", "")
    return choice


def choice_text(kind: JobKind, chunk: dict[str, Any], index: int = 0) -> str:
    """The text one chunk adds to choice `index`: a chat delta's content, or a completion's text."""
    text = ""
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != index:
            continue
        part = (choice.get("delta") or {}).get("content") if kind is JobKind.CHAT else choice.get("text")
        if isinstance(part, str):
            text += part
    return text


def carries_output(chunk: dict[str, Any]) -> bool:
    """Whether a chunk says anything beyond an assistant's role (which the next chunk can carry along)."""
    if chunk.get("usage") is not None:
        return True
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason") is not None or choice.get("logprobs") is not None or choice.get("text"):
            return True
        if any(value not in (None, "", []) for key, value in (choice.get("delta") or {}).items() if key != "role"):
            return True
    return False


def adds_output(kind: JobKind, chunk: dict[str, Any], index: int = 0) -> bool:
    """Whether a chunk carries generated output for choice `index`: text, a tool call's fragment, a refusal,
    reasoning (what max_tokens counts), as opposed to a role, a finish_reason, logprobs or usage alone."""
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != index:
            continue
        if kind is not JobKind.CHAT:
            return bool(choice.get("text"))
        if any(value not in (None, "", []) for key, value in (choice.get("delta") or {}).items() if key != "role"):
            return True
    return False


def finish_chunk(kind: JobKind, indexes: Iterable[int], finish_reason: str | None) -> dict[str, Any]:
    """A chunk that ends the given choices with `finish_reason` (the network's own, where the LLM gave none)."""
    if kind is JobKind.COMPLETION:
        return {"choices": [{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason} for index in indexes]}
    return {"choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason} for index in indexes]}


def finish_reason_of(chunk: dict[str, Any], index: int = 0) -> str | None:
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) == index and choice.get("finish_reason") is not None:
            return str(choice["finish_reason"])
    return None


def has_finish_reason(chunk: dict[str, Any]) -> bool:
    return any(choice.get("finish_reason") is not None for choice in chunk.get("choices") or [])
