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
- ``_facade``: :class:`CircuitBreaker` itself (decorator, ``async with``, ``call()``,
  ``acquire()``), which admits, times, runs and reports, and decides nothing.
"""

from __future__ import annotations

from resilient_voice.breaker._config import BreakerConfig, Classification, ExceptionMatcher
from resilient_voice.breaker._facade import BreakerStatistics, CircuitBreaker
from resilient_voice.breaker._permit import BreakerPermit
from resilient_voice.breaker._store import BreakerStore, InMemoryBreakerStore
from resilient_voice.events import BreakerState

__all__ = [
    "BreakerConfig",
    "BreakerPermit",
    "BreakerState",
    "BreakerStatistics",
    "BreakerStore",
    "CircuitBreaker",
    "Classification",
    "ExceptionMatcher",
    "InMemoryBreakerStore",
]

for _name in __all__:
    _value = globals()[_name]
    if getattr(_value, "__module__", "").startswith("resilient_voice.breaker._"):
        _value.__module__ = __name__
del _name, _value
