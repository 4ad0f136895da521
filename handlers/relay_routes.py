"""What a router process remembers of a job whose answer is streaming to its client.

Once part of a job reached its client (`routed_jobs.streamed`), its client, its driver, its model
and its trace never change again: the job can no longer go to another driver.  The router relays
each further chunk on these facts instead of reading the job's row again.  Only facts that never
change are kept, so a process that does not have them (a restart, another replica) reads the row,
as for the first chunk; the final update always reads it, to end the job once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

MAX_ROUTES = 10_000  # jobs streaming through one router process at once, and then some


class RelayRoute(NamedTuple):
    client_node: str
    driver_node: str
    model: str
    traceparent: str | None


class RelayRoutes:
    """Routes by job id, at most MAX_ROUTES: the oldest go first (a job whose end this process never sees)."""

    def __init__(self, limit: int = MAX_ROUTES) -> None:
        self._limit = limit
        self._routes: OrderedDict[str, RelayRoute] = OrderedDict()

    def get(self, job_id: str) -> RelayRoute | None:
        return self._routes.get(job_id)

    def remember(self, job_id: str, route: RelayRoute) -> None:
        self._routes[job_id] = route
        if len(self._routes) > self._limit:
            self._routes.popitem(last=False)

    def forget(self, job_id: str) -> None:
        self._routes.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._routes)
