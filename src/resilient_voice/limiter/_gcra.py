"""The GCRA arithmetic of a token bucket: pure, synchronous and clock-free.

A bucket's whole state is one number, ``full``: the time at which it would be full again (the
"theoretical arrival time" of GCRA). Capacity is measured in seconds of refill: a request for
``tokens`` costs ``tokens / rate`` seconds and the bucket is ``tau = burst / rate`` seconds deep.
A cost fits at time ``t`` when ``full + cost - tau <= t``; granting it at ``t`` moves ``full`` to
``max(full, t) + cost``. Every function takes the time as an argument, so the in-process bucket,
the in-memory store and a remote store's script compute the same schedule, and property tests
need no clock.

The uncontended path of :meth:`TokenBucket.acquire` inlines :func:`fits` and :func:`take` (a
function call there would cost more than the rest of the path); a property test pins that inline
copy to these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LATENESS_KEPT", "available", "depth", "fits", "reserve", "take", "wait"]

NEVER = -math.inf
"""``full`` of a bucket that has never granted anything: full at any time."""

# How late a queued waiter may be granted and still keep its scheduled slot (seconds). Event loops
# wake sleepers late (0.15-0.3 ms at the median, 1-4 ms at the 99th percentile and up to about
# 15 ms on a shared two-core machine; benchmarks/limiter.py measures it); granting "at the late
# wake-up" instead of "at the slot" pushed every later slot back by that lateness, which lost
# 15-20 % of the rate at 1000 grants/s. Keeping the slot turns the bound into
# ``burst + rate * (T + LATENESS_KEPT)``; a stall longer than this loses only the excess.
LATENESS_KEPT = 0.010


def depth(burst: float, interval: float) -> float:
    """``tau``: the bucket's depth in seconds of refill, for ``burst`` tokens every ``interval``.

    The slack (at most a nanosecond) absorbs float rounding, so that a grant due exactly "now" is
    not deferred by one ulp.
    """
    return burst * interval + min(1e-9, interval * 1e-6)


def fits(full: float, cost: float, tau: float, now: float) -> bool:
    """Whether ``cost`` can be granted at ``now``."""
    return full + cost - tau <= now


def take(full: float, cost: float, at: float) -> float:
    """The new ``full`` after granting ``cost`` at time ``at`` (which may be before now)."""
    return (full if full > at else at) + cost


def wait(full: float, cost: float, tau: float, now: float) -> float:
    """Seconds from ``now`` until ``cost`` fits (``cost`` may exceed ``tau``); 0.0 if it fits."""
    delay = full + cost - tau - now
    return delay if delay > 0.0 else 0.0


def available(full: float, now: float, burst: float, rate: float) -> float:
    """Tokens that could be taken at ``now``."""
    behind = full - now
    if behind <= 0.0:
        return burst
    tokens = burst - behind * rate
    return tokens if tokens > 0.0 else 0.0


def reserve(
    full: float, now: float, costs: Sequence[float], limits: Sequence[float], tau: float
) -> tuple[float, list[float], float | None]:
    """Reserve consecutive slots for ``costs``, in order, each at the earliest time it fits.

    ``limits[i]`` is the longest wait the i-th request accepts. Reserving stops at the first
    request whose slot would come later than its limit, so that no request is served before one
    that asked earlier (first come, first served), and so that a deadline that cannot be met is
    refused before anyone sleeps.

    Returns:
        The new ``full``, the delay from ``now`` of each reserved slot (a prefix of ``costs``),
        and the wait the first refused request would have needed (``None`` if none was refused).
    """
    delays: list[float] = []
    for cost, limit in zip(costs, limits, strict=True):
        delay = wait(full, cost, tau, now)
        if delay > limit:
            return full, delays, delay
        full = take(full, cost, now + delay)
        delays.append(delay)
    return full, delays, None
