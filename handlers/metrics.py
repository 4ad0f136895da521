"""A node's Prometheus metrics: every metric object, and the scrape (`exposition`).

What processes count (jobs, tokens, latencies, messages, errors) lives in prometheus-client's
objects below, labelled with the node, so that nodes sharing a process (tests) each show their
own.  Where several processes serve one node (gunicorn or uvicorn workers) they count into files
in PROMETHEUS_MULTIPROC_DIR, which must be set before this module is imported
(`emulator.worker_metrics`), and a scrape of any worker adds up every worker's.  What describes
stored state (a router's queues and drivers) is read from the store at scrape time, so every
worker and every router replica shows the same figures.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from handlers.config import read_config
from handlers.context import NodeContext
from handlers.os_processes import pid_alive
from schemas.jobs import JobStatus
from schemas.usage import Role, TokenCount
from store.models import DriverRegistration, RoutedJob

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # read once, as prometheus-client does at import

prometheus_client.disable_created_metrics()  # `_created` series: noise for counters that start with the process

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
_COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# --- jobs ---------------------------------------------------------------------------------------

_JOB = ["node", "role", "model"]
JOBS = Counter("llmp_jobs", "Jobs ended, counted by each node that ended them in its role.", [*_JOB, "status"])
PROMPT_TOKENS = Counter("llmp_prompt_tokens", "Prompt tokens of the jobs ended (the LLM's usage, else an estimate).", _JOB)
COMPLETION_TOKENS = Counter(
    "llmp_completion_tokens", "Completion tokens of the jobs ended (the LLM's usage, else the chunks it streamed).", _JOB
)
ESTIMATED_JOBS = Counter("llmp_estimated_jobs", "Jobs ended whose tokens were estimated (the LLM reported no usage).", _JOB)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmp_time_to_first_token_seconds",
    "From submission to the first chunk stored (client), or from the request to the LLM's first chunk (driver).",
    _JOB, buckets=_LATENCY_BUCKETS,
)
JOB_DURATION = Histogram(
    "llmp_job_duration_seconds", "From a job's arrival at the node to its end there.", _JOB, buckets=_DURATION_BUCKETS
)
QUEUE_WAIT = Histogram(
    "llmp_router_queue_wait_seconds", "Router: from a job's arrival to its first hand-over to a driver.", ["node", "model"],
    buckets=_LATENCY_BUCKETS,
)
OPEN_STREAMS = Gauge(
    "llmp_open_event_streams", "Event streams (SSE) open to clients: /jobs/{id}/events and streamed /v1 answers.", ["node"],
    multiprocess_mode="livesum",
)

# --- messages, the LLM, the store -----------------------------------------------------------------

_MESSAGE = ["node", "message"]
MESSAGES_SENT = Counter("llmp_node_messages_sent", "Node messages sent to other nodes.", _MESSAGE)
MESSAGE_SEND_FAILURES = Counter(
    "llmp_node_message_send_failures", "Node messages another node refused or did not answer, by its reason.",
    [*_MESSAGE, "reason"],
)
MESSAGES_RECEIVED = Counter("llmp_node_messages_received", "Node messages received and taken.", _MESSAGE)
MESSAGES_REFUSED = Counter("llmp_node_messages_refused", "Node messages received and refused, by reason.", [*_MESSAGE, "reason"])
UPSTREAM_ERRORS = Counter("llmp_upstream_errors", "Failed requests to the node's LLM, by kind.", ["node", "model", "kind"])
STORE_COMMIT = Histogram(
    "llmp_store_commit_seconds", "Time to commit a write transaction to the node's store.", ["node"], buckets=_COMMIT_BUCKETS
)

# --- the node's door: how long work waits before a handler runs --------------------------------------

_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
EVENT_LOOP_LAG = Histogram(
    "llmp_event_loop_lag_seconds",
    "How late the process's event loop ran a timer that was due: the wait of any request, message or chunk before its "
    "handler runs, sampled every EVENT_LOOP_SAMPLE_S.",
    ["node"], buckets=_WAIT_BUCKETS,
)
MESSAGE_DELAY = Histogram(
    "llmp_node_message_delay_seconds",
    "From a node message's sending (its envelope's sent_at, by the sender's clock: between machines it includes their clock skew) to its handler's start here.",
    _MESSAGE, buckets=_WAIT_BUCKETS,
)
EVENT_LOOP_SAMPLE_S = 0.25


def count_job(
    node: str, role: Role, model: str, status: JobStatus, tokens: TokenCount | None,
    duration: float | None = None, first_token: float | None = None,
) -> None:
    """A job ended here, in `role`."""
    JOBS.labels(node, role, model, status).inc()
    if tokens is not None:
        count_tokens(node, role, model, tokens)
    if duration is not None:
        JOB_DURATION.labels(node, role, model).observe(max(duration, 0.0))
    if first_token is not None:
        TIME_TO_FIRST_TOKEN.labels(node, role, model).observe(max(first_token, 0.0))


def count_tokens(node: str, role: Role, model: str, tokens: TokenCount) -> None:
    PROMPT_TOKENS.labels(node, role, model).inc(tokens.prompt_tokens)
    COMPLETION_TOKENS.labels(node, role, model).inc(tokens.completion_tokens)
    if tokens.estimated:
        ESTIMATED_JOBS.labels(node, role, model).inc()


# --- the scrape -------------------------------------------------------------------------------------


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def exposition(ctx: NodeContext) -> bytes:
    """The node's metrics in Prometheus' text format: this process's (or every worker's), then the store's."""
    families = [_only_node(family, ctx.name) for family in _process_families()]
    families += await _stored_state(ctx)
    return prometheus_client.generate_latest(_Families(families))


