"""The waiters of one CallLeases in this process, in the order they are served.

A waiter's place is a sort key: on a shared store, its ticket (the store's name for its place
in the fleet's queue, which sorts as the store serves: priority, then arrival at the store);
without a ticket (an in-memory set, or a shared one that could not be reached), its priority's
rank key and then its arrival here, after every ticket of that priority. Keeping the local
order the store's order is what lets only the front waiter ask: if the store refuses the front,
it would refuse everyone behind it too.

A heap with lazy removal: a waiter that leaves, or moves when it gets a ticket, leaves a stale
entry that :meth:`WaiterQueue.front` discards.
"""

from __future__ import annotations

import heapq

import anyio

from resilient_voice.leases._core import rank_key

__all__ = ["GONE", "GRANTED", "WAITING", "Waiter", "WaiterQueue"]

WAITING = 0
GRANTED = 1
GONE = 2

_Key = tuple[str, int]


class Waiter:
    """One caller queued for a lease."""

    __slots__ = ("event", "key", "priority", "state", "ticket")

    def __init__(self, priority: int, ticket: str | None) -> None:
        self.priority = priority
        self.ticket = ticket
        self.state = WAITING
        self.event = anyio.Event()
        self.key: _Key = ("", 0)


class WaiterQueue:
    """The live waiters by key; ``waiting`` counts them, ``unticketed`` those without a ticket."""

    __slots__ = ("_arrivals", "_heap", "unticketed", "waiting")

    def __init__(self) -> None:
        self._heap: list[tuple[_Key, Waiter]] = []
        self._arrivals = 0
        self.waiting = 0
        self.unticketed = 0

    def _key(self, waiter: Waiter) -> _Key:
        self._arrivals += 1
        if waiter.ticket is not None:
            return (waiter.ticket, self._arrivals)
        # "~" sorts after the digits of every ticket of this priority.
        return (rank_key(waiter.priority) + "~", self._arrivals)

    def insert(self, waiter: Waiter) -> None:
        """Queue ``waiter`` at the place its ticket (or its priority and arrival) gives it."""
        waiter.key = self._key(waiter)
        heapq.heappush(self._heap, (waiter.key, waiter))
        self.waiting += 1
        if waiter.ticket is None:
            self.unticketed += 1

    def ticketed(self, waiter: Waiter, ticket: str | None) -> None:
        """``waiter`` now holds ``ticket``: move it to the ticket's place."""
        if ticket != waiter.ticket:
            self.unticketed += (ticket is None) - (waiter.ticket is None)
            waiter.ticket = ticket
            waiter.key = self._key(waiter)
            heapq.heappush(self._heap, (waiter.key, waiter))

    def drop(self, waiter: Waiter, state: int) -> None:
        """Take a live ``waiter`` out of the queue, leaving it in ``state``."""
        waiter.state = state
        self.waiting -= 1
        if waiter.ticket is None:
            self.unticketed -= 1
        if not self.waiting:
            self._heap.clear()

    def front(self) -> Waiter | None:
        """The live waiter to serve next, if any."""
        heap = self._heap
        while heap:
            key, waiter = heap[0]
            if waiter.state == WAITING and waiter.key == key:
                return waiter
            heapq.heappop(heap)
        return None

    def wake_front(self) -> None:
        """Tell the front waiter that it is the front now."""
        front = self.front()
        if front is not None:
            front.event.set()
