"""Node authentication of state-changing messages: a message signed in another node's name, a replayed one, one
sent outside the replay window or to another router is refused and changes nothing; a RunJob sent again after
a lost answer is the same job; replicas of one router share what they have seen.

On SQLite and on PostgreSQL (`databases_only`): the nonces replicas share are kept in the database.
"""

from __future__ import annotations

import time

import aiohttp
import pytest

from store.models import RoutedJob
from tests.conftest import StartNode
from tests.helpers import assert_error_body, count_rows
from tests.helpers import migrated_database as migrated_database  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.scheduling import (
    GatedNet,
    envelope,
    job_spec,
    post_envelope,
    post_signed,
    register,
    registrations,
    signed,
    start_driver,
    start_router,
)
from tests.scheduling import held_net as held_net  # a fixture
from tests.upstreams import MODEL, StartHeld
from tests.upstreams import start_held as start_held  # a fixture

pytestmark = pytest.mark.databases_only


async def test_a_node_signing_in_another_nodes_name_is_refused_and_changes_nothing(
    held_net: GatedNet, http: aiohttp.ClientSession
) -> None:
    net = held_net
    await net.router.admin({"SetGate": {"deny": ["fake3.dev"]}})
    before = await registrations(net.router)
    assert before == [("fake2.dev", MODEL, 1)]
    # fake3.dev, with its own valid key, claims to be the driver fake2.dev: to take its registration
    # over, and to slip a job past the deny list in fake2.dev's name.
    for body in (register(["stolen"], 99), {"RunJob": {"job": job_spec("smuggled", "fake2.dev")}}):
        status, reply, _ = await post_envelope(http, net.router, envelope("fake2.dev", "driver", "router", body), net.client)
        assert status == 401, reply
        assert_error_body(reply, "bad_signature")
    assert await registrations(net.router) == before
    assert await count_rows(net.router, RoutedJob) == 0
    # Signed in its own name, the same job is the deny list's to refuse.
    status, reply, _ = await post_envelope(
        http, net.router, envelope("fake3.dev", "driver", "router", {"RunJob": {"job": job_spec("own", "fake3.dev")}}), net.client
    )
    assert status == 403
    assert_error_body(reply, "refused_by_gate")
    assert await count_rows(net.router, RoutedJob) == 0


async def test_a_replayed_registration_is_refused_and_does_not_undo_a_newer_one(
    held_net: GatedNet, http: aiohttp.ClientSession
) -> None:
    net = held_net
    data, headers = signed(envelope("fake2.dev", "driver", "router", register([MODEL, "old"], 5)), net.driver)
    status, reply, _ = await post_signed(http, net.router, data, headers)  # the original, as the driver sent it
    assert status == 200, reply
    assert await registrations(net.router) == [("fake2.dev", MODEL, 5), ("fake2.dev", "old", 5)]

    await net.driver.admin({"SetLocalDriver": {"model": MODEL, "is_public": True, "capacity": 2}})
    assert await registrations(net.router) == [("fake2.dev", MODEL, 2)]
    status, reply, _ = await post_signed(http, net.router, data, headers)  # the same bytes, the same signature
    assert status == 401, reply
    assert "replayed" in assert_error_body(reply, "replayed_message")["message"]
    assert await registrations(net.router) == [("fake2.dev", MODEL, 2)]

    # A replayed job submission is refused as a replay (401), not merely as a duplicate, and adds nothing.
    data, headers = signed(envelope("fake3.dev", "driver", "router", {"RunJob": {"job": job_spec("once", "fake3.dev")}}), net.client)
    status, reply, _ = await post_signed(http, net.router, data, headers)
    assert status == 200 and reply["job_id"] == "once"
    status, reply, _ = await post_signed(http, net.router, data, headers)
    assert status == 401
    assert_error_body(reply, "replayed_message")
    assert await count_rows(net.router, RoutedJob) == 1


