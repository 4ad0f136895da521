"""The Alembic revisions and the typed models describe the same schema, both ways."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from store.migrate import alembic_config
from store.models import Base


def _config(database: Path):  # type: ignore[no-untyped-def]
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{database}")
    return config


def test_models_match_the_newest_revision(tmp_path: Path) -> None:
    database = tmp_path / "node.db"
    command.upgrade(_config(database), "head")
    with create_engine(f"sqlite:///{database}").connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_every_revision_downgrades_and_upgrades_again(tmp_path: Path) -> None:
    database = tmp_path / "node.db"
    config = _config(database)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    assert set(inspect(create_engine(f"sqlite:///{database}")).get_table_names()) == {"alembic_version"}
    command.upgrade(config, "head")
    assert {"jobs", "job_chunks", "routed_jobs", "served_jobs", "driver_registrations", "node_config", "api_keys"} <= set(
        inspect(create_engine(f"sqlite:///{database}")).get_table_names()
    )


async def test_postgresql_is_migrated_by_the_same_revisions_and_matches_the_models() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from store.database import Store
    from tests.databases import fresh_database, postgres_server

    async with fresh_database(postgres_server()) as url:
        store = Store.open(url)
        try:
            await store.migrate()
            await store.migrate()  # a second boot changes nothing
        finally:
            await store.close()
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                differences = await connection.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
        finally:
            await engine.dispose()
    assert differences == []

