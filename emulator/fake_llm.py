"""Embedded fake OpenAI-compatible LLM server.

Acts as the "outside world" upstream for the emulator, tests and benchmarks.
It serves ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST
/v1/completions`` (streaming over SSE and non-streaming), ``POST /v1/embeddings``
(deterministic 8-number vectors) and ``GET /healthz``.

Generated text is deterministic: tokens are words drawn from a fixed list by
``random.Random(seed)``, where the seed is the request's ``seed`` or, failing
that, a SHA-256 hash of the request's messages. Latency is shaped by
``FakeLlmSettings.ttft`` (time to first token) and
``FakeLlmSettings.tokens_per_second`` (pace of later tokens).

Failures can be provoked on purpose: a request header ``X-Fake-Fail: <status>``
(e.g. ``500``) or any message whose content is exactly ``"FAIL"`` makes the
server answer with an error instead of a completion.

Run standalone with ``python -m emulator.fake_llm --port 8080``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import signal
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "BUSY_CONTENT",
    "FAIL_CONTENT",
    "FAIL_HEADER",
    "SETTINGS",
    "STATS",
    "WORDS",
    "Completion",
    "FakeLlmSettings",
    "FakeLlmStats",
    "create_app",
    "generate_completion",
    "main",
    "serve",
]

WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
    "river", "mountain", "forest", "ocean", "garden", "window", "table", "chair",
    "light", "shadow", "morning", "evening", "summer", "winter", "spring", "autumn",
    "green", "blue", "silver", "golden", "quiet", "bright", "gentle", "simple",
    "bread", "apple", "water", "stone", "paper", "music", "story", "letter",
    "walks", "reads", "writes", "sings", "builds", "finds", "keeps", "moves",
    "city", "village", "road", "bridge", "tower", "harbor", "market", "school",
    "friend", "teacher", "farmer", "sailor", "painter", "doctor", "baker", "pilot",
)

FAIL_HEADER = "X-Fake-Fail"
FAIL_CONTENT = "FAIL"  # answered HTTP 500 with an OpenAI error body: a refusal
BUSY_CONTENT = "BUSY"  # answered HTTP 503 with a plain-text body: an overloaded server
FAIL_MESSAGE = "fake upstream failure"
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # images sent inline, as a real server takes them


@dataclass(frozen=True)
class FakeLlmSettings:
    """Behaviour of the fake server.

    ``tokens_per_second`` of 0 or infinity means tokens after the first are
    sent without delay.
    """

    ttft: float = 0.05
    tokens_per_second: float = 50.0
    default_tokens: int = 24
    model: str = "fake-llm"
    stamp: bool = False

    def __post_init__(self) -> None:
        if self.ttft < 0:
            raise ValueError("ttft must be >= 0")
        if self.tokens_per_second < 0:
            raise ValueError("tokens_per_second must be >= 0")
        if self.default_tokens < 1:
            raise ValueError("default_tokens must be >= 1")

    @property
    def token_interval(self) -> float:
        tps = self.tokens_per_second
        if tps == 0 or math.isinf(tps):
            return 0.0
        return 1.0 / tps


@dataclass
class FakeLlmStats:
    """Counters for tests: requests received, completions in flight, peak in flight."""

    requests: int = 0
    active: int = 0
    max_active: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()

    def enter(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def until_idle(self) -> None:
        """Return once no completion is in flight (a client's disconnect has reached the server)."""
        await self._idle.wait()


SETTINGS = web.AppKey("fake_llm_settings", FakeLlmSettings)
STATS = web.AppKey("fake_llm_stats", FakeLlmStats)


class RequestError(Exception):
    """A request the server rejects with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a chat completion request the fake server acts on."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A generated answer: its tokens, why it ended and its token counts."""

    tokens: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def error_response(error: RequestError) -> web.Response:
    return web.json_response(error_body(error.message, error.kind), status=error.status)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def content_text(content: Any) -> str:
    """Text of a message content: a string, a list of content parts, or null."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object")
        if not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{index}].role must be a string")
        if "content" not in message:
            raise RequestError(f"messages[{index}].content is required")
        content = message["content"]
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(f"messages[{index}].content must be a string or a list of parts")
    return messages


def parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        return tuple(item for item in stop if item)
    raise RequestError("'stop' must be a string or a list of strings")


def parse_max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise RequestError("'max_tokens' must be a positive integer")
    return value


def parse_include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object")
    return options.get("include_usage") is True


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required")
    messages = validate_messages(body.get("messages"))
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean")
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise RequestError("'seed' must be an integer")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=bool(stream),
        include_usage=parse_include_usage(body),
        max_tokens=parse_max_tokens(body),
        seed=seed,
        stop=parse_stop(body.get("stop")),
    )


def messages_seed(messages: list[dict[str, Any]]) -> int:
    encoded = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(encoded.encode()).digest()[:8], "big")


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(len(content_text(message.get("content")).split()) for message in messages)


def draw_tokens(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(count)]
    return [word if index == 0 else " " + word for index, word in enumerate(words)]


def cut_at_stop(tokens: list[str], stops: Sequence[str]) -> list[str] | None:
    """Tokens up to the earliest stop string, or None when no stop string occurs."""
    text = "".join(tokens)
    hits = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    if not hits:
        return None
    limit = min(hits)
    kept: list[str] = []
    length = 0
    for token in tokens:
        if length + len(token) > limit:
            if limit > length:
                kept.append(token[: limit - length])
            break
        kept.append(token)
        length += len(token)
    return kept


def generate_completion(request: ChatRequest, settings: FakeLlmSettings) -> Completion:
    """Deterministic answer to a chat request under the given settings."""
    seed = request.seed if request.seed is not None else messages_seed(request.messages)
    count = settings.default_tokens
    finish_reason = "stop"
    if request.max_tokens is not None:
        count = min(request.max_tokens, settings.default_tokens)
        if request.max_tokens <= settings.default_tokens:
            finish_reason = "length"
    tokens = draw_tokens(seed, count)
    stopped = cut_at_stop(tokens, request.stop)
    if stopped is not None:
        tokens, finish_reason = stopped, "stop"
    return Completion(
        tokens=tokens, finish_reason=finish_reason, prompt_tokens=count_prompt_tokens(request.messages)
    )


def forced_failure_status(request: web.Request) -> int | None:
    """Status requested through the failure header, if present (500 unless a 4xx/5xx is given)."""
    value = request.headers.get(FAIL_HEADER)
    if value is None:
        return None
    try:
        status = int(value.strip())
    except ValueError:
        return 500
    return status if 400 <= status <= 599 else 500


def asks_for_failure(chat: ChatRequest) -> bool:
    return any(message.get("content") == FAIL_CONTENT for message in chat.messages)


def failure_response(status: int = 500) -> web.Response:
    return web.json_response(error_body(FAIL_MESSAGE, "server_error"), status=status)


async def read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from exc


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chunk(
    completion_id_: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": completion_id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def stream_completion(
    request: web.Request, chat: ChatRequest, completion: Completion, settings: FakeLlmSettings
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    response.charset = "utf-8"
    await response.prepare(request)
    ident, created = completion_id(), int(time.time())
    try:
        await asyncio.sleep(settings.ttft)
        tokens = completion.tokens or [""]
        for index, token in enumerate(tokens):
            if index:
                await asyncio.sleep(settings.token_interval)
            if client_gone(request):
                return response
            if settings.stamp:
                token = f" {time.time():.6f}"  # the send time, so a benchmark can measure each chunk's relay delay
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            await response.write(sse_event(chunk(ident, created, chat.model, delta, None)))
        await response.write(sse_event(chunk(ident, created, chat.model, {}, completion.finish_reason)))
        if chat.include_usage:
            usage_chunk = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [],
                "usage": completion.usage(),
            }
            await response.write(sse_event(usage_chunk))
        await response.write(sse_event("[DONE]"))
        await response.write_eof()
    except ConnectionResetError:
        pass
    return response


async def complete_at_once(
    chat: ChatRequest, completion: Completion, settings: FakeLlmSettings
) -> web.Response:
    await asyncio.sleep(settings.ttft + settings.token_interval * max(completion.completion_tokens - 1, 0))
    return web.json_response(
        {
            "id": completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": completion.usage(),
        }
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings, stats = request.app[SETTINGS], request.app[STATS]
    stats.requests += 1
    forced = forced_failure_status(request)
    if forced is not None:
        return failure_response(forced)
    try:
        chat = parse_chat_request(await read_json(request))
    except RequestError as error:
        return error_response(error)
    if asks_for_failure(chat):
        return failure_response()
    if any(message.get("content") == BUSY_CONTENT for message in chat.messages):
        return web.Response(status=503, text="Service Unavailable")
    completion = generate_completion(chat, settings)
    stats.enter()
    try:
        if chat.stream:
            return await stream_completion(request, chat, completion, settings)
        return await complete_at_once(chat, completion, settings)
    finally:
        stats.leave()


EMBEDDING_WIDTH = 8


def embedding_of(text: str) -> list[float]:
    """A deterministic unit-free vector of EMBEDDING_WIDTH numbers in [-1, 1) for a text."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 128 - 1, 6) for byte in digest[:EMBEDDING_WIDTH]]


async def embeddings(request: web.Request) -> web.Response:
    request.app[STATS].requests += 1
    try:
        body = await read_json(request)
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
            raise RequestError("'input' must be a string or a non-empty list of strings")
    except RequestError as error:
        return error_response(error)
    tokens = sum(len(item.split()) for item in inputs)
    return web.json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": embedding_of(item)} for index, item in enumerate(inputs)],
        "model": body.get("model", request.app[SETTINGS].model),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def completions(request: web.Request) -> web.StreamResponse:
    """Legacy completions: the chat answer to the prompt as one user message, in the `text_completion` shape."""
    settings, stats = request.app[SETTINGS], request.app[STATS]
    stats.requests += 1
    try:
        body = await read_json(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string or a list of strings")
        chat = parse_chat_request({**body, "messages": [{"role": "user", "content": prompt}]})
    except RequestError as error:
        return error_response(error)
    completion = generate_completion(chat, settings)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def payload(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        shape = {"id": ident, "object": "text_completion", "created": created, "model": chat.model, "choices": choices}
        return shape | ({"usage": usage} if usage is not None else {})

    stats.enter()
    try:
        if not chat.stream:
            await asyncio.sleep(settings.ttft)
            choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}
            return web.json_response(payload([choice], completion.usage()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await asyncio.sleep(settings.ttft)
        for index, token in enumerate(completion.tokens):
            if index:
                await asyncio.sleep(settings.token_interval)
            await response.write(sse_event(payload([{"index": 0, "text": token, "logprobs": None, "finish_reason": None}])))
        await response.write(sse_event(payload([{"index": 0, "text": "", "logprobs": None, "finish_reason": completion.finish_reason}])))
        if chat.include_usage:
            await response.write(sse_event(payload([], completion.usage())))
        await response.write(sse_event("[DONE]"))
        await response.write_eof()
        return response
    except ConnectionResetError:
        return web.Response(status=499)
    finally:
        stats.leave()


async def list_models(request: web.Request) -> web.Response:
    model = request.app[SETTINGS].model
    return web.json_response(
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake-llm"}]}
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(settings: FakeLlmSettings | None = None) -> web.Application:
    """Application serving the fake OpenAI-compatible API with the given settings."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[SETTINGS] = settings if settings is not None else FakeLlmSettings()
    app[STATS] = FakeLlmStats()
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, settings: FakeLlmSettings | None = None) -> None:
    """Serve the fake LLM until cancelled; port 0 picks a free port, which is announced."""
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        print(f"fake LLM listening on http://{host}:{bound_port}/v1", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="emulator fake-llm", description="Fake OpenAI-compatible LLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ttft", type=float, default=0.05, help="seconds before the first token")
    parser.add_argument(
        "--tps", type=float, default=50.0, help="tokens per second after the first (0 = no delay)"
    )
    parser.add_argument("--tokens", type=int, default=24, help="tokens per completion")
    parser.add_argument("--model", default="fake-llm", help="model id listed by /v1/models")
    parser.add_argument("--stamp", action="store_true", help="each token is its send time (for relay benchmarks)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = FakeLlmSettings(
        ttft=args.ttft, tokens_per_second=args.tps, default_tokens=args.tokens, model=args.model, stamp=args.stamp
    )
    # SIGTERM ends it like Ctrl-C, so `emulator up` can stop it cleanly
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(serve(args.host, args.port, settings))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
