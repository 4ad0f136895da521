"""Chaos in our own suite: jobs flow through four node processes (router, two drivers, client) while nodes of
every role are killed with SIGKILL and started again, at random but from a seed (`LLMP_CHAOS_SEED`, printed).

Whatever breaks, every job the client's node accepted (202) ends exactly once: one final update, the last of
an unbroken sequence, and when it succeeded, the LLM's exact answer to its prompt.  The LLM is the fake one,
in this process, so it is never killed and its answers are known in advance.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster import CLIENT, DRIVER, DRIVER2, ROUTER, Cluster, job_body, record
from tests.helpers import expected_completion
from tests.streams import STEP_S, assert_in_order, final_of, follow, text_of
from tests.upstreams import recording_upstream

SEED = int(os.environ.get("LLMP_CHAOS_SEED", "14"))
CHAOS_S = 25.0  # killing and restarting; with setup and the jobs' ends, the test takes under a minute
JOB_TIMEOUT_S = 10.0
SUBMITTERS = 2
ROLES = {"router": (ROUTER,), "driver": (DRIVER, DRIVER2), "client": (CLIENT,)}


def answer_to(prompt: str) -> str:
    return "".join(expected_completion([{"role": "user", "content": prompt}])[0])


async def test_every_accepted_job_ends_exactly_once_while_nodes_of_every_role_are_killed_and_restarted(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(SEED)
    cluster = Cluster(tmp_path, http)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(cluster.close)
        upstream = await stack.enter_async_context(recording_upstream(ttft=0.0, tokens_per_second=40))
        nodes = await cluster.network(llm_url=upstream.url, drivers=(DRIVER, DRIVER2), capacity=4)
        client = nodes[CLIENT].url
        accepted: dict[str, str] = {}  # job id → prompt
        killed: Counter[str] = Counter()
        chaos_over = asyncio.Event()

        async def submit_until_chaos_is_over(lane: int) -> None:
            for n in range(10_000):
                if chaos_over.is_set():
                    return
                prompt = f"chaos {SEED} {lane}.{n}"
                try:
                    async with asyncio.timeout(STEP_S), http.post(f"{client}/jobs", json=job_body(prompt, timeout=JOB_TIMEOUT_S)) as response:
                        if response.status == 202:
                            accepted[(await response.json())["job_id"]] = prompt
                except (aiohttp.ClientError, TimeoutError):
                    pass  # the client's node is down, or went down while it answered: not accepted
                await asyncio.sleep(0.3)  # the pace of the load, not a wait for anything

        async def kill_and_restart() -> None:
            until = time.monotonic() + CHAOS_S
            turns: list[str] = []
            while time.monotonic() < until:
                await asyncio.sleep(rng.uniform(0.3, 1.5))  # jobs flow between kills
                turns = turns or rng.sample(sorted(ROLES), len(ROLES))  # every role in each round, in a random order
                role = turns.pop()
                name = rng.choice(ROLES[role])
                await cluster.kill9(name)
                killed[role] += 1
                await asyncio.sleep(rng.uniform(0.0, 1.0))  # down a while
                await cluster.restart(name)
            chaos_over.set()

        await asyncio.gather(kill_and_restart(), *(submit_until_chaos_is_over(lane) for lane in range(SUBMITTERS)))

        # Every node runs again: each accepted job ends, by its deadline at the latest.
        room = asyncio.Semaphore(32)

        async def ending(job_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            async with room:
                return await follow(http, client, job_id, bound=JOB_TIMEOUT_S + STEP_S), await record(http, client, job_id)

        ends = dict(zip(accepted, await asyncio.gather(*(ending(job_id) for job_id in accepted))))

    statuses: Counter[str] = Counter()
    why: Counter[str] = Counter()
    for job_id, (updates, job) in ends.items():
        assert_in_order(updates)
        final = final_of(updates)  # exactly one final update, and the last
        statuses[final["status"]] += 1
        if final["status"] != "succeeded":
            why[final.get("error") or "?"] += 1
        assert job["status"] == final["status"], (job_id, job, final)
        if final["status"] == "succeeded":
            assert text_of(updates) == job["text"] == answer_to(accepted[job_id]), (job_id, updates)
    print(
        f"\nchaos (seed {SEED}): accepted {len(accepted)}, kills {sum(killed.values())} {dict(killed)}, "
        f"succeeded {statuses['succeeded']}, failed {statuses['failed']}, timed_out {statuses['timed_out']}"
        + "".join(f"\n  {count} × {error}" for error, count in why.most_common())
    )
    assert accepted and statuses["succeeded"], statuses
    assert set(killed) == set(ROLES), f"the seed killed no node of some role: {dict(killed)}"
