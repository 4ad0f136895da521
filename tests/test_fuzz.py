"""Hostile input, fuzzed: every HTTP endpoint, and signed node messages, with bodies generated from the
exported JSON Schemas (`schemas.export.all_schemas`, what `python -m schemas.export` writes) by
hypothesis-jsonschema, mixed with arbitrary JSON, bytes that are no JSON, and unknown fields.

Of every request: no 500 and no task of the node failing (nothing logged as an error); only the statuses
the endpoint documents (README: no 502 where the LLM answered, no 503 with a database that takes writes);
and a refusal stores nothing.  "Nothing" is exact where the node is quiet between requests (each job it
accepts is served to its end first): no commit at all (SQLite's `data_version`).  Where the node's own
upkeep may write at any moment (a router's queue and its drivers' registrations, after admin commands), a
refusal adds no row to any table and changes neither the configuration nor the API keys.

One host (aiohttp) and SQLite: this is about the handlers, which know nothing of either.  `derandomize`,
so every run tries the same cases, and a failure reproduces.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from llm_provider.homes import Home
from llm_provider.signing import SIGNATURE_HEADER, NodeKey
from schemas.export import all_schemas
from tests.conftest import RunningNode, StartNode
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.upstreams import MODEL, USAGE, Reply, ScriptedUpstream, chat_chunk, delta, usage_chunk
from tests.upstreams import scripted as scripted  # a fixture

SCHEMAS = all_schemas()
GUARD_S = 10.0  # any one request, however hostile, is answered within this (a guard against hangs only)


@pytest.fixture
def node_setup() -> str:
    return "aiohttp"  # one host: conftest's `start_node` would otherwise run every test under each


def fuzzing(examples: int) -> settings:
    return settings(
        max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate, Phase.shrink],
        # The node is started once per test, for all its examples: that is the point, state carries over.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- what is sent ---------------------------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """The schema without its open objects' undeclared fields (hypothesis-jsonschema makes those slowly);
    `with_extras` adds them back, cheaper."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in out and out.get("additionalProperties", True) is True:
        out["additionalProperties"] = False
    return out


