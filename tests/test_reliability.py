"""Reliability with real OS processes: deadlines, cancellation, SSE resume, idempotency, crashes and drains.

Every node and fake LLM is a process of its own (`tests.cluster`).  Nothing waits on a timer: each step
awaits an HTTP answer, an SSE event or a process exit, under a bound.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.cluster import CLIENT, DRIVER, DRIVER2, ROUTER, Cluster, db_row, job_body, record
from tests.streams import (
    STEP_S,
    assert_in_order,
    events,
    final_of,
    first_update,
    first_updates,
    follow,
    followed,
    run_to_end,
    submit,
    text_of,
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No client-side timeouts: every wait in these tests is bounded by asyncio.timeout instead.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


# --- 1. deadlines ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["request", "node"])
async def test_deadline_ends_a_slow_job_timed_out_and_frees_the_driver(cluster: Cluster, http: aiohttp.ClientSession, where: str) -> None:
    # The job would take 50 s; its deadline leaves room for the first tokens to arrive on a slow machine.
    client_flags = ("--job-timeout", "3") if where == "node" else ()
    nodes = await cluster.network(llm={"ttft": 0, "tps": 2, "tokens": 100}, client_flags=client_flags)
    client = nodes[CLIENT].url
    body = job_body("slow", **({"timeout": 3} if where == "request" else {}))

    created = await submit(http, client, body)
    updates = await follow(http, client, created["job_id"])

    final = final_of(updates)
    assert final["status"] == "timed_out", final
    assert "deadline" in (final.get("error") or ""), final
    assert_in_order(updates)
    job = await record(http, client, created["job_id"])
    assert job["status"] == "timed_out"
    assert job["text"], "the text produced before the deadline is kept"
    assert job["text"] == text_of(updates)

    # The driver (capacity 1) is free again: a short job runs to the end.
    after = await run_to_end(http, client, job_body("short", max_tokens=2, timeout=10))
    assert final_of(after)["status"] == "succeeded", after[-1]
    assert text_of(after)
    # The serving driver itself stopped the job at its deadline (not only the router's and client's bookkeeping).
    assert db_row(nodes[DRIVER].database, "SELECT status FROM served_jobs WHERE id = ?", created["job_id"]) == ("timed_out",)


async def test_a_job_queued_past_its_deadline_times_out_while_the_driver_is_busy(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0, "tps": 2, "tokens": 100}, capacity=1)
    client = nodes[CLIENT].url
    long = await submit(http, client, job_body("long", timeout=10))
    started = await first_update(http, client, long["job_id"])  # the only driver is now busy with it
    assert started["driver"] == DRIVER

    queued = await submit(http, client, job_body("waits", timeout=1))
    assert queued["status"] == "queued"
    updates = await follow(http, client, queued["job_id"])

    final = final_of(updates)
    assert final["status"] == "timed_out", final
    job = await record(http, client, queued["job_id"])
    assert job["status"] == "timed_out"
    assert job.get("driver") is None and job["text"] == "" and job.get("first_token_at") is None, job
    assert (await record(http, client, long["job_id"]))["status"] == "running", "the first job goes on"
    # The router ended it in its queue (the client's own fallback comes a second later, and says otherwise),
    # and no driver was ever given it.
    assert "queued" in (final.get("error") or ""), final
    assert db_row(nodes[ROUTER].database, "SELECT status, driver_node FROM routed_jobs WHERE id = ?", queued["job_id"]) == ("timed_out", None)
    assert db_row(nodes[DRIVER].database, "SELECT count(*) FROM served_jobs WHERE id = ?", queued["job_id"]) == (0,)


async def test_first_token_timeout_ends_the_job_timed_out(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 3, "tps": 0, "tokens": 5})
    client = nodes[CLIENT].url

    updates = await run_to_end(http, client, job_body("no first token soon", first_token_timeout=0.5, timeout=30))

    final = final_of(updates)
    assert final["status"] == "timed_out", final
    assert "first token" in (final.get("error") or ""), final
    job = await record(http, client, final["job_id"])
    assert job["status"] == "timed_out" and job["text"] == "" and "first token" in (job["error"] or "")


# --- 4. SSE resume ----------------------------------------------------------------------------


async def test_sse_reader_resumes_with_last_event_id_and_late_readers_get_everything(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0, "tps": 20, "tokens": 30})
    client = nodes[CLIENT].url
    created = await submit(http, client, job_body("resume me", timeout=30))
    job_id = created["job_id"]

    # Read three updates, then hang up mid-stream.
    before: list[dict[str, Any]] = []
    async with asyncio.timeout(STEP_S):
        async with http.get(f"{client}/jobs/{job_id}/events") as response:
            async for event in events(response):
                update = json.loads(event.data)
                assert event.id == str(update["seq"])
                before.append(update)
                if len(before) == 3:
                    break
            response.close()
    assert not any(u["is_final"] for u in before), "the job should still be streaming"
    assert_in_order(before)

    after = await follow(http, client, job_id, last_event_id=before[-1]["seq"])
    assert_in_order(after, first_seq=before[-1]["seq"] + 1)  # each remaining chunk once, in order
    assert final_of(after)["status"] == "succeeded"
    whole = before + after
    job = await record(http, client, job_id)
    assert text_of(whole) == job["text"] and job["text"]

    # A reader that comes after the end gets the whole job, final included.
    late = await follow(http, client, job_id)
    assert [(u["seq"], u.get("delta", "")) for u in late] == [(u["seq"], u.get("delta", "")) for u in whole]
    assert final_of(late)["status"] == "succeeded"


async def test_two_concurrent_readers_each_get_the_full_ordered_stream(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0, "tps": 40, "tokens": 20})
    client = nodes[CLIENT].url
    created = await submit(http, client, job_body("two readers", timeout=30))

    first, second = await asyncio.gather(follow(http, client, created["job_id"]), follow(http, client, created["job_id"]))

    for updates in (first, second):
        assert_in_order(updates)
        assert final_of(updates)["status"] == "succeeded"
    assert [(u["seq"], u.get("delta", "")) for u in first] == [(u["seq"], u.get("delta", "")) for u in second]
    assert text_of(first) == (await record(http, client, created["job_id"]))["text"]


# --- 5. idempotency -----------------------------------------------------------------------------


async def test_idempotency_key_returns_the_same_job(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0, "tps": 0, "tokens": 3})
    client = nodes[CLIENT].url
    body = job_body("once", timeout=30)

    one = await submit(http, client, body, headers={"Idempotency-Key": "key-1"})
    again = await submit(http, client, body, headers={"Idempotency-Key": "key-1"})
    other = await submit(http, client, body, headers={"Idempotency-Key": "key-2"})
    racing = await asyncio.gather(*(submit(http, client, body, headers={"Idempotency-Key": "key-3"}) for _ in range(4)))

    assert again["job_id"] == one["job_id"]
    assert other["job_id"] != one["job_id"]
    assert len({created["job_id"] for created in racing}) == 1, racing
    assert racing[0]["job_id"] not in (one["job_id"], other["job_id"])
    for job_id in (one["job_id"], other["job_id"], racing[0]["job_id"]):
        assert final_of(await follow(http, client, job_id))["status"] == "succeeded"
    assert db_row(nodes[ROUTER].database, "SELECT count(*) FROM routed_jobs") == (3,), "one job per key reached the router"


# --- 6. cancellation ------------------------------------------------------------------------------


async def test_delete_cancels_a_running_job_end_to_end_and_frees_the_driver(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0, "tps": 5, "tokens": 200}, capacity=1)
    client = nodes[CLIENT].url
    async with followed(http, client, job_body("cancel me", timeout=60)) as job:
        job_id = job.job_id
        started = await first_update(http, client, job_id)
        assert started["driver"] == DRIVER

        async with asyncio.timeout(STEP_S):
            async with http.delete(f"{client}/jobs/{job_id}") as response:
                assert response.status == 200, await response.text()
                cancelled = await response.json()
        assert cancelled["status"] == "cancelled"

        updates = await job.reader
    assert final_of(updates)["status"] == "cancelled"
    assert_in_order(updates)

    # The router's and the serving driver's records ended too (both are written before DELETE answers).
    assert db_row(nodes[ROUTER].database, "SELECT status FROM routed_jobs WHERE id = ?", job_id) == ("cancelled",)
    assert db_row(nodes[DRIVER].database, "SELECT status FROM served_jobs WHERE id = ?", job_id) == ("cancelled",)

    # The single driver is free: the next job runs to the end.
    after = await run_to_end(http, client, job_body("next", max_tokens=2, timeout=10))
    assert final_of(after)["status"] == "succeeded", after[-1]

    async with asyncio.timeout(STEP_S):
        async with http.delete(f"{client}/jobs/{job_id}") as response:
            assert response.status == 409, await response.text()
        async with http.delete(f"{client}/jobs/{after[-1]['job_id']}") as response:
            assert response.status == 409, await response.text()
        async with http.delete(f"{client}/jobs/no-such-job") as response:
            assert response.status == 404, await response.text()


# --- 7-9. crashes and drains -----------------------------------------------------------------------


async def test_router_killed_with_jobs_queued_restarts_and_every_job_completes(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0.2, "tps": 10, "tokens": 50}, capacity=1)
    client = nodes[CLIENT].url
    # Deadlines well past the ~3 s these four jobs need (restart included), short enough that a stuck job ends, not hangs.
    created = [await submit(http, client, job_body(f"job {i}", max_tokens=5, timeout=8)) for i in range(4)]

    assert await cluster.kill9(ROUTER) == -signal.SIGKILL
    await cluster.restart(ROUTER)

    results = await asyncio.gather(*(follow(http, client, job["job_id"], bound=30) for job in created))
    statuses = [final_of(updates)["status"] for updates in results]
    assert statuses == ["succeeded"] * 4, [final_of(updates) for updates in results]


async def test_driver_killed_mid_job_the_job_ends_and_the_other_driver_serves_the_next(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0, "tps": 5, "tokens": 200}, drivers=(DRIVER, DRIVER2), capacity=1)
    client = nodes[CLIENT].url
    # the router gives up on a silent driver after ~20 s
    async with followed(http, client, job_body("long", timeout=60), bound=40) as job:
        job_id = job.job_id
        serving = (await first_update(http, client, job_id))["driver"]
        assert serving in (DRIVER, DRIVER2)
        survivor = DRIVER2 if serving == DRIVER else DRIVER

        assert await cluster.kill9(serving) == -signal.SIGKILL
        updates = await job.reader

    final = final_of(updates)
    assert final["status"] in ("succeeded", "failed"), final
    if final["status"] == "failed":
        assert serving in (final.get("error") or ""), f"the error should name the lost driver: {final}"
    else:  # handed to the other driver before any of its output reached the client
        assert final["driver"] == survivor, final
    stored = await record(http, client, job_id)
    assert stored["status"] == final["status"] and stored["text"] == text_of(updates)

    after = await run_to_end(http, client, job_body("after", max_tokens=3, timeout=20))
    assert final_of(after)["status"] == "succeeded", after[-1]
    assert final_of(after)["driver"] == survivor


async def test_driver_restarted_mid_job_ends_it_failed_and_serves_again(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await cluster.network(llm={"ttft": 0, "tps": 5, "tokens": 200}, capacity=1)
    client = nodes[CLIENT].url
    # no 20 s wait for the reader: the driver says so itself when it is back
    async with followed(http, client, job_body("long", timeout=60)) as job:
        job_id = job.job_id
        # Two chunks seen: the driver sends its second only after it recorded that it had sent the first.
        assert (await first_updates(http, client, job_id, 2))[0]["driver"] == DRIVER
        assert await cluster.kill9(DRIVER) == -signal.SIGKILL
        await cluster.restart(DRIVER)
        updates = await job.reader

    final = final_of(updates)
    assert final["status"] == "failed" and "restarted" in (final.get("error") or ""), final
    assert_in_order(updates)
    assert (await record(http, client, job_id))["text"] == text_of(updates)
    after = await run_to_end(http, client, job_body("after", max_tokens=3, timeout=20))
    assert final_of(after)["status"] == "succeeded", after[-1]
    assert final_of(after)["driver"] == DRIVER


async def test_a_job_whose_output_reached_the_client_is_not_handed_out_again(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """A driver killed after its first chunk reached the client but before it recorded so (served_jobs.streamed
    still 0) gives the job back at restart as if nothing had been sent.  Killing right after the client sees the
    first chunk lands in that window about half the time; to make it certain, the driver's row is set to the
    state such a crash leaves, while the driver is down."""
    nodes = await cluster.network(llm={"ttft": 0, "tps": 5, "tokens": 200}, capacity=1)
    client = nodes[CLIENT].url
    async with followed(http, client, job_body("long", timeout=8)) as job:
        job_id = job.job_id
        assert (await first_update(http, client, job_id))["driver"] == DRIVER
        assert await cluster.kill9(DRIVER) == -signal.SIGKILL
        # the router notes that the job streamed right after relaying its first chunk
        async with asyncio.timeout(STEP_S):
            while db_row(nodes[ROUTER].database, "SELECT streamed FROM routed_jobs WHERE id = ?", job_id) != (1,):
                await asyncio.sleep(0.01)  # polling another process's database: there is no event to await
        assert db_row(nodes[ROUTER].database, "SELECT streamed FROM routed_jobs WHERE id = ?", job_id) == (1,)
        connection = sqlite3.connect(nodes[DRIVER].database)
        with connection:
            connection.execute("UPDATE served_jobs SET streamed = 0 WHERE id = ?", (job_id,))
        connection.close()
        await cluster.restart(DRIVER)
        updates = await job.reader

    final = final_of(updates)
    assert final["status"] == "failed", final  # not handed out again: its first chunk is already the client's
    assert (await record(http, client, job_id))["text"] == text_of(updates)


async def test_a_job_the_llm_keeps_refusing_is_retried_then_failed(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    # Two drivers: the job's 2nd or 3rd attempt always lands on a driver that already had it once.
    # Whatever the draws, the rules say: 3 attempts (backoff 0.2 s, 0.4 s), then failed.
    nodes = await cluster.network(llm={"ttft": 0, "tps": 0, "tokens": 5}, drivers=(DRIVER, DRIVER2), capacity=1)
    client = nodes[CLIENT].url
    updates = await run_to_end(http, client, job_body("BUSY", timeout=5))  # the fake LLM answers a plain 503 to "BUSY"

    final = final_of(updates)
    assert final["status"] == "failed", final
    assert "3 attempts" in (final.get("error") or ""), final


async def test_a_request_the_llm_refuses_fails_at_once_and_costs_the_driver_nothing(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """An OpenAI-style error answer is the LLM's verdict on the request: not retried, not held against the driver."""
    nodes = await cluster.network(llm={"ttft": 0, "tps": 0, "tokens": 5}, capacity=1)
    client = nodes[CLIENT].url
    refused = final_of(await run_to_end(http, client, job_body("FAIL", timeout=10)))  # HTTP 500 with an error body
    assert refused["status"] == "failed", refused
    assert "fake upstream failure" in refused["error"] and "attempts" not in refused["error"], refused
    for prompt in ("after 1", "after 2", "after 3"):  # more than the failures it takes to cool a driver down
        after = final_of(await run_to_end(http, client, job_body(prompt, max_tokens=2, timeout=5)))
        assert after["status"] == "succeeded", after


