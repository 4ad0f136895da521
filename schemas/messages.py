"""Messages between processes (driver, router, openai), within a node and across nodes.

On the wire a message is externally tagged, as in the seed: a bare name for a
message without fields (`"StartRouter"`) or `{"Name": {fields}}`.  In Python
each message is its own model with a `Literal` tag; `parse_message` is the one
entry point that turns wire JSON into a model, `to_wire` the way back.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.jobs import JobSpec, JobStatus, JobUpdate

Process = Literal["driver", "router", "openai"]
ALL_PROCESSES: tuple[Process, ...] = get_args(Process)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- admin: accepted only from the node itself --------------------------------


class StartRouter(Message):
    type: Literal["StartRouter"] = "StartRouter"


class SetRouter(Message):
    type: Literal["SetRouter"] = "SetRouter"
    node: str = Field(min_length=1)


class SetLocalDriver(Message):
    """Replaces what the node's driver serves; an empty model list stops serving."""

    type: Literal["SetLocalDriver"] = "SetLocalDriver"
    model: str | None = None
    models: list[str] | None = None
    is_public: bool = True
    capacity: int = Field(default=1, ge=1, le=1024)

    def model_names(self) -> list[str]:
        names = list(self.models or [])
        if self.model:
            names.insert(0, self.model)
        return list(dict.fromkeys(names))


class SetJobTimeout(Message):
    """Default seconds from submission to a job's deadline, for jobs submitted here."""

    type: Literal["SetJobTimeout"] = "SetJobTimeout"
    seconds: float = Field(gt=0, le=24 * 3600)


class SetGate(Message):
    """Router: who may be served.  Each call replaces the last; `allow` None lets everyone in."""

    type: Literal["SetGate"] = "SetGate"
    allow: list[str] | None = None
    deny: list[str] = []
    max_in_flight_per_client: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=1000, ge=1)


class SetBudget(Message):
    """Router: the daily token budget (prompt and completion tokens, UTC days) of a client node, or of
    one API key of it (`label`); none (null, or left out) removes it.  Apart from SetGate, so that neither
    resets the other."""

    type: Literal["SetBudget"] = "SetBudget"
    client: str = Field(min_length=1, max_length=255)
    label: str | None = Field(default=None, min_length=1, max_length=255)
    daily_tokens: int | None = Field(default=None, ge=0)


class RouterStatus(Message):
    """Router: its drivers and queues, for `emulator status`."""

    type: Literal["RouterStatus"] = "RouterStatus"


class CreateApiKey(Message):
    """Driver: a new key for HTTP clients of this node; the reply shows it once."""

    type: Literal["CreateApiKey"] = "CreateApiKey"
    label: str = Field(min_length=1, max_length=255)


class RevokeApiKey(Message):
    type: Literal["RevokeApiKey"] = "RevokeApiKey"
    label: str


class RequireApiKeys(Message):
    """Driver: whether HTTP clients must present a key (`Authorization: Bearer ...`)."""

    type: Literal["RequireApiKeys"] = "RequireApiKeys"
    required: bool = True


class CreateUiLogin(Message):
    """Driver: a one-time login URL for the node's web page, for a browser not on this machine."""

    type: Literal["CreateUiLogin"] = "CreateUiLogin"
    valid_for: float = Field(default=600.0, gt=0, le=24 * 3600, description="seconds the URL may be opened in (once)")


class RegisterOaiProviderEndpoint(Message):
    type: Literal["RegisterOaiProviderEndpoint"] = "RegisterOaiProviderEndpoint"
    endpoint: str = Field(pattern=r"^https?://")
    api_key: str | None = None


# --- between nodes --------------------------------------------------------------


ACCEPT_MARGIN_S = 1.0  # a reply sent just before `accept_by` still reaches a sender that waits this much longer


class RunJob(Message):
    """Client's driver → router: queue this job.  Router → driver: serve it.

    `accept_by` (a time, as the nodes' clocks agree): the sender stops waiting for the reply then and takes
    the job as not taken, so a receiver that gets to it later (it was frozen, or overloaded) refuses it: a
    job its client was told failed never reaches an LLM."""

    type: Literal["RunJob"] = "RunJob"
    job: JobSpec
    accept_by: float | None = None

    @classmethod
    def offer(cls, job: JobSpec, within: float) -> RunJob:
        return cls(job=job, accept_by=time.time() + within)

    def reply_timeout(self, margin: float = ACCEPT_MARGIN_S) -> float | None:
        """How long the sender waits for the reply: until `accept_by`, and `margin` more for a receiver that
        checked in time and then committed and answered."""
        return None if self.accept_by is None else max(self.accept_by - time.time(), 0.0) + margin

    def too_late(self) -> bool:
        return self.accept_by is not None and time.time() > self.accept_by


class JobUpdateMessage(Message):
    """Serving driver → router → client's driver, one per update (`schemas.jobs.JobUpdate`, which clients read)."""

    type: Literal["JobUpdate"] = "JobUpdate"
    update: JobUpdate