# Text includes lone surrogates ("\ud800" is valid JSON, yet no UTF-8), which hypothesis leaves out unless asked.
TEXT = st.text(max_size=12) | st.text(st.characters(categories=["Cs", "Lu"]), max_size=3)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=8,
)
NOT_JSON = st.binary(max_size=40).filter(lambda data: not _is_json(data))


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def with_extras(instances: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Instances of a schema, with fields nobody declared and, half the time, the model the node serves."""
    extras = st.dictionaries(TEXT, JSON, max_size=3)
    ours = st.sampled_from([{}, {"model": MODEL}, {"model": MODEL, "prompt": "x"}])
    return st.builds(lambda instance, extra, own: {**extra, **instance, **own} if isinstance(instance, dict) else instance, instances, extras, ours)


@cache  # a strategy from a schema is slow to make (hypothesis-jsonschema canonicalises it), quick to draw from
def bodies(schema: str) -> st.SearchStrategy[Any]:
    """What a hostile client sends where `schema` is expected: an instance, arbitrary JSON, or no JSON at all."""
    return st.one_of(with_extras(from_schema(closed(SCHEMAS[schema]))), JSON, NOT_JSON)


def wire(message: Any) -> Any:
    """A message as the schema has it (`{"type": "X", ...}`) in its wire form (`"X"`, `{"X": {...}}`), or as it is."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return message
    fields = {key: value for key, value in message.items() if key != "type"}
    return {message["type"]: fields} if fields else message["type"]


@cache
def messages(*processes: str) -> st.SearchStrategy[Any]:
    valid = st.one_of(*(from_schema(closed(SCHEMAS[f"{process}_message"])) for process in processes)).map(wire)
    return st.one_of(with_extras(valid), valid, JSON)


# --- what is checked --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes

    def is_refusal(self) -> bool:
        return 400 <= self.status < 500

    def assert_error_shape(self) -> None:
        error = json.loads(self.body)["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error and "code" in error, self.body


async def send(http: aiohttp.ClientSession, method: str, url: str, data: Any = None, headers: Mapping[str, str] | None = None) -> Answer:
    """One request, its whole answer read (a stream to its end)."""
    payload = data if isinstance(data, bytes) or data is None else json.dumps(data).encode()
    async with asyncio.timeout(GUARD_S), http.request(method, url, data=payload, headers=headers) as response:
        return Answer(response.status, await response.read())


def errors_logged(caplog: pytest.LogCaptureFixture, since: int) -> list[str]:
    """What the node logged as an error since the example began (a request that failed, a task that died)."""
    return [record.getMessage() for record in caplog.records[since:] if record.name == "llm_provider" and record.levelno >= logging.ERROR]


class Commits:
    """Whether the node committed anything: SQLite's data_version, read on a connection of the test's own."""

    def __init__(self, node: RunningNode) -> None:
        self._connection = sqlite3.connect(Home(node.home).database, isolation_level=None)

    def version(self) -> int:
        return int(self._connection.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        self._connection.close()


FOOTPRINT_TABLES = ("jobs", "job_chunks", "routed_jobs", "served_jobs", "driver_registrations", "api_keys", "workers", "seen_nonces")


def footprint(node: RunningNode) -> tuple[dict[str, set[int]], list[Any], list[Any]]:
    """Every row's id, by table; and the configuration and API keys, whole."""
    with sqlite3.connect(Home(node.home).database) as connection:
        rows = {table: {rowid for (rowid,) in connection.execute(f"SELECT rowid FROM {table}")} for table in FOOTPRINT_TABLES}  # noqa: S608
        return rows, connection.execute("SELECT * FROM node_config").fetchall(), connection.execute("SELECT * FROM api_keys").fetchall()


def assert_nothing_added(before: tuple[dict[str, set[int]], list[Any], list[Any]], after: tuple[dict[str, set[int]], list[Any], list[Any]]) -> None:
    added = {table: ids - before[0][table] for table, ids in after[0].items() if ids - before[0][table]}
    assert not added, f"a refusal added rows: {added}"
    assert after[1:] == before[1:], "a refusal changed the configuration or the API keys"


async def quiet(node: RunningNode) -> None:
    """Every job the node accepted has been served to its end (the serving task ends after its last write)."""
    ctx = node.node.ctx
    assert ctx is not None
    while ctx.serving:
        await asyncio.wait([entry.task for entry in ctx.serving.values()], timeout=GUARD_S)


# --- the node -----------------------------------------------------------------------------------------------------


def answering_everything(upstream: ScriptedUpstream) -> None:
    text = [chat_chunk(delta(role="assistant", content="Hi")), chat_chunk(delta(content="!", finish_reason="stop")), usage_chunk()]
    upstream.script("chat/completions", Reply(chunks=text))
    completion = {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": MODEL, "usage": None}
    upstream.script("completions", Reply(chunks=[completion | {"choices": [{"index": 0, "text": "Hi", "logprobs": None, "finish_reason": "stop"}]}]))
    embedding = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}], "model": MODEL, "usage": USAGE}
    upstream.script("embeddings", Reply(body=embedding))


async def serving_node(start_node: StartNode, upstream: ScriptedUpstream, name: str = "fuzz.dev") -> RunningNode:
    """A node serving llama3 with its own LLM, which answers every request."""
    answering_everything(upstream)
    node = await start_node(name)
    await node.admin({"RegisterOaiProviderEndpoint": {"endpoint": upstream.url}}, "openai")
    await node.admin({"SetLocalDriver": {"model": MODEL, "is_public": True}})
    return node


async def still_serves(http: aiohttp.ClientSession, node: RunningNode) -> None:
    answer = await send(http, "POST", f"{node.url}/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert answer.status == 200 and json.loads(answer.body)["choices"][0]["message"]["content"] == "Hi!", answer


# --- client endpoints -------------------------------------------------------------------------------------------

SUBMISSIONS = {
    "/jobs": ("JobRequest", {202, 400, 404, 422}),
    "/v1/chat/completions": ("ChatCompletionRequest", {200, 400, 404, 422, 504}),
    "/v1/completions": ("CompletionRequest", {200, 400, 404, 422, 504}),
    "/v1/embeddings": ("EmbeddingRequest", {200, 400, 404, 422, 504}),
}
HEADERS = st.fixed_dictionaries({}, optional={"Idempotency-Key": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)})


@pytest.fixture
async def client_node(
    start_node: StartNode, scripted: ScriptedUpstream, http: aiohttp.ClientSession
) -> AsyncIterator[tuple[RunningNode, Commits]]:
    node = await serving_node(start_node, scripted)
    commits = Commits(node)
    yield node, commits
    commits.close()
    await still_serves(http, node)  # after every example: the node took it all and works


@fuzzing(examples=600)
@given(path=st.sampled_from(list(SUBMISSIONS)), data=st.data(), headers=HEADERS)
async def test_submissions(
    client_node: tuple[RunningNode, Commits], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
    path: str, data: st.DataObject, headers: dict[str, str],
) -> None:
    node, commits = client_node
    logged = len(caplog.records)
    schema, allowed = SUBMISSIONS[path]
    body = data.draw(bodies(schema), label="body")
    await quiet(node)
    before = commits.version()

    answer = await send(http, "POST", node.url + path, body, headers)

    event(f"POST {path} → {answer.status}")  # `pytest --hypothesis-show-statistics` shows what the cases came to
    assert answer.status in allowed, answer
    if answer.status >= 400:
        answer.assert_error_shape()
    if answer.is_refusal():
        assert commits.version() == before, f"{answer.status} yet something was stored"
    assert not errors_logged(caplog, logged)


PRINTABLE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


@fuzzing(examples=500)
@given(
    method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]), route=st.sampled_from(["record", "events", "models", "health"]),
    real_job=st.booleans(), job_id=st.text(max_size=20), last_event_id=st.none() | PRINTABLE,
)
async def test_job_routes(
    client_node: tuple[RunningNode, Commits], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
    method: str, route: str, real_job: bool, job_id: str, last_event_id: str | None,
) -> None:
    node, commits = client_node
    logged = len(caplog.records)
    if real_job:  # one that has run to its end (a DELETE of it is refused), instead of one that never was
        job_id = json.loads((await send(http, "POST", f"{node.url}/jobs", {"model": MODEL, "prompt": "x"})).body)["job_id"]
    await quiet(node)
    before = commits.version()
    path = {"record": f"/jobs/{quote(job_id, safe='')}", "events": f"/jobs/{quote(job_id, safe='')}/events", "models": "/v1/models", "health": "/healthz"}
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}

    answer = await send(http, method, node.url + path[route], headers=headers)

    event(f"{method} {route} → {answer.status}")
    assert answer.status in {200, 400, 404, 405, 409}, answer
    if answer.status >= 400:
        answer.assert_error_shape()
    if answer.is_refusal():
        assert commits.version() == before, f"{answer.status} yet something was stored"
    assert not errors_logged(caplog, logged)


