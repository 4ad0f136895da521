"""Chunks → the whole answer, by OpenAI's rules: pure functions, no servers."""

from __future__ import annotations

from typing import Any

from handlers.assembly import assemble, carries_output, choice_text
from schemas.jobs import JobSpec, output_chunks
from schemas.openai_api import JobKind


def chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"choices": list(choices), **top}


def whole(kind: JobKind, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    return assemble(kind, chunks, response_id="chatcmpl-1", created=7, model="m")


def test_text_joins_per_choice_and_identity_fields_are_not_repeated() -> None:
    answer = whole(JobKind.CHAT, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "He"}}, {"index": 1, "delta": {"role": "assistant", "content": "Bo"}}),
        chunk({"index": 0, "delta": {"role": "assistant", "content": "llo"}}, system_fingerprint="fp"),
        chunk({"index": 1, "delta": {"content": "njour"}, "finish_reason": "length"}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
        chunk(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
    ])
    assert answer == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m", "system_fingerprint": "fp",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "Bonjour"}, "logprobs": None, "finish_reason": "length"},
        ],
    }


def test_tool_calls_join_by_index_even_when_a_server_repeats_id_and_name() -> None:
    def fragment(index: int, arguments: str, **first: Any) -> dict[str, Any]:
        return chunk({"index": 0, "delta": {"tool_calls": [{"index": index, "function": {"arguments": arguments, **first.pop("function", {})}, **first}]}})

    answer = whole(JobKind.CHAT, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": None}}),
        fragment(0, '{"ci', id="call_a", type="function", function={"name": "weather"}),
        fragment(1, '{}', id="call_b", type="function", function={"name": "time"}),
        fragment(0, 'ty": "Oslo"}', id="call_a", type="function", function={"name": "weather"}),  # llama.cpp repeats both
        chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}),
    ])
    assert answer["choices"][0]["message"] == {
        "role": "assistant", "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
        ],
    }


def test_logprobs_concatenate_for_chat_and_legacy_completions() -> None:
    chat = whole(JobKind.CHAT, [
        chunk({"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [{"token": "a", "logprob": -1.0}], "refusal": None}}),
        chunk({"index": 0, "delta": {"content": "b"}, "logprobs": {"content": [{"token": "b", "logprob": -2.0}], "refusal": None}}),
    ])
    assert chat["choices"][0]["logprobs"] == {"content": [{"token": "a", "logprob": -1.0}, {"token": "b", "logprob": -2.0}], "refusal": None}
    legacy = whole(JobKind.COMPLETION, [
        chunk({"index": 0, "text": "x", "logprobs": {"tokens": ["x"], "token_logprobs": [-0.5], "top_logprobs": [{"x": -0.5}], "text_offset": [0]}}),
        chunk({"index": 0, "text": "y", "logprobs": {"tokens": ["y"], "token_logprobs": [-0.25], "top_logprobs": [{"y": -0.25}], "text_offset": [1]}}),
        chunk({"index": 0, "text": "", "finish_reason": "stop"}),
    ])
    assert legacy["object"] == "text_completion"
    assert legacy["choices"] == [{
        "index": 0, "text": "xy", "finish_reason": "stop",
        "logprobs": {"tokens": ["x", "y"], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"x": -0.5}, {"y": -0.25}], "text_offset": [0, 1]},
    }]


def test_unknown_delta_fields_join_or_are_kept() -> None:
    answer = whole(JobKind.CHAT, [
        chunk({"index": 0, "delta": {"reasoning_content": "Let me ", "audio": {"id": "au_1", "data": "AAA"}}}),
        chunk({"index": 0, "delta": {"reasoning_content": "think.", "audio": {"data": "BBB"}}, "finish_reason": "stop"}),
    ])
    assert answer["choices"][0]["message"] == {
        "role": "assistant", "content": None, "reasoning_content": "Let me think.", "audio": {"id": "au_1", "data": "AAABBB"},
    }


def test_an_embeddings_result_is_its_own_answer() -> None:
    result = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}], "model": "up", "usage": {"prompt_tokens": 1}}
    assert whole(JobKind.EMBEDDING, [result]) == result


def test_a_role_alone_carries_no_output_and_choice_text_reads_choice_zero() -> None:
    assert not carries_output(chunk({"index": 0, "delta": {"role": "assistant", "content": "", "tool_calls": None}, "finish_reason": None}))
    assert carries_output(chunk({"index": 0, "delta": {"tool_calls": [{"index": 0}]}}))
    assert carries_output(chunk(usage={"total_tokens": 1}))
    assert choice_text(JobKind.CHAT, chunk({"index": 1, "delta": {"content": "no"}}, {"index": 0, "delta": {"content": "yes"}})) == "yes"
    assert choice_text(JobKind.COMPLETION, chunk({"index": 0, "text": "t"})) == "t"


def test_jobs_from_before_pass_through_read_as_chat() -> None:
    spec = JobSpec.model_validate({
        "job_id": "j", "client_node": "c", "model": "m", "created_at": 1.0, "deadline": 2.0,
        "messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 3, "temperature": None},
    })
    assert (spec.kind, spec.body) == (JobKind.CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert output_chunks(0, "old", None) == [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "old"}}]}]
    assert output_chunks(3, "", None) == []
