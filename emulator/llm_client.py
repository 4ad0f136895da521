"""HTTP to a node's LLM endpoint, over aiohttp: the host's side of `handlers.context.LlmClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from handlers.errors import LlmHttpError, LlmUnreachable

# No total limit (an answer may stream for as long as its job's deadline allows) and no
# connection cap: the driver's capacity, not the HTTP client, bounds concurrent LLM requests.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


class AiohttpLlmClient:
    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0))

    async def stream_lines(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[bytes]:
        try:
            async with self._session.post(url, json=body, headers=headers) as response:
                if response.status != 200:
                    raise LlmHttpError(response.status, await response.text())
                async for line in response.content:
                    yield line
        except (TimeoutError, aiohttp.ClientError) as error:
            raise LlmUnreachable(repr(error)) from error

    async def post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> str:
        try:
            async with self._session.post(url, json=body, headers=headers) as response:
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise LlmUnreachable(repr(error)) from error
        if response.status != 200:
            raise LlmHttpError(response.status, text)
        return text

    async def close(self) -> None:
        await self._session.close()
