"""What the node's web page (`/ui`) reads: the network as the node sees it, and its recent jobs."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel

from schemas.jobs import JobStatus
from schemas.messages import DriverState

UI_CLIENT = "ui"  # the client of jobs typed into the page's chat box, as usage and job records name it


class NodeRole(StrEnum):
    ROUTER = "router"  # routes jobs (StartRouter)
    DRIVER = "driver"  # serves models with its LLM (SetLocalDriver)
    CLIENT = "client"  # sends the jobs it cannot serve to a router (SetRouter)


class NetworkNode(BaseModel):
    name: str
    roles: list[NodeRole]  # those this node knows of; empty for a peer it only has in its directory


class NetworkView(BaseModel):
    """Body of `GET /ui/api/network`, and of the page's `network` events."""

    node: str
    roles: list[NodeRole]
    router: str | None  # where this node sends the jobs it cannot serve
    models: list[str]  # served by this node's own LLM
    capacity: int | None  # jobs at once on this node's LLM, if it serves any
    nodes: list[NetworkNode]
    drivers: list[DriverState]  # as the router reports them: all of them on the router itself, else those on offer to this node
    queues: dict[str, int]  # jobs waiting, per model
    reachable_models: list[str]  # what a job sent here may ask for
    router_error: str | None = None  # the router could not be asked


class JobRow(BaseModel):
    """One line of the page's job list."""

    job_id: str
    status: JobStatus
    model: str
    client: str
    router: str | None
    driver: str | None
    created_at: float
    first_token_at: float | None
    finished_at: float | None
    tokens: int | None  # completion tokens, once the LLM reported usage
    chunks: int  # updates stored so far


class JobList(BaseModel):
    """Body of `GET /ui/api/jobs`, and of the page's `jobs` events: newest first."""

    jobs: list[JobRow]


class UiAccess(StrEnum):
    LOOPBACK = "loopback"  # a browser on this machine, asking for this machine by a loopback name
    SESSION = "session"  # a browser that opened a one-time login URL


class UiSession(BaseModel):
    """Body of `GET /ui/api/session`: how the page is let in, and the token its state-changing calls carry."""

    node: str
    access: UiAccess
    csrf_token: str

