"""CPU and SQL statements per job on the local path, one job at a time, with the node in this process.

    python benchmarks/local_job_cpu.py --upstream http://127.0.0.1:18180/v1 --jobs 300
    py-spy record --gil -f raw -o local.txt -- python benchmarks/local_job_cpu.py --upstream ... --jobs 300

A node (the aiohttp host, SQLite in a temporary home) serves its own LLM; this process also runs the
client, so its CPU time per job is the node's plus a small client.  `--gil` samples only the thread
holding the GIL: the Python work, without the database threads' idle waits.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import event
from sqlalchemy.engine import Engine

from emulator.client import send_admin
from llm_provider import event_loop
from llm_provider.node import Node, NodeOptions

STATEMENTS: collections.Counter[str] = collections.Counter()


@event.listens_for(Engine, "before_cursor_execute")
def _count(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
    STATEMENTS[" ".join(statement.split())[:100]] += 1


async def measure(upstream: str, jobs: int, port: int) -> None:
    async with Node(NodeOptions(name="solo.dev", port=port, home=Path(tempfile.mkdtemp(prefix="llmp-cpu-")))) as node:
        url, token = node.url, node.home.admin_token()
        await send_admin(url, token, {"RegisterOaiProviderEndpoint": {"endpoint": upstream}}, "openai")
        await send_admin(url, token, {"SetLocalDriver": {"model": "llama3", "is_public": True, "capacity": 64}})
        body = {"model": "llama3", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "How much wood?"}]}
        async with aiohttp.ClientSession() as session:

            async def one() -> None:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    async for _ in response.content:
                        pass

            for _ in range(20):  # warm: connections, statement caches
                await one()
            STATEMENTS.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(jobs):
                await one()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{wall / jobs * 1000:.1f} ms per job (wall), {cpu / jobs * 1000:.1f} ms per job (CPU, this process)")
    print(f"{sum(STATEMENTS.values()) / jobs:.1f} SQL statements per job:")
    for statement, count in STATEMENTS.most_common():
        print(f"  {count / jobs:5.2f}  {statement}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="an OpenAI-compatible base URL (`emulator fake-llm --ttft 0 --tps 0`)")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--port", type=int, default=18600)
    args = parser.parse_args()
    event_loop.run(measure(args.upstream, args.jobs, args.port))


if __name__ == "__main__":
    main()
