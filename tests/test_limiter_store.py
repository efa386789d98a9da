"""The BucketStore seam, exercised through the code path a remote (Redis) store takes.

``RoundTripStore`` wraps the in-memory reference store with a checkpoint before every call, as a
network round trip would yield, and counts the calls, so batching is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest

from resilient_voice import RateLimitedError
from resilient_voice.limiter import (
    BucketStore,
    InMemoryBucketStore,
    KeyedLimiter,
    Reservation,
    TokenBucket,
)
from resilient_voice.testing import ManualClock
from resilient_voice.testing._manual_clock import _wait_all_tasks_blocked as settle


class RoundTripStore:
    def __init__(self, clock: ManualClock) -> None:
        self.inner = InMemoryBucketStore(clock=clock)
        self.reserved: list[int] = []  # batch size of every reserve call
        self.given_back: list[bool] = []

    async def reserve(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        await anyio.lowlevel.checkpoint()
        self.reserved.append(len(costs))
        return await self.inner.reserve(key, costs, limits, tau)

    async def give_back(self, key: str, cost: float, end: float) -> bool:
        await anyio.lowlevel.checkpoint()
        taken = await self.inner.give_back(key, cost, end)
        self.given_back.append(taken)
        return taken

    async def pause(self, key: str, seconds: float) -> Reservation:
        await anyio.lowlevel.checkpoint()
        return await self.inner.pause(key, seconds)


async def start_callers(
    tg: anyio.abc.TaskGroup,
    bucket: TokenBucket,
    clock: ManualClock,
    n: int,
    log: list[float],
    *,
    together: bool = False,
) -> list[anyio.CancelScope]:
    """Start ``n`` callers, one at a time (each reaches the bucket first) unless ``together``."""
    scopes = []
    for _ in range(n):
        scope = anyio.CancelScope()
        scopes.append(scope)

        async def caller(scope: anyio.CancelScope = scope) -> None:
            with scope:
                await bucket.acquire()
                log.append(clock.now())

        tg.start_soon(caller)
        if not together:
            await settle()
    await settle()
    return scopes


def test_the_reference_store_implements_the_protocol() -> None:
    assert isinstance(InMemoryBucketStore(), BucketStore)
    assert isinstance(RoundTripStore(ManualClock()), BucketStore)


async def test_the_front_reserves_for_every_ready_waiter_in_one_call() -> None:
    clock = ManualClock()
    store = RoundTripStore(clock)
    bucket = TokenBucket(1, clock=clock, name="cps", store=store)
    granted: list[float] = []
    async with anyio.create_task_group() as tg:
        await start_callers(tg, bucket, clock, 6, granted, together=True)
        # The first arrival's round trip was in flight while the other five queued.
        assert store.reserved == [1, 5]
        for _ in range(6):
            clock.advance(1)
            await settle()
    assert granted == pytest.approx([0, 1, 2, 3, 4, 5])
    assert bucket.statistics().granted == 6


async def test_a_cancelled_slot_moves_down_the_line_then_goes_back() -> None:
    clock = ManualClock()
    store = RoundTripStore(clock)
    bucket = TokenBucket(1, clock=clock, name="cps", store=store)
    assert await bucket.try_acquire()
    granted: list[float] = []
    async with anyio.create_task_group() as tg:
        scopes = await start_callers(tg, bucket, clock, 3, granted)  # slots 1, 2, 3
        scopes[0].cancel()
        await settle()
        assert store.given_back == [True]  # the last slot (3) went back: nobody was waiting
        late: list[float] = []
        await start_callers(tg, bucket, clock, 1, late)
        for _ in range(4):
            clock.advance(1)
            await settle()
    assert granted == pytest.approx([1, 2])  # the two behind moved up
    assert late == pytest.approx([3])  # the slot given back is used again
    assert bucket._dropped == 0


async def test_a_slot_is_not_given_back_after_another_replica_reserved() -> None:
    clock = ManualClock()
    store = RoundTripStore(clock)
    first = TokenBucket(1, clock=clock, name="cps", store=store)
    second = TokenBucket(1, clock=clock, name="cps", store=store)
    assert await first.try_acquire()
    mine: list[float] = []
    theirs: list[float] = []
    async with anyio.create_task_group() as tg:
        scopes = await start_callers(tg, first, clock, 1, mine)  # slot 1
        await start_callers(tg, second, clock, 1, theirs)  # slot 2
        scopes[0].cancel()
        await settle()
        assert store.given_back == [False]  # the shared schedule no longer ends where it did
        assert first._dropped == 1
        after: list[float] = []
        await start_callers(tg, first, clock, 1, after)
        for _ in range(3):
            clock.advance(1)
            await settle()
    assert theirs == pytest.approx([2])
    assert after == pytest.approx([3])  # the dropped slot 1 is never double-spent


async def test_a_deadline_the_store_cannot_meet_is_refused_before_sleeping() -> None:
    clock = ManualClock()
    store = RoundTripStore(clock)
    first = TokenBucket(1, clock=clock, name="cps", store=store)
    second = TokenBucket(1, clock=clock, name="cps", store=store)
    assert await second.try_acquire()  # another replica takes slot 0 and books 1 and 2
    async with anyio.create_task_group() as tg:
        booked: list[float] = []
        await start_callers(tg, second, clock, 2, booked)
        with pytest.raises(RateLimitedError, match="deadline"):
            await first.acquire(timeout=1.5)  # this replica's mirror knows nothing yet
        assert clock.now() == 0  # refused without sleeping
        for _ in range(3):
            clock.advance(1)
            await settle()
    assert booked == pytest.approx([1, 2])
    assert await first.try_acquire()  # slot 3 was not taken by the refused request


async def test_pause_delays_every_bucket_sharing_the_schedule() -> None:
    clock = ManualClock(autojump=True)
    store = InMemoryBucketStore(clock=clock)
    first = TokenBucket(1, burst=3, clock=clock, name="cps", store=store)
    second = TokenBucket(1, burst=3, clock=clock, name="cps", store=store)
    await first.pause(2)
    granted = []
    for _ in range(3):
        await second.acquire()
        granted.append(clock.now())
    assert granted == pytest.approx([2, 3, 4])  # resumes at the rate, without a burst


async def test_pause_in_memory() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(1, burst=3, clock=clock)
    await bucket.pause(2)
    granted = []
    for _ in range(3):
        await bucket.acquire()
        granted.append(clock.now())
    assert granted == pytest.approx([2, 3, 4])
    with pytest.raises(ValueError, match="seconds"):
        await bucket.pause(-1)


async def test_keyed_buckets_share_their_store_and_keys_reach_it_as_digests() -> None:
    clock = ManualClock()
    store = InMemoryBucketStore(clock=clock)
    first = KeyedLimiter(1, clock=clock, name="per-sender", store=store)
    second = KeyedLimiter(1, clock=clock, name="per-sender", store=store)
    assert await first.try_acquire("+15550100")
    assert not await second.try_acquire("+15550100")  # one schedule for the key
    assert await second.try_acquire("+15550101")
    keys = list(store._full_at)
    assert len(keys) == 2
    assert all(k.startswith("per-sender:") and "+1555" not in k for k in keys)


async def test_try_acquire_through_a_store() -> None:
    clock = ManualClock()
    store = RoundTripStore(clock)
    bucket = TokenBucket(2, burst=2, clock=clock, name="cps", store=store)
    assert await bucket.try_acquire(2)
    assert not await bucket.try_acquire()
    assert bucket.tokens_available() == 0  # mirrored from the store's answer
    clock.advance(0.5)
    assert await bucket.try_acquire()


class GatedStore(RoundTripStore):
    """Holds every reservation until ``gate`` is set, to act inside a round trip."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.gate = anyio.Event()

    async def reserve(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        await self.gate.wait()
        return await super().reserve(key, costs, limits, tau)


async def test_a_waiter_cancelled_during_the_round_trip_leaves_its_slot_behind() -> None:
    clock = ManualClock()
    store = GatedStore(clock)
    bucket = TokenBucket(1, clock=clock, name="cps", store=store)
    first_gate = store.gate
    first_gate.set()
    assert await bucket.try_acquire()  # slot 0
    store.gate = anyio.Event()
    granted: list[float] = []
    async with anyio.create_task_group() as tg:
        await start_callers(tg, bucket, clock, 1, granted)  # in flight, alone
        scopes = await start_callers(tg, bucket, clock, 2, granted)  # queued behind it
        second_gate = anyio.Event()
        first, store.gate = store.gate, second_gate
        first.set()
        await settle()  # the first is reserved; the front now reserves for the two queued
        assert store.reserved[-1] == 1
        scopes[1].cancel()
        await settle()
        second_gate.set()
        await settle()
        assert store.reserved[-1] == 2  # the batch still covered the cancelled one ...
        assert store.given_back == [True]  # ... whose slot went back to the store
        later: list[float] = []
        await start_callers(tg, bucket, clock, 1, later)
        for _ in range(4):
            clock.advance(1)
            await settle()
    assert granted == pytest.approx([1, 2])
    assert later == pytest.approx([3])


class SlowPauseStore(RoundTripStore):
    """Its pause (the catch-up's round trip) takes 5 ms of the manual clock."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.clock = clock
        self.pauses = 0

    async def pause(self, key: str, seconds: float) -> Reservation:
        self.pauses += 1
        self.clock.advance(0.005)
        return await super().pause(key, seconds)


async def test_one_stall_makes_one_catch_up_round_trip_not_one_per_waiter() -> None:
    """Waiters woken by the same stall were all moved by the first one's catch-up.

    Each paying a round trip of its own (late by the first one's round trip) pushed the shared
    schedule once per waiter: under CPU contention, more catch-ups than reservations.
    """
    clock = ManualClock()
    store = SlowPauseStore(clock)
    bucket = TokenBucket(100, clock=clock, name="cps", store=store)
    assert await bucket.try_acquire()
    granted: list[float] = []
    async with anyio.create_task_group() as tg:
        await start_callers(tg, bucket, clock, 5, granted, together=True)  # 0.01 .. 0.05
        clock.advance(0.25)  # a stall: every reserved slot is far behind
        await settle()
        for _ in range(10):
            clock.advance(0.01)
            await settle()
    assert store.pauses == 1
    assert len(granted) == 5
    # Moved by the stall's excess (0.23 s), granted no closer than the schedule allows.
    assert granted[0] == pytest.approx(0.255)
    assert granted[-1] >= 0.28 - 1e-9
