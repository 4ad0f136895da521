"""/metrics on every node: scraped over HTTP and read with prometheus-client's own text parser, while real
jobs run through the seed's three nodes (router fake.dev, driver fake2.dev, client fake3.dev).

Nodes of one test share the test's process, hence prometheus-client's metric objects: each node shows only
what carries its own `node` label, and the tests compare figures before and after what they do.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_provider import http_api, signing
from llm_provider.directory import Directory
from llm_provider.http_api import ContentReply, HttpRequest, JsonReply, NodeApi
from tests.cluster import DRIVER, Cluster, Proc
from tests.conftest import Network, RunningNode, StartNode
from tests.helpers import gated_network as gated_network  # a fixture
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import scripted_network as scripted_network  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.streams import GUARD_S, events, follow, job_updates, next_update, run_job, submit
from tests.upstreams import MODEL, HeldUpstream, Reply, ScriptedUpstream, StartUpstream, chat_chunk, delta, usage_chunk
from tests.upstreams import gated as gated  # a fixture
from tests.upstreams import scripted as scripted  # a fixture

CHAT = "chat/completions"


@dataclass(frozen=True)
class Scrape:
    """One scrape of a node's /metrics: every sample, by name and labels."""

    node: str
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value (0 where the node has not counted it yet)."""
        return self.samples.get((name, frozenset({"node": self.node, **labels}.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        wanted = {"node": self.node, **labels}.items()
        return sum(value for (sample, sample_labels), value in self.samples.items() if sample == name and wanted <= sample_labels)


async def scrape(http: aiohttp.ClientSession, node: RunningNode | Proc) -> Scrape:
    async with asyncio.timeout(GUARD_S), http.get(f"{node.url}/metrics") as response:
        text = await response.text()
        assert response.status == 200, text
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels.get("node", node.name) == node.name, f"{node.name} shows another node's figure: {sample}"
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(node.name, samples)


async def scrape_all(http: aiohttp.ClientSession, network: Network) -> dict[str, Scrape]:
    return {node.name: await scrape(http, node) for node in (network.client, network.router, network.driver)}


async def scrape_when(http: aiohttp.ClientSession, node: RunningNode | Proc, ready: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until `ready` holds.  The serving driver counts a job once it has delivered the job's final
    update, so a client may see the end first: nothing tells the test when the driver is done but its figures."""
    async with asyncio.timeout(GUARD_S):
        while not ready(found := await scrape(http, node)):
            await asyncio.sleep(0.02)
    return found


def text_chunks(*parts: str) -> list[dict[str, Any]]:
    chunks = [chat_chunk(delta(role="assistant", content=""))] + [chat_chunk(delta(content=part)) for part in parts]
    return [*chunks, chat_chunk(delta(finish_reason="stop")), usage_chunk()]


@pytest.mark.databases_only  # what the node counts, not how a host serves it
async def test_every_node_counts_the_jobs_it_ended_their_tokens_latencies_and_messages(
    scripted_network: Network, http: aiohttp.ClientSession
) -> None:
    network = scripted_network
    upstream: ScriptedUpstream = network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, Reply(chunks=text_chunks("wood", "chuck")))  # usage: 5 prompt, 3 completion tokens
    before = await scrape_all(http, network)
    for i in range(3):
        _, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": f"job {i}"})
        assert updates[-1]["status"] == "succeeded", updates[-1]
    driver_done = before[network.driver.name].total("llmp_jobs_total", role="driver") + 3
    after = await scrape_all(http, network)
    after[network.driver.name] = await scrape_when(
        http, network.driver, lambda s: s.total("llmp_jobs_total", role="driver") == driver_done
    )

    def moved(node: RunningNode, name: str, **labels: str) -> float:
        return after[node.name].value(name, **labels) - before[node.name].value(name, **labels)

    for node, role in ((network.client, "client"), (network.router, "router"), (network.driver, "driver")):
        assert moved(node, "llmp_jobs_total", role=role, model=MODEL, status="succeeded") == 3, role
        assert moved(node, "llmp_prompt_tokens_total", role=role, model=MODEL) == 15, role
        assert moved(node, "llmp_completion_tokens_total", role=role, model=MODEL) == 9, role
        assert moved(node, "llmp_job_duration_seconds_count", role=role, model=MODEL) == 3, role
        assert moved(node, "llmp_store_commit_seconds_count") > 0, role
    # Each node counts only its own role: the client's node is no router.
    assert moved(network.client, "llmp_jobs_total", role="router", model=MODEL, status="succeeded") == 0
    for node, role in ((network.client, "client"), (network.driver, "driver")):
        assert moved(node, "llmp_time_to_first_token_seconds_count", role=role, model=MODEL) == 3, role
    assert moved(network.router, "llmp_router_queue_wait_seconds_count", model=MODEL) == 3
    # The path of each job's messages: client → router → driver, and each update back the same way.
    assert moved(network.client, "llmp_node_messages_sent_total", message="RunJob") == 3
    assert moved(network.router, "llmp_node_messages_received_total", message="RunJob") == 3
    assert moved(network.router, "llmp_node_messages_sent_total", message="RunJob") == 3
    assert moved(network.driver, "llmp_node_messages_received_total", message="RunJob") == 3
    relayed = moved(network.router, "llmp_node_messages_received_total", message="JobUpdate")
    assert relayed >= 3 and moved(network.driver, "llmp_node_messages_sent_total", message="JobUpdate") == relayed
    assert moved(network.client, "llmp_node_messages_received_total", message="JobUpdate") == relayed
    # Each message received is timed from its sending to its handler's start: the wait at the node's door.
    assert moved(network.router, "llmp_node_message_delay_seconds_count", message="RunJob") == 3
    assert moved(network.client, "llmp_node_message_delay_seconds_count", message="JobUpdate") == relayed
    # The router's view of its drivers, read from its store.
    router = after[network.router.name]
    assert router.value("llmp_router_drivers_registered", model=MODEL) == 1
    assert router.value("llmp_router_drivers_ready", model=MODEL) == 1
    assert router.value("llmp_router_driver_capacity", model=MODEL) == 1
    assert after[network.client.name].total("llmp_router_drivers_registered") == 0  # not a router


