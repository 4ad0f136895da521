"""The OpenAPI 3.1 document of a node's HTTP API (`GET /openapi.json`), generated from its routes and
the pydantic models they read and answer with.

A route says what it takes and answers with `@operation(...)`; `document(routes)` lists every
route of the table it is given, so a route nobody described still appears (with its docstring).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from llm_provider.signing import SIGNATURE_HEADER
from schemas.jobs import ErrorResponse

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
_REF_TEMPLATE = "#/components/schemas/{model}"

Body = Any  # a pydantic model, or any type pydantic describes (a union of models)


class Auth(StrEnum):
    """Who may call a route, beyond anyone who reaches it."""

    ADMIN = "adminToken"  # the node's admin token
    API_KEY = "apiKey"  # a key from CreateApiKey, where the node requires keys
    METRICS = "metricsToken"  # the read-only metrics token, from outside loopback


_SECURITY_SCHEMES = {
    Auth.ADMIN: "The node's admin token, from `admin_token` in its home.",
    Auth.API_KEY: "An API key made by CreateApiKey; required only after RequireApiKeys.",
    Auth.METRICS: "The node's read-only metrics token, from `metrics_token` in its home; not needed on loopback.",
}

HEADERS = {
    "Idempotency-Key": "A repeat of a request with the same key gets the first one's job.",
    "Last-Event-ID": "The last sequence number the reader has: the stream resumes after it.",
    "traceparent": "W3C trace context: the job joins the caller's trace.",
    SIGNATURE_HEADER: "The sending node's Ed25519 signature of the body (base64).",
}


@dataclass(frozen=True)
class Content:
    """A body of one media type: JSON described by a pydantic model, or a stream, or text."""

    media_type: str
    body: Body | None = None
    description: str = ""


def json_body(body: Body, description: str = "") -> Content:
    return Content("application/json", body, description)


def event_stream(body: Body, description: str) -> Content:
    return Content("text/event-stream", body, description)


def text(description: str, media_type: str = "text/plain") -> Content:
    return Content(media_type, None, description)


@dataclass(frozen=True)
class Operation:
    summary: str
    responses: dict[int, Content | list[Content]]
    request: Content | None = None
    query: type[BaseModel] | None = None
    headers: tuple[str, ...] = ()
    auth: tuple[Auth, ...] = ()
    description: str | None = None


_OPERATIONS: dict[Callable[..., Any], Operation] = {}
Route = TypeVar("Route", bound=Callable[..., Awaitable[Any]])


def operation(op: Operation) -> Callable[[Route], Route]:
    """Describe a route for the OpenAPI document."""

    def describe(route: Route) -> Route:
        _OPERATIONS[route] = op
        return route

    return describe


def document(routes: Sequence[tuple[str, str, Callable[..., Any]]]) -> dict[str, Any]:
    """The OpenAPI document of `routes` (method, path template, route)."""
    described = [(method, path, route, _OPERATIONS.get(route) or _undescribed(route)) for method, path, route in routes]
    schemas = _Schemas()
    for _, _, _, op in described:
        schemas.want_operation(op)
    refs, components = schemas.generate()
    paths: dict[str, dict[str, Any]] = {}
    for method, path, _route, op in described:
        paths.setdefault(path, {})[method.lower()] = _operation_object(method, path, op, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "llm-provider node",
            "version": API_VERSION,
            "description": "The HTTP API every node of an llm-provider network serves: jobs, OpenAI's /v1, node messages, admin, "
            "metrics and usage.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                scheme.value: {"type": "http", "scheme": "bearer", "description": description}
                for scheme, description in _SECURITY_SCHEMES.items()
            },
        },
    }


def _undescribed(route: Callable[..., Any]) -> Operation:
    summary = (route.__doc__ or route.__name__.replace("_", " ")).strip().splitlines()[0]
    return Operation(summary=summary, responses={200: text("the route's answer", "application/json")})


class _Schemas:
    """Every body's JSON Schema, generated together, so that shared models are defined once under components."""

    def __init__(self) -> None:
        self._wanted: dict[tuple[int, JsonSchemaMode], TypeAdapter[Any]] = {}

    def want(self, body: Body, mode: JsonSchemaMode) -> None:
        self._wanted[(id(body), mode)] = TypeAdapter(body)

    def want_operation(self, op: Operation) -> None:
        if op.request is not None and op.request.body is not None:
            self.want(op.request.body, "validation")
        if op.query is not None:
            self.want(op.query, "validation")
        self.want(ErrorResponse, "serialization")
        for contents in op.responses.values():
            for content in contents if isinstance(contents, list) else [contents]:
                if content.body is not None:
                    self.want(content.body, "serialization")

    def generate(self) -> tuple[dict[tuple[int, JsonSchemaMode], dict[str, Any]], dict[str, Any]]:
        inputs = [(key, key[1], adapter) for key, adapter in self._wanted.items()]
        refs, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF_TEMPLATE)
        return {key[0]: value for key, value in refs.items()}, dict(definitions.get("$defs", {}))


def _schema(refs: dict[tuple[int, JsonSchemaMode], dict[str, Any]], body: Body, mode: JsonSchemaMode) -> dict[str, Any]:
    return refs[(id(body), mode)]


def _operation_object(method: str, path: str, op: Operation, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in re.findall(r"\{(\w+)\}", path)
    ]
    parameters += [
        {"name": name, "in": "header", "required": False, "description": HEADERS[name], "schema": {"type": "string"}}
        for name in op.headers
    ]
    if op.query is not None:
        query_schema = TypeAdapter(op.query).json_schema(ref_template=_REF_TEMPLATE)
        required = set(query_schema.get("required", []))
        parameters += [
            {"name": name, "in": "query", "required": name in required, "schema": schema}
            for name, schema in query_schema.get("properties", {}).items()
        ]
    responses: dict[str, Any] = {}
    for status, contents in op.responses.items():
        listed = contents if isinstance(contents, list) else [contents]
        responses[str(status)] = {
            "description": "; ".join(content.description for content in listed if content.description) or "success",
            "content": {content.media_type: _media(content, refs) for content in listed},
        }
    responses["default"] = {
        "description": "an error: {\"error\": {\"message\", \"type\", \"code\"}}, or the LLM's own refusal",
        "content": {"application/json": {"schema": _schema(refs, ErrorResponse, "serialization")}},
    }
    operation_object: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "summary": op.summary,
        "responses": responses,
    }
    if op.description:
        operation_object["description"] = op.description
    if parameters:
        operation_object["parameters"] = parameters
    if op.request is not None:
        operation_object["requestBody"] = {
            "required": True,
            "description": op.request.description or None,
            "content": {op.request.media_type: _media(op.request, refs, "validation")},
        }
        if not op.request.description:
            del operation_object["requestBody"]["description"]
    if op.auth:
        operation_object["security"] = [{scheme.value: []} for scheme in op.auth]
    return operation_object


def _media(content: Content, refs: dict[Any, dict[str, Any]], mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
    if content.body is None:
        return {"schema": {"type": "string"}}
    return {"schema": _schema(refs, content.body, mode)}


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[{}]", "", path).strip("/").replace("/", "_").replace(".", "_").replace("-", "_") or "root"
    if len(path) > 1 and path.endswith("/"):
        words += "_index"  # `/ui/` beside `/ui`
    return f"{method.lower()}_{words}"
