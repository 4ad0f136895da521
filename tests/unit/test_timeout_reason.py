"""Why a serving driver says a job timed out: the limit that was reached, never one the job did not set."""

from __future__ import annotations

import time
from typing import cast

from handlers.context import NodeContext
from handlers.serving import Serving
from schemas.jobs import JobSpec


def serving(deadline_in: float, first_token: float | None = None, idle: float | None = None, seq: int = 0) -> Serving:
    now = time.time()
    spec = JobSpec(
        job_id="j", client_node="c", model="m", created_at=now, deadline=now + deadline_in,
        first_token_timeout=first_token, idle_timeout=idle,
    )
    job = Serving(cast(NodeContext, None), spec, "c")
    job.seq = seq
    return job


def test_without_first_token_or_idle_limits_it_is_the_deadline_even_a_moment_before_it() -> None:
    assert serving(0.01).timeout_reason() == "the job ran past its deadline"
    assert serving(0.01, seq=3).timeout_reason() == "the job ran past its deadline"


def test_the_limit_that_was_set_is_named() -> None:
    assert serving(30, first_token=2.0).timeout_reason() == "no first token within 2.0 s"
    assert serving(30, idle=1.5, seq=2).timeout_reason() == "no chunk came whole from the LLM for more than 1.5 s"
    assert serving(-1, first_token=2.0).timeout_reason() == "the job ran past its deadline"
