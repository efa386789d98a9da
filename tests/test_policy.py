"""Policy composes the primitives in the documented order; these tests pin that order."""

from __future__ import annotations

import anyio
import pytest

from resilient_voice import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    FailureKind,
    OutcomeUnknownError,
    RateLimitedError,
    RetryPolicy,
)
from resilient_voice._clock import SYSTEM_CLOCK
from resilient_voice.limiter import KeyedLimiter, TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryBudget
from resilient_voice.testing import ManualClock


class NotSent(Exception):
    failure_kind = FailureKind.NOT_SENT
    retry_after = None


class Maybe(Exception):
    failure_kind = FailureKind.MAYBE_PROCESSED
    retry_after = None


def no_jitter_retry(clock: ManualClock, **options: object) -> RetryPolicy:
    return RetryPolicy(clock=clock, jitter="none", base_delay=0.1, **options)  # type: ignore[arg-type]


async def test_open_breaker_rejects_before_a_token_is_spent() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("up", failure_threshold=1, recovery_timeout=30.0, clock=clock)
    bucket = TokenBucket(rate=1.0, burst=5, clock=clock)
    policy = Policy(breaker=breaker, limiter=bucket, clock=clock)

    async def fail() -> None:
        raise Maybe

    with pytest.raises(Maybe):
        await policy.call(fail)
    assert breaker.state is BreakerState.OPEN
    granted = bucket.statistics().granted
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            await policy.call(fail)
    assert bucket.statistics().granted == granted


async def test_every_attempt_pays_a_token() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=10, clock=clock)
    policy = Policy(limiter=bucket, retry=no_jitter_retry(clock, max_attempts=3), clock=clock)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise NotSent
        return "ok"

    assert await policy.call(flaky) == "ok"
    assert calls == 3
    assert bucket.statistics().granted == 3


async def test_breaker_times_only_the_attempt_not_the_token_wait() -> None:
    clock = ManualClock(autojump=True)
    breaker = CircuitBreaker(
        "slow",
        failure_rate_threshold=0.5,
        window_size=2,
        minimum_calls=1,
        slow_call_duration=0.5,
        slow_call_rate_threshold=0.5,
        clock=clock,
    )
    bucket = TokenBucket(rate=0.5, burst=1, clock=clock)  # a token every 2 s
    policy = Policy(breaker=breaker, limiter=bucket, clock=clock)

    async def quick() -> None:
        await clock.sleep(0.1)

    for _ in range(4):  # every call after the first waits ~2 s for its token
        await policy.call(quick)
    assert clock.now() >= 6.0
    assert breaker.state is BreakerState.CLOSED
    assert breaker.statistics().slow_calls == 0


async def test_attempt_timeout_counts_as_failure_and_is_not_retried_when_not_idempotent() -> None:
    clock = ManualClock(autojump=True)
    breaker = CircuitBreaker("t", failure_threshold=5, clock=clock)
    policy = Policy(
        breaker=breaker, retry=no_jitter_retry(clock, max_attempts=3), timeout=1.0, clock=clock
    )
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await clock.sleep(10)

    with pytest.raises(OutcomeUnknownError) as info:
        await policy.call(hang)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert calls == 1
    assert breaker.statistics().consecutive_failures == 1
    assert clock.now() == pytest.approx(1.0)


async def test_attempt_timeout_is_retried_when_idempotent() -> None:
    clock = ManualClock(autojump=True)
    policy = Policy(
        retry=no_jitter_retry(clock, max_attempts=3), timeout=1.0, idempotent=True, clock=clock
    )
    calls = 0

    async def hang_then_answer() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            await clock.sleep(10)
        return "ok"

    assert await policy.call(hang_then_answer) == "ok"
    assert calls == 3


async def test_total_timeout_bounds_everything_and_the_smaller_wins() -> None:
    clock = ManualClock(autojump=True)
    retry = no_jitter_retry(clock, max_attempts=100, total_timeout=50.0)
    policy = Policy(retry=retry, total_timeout=2.5, idempotent=True, clock=clock)

    async def always_fails() -> None:
        await clock.sleep(0.3)
        raise NotSent

    with pytest.raises((NotSent, TimeoutError)):
        await policy.call(always_fails)
    assert clock.now() <= 2.5


