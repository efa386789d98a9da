"""The fleet's order of waiters, exact: the reference queue and two replicas on a ManualClock.

``LeaseTable.queue`` is the rule a shared store applies (Redis' script follows it); two
``CallLeases`` on one in-memory store seen as remote (``FlakyStore``) stand for two replicas,
so the facade's side (every waiter holds a ticket, the local order follows the tickets, a
waiter that gives up leaves its place) is checked without real time.
"""

from __future__ import annotations

import random

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_voice import CallLeases, CapacityExhaustedError
from resilient_voice.leases._core import LeaseTable, rank_key
from resilient_voice.leases._store import LeaseView
from resilient_voice.testing import ManualClock
from resilient_voice.testing._manual_clock import _wait_all_tasks_blocked as settle
from test_leases_fallback import FlakyStore


def test_rank_keys_sort_higher_priorities_first_and_clamp_to_64_bits() -> None:
    priorities = [2**70, 2**63 - 1, 5, 1, 0, -1, -(2**63), -(2**70)]
    keys = [rank_key(p) for p in priorities]
    assert keys == sorted(keys)
    assert all(len(k) == 16 for k in keys)
    assert keys[0] == keys[1]
    assert keys[-1] == keys[-2]


def test_the_reference_queue_grants_in_order_of_tickets() -> None:
    table = LeaseTable(1, 60.0, 30.0)
    held, _ = table.queue(0.0, 0, None, True)
    assert held is not None
    refused, first = table.queue(0.0, 0, None, True)
    _, second = table.queue(0.0, 0, None, True)
    _, urgent = table.queue(0.0, 3, None, True)
    assert refused is None
    assert first is not None
    assert second is not None
    assert urgent is not None
    assert sorted([second, first, urgent]) == [urgent, first, second]
    assert table.queue(0.0, 0, None, False) == (None, None)  # a caller that will not wait
    assert table.release(held.id) is held
    # One slot is free: only the first place in the queue may take it.
    assert table.queue(0.0, 0, first, True) == (None, first)
    assert table.queue(0.0, 9, None, False)[0] is not None  # a newcomer that outranks all
    assert table.queued == 3
    table.release(table.held()[0].id)
    assert table.queue(0.0, 0, None, False) == (None, None)  # three places come first
    assert table.queue(0.0, 3, urgent, True)[0] is not None
    assert table.queued == 2
    assert table.leave(first) is True
    assert table.leave(first) is False
    table.release(table.held()[0].id)
    assert table.queue(0.0, 0, second, True)[0] is not None
    assert table.queued == 0


def test_a_ticket_dropped_meanwhile_comes_back_at_its_place() -> None:
    table = LeaseTable(1, 60.0, 30.0)
    table.queue(0.0, 0, None, True)
    _, first = table.queue(0.0, 0, None, True)
    _, second = table.queue(0.0, 0, None, True)
    assert first is not None
    assert second is not None
    table.leave(first)
    assert table.queue(0.0, 0, first, True) == (None, first)
    table.release(table.held()[0].id)
    assert table.queue(0.0, 0, second, True) == (None, second)
    assert table.queue(0.0, 0, first, True)[0] is not None


class Replica(FlakyStore):
    """A connection to the shared set that also publishes its releases, as Redis does."""

    async def lease_release(self, name: str, lease_id: str) -> tuple[str | None, bool, LeaseView]:
        answer = await super().lease_release(name, lease_id)
        if answer[1]:
            for wake in list(self.wakers):
                wake()
        return answer


def replicas(capacity: int = 1) -> tuple[CallLeases, CallLeases, FlakyStore, ManualClock]:
    clock = ManualClock()
    one = Replica(clock)
    two = Replica(clock)
    two.inner = one.inner  # one shared set, two connections to it
    two.wakers = one.wakers  # and one channel of wake-ups
    here = CallLeases("acct", capacity, ttl=600.0, clock=clock, store=one)
    there = CallLeases("acct", capacity, ttl=600.0, clock=clock, store=two)
    return here, there, one, clock


