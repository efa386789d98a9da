"""Retries that never place a call twice.

- ``_decision``: the pure, clock-free decision (``Retry(delay) | GiveUp(reason) | Unknown``);
- ``_policy``: :class:`RetryPolicy`, the async facade that times, sleeps and reports;
- ``_budget``: :class:`RetryBudget`, the cap on retries shared across calls.

``Retry-After`` parsing lives with the http layer (:mod:`resilient_voice.http`).
"""

from __future__ import annotations

from resilient_voice._exports import publish
from resilient_voice.retry._budget import (
    RetryBudget,
)
from resilient_voice.retry._budget import (
    RetryBudgetStatistics as RetryBudgetStatistics,
)
from resilient_voice.retry._policy import (
    AttemptInfo as AttemptInfo,
)
from resilient_voice.retry._policy import (
    RetryPolicy,
    current_attempt,
    default_retry_on,
)

__all__ = ["RetryBudget", "RetryPolicy", "current_attempt", "default_retry_on"]

# Records handed back to be read (``current_attempt()``, ``statistics()``): importable from here
# for annotations, not part of ``__all__``.
_RETURN_TYPES = ["AttemptInfo", "RetryBudgetStatistics"]

publish(globals(), [*__all__, *_RETURN_TYPES])
