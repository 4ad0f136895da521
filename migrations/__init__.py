"""Alembic migrations of the node store; `store.migrate` runs them at boot."""