async def test_total_timeout_without_retry_cancels_and_reports_unknown_outcome() -> None:
    clock = ManualClock(autojump=True)
    policy = Policy(total_timeout=2.0, clock=clock)

    async def hang() -> None:
        await clock.sleep(10)

    with pytest.raises(OutcomeUnknownError) as info:
        await policy.call(hang)
    assert isinstance(info.value.__cause__, TimeoutError)

    idempotent = Policy(total_timeout=2.0, idempotent=True, clock=clock)
    with pytest.raises(TimeoutError):
        await idempotent.call(hang)


async def test_limiter_refuses_at_once_when_the_deadline_cannot_be_met() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("d", failure_threshold=1, half_open_max_calls=1, clock=clock)
    bucket = TokenBucket(rate=0.1, burst=1, clock=clock)  # one token per 10 s
    policy = Policy(breaker=breaker, limiter=bucket, total_timeout=5.0, clock=clock)

    async def ok() -> str:
        return "ok"

    assert await policy.call(ok) == "ok"
    with pytest.raises(RateLimitedError):
        await policy.call(ok)
    assert clock.now() == 0.0  # refused without sleeping
    # The refused attempt released its breaker permit without counting anything.
    assert breaker.state is BreakerState.CLOSED
    assert breaker.statistics().consecutive_failures == 0


async def test_keyed_limiter_uses_the_key_function() -> None:
    clock = ManualClock()
    limiter = KeyedLimiter(rate=1.0, burst=1, clock=clock)
    policy = Policy(limiter=limiter, key=lambda sender, body: sender, clock=clock)
    sent: list[str] = []

    async def send(sender: str, body: str) -> None:
        sent.append(f"{sender}:{body}")

    await policy.call(send, "+15550001", "a")
    await policy.call(send, "+15550002", "b")  # another sender: its own bucket
    assert sent == ["+15550001:a", "+15550002:b"]
    assert clock.now() == 0.0


async def test_keyed_limiter_without_key_function_needs_a_key_per_run() -> None:
    clock = ManualClock()
    policy = Policy(limiter=KeyedLimiter(rate=1.0, clock=clock), clock=clock)

    async def ok() -> str:
        return "ok"

    with pytest.raises(ValueError, match="key"):
        await policy.call(ok)
    assert await policy.run(ok, key="sender") == "ok"


async def test_bulkhead_caps_attempts_in_flight() -> None:
    policy = Policy(max_concurrency=2)
    in_flight = peak = 0

    async def work() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(policy.call, work)
    assert peak == 2


async def test_cancellation_propagates_and_frees_the_probe_slot() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("c", failure_threshold=1, recovery_timeout=1.0, clock=clock)
    policy = Policy(breaker=breaker, retry=no_jitter_retry(clock), clock=clock)

    async def fail() -> None:
        raise Maybe

    with pytest.raises(OutcomeUnknownError):
        await policy.call(fail)
    clock.advance(1.0)
    with anyio.move_on_after(0.05):
        await policy.call(anyio.sleep_forever)  # the probe, cancelled
    assert breaker.state is BreakerState.HALF_OPEN

    async def ok() -> str:
        return "ok"

    assert await policy.call(ok) == "ok"  # the slot was freed: a new probe runs
    assert breaker.state is BreakerState.CLOSED


async def test_decorator_runs_through_the_policy() -> None:
    clock = ManualClock(autojump=True)
    policy = Policy(retry=no_jitter_retry(clock, max_attempts=2), clock=clock)
    calls = 0

    @policy
    async def place(to: str, *, tries: int = 2) -> str:
        nonlocal calls
        calls += 1
        if calls < tries:
            raise NotSent
        return to

    assert await place("+15550100") == "+15550100"
    assert calls == 2


