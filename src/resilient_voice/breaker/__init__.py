"""Circuit breaker: stop calling an upstream that is failing, and probe it to recover.

A breaker is built once per upstream at startup and shared by every task that calls it. The
package is laid out like Polly's breaker, one concern per module:

- ``_config``: :class:`BreakerConfig`, the validated record built from the breaker's keyword
  arguments, and the exception classification;
- ``_machine``: the synchronous, clock-free state machine (CLOSED, OPEN, HALF_OPEN) with one trip
  behaviour per mode; ``_health``: the sliding windows it judges;
- ``_permit``: :class:`BreakerPermit`, admission for one call and the one way to report it;
- ``_owner``: which thread and event loop may use the breaker right now;
- ``_store``: the :class:`BreakerStore` seam through which replicas share what they see;
  ``_fleet``: the two fleet rules (quorum, combined rate), pure functions of what they shared;
- ``_facade``: :class:`CircuitBreaker` itself (decorator, ``async with``, ``call()``,
  ``acquire()``), which admits, times, runs and reports, and decides nothing.
"""

from __future__ import annotations

from resilient_voice._exports import publish
from resilient_voice.breaker._config import BreakerConfig as BreakerConfig
from resilient_voice.breaker._facade import (
    CircuitBreaker,
)
from resilient_voice.breaker._facade import (
    CircuitBreakerStatistics as CircuitBreakerStatistics,
)
from resilient_voice.breaker._fleet import FleetStatistics as FleetStatistics
from resilient_voice.breaker._permit import BreakerPermit as BreakerPermit
from resilient_voice.breaker._store import BreakerStore, InMemoryBreakerStore

__all__ = ["BreakerStore", "CircuitBreaker", "InMemoryBreakerStore"]

# Records the breaker hands back to be read (``breaker.config``, ``acquire()``, ``statistics()``):
# importable from here for annotations, not part of ``__all__``.
_RETURN_TYPES = [
    "BreakerConfig",
    "BreakerPermit",
    "CircuitBreakerStatistics",
    "FleetStatistics",
]

publish(globals(), [*__all__, *_RETURN_TYPES])
