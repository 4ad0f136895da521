"""RouterStatus: a router reports its drivers, their loads and its queues' lengths as they are; a node that does
not route refuses it.  On SQLite and on PostgreSQL (`databases_only`).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import StartNode
from tests.helpers import assert_error_body
from tests.helpers import migrated_database as migrated_database  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.scheduling import GatedNet, router_status, start_driver
from tests.scheduling import held_net as held_net  # a fixture
from tests.streams import GUARD_S, follow, submit
from tests.upstreams import MODEL, StartHeld
from tests.upstreams import start_held as start_held  # a fixture

pytestmark = pytest.mark.databases_only


def drivers_by_node(state: dict[str, Any]) -> dict[str, tuple[list[str], int, int]]:
    return {d["node"]: (d["models"], d["capacity"], d["load"]) for d in state["drivers"]}


async def test_router_status_reports_drivers_loads_and_queue_lengths(
    held_net: GatedNet, start_node: StartNode, start_held: StartHeld, http: aiohttp.ClientSession
) -> None:
    net = held_net
    other = await start_held("other")
    await start_driver(start_node, "fake4.dev", net.router, other, models=["mistral", "qwen"], capacity=3)

    idle = await router_status(net.router)
    assert drivers_by_node(idle) == {"fake2.dev": ([MODEL], 1, 0), "fake4.dev": (["mistral", "qwen"], 3, 0)}
    assert idle["queues"] == {}
    assert all(d["is_public"] and d["cooled_down_until"] is None and d["last_seen"] > 0 for d in idle["drivers"])

    first = await submit(http, net.client.url, {"model": MODEL, "prompt": "first"})
    await net.upstream.wait_arrivals(1)
    state = await router_status(net.router)
    assert drivers_by_node(state)["fake2.dev"] == ([MODEL], 1, 1)
    assert drivers_by_node(state)["fake4.dev"] == (["mistral", "qwen"], 3, 0)
    assert state["queues"] == {}

    second = await submit(http, net.client.url, {"model": MODEL, "prompt": "second"})
    state = await router_status(net.router)
    assert drivers_by_node(state)["fake2.dev"][2] == 1
    assert state["queues"] == {MODEL: 1}

    # The first ends; in the same commit the second takes the slot, before it reaches the LLM.
    net.upstream.release("first")
    await net.upstream.wait_arrivals(2)
    state = await router_status(net.router)
    assert drivers_by_node(state)["fake2.dev"][2] == 1
    assert state["queues"] == {}

    net.upstream.release_all()
    for job in (first, second):
        assert (await follow(http, net.client.url, job["job_id"], GUARD_S))[-1]["status"] == "succeeded"


async def test_router_status_on_a_node_that_does_not_route_is_refused(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    token = held_net.client.node.home.admin_token()
    async with http.post(f"{held_net.client.url}/admin", json="RouterStatus", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 503
        assert_error_body(await response.json(), "not_a_router")
