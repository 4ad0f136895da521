"""API keys: required once the node says so, on every route; shown once, stored hashed, revocable.

Under every host and on PostgreSQL: the key comes in the Authorization header, which each host reads.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

import aiohttp
from sqlalchemy import select

from store.models import ApiKey, Base, Job, RoutedJob
from tests.conftest import Network, RunningNode
from tests.helpers import assert_error_body, count_rows, get_json, store_of
from tests.helpers import migrated_database as migrated_database  # a fixture
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.scheduling import post_job
from tests.streams import GUARD_S, follow
from tests.upstreams import MODEL


async def admin_raw(node: RunningNode, http: aiohttp.ClientSession, message: Any) -> tuple[int, Any]:
    token = node.node.home.admin_token()
    async with http.post(f"{node.url}/admin", json=message, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


def database_bytes(node: RunningNode) -> bytes:
    """The node's SQLite file and its write-ahead log, as they are on disk."""
    database = node.node.home.database
    return b"".join(path.read_bytes() for path in (database, database.with_name(database.name + "-wal")) if path.exists())


async def test_api_keys_are_required_shown_once_stored_hashed_and_revocable(network: Network, http: aiohttp.ClientSession) -> None:
    client = network.client
    job = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert await client.admin("RequireApiKeys") == {"ok": True, "note": None}

    for headers in ({}, {"Authorization": "Bearer llmp-not-a-key"}, {"Authorization": "llmp-no-bearer"}):
        status, body, _ = await post_job(http, client.url, job, headers)
        assert status == 401, (headers, body)
        assert_error_body(body, "invalid_api_key")
    async with http.post(f"{client.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.status == 401
    async with http.get(f"{client.url}/v1/models") as response:
        assert response.status == 401
    assert await count_rows(client, Job) == 0
    assert await count_rows(network.router, RoutedJob) == 0

    created = await client.admin({"CreateApiKey": {"label": "alice"}})
    key = created["key"]
    assert created["label"] == "alice" and isinstance(key, str) and len(key) >= 32
    # Shown once: asking again for the same label is refused, and the refusal does not repeat the key.
    status, body = await admin_raw(client, http, {"CreateApiKey": {"label": "alice"}})
    assert status == 409 and key not in json.dumps(body)
    assert_error_body(body, "key_exists")

    bearer = {"Authorization": f"Bearer {key}"}
    status, body, _ = await post_job(http, client.url, job, bearer)
    assert status == 202, body
    job_id = body["job_id"]
    async with aiohttp.ClientSession(headers=bearer) as keyed:
        updates = await follow(keyed, client.url, job_id, GUARD_S)
        assert updates[-1]["status"] == "succeeded"
        record = await get_json(keyed, f"{client.url}/jobs/{job_id}")
    assert record["client"] == "key:alice"
    async with http.get(f"{client.url}/jobs/{job_id}") as response:
        assert response.status == 401  # without the key, not even the record

    digest = hashlib.sha256(key.encode()).hexdigest()
    async with store_of(client).reading() as session:
        rows = [(row.label, row.key_hash) for row in await session.scalars(select(ApiKey))]
    assert rows == [("alice", digest)]
    for table in Base.metadata.sorted_tables:  # nowhere in the node's database, whatever it runs on
        async with store_of(client).reading() as session:
            contents = (await session.execute(select(table))).all()
        assert key not in repr(contents), table.name
    if store_of(client).url.startswith("sqlite"):  # and not in the file itself, read without the node
        with sqlite3.connect(client.node.home.database) as connection:
            assert connection.execute("SELECT label, key_hash FROM api_keys").fetchall() == [("alice", digest)]
        on_disk = database_bytes(client)
        assert digest.encode() in on_disk  # the search below looks where the keys are
        assert key.encode() not in on_disk
        assert key.removeprefix("llmp-").encode() not in on_disk

    assert await client.admin({"RevokeApiKey": {"label": "alice"}}) == {"ok": True, "note": None}
    status, body, _ = await post_job(http, client.url, job, bearer)
    assert status == 401, body
    assert_error_body(body, "invalid_api_key")
    async with http.get(f"{client.url}/jobs/{job_id}", headers=bearer) as response:
        assert response.status == 401
    assert await count_rows(client, Job) == 1
    assert await count_rows(client, ApiKey) == 0
