"""Example tests of the circuit breaker: every transition, on both anyio backends."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import tracemalloc
from typing import Any

import anyio
import pytest

from resilient_voice.breaker import (
    BreakerPermit,
    BreakerStore,
    CircuitBreaker,
    CircuitBreakerStatistics,
    InMemoryBreakerStore,
)
from resilient_voice.errors import CircuitOpenError, ProviderError, RateLimitedError
from resilient_voice.events import (
    BreakerState,
    CallFailed,
    CallIgnored,
    CallRejected,
    CallSucceeded,
    Event,
    StateChanged,
)
from resilient_voice.failure import FailureKind
from resilient_voice.testing import ManualClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class UpstreamError(Exception):
    pass


class Kinded(Exception):
    def __init__(self, kind: FailureKind) -> None:
        super().__init__(kind.value)
        self.failure_kind = kind


async def ok(value: int = 1) -> int:
    return value


async def fail() -> None:
    raise UpstreamError("boom")


def make(clock: ManualClock | None = None, **options: Any) -> CircuitBreaker:
    return CircuitBreaker("twilio", clock=clock or ManualClock(), **options)


async def failures(breaker: CircuitBreaker, count: int) -> None:
    for _ in range(count):
        with pytest.raises(UpstreamError):
            await breaker.call(fail)


async def trip(breaker: CircuitBreaker) -> None:
    await failures(breaker, breaker.config.failure_threshold)
    assert breaker.state is OPEN


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def __call__(self, event: Event) -> None:
        match event:
            case CallSucceeded(source=breaker, duration=duration):
                self.events.append(("success", breaker, duration))
            case CallFailed(source=breaker, error=error, duration=duration):
                self.events.append(("failure", breaker, type(error).__name__, duration))
            case CallIgnored(source=breaker, error=error):
                self.events.append(("ignored", breaker, type(error).__name__))
            case CallRejected(source=breaker, retry_after=retry_after):
                self.events.append(("rejected", breaker, retry_after))
            case StateChanged(source=breaker, old=old, new=new):
                self.events.append(("state", breaker, old, new))


# Closed state, consecutive mode


def test_defaults_match_the_original_service() -> None:
    breaker = CircuitBreaker("twilio")
    assert breaker.name == "twilio"
    assert breaker.state is CLOSED
    assert breaker.config.failure_threshold == 3
    assert breaker.config.recovery_timeout == 30.0
    assert breaker.config.half_open_max_calls == 1
    assert breaker.config.success_threshold == 1
    assert breaker.config.max_recovery_timeout == 300.0
    assert "twilio" in repr(breaker)


async def test_consecutive_failures_open_the_breaker() -> None:
    breaker = make()
    await failures(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.statistics().consecutive_failures == 2
    await failures(breaker, 1)
    assert breaker.state is OPEN
    assert breaker.statistics().trips == 1


async def test_a_success_resets_the_consecutive_count() -> None:
    breaker = make()
    await failures(breaker, 2)
    assert await breaker.call(ok, 7) == 7
    assert breaker.statistics().consecutive_failures == 0
    await failures(breaker, 2)
    assert breaker.state is CLOSED


async def test_ignored_errors_propagate_but_do_not_count() -> None:
    breaker = make(ignore_on=KeyError)

    async def missing() -> None:
        raise KeyError("x")

    for _ in range(5):
        with pytest.raises(KeyError):
            await breaker.call(missing)
    assert breaker.state is CLOSED
    assert breaker.statistics().consecutive_failures == 0


# Open state


async def test_open_rejects_without_calling_and_says_when_to_retry() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await trip(breaker)
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    clock.advance(12.0)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(counted)
    assert calls == 0
    assert info.value.breaker == "twilio"
    assert info.value.retry_after == pytest.approx(18.0)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert breaker.statistics().retry_after == pytest.approx(18.0)


async def test_open_stays_open_until_the_timeout_and_reports_open_after_it() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await trip(breaker)
    clock.advance(29.999)
    with pytest.raises(CircuitOpenError):
        await breaker.acquire()
    clock.advance(0.001)
    # Nothing moves it until a call arrives: no background task.
    assert breaker.state is OPEN
    assert breaker.statistics().retry_after == 0.0


# Half-open state


async def test_after_the_timeout_the_next_call_probes_and_success_closes() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await trip(breaker)
    clock.advance(30.0)
    permit = await breaker.acquire()
    assert permit.probe
    assert breaker.state is HALF_OPEN
    permit.settle()
    assert breaker.state is CLOSED
    stats = breaker.statistics()
    assert stats.consecutive_failures == 0
    assert stats.half_open_calls == 0


async def test_a_failed_probe_reopens_for_another_period() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await trip(breaker)
    clock.advance(30.0)
    with pytest.raises(UpstreamError):
        await breaker.call(fail)
    assert breaker.state is OPEN
    assert breaker.statistics().retry_after == pytest.approx(30.0)
    assert breaker.statistics().trips == 2


async def test_success_threshold_needs_that_many_probe_successes() -> None:
    clock = ManualClock()
    breaker = make(clock, success_threshold=3)
    await trip(breaker)
    clock.advance(30.0)
    for _ in range(2):
        await breaker.call(ok)
        assert breaker.state is HALF_OPEN
    await breaker.call(ok)
    assert breaker.state is CLOSED


async def test_probe_slots_limit_concurrent_probes() -> None:
    clock = ManualClock()
    breaker = make(clock, half_open_max_calls=2, success_threshold=2)
    await trip(breaker)
    clock.advance(30.0)
    first = await breaker.acquire()
    second = await breaker.acquire()
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert info.value.retry_after == 1.0  # no max_wait_in_half_open: min(30 s, 1 s)
    assert breaker.statistics().half_open_calls == 2
    first.settle()
    third = await breaker.acquire()
    second.settle()
    assert breaker.state is CLOSED
    third.settle()  # granted in the half-open epoch: now stale, changes nothing
    assert breaker.state is CLOSED


async def test_ten_concurrent_callers_after_the_open_period() -> None:
    # (pytest.mark.parametrize does not combine with the conftest's anyio marking.)
    for max_calls in (1, 3):
        await ten_callers(max_calls)


async def ten_callers(max_calls: int) -> None:
    clock = ManualClock()
    breaker = make(clock, half_open_max_calls=max_calls)
    await trip(breaker)
    clock.advance(30.0)
    running = 0
    most = 0
    rejected = 0
    release = anyio.Event()

    async def probe() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    async def caller() -> None:
        nonlocal rejected
        try:
            await breaker.call(probe)
        except CircuitOpenError:
            rejected += 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert running == max_calls
        assert rejected == 10 - max_calls
        assert breaker.state is HALF_OPEN
        release.set()
    assert most == max_calls
    assert breaker.state is CLOSED


async def test_a_cancelled_probe_frees_its_slot_and_counts_nothing() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await trip(breaker)
    clock.advance(30.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, anyio.sleep_forever)
        await anyio.wait_all_tasks_blocked()
        assert breaker.statistics().half_open_calls == 1
        tg.cancel_scope.cancel()

    assert breaker.state is HALF_OPEN
    assert breaker.statistics().half_open_calls == 0
    assert breaker.statistics().trips == 1
    await breaker.call(ok)
    assert breaker.state is CLOSED


async def test_a_cancelled_probe_in_async_with_frees_its_slot() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await trip(breaker)
    clock.advance(30.0)
    with anyio.CancelScope() as scope:
        async with breaker:
            scope.cancel()
            await anyio.sleep_forever()
    assert breaker.state is HALF_OPEN
    assert breaker.statistics().half_open_calls == 0


async def test_cancellation_in_closed_state_is_neither_success_nor_failure() -> None:
    breaker = make()
    await failures(breaker, 2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await breaker.call(anyio.sleep_forever)
    assert breaker.statistics().consecutive_failures == 2
    seen: list[str] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class() as exc:
            seen.append(breaker.classify(exc))
            raise
    assert seen == ["cancelled"]


async def test_a_hung_probe_reopens_on_the_next_call() -> None:
    clock = ManualClock()
    breaker = make(clock, max_wait_in_half_open=5.0)
    await trip(breaker)
    clock.advance(30.0)
    hung = await breaker.acquire()
    clock.advance(4.0)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert info.value.retry_after == pytest.approx(1.0)
    assert breaker.state is HALF_OPEN
    clock.advance(1.0)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert breaker.state is OPEN
    assert info.value.retry_after == pytest.approx(30.0)
    hung.settle()  # finishes at last, in a stale epoch
    assert breaker.state is OPEN


async def test_a_probe_is_timed_from_its_start_not_its_admission() -> None:
    clock = ManualClock()
    breaker = make(clock, max_wait_in_half_open=5.0)
    await trip(breaker)
    clock.advance(30.0)
    queued = await breaker.acquire(started=False)  # waits for a token before sending
    clock.advance(60.0)  # a long queue: still not hung, it has sent nothing
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert info.value.retry_after == 1.0  # no running probe to time: min(30 s, 1 s)
    assert breaker.state is HALF_OPEN
    assert breaker.statistics().half_open_calls == 1
    queued.mark_started()
    clock.advance(4.0)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert info.value.retry_after == pytest.approx(1.0)  # until it has run 5 s
    assert breaker.state is HALF_OPEN
    queued.settle()
    assert breaker.state is CLOSED
    assert breaker.statistics().trips == 1


async def test_a_started_probe_that_hangs_still_reopens_the_breaker() -> None:
    clock = ManualClock()
    breaker = make(clock, max_wait_in_half_open=5.0, half_open_max_calls=2)
    await trip(breaker)
    clock.advance(30.0)
    queued = await breaker.acquire(started=False)
    clock.advance(10.0)
    queued.mark_started()
    running = await breaker.acquire()
    clock.advance(5.0)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert breaker.state is OPEN
    assert info.value.retry_after == 30.0
    running.settle()  # stale
    queued.settle()  # stale
    assert breaker.state is OPEN
    assert breaker.statistics().half_open_calls == 0


async def test_callers_refused_while_a_probe_runs_are_told_a_short_wait() -> None:
    clock = ManualClock()
    breaker = make(clock, recovery_timeout=30.0)
    await trip(breaker)
    clock.advance(30.0)
    probe = await breaker.acquire()
    waits = []
    for _ in range(59):
        with pytest.raises(CircuitOpenError) as info:
            await breaker.acquire()
        waits.append(info.value.retry_after)
    assert waits == [1.0] * 59  # min(recovery_timeout, 1 s), not the 30 s open period
    clock.advance(0.1)
    probe.settle()
    assert breaker.state is CLOSED

    quick = make(clock, recovery_timeout=0.5)
    await trip(quick)
    clock.advance(0.5)
    await quick.acquire()
    with pytest.raises(CircuitOpenError) as info:
        await quick.acquire()
    assert info.value.retry_after == 0.5  # min(recovery_timeout, 1 s)

    tiny = make(clock, recovery_timeout=0.01)
    await trip(tiny)
    clock.advance(0.01)
    await tiny.acquire()
    with pytest.raises(CircuitOpenError) as info:
        await tiny.acquire()
    assert info.value.retry_after == 0.05  # never below 50 ms


async def test_with_max_wait_the_refused_wait_is_until_the_oldest_probe_would_be_hung() -> None:
    clock = ManualClock()
    breaker = make(clock, max_wait_in_half_open=10.0, half_open_max_calls=2)
    await trip(breaker)
    clock.advance(30.0)
    await breaker.acquire()
    clock.advance(3.0)
    await breaker.acquire()
    clock.advance(1.0)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert info.value.retry_after == pytest.approx(6.0)  # the oldest has run 4 s of 10 s
    clock.advance(5.98)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert info.value.retry_after == 0.05  # 20 ms left, told at least 50 ms


async def test_a_slow_probe_reopens_when_a_slow_call_rule_is_set() -> None:
    clock = ManualClock()
    breaker = make(clock, window_size=2, slow_call_duration=1.0)
    await failures(breaker, 2)
    assert breaker.state is OPEN
    clock.advance(30.0)
    permit = await breaker.acquire()
    clock.advance(1.5)
    permit.settle()
    assert breaker.state is OPEN


# Backoff


async def test_open_duration_grows_on_repeated_trips_and_is_capped() -> None:
    clock = ManualClock()
    breaker = make(clock, recovery_timeout=10.0, backoff_multiplier=2.0, max_recovery_timeout=50.0)
    await trip(breaker)
    seen = [breaker.statistics().retry_after]
    for _ in range(4):
        clock.advance(seen[-1])
        with pytest.raises(UpstreamError):
            await breaker.call(fail)
        seen.append(breaker.statistics().retry_after)
    assert seen == [10.0, 20.0, 40.0, 50.0, 50.0]
    clock.advance(50.0)
    await breaker.call(ok)
    await trip(breaker)
    assert breaker.statistics().retry_after == 10.0  # recovery resets the growth


# Failure-rate windows


async def test_count_window_opens_at_the_failure_rate() -> None:
    breaker = make(window_size=4, failure_rate_threshold=0.5)
    assert breaker.config.minimum_calls == 4
    await failures(breaker, 2)
    await breaker.call(ok)
    assert breaker.state is CLOSED  # 3 calls < minimum_calls
    stats = breaker.statistics()
    assert (stats.calls, stats.failures, stats.failure_rate) == (3, 2, pytest.approx(2 / 3))
    await breaker.call(ok)
    assert breaker.state is OPEN  # 2 of 4


async def test_count_window_forgets_the_oldest_call() -> None:
    breaker = make(window_size=3, failure_rate_threshold=0.6)
    await failures(breaker, 1)
    await breaker.call(ok)
    await breaker.call(ok)
    await failures(breaker, 1)  # window: ok, ok, fail -> 1/3
    assert breaker.state is CLOSED
    assert breaker.statistics().failures == 1
    await failures(breaker, 1)  # ok, fail, fail -> 2/3
    assert breaker.state is OPEN


async def test_time_window_forgets_old_calls() -> None:
    clock = ManualClock()
    breaker = make(clock, window_duration=10.0, minimum_calls=2, failure_rate_threshold=1.0)
    await failures(breaker, 1)
    clock.advance(10.0)
    await failures(breaker, 1)
    assert breaker.state is CLOSED
    assert breaker.statistics().calls == 1
    clock.advance(5.0)
    await failures(breaker, 1)
    assert breaker.state is OPEN


async def test_slow_calls_open_the_breaker() -> None:
    clock = ManualClock()
    breaker = make(clock, window_size=2, slow_call_duration=1.0, slow_call_rate_threshold=1.0)

    async def slow() -> str:
        clock.advance(1.0)
        return "done"

    assert await breaker.call(slow) == "done"
    assert breaker.state is CLOSED
    assert await breaker.call(slow) == "done"
    assert breaker.state is OPEN
    stats = breaker.statistics()
    assert (stats.slow_calls, stats.slow_call_rate, stats.failures) == (2, 1.0, 0)


async def test_mark_started_times_only_the_attempt() -> None:
    clock = ManualClock()
    breaker = make(clock, window_size=1, slow_call_duration=1.0)
    permit = await breaker.acquire()
    clock.advance(5.0)  # waiting for a rate limiter, say
    permit.mark_started()
    clock.advance(0.5)
    permit.settle()
    assert breaker.statistics().slow_calls == 0


# Stale epochs and permits


async def test_a_straggler_from_before_the_trip_cannot_flip_the_state() -> None:
    clock = ManualClock()
    breaker = make(clock)
    straggler = await breaker.acquire()
    await trip(breaker)
    straggler.settle()
    assert breaker.state is OPEN
    clock.advance(30.0)
    await breaker.call(ok)
    late = await breaker.acquire()
    await trip(breaker)
    clock.advance(30.0)
    await breaker.call(ok)
    assert breaker.state is CLOSED
    late.settle(UpstreamError())
    assert breaker.statistics().consecutive_failures == 0


async def test_recording_a_permit_twice_is_harmless() -> None:
    breaker = make(failure_threshold=1)
    permit = await breaker.acquire()
    permit.settle()
    permit.settle(UpstreamError())
    permit.release()
    assert permit.done
    assert breaker.state is CLOSED
    assert "done=True" in repr(permit)


async def test_settle_maps_exceptions() -> None:
    breaker = make(failure_threshold=1)
    permit = await breaker.acquire()
    permit.settle(RateLimitedError("cps", 1.0))
    assert breaker.state is CLOSED
    permit = await breaker.acquire()
    permit.settle(UpstreamError())
    assert breaker.state is OPEN


# Classification


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UpstreamError(), "failure"),
        (Kinded(FailureKind.MAYBE_PROCESSED), "failure"),
        (Kinded(FailureKind.NOT_SENT), "failure"),
        (Kinded(FailureKind.UNPROCESSED), "ignored"),
        (Kinded(FailureKind.PERMANENT), "ignored"),
        (ProviderError(400, 21211, "bad number", FailureKind.PERMANENT), "ignored"),
        (ProviderError(503, None, "down", FailureKind.MAYBE_PROCESSED), "failure"),
        (CircuitOpenError("other", 1.0), "ignored"),
        (RateLimitedError("cps", None), "ignored"),
        (KeyboardInterrupt(), "cancelled"),
    ],
)
def test_default_classification(error: BaseException, expected: str) -> None:
    assert CircuitBreaker("x").classify(error) == expected


@pytest.mark.parametrize(
    "matcher",
    [
        UpstreamError,
        (KeyError, UpstreamError),
        lambda exc: str(exc) == "boom",
    ],
)
def test_failure_on_counts_only_matches(matcher: Any) -> None:
    breaker = CircuitBreaker("x", failure_on=matcher)
    assert breaker.classify(UpstreamError("boom")) == "failure"
    assert breaker.classify(ValueError("other")) == "ignored"
    assert breaker.classify(RateLimitedError("cps", 1.0)) == "ignored"


def test_failure_on_overrides_the_kind_default_and_ignore_on_wins() -> None:
    breaker = CircuitBreaker("x", failure_on=Kinded, ignore_on=lambda e: str(e) == "permanent")
    assert breaker.classify(Kinded(FailureKind.UNPROCESSED)) == "failure"
    assert breaker.classify(Kinded(FailureKind.PERMANENT)) == "ignored"


async def test_failure_result_counts_a_returned_value_and_still_returns_it() -> None:
    recorder = Recorder()
    breaker = make(failure_threshold=2, failure_result=lambda r: r >= 500, listeners=[recorder])
    assert await breaker.call(ok, 503) == 503
    assert await breaker.call(ok, 503) == 503
    assert breaker.state is OPEN
    assert recorder.events[0] == ("failure", "twilio", "NoneType", 0.0)


async def test_a_raising_result_predicate_propagates_and_frees_the_probe() -> None:
    clock = ManualClock()

    def predicate(result: object) -> bool:
        raise RuntimeError("predicate bug")

    breaker = make(clock, failure_threshold=1, failure_result=predicate)
    await failures(breaker, 1)
    clock.advance(30.0)
    with pytest.raises(RuntimeError, match="predicate bug"):
        await breaker.call(ok)
    assert breaker.statistics().half_open_calls == 0


# Use forms


async def test_exceptions_propagate_unchanged() -> None:
    breaker = make()
    error = UpstreamError("boom")

    async def raising() -> None:
        raise error

    decorated = breaker(raising)
    for form in (decorated, lambda: breaker.call(raising)):
        with pytest.raises(UpstreamError) as info:
            await form()
        assert info.value is error
        assert info.traceback[-1].name == "raising"
    with pytest.raises(UpstreamError) as info:
        async with breaker:
            raise error
    assert info.value is error
    assert breaker.state is OPEN


def test_decorator_keeps_the_signature() -> None:
    breaker = CircuitBreaker("x")

    async def place_call(to: str, *, from_: str, timeout: float = 5.0) -> dict[str, str]:
        """Place a call."""
        return {"to": to, "from": from_}

    decorated = breaker(place_call)
    assert inspect.signature(decorated) == inspect.signature(place_call)
    assert decorated.__name__ == "place_call"
    assert decorated.__doc__ == "Place a call."
    assert decorated.__wrapped__ is place_call  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(decorated)


def test_decorator_refuses_a_sync_function() -> None:
    def sync() -> None:
        return None

    with pytest.raises(TypeError, match="not an async function"):
        CircuitBreaker("x")(sync)  # type: ignore[arg-type]


async def test_decorator_counts_and_passes_arguments() -> None:
    clock = ManualClock()
    breaker = make(clock, failure_threshold=2)

    @breaker
    async def echo(value: int, *, plus: int = 0) -> int:
        if value < 0:
            raise UpstreamError
        return value + plus

    assert await echo(1, plus=2) == 3
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await echo(-1)
    with pytest.raises(CircuitOpenError):
        await echo(1)
    clock.advance(30.0)
    assert await echo(4) == 4
    assert breaker.state is CLOSED


async def test_decorator_success_resets_the_consecutive_count() -> None:
    breaker = make()
    decorated_ok, decorated_fail = breaker(ok), breaker(fail)
    for _ in range(3):
        for _ in range(2):
            with pytest.raises(UpstreamError):
                await decorated_fail()
        assert await decorated_ok(2) == 2
    assert breaker.state is CLOSED
    assert breaker.statistics().consecutive_failures == 0


async def test_callable_object_with_async_call_can_be_decorated() -> None:
    class Endpoint:
        async def __call__(self, value: int) -> int:
            return value

    breaker = CircuitBreaker("x")
    assert await breaker(Endpoint())(5) == 5


async def test_async_with_counts_and_rejects_at_entry() -> None:
    breaker = make(failure_threshold=1)
    async with breaker:
        pass
    with pytest.raises(UpstreamError):
        async with breaker:
            raise UpstreamError
    entered = False
    with pytest.raises(CircuitOpenError):
        async with breaker:
            entered = True
    assert not entered


async def test_nested_async_with_on_two_breakers() -> None:
    outer = make(failure_threshold=1)
    inner = CircuitBreaker("vapi", failure_threshold=1, ignore_on=UpstreamError)
    with pytest.raises(UpstreamError):
        async with outer, inner:
            raise UpstreamError
    assert outer.state is OPEN
    assert inner.state is CLOSED


async def test_aexit_without_aenter_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="without a matching"):
        await make().__aexit__(None, None, None)


async def test_fast_path_breaker_through_the_permit_api() -> None:
    breaker = make(failure_threshold=1)
    permit = await breaker.acquire()
    assert isinstance(permit, BreakerPermit)
    assert not permit.probe
    permit.settle(UpstreamError())
    assert breaker.state is OPEN


# Manual control


async def test_reset_closes_and_forgets() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await trip(breaker)
    breaker.reset()
    assert breaker.state is CLOSED
    assert breaker.statistics().trips == 1
    await failures(breaker, 2)
    assert breaker.state is CLOSED


async def test_force_open_then_recovers_like_a_trip() -> None:
    clock = ManualClock()
    breaker = make(clock)
    breaker.force_open(5.0)
    assert breaker.state is OPEN
    assert breaker.statistics().retry_after == 5.0
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    clock.advance(5.0)
    assert await breaker.call(ok) == 1
    assert breaker.state is CLOSED
    with pytest.raises(ValueError, match="duration"):
        breaker.force_open(-1.0)


# Listeners


async def test_listeners_see_every_outcome_and_state_change() -> None:
    clock = ManualClock()
    recorder = Recorder()
    breaker = make(clock, failure_threshold=1, ignore_on=KeyError, listeners=[recorder])

    async def slow_ok() -> None:
        clock.advance(0.25)

    async def missing() -> None:
        raise KeyError

    await breaker.call(slow_ok)
    with pytest.raises(KeyError):
        await breaker.call(missing)
    with pytest.raises(UpstreamError):
        await breaker.call(fail)
    clock.advance(10.0)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    clock.advance(20.0)
    await breaker.call(ok)
    assert recorder.events == [
        ("success", "twilio", 0.25),
        ("ignored", "twilio", "KeyError"),
        ("failure", "twilio", "UpstreamError", 0.0),
        ("state", "twilio", CLOSED, OPEN),
        ("rejected", "twilio", 20.0),
        ("state", "twilio", OPEN, HALF_OPEN),
        ("success", "twilio", 0.0),
        ("state", "twilio", HALF_OPEN, CLOSED),
    ]


async def test_add_listener_takes_any_callable_and_refuses_the_rest() -> None:
    breaker = make(failure_threshold=1)
    changes: list[StateChanged] = []

    def changed(event: Event) -> None:
        if isinstance(event, StateChanged):
            changes.append(event)

    breaker.add_listener(changed)
    recorder = Recorder()
    breaker.add_listener(recorder)
    await failures(breaker, 1)
    assert changes == [StateChanged("twilio", CLOSED, OPEN)]
    assert ("state", "twilio", CLOSED, OPEN) in recorder.events
    with pytest.raises(TypeError, match="callable"):
        breaker.add_listener(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        make(listeners=[object()])  # type: ignore[list-item]


async def test_a_failing_listener_does_not_change_the_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    breaker = make(listeners=[broken])
    assert await breaker.call(ok, 3) == 3
    assert "listener bug" in caplog.text


# Statistics


async def test_statistics_is_a_frozen_snapshot() -> None:
    clock = ManualClock()
    breaker = make(clock)
    await failures(breaker, 1)
    stats = breaker.statistics()
    assert isinstance(stats, CircuitBreakerStatistics)
    assert stats == CircuitBreakerStatistics(
        name="twilio",
        state=CLOSED,
        calls=None,
        failures=None,
        slow_calls=None,
        failure_rate=None,
        slow_call_rate=None,
        consecutive_failures=1,
        half_open_calls=0,
        retry_after=0.0,
        trips=0,
    )
    with pytest.raises(AttributeError):
        stats.trips = 5  # type: ignore[misc]


def test_window_statistics_start_empty() -> None:
    stats = CircuitBreaker("x", window_duration=60.0).statistics()
    assert (stats.calls, stats.failures, stats.failure_rate, stats.slow_call_rate) == (
        0,
        0,
        0.0,
        0.0,
    )


# Memory


async def test_open_rejections_do_not_grow_memory() -> None:
    breaker = make()
    breaker.force_open()

    async def reject(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(CircuitOpenError):
                await breaker.call(ok)

    await reject(100)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        await reject(2000)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 4096


# Configuration


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"failure_threshold": 0}, ValueError, "failure_threshold"),
        ({"failure_threshold": 1.5}, TypeError, "failure_threshold"),
        ({"failure_threshold": True}, TypeError, "failure_threshold"),
        ({"recovery_timeout": -1.0}, ValueError, "recovery_timeout"),
        ({"recovery_timeout": float("nan")}, ValueError, "recovery_timeout"),
        ({"recovery_timeout": "30"}, TypeError, "recovery_timeout"),
        ({"window_size": 0}, ValueError, "window_size"),
        ({"window_duration": -5.0}, ValueError, "window_duration"),
        ({"window_size": 10, "window_duration": 5.0}, ValueError, "not both"),
        ({"window_size": 10, "failure_rate_threshold": 0.0}, ValueError, r"\(0, 1\]"),
        ({"window_size": 10, "failure_rate_threshold": 1.5}, ValueError, r"\(0, 1\]"),
        ({"slow_call_rate_threshold": -0.1}, ValueError, "slow_call_rate_threshold"),
        ({"failure_rate_threshold": 0.5}, ValueError, "failure_rate_threshold needs a window"),
        ({"failure_rate_threshold": 1.0}, ValueError, "failure_rate_threshold needs a window"),
        (
            {"window_size": 5, "slow_call_rate_threshold": 0.5},
            ValueError,
            "slow_call_rate_threshold needs slow_call_duration",
        ),
        ({"slow_call_rate_threshold": 1.0}, ValueError, "slow_call_rate_threshold needs"),
        ({"minimum_calls": 5}, ValueError, "minimum_calls needs a window"),
        ({"slow_call_duration": 1.0}, ValueError, "slow_call_duration needs a window"),
        ({"window_size": 5, "minimum_calls": 6}, ValueError, "must not exceed"),
        ({"minimum_calls": 5}, ValueError, "needs a window"),
        ({"slow_call_duration": 1.0}, ValueError, "needs a window"),
        ({"window_size": 5, "slow_call_duration": 0.0}, ValueError, "slow_call_duration"),
        ({"half_open_max_calls": 0}, ValueError, "half_open_max_calls"),
        ({"success_threshold": 0}, ValueError, "success_threshold"),
        ({"max_wait_in_half_open": 0.0}, ValueError, "max_wait_in_half_open"),
        ({"backoff_multiplier": 0.5}, ValueError, "backoff_multiplier"),
        ({"backoff_multiplier": "2"}, TypeError, "backoff_multiplier"),
        ({"max_recovery_timeout": 10.0}, ValueError, "max_recovery_timeout"),
        ({"failure_on": ValueError("x")}, TypeError, "failure_on"),
        ({"ignore_on": (KeyError, 3)}, TypeError, "ignore_on"),
        ({"ignore_on": int}, TypeError, "ignore_on"),
        ({"failure_result": 503}, TypeError, "failure_result"),
    ],
)
def test_invalid_configuration_fails_at_construction(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CircuitBreaker("x", **options)


def test_window_options_take_their_defaults_only_with_a_window() -> None:
    consecutive = CircuitBreaker("x").config
    assert consecutive.failure_rate_threshold is None
    assert consecutive.slow_call_rate_threshold is None
    assert consecutive.minimum_calls is None
    counted = CircuitBreaker("x", window_size=4).config
    assert (counted.failure_rate_threshold, counted.minimum_calls) == (0.5, 4)
    assert counted.slow_call_rate_threshold is None
    timed = CircuitBreaker("x", window_duration=10.0, slow_call_duration=1.0).config
    assert (timed.failure_rate_threshold, timed.minimum_calls) == (0.5, 10)
    assert timed.slow_call_rate_threshold == 1.0


def test_keyword_arguments_are_the_one_configuration_surface() -> None:
    breaker = CircuitBreaker("x", failure_threshold=5, window_duration=30.0)
    config = breaker.config
    assert config.minimum_calls == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.failure_threshold = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="config"):
        CircuitBreaker("x", config=config)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="name"):
        CircuitBreaker("")
    with pytest.raises(TypeError, match="name"):
        CircuitBreaker(1)  # type: ignore[arg-type]


# The store seam


class FleetStore:
    """A stand-in for a shared store: records what the breaker publishes and asks."""

    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.attached: list[CircuitBreaker] = []
        self.changes: list[tuple[str, int, BreakerState, BreakerState]] = []
        self.asked: list[tuple[str, int]] = []

    def attach(self, breaker: CircuitBreaker) -> None:
        self.attached.append(breaker)

    def state_changed(self, name: str, epoch: int, old: BreakerState, new: BreakerState) -> None:
        self.changes.append((name, epoch, old, new))

    async def probe_permit(self, name: str, epoch: int) -> bool | None:
        self.asked.append((name, epoch))
        return self.answer


async def test_a_shared_store_sees_transitions_and_probe_admissions_only() -> None:
    store = FleetStore(answer=None)
    assert isinstance(store, BreakerStore)
    assert isinstance(InMemoryBreakerStore(), BreakerStore)
    clock = ManualClock()
    breaker = CircuitBreaker("x", failure_threshold=2, clock=clock, store=store)
    assert store.attached == [breaker]
    assert await breaker.call(ok) == 1
    await failures(breaker, 2)
    assert store.asked == []  # the closed path makes no round trip
    assert store.changes == [("x", 1, CLOSED, OPEN)]
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    assert store.asked == []  # nor does a rejection while OPEN
    clock.advance(34.5)  # a shared store jitters open periods by +-15 %
    async with breaker:  # the store did not answer: the local permit is enough
        pass
    assert store.asked == [("x", 1)]
    assert breaker.state is CLOSED
    assert [change[2:] for change in store.changes[1:]] == [(OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


async def test_a_fleet_that_has_its_probes_refuses_the_local_one() -> None:
    clock = ManualClock()
    store = FleetStore(answer=False)
    recorder = Recorder()
    breaker = CircuitBreaker("x", clock=clock, store=store, listeners=[recorder])
    breaker.force_open()
    clock.advance(34.5)  # +-15 % jitter with a shared store
    with pytest.raises(CircuitOpenError) as info:
        await breaker.acquire()
    assert 0.0 < info.value.retry_after <= 1.0
    assert breaker.state is OPEN
    store.answer = True
    permit = await breaker.acquire()
    assert permit.probe
    permit.settle()
    assert breaker.state is CLOSED


def _too_many_requests() -> ProviderError:
    # A kind the breaker counts on its own (MAYBE_PROCESSED): only the 429 spares it.
    return ProviderError(429, None, "slow down", FailureKind.MAYBE_PROCESSED)


async def test_backpressure_errors_never_trip_the_breaker() -> None:
    breaker = CircuitBreaker("bp", failure_threshold=1, clock=ManualClock())

    async def busy() -> None:
        raise _too_many_requests()

    for _ in range(5):
        with pytest.raises(ProviderError):
            await breaker.call(busy)
    assert breaker.state is BreakerState.CLOSED
    assert _too_many_requests().backpressure
    assert breaker.classify(_too_many_requests()) == "ignored"
    assert not ProviderError(503, None, "down", FailureKind.MAYBE_PROCESSED).backpressure


async def test_settling_a_result_applies_the_result_predicate() -> None:
    breaker = CircuitBreaker(
        "results", failure_threshold=1, failure_result=lambda r: r == 503, clock=ManualClock()
    )
    permit = await breaker.acquire()
    permit.settle(result=200)
    assert breaker.state is BreakerState.CLOSED
    permit = await breaker.acquire()
    permit.settle(result=503)
    assert breaker.state is BreakerState.OPEN


async def test_no_event_record_is_built_when_nothing_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from resilient_voice.breaker import _facade

    def refuse(*args: object) -> None:
        raise AssertionError("an event record was built with no listener")

    for record in ("CallSucceeded", "CallFailed", "CallIgnored", "CallRejected", "StateChanged"):
        monkeypatch.setattr(_facade, record, refuse)
    clock = ManualClock()
    breaker = make(clock, window_size=2, slow_call_duration=1.0, ignore_on=KeyError)
    assert await breaker.call(ok) == 1

    async def missing() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await breaker.call(missing)
    await failures(breaker, 1)  # one success and one failure in a window of two
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    clock.advance(30.0)
    assert await breaker.call(ok) == 1
    assert breaker.state is CLOSED


async def test_call_builds_no_guarded_function_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    breaker = CircuitBreaker("per-call", failure_threshold=2, clock=ManualClock())

    def refuse(self: CircuitBreaker, fn: object) -> None:
        raise AssertionError("call() built a guarded function")

    monkeypatch.setattr(CircuitBreaker, "_guard", refuse)
    assert await breaker.call(ok) == 1
    with pytest.raises(UpstreamError):
        await breaker.call(fail)
    assert breaker.statistics().consecutive_failures == 1  # the fast path counted it
    assert await breaker.call(ok) == 1
    assert breaker.statistics().consecutive_failures == 0