def test_invalid_configuration_is_rejected_at_construction() -> None:
    clock = ManualClock()
    with pytest.raises(ValueError, match="timeout"):
        Policy(timeout=0)
    with pytest.raises(ValueError, match="total_timeout"):
        Policy(total_timeout=-1)
    with pytest.raises(TypeError):
        Policy(timeout="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_concurrency"):
        Policy(max_concurrency=0)
    with pytest.raises(ValueError, match="key"):
        Policy(limiter=TokenBucket(rate=1.0, clock=clock), key=lambda: "x")
    with pytest.raises(TypeError, match="breaker"):
        Policy(breaker="twilio")  # type: ignore[arg-type]


async def test_policy_clock_drives_parts_built_with_it() -> None:
    clock = ManualClock(autojump=True)
    breaker = CircuitBreaker("adopt", failure_threshold=3, recovery_timeout=5.0, clock=clock)
    retry = RetryPolicy(jitter="none", base_delay=1.0, max_attempts=2, clock=clock)
    policy = Policy(breaker=breaker, retry=retry, timeout=2.0, clock=clock)
    calls = 0

    async def fail_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise NotSent
        return "ok"

    assert await policy.call(fail_once) == "ok"
    assert clock.now() == pytest.approx(1.0)  # the backoff slept on the manual clock
    assert policy.clock is clock


def test_a_policy_never_swaps_the_clock_of_its_parts() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("system")  # built without a clock: the system clock
    retry = RetryPolicy()
    bucket = TokenBucket(rate=1.0)
    for part in ({"breaker": breaker}, {"retry": retry}, {"limiter": bucket}):
        with pytest.raises(ValueError, match="never replaces a part's clock"):
            Policy(clock=clock, **part)  # type: ignore[arg-type]
    assert retry.clock is SYSTEM_CLOCK
    shared = Policy(breaker=breaker, retry=retry, limiter=bucket)
    assert shared.clock is SYSTEM_CLOCK
    assert Policy(retry=RetryPolicy(clock=clock)).clock is clock


def test_parts_on_different_clocks_are_refused() -> None:
    with pytest.raises(ValueError, match="clock"):
        Policy(
            breaker=CircuitBreaker("a", clock=ManualClock()),
            retry=RetryPolicy(clock=ManualClock()),
        )
    with pytest.raises(ValueError, match="clock"):
        Policy(breaker=CircuitBreaker("b", clock=ManualClock()), clock=ManualClock())
    shared = ManualClock()
    assert Policy(breaker=CircuitBreaker("c", clock=shared)).clock is shared


def test_every_part_shows_its_clock_and_a_retry_budget_must_share_it() -> None:
    clock = ManualClock()
    keyed = KeyedLimiter(rate=1.0, clock=clock)
    parts = (CircuitBreaker("k", clock=clock), TokenBucket(rate=1.0, clock=clock), keyed)
    assert all(part.clock is clock for part in parts)
    assert RetryBudget(clock=clock).clock is clock
    apart = RetryPolicy(clock=clock, budget=RetryBudget())  # the budget on the system clock
    with pytest.raises(ValueError, match="retry budget"):
        Policy(retry=apart)
    with pytest.raises(ValueError, match="retry budget"):
        Policy(retry=apart, clock=clock)
    together = RetryPolicy(clock=clock, budget=RetryBudget(clock=clock))
    assert Policy(retry=together, limiter=keyed).clock is clock


async def test_policy_paces_limiters_on_their_shared_clock() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    keyed = KeyedLimiter(rate=1.0, burst=1, clock=clock)
    policy = Policy(limiter=bucket, clock=clock)
    keyed_policy = Policy(limiter=keyed, key=lambda: "k", clock=clock)

    async def ok() -> None:
        return None

    for _ in range(3):
        await policy.call(ok)
        await keyed_policy.call(ok)
    assert clock.now() == pytest.approx(2.0, abs=1e-6)  # both paced on the manual clock


async def test_retry_total_timeout_makes_the_limiter_refuse_instead_of_an_unknown_outcome() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=0.05, burst=1, clock=clock)  # one token per 20 s
    policy = Policy(
        limiter=bucket,
        retry=RetryPolicy(max_attempts=3, total_timeout=1.0, clock=clock),
        clock=clock,
    )

    async def place() -> str:
        return "placed"

    assert await policy.call(place) == "placed"
    with pytest.raises(RateLimitedError):  # nothing was sent: not an unknown outcome
        await policy.call(place)
    assert clock.now() == 0.0


