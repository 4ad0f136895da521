"""Errors a handler answers with; adapters turn them into HTTP responses."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.jobs import LlmError


class ErrorCode(StrEnum):
    """Every code this node answers an error with: stable, for programs to act on (the message is for people)."""

    # the request
    MALFORMED_JSON = "malformed_json"
    BODY_TOO_LARGE = "body_too_large"
    BAD_LAST_EVENT_ID = "bad_last_event_id"
    BAD_LIMIT = "bad_limit"
    FILE_NOT_FOUND = "file_not_found"
    # who asks
    ADMIN_TOKEN_REQUIRED = "admin_token_required"
    METRICS_TOKEN_REQUIRED = "metrics_token_required"
    TOKEN_REQUIRED = "token_required"
    INVALID_API_KEY = "invalid_api_key"
    KEY_EXISTS = "key_exists"
    KEY_NOT_FOUND = "key_not_found"
    UI_LOGIN_REQUIRED = "ui_login_required"
    LOGIN_REFUSED = "login_refused"
    CSRF_TOKEN_REQUIRED = "csrf_token_required"
    REFUSED_BY_GATE = "refused_by_gate"
    BUDGET_EXHAUSTED = "budget_exhausted"
    # messages between nodes and processes
    ADMIN_ONLY = "admin_only"
    NOT_AN_ADMIN_MESSAGE = "not_an_admin_message"
    UNSUPPORTED_MESSAGE = "unsupported_message"
    UNKNOWN_PROCESS = "unknown_process"
    UNKNOWN_NODE = "unknown_node"
    WRONG_DESTINATION = "wrong_destination"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED_MESSAGE = "replayed_message"
    PEER_UNREACHABLE = "peer_unreachable"
    PEER_ERROR = "peer_error"  # a peer's refusal that came without a code
    # roles
    NOT_A_ROUTER = "not_a_router"
    NO_ROUTER = "no_router"
    NOT_OUR_ROUTER = "not_our_router"
    ROUTER_UNREACHABLE = "router_unreachable"
    CLIENT_UNREACHABLE = "client_unreachable"
    SHUTTING_DOWN = "shutting_down"
    # jobs
    MODEL_NOT_FOUND = "model_not_found"
    QUEUE_FULL = "queue_full"
    JOB_NOT_FOUND = "job_not_found"
    DUPLICATE_JOB = "duplicate_job"
    CLIENT_MISMATCH = "client_mismatch"
    NOT_THE_JOBS_CLIENT = "not_the_jobs_client"
    NOT_THE_JOBS_DRIVER = "not_the_jobs_driver"
    NOT_THE_JOBS_ORIGIN = "not_the_jobs_origin"
    NOT_THE_JOBS_ROUTER = "not_the_jobs_router"
    OFFER_EXPIRED = "offer_expired"
    JOB_FINISHED = "job_finished"
    JOB_LOST = "job_lost"
    # how a job that ended without an answer is refused on /v1
    JOB_FAILED = "job_failed"
    JOB_TIMED_OUT = "job_timed_out"
    JOB_CANCELLED = "job_cancelled"
    LLM_REFUSED = "llm_refused"  # the LLM's own error body goes to the client as it is


class HandlerError(Exception):
    """This node refuses a request: an HTTP status, a stable code and a message for people."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, details: Any = None, retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after
        self.body = body  # the error body to answer with as it is (the LLM's own), instead of one made of the above


class PeerError(Exception):
    """Another node refused a message, or could not be reached (status 503, `peer_unreachable`).

    Not a HandlerError: a peer's refusal never becomes this node's answer by accident.  A handler that
    means to pass it on to its own client says so (`passed_on`)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # the peer's: it may be a code of a newer version, unknown here
        self.message = message
        self.details = details
        self.retry_after = retry_after

    @property
    def unreachable(self) -> bool:
        return self.code == ErrorCode.PEER_UNREACHABLE

    def passed_on(self) -> HandlerError:
        """The peer's refusal as this node's answer to its own client, with the peer's status and code."""
        try:
            code = ErrorCode(self.code)
        except ValueError:
            code = ErrorCode.PEER_ERROR
        return HandlerError(self.status, code, self.message, self.details, self.retry_after)


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
    return HandlerError(404, ErrorCode.JOB_NOT_FOUND, f"no job {job_id!r} on this node")


def too_late(job_id: str) -> HandlerError:
    return HandlerError(408, ErrorCode.OFFER_EXPIRED, f"job {job_id} came after its sender stopped waiting for the answer; not taken")


def unknown_model(model: str, offered: list[str]) -> HandlerError:
    listing = ", ".join(offered) if offered else "none"
    return HandlerError(404, ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not served here; models on offer: {listing}", {"models": offered})


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