# --- admin commands ---------------------------------------------------------------------------------------------


@pytest.fixture
async def admin_node(start_node: StartNode, scripted: ScriptedUpstream, http: aiohttp.ClientSession) -> AsyncIterator[RunningNode]:
    node = await serving_node(start_node, scripted)
    yield node
    assert (await send(http, "GET", f"{node.url}/healthz")).status == 200  # whatever it was told, it answers


ADMIN_BODIES = st.deferred(lambda: st.one_of(messages("admin", "driver", "router"), NOT_JSON))


@fuzzing(examples=400)
@given(process=st.sampled_from([None, "driver", "router", "openai", "nobody"]), data=st.data())
async def test_admin_commands(
    admin_node: RunningNode, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, process: str | None, data: st.DataObject
) -> None:
    logged = len(caplog.records)
    body = data.draw(ADMIN_BODIES, label="body")
    token = admin_node.node.home.admin_token()
    before = footprint(admin_node)

    answer = await send(
        http, "POST", f"{admin_node.url}/admin" + (f"/{process}" if process else ""), body, {"Authorization": f"Bearer {token}"}
    )
    event(f"admin {process} → {answer.status}")

    # 503: a router command to a node that is not one (README, node messages).
    assert answer.status in {200, 400, 403, 404, 409, 422, 503}, answer
    if answer.status >= 400:
        answer.assert_error_shape()
    if answer.is_refusal():
        assert_nothing_added(before, footprint(admin_node))
    assert not errors_logged(caplog, logged)


