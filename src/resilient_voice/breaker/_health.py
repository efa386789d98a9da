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
        del now
        old = self.ring[self.index]
        if old:
            self.calls -= 1
            self.failures -= (old >> 1) & 1
            self.slow -= (old >> 2) & 1
        self.ring[self.index] = 1 | (2 if failed else 0) | (4 if slow else 0)
        self.index = (self.index + 1) % self.size
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def expire(self, now: float) -> None:
        del now

    def clear(self) -> None:
        self.ring = [0] * self.size
        self.index = self.calls = self.failures = self.slow = 0


class TimeWindow:
    """The outcomes of the last ``duration`` seconds, in ``TIME_BUCKETS`` buckets."""

    __slots__ = ("buckets", "calls", "failures", "slow", "width")

    def __init__(self, duration: float) -> None:
        self.width = duration / TIME_BUCKETS
        self.buckets: list[list[int]] = []  # [bucket number, calls, failures, slow]
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def expire(self, now: float) -> None:
        oldest = math.floor(now / self.width) - TIME_BUCKETS + 1
        buckets = self.buckets
        while buckets and buckets[0][0] < oldest:
            _, calls, failures, slow = buckets.pop(0)
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self.expire(now)
        number = math.floor(now / self.width)
        buckets = self.buckets
        if not buckets or buckets[-1][0] != number:
            buckets.append([number, 0, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def clear(self) -> None:
        self.buckets.clear()
        self.calls = self.failures = self.slow = 0
