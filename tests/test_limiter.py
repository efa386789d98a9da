from __future__ import annotations

import enum
import math
import time
from collections.abc import Hashable

import anyio
import pytest

from resilient_voice import RateLimitedError
from resilient_voice.events import BucketEvicted, Event, TokensGranted, TokensRejected
from resilient_voice.limiter import (
    BucketStore,
    InMemoryBucketStore,
    KeyedLimiter,
    TokenBucket,
    TokenBucketStatistics,
)
from resilient_voice.testing import ManualClock
from resilient_voice.testing._manual_clock import _wait_all_tasks_blocked as settle


class Recorder:
    def __init__(self) -> None:
        self.granted: list[tuple[str, Hashable | None, float, float]] = []
        self.rejected: list[tuple[str, Hashable | None, float, float | None]] = []
        self.evicted: list[tuple[str, Hashable, bool]] = []

    def __call__(self, event: Event) -> None:
        match event:
            case TokensGranted(source, key, tokens, waited):
                self.granted.append((source, key, tokens, waited))
            case TokensRejected(source, key, tokens, retry_after):
                self.rejected.append((source, key, tokens, retry_after))
            case BucketEvicted(source, key, lossy):
                self.evicted.append((source, key, lossy))


class CountingClock(ManualClock):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def now(self) -> float:
        self.reads += 1
        return super().now()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rate": 0}, ValueError),
        ({"rate": -1}, ValueError),
        ({"rate": math.nan}, ValueError),
        ({"rate": math.inf}, ValueError),
        ({"rate": 1, "burst": 0.5}, ValueError),
        ({"rate": 1, "burst": math.inf}, ValueError),
        ({"rate": 1, "burst": math.nan}, ValueError),
        ({"rate": "10"}, TypeError),
        ({"rate": True}, TypeError),
    ],
)
def test_bad_configuration_raises_at_construction(
    kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        TokenBucket(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(error):
        KeyedLimiter(**kwargs)  # type: ignore[arg-type]


def test_keyed_limiter_validates_its_own_options() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        KeyedLimiter(1, max_keys=0)
    with pytest.raises(TypeError, match="max_keys"):
        KeyedLimiter(1, max_keys=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_full"):
        KeyedLimiter(1, on_full="drop")  # type: ignore[arg-type]


# The shared conftest does not combine pytest.mark.parametrize with the backend parameter on
# async tests, so these loop over their cases.
async def test_bad_token_counts_raise_instead_of_hanging() -> None:
    for tokens in [0, -1, math.nan, math.inf, 3.5]:
        bucket = TokenBucket(1, burst=3, clock=ManualClock())
        with pytest.raises(ValueError, match="tokens"):
            await bucket.acquire(tokens)
        with pytest.raises(ValueError, match="tokens"):
            await bucket.try_acquire(tokens)
        keyed = KeyedLimiter(1, burst=3, clock=ManualClock())
        with pytest.raises(ValueError, match="tokens"):
            await keyed.acquire("k", tokens)


async def test_bad_timeout_raises() -> None:
    for timeout in [-0.1, math.nan]:
        bucket = TokenBucket(1, clock=ManualClock())
        with pytest.raises(ValueError, match="timeout"):
            await bucket.acquire(timeout=timeout)
        assert bucket.statistics().granted == 0


async def test_burst_then_paced_at_rate() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(2, burst=3, clock=clock)
    granted_at = []
    for _ in range(7):
        await bucket.acquire()
        granted_at.append(clock.now())
    assert granted_at == pytest.approx([0, 0, 0, 0.5, 1.0, 1.5, 2.0])


async def test_tokens_refill_exactly_on_the_boundary() -> None:
    clock = ManualClock()
    bucket = TokenBucket(10, clock=clock)
    for _ in range(50):
        assert await bucket.try_acquire()
        assert not await bucket.try_acquire()
        clock.advance(0.1)


async def test_waiters_are_served_first_come_first_served() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, clock=clock)
    order: list[tuple[int, float]] = []

    async def caller(i: int) -> None:
        await bucket.acquire()
        order.append((i, clock.now()))

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(caller, i)
            await settle()
        for _ in range(5):
            clock.advance(1)
            await settle()
    assert order == [(i, float(i)) for i in range(6)]


async def test_higher_priority_overtakes_queued_work_fifo_within_priority() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, clock=clock)
    await bucket.acquire()
    order: list[str] = []

    async def caller(label: str, priority: int) -> None:
        await bucket.acquire(priority=priority)
        order.append(label)

    async with anyio.create_task_group() as tg:
        for label, priority in [("bulk1", 0), ("bulk2", 0), ("urgent1", 5), ("mid", 1)]:
            tg.start_soon(caller, label, priority)
            await settle()
        tg.start_soon(caller, "urgent2", 5)
        await settle()
        for _ in range(5):
            clock.advance(1)
            await settle()
    assert order == ["urgent1", "urgent2", "mid", "bulk1", "bulk2"]


async def test_timeout_refused_at_arrival_without_sleeping() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, clock=clock, name="twilio-cps")
    await bucket.acquire()

    async with anyio.create_task_group() as tg:
        tg.start_soon(bucket.acquire)  # queued: due at t=1
        await settle()
        with anyio.fail_after(5), pytest.raises(RateLimitedError) as info:
            await bucket.acquire(timeout=1.5)  # would be due at t=2
        assert info.value.limiter == "twilio-cps"
        assert info.value.retry_after == pytest.approx(2.0)
        assert clock.now() == 0.0
        # Exactly enough time is accepted.
        tg.start_soon(lambda: bucket.acquire(timeout=2.0))
        await settle()
        assert bucket.statistics().waiters == 2
        clock.advance(1)
        await settle()
        clock.advance(1)
    assert bucket.statistics().rejected == 1
    assert bucket.statistics().granted == 3


