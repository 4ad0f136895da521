"""The seed's flow against a real LLM server: llama.cpp (llama-cpp-python) on a tiny random-weight model.

`../shared/tools/tiny-llm-server` (next to this repository) builds llama-cpp-python once into
~/.cache/llm-provider/ (about 4 minutes on 2 cores, then cached) and starts its OpenAI-compatible
server; one server serves the whole session.  Its replies are word salad that ends after a "."
(`--allow-eos`); section 4 starts a second one, with `-- --chat_format chatml-function-calling
--embedding True`, for tools, JSON answers and embeddings.  Every test starts its own `emulator up
--nodes 3 --llm URL` (real processes, loopback ports), so a test that leaves a driver cooled down
or a queue busy cannot affect another.

What this server does that the fake LLM does not, as measured (llama-cpp-python 0.3.36):
  * a request its schema refuses (e.g. a message with role "developer") gets HTTP 500 with an
    OpenAI-style error object;
  * `stream_options` is ignored: a streamed completion never carries `usage`;
  * a prompt longer than the context gets, when streamed, HTTP 200 and an empty body;
  * one request at a time: with the wrapper's `--interrupt_requests False` concurrent requests
    queue; with the server's own default (`--interrupt-requests` here) a new request cuts the
    running stream short with `data: [DONE]` and no finish_reason;
  * with chatml-function-calling, a streamed tool call repeats its `id` and `name` in every fragment
    (the openai SDK's `chat.completions.stream()` helper joins them: "pickpick..."); `response_format`
    takes `{"type": "json_object", "schema": ...}` (`json_schema` gets HTTP 500);
  * this model's embeddings come per token: each input's `embedding` is a list of 64-wide vectors.

Every process started here is killed by its id at teardown, even when a test fails: the LLM
server (by the pid file the wrapper writes, checked against its command line), `up` (its own
session) and the node processes it spawned (each in a session of its own).  Every wait is bounded.

Run: `.venv/bin/pytest -q -m llama tests/test_llama.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolParam,
)

from tests.helpers import get_json
from tests.processes import TIMEOUT_S, WOODCHUCK, RunningUp, cmdline, pick_ports, start_up, summary_of, wait_gone
from tests.streams import events, job_updates, submit
from tests.upstreams import MODEL

pytestmark = pytest.mark.llama

REPO = Path(__file__).resolve().parents[1]
TINY_LLM_SERVER = REPO.parent / "shared" / "tools" / "tiny-llm-server"
# Outside the project tree, the same paths everywhere (CI too), so the llama.cpp build is reused.
LLM_CACHE = Path.home() / ".cache" / "llm-provider"
LLM_VENV = LLM_CACHE / "llm-venv"
LLM_CACHE_DIR = LLM_CACHE / "tiny-llm"
BUILD_TIMEOUT_S = 900.0  # the first start on a fresh machine compiles llama.cpp
STOP_TIMEOUT_S = 15.0

GUARD_S = 30.0  # a job against the tiny model takes well under a second; this only catches hangs
# Accepted by our schema (OpenAI's newer name for "system"), refused by llama-cpp-python's: HTTP 500.
REJECTED_MESSAGES = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": WOODCHUCK}]
COMPLETE = ("stop", "length")
TOOLS_SERVER_ARGS = ("--chat_format", "chatml-function-calling", "--embedding", "True")


# --- the real LLM server ------------------------------------------------------------------------


def _stop_llm_server(pid_file: Path, port: int | None) -> None:
    """SIGTERM the detached server (not our child: poll /proc), SIGKILL if it lingers."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    command = cmdline(pid)
    if "llama_cpp.server" not in command or (port is not None and f"--port {port} " not in command + " "):
        return  # gone already, and the pid may belong to someone else by now
    os.kill(pid, signal.SIGTERM)
    if wait_gone({pid}, STOP_TIMEOUT_S):  # another process's child: polled, no event to wait on
        os.kill(pid, signal.SIGKILL)