@pytest.mark.databases_only  # what the node counts, not how a host serves it
async def test_every_node_samples_how_late_its_event_loop_runs(network: Network, http: aiohttp.ClientSession) -> None:
    # Counted in this process since it began (earlier tests' nodes had the same names): what moves is this node's.
    for node in (network.client, network.router, network.driver):
        before = await scrape(http, node)
        count, lag = "llmp_event_loop_lag_seconds_count", "llmp_event_loop_lag_seconds_sum"
        sampled = await scrape_when(http, node, lambda s: s.value(count) >= before.value(count) + 2)
        assert 0 <= sampled.value(lag) - before.value(lag) < GUARD_S, node.name


async def test_a_routers_queue_and_load_and_the_open_streams_are_shown_as_they_are(
    gated_network: Network, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    network = gated_network
    before = await scrape(http, network.client)
    held = await submit(http, network.client.url, {"model": MODEL, "prompt": "held"})
    async with asyncio.timeout(GUARD_S):
        await gated.arrived.wait()  # the driver's one slot is taken
    waiting = await submit(http, network.client.url, {"model": MODEL, "prompt": "waits"})
    router = await scrape(http, network.router)
    assert router.value("llmp_router_queue_length", model=MODEL) == 1
    assert router.value("llmp_router_driver_load", model=MODEL) == 1
    assert router.value("llmp_router_driver_capacity", model=MODEL) == 1

    async with asyncio.timeout(GUARD_S), http.get(f"{network.client.url}/jobs/{held['job_id']}/events") as response:
        stream = aiter(events(response))
        assert (await next_update(stream))["delta"] == "alpha"  # the stream is open and sending
        during = await scrape(http, network.client)
        assert during.value("llmp_open_event_streams") - before.value("llmp_open_event_streams") == 1
        gated.gate.set()
    for job in (held, waiting):
        async with asyncio.timeout(GUARD_S):
            await job_updates(http, network.client.url, job["job_id"])


@pytest.mark.databases_only  # what the node counts, not how a host serves it
async def test_upstream_errors_are_counted_by_kind(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    network = scripted_network
    upstream: ScriptedUpstream = network.upstream  # type: ignore[assignment]
    before = await scrape(http, network.driver)
    error = {"error": {"message": "no", "type": "server_error", "param": None, "code": None}}
    refusal = {"error": error["error"] | {"type": "invalid_request_error"}}
    upstream.script_next(CHAT, Reply(body=error, status=500), Reply(body=refusal, status=400))
    for prompt in ("five hundred", "four hundred"):
        _, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": prompt})
        assert updates[-1]["status"] == "failed", updates[-1]
    failed = before.value("llmp_jobs_total", role="driver", model=MODEL, status="failed") + 2
    ended = {"role": "driver", "model": MODEL, "status": "failed"}
    after = await scrape_when(http, network.driver, lambda s: s.value("llmp_jobs_total", **ended) == failed)
    for kind in ("5xx", "refused"):
        labels = {"model": MODEL, "kind": kind}
        assert after.value("llmp_upstream_errors_total", **labels) - before.value("llmp_upstream_errors_total", **labels) == 1


@pytest.mark.databases_only  # what the node counts, not how a host serves it
async def test_a_refused_node_message_is_counted_with_its_reason(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    router = scripted_network.router
    before = await scrape(http, router)
    bodies: list[dict[str, Any]] = [{"CancelJob": {"job_id": "x"}}, {"NoSuchMessage7": {}}]
    for body in bodies:
        envelope = {
            "source": {"node": "fake3.dev", "process": "driver"}, "destination": "elsewhere.dev", "target": "router",
            "sent_at": time.time(), "nonce": "0123456789abcdef0123", "body": body,
        }
        async with http.post(f"{router.url}/node/message", data=json.dumps(envelope)) as response:
            assert response.status == 401, await response.text()
    after = await scrape(http, router)
    # A type the node does not know is counted as "unknown": what an unauthenticated sender makes up adds no series.
    for message in ("CancelJob", "unknown"):
        labels = {"message": message, "reason": "wrong_destination"}
        name = "llmp_node_messages_refused_total"
        assert after.value(name, **labels) - before.value(name, **labels) == 1, message


# --- who may read /metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("node_setup", ["aiohttp"])
async def test_metrics_need_the_metrics_token_from_outside_loopback_and_the_admin_token_does_not_do(
    start_node: StartNode, tmp_path: Path
) -> None:
    """The route itself, given a request from a non-loopback address (tests listen on loopback only)."""
    node = await start_node("solo.dev")
    assert node.node.ctx is not None
    api = NodeApi(
        node.node.ctx, node.node.home.admin_token(), Directory({}), signing.ReplayGuard(), node.node.home.metrics_token()
    )

    async def get(remote: str, token: str | None) -> JsonReply | ContentReply:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        reply = await http_api.answer(http_api.node_metrics, api, HttpRequest(headers=headers, body=b"", remote=remote))
        assert isinstance(reply, JsonReply | ContentReply)
        return reply

    assert (await get("127.0.0.1", None)).status == 200
    assert (await get("::1", None)).status == 200
    for token in (None, "wrong", node.node.home.admin_token()):
        refused = await get("192.0.2.7", token)
        assert refused.status == 401
        assert json.loads(refused.body)["error"]["code"] == "metrics_token_required"
    allowed = await get("192.0.2.7", node.node.home.metrics_token())
    assert isinstance(allowed, ContentReply) and allowed.status == 200 and allowed.content_type.startswith("text/plain")
    assert b"# TYPE llmp_jobs_total counter" in allowed.body
    assert node.node.home.metrics_token() != node.node.home.admin_token()
    assert (node.node.home.metrics_token_file.stat().st_mode & 0o777) == 0o600


# --- a node of several workers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
async def test_a_node_of_two_workers_shows_the_nodes_totals_whichever_worker_is_scraped(
    tmp_path: Path, http: aiohttp.ClientSession, start_upstream: StartUpstream, server: str
) -> None:
    """gunicorn with aiohttp's worker, or uvicorn's workers running the ASGI app (LLMP_SHARED=1)."""
    from tests.test_scale_out import sessions_per_worker, wire_driver

    upstream = await start_upstream(ttft=0.0, tokens_per_second=0)
    cluster = Cluster(tmp_path, http)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(cluster.close)
        node = await (cluster.gunicorn_node if server == "gunicorn" else cluster.uvicorn_node)(DRIVER, workers=2)
        await wire_driver(node, upstream, router=None, capacity=4)
        workers = [group[0] for group in await sessions_per_worker(node.url, 2, stack)]
        for i in range(4):  # two jobs taken by each worker
            created = await submit(workers[i % 2], node.url, {"model": MODEL, "prompt": f"job {i}"})
            assert (await follow(workers[i % 2], node.url, created["job_id"]))[-1]["status"] == "succeeded"
        for session in workers:
            served = {"role": "driver", "model": MODEL, "status": "succeeded"}
            seen = await scrape_when(session, node, lambda s: s.value("llmp_jobs_total", **served) == 4)
            assert seen.value("llmp_jobs_total", role="client", model=MODEL, status="succeeded") == 4
            assert seen.value("llmp_time_to_first_token_seconds_count", role="client", model=MODEL) == 4
