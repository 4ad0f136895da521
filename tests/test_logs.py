"""Logs you can follow across nodes: three node processes with `--log-format json`, one job followed through
their logs by its trace id, and `emulator logs NODE [-f]` reading them by name."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp

from llm_provider.homes import Home
from tests.cluster import CLIENT, DRIVER, ROUTER, Cluster, Proc, job_body
from tests.processes import EMULATOR
from tests.streams import STEP_S, final_of, follow, submit
from tests.upstreams import MODEL

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
JSON_LOGS = ("--log-format", "json")
PIPES: dict[str, Any] = {"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE}


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every line of the node's log, each of which must be one JSON object."""
    assert proc.home is not None
    lines = Home(proc.home).log_file.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "node", "pid", "worker", "logger", "message"} <= set(entry), entry
        assert entry["node"] == proc.name, entry
    return entries


def about(entries: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("job_id") == job_id]


async def read_until(stream: asyncio.StreamReader, text: str) -> str:
    """Lines from `stream` until one holds `text`; all of them."""
    seen: list[str] = []
    async with asyncio.timeout(STEP_S):
        while text not in (line := (await stream.readline()).decode()):
            assert line, f"the output ended before {text!r}:\n{''.join(seen)}"
            seen.append(line)
    return "".join(seen) + line


async def test_one_job_is_followed_across_three_nodes_json_logs_by_its_trace_id_and_emulator_logs_reads_them(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = Cluster(tmp_path, http)
    try:
        llm = await cluster.llm(tokens=4)
        router, driver, client = await asyncio.gather(*(cluster.node(name, *JSON_LOGS) for name in (ROUTER, DRIVER, CLIENT)))
        await router.admin("StartRouter")
        await driver.admin({"SetRouter": {"node": ROUTER}})
        await driver.admin({"RegisterOaiProviderEndpoint": {"endpoint": llm}}, "openai")
        await driver.admin({"SetLocalDriver": {"model": MODEL, "is_public": True}})
        await client.admin({"SetRouter": {"node": ROUTER}})

        # A client that sends its own trace context: the job joins its trace, on every node.
        trace_id = secrets.token_hex(16)
        traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
        created = await submit(http, client.url, job_body("follow me"), {"traceparent": traceparent})
        assert final_of(await follow(http, client.url, created["job_id"]))["status"] == "succeeded"
        # One that sends none: a trace is made at submission.
        plain = await submit(http, client.url, job_body("and me"))
        assert final_of(await follow(http, client.url, plain["job_id"]))["status"] == "succeeded"

        made = {entry.get("trace_id") for entry in about(json_lines(client), plain["job_id"])}
        assert len(made) == 1, made
        made_trace = made.pop()
        assert TRACE_ID.match(made_trace or ""), "a trace id made by the client's node"
        for proc in (client, router, driver):
            entries = json_lines(proc)
            for job_id, trace in ((created["job_id"], trace_id), (plain["job_id"], made_trace)):
                lines = about(entries, job_id)
                assert lines, f"{proc.name} logged nothing about job {job_id}"
                assert {entry.get("trace_id") for entry in lines} == {trace}, (proc.name, lines)
                assert all(entry["worker"] and entry["pid"] == proc.pid for entry in lines), lines

        # `emulator logs NODE` prints the log of the node of that name under --root.
        printed = await asyncio.create_subprocess_exec(
            str(EMULATOR), "logs", ROUTER, "--root", str(tmp_path), **PIPES
        )
        async with asyncio.timeout(STEP_S):
            out, err = await printed.communicate()
        assert printed.returncode == 0, err.decode()
        assert router.home is not None
        assert out.decode() == Home(router.home).log_file.read_text()

        # ... and with -f goes on printing what the node logs.
        following = await asyncio.create_subprocess_exec(
            str(EMULATOR), "logs", ROUTER, "-f", "--root", str(tmp_path), **PIPES
        )
        try:
            assert following.stdout is not None
            await read_until(following.stdout, plain["job_id"])  # what was there
            later = await submit(http, client.url, job_body("later"))
            line = (await read_until(following.stdout, later["job_id"])).splitlines()[-1]
            assert json.loads(line)["job_id"] == later["job_id"]
        finally:
            following.kill()
            await following.wait()

        missing = await asyncio.create_subprocess_exec(
            str(EMULATOR), "logs", "nosuch.dev", "--root", str(tmp_path), **PIPES
        )
        async with asyncio.timeout(STEP_S):
            _, err = await missing.communicate()
        assert missing.returncode == 1 and ROUTER in err.decode() and "nosuch.dev" in err.decode()
    finally:
        await cluster.close()
