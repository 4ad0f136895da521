from __future__ import annotations

import aiohttp

from tests.conftest import Network
from tests.streams import job_updates


async def test_remote_job_streams_through_router(network: Network, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{network.client.url}/jobs", json={"model": "llama3", "prompt": "hello"}) as response:
        assert response.status == 202, await response.text()
        created = await response.json()
    updates = await job_updates(http, network.client.url, created["job_id"])
    assert updates[-1]["status"] == "succeeded"
    assert [u["seq"] for u in updates] == list(range(len(updates)))
    assert "".join(u["delta"] for u in updates).strip()
