from __future__ import annotations

import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from resilient_voice.errors import (
    CircuitOpenError,
    OutcomeUnknownError,
    ProviderError,
    RateLimitedError,
)
from resilient_voice.events import (
    Event,
    RetryAttemptStarted,
    RetryGaveUp,
    RetryOutcomeUnknown,
    RetryScheduled,
)
from resilient_voice.failure import FailureKind
from resilient_voice.http._retry_after import parse_retry_after, parse_retry_after_ms
from resilient_voice.retry import (
    AttemptInfo,
    RetryBudget,
    RetryPolicy,
    current_attempt,
    default_retry_on,
)
from resilient_voice.testing import ManualClock

NOT_SENT = FailureKind.NOT_SENT
UNPROCESSED = FailureKind.UNPROCESSED
MAYBE = FailureKind.MAYBE_PROCESSED
PERMANENT = FailureKind.PERMANENT


class Failure(Exception):
    """An exception that classifies itself, as adapters' exceptions do."""

    def __init__(self, kind: FailureKind | None, retry_after: float | None = None) -> None:
        super().__init__(f"{kind!r} retry_after={retry_after}")
        if kind is not None:
            self.failure_kind = kind
        self.retry_after = retry_after


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def __call__(self, event: Event) -> None:
        match event:
            case RetryAttemptStarted(source, attempt, attempt_id):
                self.events.append(("attempt", source, attempt, attempt_id))
            case RetryScheduled(source, attempt, delay, kind, error):
                self.events.append(("retry", source, attempt, delay, kind, error))
            case RetryGaveUp(source, attempt, kind, error):
                self.events.append(("give_up", source, attempt, kind, error))
            case RetryOutcomeUnknown(source, attempt_id, error):
                self.events.append(("unknown", source, attempt_id, error))


class Script:
    """An attempt callable that raises the scripted errors in turn, then returns "ok"."""

    def __init__(self, *errors: Exception, clock: ManualClock | None = None) -> None:
        self.errors = list(errors)
        self.seen: list[AttemptInfo | None] = []
        self.times: list[float] = []
        self.clock = clock

    @property
    def calls(self) -> int:
        return len(self.seen)

    async def __call__(self) -> str:
        self.seen.append(current_attempt())
        if self.clock is not None:
            self.times.append(self.clock.now())
        await anyio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


# Parametrized async tests request the backend fixture themselves: the anyio plugin otherwise
# re-creates them per backend after collection and drops their parameters.


def policy(clock: ManualClock, **kwargs: Any) -> RetryPolicy:
    options: dict[str, Any] = {"base_delay": 0.1, "max_delay": 5.0, "jitter": "none"}
    options.update(kwargs)
    return RetryPolicy(clock=clock, **options)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": -3}, ValueError),
        ({"max_attempts": 2.0}, TypeError),
        ({"max_attempts": True}, TypeError),
        ({"base_delay": -0.1}, ValueError),
        ({"max_delay": -1.0}, ValueError),
        ({"max_delay": float("inf")}, ValueError),
        ({"base_delay": float("nan")}, ValueError),
        ({"base_delay": "1"}, TypeError),
        ({"base_delay": 2.0, "max_delay": 1.0}, ValueError),
        ({"total_timeout": 0}, ValueError),
        ({"total_timeout": -5.0}, ValueError),
        ({"total_timeout": float("inf")}, ValueError),
        ({"jitter": "decorrelated"}, ValueError),
        ({"retry_on": 42}, TypeError),
        ({"respect_retry_after": 1}, TypeError),
        ({"budget": 0.2}, TypeError),
        ({"clock": object()}, TypeError),
        ({"random": 3}, TypeError),
        ({"name": ""}, ValueError),
        ({"listeners": [object()]}, TypeError),
    ],
)
def test_bad_configuration_is_rejected_at_construction(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ratio": -0.1}, ValueError),
        ({"min_retries_per_second": float("nan")}, ValueError),
        ({"window": 0}, ValueError),
        ({"ratio": "0.2"}, TypeError),
        ({"clock": "now"}, TypeError),
    ],
)
def test_bad_budget_is_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryBudget(**kwargs)


def test_defaults_and_repr() -> None:
    retry = RetryPolicy()
    assert retry.max_attempts == 3
    assert retry.total_timeout is None
    assert retry.name == "retry"
    assert "max_attempts=3" in repr(retry)
    assert "jitter='full'" in repr(retry)


