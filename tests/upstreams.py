"""Fake OpenAI-compatible upstreams (the driver's LLM), served in this process on loopback ports.

- the fake LLM itself (`emulator.fake_llm`), recording each chat request it gets: `start_upstream` (a fixture,
  for every test) and `recording_upstream`;
- a held upstream: a first chunk, then each request held until the test lets it go, one at a time or all at
  once (`held_upstream`, `gated_upstream`, the fixtures `gated` and `start_held`), so that "running", "queued"
  and "mid-stream" are states a test sets up, never timing guesses;
- a scripted upstream: what the test says, per path, every request kept (`scripted_upstream`, `scripted`);
- a raw upstream: bytes as they are, at the pace the test sets (`raw_upstream`, `raw`, `overloaded`).

Each counts its requests in `stats`, as the fake LLM does.  Networks wired to them are tests.helpers' fixtures.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from emulator.fake_llm import STATS, FakeLlmSettings, FakeLlmStats, create_app
from tests.hosts import serve_app
from tests.streams import GUARD_S

MODEL = "llama3"  # the model every test network serves


@dataclass
class Upstream:
    url: str  # OpenAI base URL, ending in /v1
    stats: FakeLlmStats


# --- the fake LLM, recording what it was asked ---------------------------------------------------------


@dataclass
class RecordedRequest:
    started: float  # time.perf_counter() when the upstream began handling the request
    body: Any


@dataclass
class RecordingUpstream(Upstream):
    requests: list[RecordedRequest] = field(default_factory=list)


@asynccontextmanager
async def recording_upstream(**settings: Any) -> AsyncIterator[RecordingUpstream]:
    """The fake LLM with a middleware that records each chat request's body and start time."""
    app = create_app(FakeLlmSettings(**settings))
    recorded: list[RecordedRequest] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            started = time.perf_counter()
            try:
                body = json.loads(await request.read())
            except ValueError:
                body = None
            recorded.append(RecordedRequest(started=started, body=body))
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(record)
    runner, port = await serve_app(app)
    stats: FakeLlmStats = app[STATS]
    try:
        yield RecordingUpstream(url=f"http://127.0.0.1:{port}/v1", stats=stats, requests=recorded)
    finally:
        await runner.cleanup()


