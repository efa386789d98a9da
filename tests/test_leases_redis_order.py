"""CallLeases on real Redis: waiters are served in one order across replicas.

Two ``CallLeases`` on two ``RedisBackend`` connections in one process stand for two replicas
sharing a set. Real time, bounded: waiters are started 0.1 s apart so that each has its ticket
before the next arrives (a round trip on loopback is well under that even on the loaded test
machine), and each bound states its tolerance.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix
from resilient_voice import CallLeases, CapacityExhaustedError
from resilient_voice.redis import RedisBackend
from resilient_voice.redis._lease_script import TICKET_EXPIRY_S, TICKET_REFRESH_S

pytestmark = [COREDIS_CANCEL_LEAK]
__all__ = ["collect_coredis_garbage"]

ARRIVAL_GAP = 0.1


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    prefix = fresh_prefix()
    async with (
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as one,
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as two,
    ):
        yield one, two


async def _queued(backend: RedisBackend, name: str = "acct") -> int:
    return int(await backend.client.zcard(backend.lease_keys(name)[7]))


async def _serve_in_turn(
    waiters: list[tuple[CallLeases, str, int]], holder: CallLeases
) -> list[str]:
    """Queue ``waiters`` (set, label, priority) in this order behind a held lease, release it,
    and return the labels in the order they were granted (each holds its lease briefly)."""
    held = await holder.acquire(timeout=0)
    served: list[str] = []

    async def wait(leases: CallLeases, label: str, priority: int) -> None:
        lease = await leases.acquire(timeout=20.0, priority=priority)
        served.append(label)
        await anyio.sleep(0.02)
        await lease.release()

    async with anyio.create_task_group() as tasks:
        for leases, label, priority in waiters:
            tasks.start_soon(wait, leases, label, priority)
            await anyio.sleep(ARRIVAL_GAP)
        await held.release()
    return served


async def test_waiters_of_two_replicas_are_served_in_arrival_order(
    replicas: tuple[RedisBackend, RedisBackend],
) -> None:
    one, two = replicas
    here = CallLeases("acct", 1, ttl=60.0, store=one)
    there = CallLeases("acct", 1, ttl=60.0, store=two)
    order = [(here, "a1", 0), (there, "b1", 0), (here, "a2", 0), (there, "b2", 0)]
    order += [(there, "b3", 0), (here, "a3", 0)]
    assert await _serve_in_turn(order, here) == ["a1", "b1", "a2", "b2", "b3", "a3"]
    assert await _queued(one) == 0


async def test_higher_priorities_are_served_first_across_replicas(
    replicas: tuple[RedisBackend, RedisBackend],
) -> None:
    one, two = replicas
    here = CallLeases("acct", 1, ttl=60.0, store=one)
    there = CallLeases("acct", 1, ttl=60.0, store=two)
    order = [(here, "a0", 0), (there, "b0", 0), (here, "a5", 5), (there, "b9", 9)]
    order += [(there, "b5", 5), (here, "a-1", -1), (here, "a9", 9)]
    served = await _serve_in_turn(order, there)
    assert served == ["b9", "a9", "a5", "b5", "a0", "b0", "a-1"]


async def test_a_newcomer_does_not_jump_the_queue_of_another_replica(
    replicas: tuple[RedisBackend, RedisBackend],
) -> None:
    one, two = replicas
    here = CallLeases("acct", 1, ttl=60.0, store=one)
    there = CallLeases("acct", 1, ttl=60.0, store=two)
    held = await here.acquire()
    got: list[str] = []

    async def wait() -> None:
        lease = await there.acquire(timeout=10.0)
        got.append(lease.id)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait)
        await anyio.sleep(ARRIVAL_GAP)
        await held.release()
        # Right after the release the slot is free, but it is the waiter's: refused, whether
        # this request reaches Redis before the waiter's own or after it.
        with pytest.raises(CapacityExhaustedError):
            await here.acquire(timeout=0)
    assert len(got) == 1


async def test_a_cancelled_waiter_leaves_its_place_to_the_next_replica(
    replicas: tuple[RedisBackend, RedisBackend],
) -> None:
    one, two = replicas
    here = CallLeases("acct", 1, ttl=60.0, store=one)
    there = CallLeases("acct", 1, ttl=60.0, store=two)
    held = await there.acquire()
    granted: list[float] = []
    scope = anyio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await here.acquire(timeout=20.0)

    async def next_one() -> None:
        await there.acquire(timeout=20.0)
        granted.append(time.monotonic())

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(cancelled)
        await anyio.sleep(ARRIVAL_GAP)
        tasks.start_soon(next_one)
        await anyio.sleep(ARRIVAL_GAP)
        assert await _queued(one) == 2
        scope.cancel()
        await anyio.sleep(ARRIVAL_GAP)
        assert await _queued(one) == 1  # the cancelled waiter's ticket is gone at once
        released = time.monotonic()
        await held.release()
    # Well under the ticket's expiry (3 s): the next waiter was not blocked by the cancelled
    # one's place; 1 s is a wake-up and a few round trips, with slack.
    assert granted[0] - released < 1.0
    assert here.statistics().waiting == there.statistics().waiting == 0


async def test_the_tickets_of_a_crashed_replica_lapse_and_stop_blocking(
    replicas: tuple[RedisBackend, RedisBackend],
) -> None:
    one, _ = replicas
    here = CallLeases("acct", 1, ttl=60.0, store=one)
    held = await here.acquire()
    async with RedisBackend.from_url(REDIS_URL, prefix=one.prefix, timeout=1.0) as ghost:
        CallLeases("acct", 1, ttl=60.0, store=ghost)
        grant, ticket, _ = await ghost.lease_queue("acct", 0, None, True)
        assert grant is None
        assert ticket is not None
        # The replica "crashes": its backend closes with the waiter's ticket still queued.
    crashed = time.monotonic()
    granted: list[float] = []

    async def behind() -> None:
        await here.acquire(timeout=20.0)
        granted.append(time.monotonic())

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(behind)
        await anyio.sleep(ARRIVAL_GAP)
        await held.release()
        await anyio.sleep(0.5)
        assert not granted  # the crashed replica's place still comes first
    waited = granted[0] - crashed
    # The ticket was last refreshed at or before the crash: it lapses within TICKET_EXPIRY_S
    # of it, and a surviving waiter's refresh (every TICKET_REFRESH_S) drops it and wakes the
    # waiters. 1.5 s of slack for round trips and the loaded machine.
    assert waited < TICKET_EXPIRY_S + TICKET_REFRESH_S + 1.5
    assert await _queued(one) == 0


async def test_deadlines_still_refuse_and_leave_no_ticket(
    replicas: tuple[RedisBackend, RedisBackend],
) -> None:
    one, two = replicas
    here = CallLeases("acct", 1, ttl=60.0, store=one)
    there = CallLeases("acct", 1, ttl=60.0, store=two)
    held = await there.acquire()
    with pytest.raises(CapacityExhaustedError):
        await here.acquire(timeout=0)
    assert await _queued(one) == 0  # a caller that will not wait takes no place
    started = time.monotonic()
    with pytest.raises(CapacityExhaustedError):
        await here.acquire(timeout=0.3)
    assert 0.25 < time.monotonic() - started < 1.5  # the deadline, plus a round trip
    with pytest.raises(CapacityExhaustedError):
        await here.acquire(deadline=here.clock.now() - 1.0)
    assert await _queued(one) == 0
    await held.release()
    await (await here.acquire(timeout=0)).release()


async def test_replicas_never_hold_more_than_the_capacity_and_all_are_served(
    replicas: tuple[RedisBackend, RedisBackend],
) -> None:
    one, two = replicas
    sets = [CallLeases("acct", 2, ttl=60.0, store=b) for b in (one, two)]
    holding = most = served = 0

    async def worker(leases: CallLeases, priority: int) -> None:
        nonlocal holding, most, served
        for _ in range(5):
            lease = await leases.acquire(timeout=30.0, priority=priority)
            holding += 1
            most = max(most, holding)
            await anyio.sleep(0.01)
            holding -= 1
            served += 1
            await lease.release()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tasks:
            for i in range(8):
                tasks.start_soon(worker, sets[i % 2], i % 3)
    # One event loop runs both replicas: the count is exact, no tolerance needed.
    assert most == 2
    assert served == 40
    assert await _queued(one) == 0


class Counting(RedisBackend):
    """A backend that counts its lease scripts by operation."""

    calls: dict[str, int]

    async def _lease_at(self, name: str, op: str, args: list[str]) -> Any:
        self.calls[op] = self.calls.get(op, 0) + 1
        return await super()._lease_at(name, op, args)


async def test_a_waiter_asks_once_before_it_sleeps_and_once_when_woken() -> None:
    prefix = fresh_prefix()
    async with (
        Counting.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as one,
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as two,
    ):
        one.calls = {}
        here = CallLeases("acct", 1, ttl=60.0, store=one)
        there = CallLeases("acct", 1, ttl=60.0, store=two)
        held = await there.acquire()
        await anyio.sleep(0.3)  # both listeners subscribed: no resubscription mid-test

        async def wait() -> None:
            await here.acquire(timeout=10.0)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait)
            await anyio.sleep(0.3)
            # Refused as a newcomer (with its ticket); listening since, nothing was released:
            # no second ask.
            assert one.calls["q"] == 1  # (a "k" may come too: the tickets' keep-alive)
            await held.release()
        assert one.calls["q"] == 2
