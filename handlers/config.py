"""The node's one configuration row."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from store.database import insert_or_ignore
from store.models import NodeConfig

CONFIG_ID = 1


DEFAULTS = {
    "id": CONFIG_ID, "is_router": False, "driver_models": [], "driver_is_public": True, "driver_capacity": 1,
    "deny_clients": [], "max_queue": 1000, "require_api_keys": False,
}


def _defaults() -> NodeConfig:
    return NodeConfig(**DEFAULTS)


async def read_config(session: AsyncSession) -> NodeConfig:
    """The stored configuration, or the defaults of a node nobody has configured yet."""
    return await session.get(NodeConfig, CONFIG_ID) or _defaults()


async def config_for_update(session: AsyncSession) -> NodeConfig:
    """The configuration row, locked until the transaction ends: processes sharing a PostgreSQL
    database change it one at a time (SQLite serializes whole write transactions anyway)."""
    await session.execute(insert_or_ignore(session, NodeConfig).values(**DEFAULTS))
    config = await session.get(NodeConfig, CONFIG_ID, with_for_update=True)
    assert config is not None
    return config
