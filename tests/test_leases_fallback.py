"""CallLeases on a remote store, exact: a flaky in-memory store stands in for Redis.

The remote path (shielded round trips, a watch for wake-ups, a bounded poll) and the
``on_backend_error`` fallback (a local share, allow, deny, replay of releases made during an
outage) on a ManualClock, on asyncio and trio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from resilient_voice import CallLeases, CapacityExhaustedError, Lease
from resilient_voice.events import Event, StoreAvailabilityChanged
from resilient_voice.leases import LeaseStore
from resilient_voice.leases._store import Grant, InMemoryLeaseStore, LeaseView, Stored
from resilient_voice.limiter import StoreUnavailableError
from resilient_voice.testing import ManualClock
from resilient_voice.testing._manual_clock import _wait_all_tasks_blocked as settle


class FlakyStore:
    """A remote store: the in-memory reference, which fails on demand like an unreachable Redis.

    ``live`` is what it reports as live replicas; ``wakers`` are the watches registered.
    """

    def __init__(self, clock: ManualClock, live: int = 1) -> None:
        self.inner = InMemoryLeaseStore(clock=clock)
        self.down = False
        self.live = live
        self.calls = 0
        self.wakers: list[Callable[[], None]] = []

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailableError("Redis failed: ConnectionError")

    def declare_leases(self, name: str, capacity: int, ttl: float, recovery: float) -> None:
        self.inner.declare_leases(name, capacity, ttl, recovery)

    def live_lease_replicas(self, name: str) -> int:
        return self.live

    def lease_view(self, name: str) -> LeaseView:
        return self.inner.lease_view(name)

    async def lease_acquire(self, name: str, extra: int = 0) -> tuple[Grant | None, LeaseView]:
        self._check()
        return await self.inner.lease_acquire(name, extra)

    async def lease_queue(
        self, name: str, priority: int, ticket: str | None, wait: bool, extra: int = 0
    ) -> tuple[Grant | None, str | None, LeaseView]:
        self._check()
        return await self.inner.lease_queue(name, priority, ticket, wait, extra)

    async def lease_leave(self, name: str, ticket: str) -> None:
        self._check()
        await self.inner.lease_leave(name, ticket)
        for wake in list(self.wakers):
            wake()

    async def lease_bind(self, name: str, lease_id: str, call_id: str) -> tuple[bool, LeaseView]:
        self._check()
        return await self.inner.lease_bind(name, lease_id, call_id)

    async def lease_release(self, name: str, lease_id: str) -> tuple[str | None, bool, LeaseView]:
        self._check()
        return await self.inner.lease_release(name, lease_id)

    async def lease_release_call(
        self, name: str, call_id: str, generation: int | None
    ) -> tuple[str | None, LeaseView]:
        self._check()
        answer = await self.inner.lease_release_call(name, call_id, generation)
        if answer[0] is not None:
            for wake in list(self.wakers):
                wake()
        return answer

    async def lease_mark_unknown(
        self, name: str, lease_id: str, attempt_id: str, context: str | None = None
    ) -> bool:
        self._check()
        return await self.inner.lease_mark_unknown(name, lease_id, attempt_id, context)

    async def lease_unknown(self, name: str) -> list[Stored]:
        self._check()
        return await self.inner.lease_unknown(name)

    async def lease_reconcile(
        self, name: str, live: frozenset[str], as_of: float, age: float
    ) -> tuple[list[tuple[str, str | None]], LeaseView]:
        self._check()
        return await self.inner.lease_reconcile(name, live, as_of, age)

    async def lease_capacity(
        self, name: str, signal: bool, concurrency_limit: int | None, remaining: int | None
    ) -> tuple[int, int, LeaseView]:
        self._check()
        return await self.inner.lease_capacity(name, signal, concurrency_limit, remaining)

    async def lease_watch(
        self,
        name: str,
        wake: Callable[[], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self.wakers.append(wake)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            if wake in self.wakers:  # a test may drop it (a lost subscription)
                self.wakers.remove(wake)


def make(
    capacity: int = 2, live: int = 1, **kwargs: Any
) -> tuple[CallLeases, FlakyStore, ManualClock, list[Event]]:
    clock = ManualClock()
    store = FlakyStore(clock, live)
    events: list[Event] = []
    leases = CallLeases(
        "acct", capacity, ttl=600.0, clock=clock, store=store, listeners=[events.append], **kwargs
    )
    return leases, store, clock, events


def availability(events: list[Event]) -> list[bool]:
    return [e.available for e in events if isinstance(e, StoreAvailabilityChanged)]


def test_the_fake_is_a_lease_store() -> None:
    assert isinstance(FlakyStore(ManualClock()), LeaseStore)


async def test_the_remote_path_follows_the_contract() -> None:
    leases, store, _, _ = make(2)
    lease = await leases.bind(await leases.acquire(), "CA1")
    await leases.acquire()
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)
    assert await leases.release("CA1", generation=lease.generation) is True
    assert await leases.release("CA1") is False
    assert leases.statistics().in_use == 1
    assert store.calls == 6


async def test_a_remote_waiter_is_woken_by_the_watch() -> None:
    leases, store, clock, _ = make(1)
    other = CallLeases("acct", 1, ttl=600.0, clock=clock, store=store)  # another replica
    held = await other.bind(await other.acquire(), "CA1")
    got: list[float] = []

    async def wait() -> None:
        await leases.acquire()
        got.append(clock.now())

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait)
        await settle()
        assert len(store.wakers) == 1  # the front waiter watches
        clock.advance(1.0)  # less than the 2 s poll
        await other.release("CA1", generation=held.generation)
    assert got == [1.0]
    assert store.wakers == []


async def test_a_remote_waiter_polls_when_no_wake_up_comes() -> None:
    leases, store, clock, _ = make(1)
    other = CallLeases("acct", 1, ttl=600.0, clock=clock, store=store)
    held = await other.acquire()
    got: list[float] = []

    async def wait() -> None:
        await leases.acquire()
        got.append(clock.now())

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait)
        await settle()
        store.wakers.clear()  # a lost message
        await held.release()
        await settle()
        assert got == []
        clock.advance(2.0)
    assert got == [2.0]


async def test_local_fallback_grants_this_replicas_share_and_recovers() -> None:
    leases, store, clock, events = make(6, live=3)
    shared = await leases.bind(await leases.acquire(), "CA-shared")
    store.down = True
    local = [await leases.acquire(timeout=0) for _ in range(2)]  # 6 // 3 replicas
    assert [lease.id.startswith("local-") for lease in local] == [True, True]
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)
    assert availability(events) == [False]
    # During the outage: a webhook for the shared lease is kept; local leases stay local.
    assert await leases.release("CA-shared", generation=shared.generation) is False
    await leases.bind(local[0], "CA-local")
    assert await leases.release("CA-local") is True
    assert store.inner.lease_view("acct").in_use == 1
    store.down = False
    clock.advance(1.0)  # past the first re-probe (0.5 s +-20 %)
    back = await leases.acquire(timeout=0)
    assert not back.id.startswith("local-")
    assert availability(events) == [False, True]
    # The kept release was replayed: only the new shared lease is held in the store.
    assert store.inner.lease_view("acct").in_use == 1
    # The local lease still held counts against this replica's shared acquires: 6 - 1.
    more = []
    while True:
        try:
            more.append(await leases.acquire(timeout=0))
        except CapacityExhaustedError:
            break
    assert len(more) + 1 == 5
    assert await local[1].release() is True


async def test_a_failed_probe_backs_off_and_calls_in_between_stay_local() -> None:
    leases, store, clock, _ = make(2)
    store.down = True
    await leases.acquire(timeout=0)
    calls = store.calls
    await leases.acquire(timeout=0)  # before the re-probe: answered locally
    assert store.calls == calls
    clock.advance(0.61)  # the first re-probe (0.5 s +-20 %) is due
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)
    assert store.calls == calls + 1


async def test_allow_grants_everything_while_down() -> None:
    leases, store, _, _ = make(1, on_backend_error="allow")
    store.down = True
    first = await leases.acquire(timeout=0)
    second = await leases.acquire(timeout=0)
    assert first.id.startswith("allow-")
    assert second.generation == first.generation + 1
    assert await leases.bind(first, "CA1") == Lease(
        first.id, first.generation, first.acquired_at, "CA1"
    )
    assert await first.release() is False


async def test_deny_refuses_while_down_and_waiters_resume_after() -> None:
    leases, store, clock, _ = make(1, on_backend_error="deny")
    store.down = True
    with pytest.raises(CapacityExhaustedError):
        await leases.acquire(timeout=0)
    got: list[Lease] = []

    async def wait() -> None:
        got.append(await leases.acquire(timeout=30.0))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait)
        await settle()
        store.down = False
        clock.advance(2.0)
        await settle()
        clock.advance(2.0)
    assert len(got) == 1
    assert not got[0].id.startswith("allow-")


async def test_unknown_reconcile_and_capacity_survive_an_outage() -> None:
    leases, store, clock, _ = make(4)
    remote = await leases.mark_unknown(await leases.acquire(), "att-remote")
    store.down = True
    local = await leases.mark_unknown(await leases.acquire(timeout=0), "att-local")
    assert [x.attempt_id for x in await leases.unknown()] == ["att-local"]
    await leases.bind(await leases.acquire(timeout=0), "CA-local")
    clock.advance(1.0)
    assert await leases.reconcile([]) == 1  # the local binding
    await leases.signal_capacity("twilio:10004")
    assert leases.statistics().capacity_signals == 1
    store.down = False
    clock.advance(3.0)  # past the second re-probe (1 s +-20 % after the first)
    assert {x.attempt_id for x in await leases.unknown()} == {"att-remote", "att-local"}
    assert (remote.attempt_id, local.attempt_id) == ("att-remote", "att-local")


async def test_an_unknown_mark_made_during_an_outage_keeps_its_context() -> None:
    """A mark of a shared lease that could not reach the store is replayed with its context;
    its time is the replay's (later: settle_after then holds the slot longer, never shorter).
    A local lease keeps its mark in the local table."""
    leases, store, clock, _ = make(4)
    shared = await leases.acquire()
    store.down = True
    await leases.mark_unknown(shared, "att-shared", context='{"to":"+1"}')
    local = await leases.mark_unknown(await leases.acquire(timeout=0), "att-local", context="x")
    assert [(x.attempt_id, x.context) for x in await leases.unknown()] == [("att-local", "x")]
    assert local.marked_at == clock.now()
    store.down = False
    clock.advance(3.0)  # past the second re-probe (1 s +-20 % after the first)
    await leases.unknown()  # the probe: answered, then the kept mark is replayed
    listed = {x.attempt_id: x for x in await leases.unknown()}
    assert listed["att-shared"].context == '{"to":"+1"}'
    assert listed["att-shared"].marked_at == clock.now()  # marked in the store at the replay
    assert (listed["att-local"].context, listed["att-local"].marked_at) == ("x", 0.0)


async def test_a_webhook_that_beats_a_local_leases_bind_frees_it_at_the_bind() -> None:
    """During an outage the release goes to the store (kept for replay) and to the local table,
    which keeps it as an early release while a local lease is unbound."""
    leases, store, clock, _ = make(4)
    done = await leases.bind(await leases.acquire(), "CA-done")
    store.down = True
    local = await leases.acquire(timeout=0)
    assert local.id.startswith("local-")
    assert await leases.release("CA-local", generation=local.generation) is False
    table = store_of(leases).table("acct")
    assert [call_id for call_id, _, _ in table.early()] == ["CA-local"]
    await leases.bind(local, "CA-local")
    assert table.in_use == 0
    assert table.early() == []
    store.down = False
    clock.advance(1.0)  # past the first re-probe (0.5 s +-20 %)
    # The replayed release finds no unbound lease in the store: nothing is kept there.
    assert await leases.release("CA-done", generation=done.generation) is True
    assert store.inner.table("acct").early() == []
    assert leases.statistics().in_use == 0


def store_of(leases: CallLeases) -> InMemoryLeaseStore:
    """The local table's store of a set on a remote store (its fallback's)."""
    fallback = leases._store  # the fallback the facade built around it
    local = fallback._local  # type: ignore[attr-defined]
    assert isinstance(local, InMemoryLeaseStore)
    return local