class RegisterDriver(Message):
    """Driver → router: what I serve now (replaces earlier registrations)."""

    type: Literal["RegisterDriver"] = "RegisterDriver"
    models: list[str]
    is_public: bool = True
    capacity: int = Field(default=1, ge=1, le=1024)
    restarted: bool = False  # a fresh process: what failed before it started is forgiven
    serving: list[str] = []  # the jobs it is streaming now ...
    as_of: float = 0.0  # ... as of this time: a job given to it earlier and not listed was lost


class CancelJob(Message):
    """Client's driver → router → serving driver: stop this job, its client has gone."""

    type: Literal["CancelJob"] = "CancelJob"
    job_id: str


class ReleaseJob(Message):
    """Serving driver → router: I sent nothing of this job and cannot serve it; give it to another driver."""

    type: Literal["ReleaseJob"] = "ReleaseJob"
    job_id: str
    reason: str


class QueuePosition(Message):
    """Client's driver → router: how many jobs wait before this one?"""

    type: Literal["QueuePosition"] = "QueuePosition"
    job_id: str


class ListModels(Message):
    """Any node → router: which models would you serve me?"""

    type: Literal["ListModels"] = "ListModels"


class RouterView(Message):
    """Any node → router: the drivers and queues of the models on offer to me (for the node's web page)."""

    type: Literal["RouterView"] = "RouterView"


def message_union(*models: type[Message]) -> Any:
    """One type for several messages, told apart by their `type`."""
    return Annotated[Union[models], Field(discriminator="type")]  # type: ignore[valid-type]


def message_name(model: type[Message]) -> str:
    """A message's name on the wire."""
    name: str = model.model_fields["type"].default
    return name


# What each process takes from other nodes.  Admin messages are not among them: a node takes those only
# from its owner (`handlers.admin` declares them).  The openai process takes none.
RouterMessage = message_union(RunJob, JobUpdateMessage, RegisterDriver, ListModels, CancelJob, ReleaseJob, QueuePosition, RouterView)
DriverMessage = message_union(RunJob, JobUpdateMessage, CancelJob)

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "router": TypeAdapter(RouterMessage),
    "driver": TypeAdapter(DriverMessage),
}
TAKES_NODE_MESSAGES: frozenset[str] = frozenset(_ADAPTERS)


def untag(raw: Any) -> Any:
    """`"Name"` or `{"Name": {...}}` → `{"type": "Name", ...}`; anything else is left to fail validation."""
    if isinstance(raw, str):
        return {"type": raw}
    if isinstance(raw, dict) and len(raw) == 1:
        ((name, fields),) = raw.items()
        if isinstance(fields, dict):
            return {"type": name, **fields}
        if fields is None:
            return {"type": name}
    return raw


def name_of(raw: Any) -> str | None:
    """The message name that wire JSON gives (`"Name"`, `{"Name": {...}}` or `{"type": "Name", ...}`); None if it names none."""
    fields = untag(raw)
    name = fields.get("type") if isinstance(fields, dict) else None
    return name if isinstance(name, str) else None


def parse_message(process: Process, raw: Any) -> Message:
    """The one parse entry point for messages between nodes: wire JSON (already decoded) for `process`, one of
    TAKES_NODE_MESSAGES → message model."""
    result: Message = _ADAPTERS[process].validate_python(untag(raw))
    return result


def to_wire(message: Message) -> Any:
    fields = message.model_dump(exclude={"type"}, exclude_none=True, mode="json")
    name = message.type  # type: ignore[attr-defined]
    return {name: fields} if fields else name


class Source(BaseModel):
    node: str = Field(min_length=1)
    process: Process


class Envelope(BaseModel):
    """A node-to-node message: who sends it, which process receives it, and the wire body."""

    model_config = ConfigDict(extra="forbid")

    source: Source
    destination: str  # the receiving node: an envelope signed for one node is refused by any other
    target: Process
    sent_at: float
    nonce: str = Field(min_length=16, max_length=64)
    body: Any


# --- replies ----------------------------------------------------------------------


class Ack(BaseModel):
    ok: Literal[True] = True
    note: str | None = None


class JobAccepted(BaseModel):
    job_id: str
    status: Literal[JobStatus.QUEUED, JobStatus.RUNNING]


class ModelInfo(BaseModel):
    id: str
    drivers: int
    owned_by: str


class ModelList(BaseModel):
    models: list[ModelInfo]


class QueuePlace(BaseModel):
    position: int | None


class DriverState(BaseModel):
    node: str
    models: list[str]
    is_public: bool
    capacity: int
    load: int
    last_seen: float
    cooled_down_until: float | None


class RouterState(BaseModel):
    drivers: list[DriverState]
    queues: dict[str, int]


class ApiKeyCreated(BaseModel):
    label: str
    key: str


class UiLoginCreated(BaseModel):
    path: str  # `/ui/login?token=...`: opened once, before `expires_at`, it lets that browser in
    expires_at: float


MESSAGE_TYPES: frozenset[str] = frozenset(model.model_fields["type"].default for model in Message.__subclasses__())
MessageReply = Ack | JobAccepted | ModelList | QueuePlace | RouterState | ApiKeyCreated | UiLoginCreated  # what a process answers with


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every process's message union (see `python -m schemas.export`)."""
    return {f"{process}_message": adapter.json_schema() for process, adapter in _ADAPTERS.items()}