async def test_deadline_refused_at_arrival() -> None:
    clock = ManualClock(10.0)
    bucket = TokenBucket(4, clock=clock)
    await bucket.acquire()
    with pytest.raises(RateLimitedError) as info:
        await bucket.acquire(deadline=10.2)
    assert info.value.retry_after == pytest.approx(0.25)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: bucket.acquire(deadline=10.25))
        await settle()
        clock.advance(0.25)
    assert bucket.statistics().granted == 2


async def test_pushed_back_waiter_fails_as_soon_as_its_deadline_is_lost() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, clock=clock)
    await bucket.acquire()
    outcome: list[object] = []

    async def bulk() -> None:
        try:
            await bucket.acquire(deadline=2.0)  # due at t=1 on arrival
        except RateLimitedError as exc:
            outcome.append(("refused", clock.now(), exc.retry_after))
        else:
            outcome.append(("granted", clock.now()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(bulk)
        await settle()
        tg.start_soon(lambda: bucket.acquire(priority=1))  # bulk now due at t=2: still fine
        await settle()
        assert outcome == []
        tg.start_soon(lambda: bucket.acquire(priority=1))  # bulk now due at t=3: lost
        await settle()
        # Refused at once, at t=0, not when the deadline passes.
        assert outcome == [("refused", 0.0, pytest.approx(3.0))]
        clock.advance(1)
        await settle()
        clock.advance(1)
    assert bucket.statistics().granted == 3


async def test_sleeping_front_pushed_back_is_woken_and_refused() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, clock=clock)
    await bucket.acquire()
    errors: list[RateLimitedError] = []

    async def front() -> None:
        try:
            await bucket.acquire(timeout=1.0)
        except RateLimitedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(front)
        await settle()
        tg.start_soon(lambda: bucket.acquire(priority=3))
        await settle()
        assert len(errors) == 1
        assert clock.now() == 0.0
        clock.advance(1)


async def test_cancelled_waiter_gives_back_its_place_and_others_move_up() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, clock=clock)
    await bucket.acquire()  # t=0
    granted: dict[str, float] = {}

    async def caller(label: str) -> None:
        await bucket.acquire()
        granted[label] = clock.now()

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, "front")  # due t=1
        await settle()
        with anyio.CancelScope() as doomed:
            pass
        middle_scope = anyio.CancelScope()

        async def middle() -> None:
            with middle_scope:
                await caller("middle")  # due t=2

        tg.start_soon(middle)
        await settle()
        tg.start_soon(caller, "last")  # due t=3
        await settle()
        clock.advance(0.5)
        middle_scope.cancel()
        await settle()
        for _ in range(4):
            clock.advance(0.5)
            await settle()
    assert doomed.cancel_called is False
    assert "middle" not in granted
    # Without the cancelled waiter, "last" gets the t=2 slot, not t=3.
    assert granted == {"front": 1.0, "last": 2.0}
    assert bucket.statistics().waiters == 0


