"""The fleet view of a shared breaker: the pure rules (property-tested, no clock) and the Redis
store with several replicas in one process (one ``RedisBackend`` each: a replica is a backend
with its own id), on real Redis and real time. Tolerances are stated next to each assertion;
the multi-process tests are in tests/test_breaker_fleet_processes.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix
from resilient_voice import CircuitBreaker, CircuitOpenError
from resilient_voice.breaker._fleet import (
    TALLY_TICKS,
    FleetTally,
    ReplicaSummary,
    fleet_verdict,
    held_open,
)
from resilient_voice.events import BreakerState, Event, FleetStateChanged
from resilient_voice.redis import RedisBackend

pytestmark = COREDIS_CANCEL_LEAK
__all__ = ["collect_coredis_garbage"]

# --- the rules, without a clock -----------------------------------------------------------

summaries = st.lists(
    st.builds(
        ReplicaSummary,
        replica=st.uuids().map(str),
        open=st.booleans(),
        fleet_opened=st.booleans(),
        calls=st.integers(0, 1000),
        failures=st.integers(0, 1000),
    ).filter(lambda s: s.failures <= s.calls),
    max_size=8,
)
quorums = st.none() | st.floats(0.0, 0.99)
rates = st.floats(0.01, 1.0)


@given(summaries, quorums, rates, st.integers(1, 100))
def test_a_replica_without_failures_opens_only_on_quorum(
    fleet: list[ReplicaSummary], quorum: float | None, threshold: float, minimum: int
) -> None:
    verdict = fleet_verdict(fleet, 0, quorum=quorum, threshold=threshold, minimum_calls=minimum)
    voters = sum(1 for s in fleet if s.open and not s.fleet_opened)
    assert verdict == (quorum is not None and bool(fleet) and voters > quorum * len(fleet))


@given(summaries, rates, st.integers(1, 100))
def test_one_open_replica_of_two_or_three_opens_nobody_by_quorum(
    fleet: list[ReplicaSummary], threshold: float, minimum: int
) -> None:
    fleet = fleet[:3]
    if sum(1 for s in fleet if s.open and not s.fleet_opened) <= 1 and len(fleet) >= 2:
        assert not fleet_verdict(fleet, 0, quorum=0.5, threshold=threshold, minimum_calls=minimum)


@given(summaries, rates, st.integers(1, 100), st.integers(1, 50))
def test_the_combined_rate_opens_a_replica_that_fails_too(
    fleet: list[ReplicaSummary], threshold: float, minimum: int, own: int
) -> None:
    calls = sum(s.calls for s in fleet)
    failures = sum(s.failures for s in fleet)
    rate_holds = calls >= minimum and failures >= threshold * calls
    verdict = fleet_verdict(fleet, own, quorum=None, threshold=threshold, minimum_calls=minimum)
    assert verdict == (bool(fleet) and rate_holds)


@given(summaries, quorums, rates, st.integers(1, 100))
def test_followers_never_vote_and_never_hold_each_other(
    fleet: list[ReplicaSummary], quorum: float | None, threshold: float, minimum: int
) -> None:
    followers = [
        ReplicaSummary(s.replica, True, True, s.calls, s.failures) for s in fleet if s.open
    ]
    assert not fleet_verdict(
        followers, 0, quorum=quorum, threshold=threshold, minimum_calls=minimum
    )
    assert all(not held_open(followers, s.replica) for s in followers)


@given(summaries, st.integers(0, 50), quorums, rates, st.integers(1, 100))
def test_more_failures_elsewhere_never_closes(
    fleet: list[ReplicaSummary], own: int, quorum: float | None, threshold: float, minimum: int
) -> None:
    """Monotone: turning one success anywhere into a failure never turns "open" into "closed"."""
    before = fleet_verdict(fleet, own, quorum=quorum, threshold=threshold, minimum_calls=minimum)
    worse = [
        ReplicaSummary(s.replica, s.open, s.fleet_opened, s.calls, min(s.calls, s.failures + 1))
        for s in fleet
    ]
    after = fleet_verdict(worse, own, quorum=quorum, threshold=threshold, minimum_calls=minimum)
    assert after or not before


# --- replicas on real Redis, in one process -------------------------------------------------


async def _boom() -> None:
    raise ConnectionError("upstream down")


async def _fine() -> None:
    return None


class Replica:
    def __init__(self, backend: RedisBackend, breaker: CircuitBreaker, events: list[Event]):
        self.backend, self.breaker, self.events = backend, breaker, events

    async def hit(self, fn: object) -> str:
        try:
            await self.breaker.call(fn)  # type: ignore[arg-type]
        except CircuitOpenError:
            return "rejected"
        except ConnectionError:
            return "failed"
        return "ok"


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[str, AsyncExitStack]]:
    async with AsyncExitStack() as stack:
        yield fresh_prefix(), stack


async def _replicas(
    prefix: str, stack: AsyncExitStack, n: int = 3, **options: object
) -> list[Replica]:
    """``n`` replicas of breaker ``"upstream"``, each on its own backend (its own replica id);
    every one gets the same ``options`` (``recovery_timeout`` included)."""
    out = []
    recovery_timeout = float(options.pop("recovery_timeout", 30.0))  # type: ignore[arg-type]
    for _ in range(n):
        backend = await stack.enter_async_context(
            RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=0.5)
        )
        events: list[Event] = []
        breaker = CircuitBreaker(
            "upstream",
            window_duration=5.0,
            minimum_calls=10,
            failure_rate_threshold=0.5,
            recovery_timeout=recovery_timeout,
            store=backend,
            listeners=[events.append],
            **options,  # type: ignore[arg-type]
        )
        out.append(Replica(backend, breaker, events))
    return out


async def test_a_quiet_replica_that_fails_follows_a_busy_one_within_two_seconds(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    a, b, c = await _replicas(*fleet)
    # A fails 50 times a second, B and C twice: alone, B and C would need ~5 s for 10 calls.
    tripped_at = None
    followed: dict[str, float] = {}
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < 6 and len(followed) < 2:
        await a.hit(_boom)
        if tripped_at is None and a.breaker.state is BreakerState.OPEN:
            tripped_at = time.monotonic()
        if tick % 25 == 0:
            for name, r in (("b", b), ("c", c)):
                if name not in followed and await r.hit(_boom) == "rejected":
                    followed[name] = time.monotonic()
        tick += 1
        await anyio.sleep(0.02)
    assert tripped_at is not None
    assert set(followed) == {"b", "c"}
    # Tolerance: the bound, 2 s (one 1 s tick plus the next call at 2/s, 0.5 s).
    assert max(followed.values()) - tripped_at < 2.0
    for r in (b, c):
        assert any(isinstance(e, FleetStateChanged) and e.rule == "rate" for e in r.events)
        stats = r.breaker.statistics()
        # live: 2 or 3, as the replicas' first summaries (a second apart) were read in time.
        assert stats.fleet is not None
        assert stats.fleet.fleet_opened
        assert stats.fleet.live >= 2
    assert not any(isinstance(e, FleetStateChanged) for e in a.events)


async def test_one_bad_path_opens_nobody_else(fleet: tuple[str, AsyncExitStack]) -> None:
    a, b, c = await _replicas(*fleet)
    start = time.monotonic()
    outcomes: dict[str, set[str]] = {"b": set(), "c": set()}
    while time.monotonic() - start < 3.0:
        await a.hit(_boom)
        outcomes["b"].add(await b.hit(_fine))
        outcomes["c"].add(await c.hit(_fine))
        await anyio.sleep(0.02)
    assert a.breaker.state is BreakerState.OPEN
    assert outcomes == {"b": {"ok"}, "c": {"ok"}}
    stats = b.breaker.statistics().fleet
    assert stats is not None
    assert (stats.live, stats.open) == (3, 1)


async def test_recovery_takes_exactly_the_fleets_probes(fleet: tuple[str, AsyncExitStack]) -> None:
    prefix, stack = fleet
    replicas = await _replicas(prefix, stack, recovery_timeout=0.5)
    for r in replicas:
        r.breaker.force_open(0.3)
    await anyio.sleep(1.0)  # published (a tick) and every open period run out
    probes = 0

    async def slow_probe() -> None:
        nonlocal probes
        probes += 1
        await anyio.sleep(0.3)

    outcomes: list[str] = []

    async def hit(r: Replica) -> None:
        outcomes.append(await r.hit(slow_probe))

    async with anyio.create_task_group() as tasks:
        for r in replicas:
            for _ in range(3):
                tasks.start_soon(hit, r)
    assert probes == 1  # half_open_max_calls, fleet-wide
    assert outcomes.count("ok") == 1


async def test_a_dead_replica_stops_counting_when_its_heartbeat_expires(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    prefix, stack = fleet
    a, _ = await _replicas(prefix, stack, n=2)
    async with RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=0.5) as dying:
        doomed = CircuitBreaker("upstream", window_duration=5.0, store=dying)
        # Everyone publishes within a tick (1 s) of starting; 2.5 s is the bound.
        with anyio.fail_after(2.5):
            while (stats := a.breaker.statistics().fleet) is None or stats.live < 3:
                await anyio.sleep(0.1)
        del doomed
    # Heartbeats live 3 s; one more tick (1 s) to read it: 4.5 s is the bound.
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        stats = a.breaker.statistics().fleet
        assert stats is not None
        if stats.live == 2:
            break
        await anyio.sleep(0.2)
    assert stats.live == 2


async def test_redis_gone_leaves_the_local_breaker_working() -> None:
    from _redis import free_port

    events: list[Event] = []
    async with RedisBackend.from_url(
        f"redis://127.0.0.1:{free_port()}/0", prefix=fresh_prefix(), timeout=0.05
    ) as backend:
        breaker = CircuitBreaker(
            "upstream", failure_threshold=2, recovery_timeout=0.2, store=backend,
            listeners=[events.append],
        )  # fmt: skip
        assert await Replica(backend, breaker, events).hit(_fine) == "ok"
        for _ in range(2):
            assert await Replica(backend, breaker, events).hit(_boom) == "failed"
        assert await Replica(backend, breaker, events).hit(_fine) == "rejected"
        await anyio.sleep(1.3)
        # The local permit serves the probe when the fleet's does not answer.
        assert await Replica(backend, breaker, events).hit(_fine) == "ok"
        assert breaker.state is BreakerState.CLOSED
        stats = breaker.statistics().fleet
        assert stats is None or not stats.available


async def test_open_periods_carry_jitter_with_a_shared_store() -> None:
    async with RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix(), timeout=0.5) as backend:
        lengths = set()
        for i in range(20):
            breaker = CircuitBreaker(f"b{i}", failure_threshold=1, store=backend)
            await Replica(backend, breaker, []).hit(_boom)
            lengths.add(round(breaker.statistics().retry_after, 3))
        assert all(25.4 <= x <= 34.5 for x in lengths)  # 30 s +-15 %
        assert len(lengths) > 10


async def test_followers_wait_for_the_replica_that_saw_the_outage_and_close_with_it(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    prefix, stack = fleet
    a, b, c = await _replicas(prefix, stack, recovery_timeout=1.0)
    for _ in range(10):
        await a.hit(_boom)
    await b.hit(_boom)
    await c.hit(_boom)
    assert a.breaker.state is BreakerState.OPEN
    with anyio.fail_after(2.5):  # a tick to publish, a tick to read
        while b.breaker.state is not BreakerState.OPEN or c.breaker.state is not BreakerState.OPEN:
            await anyio.sleep(0.05)
    await anyio.sleep(1.3)  # A's open period (1 s +15 %) ran out; B and C are held open
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1
        await anyio.sleep(0.2)

    async with anyio.create_task_group() as tasks:
        for r in (a, b, c):
            for _ in range(3):
                tasks.start_soon(r.hit, probe)
    assert probes == 1  # half_open_max_calls, fleet-wide: only A probes
    assert a.breaker.state is BreakerState.CLOSED
    with anyio.fail_after(2.5):  # A publishes at once; B and C read it within a tick
        while (
            b.breaker.state is not BreakerState.CLOSED or c.breaker.state is not BreakerState.CLOSED
        ):
            await anyio.sleep(0.05)
    for r in (b, c):
        rules = [e.rule for e in r.events if isinstance(e, FleetStateChanged)]
        assert rules == ["rate", "fleet"]


def test_a_tally_covers_the_last_ticks_and_the_one_in_progress() -> None:
    tally = FleetTally()
    for _ in range(TALLY_TICKS):
        tally.calls += 3
        tally.failures += 1
        tally.tick()
    assert tally.tick() == (3 * (TALLY_TICKS - 1), TALLY_TICKS - 1)  # an empty tick pushed one out
    tally.failures += 1
    tally.calls += 1
    assert tally.recent_failures == TALLY_TICKS
    for _ in range(TALLY_TICKS + 1):
        tally.tick()
    assert (tally.past_calls, tally.past_failures, tally.recent_failures) == (0, 0, 0)


async def test_consecutive_breakers_publish_their_outcomes_for_the_combined_rate(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    """A consecutive-failures breaker has no window, yet its calls count in the combined rate:
    a quiet replica that fails once follows a busy failing one (by the rate rule: one open
    replica of three is no quorum), and a replica without failures stays closed."""
    prefix, stack = fleet
    replicas = []
    for _ in range(3):
        backend = await stack.enter_async_context(
            RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=0.5)
        )
        events: list[Event] = []
        breaker = CircuitBreaker(
            "upstream", failure_threshold=20, recovery_timeout=30.0, store=backend
        )
        replicas.append(Replica(backend, breaker, events))
    a, b, c = replicas
    for _ in range(20):
        await a.hit(_boom)
    assert a.breaker.state is BreakerState.OPEN
    assert await b.hit(_boom) == "failed"  # one failure: far below its own threshold of 20
    start = time.monotonic()
    outcome = "failed"
    # Tolerance: two publication ticks (1 s each) plus scheduling on a loaded machine.
    while time.monotonic() - start < 4.0 and outcome != "rejected":
        await anyio.sleep(0.5)  # a quiet replica: two calls a second
        outcome = await b.hit(_fine)
        assert await c.hit(_fine) == "ok"
    assert outcome == "rejected"
    stats = b.breaker.statistics().fleet
    assert stats is not None
    assert stats.fleet_opened
    assert stats.calls >= 20
    assert c.breaker.state is BreakerState.CLOSED


async def test_a_transition_reaches_the_others_by_pub_sub_not_the_next_tick(
    fleet: tuple[str, AsyncExitStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the tick pushed out to 30 s, only the announcement can bring A's trip to B."""
    import resilient_voice.redis._breaker as fleet_module

    prefix, stack = fleet
    monkeypatch.setattr(fleet_module, "FLEET_TICK_S", 30.0)
    a, b = await _replicas(prefix, stack, n=2)
    deadline = time.monotonic() + 5.0  # tolerance: both first summaries and the subscription
    while time.monotonic() < deadline:
        stats = b.breaker.statistics().fleet
        if stats is not None and stats.live == 2:
            break
        await anyio.sleep(0.05)
    await anyio.sleep(0.3)  # the listener subscribes to the channel
    a.breaker.force_open()
    tripped = time.monotonic()
    seen = None
    while time.monotonic() - tripped < 3.0:
        stats = b.breaker.statistics().fleet
        if stats is not None and stats.open == 1:
            seen = time.monotonic() - tripped
            break
        await anyio.sleep(0.02)
    # Tolerance: 3 s on a loaded machine; the tick alone would take 30 s.
    assert seen is not None
    assert b.breaker.state is BreakerState.CLOSED  # one open of two is no quorum


