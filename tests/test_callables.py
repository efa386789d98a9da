"""Every primitive refuses a sync function before calling it, with one shared check."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from resilient_voice import (
    BreakerState,
    CircuitBreaker,
    FailureKind,
    Policy,
    RetryPolicy,
    TokenBucket,
)
from resilient_voice.testing import ManualClock


class FakeCalls:
    """Stands in for the twilio SDK's ``client.calls``: ``create`` is sync, ``create_async``
    is not; both place a call."""

    def __init__(self) -> None:
        self.placed: list[str] = []

    def create(self, to: str) -> str:
        self.placed.append(to)
        return "CA123"

    async def create_async(self, to: str) -> str:
        self.placed.append(to)
        return "CA123"


class AsyncCallable:
    async def __call__(self, to: str) -> str:
        return to


class SyncCallable:
    def __call__(self, to: str) -> str:
        return to


async def place(to: str) -> str:
    return to


def sync_place(to: str) -> str:
    return to


async def agen(to: str) -> Any:
    yield to


def test_what_counts_as_an_async_callable() -> None:
    from resilient_voice._callables import is_async_callable

    calls = FakeCalls()
    accepted = [
        place,
        calls.create_async,
        FakeCalls.create_async,
        AsyncCallable(),
        functools.partial(place, "+1555"),
        functools.partial(functools.partial(calls.create_async), "+1555"),
        functools.partial(AsyncCallable(), "+1555"),
        CircuitBreaker("x")(place),
    ]
    refused = [
        sync_place,
        calls.create,
        SyncCallable(),
        functools.partial(sync_place, "+1555"),
        functools.partial(functools.partial(calls.create), "+1555"),
        lambda: place("+1555"),  # returns a coroutine, but only by running
        agen,
        AsyncCallable,  # the class: calling it builds an instance
        42,
        None,
    ]
    assert [is_async_callable(fn) for fn in accepted] == [True] * len(accepted)
    assert [is_async_callable(fn) for fn in refused] == [False] * len(refused)


Runner = Callable[[Callable[..., Any]], Awaitable[Any]]


def forms(breaker: CircuitBreaker, clock: ManualClock) -> dict[str, Runner]:
    """Each public way to run a function; the breaker is one that one failure would open."""
    policy = Policy(breaker=breaker, retry=RetryPolicy(clock=clock), clock=clock)
    retry = RetryPolicy(clock=clock)

    async def through_breaker(fn: Callable[..., Any]) -> Any:
        return await breaker.call(fn, "+15551234567")

    async def through_policy(fn: Callable[..., Any]) -> Any:
        return await policy.call(fn, "+15551234567")

    async def through_retry(fn: Callable[..., Any]) -> Any:
        return await retry.call(fn, "+15551234567")

    return {
        "CircuitBreaker.call()": through_breaker,
        "Policy.call()": through_policy,
        "RetryPolicy.call()": through_retry,
    }


@pytest.mark.parametrize("form", ["CircuitBreaker.call()", "Policy.call()", "RetryPolicy.call()"])
async def test_call_refuses_a_sync_function_without_running_it(form: str) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("twilio", failure_threshold=1, clock=clock)
    run = forms(breaker, clock)[form]
    calls = FakeCalls()
    with pytest.raises(TypeError, match=r"create_async, not client\.calls\.create") as info:
        await run(calls.create)
    assert str(info.value).startswith(form)
    assert "was not called" in str(info.value)
    assert calls.placed == []
    assert breaker.state is BreakerState.CLOSED  # nothing counted (unused by RetryPolicy)
    assert breaker.statistics().consecutive_failures == 0
    assert await run(calls.create_async) == "CA123"
    assert calls.placed == ["+15551234567"]


@pytest.mark.parametrize("form", ["CircuitBreaker.call()", "Policy.call()", "RetryPolicy.call()"])
async def test_call_accepts_partials_bound_methods_and_async_callable_objects(form: str) -> None:
    clock = ManualClock()
    run = forms(CircuitBreaker("twilio", clock=clock), clock)[form]
    calls = FakeCalls()
    assert await run(functools.partial(functools.partial(calls.create_async))) == "CA123"
    assert await run(AsyncCallable()) == "+15551234567"
    assert await run(functools.partial(AsyncCallable())) == "+15551234567"


def test_every_decorator_refuses_at_decoration_time() -> None:
    decorators: dict[str, Callable[[Any], Any]] = {
        "the CircuitBreaker decorator": CircuitBreaker("x"),
        "the Policy decorator": Policy(),
        "RetryPolicy.wrap()": RetryPolicy(),
    }
    for where, decorate in decorators.items():
        for fn in (sync_place, FakeCalls().create, SyncCallable(), agen):
            with pytest.raises(TypeError, match="needs an async function") as info:
                decorate(fn)
            assert str(info.value).startswith(where)
        assert decorate(functools.partial(place))  # accepted
        assert decorate(AsyncCallable())


async def test_policy_decorator_checks_once_and_runs_async_callables() -> None:
    policy = Policy()

    @policy
    async def echo(value: str) -> str:
        return value

    assert await echo("a") == "a"
    assert await policy(AsyncCallable())("b") == "b"


async def test_run_refuses_a_thunk_result_that_cannot_be_awaited_counting_nothing() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("twilio", failure_threshold=1, recovery_timeout=5.0, clock=clock)
    bucket = TokenBucket(rate=100.0, burst=10, clock=clock)
    for retry in (None, RetryPolicy(clock=clock, max_attempts=3)):
        policy = Policy(breaker=breaker, limiter=bucket, retry=retry, clock=clock)
        calls = FakeCalls()
        with pytest.raises(TypeError, match="not awaitable") as info:
            await policy.run(lambda calls=calls: calls.create("+1555"))  # type: ignore[misc]
        assert info.value.failure_kind is FailureKind.PERMANENT  # type: ignore[attr-defined]
        assert calls.placed == ["+1555"]  # the thunk ran once and was not retried
        assert breaker.state is BreakerState.CLOSED
        assert breaker.statistics().consecutive_failures == 0

    # As a probe: the slot is given back, so the next call probes and closes the breaker.
    policy = Policy(breaker=breaker, clock=clock)
    breaker.force_open()
    clock.advance(5.0)
    with pytest.raises(TypeError, match="not awaitable"):
        await policy.run(lambda: "CA123")  # type: ignore[arg-type,return-value]
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.statistics().half_open_calls == 0
    assert await policy.run(lambda: place("+1555")) == "+1555"
    assert breaker.state is BreakerState.CLOSED