def start_llm_server(directory: Path, *options: str, timeout: float = BUILD_TIMEOUT_S) -> tuple[str, Path, int]:
    """Start tiny-llm-server detached; its base URL, pid file and port."""
    if not TINY_LLM_SERVER.is_file():
        pytest.skip(f"no {TINY_LLM_SERVER}: the real-LLM tests need the shared tiny-llm-server next to this repository")
    pid_file, log_file = directory / "llm.pid", directory / "llm.log"
    argv = [
        sys.executable, str(TINY_LLM_SERVER), "--port", "0", "--detach", "--pid-file", str(pid_file), "--log-file", str(log_file),
        "--venv", str(LLM_VENV), "--cache-dir", str(LLM_CACHE_DIR), *options,
    ]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        _stop_llm_server(pid_file, None)
        raise AssertionError(f"tiny-llm-server did not start within {timeout:.0f} s; build log: {LLM_CACHE_DIR / 'build.log'}") from error
    lines = result.stdout.strip().splitlines()
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/v1", lines[-1] if lines else "")
    if result.returncode != 0 or match is None:
        _stop_llm_server(pid_file, None)
        raise AssertionError(
            f"tiny-llm-server failed (exit {result.returncode}); stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}\nlog: {log_file}"
        )
    return match[0], pid_file, int(match[1])


@pytest.fixture(scope="session")
def llm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's real LLM: replies end after a "." (finish_reason "stop"); concurrent requests queue."""
    url, pid_file, port = start_llm_server(tmp_path_factory.mktemp("llm"), "--allow-eos")
    try:
        yield url
    finally:
        _stop_llm_server(pid_file, port)


@pytest.fixture
def interrupting_llm_url(tmp_path: Path) -> Iterator[str]:
    """A second real LLM with llama-cpp-python's own default: a new request cuts the running stream short.
    Without --allow-eos a request without max_tokens generates until the context is full (~2000 tokens)."""
    directory = tmp_path / "interrupting-llm"
    directory.mkdir()
    url, pid_file, port = start_llm_server(directory, "--interrupt-requests")
    try:
        yield url
    finally:
        _stop_llm_server(pid_file, port)


@pytest.fixture(scope="session")
def tools_llm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real LLM that also serves tools, JSON grammars and embeddings: the same model, with llama-cpp-python's
    `chatml-function-calling` chat format and `--embedding` (arguments after `--` go to the server)."""
    url, pid_file, port = start_llm_server(tmp_path_factory.mktemp("tools-llm"), "--allow-eos", "--", *TOOLS_SERVER_ARGS)
    try:
        yield url
    finally:
        _stop_llm_server(pid_file, port)


# --- `emulator up` against it --------------------------------------------------------------------


@dataclass(kw_only=True)
class Network(RunningUp):
    """A running `emulator up --nodes 3 --llm URL`: fake.dev routes, fake2.dev drives the LLM, fake3.dev is a client."""

    def node_log(self, name: str) -> str:
        return (self.root / name / "node.log").read_text(errors="replace")


class Networks:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Network] = []

    def up(self, llm: str) -> Network:
        base, _ = pick_ports(3)
        root = self.tmp_path / f"net{len(self.started) + 1}"
        network = Network(proc=start_up(root, base, 3, "--llm", llm), root=root, base=base)
        self.started.append(network)
        network.wait_ready()
        assert f"LLM: {llm}" in network.output, network.transcript()
        return network

    def kill_all(self) -> None:
        for network in self.started:
            network.kill()


@pytest.fixture
def networks(tmp_path: Path) -> Iterator[Networks]:
    started = Networks(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def network(networks: Networks, llm_url: str) -> Network:
    return networks.up(llm_url)


@pytest.fixture
def tools_network(networks: Networks, tools_llm_url: str) -> Network:
    """`emulator up --nodes 3` against the LLM that serves tools, JSON and embeddings."""
    return networks.up(tools_llm_url)


# --- helpers ----------------------------------------------------------------------------------------


async def run_job(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Submit a job and follow its SSE stream to the final update: (job id, updates)."""
    created = await submit(http, url, body)
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, url, created["job_id"])
    return created["job_id"], updates


