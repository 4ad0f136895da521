"""Alembic environment: migrations run on the connection `store.migrate` hands over,
or, from the `alembic` command line, on `sqlalchemy.url` (sync driver)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from store.models import Base

config = context.config
connection = config.attributes.get("connection")


def run(conn: Connection) -> None:
    # SQLite's DDL is transactional too: the whole upgrade is one transaction, so processes that boot
    # together (gunicorn workers, replicas) queue on the write lock and the later ones find it done.
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///node.db")
    with engine.connect() as conn:
        run(conn)