@pytest.mark.parametrize(
    "window", [{"window_size": 50}, {"window_duration": 30.0}], ids=["count", "time"]
)
async def test_window_calls_on_the_closed_fast_path_are_published(
    fleet: tuple[str, AsyncExitStack], window: dict[str, float]
) -> None:
    """With nothing listening, a window breaker's closed calls take the fast path; they still
    land in the window that the summary is read from, so the other replicas count them."""
    prefix, stack = fleet
    replicas = []
    for _ in range(2):
        backend = await stack.enter_async_context(
            RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=0.5)
        )
        breaker = CircuitBreaker("upstream", minimum_calls=50, store=backend, **window)  # type: ignore[arg-type]
        replicas.append(Replica(backend, breaker, []))
    a, b = replicas
    assert a.breaker._machine.fast
    for _ in range(12):
        assert await a.hit(_fine) == "ok"
    for _ in range(4):
        assert await a.hit(_boom) == "failed"
    assert a.breaker._fleet_summary() == (False, False, 16, 4)
    start = time.monotonic()
    seen = None
    # Tolerance: two publication ticks (1 s each) plus scheduling on a loaded machine.
    while time.monotonic() - start < 4.0:
        seen = b.breaker.statistics().fleet
        if seen is not None and seen.calls == 16:
            break
        await anyio.sleep(0.1)
    assert seen is not None
    assert (seen.calls, seen.failure_rate) == (16, 0.25)
    assert a.breaker.state is b.breaker.state is BreakerState.CLOSED
