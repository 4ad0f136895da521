"""Per-job wake-ups, and one for news of any job.  They carry no data: a reader that wakes reads the store."""

from __future__ import annotations

import asyncio


class JobSignals:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._any: asyncio.Event | None = None  # made only while a reader of every job (the web page) waits

    def watch(self, job_id: str) -> asyncio.Event:
        """Take the event before reading the store, wait on it after: no wake-up is lost."""
        event = self._events.get(job_id)
        if event is None:
            event = self._events[job_id] = asyncio.Event()
        return event

    def watch_any(self) -> asyncio.Event:
        """Set at the next news of any job; as with `watch`, take it before reading the store."""
        if self._any is None:
            self._any = asyncio.Event()
        return self._any

    def watched(self) -> list[str]:
        """The jobs readers are waiting on."""
        return list(self._events)

    def notify(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()
        self._wake_any()

    def notify_all(self) -> None:
        """Wake every reader, e.g. when the node shuts down."""
        events, self._events = self._events, {}
        for event in events.values():
            event.set()
        self._wake_any()

    def _wake_any(self) -> None:
        woken, self._any = self._any, None
        if woken is not None:
            woken.set()
