"""GET /openapi.json: an OpenAPI 3.1 document of the node's HTTP API that validates, and lists every route
the node serves, under each web host."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from openapi_spec_validator import validate

from llm_provider import asgi, http_app, signing
from llm_provider.directory import Directory
from llm_provider.http_api import NodeApi
from tests.conftest import StartNode
from tests.helpers import get_json
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database


async def test_the_openapi_document_validates_and_lists_every_route_the_node_serves(
    start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    node = await start_node("solo.dev")
    document = await get_json(http, f"{node.url}/openapi.json")
    validate(document)  # OpenAPI 3.1, every $ref resolved
    assert document["openapi"].startswith("3.1")
    listed = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}

    # What the hosts serve: the aiohttp application's routes, and the ASGI application's.
    assert node.node.ctx is not None
    api = NodeApi(node.node.ctx, "admin", Directory({}), signing.ReplayGuard(), "metrics")
    routes = http_app.create_app(api).router.routes()
    served_by_aiohttp = {(route.method, route.resource.canonical) for route in routes if route.resource is not None}
    served_by_asgi = {(method, _template(pattern)) for method, pattern, _ in asgi._ROUTES}
    assert listed == served_by_aiohttp == served_by_asgi

    # And each listed route answers over HTTP, under this host, as a route (not "no such route" nor "method not allowed").
    for method, path in sorted(listed):
        concrete = path.replace("{job_id}", "nosuchjob").replace("{process}", "driver").replace("{name}", "nosuchfile")
        async with http.request(method, node.url + concrete) as response:
            body: Any = await response.json(content_type=None) if response.content_type == "application/json" else None
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        assert code not in ("not_found", "method_not_allowed"), (method, path, response.status, body)

    # Every operation says what it answers with, and the pydantic models it names are there.
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"] and operation["responses"], (method, path)
    schemas = document["components"]["schemas"]
    for model in ("JobRequest", "JobCreated", "JobRecord", "JobUpdate", "ErrorResponse", "Envelope", "UsageReport", "Health"):
        assert model in schemas, model
    assert document["paths"]["/jobs"]["post"]["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobCreated"
    }


def _template(pattern: re.Pattern[str]) -> str:
    """`^/jobs/(?P<job_id>[^/]+)$` → `/jobs/{job_id}`."""
    return re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", pattern.pattern)[1:-1]