# The classification table. The one rule that must never break: a non-idempotent operation is
# never re-sent after a failure that may have been processed (or that nobody classified).
@pytest.mark.parametrize("idempotent", [False, True], ids=["non-idempotent", "idempotent"])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (NOT_SENT, {False: "retried", True: "retried"}),
        (UNPROCESSED, {False: "retried", True: "retried"}),
        (MAYBE, {False: "unknown", True: "retried"}),
        (None, {False: "unknown", True: "retried"}),
        (PERMANENT, {False: "raised", True: "raised"}),
    ],
    ids=["NOT_SENT", "UNPROCESSED", "MAYBE_PROCESSED", "unclassified", "PERMANENT"],
)
async def test_classification_table(
    kind: FailureKind | None, expected: dict[bool, str], idempotent: bool
) -> None:
    clock = ManualClock(autojump=True)
    error = Failure(kind)
    attempt = Script(error)
    retry = policy(clock)
    raised: BaseException | None = None
    try:
        result = await retry.run(attempt, idempotent=idempotent)
    except (OutcomeUnknownError, Failure) as exc:
        raised = exc
    if isinstance(raised, OutcomeUnknownError):
        outcome = "unknown"
        assert raised.__cause__ is error
    elif raised is not None:
        outcome = "raised"
        assert raised is error
    else:
        outcome = "retried"
        assert result == "ok"
    if not idempotent and kind in (MAYBE, None):
        assert attempt.calls == 1, "a possibly processed non-idempotent operation was re-sent"
    assert outcome == expected[idempotent]
    assert attempt.calls == (2 if outcome == "retried" else 1)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_of_a_create_call_is_outcome_unknown(status: int) -> None:
    clock = ManualClock(autojump=True)
    error = ProviderError(status, 20500, "internal error", MAYBE)
    attempt = Script(error)
    with pytest.raises(OutcomeUnknownError) as info:
        await policy(clock).run(attempt, idempotent=False, attempt_id="op-1")
    assert info.value.__cause__ is error
    assert info.value.attempt_id == "op-1"
    assert info.value.attempts == 1
    assert attempt.calls == 1


def test_default_retry_on_is_the_table() -> None:
    error = Exception()
    assert default_retry_on(error, NOT_SENT, False)
    assert default_retry_on(error, UNPROCESSED, False)
    assert not default_retry_on(error, MAYBE, False)
    assert default_retry_on(error, MAYBE, True)
    assert not default_retry_on(error, PERMANENT, True)


async def test_success_on_first_attempt_does_not_touch_the_clock() -> None:
    clock = ManualClock()
    attempt = Script()
    assert await policy(clock).run(attempt, idempotent=False) == "ok"
    assert clock.now() == 0.0
    assert attempt.calls == 1


async def test_attempt_id_is_stable_and_numbers_grow_then_real_error_is_reraised() -> None:
    clock = ManualClock(autojump=True)
    errors = [Failure(NOT_SENT), Failure(UNPROCESSED), Failure(NOT_SENT)]
    attempt = Script(*errors)
    with pytest.raises(Failure) as info:
        await policy(clock, max_attempts=3).run(attempt, idempotent=False)
    assert info.value is errors[-1]
    infos = [seen for seen in attempt.seen if seen is not None]
    assert [i.number for i in infos] == [1, 2, 3]
    assert len({i.attempt_id for i in infos}) == 1
    attempt_id = infos[0].attempt_id
    assert len(attempt_id) == 32
    notes = info.value.__notes__
    assert len(notes) == 1
    assert "3 attempt(s)" in notes[0]
    assert attempt_id in notes[0]
    assert "no attempt left" in notes[0]
    assert current_attempt() is None


async def test_outcome_unknown_after_retries_keeps_the_callers_attempt_id() -> None:
    clock = ManualClock(autojump=True)
    maybe = Failure(MAYBE)
    attempt = Script(Failure(NOT_SENT), maybe)
    recorder = Recorder()
    retry = policy(clock, listeners=[recorder])
    with pytest.raises(OutcomeUnknownError) as info:
        await retry.run(attempt, idempotent=False, attempt_id="call-42")
    assert info.value.attempt_id == "call-42"
    assert info.value.attempts == 2
    assert info.value.__cause__ is maybe
    assert [s.attempt_id for s in attempt.seen if s] == ["call-42", "call-42"]
    assert recorder.events[-1] == ("unknown", "retry", "call-42", maybe)


async def test_invalid_attempt_id_is_rejected() -> None:
    attempt = Script()
    with pytest.raises(ValueError, match="attempt_id"):
        await RetryPolicy().run(attempt, idempotent=False, attempt_id="bad id\r\n")
    assert attempt.calls == 0


