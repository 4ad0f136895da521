"""The aiohttp host under gunicorn, with several worker processes per node:

    LLMP_NAME=fake3.dev LLMP_HOME=~/.llm-provider/fake3.dev LLMP_PORT=8083 \\
    LLMP_DIRECTORY=~/.llm-provider/directory.json \\
    gunicorn 'llm_provider.gunicorn:create_app' --worker-class aiohttp.GunicornWebWorker --workers 2 --bind 127.0.0.1:8083

Settings come from the same LLMP_* variables as the ASGI host (`llm_provider.asgi`).  Each worker is a
node runtime of its own over the node's one database, which is therefore always shared: any worker
takes any request or message, and a stream's reader on one worker follows what another writes.
Their metrics are counted together (`llm_provider.worker_metrics`): a scrape of /metrics shows the node.
"""

from __future__ import annotations

from llm_provider import worker_metrics

worker_metrics.count_together()  # before anything below imports prometheus-client: every worker counts for the node

import dataclasses  # noqa: E402

from aiohttp import web  # noqa: E402

from llm_provider import http_app  # noqa: E402
from llm_provider.node import NodeOptions, NodeRuntime, configure_logging  # noqa: E402


async def create_app() -> web.Application:
    """The application factory gunicorn's aiohttp worker awaits, once per worker."""
    options = dataclasses.replace(NodeOptions.from_environment(), shared=True)
    configure_logging(options)
    runtime = NodeRuntime(options)
    app = http_app.create_app(await runtime.start())
    runtime.note_in_home()

    async def shutdown(_app: web.Application) -> None:
        await runtime.drain()
        runtime.close_streams()

    async def cleanup(_app: web.Application) -> None:
        await runtime.stop()

    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app
