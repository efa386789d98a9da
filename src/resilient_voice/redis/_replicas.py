"""How many replicas share a limiter or a lease set, as the fallback divides by them.

While Redis answers, every replica's heartbeat (see :mod:`._scripts`) tells it how many replicas
used the same limiter or lease set in the last ``HEARTBEAT_S`` seconds. When Redis goes away,
``on_backend_error="local"`` gives this replica ``rate / replicas`` (``capacity // replicas``
for call leases). The count in the *last* answer is a poor divisor: a replica whose event loop
was saturated, or that had no traffic for a few seconds, drops out of the count while it still
serves, and the start of a surge is exactly when that happens (docs/reliability.md measured
three workers admitting 1.5-1.7 times the rate together). An under-count makes every replica's
share too large; an over-count only makes it too small.

:class:`ReplicaPeak` therefore answers the most replicas reported in the ``PEAK_S`` seconds up
to the last answer, not the last count. The window is anchored at the last answer, not at now:
while Redis is unreachable nothing new is known about the fleet, so the divisor stays where it
was (a replica that stopped beating during an outage is still serving its own share). Once
answers come again, a fleet that scaled down is counted at its new size after ``PEAK_S``.
Nothing is asked of Redis for it: the counts ride on the answers the backend already reads.

Before any answer the peak is 1, and a replica that heard only an early count (the first to
beat at start-up sees itself alone) keeps it: without an answer nothing more is known. The
alternatives were not clearly safer: the peak of the backend's other limiters and lease sets
would starve one that only some replicas use, and refusing until Redis answers is
``on_backend_error="deny"``, a choice the caller already has. What closes the gap is a fleet
size the operator states: ``RedisBackend(min_replicas=...)``, the fewest replicas the backend
divides by whatever the peak (docs/reliability.md measures both).
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["PEAK_S", "ReplicaPeak"]

PEAK_S = 60.0
"""Seconds an answer's replica count is remembered, counted back from the latest answer.

Twenty heartbeat lifetimes (``HEARTBEAT_S`` = 3 s): long enough to cover a replica that
stalled for several seconds (a saturated loop whose round trips take seconds beats seldom), one
whose traffic comes in bursts tens of seconds apart, and the ramp of a surge; short enough that
after a scale-down the remaining replicas take their larger share within a minute of answers.
"""


class ReplicaPeak:
    """The most replicas reported within ``PEAK_S`` of the latest report (1 before any).

    A monotonic queue of ``(when, count)``: counts strictly decrease from the front, so the
    front is the peak, and an entry goes once a later one is at least as large or it is older
    than ``PEAK_S`` before the latest. At most one entry per distinct count: a few at most.
    """

    __slots__ = ("_marks",)

    def __init__(self) -> None:
        self._marks: deque[tuple[float, int]] = deque()

    def seen(self, live: int, at: float | None = None) -> None:
        """Record an answer reporting ``live`` replicas, received at monotonic time ``at``."""
        when = time.monotonic() if at is None else at
        count = max(1, live)
        marks = self._marks
        while marks and marks[-1][1] <= count:
            marks.pop()
        marks.append((when, count))
        horizon = when - PEAK_S
        while marks[0][0] < horizon:
            marks.popleft()

    @property
    def most(self) -> int:
        """What the fallback divides by: the peak of the window, 1 if nothing was reported."""
        return self._marks[0][1] if self._marks else 1

    @property
    def last(self) -> int:
        """The count of the latest answer (1 if nothing was reported)."""
        return self._marks[-1][1] if self._marks else 1

    def __repr__(self) -> str:
        return f"ReplicaPeak(most={self.most}, last={self.last})"