async def test_backoff_is_exponential_and_capped() -> None:
    clock = ManualClock(autojump=True)
    attempt = Script(*[Failure(NOT_SENT) for _ in range(5)], clock=clock)
    retry = policy(clock, max_attempts=6, base_delay=1.0, max_delay=5.0)
    assert await retry.run(attempt, idempotent=False) == "ok"
    assert attempt.times == [0.0, 1.0, 3.0, 7.0, 12.0, 17.0]


@pytest.mark.parametrize(
    ("jitter", "draw", "expected"),
    [("full", 0.25, [0.5, 1.0, 2.0]), ("equal", 0.5, [1.5, 3.0, 6.0]), ("none", 0.9, [2, 4, 8])],
)
def test_jitter_modes(jitter: Any, draw: float, expected: list[float]) -> None:
    retry = RetryPolicy(base_delay=2.0, max_delay=100.0, jitter=jitter, random=lambda: draw)
    assert [retry.backoff(n) for n in (1, 2, 3)] == expected


def test_random_may_be_a_random_instance() -> None:
    first = RetryPolicy(random=random.Random(7))
    second = RetryPolicy(random=random.Random(7))
    assert [first.backoff(3) for _ in range(5)] == [second.backoff(3) for _ in range(5)]


def test_backoff_of_a_huge_attempt_number_does_not_overflow() -> None:
    retry = RetryPolicy(max_attempts=10**9, jitter="none")
    assert retry.backoff(10**8) == 10.0


async def test_retry_after_is_honoured() -> None:
    clock = ManualClock(autojump=True)
    attempt = Script(Failure(UNPROCESSED, retry_after=2.5), clock=clock)
    assert await policy(clock).run(attempt, idempotent=False) == "ok"
    assert attempt.times == [0.0, 2.5]


async def test_retry_after_shorter_than_backoff_keeps_the_backoff() -> None:
    clock = ManualClock(autojump=True)
    attempt = Script(Failure(UNPROCESSED, retry_after=0.5), clock=clock)
    assert await policy(clock, base_delay=2.0).run(attempt, idempotent=False) == "ok"
    assert attempt.times == [0.0, 2.0]


async def test_retry_after_can_be_ignored() -> None:
    clock = ManualClock(autojump=True)
    attempt = Script(Failure(UNPROCESSED, retry_after=4.0), clock=clock)
    retry = policy(clock, respect_retry_after=False)
    assert await retry.run(attempt, idempotent=False) == "ok"
    assert attempt.times == [0.0, 0.1]


async def test_retry_after_beyond_max_delay_gives_up_at_once() -> None:
    clock = ManualClock(autojump=True)
    error = Failure(UNPROCESSED, retry_after=30.0)
    attempt = Script(error)
    recorder = Recorder()
    with pytest.raises(Failure) as info:
        await policy(clock, max_delay=10.0, listeners=[recorder]).run(attempt, idempotent=True)
    assert info.value is error
    assert attempt.calls == 1
    assert clock.now() == 0.0
    assert "retry_after 30.000s exceeds max_delay 10.000s" in info.value.__notes__[0]
    assert recorder.events[-1] == ("give_up", "retry", 1, UNPROCESSED, error)


async def test_retry_after_beyond_the_time_left_gives_up_at_once() -> None:
    clock = ManualClock(autojump=True)
    error = Failure(UNPROCESSED, retry_after=4.0)
    attempt = Script(error)
    with pytest.raises(Failure) as info:
        await policy(clock, total_timeout=3.0).run(attempt, idempotent=True)
    assert attempt.calls == 1
    assert clock.now() == 0.0
    assert "exceeds the 3.000s left" in info.value.__notes__[0]


async def test_backoff_that_would_overrun_the_total_timeout_gives_up() -> None:
    clock = ManualClock(autojump=True)
    attempt = Script(Failure(NOT_SENT), Failure(NOT_SENT), clock=clock)
    retry = policy(clock, base_delay=2.0, max_attempts=5, total_timeout=5.0)
    with pytest.raises(Failure) as info:
        await retry.run(attempt, idempotent=True)
    # Waits of 2 then 4 seconds: the second would end at 6 > 5.
    assert attempt.times == [0.0, 2.0]
    assert clock.now() == 2.0
    assert "next wait 4.000s exceeds the 3.000s left" in info.value.__notes__[0]


