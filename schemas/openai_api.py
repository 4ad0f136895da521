"""The OpenAI shapes the network reads: request envelopes, chunks, completions, embeddings, errors.

The network is transparent: it declares only the fields it acts on itself (the model it routes
by, `stream`, `stream_options`, its own job limits, and what makes a request well formed) and
keeps every other field as the client sent it (`extra="allow"`), so a parameter the network has
never heard of reaches the LLM unchanged.  Ranges and enumerations are the LLM's to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Passthrough(BaseModel):
    """A shape whose undeclared fields are kept, not dropped."""

    model_config = ConfigDict(extra="allow")


class JobKind(StrEnum):
    """Which OpenAI endpoint a job is for; the value is the endpoint's path under `/v1`."""

    CHAT = "chat/completions"
    COMPLETION = "completions"
    EMBEDDING = "embeddings"

    @property
    def streams(self) -> bool:
        return self is not JobKind.EMBEDDING

    @property
    def chunk_object(self) -> str:
        return "text_completion" if self is JobKind.COMPLETION else "chat.completion.chunk"

    @property
    def response_object(self) -> str:
        return {JobKind.CHAT: "chat.completion", JobKind.COMPLETION: "text_completion", JobKind.EMBEDDING: "list"}[self]

    @property
    def id_prefix(self) -> str:
        return {JobKind.CHAT: "chatcmpl-", JobKind.COMPLETION: "cmpl-", JobKind.EMBEDDING: "embd-"}[self]


# --- requests ------------------------------------------------------------------------------

# What the network owns in a request body: every other field goes to the LLM as it came.
NETWORK_FIELDS = frozenset({"model", "stream", "stream_options", "timeout", "first_token_timeout", "idle_timeout"})


class ChatMessage(Passthrough):
    """A message: any role the LLM knows, and content as text, a list of parts (text, image_url,
    input_audio, file, ...) or null beside `tool_calls`; `tool_calls`, `tool_call_id`, `name` and
    the rest pass through."""

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(Passthrough):
    include_usage: bool = False


class RequestEnvelope(Passthrough):
    """The fields every endpoint's body shares: the model to route by and the network's own job limits."""

    model: str = Field(min_length=1, max_length=200)
    stream: bool = False
    stream_options: StreamOptions | None = None
    timeout: float | None = Field(default=None, gt=0, description="seconds until the job's deadline")
    first_token_timeout: float | None = Field(default=None, gt=0, description="seconds allowed until the first token")
    idle_timeout: float | None = Field(default=None, gt=0, description="longest silence allowed between chunks")

    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(RequestEnvelope):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(RequestEnvelope):
    """Body of `POST /v1/completions` (legacy): a prompt as a string, or a list of strings or tokens."""

    prompt: str | list[Any]


class EmbeddingRequest(RequestEnvelope):
    """Body of `POST /v1/embeddings`: input as a string, or a list of strings or tokens."""

    input: str | list[Any]


class JobRequest(RequestEnvelope):
    """Body of `POST /jobs`: a chat completion's body, or `prompt` as the seed's shortcut for one user
    message.  `stream` is ignored: a job's updates are always read as a stream."""

    stream: Any = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


@dataclass(frozen=True)
class JobOrder:
    """A client's request, validated: the endpoint, the envelope the network reads, and the body for the LLM."""

    kind: JobKind
    envelope: RequestEnvelope
    body: dict[str, Any]

    @classmethod
    def read(cls, kind: JobKind, raw: Any, jobs_api: bool = False) -> JobOrder:
        """Validate `raw` (decoded JSON) for `kind`'s endpoint, or `/jobs`; raises pydantic's ValidationError."""
        model = JobRequest if jobs_api else _REQUESTS[kind]
        envelope = model.model_validate(raw)
        return cls(kind, envelope, job_request_body(raw) if jobs_api else passthrough_body(raw))


def passthrough_body(raw: dict[str, Any]) -> dict[str, Any]:
    """The part of a client's body that goes to the LLM unchanged."""
    return {key: value for key, value in raw.items() if key not in NETWORK_FIELDS}


def job_request_body(raw: dict[str, Any]) -> dict[str, Any]:
    """A `/jobs` body as the chat completion it stands for."""
    body = passthrough_body(raw)
    if "prompt" in body:
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    return body


_REQUESTS: dict[JobKind, type[RequestEnvelope]] = {
    JobKind.CHAT: ChatCompletionRequest, JobKind.COMPLETION: CompletionRequest, JobKind.EMBEDDING: EmbeddingRequest,
}


def upstream_body(kind: JobKind, model: str, body: dict[str, Any], stream_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the serving driver sends its LLM: the client's body, streamed with usage where the endpoint streams."""
    sent = {"model": model, **body}
    if kind.streams:
        sent |= {"stream": True, "stream_options": {**(stream_options or {}), "include_usage": True}}
    return sent


# --- answers -------------------------------------------------------------------------------


class Usage(Passthrough):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChunkChoice(Passthrough):
    index: int = 0
    delta: dict[str, Any] | None = None  # chat: role, content, tool_calls, refusal, reasoning_content, ...
    text: str | None = None  # legacy completions
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletionChunk(Passthrough):
    """One `data:` event of a streamed answer (chat or legacy completion), ours or an upstream's."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = []
    usage: Usage | None = None


class UpstreamChunk(Passthrough):
    """What the network reads of a chunk an LLM streams; a chunk it cannot read this way is refused, the rest passes as it came."""

    choices: list[ChunkChoice] | None = None
    usage: Usage | None = None


class CompletionChoice(Passthrough):
    index: int = 0
    message: dict[str, Any] | None = None  # chat
    text: str | None = None  # legacy completions
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletion(Passthrough):
    """A whole answer (`chat.completion` or `text_completion`), as a non-streamed request gets it."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(Passthrough):
    object: Literal["embedding"] = "embedding"
    index: int = 0
    embedding: list[float] | str


class EmbeddingList(Passthrough):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = ""
    usage: Usage | None = None


class OpenAiError(Passthrough):
    message: str
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class OpenAiErrorBody(Passthrough):
    """The error body OpenAI and compatible servers answer with."""

    error: OpenAiError


class OpenAiModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class OpenAiModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAiModel]
