"""The deployable node runtime of llm-provider: one node, its HTTP API and the hosts that serve it.

Run it with `emulator node`, under an ASGI server (`uvicorn 'llm_provider.asgi:create_app' --factory`)
or under gunicorn (`gunicorn 'llm_provider.gunicorn:create_app' --worker-class aiohttp.GunicornWebWorker`).
The `emulator` package is the command line and the emulation around it (`emulator up`, the fake LLM).

- `node`: one node: store, transport and handlers, started and stopped (`NodeRuntime`, `serve_forever`).
- `settings`: a node's limits, read the same way under every host: flag, `LLMP_*` variable, TOML file, default.
- `http_api`: the HTTP API, independent of the web framework: a request in, a reply out.
- `routes`: every route a node serves, its HTTP API's and its web page's.
- `openapi`: the OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`), generated from the routes.
- `ui_api`: the web page, `/ui`, and what it reads; its static files are in `ui/`.
- `http_app`: the aiohttp host.
- `asgi`: the ASGI host (uvicorn, hypercorn).
- `gunicorn`: the aiohttp host under gunicorn, several worker processes per node.
- `worker_metrics`: metrics of a node served by several worker processes, counted together.
- `transport`: node-to-node messages over HTTP.
- `signing`: node identity: every node-to-node message signed with the sender's Ed25519 key.
- `directory`: where each node answers and the public key it signs with.
- `llm_client`: HTTP to a node's LLM endpoint.
- `homes`: a node's home folder: database, log, tokens, a note of where it listens.
- `logs`: where a node logs, as text or JSON lines; `log_format`: which of the two.
- `event_loop`: which event loop a node's process runs on (uvloop, else asyncio's own).

Nothing is imported here: the hosts import `worker_metrics` before anything imports prometheus-client,
and `emulator --help` loads only the light modules it names.
"""