async def test_a_deadline_cutting_a_bulkhead_wait_says_nothing_was_sent() -> None:
    clock = ManualClock(autojump=True)
    policy = Policy(
        max_concurrency=1,
        retry=RetryPolicy(max_attempts=3, total_timeout=1.0, clock=clock),
        clock=clock,
    )
    started = anyio.Event()

    async def slow() -> str:
        started.set()
        await clock.sleep(5)
        return "done"

    async def quick() -> str:
        return "quick"

    async def hold_the_slot() -> None:
        # Cut at its own deadline while in flight: an unknown outcome, rightly.
        with pytest.raises(OutcomeUnknownError):
            await policy.call(slow)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_the_slot)  # holds the only slot for 5 s
        await started.wait()
        with pytest.raises(TimeoutError) as info:
            await policy.call(quick)  # waits for the slot past its 1 s budget
        assert not isinstance(info.value, OutcomeUnknownError)
        assert getattr(info.value, "failure_kind", None) is FailureKind.NOT_SENT


async def test_a_past_deadline_calls_nothing_and_spends_nothing() -> None:
    clock = ManualClock(10.0)
    breaker = CircuitBreaker("up", failure_threshold=1, clock=clock)
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    calls = 0

    async def place() -> str:
        nonlocal calls
        calls += 1
        return "placed"

    for retry in (None, RetryPolicy(max_attempts=3, clock=clock)):
        policy = Policy(breaker=breaker, limiter=bucket, retry=retry, clock=clock)
        for deadline in (9.0, 10.0):  # already past, and exactly now: no time to do anything
            with pytest.raises(TimeoutError) as info:
                await policy.run(place, deadline=deadline)
            assert not isinstance(info.value, OutcomeUnknownError)
            assert getattr(info.value, "failure_kind", None) is FailureKind.NOT_SENT
    assert calls == 0
    assert bucket.statistics().granted == 0
    assert breaker.state is BreakerState.CLOSED
    assert await Policy(limiter=bucket, clock=clock).run(place, deadline=10.5) == "placed"


async def test_an_unhashable_key_propagates_unchanged_and_is_not_retried() -> None:
    clock = ManualClock(autojump=True)
    calls = 0

    async def place(to: str) -> str:
        nonlocal calls
        calls += 1
        return to

    for idempotent in (False, True):
        policy = Policy(
            limiter=KeyedLimiter(rate=1.0, clock=clock),
            key=lambda to: [to],  # a list: not hashable
            retry=no_jitter_retry(clock, max_attempts=3),
            idempotent=idempotent,
            clock=clock,
        )
        with pytest.raises(TypeError, match="hashable"):
            await policy.call(place, "+15550100")
    assert calls == 0
    assert clock.now() == 0.0  # no backoff sleep: the error was not retried


async def test_a_reentrant_call_fails_at_once_instead_of_waiting_on_itself() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=1.0, burst=5, clock=clock)
    for slots in (1, 2):  # the only slot taken (a deadlock), or a free one (refused too)
        policy = Policy(
            limiter=bucket,
            max_concurrency=slots,
            retry=no_jitter_retry(clock, max_attempts=3),
            clock=clock,
        )
        inner_calls = 0

        @policy
        async def inner() -> str:
            nonlocal inner_calls
            inner_calls += 1
            return "inner"

        @policy
        async def outer() -> str:
            return await inner()

        granted = bucket.statistics().granted
        with pytest.raises(RuntimeError, match="would wait on itself") as info:
            await outer()
        assert not isinstance(info.value, OutcomeUnknownError)
        assert getattr(info.value, "failure_kind", None) is FailureKind.NOT_SENT
        assert inner_calls == 0
        assert bucket.statistics().granted == granted + 1  # the outer's token only, no retry
        assert clock.now() == 0.0
        # The slot was given back: the policy still serves calls, including the inner one.
        assert await inner() == "inner"


