"""The router's dispatch policy, as pure functions: which driver takes which queued job, when a driver is
cooled down, and how a job taken back is retried.  No store, no clock, no I/O: the router reads the state,
asks these, and writes what they decide (`handlers.router`, `store.queue`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

COOLDOWN_S = 30.0
FAILURES_BEFORE_COOLDOWN = 3
RETRY_BACKOFF_S = 0.2


@dataclass(frozen=True)
class Driver:
    """A driver registered for the model, not cooled down."""

    node: str
    capacity: int
    is_public: bool


@dataclass(frozen=True)
class Waiting:
    """A queued job, oldest first."""

    job_id: str
    client_node: str
    returned_by: str | None  # the driver that last gave it back


def assign(
    waiting: Sequence[Waiting], drivers: Sequence[Driver], loads: Mapping[str, int],
    choose: Callable[[Sequence[str]], str] = random.choice,
) -> dict[str, str]:
    """Job id → driver node, for the jobs that can start now, oldest first.

    A job goes to a driver with a free slot that is public or is the job's own client node; of those, to the
    least loaded (running jobs / capacity), `choose` breaking ties.  A job a driver gave back goes elsewhere if
    it can: the same LLM would likely fail it again.  A job no driver can take now waits; younger jobs may
    still start (their client's own driver may be free)."""
    load = Counter({node: count for node, count in loads.items()})
    chosen: dict[str, str] = {}
    for job in waiting:
        ready = [d for d in drivers if load[d.node] < d.capacity and (d.is_public or d.node == job.client_node)]
        if not ready:
            continue
        candidates = [d for d in ready if d.node != job.returned_by] or ready
        least = min(load[d.node] / d.capacity for d in candidates)
        node = choose([d.node for d in candidates if load[d.node] / d.capacity == least])
        load[node] += 1
        chosen[job.job_id] = node
    return chosen


@dataclass(frozen=True)
class Health:
    """A driver's failures in a row, and the time until which it takes no job."""

    failures: int
    cooldown_until: float


def after_failure(health: Health, now: float) -> Health:
    """A driver that failed a job FAILURES_BEFORE_COOLDOWN times in a row is cooled down for COOLDOWN_S."""
    failures = health.failures + 1
    if failures >= FAILURES_BEFORE_COOLDOWN:
        return Health(failures=0, cooldown_until=now + COOLDOWN_S)
    return Health(failures=failures, cooldown_until=health.cooldown_until)


class TakeBack(StrEnum):
    """What becomes of a running job its driver no longer serves."""

    RETRY = "retry"  # queued again, after `RetryPolicy.backoff`
    FAIL_STREAMED = "fail_streamed"  # part of it reached the client: another generation would not continue the same text
    FAIL_OUT_OF_ATTEMPTS = "fail_out_of_attempts"
    FAIL_NO_DRIVER = "fail_no_driver"  # no driver is left to retry on


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how soon, a job taken back from its driver is tried again."""

    max_attempts: float
    backoff_s: float = RETRY_BACKOFF_S

    def take_back(self, *, streamed: bool, attempts: int, driver_left: bool) -> TakeBack:
        """`attempts`: the attempts made so far, the one that just ended included."""
        if streamed:
            return TakeBack.FAIL_STREAMED
        if attempts >= self.max_attempts:
            return TakeBack.FAIL_OUT_OF_ATTEMPTS
        if not driver_left:
            return TakeBack.FAIL_NO_DRIVER
        return TakeBack.RETRY

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt, doubling with each one made."""
        return self.backoff_s * 2 ** (attempts - 1)
