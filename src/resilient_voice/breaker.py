"""Circuit breaker: stop calling an upstream that is failing, and probe it to recover."""

from __future__ import annotations

import enum

__all__ = ["BreakerState"]


class BreakerState(enum.Enum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
