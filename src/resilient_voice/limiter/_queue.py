"""The wait queue of a token bucket: priorities (higher first), FIFO within a priority, deadlines.

The queue only orders waiters and keeps the sums the bucket needs to project waits (the cost
queued per priority, how many waiters have a deadline); it never reads a clock or decides a
grant. A waiter that leaves is marked and skipped lazily, so leaving is O(1) and the waiters
behind it move up at once.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

import anyio

__all__ = ["FAILED", "GONE", "GRANTED", "RESERVED", "WAITING", "WaitQueue", "Waiter"]

WAITING = 0
GRANTED = 1
FAILED = 2
GONE = 3
RESERVED = 4
"""Holds a slot reserved from a shared store and sleeps until it (out of the queue)."""


class Waiter:
    """One caller queued for ``tokens`` (``cost`` seconds of refill)."""

    __slots__ = ("cost", "deadline", "event", "priority", "scope", "slot", "state", "tokens")

    def __init__(self, tokens: float, cost: float, priority: int, deadline: float | None) -> None:
        self.tokens = tokens
        self.cost = cost
        self.priority = priority
        self.deadline = deadline
        self.state = WAITING
        self.event = anyio.Event()
        self.scope: anyio.CancelScope | None = None
        self.slot = 0.0


class WaitQueue:
    """Waiting callers by priority class; ``waiting`` and ``deadlines`` count the live ones."""

    __slots__ = ("_class_cost", "_classes", "_order", "deadlines", "waiting")

    def __init__(self) -> None:
        self._classes: dict[int, deque[Waiter]] = {}
        self._class_cost: dict[int, float] = {}
        self._order: list[int] = []  # priorities present, ascending (walked in reverse)
        self.waiting = 0
        self.deadlines = 0

    def insert(self, waiter: Waiter) -> None:
        """Queue ``waiter`` behind every waiter of its priority or higher."""
        self._class(waiter.priority).append(waiter)
        self._count(waiter)

    def _class(self, priority: int) -> deque[Waiter]:
        queue = self._classes.get(priority)
        if queue is None:
            queue = self._classes[priority] = deque()
            self._class_cost[priority] = 0.0
            bisect.insort(self._order, priority)
        return queue

    def _count(self, waiter: Waiter) -> None:
        self._class_cost[waiter.priority] += waiter.cost
        self.waiting += 1
        if waiter.deadline is not None:
            self.deadlines += 1

    def drop(self, waiter: Waiter, state: int) -> None:
        """Take a live ``waiter`` out of the queue, leaving it in ``state``."""
        waiter.state = state
        self.waiting -= 1
        if waiter.deadline is not None:
            self.deadlines -= 1
        if self.waiting:
            self._class_cost[waiter.priority] -= waiter.cost
        else:
            # Nobody is queued: drop the bookkeeping so float residue cannot accumulate.
            self._classes.clear()
            self._class_cost.clear()
            self._order.clear()

    def front(self) -> Waiter | None:
        """The live waiter to serve next, if any."""
        classes = self._classes
        order = self._order
        while order:
            priority = order[-1]
            queue = classes[priority]
            while queue and queue[0].state != WAITING:
                queue.popleft()
            if queue:
                return queue[0]
            del classes[priority]
            del self._class_cost[priority]
            order.pop()
        return None

    def wake_front(self) -> None:
        """Tell the front waiter that it is the front now."""
        front = self.front()
        if front is not None:
            front.event.set()

    def ahead(self, priority: int) -> float:
        """Cost queued by live waiters who would be served before a new one at ``priority``."""
        total = 0.0
        for p, cost in self._class_cost.items():
            if p >= priority:
                total += cost
        return total

    def lowest(self) -> int:
        """The lowest priority queued."""
        return self._order[0]

    def in_order(self, below: int | None = None) -> Iterator[Waiter]:
        """Live waiters in the order they will be served, only those under ``below`` if given."""
        for p in reversed(self._order):
            if below is not None and p >= below:
                continue
            for waiter in self._classes[p]:
                if waiter.state == WAITING:
                    yield waiter
