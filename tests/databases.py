"""PostgreSQL for tests: a fresh database per node, on the server named by LLMP_TEST_POSTGRES_URL.

Without that variable a PostgreSQL test is skipped on a developer's machine; with
LLMP_REQUIRE_POSTGRES=1 (CI sets it) the skip becomes a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL_ENV = "LLMP_TEST_POSTGRES_URL"
REQUIRE_ENV = "LLMP_REQUIRE_POSTGRES"


def postgres_server() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        return url
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {POSTGRES_URL_ENV} is not set")
    pytest.skip(f"no PostgreSQL server: set {POSTGRES_URL_ENV} (see .ci/postgres)")


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server; dropped afterwards."""
    import asyncpg

    server = make_url(server_url)
    name = f"llmp_test_{uuid.uuid4().hex[:12]}"
    dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
