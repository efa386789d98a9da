"""The lease table against a plain model, driven by random sequences of operations.

Hypothesis interleaves acquires, binds, releases by lease and by call id (with right, stale and
missing generations, before and after the bind), unknown marks, reconciliations, capacity
signals, provider observations and clock advances. Invariants: a lease is only granted while
fewer than the effective capacity are held, never more than ``capacity`` are held, and every
lease is freed at most once (by whatever path: release, webhook, reconcile or TTL), and the
table's leases are the model's.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from resilient_voice.leases._core import LeaseRecord, LeaseTable


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
        which=st.sampled_from(["right", "stale", "any", "future"]),
    )
    def webhook(self, lease: str, which: str) -> None:
        self._expire()
        record = self.held.get(lease)
        if which == "future":
            # A webhook for a call not bound yet: kept, and the next bind of that id frees.
            self.table.release_call(f"CA{self.calls + 1}", None, self.now)
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
        self.table.mark_unknown(lease, "att")

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


LeaseMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_lease_table = LeaseMachine.TestCase
