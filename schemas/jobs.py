"""Jobs as clients see them: what a job is, the updates it streams, its record and the error shape."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, model_validator

from schemas.openai_api import JobKind, Usage
from schemas.usage import TokenCount

class JobStatus(StrEnum):
    """How a job stands, wherever it is kept: on the client's node (`jobs`), on the router (`routed_jobs`) and on
    the serving driver (`served_jobs`, never `queued`).  One vocabulary, since a status travels from one to the next
    (a driver's final update ends the routed job and then the client's); stored and sent as these strings."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


FINAL_STATUSES: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED})
ACTIVE_STATUSES: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)


class JobSpec(BaseModel):
    """Everything a node needs to serve a job; travels unchanged along the path."""

    job_id: str
    client_node: str
    model: str
    kind: JobKind = JobKind.CHAT
    body: dict[str, Any] = {}  # the client's request body, without the fields the network owns
    stream_options: dict[str, Any] | None = None  # the client's, passed on with usage always asked for
    created_at: float
    deadline: float
    first_token_timeout: float | None = None
    idle_timeout: float | None = None
    api_key_label: str | None = None  # the key the client presented on its node: the router accounts and budgets by it

    @model_validator(mode="before")
    @classmethod
    def _from_text_only_form(cls, data: Any) -> Any:
        """Jobs stored (or sent by a node) before requests passed through carried `messages` and `params`."""
        if isinstance(data, dict) and "body" not in data and "messages" in data:
            data = dict(data)
            params = data.pop("params", None) or {}
            data["body"] = {"messages": data.pop("messages"), **{k: v for k, v in params.items() if v is not None}}
        return data


class LlmError(BaseModel):
    """The LLM refused the client's request (a 4xx before the first token): its status and body reach the client."""

    status: int
    body: dict[str, Any]


class JobUpdate(BaseModel):
    """One step of a job's output, as every node passes it on and as clients read it from
    `/jobs/{id}/events`; the last one has `is_final` and the final status.

    `chunks` are the LLM's own streamed chunks (without `id`, `object` and `created`, which the
    client's node sets), every field kept; `delta` is the text of choice 0 in them, for simple
    readers.  None: an update from before chunks were kept, whose `delta` is all there is.
    `tokens`, on a final update from the serving driver: what the job consumed, for usage accounting
    (the LLM's usage, or an estimate where it reported none, as when the job was cut short).
    """

    job_id: str
    seq: int = Field(ge=0)
    delta: str = ""
    chunks: list[dict[str, Any]] | None = None
    is_final: bool = False
    status: JobStatus | None = None
    driver: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    llm_error: LlmError | None = None
    tokens: TokenCount | None = None


def output_chunks(seq: int, delta: str, chunks: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """An update's chunks; for one stored before chunks were kept, its text as a chat chunk."""
    if chunks is not None:
        return chunks
    if not delta:
        return []
    return [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": delta} if seq == 0 else {"content": delta}}]}]


class JobCreated(BaseModel):
    job_id: str
    events_url: str
    status: JobStatus
    created_at: float


class JobRecord(BaseModel):
    """Body of `GET /jobs/{id}`."""

    job_id: str
    model: str
    status: JobStatus
    client: str
    router: str | None
    driver: str | None
    created_at: float
    first_token_at: float | None
    finished_at: float | None
    deadline: float
    text: str  # choice 0's text
    response: dict[str, Any] | None = Field(default=None, description="the answer as a non-streamed /v1 request gets it, assembled from the chunks so far")
    finish_reason: str | None
    usage: Usage | None
    error: str | None
    llm_error: LlmError | None = None
    queue_position: int | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    details: Any = None


class ErrorResponse(BaseModel):
    """The one error shape every endpoint answers with (OpenAI's)."""

    error: ErrorBody
