"""resilient_voice: keep calling telephony APIs (Twilio, Vapi) safely when they misbehave.

The core (breaker, limiter, retry policy, policy composition, correlation context) depends only
on anyio. Adapters (httpx transport, typed clients, ASGI middleware, metrics, Redis) load their
third-party packages on first use, so ``import resilient_voice`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resilient_voice._exports import lazy_exports
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.correlation import correlation_scope, get_correlation_id
from resilient_voice.errors import (
    CapacityExhaustedError,
    CircuitOpenError,
    InvalidRequestError,
    OutcomeUnknownError,
    ProviderError,
    RateLimitedError,
    RejectedError,
    ResilientVoiceError,
    WebhookVerificationError,
)
from resilient_voice.events import BreakerState
from resilient_voice.failure import FailureKind
from resilient_voice.leases import CallLeases, Lease
from resilient_voice.limiter import KeyedLimiter, TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryBudget, RetryPolicy

if TYPE_CHECKING:
    from resilient_voice.http import ResilientTransport

__all__ = [
    "BreakerState",
    "CallLeases",
    "CapacityExhaustedError",
    "CircuitBreaker",
    "CircuitOpenError",
    "FailureKind",
    "InvalidRequestError",
    "KeyedLimiter",
    "Lease",
    "OutcomeUnknownError",
    "Policy",
    "ProviderError",
    "RateLimitedError",
    "RejectedError",
    "ResilientTransport",
    "ResilientVoiceError",
    "RetryBudget",
    "RetryPolicy",
    "TokenBucket",
    "WebhookVerificationError",
    "correlation_scope",
    "get_correlation_id",
]

# Served on first access, so that importing the package does not import httpx.
__getattr__, __dir__ = lazy_exports(
    globals(),
    {"ResilientTransport": "resilient_voice.http", "__version__": "resilient_voice._version"},
    [*__all__, "__version__"],
)
