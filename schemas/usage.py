"""Usage accounting and token budgets: what a job consumed, the usage a node reports, and its budgets."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.openai_api import Usage


class Role(StrEnum):
    """The part a node played in a job: each counts the jobs it ended, in its own rows and metrics."""

    CLIENT = "client"  # the node the client submitted to
    ROUTER = "router"
    DRIVER = "driver"  # the node whose LLM served it


def utc_day(timestamp: float) -> str:
    """The UTC day of a time, as usage is stored by: YYYY-MM-DD."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).date().isoformat()


class TokenCount(BaseModel):
    """The tokens a job consumed, as counted for usage and budgets: the LLM's own usage where it
    reported one, else an estimate from what it streamed (`estimated`)."""

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    estimated: bool = False

    @classmethod
    def of(cls, usage: Usage) -> TokenCount:
        return cls(prompt_tokens=max(usage.prompt_tokens, 0), completion_tokens=max(usage.completion_tokens, 0))

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageRow(BaseModel):
    """One day's usage of one client and model, as one node counted it in one role.  `client` is the
    HTTP client (`key:<label>` or `http:<address>`) on the client's node, the client node on the
    router (with the API key's `label`, if the client presented one), the origin node on the driver."""

    day: dt.date
    role: Role
    client: str
    label: str | None = None
    model: str
    jobs: int
    prompt_tokens: int
    completion_tokens: int
    estimated_jobs: int = Field(description="jobs whose tokens were estimated: the LLM reported no usage")


class BudgetState(BaseModel):
    """A router's daily token budget, and what it has counted against it today (UTC)."""

    client: str
    label: str | None = None
    daily_tokens: int
    used_today: int


class UsageReport(BaseModel):
    """Body of `GET /usage`."""

    usage: list[UsageRow]
    budgets: list[BudgetState] = []


class UsageQuery(BaseModel):
    """Query of `GET /usage`: every field narrows the report; dates are UTC days, both ends included."""

    model_config = ConfigDict(extra="forbid")

    client: str | None = None
    model: str | None = None
    role: Role | None = None
    label: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None

    @model_validator(mode="after")
    def _ordered(self) -> UsageQuery:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("'since' is after 'until'")
        return self