async def test_a_runjob_sent_again_after_a_lost_answer_is_the_same_job(held_net: GatedNet, http: aiohttp.ClientSession) -> None:
    """A client node whose router replica died before answering sends the RunJob again, in a fresh envelope
    (a retry, not a replay): the router answers for the job it has, and hands it out once."""
    net = held_net
    spec = job_spec("sent-twice", "fake3.dev")
    replies = []
    for _ in range(2):
        status, reply, _ = await post_envelope(http, net.router, envelope("fake3.dev", "driver", "router", {"RunJob": {"job": spec}}), net.client)
        assert status == 200, reply
        replies.append(reply["job_id"])
    assert replies == ["sent-twice", "sent-twice"]
    assert await count_rows(net.router, RoutedJob) == 1
    (held,) = await net.upstream.wait_arrivals(1)
    assert held.prompt == "hello"
    # Another node may not claim the job's id.
    raw = envelope("fake2.dev", "driver", "router", {"RunJob": {"job": job_spec("sent-twice", "fake2.dev")}})
    status, reply, _ = await post_envelope(http, net.router, raw, net.driver)
    assert status == 409, reply
    assert_error_body(reply, "duplicate_job")
    assert await count_rows(net.router, RoutedJob) == 1
    assert net.upstream.stats.requests == 1


async def test_envelopes_sent_outside_the_replay_window_are_refused(
    start_node: StartNode, start_held: StartHeld, http: aiohttp.ClientSession
) -> None:
    before_boot = time.time()
    router = await start_router(start_node)
    upstream = await start_held("llm")
    driver = await start_driver(start_node, "fake2.dev", router, upstream, model=MODEL, capacity=1)
    assert await registrations(router) == [("fake2.dev", MODEL, 1)]
    now = time.time()
    for name, sent_at in (
        ("two minutes old", now - 120),
        ("two minutes ahead", now + 120),
        ("before the router booted", before_boot - 3),  # within 60 s, but older than the process
    ):
        raw = envelope("fake2.dev", "driver", "router", register(["late"], 7), sent_at=sent_at)
        status, reply, _ = await post_envelope(http, router, raw, driver)
        assert status == 401, (name, reply)
        assert "too old, or from the future" in assert_error_body(reply, "replayed_message")["message"], name
    assert await registrations(router) == [("fake2.dev", MODEL, 1)]
    # The same message, sent now, is taken: only the time was at fault.
    status, reply, _ = await post_envelope(http, router, envelope("fake2.dev", "driver", "router", register(["late"], 7)), driver)
    assert status == 200, reply
    assert await registrations(router) == [("fake2.dev", "late", 7)]


async def test_an_envelope_for_one_router_replayed_to_another_is_refused(
    held_net: GatedNet, start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    net = held_net
    second_router = await start_router(start_node, "fake5.dev")
    data, headers = signed(envelope("fake2.dev", "driver", "router", register([MODEL], 4)), net.driver)
    status, reply, _ = await post_signed(http, net.router, data, headers)
    assert status == 200, reply
    status, reply, _ = await post_signed(http, second_router, data, headers)  # fake2.dev never registered with fake5.dev
    assert await registrations(second_router) == []
    assert status == 401, reply


async def test_a_message_one_replica_took_is_refused_as_a_replay_by_the_other(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    # Two processes of one router: one name, one home (key, admin token) and one database.
    first = await start_node("fake.dev", shared=True)
    await first.admin("StartRouter")
    second = await start_node("fake.dev", shared=True, database_url=first.node.options.database_url)
    driver = await start_node("fake2.dev")
    data, headers = signed(envelope("fake2.dev", "driver", "router", register([MODEL], 2)), driver)
    status, reply, _ = await post_signed(http, first, data, headers)
    assert status == 200, reply
    status, reply, _ = await post_signed(http, second, data, headers)
    assert status == 401, reply
    assert "replayed" in assert_error_body(reply, "replayed_message")["message"]
    # The second replica takes fresh messages, into the one database both serve.
    status, reply, _ = await post_envelope(http, second, envelope("fake2.dev", "driver", "router", register([MODEL], 3)), driver)
    assert status == 200, reply
    assert await registrations(first) == [("fake2.dev", MODEL, 3)]
