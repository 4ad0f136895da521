"""What a handler may use: the store, a way to message other nodes, and process resources."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from handlers.gating import Gate, lists_and_limits
from handlers.relay_routes import RelayRoutes
from handlers.settings import Settings
from handlers.signals import JobSignals
from schemas.messages import Message, Process
from store.database import Store

log = logging.getLogger("llm_provider")



class Transport(Protocol):
    async def send(self, source: Process, node: str, target: Process, message: Message, timeout: float | None = None) -> dict[str, Any]:
        """Deliver `message` to process `target` of `node`; the reply body, or raise PeerError (503 when no
        reply came within `timeout` seconds, by default the message's own: the message may have arrived)."""
        ...


class LlmClient(Protocol):
    """HTTP to the LLM endpoint, provided by the host process."""

    def stream_lines(self, url: str, body: dict[str, Any], headers: dict[str, str], max_line_bytes: int) -> AsyncGenerator[bytes, None]:
        """POST `body` as JSON and yield the answer's lines as they arrive; raise LlmHttpError for a
        status other than 200 (with at most `max_line_bytes` of its body), LlmUnreachable when no
        (whole) answer came, LlmLineTooLong (and stop reading) at a line over `max_line_bytes`."""
        ...

    async def post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> str:
        """POST `body` as JSON and return the whole answer; the same errors as `stream_lines`."""
        ...

    async def close(self) -> None: ...


class StopReason(StrEnum):
    """Why a job this process serves was told to stop (`ServingTask.stop`), as its origin hears it."""

    CLIENT_CANCELLED = "cancelled by the client"
    NODE_SHUT_DOWN = "the serving node shut down"


@dataclass
class ServingTask:
    """A job this process serves with its LLM: the task, and why it was told to stop.  A task cancelled without
    a reason was cancelled by the process itself stopping."""

    task: asyncio.Task[None]
    stop_reason: StopReason | None = None

    def stop(self, reason: StopReason) -> None:
        """The first reason given is the one the job ends with (a client's cancel, then a drain: cancelled)."""
        self.stop_reason = self.stop_reason or reason
        self.task.cancel()


@dataclass
class NodeContext:
    name: str
    store: Store
    transport: Transport
    llm: LlmClient
    settings: Settings = field(default_factory=Settings)
    gate: Gate = lists_and_limits
    signals: JobSignals = field(default_factory=JobSignals)
    worker: str = field(default_factory=lambda: uuid.uuid4().hex[:16])  # this process, among those sharing the store
    serving: dict[str, ServingTask] = field(default_factory=dict)  # by job id
    relay_routes: RelayRoutes = field(default_factory=RelayRoutes)  # the router's, of jobs streaming through it
    draining: bool = False
    closing: bool = False  # the node is stopping: readers of job streams end
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `work` after the current event; its failure is logged, never lost silently."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
