"""The pure GCRA core, without a clock: times are plain numbers chosen by Hypothesis."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_voice import RateLimitedError
from resilient_voice.limiter import TokenBucket, _gcra
from resilient_voice.testing import ManualClock

rates = st.sampled_from([0.5, 1.0, 3.0, 10.0, 1000.0])
bursts = st.integers(1, 5)
gaps = st.lists(st.floats(0, 3), min_size=1, max_size=40)
token_counts = st.lists(st.integers(1, 5), min_size=1, max_size=40)
TOLERANCE = 1e-5  # float rounding plus the nanosecond of slack in depth()


def schedule_of(rate: float, burst: int, tokens: list[int]) -> list[tuple[float, int]]:
    """Reserve ``tokens`` back to back from time 0: the grant times of a saturated bucket."""
    interval = 1 / rate
    tau = _gcra.depth(burst, interval)
    costs = [min(t, burst) * interval for t in tokens]
    _, delays, refused = _gcra.reserve(_gcra.NEVER, 0.0, costs, [float("inf")] * len(costs), tau)
    assert refused is None
    return [(d, min(t, burst)) for d, t in zip(delays, tokens, strict=True)]


@given(rate=rates, burst=bursts, tokens=token_counts)
def test_reservations_keep_the_bound_and_the_order(
    rate: float, burst: int, tokens: list[int]
) -> None:
    grants = schedule_of(rate, burst, tokens)
    times = [t for t, _ in grants]
    assert times == sorted(times)  # first come, first served
    for i, (start, _) in enumerate(grants):
        total = 0
        for end, count in grants[i:]:
            total += count
            assert total <= burst + rate * (end - start) + TOLERANCE


@given(rate=rates, burst=bursts, tokens=token_counts)
def test_reservations_waste_nothing(rate: float, burst: int, tokens: list[int]) -> None:
    """From full, each request is granted as soon as the tokens asked so far exceed the burst."""
    cumulative = 0
    for at, count in schedule_of(rate, burst, tokens):
        cumulative += count
        assert at == pytest.approx(max(0.0, (cumulative - burst) / rate), abs=TOLERANCE)


@given(rate=rates, burst=bursts, limit=st.floats(0, 5), tokens=token_counts)
def test_reserve_stops_at_the_first_limit_it_cannot_meet(
    rate: float, burst: int, limit: float, tokens: list[int]
) -> None:
    interval = 1 / rate
    tau = _gcra.depth(burst, interval)
    costs = [min(t, burst) * interval for t in tokens]
    full, delays, refused = _gcra.reserve(_gcra.NEVER, 0.0, costs, [limit] * len(costs), tau)
    assert all(d <= limit for d in delays)
    if refused is not None:
        assert refused > limit
        assert len(delays) < len(costs)
        # Nothing was taken for the refused request or those behind it.
        assert full == pytest.approx(sum(costs[: len(delays)]) or _gcra.NEVER)


@given(rate=rates, burst=bursts, gaps=gaps, tokens=token_counts)
def test_wait_is_zero_exactly_when_the_cost_fits(
    rate: float, burst: int, gaps: list[float], tokens: list[int]
) -> None:
    interval = 1 / rate
    tau = _gcra.depth(burst, interval)
    full, now = _gcra.NEVER, 0.0
    for gap, count in zip(gaps, tokens, strict=False):
        now += gap
        cost = min(count, burst) * interval
        assert (_gcra.wait(full, cost, tau, now) == 0.0) == _gcra.fits(full, cost, tau, now)
        if _gcra.fits(full, cost, tau, now):
            full = _gcra.take(full, cost, now)
        assert 0.0 <= _gcra.available(full, now, burst, rate) <= burst


@given(rate=rates, burst=bursts, gaps=gaps, tokens=token_counts)
def test_the_inlined_fast_paths_compute_what_the_core_computes(
    rate: float, burst: int, gaps: list[float], tokens: list[int]
) -> None:
    """acquire() and try_acquire() inline fits/take for speed: both agree with the pure core."""
    clock = ManualClock()
    fast = TokenBucket(rate, burst, clock=clock)
    trying = TokenBucket(rate, burst, clock=clock)
    interval = 1 / rate
    tau = _gcra.depth(burst, interval)
    full = _gcra.NEVER

    async def scenario() -> None:
        nonlocal full
        for gap, count in zip(gaps, tokens, strict=False):
            clock.advance(gap)
            n = min(count, burst)
            now = clock.now()
            cost = n * interval
            fits = _gcra.fits(full, cost, tau, now)
            if fits:
                full = _gcra.take(full, cost, now)
            assert await trying.try_acquire(n) is fits
            if fits:
                await fast.acquire(n, timeout=0)  # granted at once, on the fast path
            else:
                with pytest.raises(RateLimitedError, match="deadline"):
                    await fast.acquire(n, timeout=0)
            assert fast._full_at == trying._full_at == full

    anyio.run(scenario)
