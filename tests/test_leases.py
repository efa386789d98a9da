"""CallLeases in memory: exact, on a ManualClock, on asyncio and trio."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

from resilient_voice import CallLeases, CapacityExhaustedError, Lease, RejectedError
from resilient_voice.events import (
    CapacityChanged,
    Event,
    LeaseAcquired,
    LeaseRefused,
    LeaseReleased,
    LeaseWaiting,
)
from resilient_voice.leases import LeaseStatistics
from resilient_voice.leases._core import LeaseTable
from resilient_voice.leases._store import InMemoryLeaseStore
from resilient_voice.testing import ManualClock
from resilient_voice.testing._manual_clock import _wait_all_tasks_blocked as settle


def make(capacity: int = 2, **kwargs: Any) -> tuple[CallLeases, ManualClock]:
    clock = kwargs.pop("clock", None) or ManualClock()
    kwargs.setdefault("ttl", 600.0)
    return CallLeases("acct", capacity, clock=clock, **kwargs), clock


class Log:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"name": ""}, ValueError, "name"),
        ({"name": "a{b}"}, ValueError, "name"),
        ({"name": 3}, TypeError, "name"),
        ({"capacity": 0}, ValueError, "capacity"),
        ({"capacity": 1.5}, TypeError, "capacity"),
        ({"capacity": True}, TypeError, "capacity"),
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": math.inf}, ValueError, "ttl"),
        ({"ttl": "1"}, TypeError, "ttl"),
        ({"capacity_recovery": 0}, ValueError, "capacity_recovery"),
        ({"capacity_recovery": math.nan}, ValueError, "capacity_recovery"),
        ({"on_backend_error": "panic"}, ValueError, "on_backend_error"),
        ({"clock": object()}, TypeError, "clock"),
        ({"store": object()}, TypeError, "store"),
        ({"listeners": [1]}, TypeError, "listeners"),
    ],
)
def test_bad_configuration_is_refused_at_construction(
    kwargs: dict[str, Any], error: type[Exception], argument: str
) -> None:
    arguments: dict[str, Any] = {"name": "acct", "capacity": 2, "ttl": 60.0, **kwargs}
    with pytest.raises(error, match=argument):
        CallLeases(**arguments)


def test_capacity_exhausted_is_a_rejection() -> None:
    error = CapacityExhaustedError("acct", 1.5, reason="deadline")
    assert isinstance(error, RejectedError)
    assert (error.leases, error.retry_after, error.reason) == ("acct", 1.5, "deadline")
    assert "acct" in str(error)
    assert "unknown" in str(CapacityExhaustedError("acct", None))


async def test_acquire_bind_release_by_call_id() -> None:
    leases, _clock = make()
    lease = await leases.acquire()
    assert isinstance(lease, Lease)
    assert (lease.generation, lease.acquired_at, lease.call_id) == (1, 0.0, None)
    bound = await leases.bind(lease, "CA1")
    assert (bound.id, bound.generation, bound.call_id) == (lease.id, 1, "CA1")
    assert leases.statistics().in_use == 1
    assert await leases.release("CA1") is True
    assert await leases.release("CA1") is False
    assert await bound.release() is False
    assert leases.statistics().in_use == 0
    assert leases.statistics().released == 1


async def test_generations_increase_over_the_whole_set() -> None:
    leases, _ = make(3)
    first = await leases.acquire()
    second = await leases.acquire()
    await first.release()
    third = await leases.acquire()
    assert [first.generation, second.generation, third.generation] == [1, 2, 3]
    assert len({first.id, second.id, third.id}) == 3


async def test_lease_release_is_idempotent_and_counts_once() -> None:
    log = Log()
    leases, _ = make(listeners=[log])
    lease = await leases.acquire()
    assert await lease.release() is True
    assert await lease.release() is False
    assert await leases.release(lease) is False
    assert [(e.reason, e.in_use) for e in log.of(LeaseReleased)] == [("lease", 0)]


async def test_release_of_unknown_ids_is_harmless() -> None:
    leases, _ = make()
    assert await leases.release("never-seen") is False
    assert await leases.release("never-seen", generation=4) is False
    detached = Lease("nope", 9, 0.0)
    assert await detached.release() is False
    assert await leases.release(detached) is False
    assert leases.statistics().released == 0


async def test_a_stale_generation_frees_nothing() -> None:
    leases, _ = make()
    lease = await leases.bind(await leases.acquire(), "CA1")
    assert await leases.release("CA1", generation=lease.generation + 1) is False
    assert leases.statistics().in_use == 1
    assert await leases.release(lease, generation=lease.generation + 1) is False
    assert await leases.release("CA1", generation=lease.generation) is True
    assert leases.statistics().in_use == 0


async def test_a_release_before_the_bind_frees_the_slot_at_the_bind() -> None:
    log = Log()
    leases, clock = make(listeners=[log])
    lease = await leases.acquire()
    assert await leases.release("CA1", generation=lease.generation) is False
    assert leases.statistics().in_use == 1
    clock.advance(5)
    bound = await leases.bind(lease, "CA1")
    assert bound.call_id == "CA1"
    assert leases.statistics().in_use == 0
    assert [(e.reason, e.call_id) for e in log.of(LeaseReleased)] == [("webhook", "CA1")]
    assert await leases.release("CA1") is False


async def test_an_early_release_of_another_generation_does_not_free_the_bind() -> None:
    leases, _ = make()
    lease = await leases.acquire()
    await leases.release("CA1", generation=lease.generation + 7)
    await leases.bind(lease, "CA1")
    assert leases.statistics().in_use == 1


def in_memory(capacity: int = 3, **kwargs: Any) -> tuple[CallLeases, LeaseTable, ManualClock]:
    """A set whose table the test reads (its early releases are not in the statistics)."""
    clock = ManualClock()
    store = InMemoryLeaseStore(clock=clock)
    kwargs.setdefault("ttl", 600.0)
    leases = CallLeases("acct", capacity, clock=clock, store=store, **kwargs)
    return leases, store.table("acct"), clock


def early(table: LeaseTable) -> list[str]:
    return [call_id for call_id, _, _ in table.early()]


async def test_an_early_release_is_forgotten_with_the_last_lease_it_could_be_for() -> None:
    """``ttl`` stays the upper bound: every lease acquired before the release is reclaimed by
    then, and the release goes with the last of them."""
    leases, table, clock = in_memory(ttl=100.0)
    pending = await leases.acquire()
    clock.advance(50)
    await leases.release("CA1")
    assert early(table) == ["CA1"]
    clock.advance(49)
    later = await leases.acquire()  # acquired after the release: it cannot be CA1's
    assert early(table) == ["CA1"]
    clock.advance(1)  # ``pending`` reclaimed at 100 s; the release is 50 s old
    await leases.bind(later, "CA1")
    assert early(table) == []
    assert leases.statistics().in_use == 1
    assert leases.statistics().reclaimed_by_ttl == 1
    assert pending.id not in {r.id for r in table.held()}


async def test_replays_of_finished_calls_record_nothing_while_no_lease_is_unbound() -> None:
    leases, table, clock = in_memory()
    done = await leases.bind(await leases.acquire(), "CA-done")
    assert await leases.release("CA-done", generation=done.generation) is True
    await leases.bind(await leases.acquire(), "CA-live")  # held, but bound
    for _ in range(1000):
        clock.advance(0.1)
        assert await leases.release("CA-done", generation=done.generation) is False
        assert await leases.release("CA-done") is False
        assert await leases.release(f"CA-never-{clock.now()}") is False
    assert early(table) == []
    assert leases.statistics().in_use == 1


async def test_an_early_release_naming_a_generation_needs_that_lease_unbound() -> None:
    leases, table, _ = in_memory()
    bound = await leases.bind(await leases.acquire(), "CA-bound")
    pending = await leases.acquire()
    await leases.release("CA-x", generation=bound.generation)  # bound to another call
    await leases.release("CA-x", generation=pending.generation + 1)  # no such lease yet
    assert early(table) == []
    await leases.release("CA-x", generation=pending.generation)
    assert early(table) == ["CA-x"]
    assert (await leases.bind(pending, "CA-x")).call_id == "CA-x"
    assert early(table) == []
    assert leases.statistics().in_use == 1  # the early release freed ``pending`` at its bind


async def test_an_early_release_goes_once_every_older_lease_is_bound_or_released() -> None:
    leases, table, clock = in_memory(4)
    first = await leases.acquire()
    clock.advance(1)
    second = await leases.acquire()
    clock.advance(1)
    await leases.release("CA-early")  # webhooks raced two pending creates
    await leases.release("CA-other")
    assert early(table) == ["CA-early", "CA-other"]
    clock.advance(1)
    third = await leases.acquire()  # after the releases: never theirs
    await leases.bind(first, "CA-first")
    assert early(table) == ["CA-early", "CA-other"]  # ``second`` may still be theirs
    await second.release()  # its create failed for certain
    assert early(table) == []  # ``third`` is still unbound, but younger than both
    # A flood of replays while ``third`` is pending is kept until ``third`` is bound.
    for index in range(500):
        await leases.release(f"CA-replay-{index}")
    assert len(table.early()) == 500
    await leases.bind(third, "CA-third")
    assert early(table) == []
    assert leases.statistics().in_use == 2


async def test_full_set_with_timeout_zero_or_past_deadline_refuses_at_once() -> None:
    log = Log()
    leases, clock = make(1, listeners=[log], ttl=50.0)
    await leases.acquire()
    clock.advance(10)
    with pytest.raises(CapacityExhaustedError) as caught:
        await leases.acquire(timeout=0)
    assert caught.value.retry_after == 40.0
    assert caught.value.leases == "acct"
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(deadline=clock.now() - 1)
    assert leases.statistics().refused == 2
    assert [e.retry_after for e in log.of(LeaseRefused)] == [40.0, 40.0]


async def test_a_past_deadline_refuses_even_with_a_free_slot() -> None:
    leases, clock = make(1)
    clock.advance(5)
    with pytest.raises(CapacityExhaustedError) as caught:
        await leases.acquire(deadline=4.0)
    assert caught.value.retry_after is None
    assert (await leases.acquire(timeout=0)).generation == 1


async def test_bad_acquire_arguments() -> None:
    leases, _ = make()
    with pytest.raises(ValueError, match="timeout"):
        await leases.acquire(timeout=-1)
    with pytest.raises(ValueError, match="deadline"):
        await leases.acquire(deadline=math.nan)
    with pytest.raises(TypeError, match="priority"):
        await leases.acquire(priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await leases.release(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="call_id"):
        await leases.bind(await leases.acquire(), 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Lease"):
        await leases.bind("x", "CA1")  # type: ignore[arg-type]


async def test_a_waiter_gets_the_slot_a_release_frees() -> None:
    log = Log()
    leases, clock = make(1, listeners=[log])
    held = await leases.acquire()
    got: list[Lease] = []

    async def wait() -> None:
        got.append(await leases.acquire(timeout=30))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await settle()
        assert leases.statistics().waiting == 1
        clock.advance(3)
        await held.release()
    assert got[0].generation == 2
    assert got[0].acquired_at == 3.0
    acquired = log.of(LeaseAcquired)
    assert [(e.generation, e.waited) for e in acquired] == [(1, 0.0), (2, 3.0)]
    assert [e.waiting for e in log.of(LeaseWaiting)] == [1, 0]


async def test_waiters_are_served_by_priority_then_first_come() -> None:
    leases, _ = make(1)
    held = await leases.acquire()
    order: list[str] = []

    async def wait(label: str, priority: int) -> None:
        lease = await leases.acquire(priority=priority)
        order.append(label)
        await lease.release()

    async with anyio.create_task_group() as tg:
        for label, priority in [("a0", 0), ("b0", 0), ("c5", 5), ("d0", 0), ("e5", 5), ("f9", 9)]:
            tg.start_soon(wait, label, priority)
            await settle()
        await held.release()
    assert order == ["f9", "c5", "e5", "a0", "b0", "d0"]


async def test_a_waiter_times_out_at_its_deadline_exactly() -> None:
    leases, clock = make(1, ttl=100.0)
    await leases.acquire()
    outcome: list[object] = []

    async def wait() -> None:
        try:
            await leases.acquire(timeout=10)
        except CapacityExhaustedError as error:
            outcome.append((clock.now(), error.retry_after))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await settle()
        clock.advance(9.5)
        await settle()
        assert outcome == []
        clock.advance(0.5)
    assert outcome == [(10.0, 90.0)]
    assert leases.statistics().waiting == 0
    assert leases.statistics().refused == 1


async def test_a_cancelled_waiter_strands_nothing() -> None:
    leases, _ = make(1)
    held = await leases.acquire()
    got: list[Lease] = []

    async def wait() -> None:
        got.append(await leases.acquire())

    first = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_run_in, first, leases)
        await settle()
        tg.start_soon(wait)
        await settle()
        first.cancel()
        await settle()
        await held.release()
    assert len(got) == 1
    assert leases.statistics().in_use == 1
    assert leases.statistics().waiting == 0


async def _run_in(scope: anyio.CancelScope, leases: CallLeases) -> None:
    with scope:
        await leases.acquire()


async def test_a_waiter_cancelled_right_after_a_release_woke_it_passes_the_slot_on() -> None:
    leases, _ = make(1)
    held = await leases.acquire()
    got: list[Lease] = []
    first = anyio.CancelScope()

    async def cancelled() -> None:
        with first:
            got.append(await leases.acquire())

    async def wait() -> None:
        got.append(await leases.acquire())

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled)
        await settle()
        tg.start_soon(wait)
        await settle()
        # The release wakes the first waiter; it is cancelled before it runs.
        await held.release()
        first.cancel()
    assert [lease.generation for lease in got] == [2]
    assert leases.statistics().in_use == 1
    assert leases.statistics().waiting == 0


async def test_a_newcomer_does_not_overtake_a_woken_waiter() -> None:
    leases, _ = make(1)
    held = await leases.acquire()
    order: list[str] = []

    async def wait(label: str) -> None:
        await leases.acquire()
        order.append(label)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "queued")
        await settle()
        await held.release()
        # The slot is free but its waiter has not run yet: a newcomer queues behind it.
        with pytest.raises(CapacityExhaustedError):
            await leases.acquire(timeout=0)
        tg.start_soon(wait, "newcomer")
        await settle()
        assert order == ["queued"]
        tg.cancel_scope.cancel()


async def test_leaked_leases_are_reclaimed_after_the_ttl() -> None:
    log = Log()
    leases, clock = make(2, ttl=60.0, listeners=[log])
    a = await leases.bind(await leases.acquire(), "CA1")
    clock.advance(30)
    await leases.acquire()
    clock.advance(29.5)
    assert leases.statistics().in_use == 2
    clock.advance(0.5)
    stats = leases.statistics()
    assert (stats.in_use, stats.reclaimed_by_ttl) == (1, 1)
    assert [(e.lease_id, e.call_id, e.reason) for e in log.of(LeaseReleased)] == [
        (a.id, "CA1", "ttl")
    ]
    assert await leases.release("CA1") is False
    clock.advance(30)
    assert leases.statistics().in_use == 0
    assert leases.statistics().reclaimed_by_ttl == 2


async def test_a_waiter_is_served_when_a_ttl_runs_out() -> None:
    leases, clock = make(1, ttl=60.0)
    clock.advance(1)
    await leases.acquire()
    got: list[float] = []

    async def wait() -> None:
        await leases.acquire()
        got.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await settle()
        clock.advance(59.9)
        await settle()
        assert got == []
        clock.advance(0.1)
    assert got == [61.0]


async def test_reconcile_frees_bound_leases_missing_from_the_list() -> None:
    log = Log()
    leases, clock = make(5, listeners=[log])
    a = await leases.bind(await leases.acquire(), "CA1")
    await leases.bind(await leases.acquire(), "CA2")
    unbound = await leases.acquire()
    unknown = await leases.mark_unknown(await leases.acquire(), "att-1")
    assert unknown.attempt_id == "att-1"
    clock.advance(1)
    assert await leases.reconcile(["CA2"]) == 1
    stats = leases.statistics()
    assert (stats.in_use, stats.reclaimed_by_reconcile) == (3, 1)
    assert [(e.lease_id, e.reason) for e in log.of(LeaseReleased)] == [(a.id, "reconcile")]
    assert await leases.reconcile([]) == 1  # CA2 now; the unbound and unknown leases stay
    assert leases.statistics().in_use == 2
    assert [lease.id for lease in await leases.unknown()] == [unknown.id]
    assert await unbound.release() is True


async def test_reconcile_never_frees_a_lease_bound_or_acquired_after_as_of() -> None:
    leases, clock = make(5)
    old = await leases.bind(await leases.acquire(), "CA-old")
    clock.advance(10)
    as_of = clock.now()
    clock.advance(1)
    late_bound_lease = await leases.acquire()
    await leases.bind(late_bound_lease, "CA-new")
    clock.advance(1)
    # Acquired before as_of but bound after it.
    assert await leases.reconcile([], as_of=as_of) == 1
    assert await leases.release("CA-old") is False
    assert await leases.release("CA-new") is True
    early = await leases.acquire()
    clock.advance(5)
    as_of = clock.now()
    await leases.bind(early, "CA-early")  # bound exactly at as_of: not before it
    assert await leases.reconcile([], as_of=as_of) == 0
    with pytest.raises(ValueError, match="as_of"):
        await leases.reconcile([], as_of=clock.now() + 1)
    with pytest.raises(TypeError, match="live_call_ids"):
        await leases.reconcile("CA1")
    assert old.call_id == "CA-old"


async def test_unknown_leases_are_listed_until_bound_or_released() -> None:
    leases, clock = make(3)
    clock.advance(2)
    a = await leases.mark_unknown(await leases.acquire(), "att-a")
    b = await leases.mark_unknown(await leases.acquire(), "att-b")
    clock.advance(1)
    listed = await leases.unknown()
    assert [(x.id, x.attempt_id, x.acquired_at) for x in listed] == [
        (a.id, "att-a", 2.0),
        (b.id, "att-b", 2.0),
    ]
    bound = await leases.bind(listed[0], "CA1")
    assert bound.attempt_id is None
    await listed[1].release()
    assert await leases.unknown() == ()
    assert leases.statistics().in_use == 1


async def test_a_signal_halves_the_capacity_and_it_recovers_by_one_per_interval() -> None:
    log = Log()
    leases, clock = make(10, capacity_recovery=30.0, listeners=[log])
    await leases.signal_capacity("twilio:10004")
    assert leases.statistics().effective_capacity == 5
    await leases.signal_capacity("twilio:10004")
    assert leases.statistics().effective_capacity == 2
    clock.advance(29.9)
    assert leases.statistics().effective_capacity == 2
    clock.advance(0.1)
    assert leases.statistics().effective_capacity == 3
    clock.advance(60)
    assert leases.statistics().effective_capacity == 5
    clock.advance(1000)
    assert leases.statistics().effective_capacity == 10
    changes = [(e.old, e.new, e.cause) for e in log.of(CapacityChanged)]
    assert changes == [
        (10, 5, "signal"),
        (5, 2, "signal"),
        (2, 3, "recovery"),
        (3, 5, "recovery"),
        (5, 10, "recovery"),
    ]
    assert leases.statistics().capacity_signals == 2


async def test_capacity_never_drops_below_one() -> None:
    leases, _ = make(2)
    for _ in range(4):
        await leases.signal_capacity("vapi:concurrency")
    assert leases.statistics().effective_capacity == 1
    assert (await leases.acquire(timeout=0)).generation == 1
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)


async def test_held_leases_over_a_halved_capacity_block_new_ones() -> None:
    leases, clock = make(4, capacity_recovery=10.0)
    held = [await leases.acquire() for _ in range(4)]
    await leases.signal_capacity("twilio:10004")
    await held[0].release()
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)
    await held[1].release()
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)
    await held[2].release()
    assert (await leases.acquire(timeout=0)).generation == 5
    got: list[float] = []

    async def wait() -> None:
        await leases.acquire()
        got.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await settle()
        clock.advance(10)  # recovery to 3 admits the waiter
    assert got == [10.0]


async def test_provider_limits_set_the_capacity() -> None:
    log = Log()
    leases, clock = make(10, listeners=[log])
    await leases.observe_provider_limits(concurrency_limit=4)
    assert leases.statistics().effective_capacity == 4
    await leases.observe_provider_limits(concurrency_limit=40)
    assert leases.statistics().effective_capacity == 10
    for _ in range(3):
        await leases.acquire()
    await leases.observe_provider_limits(remaining=2)
    assert leases.statistics().effective_capacity == 5
    await leases.observe_provider_limits(remaining=0)
    assert leases.statistics().effective_capacity == 3
    await leases.observe_provider_limits(concurrency_limit=8, remaining=20)
    assert leases.statistics().effective_capacity == 8
    await leases.observe_provider_limits(concurrency_limit=0)
    assert leases.statistics().effective_capacity == 1
    await leases.observe_provider_limits()
    assert leases.statistics().effective_capacity == 1
    changes = [(e.old, e.new, e.cause) for e in log.of(CapacityChanged)]
    assert changes == [
        (10, 4, "provider"),
        (4, 10, "provider"),
        (10, 5, "provider"),
        (5, 3, "provider"),
        (3, 8, "provider"),
        (8, 1, "provider"),
    ]
    with pytest.raises(ValueError, match="remaining"):
        await leases.observe_provider_limits(remaining=-1)
    with pytest.raises(TypeError, match="concurrency_limit"):
        await leases.observe_provider_limits(concurrency_limit=2.5)  # type: ignore[arg-type]
    assert clock.now() == 0.0


async def test_statistics_and_repr() -> None:
    leases, _ = make(3)
    await leases.acquire()
    stats = leases.statistics()
    assert stats == LeaseStatistics(
        name="acct",
        capacity=3,
        effective_capacity=3,
        in_use=1,
        waiting=0,
        acquired=1,
        refused=0,
        released=0,
        reclaimed_by_ttl=0,
        reclaimed_by_reconcile=0,
        capacity_signals=0,
    )
    assert "acct" in repr(leases)
    assert (leases.name, leases.capacity, leases.ttl, leases.capacity_recovery) == (
        "acct",
        3,
        600.0,
        30.0,
    )


async def test_lease_repr_and_equality_ignore_the_owner() -> None:
    leases, _ = make()
    lease = await leases.acquire()
    assert "owner" not in repr(lease)
    assert lease == Lease(lease.id, lease.generation, lease.acquired_at)


async def test_nothing_is_built_for_listeners_when_none_listen() -> None:
    leases, _ = make(1)
    lease = await leases.acquire()
    seen = Log()
    leases.add_listener(seen)
    await lease.release()
    assert [type(e).__name__ for e in seen.events] == ["LeaseReleased"]


async def test_prometheus_metrics_follow_the_lease_set() -> None:
    from prometheus_client import CollectorRegistry

    from resilient_voice.metrics import PrometheusMetrics

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    leases, clock = make(2, ttl=60.0, listeners=[metrics])

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"resilient_voice_{name}", {"leases": "acct", **labels})

    a = await leases.bind(await leases.acquire(), "CA1")
    b = await leases.acquire()
    assert value("leases_acquired_total") == 2
    assert value("leases_in_use") == 2
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)
    assert value("leases_refused_total") == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(leases.acquire)
        await settle()
        assert value("leases_waiting") == 1
        await leases.release("CA1")
    assert value("leases_waiting") == 0
    assert value("leases_released_total", reason="webhook") == 1
    await b.release()
    assert value("leases_released_total", reason="lease") == 1
    await leases.signal_capacity("twilio:10004")
    assert value("leases_capacity_signals_total") == 1
    assert value("leases_effective_capacity") == 1
    clock.advance(60)
    leases.statistics()
    assert value("leases_released_total", reason="ttl") == 1
    assert value("leases_in_use") == 0
    assert a.call_id == "CA1"


async def test_an_unknown_mark_keeps_its_context_and_time_until_the_bind() -> None:
    leases, _, clock = in_memory()
    lease = await leases.acquire()
    clock.advance(40)
    context = "|".join(["x" * 100] * 10)[:1024]  # at the bound, with the Redis separator
    marked = await leases.mark_unknown(lease, "att-1", context=context)
    assert (marked.marked_at, marked.context) == (40.0, context)
    clock.advance(5)
    (listed,) = await leases.unknown()
    assert (listed.acquired_at, listed.marked_at, listed.context) == (0.0, 40.0, context)
    assert listed == marked  # equality as before: the mark's details are not compared
    plain = await leases.mark_unknown(await leases.acquire(), "att-2")  # the old call
    assert (plain.marked_at, plain.context) == (45.0, None)
    await leases.bind(marked, "CA1")
    assert [x.attempt_id for x in await leases.unknown()] == ["att-2"]


@pytest.mark.parametrize(
    ("context", "error", "match"),
    [
        (b"{}", TypeError, "context must be a str or None, got bytes"),
        (7, TypeError, "context must be a str or None, got int"),
        ("", ValueError, "context must not be empty"),
        ("x" * 1025, ValueError, "context is 1025 characters; at most 1024"),
        ('{"to":"a\nb"}', ValueError, "context must hold printable characters only"),
    ],
)
async def test_mark_unknown_refuses_a_bad_context(
    context: Any, error: type[Exception], match: str
) -> None:
    leases, _, _ = in_memory()
    lease = await leases.acquire()
    with pytest.raises(error, match=match):
        await leases.mark_unknown(lease, "att-1", context=context)
    assert await leases.unknown() == ()  # nothing was marked
