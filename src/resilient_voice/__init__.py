"""resilient_voice: keep calling telephony APIs (Twilio, Vapi) safely when they misbehave.

The core (breaker, limiter, retry policy, policy composition, correlation context) depends only
on anyio. Adapters (httpx transport, typed clients, ASGI middleware, metrics, Redis) load their
third-party packages on first use, so ``import resilient_voice`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient_voice.breaker import BreakerConfig, BreakerState, CircuitBreaker
from resilient_voice.correlation import (
    CorrelationIdFilter,
    correlation_scope,
    get_correlation_id,
    new_correlation_id,
)
from resilient_voice.errors import (
    CircuitOpenError,
    InvalidRequestError,
    OutcomeUnknownError,
    ProviderError,
    RateLimitedError,
    RejectedError,
    ResilientVoiceError,
    WebhookVerificationError,
)
from resilient_voice.failure import FailureKind
from resilient_voice.limiter import KeyedLimiter, TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.retry import AttemptInfo, RetryBudget, RetryPolicy, current_attempt

if TYPE_CHECKING:
    from resilient_voice.http import ResilientTransport

__all__ = [
    "AttemptInfo",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "CorrelationIdFilter",
    "FailureKind",
    "InvalidRequestError",
    "KeyedLimiter",
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
    "current_attempt",
    "get_correlation_id",
    "new_correlation_id",
]

# Names served on first access so that importing the package does not import their modules'
# optional dependencies (httpx for the transport).
_LAZY: dict[str, str] = {"ResilientTransport": "resilient_voice.http"}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from resilient_voice._version import __version__

        return __version__
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resilient_voice' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
