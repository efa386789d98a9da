"""Token-bucket rate limiting: pace calls to an upstream's cap exactly, fairly and cancel-safely.

A :class:`TokenBucket` holds at most ``burst`` tokens and refills at ``rate`` tokens per second.
Over any interval of length ``T`` it grants at most ``burst + rate * (T + 0.01)`` tokens: a
queued grant that the event loop wakes late keeps its slot on the schedule by up to 10 ms, so
wake-up lateness does not add up into a lower rate. Callers that must wait are served by priority,
first come first served within one, and refused before they sleep when their deadline cannot be
met. A :class:`KeyedLimiter` keeps one bucket per key with a bounded number of retained buckets.

Where things live:

- ``_gcra``: the arithmetic (pure, synchronous, clock-free; property-tested on its own).
- ``_queue``: the FIFO / priority / deadline wait queue.
- ``_store``: the :class:`BucketStore` seam for a schedule shared across processes, and
  :class:`InMemoryBucketStore`, its reference implementation.
- ``_bucket``: :class:`TokenBucket`, the facade that awaits, times and reports.
- ``_keyed``: :class:`KeyedLimiter`, bounded keys and eviction.
"""

from __future__ import annotations

from resilient_voice._exports import publish
from resilient_voice.limiter._bucket import (
    TokenBucket,
)
from resilient_voice.limiter._bucket import (
    TokenBucketStatistics as TokenBucketStatistics,
)
from resilient_voice.limiter._gcra import LATENESS_KEPT as _LATENESS_KEPT  # noqa: F401  (benchmarks read it)
from resilient_voice.limiter._keyed import (
    KeyedLimiter,
)
from resilient_voice.limiter._keyed import (
    KeyedLimiterStatistics as KeyedLimiterStatistics,
)
from resilient_voice.limiter._store import (
    BucketStore,
    InMemoryBucketStore,
    Reservation,
    StoreUnavailableError,
)

__all__ = [
    "BucketStore",
    "InMemoryBucketStore",
    "KeyedLimiter",
    "Reservation",
    "StoreUnavailableError",
    "TokenBucket",
]

# Records the limiters hand back to be read (``statistics()``): importable from here for
# annotations, not part of ``__all__``.
_RETURN_TYPES = ["KeyedLimiterStatistics", "TokenBucketStatistics"]

publish(globals(), [*__all__, *_RETURN_TYPES])
