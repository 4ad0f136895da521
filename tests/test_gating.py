"""Gating and bounded queues: a router's deny and allow lists, its limit of jobs in flight per client, and a full
queue answered 429 with Retry-After; every refusal stores nothing.

On SQLite and on PostgreSQL (`databases_only`), but for the Retry-After header a client's node writes, which
runs under every host.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import NODE_SETUPS, StartNode
from tests.helpers import assert_error_body
from tests.helpers import migrated_database as migrated_database  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.scheduling import GatedNet, envelope, job_spec, post_envelope, post_job, start_client, stored_jobs
from tests.scheduling import held_net as held_net  # a fixture
from tests.streams import GUARD_S, follow, submit
from tests.upstreams import MODEL
from tests.upstreams import start_held as start_held  # a fixture

pytestmark = pytest.mark.databases_only


async def test_gate_deny_and_allow_lists_refuse_with_the_reason_and_store_nothing(
    held_net: GatedNet, http: aiohttp.ClientSession
) -> None:
    net = held_net
    for gate, reason in (
        ({"deny": ["fake3.dev"]}, "fake3.dev is on this router's deny list"),
        ({"allow": ["fake2.dev"]}, "fake3.dev is not on this router's allow list"),
        ({"allow": [], "deny": []}, "fake3.dev is not on this router's allow list"),
    ):
        assert await net.router.admin({"SetGate": gate}) == {"ok": True, "note": None}
        status, body, _ = await post_job(http, net.client.url, {"model": MODEL, "prompt": "hi"})
        assert status == 403, (gate, body)
        assert reason in assert_error_body(body, "refused_by_gate")["message"]
        assert await stored_jobs(net) == (0, 0)
    assert net.upstream.stats.requests == 0

    # The same client, once on the allow list, is served: the refusals were the lists' doing.
    await net.router.admin({"SetGate": {"allow": ["fake2.dev", "fake3.dev"], "deny": ["evil.dev"]}})
    net.upstream.release_all()
    created = await submit(http, net.client.url, {"model": MODEL, "prompt": "hi"})
    assert (await follow(http, net.client.url, created["job_id"], GUARD_S))[-1]["status"] == "succeeded"
    assert await stored_jobs(net) == (1, 1)


async def test_gate_max_in_flight_per_client_refuses_a_second_job_until_the_first_ends(
    held_net: GatedNet, start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"max_in_flight_per_client": 1}})
    first = await submit(http, net.client.url, {"model": MODEL, "prompt": "first"})
    await net.upstream.wait_arrivals(1)

    status, body, _ = await post_job(http, net.client.url, {"model": MODEL, "prompt": "second"})
    assert status == 403, body
    assert "fake3.dev already has 1 jobs in flight (limit 1)" in assert_error_body(body, "refused_by_gate")["message"]
    assert await stored_jobs(net) == (1, 1)
    # The limit is per client: another client's job is taken (it waits for the busy driver).
    other_client = await start_client(start_node, net.router, "fake4.dev")
    other = await submit(http, other_client.url, {"model": MODEL, "prompt": "other"})
    assert other["status"] == "queued"

    net.upstream.release_all()
    assert (await follow(http, net.client.url, first["job_id"], GUARD_S))[-1]["status"] == "succeeded"
    third = await submit(http, net.client.url, {"model": MODEL, "prompt": "third"})
    for url, job in ((net.client.url, third), (other_client.url, other)):
        assert (await follow(http, url, job["job_id"], GUARD_S))[-1]["status"] == "succeeded"
    assert net.upstream.prompts() == ["first", "other", "third"]


async def test_a_full_queue_answers_429_and_stores_nothing(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"max_queue": 1}})
    running = await submit(http, net.client.url, {"model": MODEL, "prompt": "running"})
    await net.upstream.wait_arrivals(1)
    waiting = await submit(http, net.client.url, {"model": MODEL, "prompt": "waiting"})
    assert waiting["status"] == "queued"
    assert await stored_jobs(net) == (2, 2)

    status, body, _ = await post_job(http, net.client.url, {"model": MODEL, "prompt": "one too many"})
    assert status == 429, body
    assert "full" in assert_error_body(body, "queue_full")["message"]
    assert await stored_jobs(net) == (2, 2)

    # The router itself answers the refusal with Retry-After (seconds).
    raw = envelope("fake3.dev", "driver", "router", {"RunJob": {"job": job_spec("direct", "fake3.dev")}})
    status, body, headers = await post_envelope(http, net.router, raw, net.client)
    assert status == 429, body
    assert int(headers["Retry-After"]) >= 1
    assert await stored_jobs(net) == (2, 2)

    net.upstream.release_all()
    for job in (running, waiting):
        assert (await follow(http, net.client.url, job["job_id"], GUARD_S))[-1]["status"] == "succeeded"
    assert net.upstream.prompts() == ["running", "waiting"]


@pytest.mark.parametrize("node_setup", NODE_SETUPS)  # a header, written by each host
async def test_a_full_queue_429_on_the_clients_node_carries_retry_after(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"max_queue": 1}})
    jobs = [await submit(http, net.client.url, {"model": MODEL, "prompt": "running"})]
    await net.upstream.wait_arrivals(1)
    jobs.append(await submit(http, net.client.url, {"model": MODEL, "prompt": "waiting"}))
    status, body, headers = await post_job(http, net.client.url, {"model": MODEL, "prompt": "one too many"})
    net.upstream.release_all()
    for job in jobs:
        assert (await follow(http, net.client.url, job["job_id"], GUARD_S))[-1]["status"] == "succeeded"
    assert status == 429, body
    assert "Retry-After" in headers, dict(headers)
    assert int(headers["Retry-After"]) >= 1
