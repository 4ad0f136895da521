"""Does a node's memory grow with the jobs it has served?  `python benchmarks/soak.py [JOBS]`

Runs JOBS short jobs (default 5,000) through node 3 → router → node 2, 32 at a time, and prints
each node's resident memory every 1,000 jobs.  Flat figures mean nothing accumulates per job.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from network import chat, fake_llm, network, rss_bytes


async def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    async with fake_llm(18480, "--ttft", "0", "--tps", "0", "--tokens", "4") as llm:
        async with network(llm, 18481, capacity=32) as net:
            pids = {name: net.pid(index) for name, index in (("router", 1), ("driver", 2), ("client", 3))}
            print("| jobs | " + " | ".join(f"RSS {name} MB" for name in pids) + " |")
            print("|---|" + "---|" * len(pids))
            done = 0
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                while done < total:
                    await asyncio.gather(*(chat(session, net.url(3), max_tokens=4) for _ in range(32)))
                    done += 32
                    if done % 1024 < 32:
                        print(f"| {done} | " + " | ".join(f"{rss_bytes(pid) / 2**20:.1f}" for pid in pids.values()) + " |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
