"""RetryBudget: the cap on retries across calls (Finagle's and Envoy's retry budget).

On its own because it is state shared between policies, not part of one decision: the pure
decision says "retry after d", and the policy then asks the budget whether the upstream can take
one more retry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from resilient_voice._clock import Clock
from resilient_voice._validate import clock as check_clock
from resilient_voice._validate import number

__all__ = ["RetryBudget", "RetryBudgetStatistics"]


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot of a :class:`RetryBudget` over its current window.

    Attributes:
        requests: Operations started (deposits) in the window.
        retries: Retries granted (withdrawals) in the window.
        available: Retries that would be granted now.
    """

    requests: int
    retries: int
    available: int


class RetryBudget:
    """Caps retries across calls so that an outage cannot multiply the load on an upstream.

    The Finagle/Envoy idea: every operation deposits into the budget, every retry withdraws, and
    retries are granted while, over the last ``window`` seconds,
    ``retries < ratio * operations + min_retries_per_second * window``. With the defaults, retries
    add at most 20 % to the traffic once it exceeds 50 operations per second, instead of
    multiplying it by ``max_attempts``; the floor keeps retries possible for quiet clients.

    Share one budget between every policy that calls the same upstream. The budget keeps plain
    counters: share it within one event loop (one thread).

    Args:
        ratio: Retries allowed per operation, ``>= 0``.
        min_retries_per_second: The floor of retries always allowed, ``>= 0``.
        window: The sliding window in seconds, ``> 0``; counted in ten slots.
        clock: The monotonic clock; the system clock by default.

    Raises:
        TypeError: A parameter is not a number, or ``clock`` is not a clock.
        ValueError: A parameter is negative, not finite, or ``window <= 0``.
    """

    __slots__ = (
        "_clock",
        "_deposits",
        "_floor",
        "_index",
        "_ratio",
        "_requests",
        "_retries",
        "_slot_width",
        "_window",
        "_withdrawals",
    )

    _SLOTS = 10

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_second: float = 10,
        *,
        window: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self._ratio = number("ratio", ratio, inclusive=True)
        floor = number("min_retries_per_second", min_retries_per_second, inclusive=True)
        self._window = number("window", window)
        self._clock = check_clock(clock)
        self._floor = floor * self._window
        self._slot_width = self._window / self._SLOTS
        self._deposits = [0] * self._SLOTS
        self._withdrawals = [0] * self._SLOTS
        self._requests = 0
        self._retries = 0
        self._index = math.floor(self._clock.now() / self._slot_width)

    @property
    def clock(self) -> Clock:
        """The clock the window is counted on."""
        return self._clock

    def _roll(self) -> int:
        index = math.floor(self._clock.now() / self._slot_width)
        passed = index - self._index
        if passed > 0:
            deposits, withdrawals = self._deposits, self._withdrawals
            for step in range(1, min(passed, self._SLOTS) + 1):
                slot = (self._index + step) % self._SLOTS
                self._requests -= deposits[slot]
                self._retries -= withdrawals[slot]
                deposits[slot] = withdrawals[slot] = 0
            self._index = index
        return index % self._SLOTS

    def _available(self) -> int:
        return math.floor(self._floor + self._ratio * self._requests - self._retries)

    def deposit(self) -> None:
        """Record that an operation started (its first attempt)."""
        self._deposits[self._roll()] += 1
        self._requests += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; ``False`` when it is exhausted."""
        slot = self._roll()
        if self._available() < 1:
            return False
        self._withdrawals[slot] += 1
        self._retries += 1
        return True

    def statistics(self) -> RetryBudgetStatistics:
        """Return the counts over the current window."""
        self._roll()
        return RetryBudgetStatistics(self._requests, self._retries, max(0, self._available()))

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self._ratio!r}, "
            f"min_retries_per_second={self._floor / self._window!r}, window={self._window!r})"
        )