async def upstream_chunks(http: aiohttp.ClientSession, llm: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    """Ask the LLM server itself for a streamed completion: its HTTP status and the decoded `data:` payloads."""
    payloads: list[Any] = []
    async with asyncio.timeout(GUARD_S), http.post(f"{llm}/chat/completions", json={**body, "stream": True}) as response:
        if response.status != 200:
            return response.status, [await response.json(content_type=None)]
        async for event in events(response):
            payloads.append("[DONE]" if event.data.strip() == "[DONE]" else json.loads(event.data))
    return response.status, payloads


def assert_complete(text: str, finish_reason: str | None) -> None:
    """A whole answer of the tiny model: it ended on its own after a "." (stop) or ran to max_tokens (length)."""
    assert finish_reason in COMPLETE, finish_reason
    assert text.strip(), "empty answer"
    if finish_reason == "stop":
        assert text.rstrip().endswith("."), f"a 'stop' answer of this model ends with '.': {text!r}"


def assert_failed_with_upstream_500(error: str | None) -> None:
    assert error, "the failed job carries no error"
    assert "HTTP 500" in error, error
    assert "LLM endpoint" in error, error


# --- 1. the seed's flow against the real server ---------------------------------------------------------------


async def test_run_job_from_node_3_is_served_by_the_real_llm_on_fake2(network: Network, http: aiohttp.ClientSession) -> None:
    result = await asyncio.to_thread(network.cli, "run-job", "-p", str(network.port(3)), MODEL, *WOODCHUCK.split())

    assert result.returncode == 0, f"run-job failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    answer, summary = summary_of(result)
    last = summary.string
    assert summary["status"] == "succeeded", last
    assert summary["driver"] == "fake2.dev", last
    assert summary["ttft"] != "-", last

    record = await get_json(http, f"{network.url(3)}/jobs/{summary['job_id']}")
    assert record["status"] == "succeeded" and record["driver"] == "fake2.dev" and record["router"] == "fake.dev", record
    assert record["text"].strip() == answer.strip(), (record["text"], answer)
    assert_complete(record["text"], record["finish_reason"])
    assert record["finish_reason"] == "stop", record  # --allow-eos, no max_tokens: the model ends it itself


async def test_openai_client_streams_from_the_real_llm_through_node_3(network: Network, llm_url: str, http: aiohttp.ClientSession) -> None:
    def stream(**extra: Any) -> list[Any]:
        client = openai.OpenAI(base_url=f"{network.url(3)}/v1", api_key="x", timeout=TIMEOUT_S, max_retries=0)
        try:
            return list(
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": WOODCHUCK}], stream=True,
                    stream_options={"include_usage": True}, **extra,
                )
            )
        finally:
            client.close()

    for extra, expected_reason in (({}, "stop"), ({"max_tokens": 3}, "length")):
        chunks = await asyncio.to_thread(stream, **extra)
        with_choices = [c for c in chunks if c.choices]
        assert with_choices and with_choices[0].choices[0].delta.role == "assistant", chunks
        content = "".join(c.choices[0].delta.content or "" for c in with_choices)
        assert any(c.choices[0].delta.content for c in with_choices), chunks
        # exactly one finish_reason, on the last chunk; "length" can only come from the real server (ours says "stop")
        assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == [expected_reason], chunks
        assert with_choices[-1].choices[0].finish_reason == expected_reason, chunks
        assert_complete(content, expected_reason)
        assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-"), chunks

        record = await get_json(http, f"{network.url(3)}/jobs/{chunks[0].id.removeprefix('chatcmpl-')}")
        assert record["status"] == "succeeded" and record["driver"] == "fake2.dev", record
        assert record["text"] == content and record["finish_reason"] == expected_reason, record

        # Usage: llama-cpp-python 0.3.x ignores stream_options (our driver always asks for it), so no
        # streamed chunk of it carries usage; the job has none, and neither has the stream we relay.
        assert record["usage"] is None, record
        assert all(c.usage is None for c in chunks), [c.usage for c in chunks]

    status, payloads = await upstream_chunks(
        http, llm_url, {"model": MODEL, "messages": [{"role": "user", "content": WOODCHUCK}], "stream_options": {"include_usage": True}}
    )
    assert status == 200 and payloads[-1] == "[DONE]", payloads
    assert not any(isinstance(p, dict) and p.get("usage") for p in payloads), "the real server now streams usage: assert it arrives"


