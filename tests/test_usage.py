"""Usage accounting and token budgets through the seed's three nodes (router fake.dev, driver fake2.dev,
client fake3.dev): who used what, read back with GET /usage and `emulator usage`; what a cancelled, hung-up
or timed-out job counts; budgets that refuse with 429 and store nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from handlers.config import read_config
from llm_provider.homes import Home
from store.models import Budget, Job, RoutedJob
from tests.cluster import CLIENT, DRIVER, ROUTER, Cluster, db_row, job_body
from tests.conftest import NODE_SETUPS, Network, RunningNode
from tests.helpers import assert_error_body, count_rows, get_json, store_of
from tests.helpers import gated_network as gated_network  # a fixture
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import scripted_network as scripted_network  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.processes import EMULATOR
from tests.streams import GUARD_S, STEP_S, final_of, follow, job_stream, job_updates, next_update, run_job, submit
from tests.upstreams import MODEL, USAGE, HeldUpstream, Reply, ScriptedUpstream, chat_chunk, delta, usage_chunk
from tests.upstreams import gated as gated  # a fixture
from tests.upstreams import scripted as scripted  # a fixture

pytestmark = pytest.mark.databases_only  # accounting and budgets: the handlers' and the store's, not the hosts'

CHAT = "chat/completions"
DAY_MARGIN_S = 60.0  # the longest a test that counts today's usage takes, on a loaded machine, with room to spare


async def a_whole_utc_day_ahead() -> str:
    """Today (UTC), once at least DAY_MARGIN_S are left of it: a test that reads back today's counts must not
    straddle midnight (its jobs would be counted on two days).  Near midnight this waits for the next day."""
    now = time.time()
    if (left := seconds_to_next_utc_day(now)) < DAY_MARGIN_S:
        await asyncio.sleep(left + 0.5)
    return dt.datetime.now(dt.UTC).date().isoformat()
Row = dict[str, Any]


def answer(*parts: str) -> Reply:
    chunks = [chat_chunk(delta(role="assistant", content=""))] + [chat_chunk(delta(content=part)) for part in parts]
    return Reply(chunks=[*chunks, chat_chunk(delta(finish_reason="stop")), usage_chunk()])  # usage: 5 prompt, 3 completion


async def usage_of(http: aiohttp.ClientSession, node: RunningNode, **query: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {node.node.home.admin_token()}"}
    async with asyncio.timeout(GUARD_S), http.get(f"{node.url}/usage", params=query, headers=headers) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
    return body


def rows(report: dict[str, Any], role: str) -> list[Row]:
    return [{k: v for k, v in row.items() if k not in ("day", "role")} for row in report["usage"] if row["role"] == role]


async def usage_when(http: aiohttp.ClientSession, node: RunningNode, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The node's usage once `ready` holds.  A serving driver counts a job once it has delivered its end (and a
    router adds what a cancelled job's driver reports): nothing tells the test when but the figures."""
    async with asyncio.timeout(GUARD_S):
        while not ready(report := await usage_of(http, node)):
            await asyncio.sleep(0.02)
    return report


def counted(client: str, jobs: int, prompt: int, completion: int, estimated: int = 0, label: str | None = None) -> Row:
    return {
        "client": client, "label": label, "model": MODEL, "jobs": jobs, "prompt_tokens": prompt, "completion_tokens": completion,
        "estimated_jobs": estimated,
    }


# --- who used what -----------------------------------------------------------------------------------------


async def test_each_node_counts_the_jobs_it_handled_by_client_and_model(
    scripted_network: Network, http: aiohttp.ClientSession
) -> None:
    network = scripted_network
    today = await a_whole_utc_day_ahead()
    upstream: ScriptedUpstream = network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, answer("wood", "chuck"))
    key = (await network.client.admin({"CreateApiKey": {"label": "alice"}}))["key"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as alice:
        for i in range(2):
            _, updates = await run_job(alice, network.client.url, {"model": MODEL, "prompt": f"alice {i}"})
            assert updates[-1]["status"] == "succeeded"
    _, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "anyone"})
    assert updates[-1]["status"] == "succeeded"

    # The client's node: per HTTP client (an API key, or an address).  The router: per client node and key label.
    # The serving driver: per origin node (its router).
    assert rows(await usage_of(http, network.client), "client") == [
        counted("http:127.0.0.1", 1, 5, 3), counted("key:alice", 2, 10, 6),
    ]
    assert rows(await usage_of(http, network.router), "router") == [
        counted(network.client.name, 1, 5, 3), counted(network.client.name, 2, 10, 6, label="alice"),
    ]
    driver = await usage_when(http, network.driver, lambda report: sum(row["jobs"] for row in report["usage"]) == 3)
    assert rows(driver, "driver") == [counted(network.router.name, 3, 15, 9)]
    assert {row["day"] for node in (network.client, network.router) for row in (await usage_of(http, node))["usage"]} == {today}

    # Narrowed by client, model, role, key label and UTC days.
    alices = await usage_of(http, network.router, label="alice")
    assert rows(alices, "router") == [counted(network.client.name, 2, 10, 6, label="alice")]
    assert (await usage_of(http, network.router, model="other"))["usage"] == []
    assert (await usage_of(http, network.client, client="key:alice", since=today, until=today))["usage"][0]["jobs"] == 2
    assert (await usage_of(http, network.client, until="2000-01-01"))["usage"] == []
    assert {row["role"] for row in (await usage_of(http, network.router, role="router"))["usage"]} == {"router"}


