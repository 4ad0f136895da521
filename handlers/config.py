"""The node's one configuration row."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from store.models import NodeConfig

CONFIG_ID = 1


def _defaults() -> NodeConfig:
    return NodeConfig(
        id=CONFIG_ID, is_router=False, driver_models=[], driver_is_public=True, driver_capacity=1,
        deny_clients=[], max_queue=1000, require_api_keys=False,
    )


async def read_config(session: AsyncSession) -> NodeConfig:
    """The stored configuration, or the defaults of a node nobody has configured yet."""
    return await session.get(NodeConfig, CONFIG_ID) or _defaults()


async def config_for_update(session: AsyncSession) -> NodeConfig:
    config = await session.get(NodeConfig, CONFIG_ID)
    if config is None:
        config = _defaults()
        session.add(config)
    return config