# --- 2. the real server's HTTP 500 -------------------------------------------------------------------------------


async def test_a_request_the_real_server_rejects_fails_the_job_with_the_upstream_status(
    network: Network, llm_url: str, http: aiohttp.ClientSession
) -> None:
    # The premise: our schema takes this request, the real server refuses it with HTTP 500.
    status, body = await upstream_chunks(http, llm_url, {"model": MODEL, "messages": REJECTED_MESSAGES})
    assert status == 500 and "error" in body[0], body

    started = time.monotonic()
    job_id, updates = await run_job(http, network.url(3), {"model": MODEL, "messages": REJECTED_MESSAGES})
    final = updates[-1]
    assert final["is_final"] and final["status"] == "failed", final
    assert_failed_with_upstream_500(final["error"])
    assert not "".join(u["delta"] for u in updates), updates
    assert time.monotonic() - started < GUARD_S

    record = await get_json(http, f"{network.url(3)}/jobs/{job_id}")
    assert record["status"] == "failed" and record["text"] == "" and record["finish_reason"] is None, record
    assert_failed_with_upstream_500(record["error"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_request_the_real_server_rejects_is_a_clear_error_for_an_openai_client(network: Network, stream: bool) -> None:
    def ask() -> openai.APIError:
        client = openai.OpenAI(base_url=f"{network.url(3)}/v1", api_key="x", timeout=TIMEOUT_S, max_retries=0)
        try:
            if stream:
                list(client.chat.completions.create(model=MODEL, messages=REJECTED_MESSAGES, stream=True))  # type: ignore[arg-type]
            else:
                client.chat.completions.create(model=MODEL, messages=REJECTED_MESSAGES)  # type: ignore[arg-type]
        except openai.APIError as error:
            return error
        finally:
            client.close()
        raise AssertionError("the request succeeded")

    error = await asyncio.to_thread(ask)
    assert_failed_with_upstream_500(error.message)
    if not stream:  # refused before any byte of an answer: an HTTP error status of our own
        assert isinstance(error, openai.APIStatusError) and error.status_code == 502, error
        assert isinstance(error.body, dict) and error.body.get("code") == "job_failed", error.body


# --- 3. one request at a time: a second job waits, it does not cut the first short -------------------------------


@pytest.mark.parametrize("capacity", [1, 2], ids=["router-queues", "llm-queues"])
async def test_two_jobs_at_once_both_complete(network: Network, http: aiohttp.ClientSession, capacity: int) -> None:
    """capacity 1: the router holds the second job until the first ends; capacity 2: both reach the LLM
    server at once and the server queues the second (it is started with --interrupt_requests False)."""
    if capacity != 1:
        message = json.dumps({"SetLocalDriver": {"model": MODEL, "is_public": True, "capacity": capacity}})
        result = await asyncio.to_thread(network.cli, "admin", "-p", str(network.port(2)), message)
        assert result.returncode == 0 and json.loads(result.stdout)["ok"] is True, f"{result.stdout}\n{result.stderr}"

    bodies = [{"model": MODEL, "prompt": f"{WOODCHUCK} ({n})"} for n in (1, 2)]
    created = await asyncio.gather(*(submit(http, network.url(3), body) for body in bodies))
    async with asyncio.timeout(GUARD_S):
        streams = await asyncio.gather(*(job_updates(http, network.url(3), c["job_id"]) for c in created))

    records = []
    for c, updates in zip(created, streams):
        final = updates[-1]
        assert final["is_final"] and final["status"] == "succeeded", final
        assert final["driver"] == "fake2.dev", final
        text = "".join(u["delta"] for u in updates)
        assert_complete(text, final["finish_reason"])
        record = await get_json(http, f"{network.url(3)}/jobs/{c['job_id']}")
        assert record["status"] == "succeeded" and record["text"] == text and record["finish_reason"] == final["finish_reason"], record
        records.append(record)
    first, second = records
    # both were in the network at the same time
    assert first["created_at"] < second["finished_at"] and second["created_at"] < first["finished_at"], records


# --- bugs found --------------------------------------------------------------------------------------------------


async def test_a_rejected_request_does_not_take_the_driver_away_from_the_next_job(network: Network, http: aiohttp.ClientSession) -> None:
    _, updates = await run_job(http, network.url(3), {"model": MODEL, "messages": REJECTED_MESSAGES})
    assert updates[-1]["status"] == "failed", updates[-1]

    # A valid job right after: against this LLM it takes well under a second.  A driver wrongly cooled down
    # (30 s) would leave it queued past this deadline; 20 s leaves room for a slow machine.
    job_id, updates = await run_job(http, network.url(3), {"model": MODEL, "prompt": WOODCHUCK, "timeout": 20})
    record = await get_json(http, f"{network.url(3)}/jobs/{job_id}")
    assert updates[-1]["status"] == "succeeded", (record, network.node_log("fake.dev")[-2000:])


async def test_a_prompt_longer_than_the_context_is_not_a_successful_empty_answer(
    network: Network, llm_url: str, http: aiohttp.ClientSession
) -> None:
    prompt = " ".join(["wood chuck"] * 3000)  # ~21k tokens for a 2048-token context; 30 kB, far below our 1 MiB limit
    status, payloads = await upstream_chunks(http, llm_url, {"model": MODEL, "messages": [{"role": "user", "content": prompt}]})
    assert (status, payloads) == (200, []), "premise: the real server answers a too-long streamed prompt with an empty 200"

    job_id, updates = await run_job(http, network.url(3), {"model": MODEL, "prompt": prompt})
    record = await get_json(http, f"{network.url(3)}/jobs/{job_id}")
    assert updates[-1]["status"] == "failed", {k: record[k] for k in ("status", "text", "finish_reason", "error")}


async def test_a_stream_the_llm_cuts_short_is_not_reported_complete(
    networks: Networks, interrupting_llm_url: str, http: aiohttp.ClientSession
) -> None:
    network = networks.up(interrupting_llm_url)
    message = json.dumps({"SetLocalDriver": {"model": MODEL, "is_public": True, "capacity": 2}})
    result = await asyncio.to_thread(network.cli, "admin", "-p", str(network.port(2)), message)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    # A: no max_tokens, so this LLM generates until its context is full (~2000 tokens, over a second)
    long_job = await submit(http, network.url(3), {"model": MODEL, "prompt": WOODCHUCK})
    long_updates: list[dict[str, Any]] = []
    async with asyncio.timeout(GUARD_S), http.get(f"{network.url(3)}{long_job['events_url']}") as response:
        short_job: dict[str, Any] | None = None
        async for event in events(response):
            update = json.loads(event.data)
            long_updates.append(update)
            if short_job is None and update["delta"]:  # A is streaming: now B arrives at the LLM too
                short_job = await submit(http, network.url(3), {"model": MODEL, "prompt": "Hi", "max_tokens": 5})
            if update["is_final"]:
                break
    assert short_job is not None, long_updates
    async with asyncio.timeout(GUARD_S):
        short_updates = await job_updates(http, network.url(3), short_job["job_id"])
    assert short_updates[-1]["status"] == "succeeded" and short_updates[-1]["finish_reason"] == "length", short_updates[-1]

    final = long_updates[-1]
    record = await get_json(http, f"{network.url(3)}/jobs/{long_job['job_id']}")
    summary = {k: record[k] for k in ("status", "finish_reason", "error")} | {"text_chars": len(record["text"])}
    assert not (final["status"] == "succeeded" and final.get("finish_reason") is None), summary


# --- 4. what the OpenAI API offers beyond text, through three hops: JSON, tools, embeddings ----------------------
#
# Against `tools_llm_url`: llama-cpp-python constrains its sampling by a grammar made from the JSON schema or the
# tool's parameters, so even the random-weight model answers valid JSON.  It never closes a free string, hence
# the enums.  The client is the official `openai` package on node 3; the answer comes from fake2.dev's LLM.

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "n": {"type": "integer"}},
    "required": ["answer", "n"],
}
COLORS = ("red", "blue")
SEED = 7  # the same answer every run: a random model may draw an integer too long for the context otherwise
PICK_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "pick",
        "description": "Pick a color.",
        "parameters": {
            "type": "object", "properties": {"color": {"type": "string", "enum": list(COLORS)}}, "required": ["color"],
        },
    },
}
PICK_CHOICE: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "pick"}}
PICK_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Pick a color."}]