async def test_cancelling_the_sleeping_front_moves_the_next_up() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, burst=2, clock=clock)
    await bucket.acquire(2)
    granted: list[float] = []
    scope = anyio.CancelScope()

    async def front() -> None:
        with scope:
            await bucket.acquire(2)  # due t=2

    async def small() -> None:
        await bucket.acquire(1)  # behind it: due t=3
        granted.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(front)
        await settle()
        tg.start_soon(small)
        await settle()
        clock.advance(0.5)
        scope.cancel()
        await settle()
        clock.advance(0.5)
        await settle()
        assert granted == [1.0]
    # The cancelled waiter took nothing: the bucket refills as if it never asked.
    assert bucket.statistics().tokens_available == pytest.approx(0.0)
    clock.advance(2)
    assert bucket.statistics().tokens_available == pytest.approx(2.0)


async def test_try_acquire_never_waits_and_never_jumps_the_queue() -> None:
    clock = ManualClock()
    bucket = TokenBucket(1, burst=2, clock=clock)
    assert await bucket.try_acquire(2)
    assert not await bucket.try_acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: bucket.acquire(2))  # due t=2
        await settle()
        clock.advance(1)
        await settle()
        # One token is there, but taking it would delay the queued caller.
        assert not await bucket.try_acquire()
        clock.advance(1)
    stats = bucket.statistics()
    assert (stats.granted, stats.rejected, stats.waiters) == (2, 2, 0)


async def test_decorator_takes_one_token_per_call_and_keeps_the_signature() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(10, clock=clock)

    @bucket
    async def send(to: str, *, body: str) -> str:
        return f"{to}:{body}"

    results = [await send("+15550100", body=str(i)) for i in range(3)]
    assert results == ["+15550100:0", "+15550100:1", "+15550100:2"]
    assert send.__name__ == "send"
    assert clock.now() == pytest.approx(0.2)
    assert bucket.statistics().granted == 3


def test_decorator_refuses_sync_functions() -> None:
    bucket = TokenBucket(1)
    with pytest.raises(TypeError, match="async"):
        bucket(lambda: None)  # type: ignore[arg-type]


async def test_statistics_are_a_frozen_snapshot() -> None:
    clock = ManualClock()
    bucket = TokenBucket(2, burst=4, clock=clock, name="sms")
    await bucket.acquire(3)
    stats = bucket.statistics()
    assert stats == TokenBucketStatistics("sms", 2.0, 4.0, 1.0, 0, 1, 0)
    with pytest.raises(AttributeError):
        stats.granted = 5  # type: ignore[misc]
    clock.advance(0.75)
    assert bucket.statistics().tokens_available == pytest.approx(2.5)
    assert "sms" in repr(bucket)


async def test_listeners_see_grants_with_wait_and_rejections() -> None:
    clock = ManualClock(autojump=True)
    recorder = Recorder()
    bucket = TokenBucket(1, clock=clock, name="calls", listeners=[recorder])
    await bucket.acquire()
    await bucket.acquire()
    assert not await bucket.try_acquire()
    with pytest.raises(RateLimitedError):
        await bucket.acquire(timeout=0.5)
    assert recorder.granted == [("calls", None, 1, 0.0), ("calls", None, 1, pytest.approx(1.0))]
    assert recorder.rejected == [
        ("calls", None, 1, pytest.approx(1.0)),
        ("calls", None, 1, pytest.approx(1.0)),
    ]
    late = Recorder()
    bucket.add_listener(late)
    clock.advance(1)
    await bucket.acquire()
    assert len(late.granted) == 1


async def test_uncontended_acquire_reads_the_clock_once_and_allocates_no_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resilient_voice.limiter._bucket as limiter_module

    def forbidden(*args: object) -> None:
        raise AssertionError("the fast path must not create a waiter, event or scope")

    clock = CountingClock()
    bucket = TokenBucket(1000, burst=10, clock=clock)
    monkeypatch.setattr(limiter_module, "Waiter", forbidden)
    monkeypatch.setattr(limiter_module, "WaitQueue", forbidden)
    monkeypatch.setattr(limiter_module, "TokensGranted", forbidden)  # nothing listens
    monkeypatch.setattr(limiter_module.anyio, "Event", forbidden)
    monkeypatch.setattr(limiter_module.anyio, "CancelScope", forbidden)
    for _ in range(10):
        await bucket.acquire()
    assert clock.reads == 10


