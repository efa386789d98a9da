"""Retries that never place a call twice.

- ``_decision``: the pure, clock-free decision (``Retry(delay) | GiveUp(reason) | Unknown``);
- ``_policy``: :class:`RetryPolicy`, the async facade that times, sleeps and reports;
- ``_budget``: :class:`RetryBudget`, the cap on retries shared across calls.

``Retry-After`` parsing lives with the http layer (:mod:`resilient_voice.http`).
"""

from __future__ import annotations

from resilient_voice.retry._budget import RetryBudget, RetryBudgetStatistics
from resilient_voice.retry._decision import Jitter
from resilient_voice.retry._policy import (
    AttemptInfo,
    RetryPolicy,
    current_attempt,
    default_retry_on,
)

__all__ = [
    "AttemptInfo",
    "Jitter",
    "RetryBudget",
    "RetryBudgetStatistics",
    "RetryPolicy",
    "current_attempt",
    "default_retry_on",
]

# Objects show the module users import them from (as httpx does).
for _obj in (AttemptInfo, RetryBudget, RetryBudgetStatistics, RetryPolicy):
    _obj.__module__ = __name__
for _fn in (current_attempt, default_retry_on):
    _fn.__module__ = __name__
del _obj, _fn