def async_openai(network: Network) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{network.url(3)}/v1", api_key="x", timeout=TIMEOUT_S, max_retries=0)


async def assert_served_by_fake2(http: aiohttp.ClientSession, network: Network, response_id: str) -> dict[str, Any]:
    """The job behind a chat answer, as node 3 keeps it: routed by fake.dev, served by fake2.dev's LLM."""
    assert response_id.startswith("chatcmpl-"), response_id
    record = await get_json(http, f"{network.url(3)}/jobs/{response_id.removeprefix('chatcmpl-')}")
    assert record["status"] == "succeeded", record
    assert (record["router"], record["driver"]) == ("fake.dev", "fake2.dev"), record
    return record


def assert_picked_a_color(name: str | None, arguments: str | None, call_id: str | None) -> None:
    assert name == "pick", name
    assert isinstance(arguments, str), arguments
    assert json.loads(arguments)["color"] in COLORS, arguments
    # an id given once, not the repetitions of it that llama.cpp streams joined into one
    assert isinstance(call_id, str) and call_id and call_id.count(call_id[:12]) == 1, call_id


async def test_json_object_with_a_schema_through_three_hops(tools_network: Network, http: aiohttp.ClientSession) -> None:
    response_format: Any = {"type": "json_object", "schema": ANSWER_SCHEMA}  # llama.cpp's form (it refuses json_schema)
    async with async_openai(tools_network) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Yes or no, and a number?"}], response_format=response_format,
            seed=SEED,
        )

    choice = completion.choices[0]
    assert choice.finish_reason == "stop", completion  # the grammar ran to its end
    assert isinstance(choice.message.content, str), completion
    answer = json.loads(choice.message.content)
    assert isinstance(answer, dict) and answer["answer"] in ("yes", "no"), answer
    assert isinstance(answer["n"], int) and not isinstance(answer["n"], bool), answer
    record = await assert_served_by_fake2(http, tools_network, completion.id)
    assert record["text"] == choice.message.content, record