@pytest.mark.parametrize("node_setup", NODE_SETUPS)  # a query string and a header, read by each host
async def test_usage_takes_the_admin_token_and_refuses_a_bad_query(
    scripted_network: Network, http: aiohttp.ClientSession
) -> None:
    router = scripted_network.router
    metrics_token = router.node.home.metrics_token()
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Bearer {metrics_token}"}):
        async with http.get(f"{router.url}/usage", headers=headers) as response:
            assert response.status == 401
            assert_error_body(await response.json(), "admin_token_required")
    admin = {"Authorization": f"Bearer {router.node.home.admin_token()}"}
    for query in ({"since": "yesterday"}, {"since": "2030-01-02", "until": "2030-01-01"}, {"role": "owner"}, {"clinet": "x"}):
        async with http.get(f"{router.url}/usage", params=query, headers=admin) as response:
            assert response.status == 422, query
            assert_error_body(await response.json(), "invalid_fields")


@pytest.mark.parametrize("node_setup", ["aiohttp"])  # the command reads GET /usage, which every host serves alike
async def test_emulator_usage_prints_each_client_and_model_with_jobs_and_tokens(
    scripted_network: Network, http: aiohttp.ClientSession
) -> None:
    network = scripted_network
    today = await a_whole_utc_day_ahead()
    upstream: ScriptedUpstream = network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, answer("wood"))
    await network.router.admin({"SetBudget": {"client": network.client.name, "daily_tokens": 1000}})
    _, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hi"})
    assert updates[-1]["status"] == "succeeded"
    port = network.router.url.rsplit(":", 1)[1]
    process = await asyncio.create_subprocess_exec(  # not subprocess.run: this loop serves the node meanwhile
        str(EMULATOR), "usage", "-p", port, "--home", str(network.router.home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split() == "DAY ROLE CLIENT KEY MODEL JOBS PROMPT TOKENS COMPLETION TOKENS ESTIMATED".split()
    assert lines[1].split() == [today, "router", network.client.name, "-", MODEL, "1", "5", "3", "-"]
    assert lines[3].split() == ["BUDGET", "DAILY", "TOKENS", "USED", "TODAY"]
    assert lines[4].split() == [network.client.name, "1000", "8"]


# --- what a job cut short counts ----------------------------------------------------------------------------

PROMPT = "cut me short"  # 12 characters: 3 prompt tokens, estimated
CUT = {"prompt": 3, "completion": 1, "estimated": 1}  # and one chunk of output ("alpha") before the cut


def cut_short(client: str) -> Row:
    return counted(client, 1, CUT["prompt"], CUT["completion"], CUT["estimated"])


async def assert_every_node_counted_the_cut_job(network: Network, http: aiohttp.ClientSession, client_row: Row) -> None:
    def one_job(report: dict[str, Any]) -> bool:
        return [row["completion_tokens"] for row in report["usage"]] == [1]

    assert rows(await usage_when(http, network.client, one_job), "client") == [client_row]
    assert rows(await usage_when(http, network.router, one_job), "router") == [cut_short(network.client.name)]
    assert rows(await usage_when(http, network.driver, one_job), "driver") == [cut_short(network.router.name)]


async def test_a_cancelled_job_counts_what_the_llm_produced_before(
    gated_network: Network, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    network = gated_network
    created = await submit(http, network.client.url, {"model": MODEL, "prompt": PROMPT})
    async with job_stream(http, network.client.url, created["job_id"]) as stream:
        assert (await next_update(stream))["delta"] == "alpha"
        async with http.delete(f"{network.client.url}/jobs/{created['job_id']}") as response:
            assert response.status == 200, await response.text()
    await assert_every_node_counted_the_cut_job(network, http, cut_short("http:127.0.0.1"))


@pytest.mark.parametrize("node_setup", NODE_SETUPS)  # each host tells a hang-up its own way
async def test_a_job_whose_client_hung_up_counts_what_the_llm_produced_before(
    gated_network: Network, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    network = gated_network
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    async with asyncio.timeout(GUARD_S), http.post(f"{network.client.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: ") and b"alpha" in line:
                break
        response.close()  # hangs up mid-answer
    await assert_every_node_counted_the_cut_job(network, http, cut_short("http:127.0.0.1"))


async def test_a_job_cut_by_its_deadline_counts_what_the_llm_produced_before(
    gated_network: Network, gated: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    network = gated_network
    # The deadline leaves the first chunk time to reach this node on a loaded machine (0.5 s once did not, in CI).
    created = await submit(http, network.client.url, {"model": MODEL, "prompt": PROMPT, "timeout": 3.0})
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, network.client.url, created["job_id"])
    assert updates[-1]["status"] == "timed_out"
    assert "".join(update["delta"] for update in updates) == "alpha", updates  # what the LLM produced before reached it
    await assert_every_node_counted_the_cut_job(network, http, cut_short("http:127.0.0.1"))


async def test_without_usage_from_the_llm_the_chunks_are_counted_and_marked_estimated(
    scripted_network: Network, http: aiohttp.ClientSession
) -> None:
    network = scripted_network
    upstream: ScriptedUpstream = network.upstream  # type: ignore[assignment]
    words = [chat_chunk(delta(content=word)) for word in "abcd"]
    role, end = chat_chunk(delta(role="assistant", content="")), chat_chunk(delta(finish_reason="stop"))
    upstream.script(CHAT, Reply(chunks=[role, *words, end]))
    created, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "12345678"})
    assert updates[-1]["status"] == "succeeded"
    assert rows(await usage_of(http, network.client), "client") == [counted("http:127.0.0.1", 1, 2, 4, estimated=1)]
    record = await get_json(http, f"{network.client.url}/jobs/{created['job_id']}")
    assert record["usage"] is None  # what a client reads stays the LLM's: nothing made up


# --- budgets ---------------------------------------------------------------------------------------------------


def seconds_to_next_utc_day(now: float) -> float:
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp() - now


async def refused_submission(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST /jobs and /v1/chat/completions, each refused with 429 for a budget; the error of the first."""
    errors = []
    requests = (
        ("/jobs", {"model": MODEL, "prompt": "more"}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "more"}]}),
    )
    for path, body in requests:
        asked = time.time()
        async with asyncio.timeout(GUARD_S), http.post(url + path, json=body, headers=headers or {}) as response:
            payload = await response.json()
            assert response.status == 429, payload
            assert abs(int(response.headers["Retry-After"]) - seconds_to_next_utc_day(asked)) <= 2, response.headers
        errors.append(assert_error_body(payload, "budget_exhausted"))
    return errors[0]


async def test_a_client_node_over_its_daily_budget_gets_429_until_the_next_utc_day_and_nothing_is_stored(
    scripted_network: Network, http: aiohttp.ClientSession
) -> None:
    network = scripted_network
    await a_whole_utc_day_ahead()  # a budget is a day's
    upstream: ScriptedUpstream = network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, answer("wood"))
    await network.router.admin({"SetGate": {"deny": ["intruder.dev"]}})
    budget = {"SetBudget": {"client": network.client.name, "daily_tokens": 8}}
    assert await network.router.admin(budget) == {"ok": True, "note": None}
    _, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "first"})  # under budget: it may overshoot
    assert updates[-1]["status"] == "succeeded"
    stored = (await count_rows(network.client, Job), await count_rows(network.router, RoutedJob), len(upstream.sent))

    error = await refused_submission(http, network.client.url)
    assert network.client.name in error["message"] and "8 tokens" in error["message"]
    assert error["details"]["budget"] == network.client.name and error["details"]["used_today"] == USAGE["total_tokens"]
    assert (await count_rows(network.client, Job), await count_rows(network.router, RoutedJob), len(upstream.sent)) == stored

    # Its own message: the gate's lists stayed as they were; and a budget goes with daily_tokens null.
    async with store_of(network.router).reading() as session:
        assert (await read_config(session)).deny_clients == ["intruder.dev"]
    await network.router.admin({"SetBudget": {"client": network.client.name, "daily_tokens": None}})
    _, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "again"})
    assert updates[-1]["status"] == "succeeded"
    assert await count_rows(network.router, Budget) == 0


async def test_an_api_keys_budget_refuses_that_key_only(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    await a_whole_utc_day_ahead()  # a budget is a day's
    network = scripted_network
    upstream: ScriptedUpstream = network.upstream  # type: ignore[assignment]
    upstream.script(CHAT, answer("wood"))
    key = (await network.client.admin({"CreateApiKey": {"label": "alice"}}))["key"]
    alice = {"Authorization": f"Bearer {key}"}
    await network.router.admin({"SetBudget": {"client": network.client.name, "label": "alice", "daily_tokens": 1}})
    async with aiohttp.ClientSession(headers=alice) as session:
        _, updates = await run_job(session, network.client.url, {"model": MODEL, "prompt": "alice"})
    assert updates[-1]["status"] == "succeeded"
    error = await refused_submission(http, network.client.url, alice)
    assert error["details"]["budget"] == f"{network.client.name}/alice" and "API key 'alice'" in error["message"]
    _, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "someone else"})
    assert updates[-1]["status"] == "succeeded"
    report = await usage_of(http, network.router)
    assert report["budgets"] == [
        {"client": network.client.name, "label": "alice", "daily_tokens": 1, "used_today": USAGE["total_tokens"]},
    ]


async def test_a_malformed_budget_is_refused_and_changes_nothing(scripted_network: Network, http: aiohttp.ClientSession) -> None:
    router = scripted_network.router
    token = router.node.home.admin_token()
    bad_budgets = (
        {"client": "fake3.dev", "daily_tokens": -1}, {"client": "", "daily_tokens": 5}, {"daily_tokens": 5},
        {"client": "fake3.dev", "daily_tokens": "lots"}, {"client": "fake3.dev", "tokens": 5},
    )
    for bad in bad_budgets:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(f"{router.url}/admin", json={"SetBudget": bad}, headers=headers) as response:
            assert response.status == 422, (bad, await response.text())
            assert_error_body(await response.json(), "invalid_fields")
    assert await count_rows(router, Budget) == 0


# --- across restarts and replicas: real processes ---------------------------------------------------------


async def test_budgets_hold_across_a_router_restart_and_across_its_replicas(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    await a_whole_utc_day_ahead()  # a budget is a day's
    cluster = Cluster(tmp_path, http, replicas={ROUTER: 2})
    try:
        llm = await cluster.llm(tokens=4)
        flags = ("--shared", "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'router.db'}")
        replicas = [await cluster.node(ROUTER, *flags), await cluster.node(ROUTER, *flags, replica=2)]
        await replicas[0].admin("StartRouter")
        driver, client = await asyncio.gather(cluster.node(DRIVER), cluster.node(CLIENT))
        await driver.admin({"SetRouter": {"node": ROUTER}})
        await driver.admin({"RegisterOaiProviderEndpoint": {"endpoint": llm}}, "openai")
        await driver.admin({"SetLocalDriver": {"model": MODEL, "is_public": True}})
        await client.admin({"SetRouter": {"node": ROUTER}})
        await replicas[1].admin({"SetBudget": {"client": CLIENT, "daily_tokens": 1}})
        spent = await submit(http, client.url, job_body("spend it"))
        assert final_of(await follow(http, client.url, spent["job_id"]))["status"] == "succeeded"

        await cluster.kill9(replicas[0].name)
        await cluster.restart(replicas[0].name)
        # The client takes turns among the router's URLs: these reach both replicas, the restarted one included.
        for _ in range(4):
            async with asyncio.timeout(STEP_S), http.post(f"{client.url}/jobs", json=job_body("more")) as response:
                assert response.status == 429, await response.text()
                assert_error_body(await response.json(), "budget_exhausted")
        for replica in replicas:
            headers = {"Authorization": f"Bearer {Home(tmp_path / ROUTER).admin_token()}"}
            async with http.get(f"{replica.url}/usage", headers=headers) as response:
                budgets = (await response.json())["budgets"]
            assert budgets[0]["client"] == CLIENT and budgets[0]["used_today"] > 1, budgets
            async with http.get(f"{replica.url}/metrics") as response:
                refused = [
                    sample.value for family in text_string_to_metric_families(await response.text()) for sample in family.samples
                    if sample.name == "llmp_node_messages_refused_total" and sample.labels["reason"] == "budget_exhausted"
                ]
            assert sum(refused) >= 1, f"{replica.name} refused none: the submissions did not reach both replicas"
        assert db_row(client.database, "SELECT count(*) FROM jobs") == (1,)
    finally:
        await cluster.close()