async def test_waiters_of_two_replicas_are_served_in_the_order_of_the_store() -> None:
    here, there, store, _ = replicas()
    held = await here.acquire()
    served: list[str] = []

    async def wait(leases: CallLeases, label: str, priority: int) -> None:
        lease = await leases.acquire(priority=priority)
        served.append(label)
        await lease.release()

    async with anyio.create_task_group() as tasks:
        for leases, label, priority in [
            (here, "a1", 0),
            (there, "b1", 0),
            (here, "a2", 0),
            (there, "b5", 5),
            (here, "a5", 5),
            (there, "b2", 0),
        ]:
            tasks.start_soon(wait, leases, label, priority)
            await settle()
        assert store.inner.table("acct").queued == 6
        assert (here.statistics().waiting, there.statistics().waiting) == (3, 3)
        await held.release()
    assert served == ["b5", "a5", "a1", "b1", "a2", "b2"]
    assert store.inner.table("acct").queued == 0


async def test_a_waiter_that_gives_up_leaves_its_place() -> None:
    here, there, store, clock = replicas()
    held = await there.acquire()
    served: list[str] = []
    scope = anyio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await here.acquire()

    async def timed_out() -> None:
        with pytest.raises(CapacityExhaustedError):
            await here.acquire(timeout=1.0)

    async def last() -> None:
        await there.acquire(timeout=10.0)
        served.append("last")

    async with anyio.create_task_group() as tasks:
        for task in (cancelled, timed_out, last):
            tasks.start_soon(task)
            await settle()
        assert store.inner.table("acct").queued == 3
        scope.cancel()
        await settle()
        clock.advance(1.0)
        await settle()
        assert store.inner.table("acct").queued == 1
        await held.release()
    assert served == ["last"]
    assert store.inner.table("acct").queued == 0
    assert here.statistics().refused == 1


async def test_an_acquire_that_will_not_wait_takes_no_place() -> None:
    here, there, store, _ = replicas()
    await there.acquire()
    with pytest.raises(CapacityExhaustedError):
        await here.acquire(timeout=0)
    assert store.inner.table("acct").queued == 0


async def test_a_waiter_queued_while_the_store_was_down_is_not_jumped_by_a_newcomer() -> None:
    here, there, store, clock = replicas()
    held = await there.acquire()
    served: list[str] = []

    async def wait(label: str) -> None:
        lease = await here.acquire(timeout=30.0)
        served.append(label)
        await lease.release()

    async with anyio.create_task_group() as tasks:
        store.down = True
        local = await here.acquire(timeout=0)  # this replica's share, from memory
        tasks.start_soon(wait, "during the outage")  # no place in the store's queue
        await settle()
        store.down = False
        clock.advance(1.0)  # past the first re-probe (0.5 s +-20 %), before the 2 s poll
        assert await here.release("CA-unknown") is False  # a call that finds the store back
        tasks.start_soon(wait, "after it")
        await settle()
        assert here.statistics().waiting == 2
        await local.release()
        await settle()
        await held.release()
        await settle()
        clock.advance(2.0)
    assert served == ["during the outage", "after it"]
    assert store.inner.table("acct").queued == 0


@given(
    priorities=st.lists(st.integers(-3, 3), min_size=1, max_size=12),
    capacity=st.integers(1, 3),
    order=st.randoms(use_true_random=False),
)
def test_the_reference_queue_serves_the_best_ticket_whoever_asks_first(
    priorities: list[int], capacity: int, order: random.Random
) -> None:
    table = LeaseTable(capacity, 60.0, 30.0)
    held = [table.queue(0.0, 0, None, False) for _ in range(capacity)]
    tickets = []
    for priority in priorities:
        record, ticket = table.queue(0.0, priority, None, True)
        assert record is None
        assert ticket is not None
        tickets.append((-priority, len(tickets), ticket))
    expected = [t for _, _, t in sorted(tickets)]
    served = []
    holding = [r for r, _ in held if r is not None]
    while len(served) < len(expected):
        table.release(holding.pop(0).id)
        # Every waiter asks, in any order: only the first in line is granted.
        waiting = [t for t in expected if t not in served]
        order.shuffle(waiting)
        for ticket in waiting:
            record, left = table.queue(0.0, 0, ticket, True)
            if record is not None:
                served.append(ticket)
                holding.append(record)
            else:
                assert left == ticket
            assert table.in_use <= capacity
    assert served == expected
    assert table.queued == 0