async def test_sigterm_drains_the_running_job_refuses_new_ones_and_exits_zero(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    # One node, serving llama3 with its own LLM: jobs submitted to it are served locally.
    nodes = await cluster.network(llm={"ttft": 0, "tps": 10, "tokens": 30}, router=False, client=False, driver_flags=("--drain-grace", "5"))
    node = nodes[DRIVER]
    async with followed(http, node.url, job_body("drain me", timeout=30)) as job:
        await first_update(http, node.url, job.job_id)  # it is streaming now
        node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

        # The node takes no new job while it drains.  A probe that lands before the signal is handled
        # is an ordinary short job (drained with the rest); the job above lasts ~3 s, ample for one to land after.
        refused = None
        async with asyncio.timeout(STEP_S):
            while refused is None:
                async with http.post(f"{node.url}/jobs", json=job_body("probe", max_tokens=1, timeout=30)) as response:
                    body = await response.json()
                    if response.status == 503:
                        refused = body
                    else:
                        assert response.status == 202, body
        assert refused["error"]["code"] == "shutting_down", refused

        updates = await job.reader
    final = final_of(updates)
    assert final["status"] == "succeeded", final
    assert_in_order(updates)
    assert await cluster.exited(DRIVER) == 0, cluster.output_of(DRIVER)


async def test_client_node_killed_mid_job_misses_no_chunk_after_restart(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """The router refuses updates it cannot pass on; the driver keeps them and tries again until the
    client's node is back, so the stored job has every chunk, in order, exactly once."""
    nodes = await cluster.network(llm={"ttft": 0, "tps": 10, "tokens": 30}, capacity=1)
    client = nodes[CLIENT].url
    created = await submit(http, client, job_body("long", timeout=30))
    job_id = created["job_id"]
    assert (await first_update(http, client, job_id))["driver"] == DRIVER

    assert await cluster.kill9(CLIENT) == -signal.SIGKILL
    await cluster.restart(CLIENT)
    updates = await follow(http, client, job_id, bound=30)

    final = final_of(updates)
    assert final["status"] == "succeeded", final
    assert_in_order(updates)
    words = text_of(updates).split()
    assert len(words) == 30, f"every token of the answer arrived once: {words}"
