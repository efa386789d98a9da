"""The public surface is a contract: these tests pin it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import resilient_voice

SRC = str(Path(__file__).resolve().parents[1] / "src")

EXPECTED = [
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


def test_all_is_sorted_and_pinned() -> None:
    assert resilient_voice.__all__ == sorted(resilient_voice.__all__)
    assert resilient_voice.__all__ == EXPECTED


EXPECTED_ASGI = [
    "CorrelationIdMiddleware",
    "MetricsMiddleware",
    "RateLimitMiddleware",
    "TrustedProxies",
    "TwilioSignatureMiddleware",
    "VapiWebhookMiddleware",
    "make_metrics_app",
]


def test_asgi_all_is_pinned() -> None:
    import resilient_voice.asgi

    assert resilient_voice.asgi.__all__ == EXPECTED_ASGI


def test_every_public_name_resolves() -> None:
    for name in resilient_voice.__all__:
        assert getattr(resilient_voice, name) is not None


def test_version_is_lazy_and_a_string() -> None:
    assert isinstance(resilient_voice.__version__, str)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="does_not_exist"):
        resilient_voice.does_not_exist  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.slow
def test_import_keeps_the_core_light() -> None:
    """`import resilient_voice` must not load any adapter's third-party package."""
    code = (
        "import sys, json, resilient_voice, resilient_voice.testing;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'httpx','pydantic','prometheus_client','twilio','redis','coredis','uvicorn','starlette','trio'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC},
    ).stdout
    assert json.loads(out) == []


PUBLIC_MODULES = [
    "resilient_voice",
    "resilient_voice.asgi",
    "resilient_voice.breaker",
    "resilient_voice.correlation",
    "resilient_voice.errors",
    "resilient_voice.events",
    "resilient_voice.failure",
    "resilient_voice.http",
    "resilient_voice.limiter",
    "resilient_voice.metrics",
    "resilient_voice.policy",
    "resilient_voice.retry",
    "resilient_voice.testing",
    "resilient_voice.twilio",
    "resilient_voice.vapi",
]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_objects_show_their_public_module(module_name: str) -> None:
    import importlib
    import inspect

    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            owner = obj.__module__
            assert not any(part.startswith("_") for part in owner.split(".")), (name, owner)
