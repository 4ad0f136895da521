"""Every route a node serves: its HTTP API, and its web page."""

from __future__ import annotations

from llm_provider import http_api, ui_api
from llm_provider.http_api import Route

ROUTES: list[tuple[str, str, Route]] = [*http_api.ROUTES, *ui_api.ROUTES]
