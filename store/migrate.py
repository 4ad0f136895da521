"""Runs the Alembic migrations in `migrations/` on a live connection."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


MIGRATION_LOCK = 0x6C6C6D70  # any constant all processes agree on


def upgrade_to_head(connection: Connection) -> None:
    """Processes of one node may boot together (gunicorn workers, replicas): one migrates, the rest wait.
    On SQLite the write lock (BEGIN IMMEDIATE) already does this; PostgreSQL takes an advisory lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    command.upgrade(alembic_config(connection), "head")


def is_at_head(connection: Connection) -> bool:
    """Whether the schema is at the newest revision already (read only)."""
    current = MigrationContext.configure(connection).get_current_heads()
    return set(current) == set(ScriptDirectory.from_config(alembic_config()).get_heads())
