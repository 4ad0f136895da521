"""Per-job wake-ups.  They carry no data: a reader that wakes reads the store."""

from __future__ import annotations

import asyncio


class JobSignals:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def watch(self, job_id: str) -> asyncio.Event:
        """Take the event before reading the store, wait on it after: no wake-up is lost."""
        event = self._events.get(job_id)
        if event is None:
            event = self._events[job_id] = asyncio.Event()
        return event

    def watched(self) -> list[str]:
        """The jobs readers are waiting on."""
        return list(self._events)

    def notify(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        """Wake every reader, e.g. when the node shuts down."""
        events, self._events = self._events, {}
        for event in events.values():
            event.set()