async def test_open_breaker_is_retried_when_it_reopens_in_time() -> None:
    clock = ManualClock(autojump=True)
    attempt = Script(CircuitOpenError("twilio", 1.5), clock=clock)
    assert await policy(clock, respect_retry_after=False).run(attempt, idempotent=False) == "ok"
    assert attempt.times == [0.0, 1.5]


@pytest.mark.parametrize(
    "error",
    [CircuitOpenError("twilio", 60.0), RateLimitedError("cps", None), RateLimitedError("cps", 9)],
    ids=["beyond-max-delay", "unknown-retry-after", "beyond-time-left"],
)
async def test_local_rejections_that_cannot_fit_are_raised(error: Exception) -> None:
    clock = ManualClock(autojump=True)
    attempt = Script(error)
    with pytest.raises(type(error)) as info:
        await policy(clock, max_delay=30.0, total_timeout=8.0).run(attempt, idempotent=False)
    assert info.value is error
    assert attempt.calls == 1
    assert clock.now() == 0.0


async def test_total_timeout_cuts_a_running_attempt() -> None:
    clock = ManualClock(autojump=True)

    async def hang() -> None:
        await clock.sleep(100.0)

    with pytest.raises(OutcomeUnknownError) as info:
        await policy(clock, total_timeout=5.0).run(hang, idempotent=False, attempt_id="a1")
    assert clock.now() == 5.0
    assert isinstance(info.value.__cause__, TimeoutError)
    assert info.value.attempt_id == "a1"

    start = clock.now()
    with pytest.raises(TimeoutError, match="ran out of time after 1 attempt"):
        await policy(clock, total_timeout=5.0).run(hang, idempotent=True)
    assert clock.now() == start + 5.0


async def test_deadline_and_total_timeout_the_earlier_wins() -> None:
    clock = ManualClock(autojump=True)

    async def hang() -> None:
        await clock.sleep(100.0)

    retry = policy(clock, total_timeout=5.0)
    with pytest.raises(TimeoutError):
        await retry.run(hang, idempotent=True, deadline=2.0)
    assert clock.now() == 2.0
    with pytest.raises(TimeoutError):
        await retry.run(hang, idempotent=True, deadline=50.0)
    assert clock.now() == 7.0


async def test_a_deadline_already_past_sends_nothing() -> None:
    clock = ManualClock(10.0)
    attempt = Script()
    recorder = Recorder()
    with pytest.raises(TimeoutError, match="after 0 attempt"):
        await policy(clock, listeners=[recorder]).run(attempt, idempotent=False, deadline=9.0)
    assert attempt.calls == 0
    assert recorder.events[0][:4] == ("give_up", "retry", 0, None)


async def test_time_running_out_during_a_wait_reraises_the_last_error() -> None:
    class LateClock(ManualClock):
        """Oversleeps, as a real clock under load can."""

        async def sleep(self, seconds: float) -> None:
            await super().sleep(seconds + 10.0)

    clock = LateClock(autojump=True)
    error = Failure(NOT_SENT)
    attempt = Script(error)
    with pytest.raises(Failure) as info:
        await policy(clock, total_timeout=5.0).run(attempt, idempotent=False)
    assert info.value is error
    assert attempt.calls == 1
    assert "out of time" in info.value.__notes__[-1]


async def test_budget_exhaustion_stops_retrying_until_the_window_moves() -> None:
    clock = ManualClock(autojump=True)
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.2, window=10.0, clock=clock)
    retry = policy(clock, max_attempts=5, budget=budget)
    first = Script(*[Failure(NOT_SENT) for _ in range(5)])
    with pytest.raises(Failure) as info:
        await retry.run(first, idempotent=False)
    assert first.calls == 3  # the floor allows 0.2/s * 10 s = 2 retries
    assert "retry budget exhausted" in info.value.__notes__[0]
    second = Script(Failure(NOT_SENT))
    with pytest.raises(Failure):
        await retry.run(second, idempotent=False)
    assert second.calls == 1
    assert budget.statistics().available == 0
    clock.advance(10.0)
    third = Script(Failure(NOT_SENT))
    assert await retry.run(third, idempotent=False) == "ok"
    assert third.calls == 2