StartUpstream = Callable[..., Awaitable[RecordingUpstream]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """Start a fake OpenAI-compatible LLM: `await start_upstream(ttft=0, tokens_per_second=0)`."""
    async with AsyncExitStack() as stack:

        async def start(**settings: Any) -> RecordingUpstream:
            return await stack.enter_async_context(recording_upstream(**settings))

        yield start


# --- a held upstream: a first chunk, then nothing until the test says ------------------------------------


@dataclass
class HeldRequest:
    model: str
    prompt: str
    started: float  # time.perf_counter() when the request reached the upstream
    finished: float | None = None  # ... and when the test released it (it counts as active until then)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class HeldUpstream(Upstream):
    """Streams a first chunk, holds each request until the test lets it go, then `rest`, the end and `usage`
    (where given).

    The first chunk is `first`, or `"<name>:<prompt>|"` without it.  One request goes on with
    `release(prompt)`; every one, held now or to come, once `gate` is set (`release_all()` sets it).
    `arrivals` holds each request's prompt as it arrived (`arrived` is set at the first); `held` the requests
    whose first chunk went out, and `prompts()` theirs.  `stats` counts requests and the requests in flight
    (`active`, `max_active`) as the fake LLM does.
    """

    name: str = ""
    first: str | None = None
    rest: str = " done"  # streamed after the release, before the end
    usage: dict[str, int] | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: list[Any] = field(default_factory=list)  # each request's last message's content, in arrival order
    held: list[HeldRequest] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_arrivals(self, count: int) -> list[HeldRequest]:
        """The first `count` requests, once that many have reached this upstream."""
        async with asyncio.timeout(GUARD_S), self.changed:
            await self.changed.wait_for(lambda: len(self.held) >= count)
        return self.held[:count]

    def request_for(self, prompt: str) -> HeldRequest:
        (found,) = [held for held in self.held if held.prompt == prompt]
        return found

    def release(self, prompt: str) -> None:
        self.request_for(prompt).release.set()

    def prompts(self) -> list[str]:
        return [held.prompt for held in self.held]

    def release_all(self) -> None:
        self.gate.set()  # and nothing is held any more
        for held in self.held:
            held.release.set()

    async def released(self, held: HeldRequest) -> None:
        waits = [asyncio.ensure_future(held.release.wait()), asyncio.ensure_future(self.gate.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


@asynccontextmanager
async def held_upstream(
    name: str = "", *, first: str | None = None, rest: str = " done", usage: dict[str, int] | None = None
) -> AsyncIterator[HeldUpstream]:
    """A held upstream; every request still held goes on when it is stopped."""
    upstream: HeldUpstream

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["messages"][-1].get("content")
        upstream.stats.requests += 1
        upstream.arrivals.append(prompt)
        upstream.arrived.set()
        held = HeldRequest(model=body["model"], prompt=prompt, started=time.perf_counter())
        upstream.stats.enter()
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)

            def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                payload = {"id": "chatcmpl-held", "object": "chat.completion.chunk", "created": 0, "model": body["model"], "choices": [choice]}
                return f"data: {json.dumps(payload)}\n\n".encode()

            first = upstream.first if upstream.first is not None else f"{upstream.name}:{prompt}|"
            await response.write(chunk({"role": "assistant", "content": first}, None))
            async with upstream.changed:
                upstream.held.append(held)
                upstream.changed.notify_all()
            await upstream.released(held)
            held.finished = time.perf_counter()
            upstream.stats.leave()  # done generating: what follows is the tail of the reply
            if upstream.rest:
                await response.write(chunk({"content": upstream.rest}, None))
            await response.write(chunk({}, "stop"))
            if upstream.usage is not None:
                usage = {"id": "chatcmpl-held", "object": "chat.completion.chunk", "choices": [], "usage": upstream.usage}
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            if held.finished is None:
                upstream.stats.leave()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner, port = await serve_app(app)
    upstream = HeldUpstream(url=f"http://127.0.0.1:{port}/v1", stats=FakeLlmStats(), name=name, first=first, rest=rest, usage=usage)
    try:
        yield upstream
    finally:
        upstream.release_all()
        await runner.cleanup()


GATED_USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def gated_upstream(first: str = "alpha", rest: str = " omega") -> AbstractAsyncContextManager[HeldUpstream]:
    """The held upstream most tests use: `first`, then, once the test sets `gate`, `rest`, the end and usage."""
    return held_upstream(first=first, rest=rest, usage=GATED_USAGE)


@pytest.fixture
async def gated() -> AsyncIterator[HeldUpstream]:
    """A fixture: the gated upstream, streaming "alpha", then " omega" once the test sets `gate`."""
    async with gated_upstream(first="alpha", rest=" omega") as upstream:
        yield upstream


StartHeld = Callable[..., Awaitable[HeldUpstream]]


@pytest.fixture
async def start_held() -> AsyncIterator[StartHeld]:
    """`await start_held(name, rest=" done")`: held upstreams that stream `"<name>:<prompt>|"` first."""
    upstreams: list[HeldUpstream] = []
    async with AsyncExitStack() as stack:

        async def start(name: str, rest: str = " done") -> HeldUpstream:
            upstream = await stack.enter_async_context(held_upstream(name, rest=rest))
            upstreams.append(upstream)
            return upstream

        yield start
        for upstream in upstreams:
            upstream.release_all()


# --- a scripted upstream: answers what the test says, records what it was sent -------------------------


@dataclass
class Sent:
    """One request an upstream received: its path (under /v1), JSON body and headers."""

    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class Reply:
    """What a scripted upstream answers: streamed `chunks` (each one `data:` event, then `[DONE]` unless
    `done` is False), or a whole JSON `body` with `status`."""

    chunks: list[dict[str, Any]] | None = None
    body: Any = None
    status: int = 200
    done: bool = True


@dataclass
class ScriptedUpstream(Upstream):
    """An OpenAI-compatible upstream whose answers the test scripts, per path; every request is kept in `sent`.

    `script(path, reply)` answers every request to `path` with `reply`; `script_next(path, *replies)`
    answers the next requests to `path` with `replies`, one each, first in first out, before the
    scripted reply takes over again."""

    replies: dict[str, Reply] = field(default_factory=dict)
    queue: dict[str, list[Reply]] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)

    def script(self, path: str, reply: Reply) -> None:
        self.replies[path] = reply

    def script_next(self, path: str, *replies: Reply) -> None:
        self.queue.setdefault(path, []).extend(replies)

    def reply_to(self, path: str) -> Reply | None:
        queued = self.queue.get(path)
        if queued:
            return queued.pop(0)
        return self.replies.get(path)


def chat_chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    """An upstream's chat chunk, as OpenAI streams it (with `usage: null`, since usage is always asked for)."""
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": list(choices), "usage": None, **top}


def delta(index: int = 0, finish_reason: str | None = None, logprobs: Any = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": finish_reason}


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def usage_chunk() -> dict[str, Any]:
    return chat_chunk(usage=USAGE) | {"choices": []}


@asynccontextmanager
async def scripted_upstream() -> AsyncIterator[ScriptedUpstream]:
    upstream: ScriptedUpstream

    async def answer(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        upstream.sent.append(Sent(path=path, body=body, headers=dict(request.headers)))
        upstream.stats.requests += 1
        reply = upstream.reply_to(path)
        if reply is None:
            return web.json_response({"detail": "Not Found"}, status=404)
        if reply.chunks is None:
            return web.json_response(reply.body, status=reply.status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in reply.chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if reply.done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/{path:.+}", answer)
    runner, port = await serve_app(app)
    upstream = ScriptedUpstream(url=f"http://127.0.0.1:{port}/v1", stats=FakeLlmStats())
    try:
        yield upstream
    finally:
        await runner.cleanup()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    async with scripted_upstream() as upstream:
        yield upstream


# --- a raw upstream: bytes as they are, at the pace the test sets --------------------------------------


def sse(chunk: dict[str, Any]) -> bytes:
    """One chunk as the `data:` event an OpenAI-compatible server streams."""
    return f"data: {json.dumps(chunk)}\n\n".encode()


@dataclass
class RawReply:
    """What a raw upstream answers: `status` and `content_type`, then the bytes `body()` yields, each written as it comes."""

    body: Callable[[], AsyncGenerator[bytes, None]]
    status: int = 200
    content_type: str = "text/event-stream"


@dataclass
class RawUpstream(Upstream):
    """An upstream that misbehaves on cue: garbage, HTML, a byte at a time, a line without end, a stream past
    max_tokens.  `reply` answers every chat request; `cut` is set when the node dropped the connection while
    a reply was still being written, and `written` counts each reply's bytes that went out."""

    reply: RawReply | None = None
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    written: list[int] = field(default_factory=list)


@asynccontextmanager
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream: RawUpstream

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        upstream.stats.requests += 1
        reply = upstream.reply
        assert reply is not None, "the test did not say what to answer"
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": reply.content_type})
        await response.prepare(request)
        upstream.written.append(0)
        try:
            async with aclosing(reply.body()) as pieces:
                async for piece in pieces:
                    await response.write(piece)
                    upstream.written[-1] += len(piece)
            await response.write_eof()
        except ConnectionResetError:  # the node hung up mid-reply
            upstream.cut.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner, port = await serve_app(app)
    upstream = RawUpstream(url=f"http://127.0.0.1:{port}/v1", stats=FakeLlmStats())
    try:
        yield upstream
    finally:
        await runner.cleanup()


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    async with raw_upstream() as upstream:
        yield upstream


@pytest.fixture
async def overloaded() -> AsyncIterator[RawUpstream]:
    """An LLM endpoint that answers every request 503 with a plain-text body: busy, worth trying elsewhere."""

    async def busy() -> AsyncGenerator[bytes, None]:
        yield b"overloaded, try again later"

    async with raw_upstream() as upstream:
        upstream.reply = RawReply(body=busy, status=503, content_type="text/plain")
        yield upstream
