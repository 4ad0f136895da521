"""Jobs as clients see them: submissions, records and the JobUpdates they stream."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JobStatus = Literal["queued", "running", "succeeded", "failed", "timed_out", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "timed_out", "cancelled"})


class Strict(BaseModel):
    """Unknown fields are errors, so a typo never silently changes a job."""

    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        """OpenAI clients may send content as a list of parts; text parts are joined, others refused."""
        if not isinstance(content, list):
            return content
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are served")
        return "".join(part["text"] for part in content)


class SamplingParams(Strict):
    """Generation settings passed through to the LLM unchanged."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None


class JobRequest(SamplingParams):
    """Body of `POST /jobs`: a prompt, or a list of chat messages, for a model."""

    model: str = Field(min_length=1, max_length=200)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    timeout: float | None = Field(default=None, gt=0, description="seconds until the job's deadline")
    first_token_timeout: float | None = Field(default=None, gt=0, description="seconds allowed until the first token")
    idle_timeout: float | None = Field(default=None, gt=0, description="longest silence allowed between chunks")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        if self.messages is not None:
            return self.messages
        return [ChatMessage(role="user", content=self.prompt or "")]

    def sampling(self) -> SamplingParams:
        return SamplingParams.model_validate(self.model_dump(include=set(SamplingParams.model_fields)))


class JobSpec(BaseModel):
    """Everything a node needs to serve a job; travels unchanged along the path."""

    job_id: str
    client_node: str
    model: str
    messages: list[ChatMessage]
    params: SamplingParams = SamplingParams()
    created_at: float
    deadline: float
    first_token_timeout: float | None = None
    idle_timeout: float | None = None


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class JobUpdate(BaseModel):
    """One chunk of a job's output; the last one has `is_final` and the final status."""

    job_id: str
    seq: int = Field(ge=0)
    delta: str = ""
    is_final: bool = False
    status: JobStatus | None = None
    driver: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


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
    text: str
    finish_reason: str | None
    usage: Usage | None
    error: str | None
    queue_position: int | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    details: Any = None


class ErrorResponse(BaseModel):
    """The one error shape every endpoint answers with (OpenAI's)."""

    error: ErrorBody
