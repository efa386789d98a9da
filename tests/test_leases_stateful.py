"""The lease table against a plain model, driven by random sequences of operations.

Hypothesis interleaves acquires, binds, releases by lease and by call id (with right, stale and
missing generations, before and after the bind), unknown marks, reconciliations, capacity
signals, provider observations and clock advances. Invariants: a lease is only granted while
fewer than the effective capacity are held, never more than ``capacity`` are held, and every
lease is freed at most once (by whatever path: release, webhook, reconcile or TTL), the
table's leases are the model's, and an early release is kept only while a lease acquired before
it is unbound.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from resilient_voice import CallLeases, CapacityExhaustedError, Lease
from resilient_voice.events import CapacityChanged, Event, LeaseAcquired, LeaseReleased
from resilient_voice.leases._core import LeaseRecord, LeaseTable
from resilient_voice.testing import ManualClock
from resilient_voice.testing._manual_clock import _wait_all_tasks_blocked as settle


class LeaseMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable(1, 1.0, 1.0)
        self.now = 0.0
        self.freed: set[str] = set()
        self.held: dict[str, LeaseRecord] = {}
        self.calls = 0

    @initialize(
        capacity=st.integers(1, 6),
        ttl=st.sampled_from([5.0, 20.0, 100.0]),
        recovery=st.sampled_from([1.0, 3.0, 10.0]),
    )
    def configure(self, capacity: int, ttl: float, recovery: float) -> None:
        self.table = LeaseTable(capacity, ttl, recovery)

    def _free(self, records: list[LeaseRecord]) -> None:
        for record in records:
            assert record.id not in self.freed, "a lease was freed twice"
            assert self.held.pop(record.id) is record
            self.freed.add(record.id)

    def _expire(self) -> None:
        expired = self.table.expire(self.now)
        for record in expired:
            assert record.acquired_at + self.table.ttl <= self.now
        self._free(expired)

    @rule(target=leases)
    def acquire(self) -> str:
        self._expire()
        before = len(self.held)
        record = self.table.try_acquire(self.now)
        if record is None:
            assert before >= self.table.effective(self.now)
            return ""
        assert before < self.table.effective(self.now)
        assert all(record.generation > other.generation for other in self.held.values())
        self.held[record.id] = record
        return record.id

    @rule(lease=leases)
    def bind(self, lease: str) -> None:
        self._expire()
        self.calls += 1
        held, freed = self.table.bind(lease, f"CA{self.calls}", self.now)
        assert held == (lease in self.held)
        if freed is not None:
            self._free([freed])

    @rule(lease=consumes(leases))
    def release(self, lease: str) -> None:
        self._expire()
        record = self.table.release(lease)
        assert (record is not None) == (lease in self.held)
        if record is not None:
            self._free([record])

    @rule(
        lease=leases,
        which=st.sampled_from(["right", "stale", "any", "future", "future-generation"]),
    )
    def webhook(self, lease: str, which: str) -> None:
        self._expire()
        record = self.held.get(lease)
        if which.startswith("future"):
            # A webhook for a call not bound yet: kept while a lease (of the generation, if
            # named) is unbound, and the next bind of that id frees.
            generation = None
            if which == "future-generation":
                generation = record.generation if record is not None else 10**6
            call_id = f"CA{self.calls + 1}"
            before = {c for c, _, _ in self.table.early()}
            unbound = any(
                r.call_id is None and generation in (None, r.generation) for r in self.held.values()
            )
            self.table.release_call(call_id, generation, self.now)
            kept = {c for c, _, _ in self.table.early()}
            assert (call_id in kept) == (unbound or call_id in before)
            return
        if record is None or record.call_id is None:
            return
        generation = {
            "right": record.generation,
            "stale": record.generation - 1,
            "any": None,
        }[which]
        freed = self.table.release_call(record.call_id, generation, self.now)
        if which == "stale":
            assert freed is None
        else:
            assert freed is record
            self._free([record])

    @rule(lease=leases)
    def mark_unknown(self, lease: str) -> None:
        record = self.table.mark_unknown(lease, "att", "ctx", self.now)
        if record is not None:
            assert (record.attempt_id, record.context, record.marked_at) == ("att", "ctx", self.now)

    @rule(data=st.data())
    def reconcile(self, data: st.DataObject) -> None:
        self._expire()
        bound = [r.call_id for r in self.held.values() if r.call_id is not None]
        live = set(data.draw(st.lists(st.sampled_from(bound), unique=True))) if bound else set()
        as_of = self.now - data.draw(st.sampled_from([0.0, 0.5, 2.0]))
        gone = self.table.reconcile(live, as_of)
        for record in gone:
            assert record.call_id not in live
            assert record.bound_at is not None
            assert record.bound_at < as_of
        self._free(gone)

    @rule()
    def signal(self) -> None:
        old, new = self.table.signal(self.now)
        assert new == max(1, old // 2)

    @rule(limit=st.none() | st.integers(0, 8), remaining=st.none() | st.integers(0, 8))
    def observe(self, limit: int | None, remaining: int | None) -> None:
        self._expire()
        _, new = self.table.observe(self.now, limit, remaining)
        assert 1 <= new <= self.table.capacity

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0, 50.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def matches_the_model(self) -> None:
        assert len(self.held) <= self.table.capacity
        assert {r.id for r in self.table.held()} == set(self.held)
        assert 1 <= self.table.effective(self.now) <= self.table.capacity

    @invariant()
    def early_releases_wait_only_for_older_unbound_leases(self) -> None:
        # Each kept early release could still match a bind: a held lease acquired at or
        # before it was received (its expiry less ttl) is unbound.
        ttl = self.table.ttl
        unbound = [r for r in self.table.held() if r.call_id is None]
        for _, _, until in self.table.early():
            assert any(r.acquired_at + ttl <= until for r in unbound)


LeaseMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_lease_table = LeaseMachine.TestCase


# The facade under concurrency: random schedules of acquires (with priorities, timeouts and
# cancellations), binds, releases by lease and by call id (stale ones too), reconciliations,
# capacity signals, provider observations and clock advances, on a ManualClock. Checked from the
# events: every grant leaves at most the effective capacity in use (as last reported), a lease is
# freed at most once, and the counts add up.

_STEP = st.one_of(
    st.tuples(st.just("acquire"), st.integers(0, 2), st.sampled_from([None, 0.0, 5.0])),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("bind"), st.integers(0, 50)),
    st.tuples(st.just("webhook"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("reconcile"), st.integers(0, 50)),
    st.tuples(st.just("signal"), st.just(0)),
    st.tuples(st.just("observe"), st.integers(0, 6)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 20.0, 200.0])),
)


async def _run_facade(schedule: list[tuple[Any, ...]], capacity: int) -> None:
    clock = ManualClock()
    events: list[Event] = []
    leases = CallLeases(
        "p", capacity, ttl=100.0, clock=clock, capacity_recovery=10.0, listeners=[events.append]
    )
    effective = capacity
    held: list[Lease] = []
    scopes: list[anyio.CancelScope] = []

    def check(event: Event) -> None:
        nonlocal effective
        match event:
            case CapacityChanged(new=new):
                effective = new
            case LeaseAcquired(in_use=in_use):
                assert in_use <= effective
            case _:
                pass

    leases.add_listener(check)

    async def acquire(priority: int, timeout: float | None, scope: anyio.CancelScope) -> None:
        with scope, contextlib.suppress(CapacityExhaustedError):
            held.append(await leases.acquire(timeout=timeout, priority=priority))

    async with anyio.create_task_group() as tasks:
        for step in schedule:
            kind = step[0]
            if kind == "acquire":
                scope = anyio.CancelScope()
                scopes.append(scope)
                tasks.start_soon(acquire, step[1], step[2], scope)
            elif kind == "cancel" and scopes:
                scopes[step[1] % len(scopes)].cancel()
            elif kind == "release" and held:
                await held[step[1] % len(held)].release()
            elif kind == "bind" and held:
                index = step[1] % len(held)
                held[index] = await leases.bind(held[index], f"CA{index}")
            elif kind == "webhook" and held:
                lease = held[step[1] % len(held)]
                if lease.call_id is not None:
                    generation = lease.generation if step[2] else lease.generation + 1
                    await leases.release(lease.call_id, generation=generation)
            elif kind == "reconcile":
                bound = [x.call_id for x in held if x.call_id is not None]
                await leases.reconcile(bound[: step[1] % (len(bound) + 1)])
            elif kind == "signal":
                await leases.signal_capacity("test")
            elif kind == "observe":
                await leases.observe_provider_limits(remaining=step[1])
            elif kind == "advance":
                clock.advance(step[1])
            await settle()
        tasks.cancel_scope.cancel()
    freed = [e.lease_id for e in events if isinstance(e, LeaseReleased)]
    assert len(freed) == len(set(freed)), "a lease was freed twice"
    stats = leases.statistics()
    released = stats.released + stats.reclaimed_by_ttl + stats.reclaimed_by_reconcile
    assert stats.in_use == stats.acquired - released
    assert stats.waiting == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None)
@given(schedule=st.lists(_STEP, max_size=40), capacity=st.integers(1, 4))
def test_the_facade_never_grants_over_the_effective_capacity(
    backend: str, schedule: list[tuple[Any, ...]], capacity: int
) -> None:
    anyio.run(_run_facade, schedule, capacity, backend=backend)