async def test_a_probe_queued_for_a_token_is_not_judged_hung() -> None:
    # A shared CPS limiter whose queue is longer than max_wait_in_half_open: the probe waits
    # 10 s for its token, sending nothing; the breaker must wait for its answer.
    clock = ManualClock()
    breaker = CircuitBreaker(
        "twilio",
        failure_threshold=1,
        recovery_timeout=30.0,
        max_wait_in_half_open=5.0,
        clock=clock,
    )
    bucket = TokenBucket(rate=0.1, burst=1, clock=clock)  # a token every 10 s
    policy = Policy(breaker=breaker, limiter=bucket, clock=clock)
    sent: list[float] = []

    async def fail() -> None:
        raise Maybe

    async def answer() -> str:
        sent.append(clock.now())
        return "CA1"

    with pytest.raises(Maybe):
        await policy.call(fail)
    assert breaker.state is BreakerState.OPEN
    clock.advance(30.0)
    await bucket.acquire()  # other traffic on the shared limiter takes the token at 30 s
    results: list[str] = []

    async def probe() -> None:
        results.append(await policy.call(answer))

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        await anyio.wait_all_tasks_blocked()
        assert breaker.state is BreakerState.HALF_OPEN  # the probe holds its slot, queued
        clock.advance(6.0)  # queued longer than max_wait_in_half_open
        with pytest.raises(CircuitOpenError) as info:
            await policy.call(answer)
        assert breaker.state is BreakerState.HALF_OPEN  # refused, not re-opened
        assert info.value.retry_after == 1.0
        clock.advance(4.0)  # the probe's token comes at 40 s
    assert results == ["CA1"]
    assert sent == [40.0]
    assert breaker.state is BreakerState.CLOSED
    assert breaker.statistics().trips == 1


async def test_a_probe_that_hangs_after_its_token_still_reopens_the_breaker() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "twilio",
        failure_threshold=1,
        recovery_timeout=30.0,
        max_wait_in_half_open=5.0,
        clock=clock,
    )
    bucket = TokenBucket(rate=0.1, burst=1, clock=clock)
    policy = Policy(breaker=breaker, limiter=bucket, clock=clock)

    async def fail() -> None:
        raise Maybe

    async def hang() -> None:
        await clock.sleep(100.0)

    with pytest.raises(Maybe):
        await policy.call(fail)
    clock.advance(30.0)
    await bucket.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(policy.call, hang)
        await anyio.wait_all_tasks_blocked()
        clock.advance(10.0)  # token at 40 s: the probe is sent and hangs
        await anyio.wait_all_tasks_blocked()
        clock.advance(4.0)
        with pytest.raises(CircuitOpenError) as info:
            await policy.call(hang)
        assert breaker.state is BreakerState.HALF_OPEN
        assert info.value.retry_after == pytest.approx(1.0)  # it has run 4 s of 5 s
        clock.advance(1.0)
        with pytest.raises(CircuitOpenError):
            await policy.call(hang)
        assert breaker.state is BreakerState.OPEN  # hung for 5 s after it was sent
        tg.cancel_scope.cancel()


async def test_classify_states_the_kind_of_foreign_exceptions_without_touching_them() -> None:
    clock = ManualClock(autojump=True)
    breaker = CircuitBreaker("classify", failure_threshold=2, clock=clock)
    retry = RetryPolicy(max_attempts=3, jitter="none", base_delay=0.1, clock=clock)
    policy = Policy(breaker=breaker, retry=retry, clock=clock)

    class Foreign(Exception):
        pass

    class Mistake(Exception):
        pass

    table = {Foreign: FailureKind.NOT_SENT, Mistake: FailureKind.PERMANENT}

    def classify(exc: BaseException) -> FailureKind | None:
        return table.get(type(exc))

    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Foreign
        return "ok"

    # NOT_SENT by the table: retried even though the operation is not idempotent.
    assert await policy.run(flaky, classify=classify) == "ok"
    assert calls == 2

    async def mistaken() -> str:
        raise Mistake

    for _ in range(2):
        with pytest.raises(Mistake) as info:
            await policy.run(mistaken, classify=classify)
        assert not hasattr(info.value, "failure_kind")
    assert breaker.state is BreakerState.CLOSED  # PERMANENT: the caller's error, not counted
