"""Errors a handler answers with; adapters turn them into HTTP responses."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.jobs import LlmError


class HandlerError(Exception):
    """A refusal with an HTTP status, a stable code and a message for people."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after
        self.body = body  # the error body to answer with as it is (the LLM's own), instead of one made of the above


class PeerError(HandlerError):
    """Another node refused a message, or could not be reached (status 503)."""


class UpstreamErrorKind(StrEnum):
    """How a request to the LLM failed, as the node's metrics count it."""

    REFUSED = "refused"  # a 4xx
    SERVER_ERROR = "5xx"  # a 5xx, or an error event in its stream
    TIMEOUT = "timeout"  # the job's deadline, or its first-token or idle limit, passed while the LLM answered
    CONNECTION = "connection"  # no answer, or one broken off
    MALFORMED = "malformed"  # an answer that is not what OpenAI's API answers


class UpstreamError(Exception):
    """The LLM endpoint failed; the job ends `failed` with this message.

    `retryable`: the endpoint may serve the job another time (it could not be reached, was busy,
    or broke off); a refusal of the request itself, or a malformed answer, is not retried.
    `llm_error`: the LLM refused the client's request; its status and body go back to the client.
    """

    def __init__(self, message: str, kind: UpstreamErrorKind, retryable: bool = False, llm_error: LlmError | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.llm_error = llm_error


def unknown_job(job_id: str) -> HandlerError:
    return HandlerError(404, "job_not_found", f"no job {job_id!r} on this node")


def too_late(job_id: str) -> HandlerError:
    return HandlerError(408, "offer_expired", f"job {job_id} came after its sender stopped waiting for the answer; not taken")


def unknown_model(model: str, offered: list[str]) -> HandlerError:
    listing = ", ".join(offered) if offered else "none"
    return HandlerError(404, "model_not_found", f"model {model!r} is not served here; models on offer: {listing}", {"models": offered})


class LlmHttpError(Exception):
    """The LLM endpoint answered with a status other than 200 (raised by the node's LlmClient)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.text = text


class LlmUnreachable(Exception):
    """No answer, or a broken one, from the LLM endpoint (raised by the node's LlmClient)."""


class LlmLineTooLong(Exception):
    """The LLM sent a line longer than the node takes (raised by the node's LlmClient, which stops reading)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a line over {limit} bytes")
        self.limit = limit
