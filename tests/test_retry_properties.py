"""Properties of RetryPolicy that must hold for every configuration and failure sequence."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import anyio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_voice.errors import OutcomeUnknownError
from resilient_voice.events import Event, RetryScheduled
from resilient_voice.failure import FailureKind
from resilient_voice.http._retry_after import parse_retry_after, parse_retry_after_ms
from resilient_voice.retry import RetryPolicy
from resilient_voice.testing import ManualClock

# Async property tests request the backend fixture themselves so that both backends run them.

KINDS = [*FailureKind, None]
SAFE = (FailureKind.NOT_SENT, FailureKind.UNPROCESSED)


class Failure(Exception):
    def __init__(self, kind: FailureKind | None, retry_after: float | None) -> None:
        super().__init__(repr(kind))
        if kind is not None:
            self.failure_kind = kind
        self.retry_after = retry_after


class Delays:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, RetryScheduled):
            self.delays.append(event.delay)


delays = st.floats(min_value=0.0, max_value=30.0, allow_nan=False)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    max_delay = draw(st.floats(min_value=0.0, max_value=20.0))
    base_delay = draw(st.floats(min_value=0.0, max_value=max_delay))
    return {
        "base_delay": base_delay,
        "max_delay": max_delay,
        "jitter": draw(st.sampled_from(["full", "equal", "none"])),
        "max_attempts": draw(st.integers(min_value=1, max_value=8)),
    }


@settings(max_examples=300, deadline=None)
@given(config=configs(), retry=st.integers(min_value=1, max_value=5000), draw=draws)
def test_backoff_stays_within_its_bounds(config: dict[str, Any], retry: int, draw: float) -> None:
    policy = RetryPolicy(random=lambda: draw, **config)
    cap = min(config["max_delay"], config["base_delay"] * 2.0 ** min(retry - 1, 1000))
    low = {"full": 0.0, "equal": cap / 2, "none": cap}[config["jitter"]]
    delay = policy.backoff(retry)
    assert low - 1e-9 <= delay <= cap + 1e-9
    assert delay <= config["max_delay"]


@settings(max_examples=60, deadline=None)
@given(
    config=configs(),
    seed=st.integers(0, 2**32 - 1),
    retry_after=st.lists(st.one_of(st.none(), delays), min_size=1, max_size=8),
)
async def test_observed_waits_are_bounded_and_honour_retry_after(
    config: dict[str, Any], seed: int, retry_after: list[float | None]
) -> None:
    clock = ManualClock(autojump=True)
    listener = Delays()
    policy = RetryPolicy(clock=clock, random=random.Random(seed), listeners=[listener], **config)
    errors = [Failure(FailureKind.UNPROCESSED, after) for after in retry_after]
    asked: list[float | None] = []

    async def attempt() -> str:
        await anyio.lowlevel.checkpoint()
        if errors:
            error = errors.pop(0)
            asked.append(error.retry_after)
            raise error
        return "ok"

    with contextlib.suppress(Failure):
        await policy.run(attempt, idempotent=False)
    for number, delay in enumerate(listener.delays, start=1):
        cap = min(config["max_delay"], config["base_delay"] * 2.0 ** (number - 1))
        after = asked[number - 1]
        assert delay <= config["max_delay"] + 1e-9
        assert delay <= max(cap, after or 0.0) + 1e-9
        if after is not None:
            assert delay >= after
    assert math.isclose(clock.now(), sum(listener.delays), abs_tol=1e-6)


@st.composite
def steps(draw: st.DrawFn) -> tuple[float, FailureKind | None, float | None]:
    duration = draw(st.floats(min_value=0.0, max_value=10.0))
    kind = draw(st.sampled_from(KINDS))
    retry_after = draw(st.one_of(st.none(), st.floats(min_value=0.0, max_value=15.0)))
    return duration, kind, retry_after


@settings(max_examples=80, deadline=None)
@given(
    config=configs(),
    total_timeout=st.floats(min_value=0.01, max_value=30.0),
    deadline=st.one_of(st.none(), st.floats(min_value=0.0, max_value=40.0)),
    script=st.lists(steps(), min_size=1, max_size=8),
    idempotent=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
async def test_total_timeout_is_never_overrun_and_no_unsafe_resend(
    config: dict[str, Any],
    total_timeout: float,
    deadline: float | None,
    script: list[tuple[float, FailureKind | None, float | None]],
    idempotent: bool,
    seed: int,
) -> None:
    clock = ManualClock(100.0, autojump=True)
    policy = RetryPolicy(
        clock=clock, random=random.Random(seed), total_timeout=total_timeout, **config
    )
    start = clock.now()
    stop = start + total_timeout
    absolute = None if deadline is None else start + deadline
    if absolute is not None:
        stop = min(stop, absolute)
    pending = list(script)
    started: list[float] = []
    failed: list[FailureKind | None] = []

    async def attempt() -> str:
        started.append(clock.now())
        if not pending:
            await anyio.lowlevel.checkpoint()
            return "ok"
        duration, kind, retry_after = pending.pop(0)
        await clock.sleep(duration)
        failed.append(kind)
        raise Failure(kind, retry_after)

    with contextlib.suppress(Failure, OutcomeUnknownError, TimeoutError):
        await policy.run(attempt, idempotent=idempotent, deadline=absolute)
    assert clock.now() <= stop + 1e-9
    assert all(t < stop for t in started)
    assert len(started) <= config["max_attempts"]
    if not idempotent:
        # Every attempt after the first follows a failure that certainly was not processed.
        assert all(kind in SAFE for kind in failed[: len(started) - 1])


@settings(max_examples=80, deadline=None)
@given(
    script=st.lists(st.sampled_from(KINDS), min_size=1, max_size=6), max_attempts=st.integers(1, 6)
)
async def test_non_idempotent_operation_is_never_resent_after_maybe_processed(
    script: list[FailureKind | None], max_attempts: int
) -> None:
    clock = ManualClock(autojump=True)
    policy = RetryPolicy(clock=clock, max_attempts=max_attempts, jitter="none", base_delay=0.01)
    pending = list(script)
    seen: list[FailureKind | None] = []

    async def attempt() -> str:
        await anyio.lowlevel.checkpoint()
        if not pending:
            return "ok"
        kind = pending.pop(0)
        seen.append(kind)
        raise Failure(kind, None)

    raised: Exception | None = None
    try:
        await policy.run(attempt, idempotent=False)
    except (OutcomeUnknownError, Failure) as error:
        raised = error
    if isinstance(raised, OutcomeUnknownError):
        assert seen[-1] in (FailureKind.MAYBE_PROCESSED, None)
        assert isinstance(raised.__cause__, Failure)
    elif raised is not None:
        assert seen[-1] not in (FailureKind.MAYBE_PROCESSED, None)
    else:
        assert all(kind in SAFE for kind in seen)
    for earlier in seen[:-1]:
        assert earlier in SAFE


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=80), now=st.floats(min_value=0.0, max_value=4e9))
def test_retry_after_parsers_never_raise_and_never_go_negative(value: str, now: float) -> None:
    for parsed in (parse_retry_after(value, now_wall=now), parse_retry_after_ms(value)):
        assert parsed is None or (math.isfinite(parsed) and parsed >= 0.0)
