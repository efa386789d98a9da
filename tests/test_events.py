from __future__ import annotations

import logging

import pytest

from resilient_voice.events import (
    BreakerState,
    CallRejected,
    Event,
    StateChanged,
    dispatch,
)


def test_dispatch_hands_records_to_every_listener_and_swallows_listener_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first: list[Event] = []
    last: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    event = StateChanged("twilio", BreakerState.CLOSED, BreakerState.OPEN)
    with caplog.at_level(logging.ERROR, logger="resilient_voice.events"):
        dispatch((first.append, broken, last.append), event)
    assert first == last == [event]
    assert "listener bug" in caplog.text
    assert "StateChanged" in caplog.text


def test_breaker_records_are_frozen_and_slotted() -> None:
    event = CallRejected("twilio", 2.5)
    assert (event.source, event.retry_after) == ("twilio", 2.5)
    assert not hasattr(event, "__dict__")
    with pytest.raises(AttributeError):
        event.retry_after = 1.0  # type: ignore[misc]
    assert CallRejected("twilio", 2.5) == event


def test_every_producer_refuses_a_listener_that_is_not_callable() -> None:
    from resilient_voice.breaker import CircuitBreaker
    from resilient_voice.limiter import KeyedLimiter, TokenBucket
    from resilient_voice.retry import RetryPolicy

    builders = (
        lambda listeners: CircuitBreaker("b", listeners=listeners),
        lambda listeners: TokenBucket(1.0, listeners=listeners),
        lambda listeners: KeyedLimiter(1.0, listeners=listeners),
        lambda listeners: RetryPolicy(listeners=listeners),
    )
    for build in builders:
        with pytest.raises(TypeError, match="listeners must be callables"):
            build([object()])
        producer = build([])
        with pytest.raises(TypeError, match="listeners must be callables"):
            producer.add_listener(object())