# --- node messages ------------------------------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    key: NodeKey


@pytest.fixture
async def router_node(start_node: StartNode, scripted: ScriptedUpstream, http: aiohttp.ClientSession) -> AsyncIterator[tuple[RunningNode, Peer]]:
    """A node that routes and serves llama3, whose router is a peer the test signs for."""
    peer = await start_node("peer.dev")
    node = await serving_node(start_node, scripted, "router.dev")
    await node.admin("StartRouter")
    await node.admin({"SetRouter": {"node": peer.name}})  # peer.dev is no router: the driver says so, and goes on
    yield node, Peer(peer.name, NodeKey.load_or_create(peer.node.home.key_file))
    await still_serves(http, node)


def envelope_for(node: RunningNode, peer: Peer, target: Any, body: Any, process: Any) -> dict[str, Any]:
    return {
        "source": {"node": peer.name, "process": process},
        "destination": node.name,
        "target": target,
        "sent_at": time.time(),
        "nonce": secrets.token_hex(16),
        "body": body,
    }


@fuzzing(examples=600)
@given(
    target=st.sampled_from(["driver", "router", "openai"]) | st.text(max_size=6),
    process=st.sampled_from(["driver", "router", "openai"]),
    data=st.data(),
)
async def test_signed_node_messages(
    router_node: tuple[RunningNode, Peer], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
    target: Any, process: str, data: st.DataObject,
) -> None:
    node, peer = router_node
    logged = len(caplog.records)
    body = data.draw(messages("driver", "router", "admin"), label="body")
    raw = json.dumps(envelope_for(node, peer, target, body, process)).encode()
    before = footprint(node)

    answer = await send(http, "POST", f"{node.url}/node/message", raw, {SIGNATURE_HEADER: peer.key.sign(raw)})
    event(f"to {target} → {answer.status}")

    # 502, 503: the router could not reach the job's client node, or the node is no router (README, node messages).
    assert answer.status in {200, 400, 403, 404, 409, 422, 429, 502, 503}, answer
    if answer.status >= 400:
        answer.assert_error_shape()
    if answer.is_refusal():
        assert_nothing_added(before, footprint(node))
    assert not errors_logged(caplog, logged)


# --- what the fuzzing found, pinned ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"model": "llama3", "prompt": "\ud800"}',  # a lone surrogate: no UTF-8 holds it (it was a 500)
        rb'{"model": "llama3", "prompt": "x", "temperature": NaN}',
        rb'{"model": "llama3", "prompt": "x", "temperature": Infinity}',
        rb'{"model": "llama3", "prompt": "x", "temperature": 1e999}',
    ],
)
async def test_json_beyond_the_rfc_is_malformed(client_node: tuple[RunningNode, Commits], http: aiohttp.ClientSession, raw: bytes) -> None:
    node, commits = client_node
    before = commits.version()
    answer = await send(http, "POST", f"{node.url}/jobs", raw)
    assert answer.status == 400 and json.loads(answer.body)["error"]["code"] == "malformed_json", answer
    assert commits.version() == before


async def test_a_surrogate_pair_is_text_like_any_other(client_node: tuple[RunningNode, Commits], http: aiohttp.ClientSession) -> None:
    node, _ = client_node
    answer = await send(http, "POST", f"{node.url}/jobs", rb'{"model": "llama3", "prompt": "\ud83d\ude00"}')
    assert answer.status == 202, answer
