"""Typed tables.  A node may hold the same job in up to three roles, one table each:
`jobs`/`job_chunks` for the client it answers, `routed_jobs` as a router, `served_jobs` as a driver."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, false, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, list[Any]: JSON}


class NodeConfig(Base):
    """The node's settings, one row (id 1), written by admin messages."""

    __tablename__ = "node_config"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    is_router: Mapped[bool] = mapped_column(Boolean, default=False)
    router_node: Mapped[str | None] = mapped_column(String(255))
    driver_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    driver_is_public: Mapped[bool] = mapped_column(Boolean, default=True)
    driver_capacity: Mapped[int] = mapped_column(Integer, default=1)
    llm_endpoint: Mapped[str | None] = mapped_column(String(2048))
    llm_api_key: Mapped[str | None] = mapped_column(String(2048))
    job_timeout: Mapped[float | None] = mapped_column(Float)
    allow_clients: Mapped[list[str] | None] = mapped_column(JSON)
    deny_clients: Mapped[list[str]] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    max_in_flight_per_client: Mapped[int | None] = mapped_column(Integer)
    max_queue: Mapped[int] = mapped_column(Integer, default=1000, server_default=text("1000"))
    require_api_keys: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ApiKey(Base):
    """A key HTTP clients present as `Authorization: Bearer ...`; only its SHA-256 is kept."""

    __tablename__ = "api_keys"

    label: Mapped[str] = mapped_column(String(255), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class UiLogin(Base):
    """A way into the node's web page for a browser elsewhere: a one-time login token (`CreateUiLogin`),
    then, once a browser has used it, that browser's session.  Only SHA-256s of the token and of the
    session cookie are kept."""

    __tablename__ = "ui_logins"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_hash: Mapped[str | None] = mapped_column(String(64), unique=True)  # NULL until the token is used
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)  # the token's end until it is used; then the session's


class DriverRegistration(Base):
    """Router side: a driver node that serves a model."""

    __tablename__ = "driver_registrations"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    is_public: Mapped[bool] = mapped_column(Boolean)
    capacity: Mapped[int] = mapped_column(Integer)
    last_seen: Mapped[float] = mapped_column(Float)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    cooldown_until: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))

    __table_args__ = (Index("ix_driver_registrations_model", "model"),)


class Job(Base):
    """Client side: the job as the submitting client sees it."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client: Mapped[str] = mapped_column(String(255))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(255))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    router_node: Mapped[str | None] = mapped_column(String(255))
    driver_node: Mapped[str | None] = mapped_column(String(255))
    next_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    first_token_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(64))
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    llm_error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the LLM's refusal of the request: status and body
    traceparent: Mapped[str | None] = mapped_column(String(55))  # W3C trace context, made at submission

    __table_args__ = (
        Index("ix_jobs_status_deadline", "status", "deadline"),
        Index("ix_jobs_finished_at", "finished_at"),
        Index("ix_jobs_created_at", "created_at"),  # the web page lists the newest
        Index("ux_jobs_idempotency", "client", "idempotency_key", unique=True),
    )


class JobChunk(Base):
    __tablename__ = "job_chunks"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    delta: Mapped[str] = mapped_column(Text)  # choice 0's text
    chunks: Mapped[list[Any] | None] = mapped_column(JSON)  # the LLM's chunks, whole (NULL: stored before revision 0006)


class RoutedJob(Base):
    """Router side: a job waiting in a model's queue or handed to a driver."""

    __tablename__ = "routed_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_node: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(255))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    driver_node: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    returned_by: Mapped[str | None] = mapped_column(String(255))  # the driver that last gave it back: tried last next time
    streamed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[float] = mapped_column(Float)
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    api_key_label: Mapped[str | None] = mapped_column(String(255))  # the key its client presented on the client's node
    traceparent: Mapped[str | None] = mapped_column(String(55))
    # Whether its usage row holds its tokens: a job the router ended itself (cancelled, timed out) is counted at
    # once, and its tokens are added when its driver reports them.
    tokens_counted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        Index("ix_routed_jobs_queue", "model", "status", "created_at"),
        Index("ix_routed_jobs_driver", "driver_node", "status"),
        Index("ix_routed_jobs_status_deadline", "status", "deadline"),
    )


class ServedJob(Base):
    """Driver side: a job this node's LLM serves, for a router or for itself."""

    __tablename__ = "served_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    origin_node: Mapped[str] = mapped_column(String(255))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    streamed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(32))  # the process serving it (NULL: written before revision 0004)
    traceparent: Mapped[str | None] = mapped_column(String(55))

    __table_args__ = (Index("ix_served_jobs_status", "status"),)


class Worker(Base):
    """A process serving this node; several share one database under gunicorn or as router replicas.
    A worker not seen for a while is dead, and a live sibling settles the jobs it was serving."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class SeenNonce(Base):
    """Nonces of node messages received within the replay window, shared by every process of the node."""

    __tablename__ = "seen_nonces"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    sent_at: Mapped[float] = mapped_column(Float, index=True)


class UsageDay(Base):
    """Usage of the jobs this node ended in one role, per UTC day, client and model.  A row grows in the
    same transaction that ends each job it counts."""

    __tablename__ = "usage_days"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, UTC
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    client: Mapped[str] = mapped_column(String(255), primary_key=True)
    key_label: Mapped[str] = mapped_column(String(255), primary_key=True)  # "" where no API key applies
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    jobs: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    estimated_jobs: Mapped[int] = mapped_column(Integer)


class Budget(Base):
    """Router side: a client node's daily token budget (key_label ""), or one of its API keys'."""

    __tablename__ = "budgets"

    client_node: Mapped[str] = mapped_column(String(255), primary_key=True)
    key_label: Mapped[str] = mapped_column(String(255), primary_key=True)
    daily_tokens: Mapped[int] = mapped_column(BigInteger)
