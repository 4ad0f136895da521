"""Node-to-node messages over HTTP: one client session per peer URL, reused for every message."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from pydantic import BaseModel

from handlers import metrics, tracing
from handlers.errors import ErrorCode, HandlerError, PeerError
from llm_provider.directory import Directory
from llm_provider.signing import SIGNATURE_HEADER, NodeKey
from schemas.messages import (
    CancelJob,
    JobUpdateMessage,
    ListModels,
    Message,
    Process,
    QueuePosition,
    RegisterDriver,
    ReleaseJob,
    RunJob,
    Source,
    to_wire,
)

MESSAGE_PATH = "/node/message"
# How long a sender waits for the reply to each message: a peer that accepts connections and never
# answers (frozen, overloaded) costs no more.  Handlers pass a shorter one where a client or a deadline waits.
REPLY_TIMEOUTS_S: dict[type[Message], float] = {
    RunJob: 10.0,
    JobUpdateMessage: 10.0,
    ReleaseJob: 5.0,
    CancelJob: 5.0,
    RegisterDriver: 5.0,
    ListModels: 5.0,
    QueuePosition: 2.0,
}
DEFAULT_REPLY_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0
DOWN_S = 5.0

LocalDelivery = Callable[[Source, Process, Message], Awaitable[BaseModel]]


class HttpTransport:
    def __init__(self, name: str, key: NodeKey, directory: Directory, deliver_local: LocalDelivery) -> None:
        self.name = name
        self.key = key
        self.directory = directory
        self._deliver_local = deliver_local
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # by URL
        self._turns: dict[str, int] = {}
        self._down_until: dict[str, float] = {}  # URLs that refused a connection lately go last

    async def send(self, source: Process, node: str, target: Process, message: Message, timeout: float | None = None) -> dict[str, Any]:
        if node == self.name:
            return await self._send_to_self(source, target, message)
        kind = message.type  # type: ignore[attr-defined]
        metrics.MESSAGES_SENT.labels(self.name, kind).inc()
        try:
            return await self._send_to_peer(source, node, target, message, timeout)
        except PeerError as error:
            metrics.MESSAGE_SEND_FAILURES.labels(self.name, kind, error.code).inc()
            raise

    async def _send_to_peer(
        self, source: Process, node: str, target: Process, message: Message, timeout: float | None
    ) -> dict[str, Any]:
        peer = self.directory.peer(node)
        if peer is None:
            raise PeerError(503, ErrorCode.UNKNOWN_NODE, f"no URL for node {node!r} in the directory")
        urls = self._in_turn(node, peer.urls)
        wait = timeout if timeout is not None else REPLY_TIMEOUTS_S.get(type(message), DEFAULT_REPLY_TIMEOUT_S)
        until = time.monotonic() + wait
        failure: BaseException | None = None
        for url in urls:
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                body = await self._post(source, node, url, target, message, left)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                # Nothing reached this replica: the next may take the message, in an envelope of its own.
                self._went_down(url)
                failure = error
                continue
            except TimeoutError as error:  # connected, then no answer in time (a frozen or overloaded peer)
                raise PeerError(503, ErrorCode.PEER_UNREACHABLE, f"{node} at {url} did not answer within {wait:g} s") from error
            except (aiohttp.ClientError, json.JSONDecodeError) as error:
                # A broken connection may have carried the message first: the sender decides whether to repeat it.
                # With one URL there is nothing to try instead, nor in-flight messages to cut short.
                if isinstance(error, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)) and len(urls) > 1:
                    self._went_down(url)
                raise PeerError(503, ErrorCode.PEER_UNREACHABLE, f"{node} at {url} did not answer: {error!r}") from error
            return body
        why = f": {failure!r}" if failure is not None else f" within {wait:g} s"
        raise PeerError(503, ErrorCode.PEER_UNREACHABLE, f"{node} at {', '.join(urls)} did not answer{why}") from failure

    def _went_down(self, url: str) -> None:
        """Try `url` last for a while, and drop its connections: after a crash each pooled one would fail
        once more (messages in flight on them fail now, and their senders repeat them)."""
        self._down_until[url] = time.monotonic() + DOWN_S
        session = self._sessions.pop(url, None)
        if session is not None:
            asyncio.get_running_loop().create_task(session.close())

    def _in_turn(self, node: str, urls: tuple[str, ...]) -> list[str]:
        """A node's URLs in the order to try them: replicas take turns, and those lately down go last."""
        if len(urls) == 1:  # most nodes: nothing to choose, on every message
            return list(urls)
        turn = self._turns[node] = (self._turns.get(node, -1) + 1) % len(urls)
        rotated = urls[turn:] + urls[:turn]
        now = time.monotonic()
        return sorted(rotated, key=lambda url: self._down_until.get(url, 0.0) > now)

    async def _post(self, source: Process, node: str, url: str, target: Process, message: Message, timeout: float) -> dict[str, Any]:
        envelope = {
            "source": {"node": self.name, "process": source},
            "destination": node,
            "target": target,
            "sent_at": time.time(),
            "nonce": secrets.token_hex(16),
            "body": to_wire(message),
        }
        # UTF-8 as it is: a client body within the limit stays within it as an envelope (ASCII escapes could triple it).
        data = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: self.key.sign(data)}
        if (traceparent := tracing.outgoing(self.name)) is not None:
            headers[tracing.HEADER] = traceparent
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=min(CONNECT_TIMEOUT_S, timeout))
        async with self._session(url).post(url + MESSAGE_PATH, data=data, headers=headers, timeout=limits) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                error = body.get("error", {}) if isinstance(body, dict) else {}
                retry_after = response.headers.get("Retry-After")
                raise PeerError(
                    response.status, error.get("code") or ErrorCode.PEER_ERROR, f"{node}: {error.get('message', body)}",
                    error.get("details"), float(retry_after) if retry_after and retry_after.isdigit() else None,
                )
            return body  # type: ignore[no-any-return]

    async def _send_to_self(self, source: Process, target: Process, message: Message) -> dict[str, Any]:
        try:
            reply = await self._deliver_local(Source(node=self.name, process=source), target, message)
        except HandlerError as error:
            raise PeerError(error.status, error.code, error.message, error.details, error.retry_after) from error
        return reply.model_dump(mode="json")

    def _session(self, url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(url)
        if session is None or session.closed:
            session = self._sessions[url] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
        return session

    async def close(self) -> None:
        await asyncio.gather(*(session.close() for session in self._sessions.values()))
