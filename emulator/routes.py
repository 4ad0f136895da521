"""Every route a node serves: its HTTP API, and its web page."""

from __future__ import annotations

from emulator import http_api, ui_api
from emulator.http_api import Route

ROUTES: list[tuple[str, str, Route]] = [*http_api.ROUTES, *ui_api.ROUTES]
