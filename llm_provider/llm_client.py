"""HTTP to a node's LLM endpoint, over aiohttp: the host's side of `handlers.context.LlmClient`."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from aiohttp.http_exceptions import LineTooLong

from handlers.errors import LlmHttpError, LlmLineTooLong, LlmUnreachable

# No total limit (an answer may stream for as long as its job's deadline allows) and no
# connection cap: the driver's capacity, not the HTTP client, bounds concurrent LLM requests.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


class AiohttpLlmClient:
    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0))

    async def stream_lines(self, url: str, body: dict[str, Any], headers: dict[str, str], max_line_bytes: int) -> AsyncGenerator[bytes, None]:
        try:
            async with self._session.post(url, json=body, headers=headers) as response:
                if response.status != 200:
                    raise LlmHttpError(response.status, await _text(response, max_line_bytes))
                # Not `async for line in response.content`: its lines may be only 128 KiB (twice aiohttp's read buffer).
                while line := await response.content.readline(max_line_length=max_line_bytes):
                    yield line
        except LineTooLong as error:
            # Leaving the `async with` above drops the connection: the rest of the line is never read.
            raise LlmLineTooLong(max_line_bytes) from error
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


async def _text(response: aiohttp.ClientResponse, limit: int) -> str:
    """At most `limit` bytes of an error body: a refusal is read to be quoted, not kept whole."""
    body = bytearray()
    while len(body) < limit and (part := await response.content.read(limit - len(body))):
        body += part
    return body.decode(errors="replace")
