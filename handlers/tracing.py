"""Which job the code at hand is about, and its W3C trace context, for logs and for the messages sent.

A job's `traceparent` (https://www.w3.org/TR/trace-context/) is made when it is submitted, kept with
the job on every node that holds it, and carried on every node message about the job as the HTTP
header `traceparent`.  Each node logs it, so one job's path can be followed across the nodes' logs
by its trace id.  The job at hand is a context variable: set while an event about a job is handled,
it is inherited by the tasks that event starts, read by the transport (the header) and by the log
format (`job_id`, `trace_id`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

HEADER = "traceparent"
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_SAMPLED = "01"


@dataclass(frozen=True)
class JobTrace:
    job_id: str
    traceparent: str | None = None

    @functools.cached_property
    def trace_id(self) -> str | None:  # read by every log line and message about the job
        return trace_id_of(self.traceparent)


_current: ContextVar[JobTrace | None] = ContextVar("llmp_job", default=None)


def new_traceparent(continued: str | None = None) -> str:
    """A traceparent for a new job: within the caller's trace where it sent a valid one, else a new trace."""
    trace_id = trace_id_of(continued) or secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-{_SAMPLED}"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a valid traceparent (version 00, ids not all zeros); None for anything else."""
    match = _TRACEPARENT.match(traceparent or "")
    if match is None or set(match[1]) == {"0"} or set(match[2]) == {"0"}:
        return None
    return match[1]


def valid(traceparent: str | None) -> str | None:
    return traceparent if trace_id_of(traceparent) else None


def outgoing(node: str) -> str | None:
    """The header for a message `node` sends about the job at hand: the job's trace, with `node`'s own
    span of it as the parent (the same for every message `node` sends about the job)."""
    job = _current.get()
    trace_id = job.trace_id if job is not None else None
    if job is None or trace_id is None:
        return None
    span = hashlib.sha256(f"{node}/{job.job_id}".encode()).hexdigest()[:16]
    return f"00-{trace_id}-{span}-{_SAMPLED}"


def current() -> JobTrace | None:
    return _current.get()


def traceparent_of(job_id: str) -> str | None:
    """The trace context of `job_id` where the code at hand is about it (as the message being handled said)."""
    job = _current.get()
    return job.traceparent if job is not None and job.job_id == job_id else None


def set_job(job_id: str, traceparent: str | None) -> None:
    """From here on, in this task and in the tasks it starts, the code at hand is about this job."""
    _current.set(JobTrace(job_id, valid(traceparent)))


@contextmanager
def about(job_id: str, traceparent: str | None) -> Iterator[None]:
    """Within the block, the code at hand is about this job."""
    token = _current.set(JobTrace(job_id, valid(traceparent)))
    try:
        yield
    finally:
        _current.reset(token)