async def test_forced_tool_choice_through_three_hops(tools_network: Network, http: aiohttp.ClientSession) -> None:
    async with async_openai(tools_network) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=PICK_MESSAGES, tools=[PICK_TOOL], tool_choice=PICK_CHOICE, seed=SEED,
        )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", completion
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1, choice.message
    call = calls[0]
    assert call.type == "function", call
    assert_picked_a_color(call.function.name, call.function.arguments, call.id)
    await assert_served_by_fake2(http, tools_network, completion.id)


@dataclass
class StreamedCall:
    """One tool call assembled from its streamed fragments, by their index."""

    id: str | None = None
    name: str | None = None
    arguments: str = ""


def assemble_tool_calls(chunks: list[ChatCompletionChunk]) -> dict[int, StreamedCall]:
    """Fragments joined by index: `arguments` continued; `id` and `name` given once, or repeated unchanged
    (llama.cpp repeats both in every fragment; the openai SDK's stream helper would join them: "pickpick...")."""
    calls: dict[int, StreamedCall] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or []:
                call = calls.setdefault(fragment.index, StreamedCall())
                if fragment.id:
                    assert call.id in (None, fragment.id), (call, fragment)
                    call.id = fragment.id
                if fragment.function is not None:
                    if fragment.function.name:
                        assert call.name in (None, fragment.function.name), (call, fragment)
                        call.name = fragment.function.name
                    call.arguments += fragment.function.arguments or ""
    return calls


