"""The window modes' closed fast path against the permit path it stands in for.

The same script of calls runs through two breakers of one configuration: one called through the
decorator and ``call()`` (the fast path while CLOSED), the other through ``async with`` (always a
permit). After every step both must agree on everything a caller can see: state, epoch, trips,
window totals, consecutive failures. Scripts mix successes, failures, ignored errors, 429s,
cancellations and calls that end after the breaker changed state. Every test runs on asyncio and
trio (conftest), on a ManualClock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_voice import CircuitBreaker, CircuitOpenError
from resilient_voice.breaker._health import TIME_BUCKETS, CountWindow, TimeWindow
from resilient_voice.errors import ProviderError
from resilient_voice.events import BreakerState, CallFailed, CallIgnored, CallSucceeded, Event
from resilient_voice.failure import FailureKind
from resilient_voice.testing import ManualClock

CLOSED, OPEN = BreakerState.CLOSED, BreakerState.OPEN


class UpstreamError(Exception):
    pass


class IgnoredError(Exception):
    pass


def busy() -> ProviderError:
    return ProviderError(429, None, "slow down", FailureKind.MAYBE_PROCESSED)


COUNT = {"window_size": 4, "minimum_calls": 3, "failure_rate_threshold": 0.5}
TIME = {"window_duration": 10.0, "minimum_calls": 3, "failure_rate_threshold": 0.5}
MODES = pytest.mark.parametrize("mode", [COUNT, TIME], ids=["count", "time"])


def build(mode: dict[str, Any], clock: ManualClock, **options: Any) -> CircuitBreaker:
    return CircuitBreaker(
        "w", recovery_timeout=5.0, ignore_on=IgnoredError, clock=clock, **mode, **options
    )


def snapshot(breaker: CircuitBreaker) -> tuple[object, ...]:
    stats = breaker.statistics()
    return (
        stats.state,
        breaker._machine.epoch,
        stats.trips,
        stats.calls,
        stats.failures,
        stats.consecutive_failures,
        stats.retry_after,
    )


@dataclass
class Late:
    """A call held open until told how to end."""

    outcome: str = "ok"
    release: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class Side:
    """One breaker and the way it is called: ``fast`` (decorator and call()) or permit."""

    def __init__(self, breaker: CircuitBreaker, *, fast: bool) -> None:
        self.breaker = breaker
        self.fast = fast
        self.turn = 0

    async def run(self, body: Callable[[], Awaitable[str]]) -> str:
        self.turn += 1
        if self.fast:
            if self.turn % 2:
                return await self.breaker(body)()
            return await self.breaker.call(body)
        async with self.breaker:
            return await body()

    async def once(self, outcome: str, late: Late | None = None) -> str:
        started = anyio.Event()

        async def body() -> str:
            started.set()
            if late is not None:
                await late.release.wait()
                outcome_now = late.outcome
            else:
                outcome_now = outcome
            if outcome_now == "fail":
                raise UpstreamError
            if outcome_now == "ignored":
                raise IgnoredError
            if outcome_now == "busy":
                raise busy()
            if outcome_now == "cancel":
                await anyio.sleep_forever()
            return "ok"

        scope = late.scope if late is not None else anyio.CancelScope()
        with scope:
            if outcome == "cancel" and late is None:
                scope.cancel()
            try:
                return await self.run(body)
            except CircuitOpenError:
                return "rejected"
            except (UpstreamError, IgnoredError, ProviderError):
                return "raised"
        return "cancelled"


async def play(mode: dict[str, Any], script: list[tuple[str, str]], **options: Any) -> None:
    """Run ``script`` on both sides in lockstep; compare after every step.

    Steps: ``("call", outcome)``; ``("start", outcome)`` holds a call open (it ends with that
    outcome at its ``("end", "")``, oldest first); ``("advance", seconds)``.
    """
    clocks = ManualClock(), ManualClock()
    sides = [Side(build(mode, clocks[0], **options), fast=True)]
    sides.append(Side(build(mode, clocks[1], **options), fast=False))
    held: list[list[Late]] = [[], []]
    async with anyio.create_task_group() as tg:
        for step, arg in script:
            answers = []
            for i, side in enumerate(sides):
                if step == "call":
                    if side.fast and side.breaker.state is CLOSED:
                        assert side.breaker._machine.fast == (not options)
                    answers.append(await side.once(arg))
                elif step == "start":
                    late = Late(arg)
                    held[i].append(late)
                    tg.start_soon(side.once, late.outcome, late)
                    await anyio.wait_all_tasks_blocked()
                elif step == "end":
                    if held[i]:
                        late = held[i].pop(0)
                        if late.outcome == "cancel":
                            late.scope.cancel()
                        late.release.set()
                        await anyio.wait_all_tasks_blocked()
                else:
                    clocks[i].advance(float(arg))
            assert len(set(answers)) <= 1, (step, arg, answers)
            assert snapshot(sides[0].breaker) == snapshot(sides[1].breaker), (step, arg)
        for i in range(2):
            for late in held[i]:
                late.scope.cancel()
                late.release.set()


MIXED = [
    ("call", "ok"),
    ("call", "fail"),
    ("start", "ok"),  # admitted in this CLOSED epoch; ends after the trip below
    ("start", "fail"),
    ("start", "cancel"),
    ("call", "ignored"),
    ("call", "busy"),  # a 429: the upstream is busy, not sick; never counted
    ("call", "cancel"),
    ("call", "ok"),
    ("call", "fail"),
    ("call", "fail"),  # 3 of 5 failed, minimum 3: opens
    ("end", ""),
    ("end", ""),
    ("end", ""),  # the late results count nothing
    ("call", "ok"),  # rejected
    ("advance", "5"),
    ("start", "ok"),  # a probe, held
    ("call", "ok"),  # refused: the probe slot is taken
    ("end", ""),  # the probe succeeds: CLOSED again, window cleared
    ("call", "fail"),
    ("advance", "4"),
    ("call", "ok"),
    ("advance", "7"),  # a time window forgets the calls of more than 10 s ago
    ("call", "ok"),
    ("call", "fail"),
    ("call", "fail"),
]


@MODES
async def test_a_mixed_script_leaves_the_same_window_as_permits(mode: dict[str, Any]) -> None:
    await play(mode, MIXED)


@MODES
async def test_a_success_that_reaches_minimum_calls_trips_as_on_the_permit_path(
    mode: dict[str, Any],
) -> None:
    script = [("call", "fail"), ("call", "fail"), ("call", "ok"), ("call", "ok")]
    await play(mode, script)
    clock = ManualClock()
    breaker = build(mode, clock)
    for outcome in ("fail", "fail", "ok"):
        await Side(breaker, fast=True).once(outcome)
    assert breaker.state is OPEN  # 2 of 3, on the success that made the minimum
    assert breaker.statistics().retry_after == 5.0


@MODES
async def test_late_results_across_a_reset_and_a_forced_open_count_nothing(
    mode: dict[str, Any],
) -> None:
    clock = ManualClock()
    breaker = build(mode, clock)
    side = Side(breaker, fast=True)
    await side.once("ok")  # the first call takes a permit: this loop now owns the breaker
    lates = [Late("ok"), Late("fail"), Late("ok")]
    results: list[str] = []
    async with anyio.create_task_group() as tg:
        for late in lates:

            async def hold(late: Late = late) -> None:
                results.append(await side.once(late.outcome, late))

            tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()
        assert breaker._ownership.owner.permits == 3  # each counted, as a permit would be
        breaker.reset()
        lates[0].release.set()
        await anyio.wait_all_tasks_blocked()
        breaker.force_open(1.0)
        lates[1].release.set()
        await anyio.wait_all_tasks_blocked()
        clock.advance(1.0)
        await side.once("ok")  # the probe: CLOSED again
        lates[2].release.set()
    assert sorted(results) == ["ok", "ok", "raised"]
    stats = breaker.statistics()
    assert (stats.state, stats.calls, stats.failures, stats.trips) == (CLOSED, 0, 0, 1)
    assert breaker._ownership.owner.permits == 0


@pytest.mark.parametrize(
    "mode", [{"window_size": 10}, {"window_duration": 10.0}], ids=["count", "time"]
)
async def test_a_listener_added_later_moves_calls_to_the_permit_path(
    mode: dict[str, Any],
) -> None:
    clock = ManualClock()
    breaker = build(mode, clock)
    side = Side(breaker, fast=True)
    await side.once("ok")  # the first call takes a permit: this loop now owns the breaker
    late = Late("ok")
    events: list[Event] = []
    async with anyio.create_task_group() as tg:

        async def hold() -> None:
            await side.once("ok", late)

        tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()
        await side.once("ok")
        await side.once("fail")
        assert breaker._machine.fast
        breaker.add_listener(events.append)
        assert not breaker._machine.fast
        late.release.set()  # admitted on the fast path: counted there, no event
        await anyio.wait_all_tasks_blocked()
        assert events == []
        clock.advance(0.25)
        await side.once("ok")
        await side.once("fail")
        await side.once("ignored")
    assert [type(e) for e in events] == [CallSucceeded, CallFailed, CallIgnored]
    stats = breaker.statistics()
    assert (stats.state, stats.calls, stats.failures, stats.consecutive_failures) == (
        CLOSED,
        6,
        2,
        1,
    )


@MODES
async def test_with_a_listener_or_a_slow_call_rule_the_script_takes_permits(
    mode: dict[str, Any],
) -> None:
    # Both sides take permits here; the script still runs the same on the two forms.
    await play(mode, MIXED, listeners=[lambda event: None])
    await play(mode, MIXED, slow_call_duration=100.0)


async def test_a_failure_result_predicate_keeps_the_permit_path() -> None:
    breaker = CircuitBreaker("w", window_size=4, failure_result=lambda r: r == "bad")
    assert not breaker._machine.fast


async def test_another_thread_is_refused_while_a_fast_call_runs() -> None:
    clock = ManualClock()
    breaker = build(COUNT, clock)
    late = Late("ok")
    refused: list[BaseException] = []

    def other_thread() -> None:
        async def call() -> None:
            async def ok() -> str:
                return "ok"

            try:
                await breaker.call(ok)
            except RuntimeError as error:
                refused.append(error)

        anyio.run(call)

    await Side(breaker, fast=True).once("ok")  # the first call makes this loop the owner
    async with anyio.create_task_group() as tg:

        async def hold() -> None:
            await Side(breaker, fast=True).once("ok", late)

        tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()
        thread = threading.Thread(target=other_thread)
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        late.release.set()
    assert len(refused) == 1
    assert "used from two threads or event loops" in str(refused[0])
    assert breaker.statistics().calls == 2


# --- the time window's newest-bucket span, against the window it replaced ---------------------


class PlainTimeWindow:
    """The time window as it was before it kept a span: expire, then add, on every call."""

    def __init__(self, duration: float) -> None:
        self.width = duration / TIME_BUCKETS
        self.buckets: list[list[int]] = []
        self.calls = self.failures = self.slow = 0

    def expire(self, now: float) -> None:
        oldest = math.floor(now / self.width) - TIME_BUCKETS + 1
        while self.buckets and self.buckets[0][0] < oldest:
            _, calls, failures, slow = self.buckets.pop(0)
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self.expire(now)
        number = math.floor(now / self.width)
        if not self.buckets or self.buckets[-1][0] != number:
            self.buckets.append([number, 0, 0, 0])
        bucket = self.buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow


steps = st.lists(
    st.tuples(
        st.sampled_from(["add", "expire", "clear"]),
        st.floats(-1.0, 50.0) | st.sampled_from([0.1, 0.2, 0.3, 0.7, 1.0, 3.0, 9.9, 10.0]),
        st.booleans(),
        st.booleans(),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0.3, 1.0, 7.0, 10.0, 30.0]), steps, st.booleans())
def test_the_time_window_holds_what_expiring_on_every_call_would(
    duration: float, script: list[tuple[str, float, bool, bool]], monotonic: bool
) -> None:
    window, plain = TimeWindow(duration), PlainTimeWindow(duration)
    now = 0.0
    for op, value, failed, slow in script:
        # A monotonic clock moves forward only; otherwise a clock may be set back.
        now = now + abs(value) / 7 if monotonic else value
        if op == "add":
            window.add(now, failed, slow)
            plain.add(now, failed, slow)
        elif op == "expire":
            window.expire(now)
            plain.expire(now)
        else:
            window.clear()
            plain = PlainTimeWindow(duration)
        assert window.buckets == plain.buckets
        assert (window.calls, window.failures, window.slow) == (
            plain.calls,
            plain.failures,
            plain.slow,
        )


@given(st.integers(-(10**6), 10**6), st.sampled_from([0.03, 0.1, 0.3, 1.0, 3.0, 7.0]))
def test_a_bucket_span_ends_at_the_first_time_of_the_next_bucket(number: int, width: float) -> None:
    window = TimeWindow(width * TIME_BUCKETS)
    start = number * window.width
    window.add(start, False, False)
    high = window.high
    assert math.floor(high / window.width) > math.floor(start / window.width)
    assert math.floor(math.nextafter(high, -math.inf) / window.width) == window.buckets[-1][0]


def test_a_count_window_keeps_its_totals_through_wraps() -> None:
    window = CountWindow(3)
    outcomes = [(True, False), (False, True), (True, True), (False, False), (True, False)]
    for failed, slow in outcomes:
        window.add(0.0, failed, slow)
    last = outcomes[-3:]
    assert window.calls == 3
    assert window.failures == sum(f for f, _ in last)
    assert window.slow == sum(s for _, s in last)
