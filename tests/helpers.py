"""Shared helpers for the tests of in-process nodes: nodes on a migrated database, reading rows and errors,
what the fake LLM answers, and networks wired to the fake upstreams of tests/upstreams.py.

Submitting jobs and reading their streams is tests/streams.py's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from alembic import command
from sqlalchemy import func, select

from emulator.fake_llm import ChatRequest, FakeLlmSettings, generate_completion
from store.database import Store
from store.migrate import alembic_config
from tests.conftest import Network, RunningNode, StartNode, start_network
from tests.upstreams import MODEL, HeldUpstream, RawUpstream, ScriptedUpstream


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file brought to the Alembic head once per session, by the project's own migrations."""
    path = tmp_path_factory.mktemp("template") / "node.db"
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.upgrade(config, "head")
    return path


@pytest.fixture
def start_node(start_node: StartNode, tmp_path: Path, migrated_database: Path) -> StartNode:
    """conftest's `start_node`, but each new home starts from a copy of an already migrated database.

    Import it into a test module to use it there: it only saves the per-node migration time; the
    node still runs `Store.migrate()` on the copy (a no-op at head).  Fresh-database migration
    is tested on its own in test_store.py.
    """

    async def start(name: str, **options: Any) -> RunningNode:
        home = tmp_path / name
        if not (home / "node.db").exists():
            home.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(migrated_database, home / "node.db")
        return await start_node(name, **options)

    return start


def store_of(node: RunningNode) -> Store:
    assert node.node.ctx is not None, "node is not running"
    return node.node.ctx.store


async def count_rows(node: RunningNode, table: type[Any]) -> int:
    """Rows of an ORM table in the node's SQLite file, read through its own store."""
    async with store_of(node).reading() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)



async def get_json(http: aiohttp.ClientSession, url: str, expected_status: int = 200) -> dict[str, Any]:
    async with http.get(url) as response:
        text = await response.text()
        assert response.status == expected_status, f"GET {url}: {response.status} {text}"
        body: dict[str, Any] = json.loads(text)
    return body



def assert_error_body(body: Any, code: str | None = None) -> dict[str, Any]:
    """The one error shape: {"error": {"message", "type", "code"}}; the inner object is returned."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert isinstance(error.get("type"), str) and error["type"], body
    assert "code" in error, body
    if code is not None:
        assert error["code"] == code, body
    return error


def expected_completion(messages: list[dict[str, Any]], seed: int | None = None, max_tokens: int | None = None) -> tuple[list[str], str]:
    """The fake LLM's tokens and finish_reason for a request, computed without a server."""
    completion = generate_completion(
        ChatRequest(model=MODEL, messages=messages, seed=seed, max_tokens=max_tokens), FakeLlmSettings()
    )
    return completion.tokens, completion.finish_reason


# --- the seed's three nodes, their driver's LLM one of the fake upstreams -------------------------------


@pytest.fixture
async def gated_network(start_node: StartNode, gated: HeldUpstream) -> Network:
    """A fixture: router, driver and client nodes, the driver's LLM the gated upstream."""
    return await start_network(start_node, gated)


@pytest.fixture
async def scripted_network(start_node: StartNode, scripted: ScriptedUpstream) -> Network:
    """A fixture: router, driver and client nodes, the driver's LLM the scripted upstream."""
    return await start_network(start_node, scripted)


@pytest.fixture
async def raw_network(start_node: StartNode, raw: RawUpstream) -> Network:
    """A fixture: router, driver and client nodes, the driver's LLM the raw upstream."""
    return await start_network(start_node, raw)
