"""Replies of a node's own HTTP routes that are not about jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    """Body of `GET /healthz`."""

    status: Literal["ok"] = "ok"
    node: str
    worker: str  # which of the processes serving the node answered (several under gunicorn, or as replicas)
