"""Properties of the pure retry decision: no clock, no event loop, no exceptions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_voice.failure import FailureKind
from resilient_voice.retry._decision import (
    Failure,
    GiveUp,
    Retry,
    RetryConfig,
    Unknown,
    backoff,
    decide,
    stop,
)

MAYBE = FailureKind.MAYBE_PROCESSED


@st.composite
def configs(draw: st.DrawFn) -> RetryConfig:
    max_delay = draw(st.floats(min_value=0.0, max_value=20.0))
    return RetryConfig(
        max_attempts=draw(st.integers(min_value=1, max_value=8)),
        base_delay=draw(st.floats(min_value=0.0, max_value=max_delay)),
        max_delay=max_delay,
        jitter=draw(st.sampled_from(["full", "equal", "none"])),
        respect_retry_after=draw(st.booleans()),
    )


@st.composite
def failures(draw: st.DrawFn) -> Failure:
    kind = draw(st.sampled_from(list(FailureKind)))
    return Failure(
        attempt=draw(st.integers(min_value=1, max_value=10)),
        kind=kind,
        retryable=draw(st.booleans()),
        retry_after=draw(st.one_of(st.none(), st.floats(min_value=0.0, max_value=40.0))),
        rejected=draw(st.booleans()),
        maybe_processed=kind is MAYBE or draw(st.booleans()),
    )


lefts = st.one_of(st.none(), st.floats(min_value=-1.0, max_value=60.0))
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@settings(max_examples=500, deadline=None)
@given(config=configs(), failure=failures(), idempotent=st.booleans(), left=lefts, u=draws)
def test_every_decision_keeps_the_rules(
    config: RetryConfig, failure: Failure, idempotent: bool, left: float | None, u: float
) -> None:
    decision = decide(config, failure, idempotent=idempotent, left=left, draw=lambda: u)
    match decision:
        case Retry(delay):
            assert failure.retryable
            assert failure.attempt < config.max_attempts
            assert delay >= 0.0
            if left is not None:
                assert delay < left  # never waits past the deadline
            honoured = failure.rejected or config.respect_retry_after
            if honoured and failure.retry_after is not None:
                assert failure.retry_after <= delay <= max(config.max_delay, failure.retry_after)
            else:
                assert delay <= config.max_delay
            if failure.rejected:
                assert failure.retry_after is not None
        case Unknown():
            assert not idempotent
            assert failure.maybe_processed
        case GiveUp():
            assert idempotent or not failure.maybe_processed


@settings(max_examples=200, deadline=None)
@given(config=configs(), failure=failures(), idempotent=st.booleans(), left=lefts, u=draws)
def test_the_decision_is_a_function_of_its_inputs(
    config: RetryConfig, failure: Failure, idempotent: bool, left: float | None, u: float
) -> None:
    def run() -> object:
        return decide(config, failure, idempotent=idempotent, left=left, draw=lambda: u)

    assert run() == run()


def test_a_non_retryable_first_failure_gives_up_without_a_reason() -> None:
    failure = Failure(1, FailureKind.PERMANENT, retryable=False)
    assert decide(RetryConfig(), failure, idempotent=True, left=None, draw=lambda: 0.5) == (
        GiveUp(None)
    )


def test_retry_after_longer_than_max_delay_gives_up_with_the_reason() -> None:
    failure = Failure(1, FailureKind.UNPROCESSED, retryable=True, retry_after=30.0)
    decision = decide(RetryConfig(max_delay=10.0), failure, idempotent=False, left=None, draw=float)
    assert isinstance(decision, GiveUp)
    assert decision.reason is not None
    assert "exceeds max_delay" in decision.reason


def test_a_local_rejection_without_retry_after_is_not_retried() -> None:
    failure = Failure(1, FailureKind.NOT_SENT, retryable=True, rejected=True)
    assert decide(RetryConfig(), failure, idempotent=True, left=None, draw=float) == GiveUp(
        "rejected locally with no known retry_after"
    )


def test_stop_is_unknown_only_for_a_possibly_processed_non_idempotent_operation() -> None:
    assert stop("r", idempotent=False, maybe_processed=True) == Unknown("r")
    assert stop("r", idempotent=True, maybe_processed=True) == GiveUp("r")
    assert stop("r", idempotent=False, maybe_processed=False) == GiveUp("r")


def test_backoff_without_jitter_never_draws() -> None:
    def boom() -> float:
        raise AssertionError("drawn")

    assert backoff(RetryConfig(base_delay=0.5, max_delay=3.0, jitter="none"), 3, boom) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": 1.0}, TypeError),
        ({"base_delay": 2.0, "max_delay": 1.0}, ValueError),
        ({"jitter": "decorrelated"}, ValueError),
        ({"respect_retry_after": 1}, TypeError),
    ],
)
def test_config_is_checked(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryConfig(**kwargs)
