"""The queued path of a :class:`TokenBucket` whose schedule lives in a shared store.

Only the front of this process's queue talks to the store: it reserves slots for every ready local
waiter in one call (:meth:`~._store.BucketStore.reserve`), on the store's clock, and each waiter
then sleeps until its slot on the local clock. A reserved waiter that leaves hands its slot down
the line of later reserved waiters (each moves up to the earlier slot, so first come stays first
served), and the last freed slot goes to the front of the queue or back to the store. A waiter
woken more than ``LATENESS_KEPT`` after its slot moves this process's later slots and the shared
schedule's end by the excess, so a stalled event loop cannot release a bunch of stale slots at once
(the bound of the in-process path holds).

A mixin rather than an object of its own: it reads and updates the bucket's mirror of the
schedule and its counters, which the facade reports.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

import anyio

from resilient_voice.limiter import _gcra
from resilient_voice.limiter._queue import (
    FAILED,
    GONE,
    GRANTED,
    RESERVED,
    WAITING,
    Waiter,
    WaitQueue,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from resilient_voice._clock import Clock
    from resilient_voice.limiter._store import BucketStore, Reservation

__all__ = ["BATCH", "SharedPath"]

BATCH = 64
"""Most local waiters one reservation covers (one round trip to a shared store)."""


def _slot_of(waiter: Waiter) -> float:
    return waiter.slot


class SharedPath:
    """Serving queued waiters from a :class:`~._store.BucketStore` (mixed into TokenBucket)."""

    # The state this path writes; the bucket's other state is declared for the type checker only.
    __slots__ = ("_catching_up", "_dropped", "_full_at", "_reserved", "_reserving", "_store_end")
    _catching_up: bool
    _dropped: int
    _full_at: float
    _reserved: list[Waiter]
    _reserving: bool
    _store_end: float

    if TYPE_CHECKING:
        _clock: Clock
        _now: Callable[[], float]
        _store: BucketStore | None
        _queue: WaitQueue | None
        _store_key: str
        _tau: float

        def _mirror(self, backlog: float, end: float) -> None: ...

    async def _serve_shared(self, queue: WaitQueue, waiter: Waiter, store: BucketStore) -> None:
        """Wait for a reserved slot (reserving for the queue when at its front), then sleep."""
        while waiter.state == WAITING:
            if queue.front() is not waiter or self._reserving:
                await self._wait_for_turn(waiter)
            else:
                await self._reserve(queue, store)
        if waiter.state == RESERVED:
            await self._sleep_to_slot(waiter, store)

    async def _reserve_alone(
        self, store: BucketStore, cost: float, deadline: float | None
    ) -> Reservation:
        """Nobody is queued and no reservation is in flight: reserve for one caller directly.

        The uncontended path with a store: no queue entry, event or waiter unless the slot is
        in the future. Callers arriving during the round trip queue up and are woken after it.
        """
        limit = math.inf if deadline is None else deadline - self._now()
        self._reserving = True
        try:
            with anyio.CancelScope(shield=True):
                answer = await store.reserve(self._store_key, (cost,), (limit,), self._tau)
        finally:
            self._reserving = False
            if self._queue is not None:
                self._queue.wake_front()
        self._mirror(answer.backlog, answer.end)
        return answer

    async def _alone(
        self, store: BucketStore, tokens: float, cost: float, deadline: float | None, priority: int
    ) -> float | None:
        """Nobody queued: reserve for one caller, sleep to its slot if it is not now.

        Returns:
            ``None`` once granted, or the wait the store refused (the deadline cannot be met).
        """
        answer = await self._reserve_alone(store, cost, deadline)
        if not answer.delays:
            return answer.refused_wait or 0.0
        delay = answer.delays[0]
        if delay > 0.0:
            waiter = Waiter(tokens, cost, priority, deadline)
            self._hold(waiter, self._now() + delay)
            try:
                await self._sleep_to_slot(waiter, store)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._release(self._queue, waiter)
                raise
        return None

    def _hold(self, waiter: Waiter, slot: float) -> None:
        """``waiter`` holds the reserved ``slot`` and sleeps until it."""
        waiter.state = RESERVED
        waiter.slot = slot
        bisect.insort(self._reserved, waiter, key=_slot_of)
        waiter.event.set()

    async def _sleep_to_slot(self, waiter: Waiter, store: BucketStore) -> None:
        """Sleep until the reserved slot of ``waiter``, which may move while it sleeps."""
        while True:
            now = self._now()
            late = now - self._reserved[0].slot - _gcra.LATENESS_KEPT
            if late > 0.0 and not self._catching_up:
                # One catch-up at a time: the others woken by the same stall were moved by it
                # (their lateness is the round trip's, not the stall's); each paying a round
                # trip of its own pushed the fleet's schedule once per waiter (benchmarks/redis.py
                # under CPU contention made more catch-up round trips than reservations).
                await self._catch_up(store, late, now)
            if now >= waiter.slot:
                break
            # Sleep again when moved: earlier by a waiter that left, later by a late wake-up.
            await self._sleep(waiter, waiter.slot)
        self._reserved.remove(waiter)
        waiter.state = GRANTED

    async def _catch_up(self, store: BucketStore, late: float, now: float) -> None:
        """The earliest reserved slot is more than LATENESS_KEPT behind (a stalled event loop).

        Every reserved slot of this process moves by the excess, as the in-process path moves
        its schedule, and the shared schedule's end moves past the last of them, so that the
        late grants are not bunched with later ones, here or in other processes. Only late
        wake-ups pay this round trip.
        """
        for other in self._reserved:
            other.slot += late
        last = self._reserved[-1].slot
        self._catching_up = True
        try:
            with anyio.CancelScope(shield=True):
                answer = await store.pause(self._store_key, last - now + self._tau)
        finally:
            self._catching_up = False
        self._mirror(answer.backlog, answer.end)

    async def _reserve(self, queue: WaitQueue, store: BucketStore) -> None:
        """Reserve slots for the ready waiters in queue order, in one call to the store."""
        batch = [w for _, w in zip(range(BATCH), queue.in_order(), strict=False)]
        now = self._now()
        limits = [math.inf if w.deadline is None else w.deadline - now for w in batch]
        self._reserving = True
        try:
            # Shielded: the slots the store reserved must reach the waiters they were made for.
            with anyio.CancelScope(shield=True):
                answer: Reservation = await store.reserve(
                    self._store_key, [w.cost for w in batch], limits, self._tau
                )
        finally:
            self._reserving = False
        self._mirror(answer.backlog, answer.end)
        base = self._now()
        orphans: list[tuple[float, float]] = []
        for w, delay in zip(batch, answer.delays, strict=False):
            if w.state == WAITING:
                queue.drop(w, RESERVED)
                self._hold(w, base + delay)
            else:
                orphans.append((w.cost, base + delay))  # left during the round trip
        if answer.refused_wait is not None:
            refused = batch[len(answer.delays)]
            if refused.state == WAITING:
                queue.drop(refused, FAILED)
                refused.event.set()
        for cost, slot in orphans:
            await self._pass_on(queue, cost, slot)
        queue.wake_front()

    async def _release(self, queue: WaitQueue | None, waiter: Waiter) -> None:
        """A reserved waiter left: its slot passes on (the caller shields this)."""
        waiter.state = GONE
        self._reserved.remove(waiter)
        await self._pass_on(queue, waiter.cost, waiter.slot)

    async def _pass_on(self, queue: WaitQueue | None, cost: float, slot: float) -> None:
        """Hand a free slot down the reserved line, then to the front, else back to the store."""
        for later in [w for w in self._reserved if w.slot > slot]:
            if later.cost > cost:
                # Whoever is behind needs more than this slot: keep it unused rather than let a
                # later arrival be served before a waiter that reserved earlier.
                self._dropped += 1
                return
            later.slot, slot, cost = slot, later.slot, later.cost
            if later.scope is not None:
                later.scope.cancel()
        front = None if self._reserving or queue is None else queue.front()
        if queue is not None and front is not None and front.cost <= cost:
            queue.drop(front, RESERVED)
            self._hold(front, slot)
            return
        store = self._store
        if store is not None and await store.give_back(self._store_key, cost, self._store_end):
            self._store_end -= cost
            self._full_at -= cost
        else:
            self._dropped += 1

    async def _wait_for_turn(self, waiter: Waiter) -> None:
        if waiter.event.is_set():
            waiter.event = anyio.Event()
        await waiter.event.wait()

    async def _sleep(self, waiter: Waiter, when: float) -> None:
        """Sleep until ``when``, or until ``waiter.scope`` is cancelled to look again."""
        with anyio.CancelScope() as scope:
            waiter.scope = scope
            try:
                await self._clock.sleep_until(when)
            finally:
                waiter.scope = None
