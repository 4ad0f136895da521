"""Metrics of a node served by several worker processes (gunicorn, or an ASGI server's workers): each
worker counts into files in one directory, and a scrape of any worker reads them all, so one scrape
shows the node.  prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it is imported, so the hosts
that run as workers call `count_together` before they import anything that imports it.

Where PROMETHEUS_MULTIPROC_DIR is not set, the directory is the node's home's `metrics` folder.  It is
kept across restarts: counters go on from where they were (Prometheus takes them as they come); a
worker's open streams are forgotten once it is gone.  Delete the folder while the node is stopped to
count from zero.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from llm_provider.homes import Home, home_from_environment

ENV = "PROMETHEUS_MULTIPROC_DIR"


def count_together(environ: MutableMapping[str, str] = os.environ) -> None:
    """Have this worker count into the node's shared metrics directory (set up before prometheus-client loads)."""
    if "prometheus_client" in sys.modules and ENV not in environ:
        print(f"llm-provider: prometheus_client was imported before {ENV} was set; /metrics shows one worker", file=sys.stderr)
        return
    if ENV not in environ:
        environ[ENV] = str(Home(home_from_environment(environ)).metrics_directory)
    os.makedirs(environ[ENV], exist_ok=True)
