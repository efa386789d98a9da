"""Health metrics: sliding windows of call outcomes for the breaker's failure-rate modes.

Like Polly's health metrics, a window only counts; the trip behaviour in :mod:`._machine` judges.

Both keep running totals so that judging the window costs O(1): a count window is a ring of the
last ``size`` outcomes; a time window is at most ``TIME_BUCKETS`` buckets, so its memory does not
grow with the call rate and it slides in steps of a tenth of its duration.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["TIME_BUCKETS", "CountWindow", "TimeWindow"]

TIME_BUCKETS: Final = 10
"""A time-based window is kept as this many buckets."""

_floor: Final = math.floor


class CountWindow:
    """The outcomes of the last ``size`` calls, with running totals."""

    __slots__ = ("calls", "failures", "index", "ring", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = [0] * size  # 0: empty slot; bit 1: call; bit 2: failure; bit 4: slow
        self.index = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        # On every closed call of a count-window breaker: a total moves only when it changes
        # (a full ring replaces a call by a call), so a success costs a few integer operations.
        del now
        ring = self.ring
        index = self.index
        old = ring[index]
        if old:
            if old & 2:
                self.failures -= 1
            if old & 4:
                self.slow -= 1
        else:
            self.calls += 1
        if failed:
            self.failures += 1
            ring[index] = 7 if slow else 3
        else:
            ring[index] = 5 if slow else 1
        if slow:
            self.slow += 1
        index += 1
        self.index = 0 if index == self.size else index

    def expire(self, now: float) -> None:
        del now

    def clear(self) -> None:
        self.ring = [0] * self.size
        self.index = self.calls = self.failures = self.slow = 0


class TimeWindow:
    """The outcomes of the last ``duration`` seconds, in ``TIME_BUCKETS`` buckets.

    A call falls in bucket ``floor(now / width)``. The newest bucket also keeps the times it
    covers, ``[low, high)``: ``low`` a time known to fall in it and ``high`` the first float
    that falls in the next one (division and ``floor`` never decrease as ``now`` grows, so every
    time in between falls in it too). A call inside that span is counted with two comparisons
    and no division, and nothing can expire then: expiry depends only on the bucket number, it
    was done when the bucket was opened, and any later expiry forgets the span. So the window
    holds exactly what expiring and adding at every call would hold.
    """

    __slots__ = ("buckets", "calls", "failures", "high", "low", "newest", "slow", "width")

    def __init__(self, duration: float) -> None:
        self.width = duration / TIME_BUCKETS
        self.buckets: list[list[int]] = []  # [bucket number, calls, failures, slow]
        self.calls = 0
        self.failures = 0
        self.slow = 0
        self.newest: list[int] = []
        self.low = math.inf  # an empty span until a bucket is opened
        self.high = -math.inf

    def expire(self, now: float) -> None:
        oldest = _floor(now / self.width) - TIME_BUCKETS + 1
        buckets = self.buckets
        if buckets and buckets[0][0] < oldest:
            # The span is forgotten whenever a bucket goes, so that it only ever stands for
            # a window that nothing changed since the bucket was opened.
            self.low, self.high = math.inf, -math.inf
            while buckets and buckets[0][0] < oldest:
                _, calls, failures, slow = buckets.pop(0)
                self.calls -= calls
                self.failures -= failures
                self.slow -= slow

    def add(self, now: float, failed: bool, slow: bool) -> None:
        # On every closed call of a time-window breaker.
        bucket = self.newest if self.low <= now < self.high else self._open(now)
        bucket[1] += 1
        self.calls += 1
        if failed:
            bucket[2] += 1
            self.failures += 1
        if slow:
            bucket[3] += 1
            self.slow += 1

    def _open(self, now: float) -> list[int]:
        """Expire what ``now`` leaves out, find or append the bucket of ``now`` (always the
        last one), and keep its span."""
        width = self.width
        number = _floor(now / width)
        self.expire(now)
        buckets = self.buckets
        if not buckets or buckets[-1][0] != number:
            buckets.append([number, 0, 0, 0])
        bucket = buckets[-1]
        self.newest = bucket
        self.low = now
        self.high = _first_time_of(number + 1, width)
        return bucket

    def clear(self) -> None:
        self.buckets.clear()
        self.calls = self.failures = self.slow = 0
        self.newest = []
        self.low, self.high = math.inf, -math.inf


def _first_time_of(number: int, width: float) -> float:
    """The smallest float ``t`` with ``floor(t / width) >= number``."""
    t = number * width
    while _floor(t / width) < number:
        t = math.nextafter(t, math.inf)
    while _floor((earlier := math.nextafter(t, -math.inf)) / width) >= number:
        t = earlier
    return t