async def test_forced_tool_choice_streamed_through_three_hops(tools_network: Network, http: aiohttp.ClientSession) -> None:
    async with async_openai(tools_network) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=PICK_MESSAGES, tools=[PICK_TOOL], tool_choice=PICK_CHOICE, stream=True, seed=SEED,
        )
        chunks = [chunk async for chunk in stream]

    assert chunks and {chunk.id for chunk in chunks} == {chunks[0].id}, [chunk.id for chunk in chunks]
    with_choices = [chunk for chunk in chunks if chunk.choices]
    reasons = [chunk.choices[0].finish_reason for chunk in with_choices if chunk.choices[0].finish_reason]
    assert reasons == ["tool_calls"] and with_choices[-1].choices[0].finish_reason == "tool_calls", reasons
    fragments = sum(len(chunk.choices[0].delta.tool_calls or []) for chunk in with_choices)
    assert fragments > 1, "the tool call came in one piece: nothing was streamed"
    calls = assemble_tool_calls(chunks)
    assert list(calls) == [0], calls
    assert_picked_a_color(calls[0].name, calls[0].arguments, calls[0].id)

    # node 3's record of the job assembles the same chunks into the answer a non-streamed request gets
    record = await assert_served_by_fake2(http, tools_network, chunks[0].id)
    (whole,) = record["response"]["choices"][0]["message"]["tool_calls"]
    assert whole["function"] == {"name": "pick", "arguments": calls[0].arguments}, whole
    assert whole["id"] == calls[0].id and whole["type"] == "function", whole


def embedding_width(vector: Any) -> int:
    """A vector's width; llama-cpp-python gives this model's embeddings per token (a list of vectors), one width."""
    assert isinstance(vector, list) and vector, vector
    if all(isinstance(x, float | int) for x in vector):
        return len(vector)
    widths = {len(token) for token in vector}
    assert len(widths) == 1, widths
    return widths.pop()


async def test_embeddings_through_three_hops(tools_network: Network, tools_llm_url: str, http: aiohttp.ClientSession) -> None:
    inputs = ["hi", "there"]
    body = {"model": MODEL, "input": inputs}
    async with asyncio.timeout(GUARD_S), http.post(f"{tools_llm_url}/embeddings", json=body) as response:
        assert response.status == 200, await response.text()
        direct = await response.json()
    expected = [item["embedding"] for item in sorted(direct["data"], key=lambda item: item["index"])]
    assert len(expected) == 2, direct

    async with async_openai(tools_network) as client:
        result = await client.embeddings.create(model=MODEL, input=inputs)

    assert result.object == "list" and result.model == MODEL, result
    assert [item.index for item in result.data] == [0, 1], result.data
    got = [item.embedding for item in result.data]
    assert [embedding_width(v) for v in got] == [embedding_width(v) for v in expected], (got, expected)
    assert got == expected  # the same vectors: this model's embeddings are deterministic