def test_limiter_events_are_frozen_slotted_records() -> None:
    import dataclasses

    event = TokensGranted("cps", None, 1.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.waited = 1.0  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    assert BucketEvicted("inbound", "+15550100", lossy=True).source == "inbound"


async def test_waiting_uses_the_injected_clock_only() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(1 / 3600, clock=clock)  # one per hour
    with anyio.fail_after(1):  # real seconds: an hour on the manual clock must not be real time
        await bucket.acquire()
        await bucket.acquire()
    assert clock.now() == pytest.approx(3600)


async def test_system_clock_smoke() -> None:
    bucket = TokenBucket(200)
    start = time.monotonic()
    for _ in range(5):
        await bucket.acquire()
    assert time.monotonic() - start > 0.015  # 4 waits of 5 ms: the system clock really paced


async def test_buckets_sharing_a_store_share_one_capacity() -> None:
    clock = ManualClock(autojump=True)
    store = InMemoryBucketStore(clock=clock)
    assert isinstance(store, BucketStore)
    first = TokenBucket(1, clock=clock, name="acct", store=store)
    second = TokenBucket(1, clock=clock, name="acct", store=store)
    granted: list[float] = []

    async def caller(bucket: TokenBucket) -> None:
        await bucket.acquire()
        granted.append(clock.now())

    assert await first.try_acquire()
    assert not await second.try_acquire()
    async with anyio.create_task_group() as tg:
        for bucket in (first, second, first, second):
            tg.start_soon(caller, bucket)
    assert sorted(granted) == pytest.approx([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(RateLimitedError):
        await first.acquire(timeout=0.5)


def test_store_must_implement_the_protocol() -> None:
    with pytest.raises(TypeError, match="BucketStore"):
        TokenBucket(1, store=object())  # type: ignore[arg-type]


async def test_keyed_buckets_are_independent() -> None:
    clock = ManualClock()
    limiter = KeyedLimiter(1, burst=2, clock=clock, name="per-sender")
    assert await limiter.try_acquire("+1555", 2)
    assert not await limiter.try_acquire("+1555")
    assert await limiter.try_acquire("+1666")
    await limiter.acquire("+1666")
    with pytest.raises(RateLimitedError):
        await limiter.acquire("+1666", timeout=0.5)
    stats = limiter.statistics()
    assert (stats.keys, stats.granted, stats.rejected) == (2, 3, 2)


async def test_keyed_limiter_fails_closed_when_every_bucket_is_busy() -> None:
    clock = ManualClock()
    recorder = Recorder()
    limiter = KeyedLimiter(1, clock=clock, max_keys=2, listeners=[recorder], name="ips")
    await limiter.acquire("a")
    clock.advance(0.25)
    await limiter.acquire("b")
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire("c")
    # "a" is full again at t=1.
    assert info.value.retry_after == pytest.approx(0.75)
    assert not await limiter.try_acquire("d")
    assert len(limiter) == 2
    clock.advance(0.75)
    await limiter.acquire("c")  # "a" is full again: dropped losslessly
    assert limiter.bucket("a") is None
    assert recorder.evicted == [("ips", "a", False)]
    stats = limiter.statistics()
    assert (stats.evicted, stats.evicted_lossy, stats.rejected) == (1, 0, 2)


async def test_keyed_limiter_fails_open_when_configured() -> None:
    clock = ManualClock()
    recorder = Recorder()
    limiter = KeyedLimiter(1, clock=clock, max_keys=2, on_full="evict", listeners=[recorder])
    await limiter.acquire("a")
    await limiter.acquire("b")
    assert await limiter.try_acquire("c")
    assert recorder.evicted == [("keyed_limiter", "a", True)]
    assert limiter.statistics().evicted_lossy == 1
    assert len(limiter) == 2


async def test_keyed_limiter_evicts_least_recently_used_full_bucket_first() -> None:
    clock = ManualClock()
    limiter = KeyedLimiter(1, clock=clock, max_keys=3)
    for key in "abc":
        await limiter.acquire(key)
    clock.advance(5)
    assert await limiter.try_acquire("a")  # "a" is used again: "b" is now the oldest
    assert await limiter.try_acquire("d")
    assert limiter.bucket("b") is None
    assert limiter.bucket("a") is not None


def test_a_million_keys_keep_memory_bounded() -> None:
    async def main() -> None:
        clock = ManualClock()
        limiter = KeyedLimiter(1, max_keys=10_000, clock=clock)
        peak = 0
        # Keys arrive every 0.11 ms; a bucket is full again 1 s (~9 100 keys) after its use.
        for i in range(1_000_000):
            assert await limiter.try_acquire(i)
            if i % 1000 == 0:
                peak = max(peak, len(limiter))
                clock.advance(0.11)
        stats = limiter.statistics()
        assert peak <= 10_000
        assert stats.keys <= 10_000
        assert stats.granted == 1_000_000
        assert stats.evicted_lossy == 0
        assert stats.evicted >= 990_000

        # A frozen clock: every bucket stays busy, so new keys are refused, cheaply.
        frozen = KeyedLimiter(1, max_keys=1000, clock=ManualClock())
        refused = 0
        for i in range(200_000):
            refused += not await frozen.try_acquire(i)
        assert len(frozen) == 1000
        assert refused == 199_000

    # try_acquire never yields, so the event loop does not matter here: one backend suffices.
    anyio.run(main)


async def test_a_new_key_is_admitted_as_soon_as_a_retained_bucket_is_full_again() -> None:
    clock = ManualClock()
    limiter = KeyedLimiter(1, burst=10, max_keys=2, clock=clock, on_full="evict")
    assert await limiter.try_acquire("a", 10)  # full again at t=10
    assert await limiter.try_acquire("b", 10)
    clock.advance(1)
    assert await limiter.try_acquire("c")  # no bucket full: "a" is evicted, lossily
    assert limiter.statistics().evicted_lossy == 1
    clock.advance(2)  # "c" took one token at t=1: it is full again since t=2
    assert await limiter.try_acquire("d")
    stats = limiter.statistics()
    assert stats.evicted_lossy == 1  # "c" was dropped losslessly, "b" kept its debt
    assert limiter.bucket("b") is not None
    assert limiter.bucket("c") is None


async def test_a_late_wake_up_keeps_its_slot_so_lateness_never_accumulates() -> None:
    # Every wake-up lands late, by 0 to 9 ms (at 100/s, up to 90 % of an interval), as an event
    # loop's do. The grants keep the schedule 0, 10, 20, ... ms: 1000 grants end at 9.99 s plus
    # one lateness, where granting at the late wake-up would push each slot back (to ~14 s).
    clock = ManualClock()
    rate, calls = 100.0, 1000
    lateness = [0.004, 0.0, 0.009, 0.001, 0.007]
    bucket = TokenBucket(rate, clock=clock)
    granted: list[float] = []

    async def caller() -> None:
        await bucket.acquire()
        granted.append(clock.now())

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(caller)
        await settle()
        while len(granted) < calls:
            due = clock.next_deadline()
            assert due is not None
            clock.advance_to(due + lateness[len(granted) % len(lateness)])
            await settle()
    offsets = [t - i / rate for i, t in enumerate(granted)]
    # No grant precedes its slot, and none is later than its slot by more than one wake-up.
    assert min(offsets) >= -2e-9  # the documented nanosecond of float slack
    assert max(offsets) <= max(lateness) + 1e-9
    assert (calls - 1) / (granted[-1] - granted[0]) >= 0.99 * rate
    # FakeTelephony's CPS check (a GCRA with 50 ms of tolerance) counts no violation.
    tat, violations = -math.inf, 0
    for t in granted:
        if t < tat - 0.05:
            violations += 1
        else:
            tat = max(t, tat) + 1 / rate
    assert violations == 0


async def test_lateness_beyond_the_allowance_is_lost_not_caught_up() -> None:
    # A stall of 1 s (far beyond the allowance) does not release a burst of the missed grants:
    # after it, grants resume one interval apart, the first one backdated by the allowance only.
    clock = ManualClock()
    bucket = TokenBucket(10, clock=clock)
    granted: list[float] = []

    async def caller() -> None:
        await bucket.acquire()
        granted.append(clock.now())

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(caller)
        await settle()
        clock.advance(1.0)
        await settle()
        while len(granted) < 4:
            due = clock.next_deadline()
            assert due is not None
            clock.advance_to(due)
            await settle()
    assert granted[0] == 0.0
    assert granted[1] == pytest.approx(1.0)
    # The next slot is 0.1 s after the kept slot (1.0 - 0.01), not after the slot it missed.
    assert granted[2] == pytest.approx(1.09)
    assert granted[3] == pytest.approx(1.19)


async def test_bad_priority_and_tokens_are_refused_on_an_idle_bucket_too() -> None:
    for bad in ["high", 1.5, True, None]:
        bucket = TokenBucket(1, clock=ManualClock())
        with pytest.raises(TypeError, match="priority"):
            await bucket.acquire(priority=bad)  # type: ignore[arg-type]
        keyed = KeyedLimiter(1, clock=ManualClock())
        with pytest.raises(TypeError, match="priority"):
            await keyed.acquire("k", priority=bad)  # type: ignore[arg-type]
        assert bucket.statistics().granted == 0
        assert len(keyed) == 0
    bucket = TokenBucket(1, burst=2, clock=ManualClock())
    with pytest.raises(TypeError, match="tokens"):
        await bucket.acquire(True)
    with pytest.raises(TypeError, match="tokens"):
        await bucket.try_acquire(True)
    keyed = KeyedLimiter(1, clock=ManualClock())
    with pytest.raises(TypeError, match="tokens"):
        await keyed.acquire("k", True)
    with pytest.raises(TypeError, match="tokens"):
        await keyed.try_acquire("k", True)
    assert bucket.statistics().granted == 0
    assert len(keyed) == 0


async def test_an_int_enum_priority_and_float_tokens_are_accepted() -> None:
    class Priority(enum.IntEnum):
        BULK = 0
        URGENT = 10

    bucket = TokenBucket(1, burst=2, clock=ManualClock())
    await bucket.acquire(priority=Priority.URGENT)
    await bucket.acquire(1.0, priority=Priority.BULK)
    assert bucket.statistics().granted == 2


async def test_a_deadline_already_past_is_refused_without_spending() -> None:
    clock = ManualClock(10.0)
    listener = Recorder()
    bucket = TokenBucket(1, clock=clock, listeners=[listener])
    with pytest.raises(RateLimitedError) as caught:
        await bucket.acquire(deadline=9.5)
    assert caught.value.retry_after == 0.0
    stats = bucket.statistics()
    assert (stats.granted, stats.rejected, stats.tokens_available) == (0, 1, 1.0)
    assert listener.rejected == [("token_bucket", None, 1, 0.0)]
    # A deadline of exactly now (timeout=0) takes the tokens if they can be granted at once.
    await bucket.acquire(timeout=0)
    with pytest.raises(RateLimitedError):
        await bucket.acquire(timeout=0)
    assert bucket.statistics().granted == 1


async def test_a_keyed_deadline_already_past_is_refused_without_a_bucket() -> None:
    clock = ManualClock(10.0)
    listener = Recorder()
    keyed = KeyedLimiter(1, max_keys=1, clock=clock, listeners=[listener])
    await keyed.acquire("busy")
    # A refused new key neither evicts nor is refused for lack of room: its deadline decides.
    with pytest.raises(RateLimitedError, match="deadline"):
        await keyed.acquire("late", deadline=9.0)
    assert keyed.bucket("late") is None
    assert keyed.bucket("busy") is not None
    clock.advance(1.0)
    with pytest.raises(RateLimitedError, match="deadline"):
        await keyed.acquire("busy", deadline=10.5)
    stats = keyed.statistics()
    assert (stats.granted, stats.rejected, stats.keys) == (1, 2, 1)
    assert [r[1] for r in listener.rejected] == ["late", "busy"]


async def test_an_unhashable_key_is_a_type_error_that_names_the_limiter() -> None:
    keyed = KeyedLimiter(1, clock=ManualClock(), name="per-sender")
    with pytest.raises(TypeError, match="'per-sender' must be hashable, got list"):
        await keyed.acquire(["+15550100"])
    with pytest.raises(TypeError, match="hashable"):
        await keyed.try_acquire({"sender": 1})