def test_budget_ratio_counts_operations_in_the_window() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0, window=10.0, clock=clock)
    assert not budget.try_withdraw()
    for _ in range(10):
        budget.deposit()
    assert budget.statistics().available == 2
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    stats = budget.statistics()
    assert (stats.requests, stats.retries, stats.available) == (10, 2, 0)
    clock.advance(5.0)
    for _ in range(10):
        budget.deposit()
    assert budget.statistics().available == 2
    clock.advance(5.5)  # the first ten deposits and both withdrawals leave the window
    assert budget.statistics() == type(stats)(requests=10, retries=0, available=2)
    clock.advance(1000.0)
    assert budget.statistics().requests == 0
    assert "ratio=0.2" in repr(budget)


async def test_cancellation_during_the_backoff_sleep_propagates_at_once() -> None:
    clock = ManualClock()
    attempt = Script(Failure(NOT_SENT), Failure(NOT_SENT))
    recorder = Recorder()
    retry = policy(clock, base_delay=1.0, listeners=[recorder])
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                await retry.run(attempt, idempotent=True)
                pytest.fail("run() returned after cancellation")

            group.start_soon(run)
            while clock.pending == 0:
                await anyio.lowlevel.checkpoint()
            assert attempt.calls == 1
            scope.cancel()
    assert scope.cancelled_caught
    clock.advance(100.0)
    assert attempt.calls == 1
    assert [event[0] for event in recorder.events] == ["attempt", "retry"]


async def test_cancellation_inside_an_attempt_is_not_retried() -> None:
    clock = ManualClock(autojump=True)
    calls = 0
    recorder = Recorder()

    with anyio.CancelScope() as scope:

        async def attempt() -> None:
            nonlocal calls
            calls += 1
            scope.cancel()
            await anyio.lowlevel.checkpoint()

        await policy(clock, listeners=[recorder]).run(attempt, idempotent=True)
    assert scope.cancelled_caught
    assert calls == 1
    assert [event[0] for event in recorder.events] == ["attempt"]


class Interrupt(BaseException):
    pass


async def test_base_exceptions_propagate_untouched() -> None:
    clock = ManualClock(autojump=True)
    attempt = Script()

    async def interrupted() -> None:
        await attempt()
        raise Interrupt

    with pytest.raises(Interrupt) as info:
        await policy(clock).run(interrupted, idempotent=True)
    assert attempt.calls == 1
    assert not getattr(info.value, "__notes__", None)


async def test_retry_on_can_narrow_and_sees_the_effective_kind() -> None:
    clock = ManualClock(autojump=True)
    seen: list[tuple[Exception, FailureKind, bool]] = []

    def only_rate_limits(error: Exception, kind: FailureKind, idempotent: bool) -> bool:
        seen.append((error, kind, idempotent))
        return kind is UNPROCESSED

    retry = policy(clock, retry_on=only_rate_limits)
    error = Failure(NOT_SENT)
    attempt = Script(error)
    with pytest.raises(Failure) as info:
        await retry.run(attempt, idempotent=True)
    assert attempt.calls == 1
    assert not getattr(info.value, "__notes__", None)
    unclassified = Failure(None)
    with pytest.raises(Failure):
        await retry.run(Script(unclassified), idempotent=True)
    assert seen == [(error, NOT_SENT, True), (unclassified, MAYBE, True)]


async def test_widening_retry_on_resends_and_still_reports_unknown_outcome() -> None:
    clock = ManualClock(autojump=True)
    retry = policy(clock, retry_on=lambda error, kind, idempotent: True, max_attempts=2)
    last = Failure(PERMANENT)
    attempt = Script(Failure(MAYBE), last)
    with pytest.raises(OutcomeUnknownError) as info:
        await retry.run(attempt, idempotent=False)
    # The user asked for the duplicate; the first attempt may still have been processed.
    assert attempt.calls == 2
    assert info.value.__cause__ is last
    assert info.value.attempts == 2


async def test_listeners_see_every_step() -> None:
    clock = ManualClock(autojump=True)
    recorder = Recorder()
    errors = [Failure(NOT_SENT), Failure(UNPROCESSED)]
    retry = policy(clock, max_attempts=2, name="twilio")
    retry.add_listener(recorder)
    with pytest.raises(Failure):
        await retry.run(Script(*errors), idempotent=False, attempt_id="op")
    assert recorder.events == [
        ("attempt", "twilio", 1, "op"),
        ("retry", "twilio", 1, 0.1, NOT_SENT, errors[0]),
        ("attempt", "twilio", 2, "op"),
        ("give_up", "twilio", 2, UNPROCESSED, errors[1]),
    ]
    with pytest.raises(TypeError):
        retry.add_listener(object())  # type: ignore[arg-type]


