"""A node's log: where it goes, and its two formats.

`text` (the default) is one line per record for people; `json` is one JSON object per line, with
the time, level, node, process id and worker, and, on every line about a job, its `job_id` and
`trace_id` (taken from the job at hand, `handlers.tracing`), so that one job can be followed
across the logs of every node it passed through.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

from handlers import tracing
from llm_provider.homes import Home
from llm_provider.log_format import LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _JobOfTheMoment(logging.Filter):
    """Stamps each record with the job the code that logged it was about (unless the call named one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = tracing.current()
        if job is not None and not hasattr(record, "job_id"):
            record.job_id = job.job_id
            record.trace_id = job.trace_id
        return True


class JsonLines(logging.Formatter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node
        self.worker: str | None = None  # set once the node's runtime has one (`identify_worker`)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "node": self.node,
            "pid": record.process or os.getpid(),
            "worker": self.worker,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "trace_id"):
            if (value := getattr(record, key, None)) is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(home: Home, node: str, verbose: bool, log_format: LogFormat = LogFormat.TEXT) -> None:
    """Log to the node's home (and to stderr with `verbose`), in `log_format`."""
    home.path.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(home.log_file)]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    formatter = JsonLines(node) if log_format is LogFormat.JSON else logging.Formatter(TEXT_FORMAT)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_JobOfTheMoment())
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    logging.captureWarnings(log_format is LogFormat.JSON)  # warnings too, as JSON lines rather than bare text
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if verbose else logging.WARNING)


def identify_worker(worker: str) -> None:
    """Name this process's worker (`NodeContext.worker`) in its JSON log lines."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonLines):
            handler.formatter.worker = worker
