"""The router's dispatch policy, without a store or a clock: who takes which job, cool-downs, retries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from handlers.dispatch_policy import (
    COOLDOWN_S,
    FAILURES_BEFORE_COOLDOWN,
    Driver,
    Health,
    RetryPolicy,
    TakeBack,
    Waiting,
    after_failure,
    assign,
)


def first(nodes: Sequence[str]) -> str:
    return sorted(nodes)[0]


def job(job_id: str, client: str = "client", returned_by: str | None = None) -> Waiting:
    return Waiting(job_id, client, returned_by)


def test_the_least_loaded_driver_takes_the_oldest_job() -> None:
    drivers = [Driver("a", 2, True), Driver("b", 2, True)]
    assert assign([job("1"), job("2")], drivers, {"a": 1}, first) == {"1": "b", "2": "a"}


def test_load_is_measured_against_capacity() -> None:
    drivers = [Driver("small", 1, True), Driver("big", 4, True)]
    assert assign([job("1")], drivers, {"big": 1}, first) == {"1": "small"}  # 0/1 against 1/4
    assert assign([job("1")], drivers, {"big": 2, "small": 0}, first) == {"1": "small"}
    assert assign([job("1")], drivers, {"big": 1, "small": 1}, first) == {"1": "big"}  # small is full


def test_ties_are_left_to_the_chooser() -> None:
    drivers = [Driver("a", 1, True), Driver("b", 1, True)]
    seen: list[Sequence[str]] = []

    def last(nodes: Sequence[str]) -> str:
        seen.append(list(nodes))
        return sorted(nodes)[-1]

    assert assign([job("1")], drivers, {}, last) == {"1": "b"}
    assert seen == [["a", "b"]]


def test_no_driver_takes_more_than_its_capacity() -> None:
    drivers = [Driver("a", 2, True)]
    assert assign([job("1"), job("2"), job("3")], drivers, {}, first) == {"1": "a", "2": "a"}
    assert assign([job("1")], drivers, {"a": 2}, first) == {}


def test_a_private_driver_serves_only_its_own_node() -> None:
    drivers = [Driver("home", 1, False)]
    assert assign([job("1", client="elsewhere")], drivers, {}, first) == {}
    assert assign([job("1", client="home")], drivers, {}, first) == {"1": "home"}


def test_a_job_waits_while_a_younger_one_its_driver_can_serve_starts() -> None:
    drivers = [Driver("home", 1, False)]
    waiting = [job("old", client="elsewhere"), job("young", client="home")]
    assert assign(waiting, drivers, {}, first) == {"young": "home"}


def test_a_job_given_back_goes_to_another_driver_if_one_is_ready() -> None:
    drivers = [Driver("a", 1, True), Driver("b", 1, True)]
    assert assign([job("1", returned_by="a")], drivers, {}, first) == {"1": "b"}
    assert assign([job("1", returned_by="a")], drivers, {"b": 1}, first) == {"1": "a"}  # only a is free: a, rather than nobody


def test_a_driver_is_cooled_down_after_failures_in_a_row() -> None:
    health = Health(failures=0, cooldown_until=0.0)
    for _ in range(FAILURES_BEFORE_COOLDOWN - 1):
        health = after_failure(health, now=100.0)
        assert health.cooldown_until == 0.0
    assert after_failure(health, now=100.0) == Health(failures=0, cooldown_until=100.0 + COOLDOWN_S)


@pytest.mark.parametrize(
    ("streamed", "attempts", "driver_left", "outcome"),
    [
        (True, 1, True, TakeBack.FAIL_STREAMED),
        (False, 3, True, TakeBack.FAIL_OUT_OF_ATTEMPTS),
        (False, 1, False, TakeBack.FAIL_NO_DRIVER),
        (False, 2, True, TakeBack.RETRY),
    ],
)
def test_a_job_taken_back_is_retried_while_the_policy_allows(streamed: bool, attempts: int, driver_left: bool, outcome: TakeBack) -> None:
    assert RetryPolicy(max_attempts=3).take_back(streamed=streamed, attempts=attempts, driver_left=driver_left) is outcome


def test_retries_back_off_exponentially_and_unlimited_attempts_never_run_out() -> None:
    policy = RetryPolicy(max_attempts=math.inf, backoff_s=0.5)
    assert [policy.backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert policy.take_back(streamed=False, attempts=10**6, driver_left=True) is TakeBack.RETRY