async def test_nothing_is_emitted_without_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    from resilient_voice.retry import _policy

    def forbidden(*args: object) -> None:
        raise AssertionError("an event was built or dispatched with no listener")

    for name in (
        "dispatch",
        "RetryAttemptStarted",
        "RetryScheduled",
        "RetryGaveUp",
        "RetryOutcomeUnknown",
    ):
        monkeypatch.setattr(_policy, name, forbidden)
    clock = ManualClock(autojump=True)
    with pytest.raises(OutcomeUnknownError):
        await policy(clock).run(Script(Failure(NOT_SENT), Failure(MAYBE)), idempotent=False)
    with pytest.raises(Failure):
        await policy(clock, max_attempts=1).run(Script(Failure(NOT_SENT)), idempotent=False)


async def test_decorator_is_non_idempotent_and_keeps_the_signature() -> None:
    clock = ManualClock(autojump=True)
    retry = policy(clock)
    attempt = Script(Failure(NOT_SENT), Failure(MAYBE))
    received: list[tuple[str, int]] = []

    @retry
    async def create_call(to: str, *, timeout: int) -> str:
        """Place a call."""
        received.append((to, timeout))
        return await attempt()

    assert create_call.__name__ == "create_call"
    assert create_call.__doc__ == "Place a call."
    with pytest.raises(OutcomeUnknownError):
        await create_call("+15550100", timeout=3)
    assert received == [("+15550100", 3)] * 2


async def test_wrap_idempotent_and_call() -> None:
    clock = ManualClock(autojump=True)
    retry = policy(clock)
    attempt = Script(Failure(MAYBE))

    async def fetch(sid: str) -> str:
        return sid + await attempt()

    fetch_retrying = retry.wrap(fetch, idempotent=True)
    assert await fetch_retrying("CA1-") == "CA1-ok"
    assert attempt.calls == 2

    attempt = Script(Failure(NOT_SENT))
    assert await retry.call(fetch, "CA2-") == "CA2-ok"
    assert attempt.calls == 2
    attempt = Script(Failure(MAYBE))
    with pytest.raises(OutcomeUnknownError):
        await retry.call(fetch, "CA3-")
    assert attempt.calls == 1


def test_wrap_rejects_sync_functions() -> None:
    def sync() -> None:
        return None

    async def agen() -> Any:
        yield 1

    retry = RetryPolicy()
    with pytest.raises(TypeError):
        retry(sync)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        retry.wrap(agen)
    with pytest.raises(TypeError):
        retry.wrap(42)  # type: ignore[arg-type]

    async def fine() -> None:
        return None

    with pytest.raises(TypeError):
        retry.wrap(fine, idempotent=1)  # type: ignore[arg-type]


async def test_current_attempt_is_none_outside_and_restored_when_nested() -> None:
    clock = ManualClock(autojump=True)
    outer = policy(clock)
    inner = policy(clock)
    seen: list[AttemptInfo | None] = []

    async def inner_attempt() -> None:
        seen.append(current_attempt())

    async def outer_attempt() -> None:
        seen.append(current_attempt())
        await inner.run(inner_attempt, idempotent=True, attempt_id="inner")
        seen.append(current_attempt())

    await outer.run(outer_attempt, idempotent=True, attempt_id="outer")
    assert seen == [
        AttemptInfo("outer", 1),
        AttemptInfo("inner", 1),
        AttemptInfo("outer", 1),
    ]
    assert current_attempt() is None


NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("  3 ", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Sun, 06 Nov 1994 08:50:37 GMT", 60.0),
        ("Sunday, 06-Nov-94 08:49:47 GMT", 10.0),
        ("Sun Nov  6 08:49:57 1994", 20.0),
        ("Sun, 06 Nov 1994 08:40:00 GMT", 0.0),
        (None, None),
        ("", None),
        ("-1", None),
        ("+5", None),
        ("nan", None),
        ("inf", None),
        ("1e3", None),
        ("1_000", None),
        ("1.", None),
        (".5", None),
        ("\u0663", None),
        ("soon", None),
        ("Mon, 99 Foo 1994 08:49:37 GMT", None),
        ("9" * 10_000, None),
        ("Sun, 06 Nov 99999 08:49:37 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now_wall=NOW) == expected


def test_parse_retry_after_reads_the_wall_clock_by_default() -> None:
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT") == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1500", 1.5), ("0", 0.0), (" 250.5 ", 0.2505), ("-1", None), ("abc", None), (None, None)],
)
def test_parse_retry_after_ms(value: str | None, expected: float | None) -> None:
    assert parse_retry_after_ms(value) == expected