def _process_families() -> Iterable[Metric]:
    if MULTIPROCESS_DIR is None:
        return prometheus_client.REGISTRY.collect()
    _forget_dead_workers(Path(MULTIPROCESS_DIR))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, MULTIPROCESS_DIR)
    return registry.collect()


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _forget_dead_workers(directory: Path) -> None:
    """Open streams of a worker that died are not open any more (its counters still count: they are the node's)."""
    for path in directory.glob("gauge_live*.db"):
        if (match := _LIVE_GAUGE_FILE.match(path.name)) and not pid_alive(int(match[1])):
            mark_process_dead(int(match[1]), str(directory))


def _only_node(family: Metric, node: str) -> Metric:
    """The family's samples of `node`, and those of the process (which carry no node)."""
    kept = Metric(family.name, family.documentation, family.type, family.unit)
    kept.samples = [sample for sample in family.samples if sample.labels.get("node", node) == node]
    return kept


async def _stored_state(ctx: NodeContext) -> list[Metric]:
    """A router's queues and drivers per model, as its store holds them now."""
    queue = GaugeMetricFamily("llmp_router_queue_length", "Router: jobs waiting per model.", labels=["node", "model"])
    registered = GaugeMetricFamily(
        "llmp_router_drivers_registered", "Router: drivers registered per model.", labels=["node", "model"]
    )
    ready = GaugeMetricFamily(
        "llmp_router_drivers_ready", "Router: drivers per model not cooled down after failures.", labels=["node", "model"]
    )
    capacity = GaugeMetricFamily(
        "llmp_router_driver_capacity", "Router: jobs its drivers of a model may serve at once.", labels=["node", "model"]
    )
    load = GaugeMetricFamily(
        "llmp_router_driver_load", "Router: jobs of a model its drivers serve now.", labels=["node", "model"]
    )
    families: list[Metric] = [queue, registered, ready, capacity, load]
    now = time.time()
    async with ctx.store.reading() as session:
        if not (await read_config(session)).is_router:
            return families
        per_model = select(RoutedJob.model, func.count()).group_by(RoutedJob.model)
        queued = await session.execute(per_model.where(RoutedJob.status == JobStatus.QUEUED))
        running = await session.execute(per_model.where(RoutedJob.status == JobStatus.RUNNING))
        drivers = await session.execute(
            select(
                DriverRegistration.model, func.count(), func.sum(DriverRegistration.capacity),
                func.count().filter(DriverRegistration.cooldown_until <= now),
            ).group_by(DriverRegistration.model)
        )
        for model, count in queued:
            queue.add_metric([ctx.name, model], count)
        for model, count in running:
            load.add_metric([ctx.name, model], count)
        for model, count, slots, not_cooled in drivers:
            registered.add_metric([ctx.name, model], count)
            capacity.add_metric([ctx.name, model], slots or 0)
            ready.add_metric([ctx.name, model], not_cooled)
    return families


async def sample_event_loop_lag(node: str) -> None:
    """Forever: sleep EVENT_LOOP_SAMPLE_S, and count how much later than that the loop woke this task."""
    loop = asyncio.get_running_loop()
    lag = EVENT_LOOP_LAG.labels(node)
    while True:
        due = loop.time() + EVENT_LOOP_SAMPLE_S
        await asyncio.sleep(EVENT_LOOP_SAMPLE_S)
        lag.observe(max(loop.time() - due, 0.0))
