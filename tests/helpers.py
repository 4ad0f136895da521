"""Shared helpers for the integration tests: submitting jobs, reading errors and rows, a recording upstream."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from alembic import command
from sqlalchemy import func, select

from emulator.fake_llm import STATS, ChatRequest, FakeLlmSettings, FakeLlmStats, create_app, generate_completion
from schemas.sse import ServerSentEvent
from store.database import Store
from store.migrate import alembic_config
from tests.conftest import Network, RunningNode, StartNode, Upstream, serve_app, start_network
from tests.sse_client import events, job_updates

# A guard against hangs only: every awaited outcome arrives in milliseconds on loopback when the code works.
GUARD_S = 5.0
SUBMIT_GUARD_S = 15.0  # POST /jobs answers once the job is stored (and, routed, accepted): this only catches hangs

MODEL = "llama3"


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file brought to the Alembic head once per session, by the project's own migrations."""
    path = tmp_path_factory.mktemp("template") / "node.db"
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.upgrade(config, "head")
    return path


@pytest.fixture
def start_node(start_node: StartNode, tmp_path: Path, migrated_database: Path) -> StartNode:
    """conftest's `start_node`, but each new home starts from a copy of an already migrated database.

    Import it into a test module to use it there: it only saves the per-node migration time; the
    node still runs `Store.migrate()` on the copy (a no-op at head).  Fresh-database migration
    is tested on its own in test_store.py.
    """

    async def start(name: str, **options: Any) -> RunningNode:
        home = tmp_path / name
        if not (home / "node.db").exists():
            home.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(migrated_database, home / "node.db")
        return await start_node(name, **options)

    return start


def store_of(node: RunningNode) -> Store:
    assert node.node.ctx is not None, "node is not running"
    return node.node.ctx.store


async def count_rows(node: RunningNode, table: type[Any]) -> int:
    """Rows of an ORM table in the node's SQLite file, read through its own store."""
    async with store_of(node).reading() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def submit(http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST /jobs and return the 202 body."""
    async with asyncio.timeout(SUBMIT_GUARD_S), http.post(f"{url}/jobs", json=body, headers=headers or {}) as response:
        text = await response.text()
        assert response.status == 202, text
        created: dict[str, Any] = json.loads(text)
    return created


async def run_job(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Submit a job and read its events to the final one: (202 body, updates)."""
    created = await submit(http, url, body)
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, url, created["job_id"])
    return created, updates


async def get_json(http: aiohttp.ClientSession, url: str, expected_status: int = 200) -> dict[str, Any]:
    async with http.get(url) as response:
        text = await response.text()
        assert response.status == expected_status, f"GET {url}: {response.status} {text}"
        body: dict[str, Any] = json.loads(text)
    return body


@asynccontextmanager
async def job_stream(http: aiohttp.ClientSession, url: str, job_id: str) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
    """The job's event stream, held open to be read an update at a time (`next_update`, `updates_to_final`)."""
    async with http.get(f"{url}/jobs/{job_id}/events") as response:
        assert response.status == 200, await response.text()
        yield aiter(events(response))


async def next_update(stream: AsyncIterator[ServerSentEvent]) -> dict[str, Any]:
    event = await anext(stream)
    assert event.event == "job_update"
    update: dict[str, Any] = json.loads(event.data)
    assert event.id == str(update["seq"])
    return update


async def updates_to_final(stream: AsyncIterator[ServerSentEvent]) -> list[dict[str, Any]]:
    """The stream's updates from here to the final one, inclusive."""
    updates = [await next_update(stream)]
    while not updates[-1]["is_final"]:
        updates.append(await next_update(stream))
    return updates


def assert_error_body(body: Any, code: str | None = None) -> dict[str, Any]:
    """The one error shape: {"error": {"message", "type", "code"}}; the inner object is returned."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert isinstance(error.get("type"), str) and error["type"], body
    assert "code" in error, body
    if code is not None:
        assert error["code"] == code, body
    return error


def expected_completion(messages: list[dict[str, Any]], seed: int | None = None, max_tokens: int | None = None) -> tuple[list[str], str]:
    """The fake LLM's tokens and finish_reason for a request, computed without a server."""
    completion = generate_completion(
        ChatRequest(model=MODEL, messages=messages, seed=seed, max_tokens=max_tokens), FakeLlmSettings()
    )
    return completion.tokens, completion.finish_reason


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


@dataclass
class GatedUpstream(Upstream):
    """An OpenAI-compatible upstream that streams `first`, then holds the request until `gate` is set."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    prompts: list[Any] = field(default_factory=list)  # each request's last message's content, in arrival order


@asynccontextmanager
async def gated_upstream(first: str = "alpha", rest: str = " omega") -> AsyncIterator[GatedUpstream]:
    """Jobs served by it stay running, with one chunk delivered, until the test sets `gate`."""
    upstream: GatedUpstream

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        upstream.stats.requests += 1
        upstream.prompts.append(body["messages"][-1].get("content"))
        upstream.arrived.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            payload = {
                "id": "chatcmpl-gated", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            await response.write(chunk({"role": "assistant", "content": first}, None))
            await upstream.gate.wait()
            await response.write(chunk({"content": rest}, None))
            await response.write(chunk({}, "stop"))
            usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
            await response.write(f"data: {json.dumps({'id': 'chatcmpl-gated', 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner, port = await serve_app(app)
    upstream = GatedUpstream(url=f"http://127.0.0.1:{port}/v1", stats=FakeLlmStats())
    try:
        yield upstream
    finally:
        upstream.gate.set()
        await runner.cleanup()


@pytest.fixture
async def gated() -> AsyncIterator[GatedUpstream]:
    """A fixture: the gated upstream, streaming "alpha", then " omega" once the test sets `gate`."""
    async with gated_upstream(first="alpha", rest=" omega") as upstream:
        yield upstream


@pytest.fixture
async def gated_network(start_node: StartNode, gated: GatedUpstream) -> Network:
    """A fixture: router, driver and client nodes, the driver's LLM the gated upstream."""
    return await start_network(start_node, gated)


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


@pytest.fixture
async def scripted_network(start_node: StartNode, scripted: ScriptedUpstream) -> Network:
    """A fixture: router, driver and client nodes, the driver's LLM the scripted upstream."""
    return await start_network(start_node, scripted)


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
async def raw_network(start_node: StartNode, raw: RawUpstream) -> Network:
    """A fixture: router, driver and client nodes, the driver's LLM the raw upstream."""
    return await start_network(start_node, raw)
