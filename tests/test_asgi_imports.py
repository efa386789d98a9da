"""Importing resilient_voice.asgi, or one middleware, loads only what that middleware needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import resilient_voice.asgi

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("prometheus_client", "twilio", "starlette", "httpx")

pytestmark = pytest.mark.slow  # every test here starts a fresh interpreter


def loaded_after(statement: str) -> list[str]:
    code = (
        f"import sys, json\n{statement}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC},
        timeout=60,
    ).stdout
    return list(json.loads(out))


def test_package_import_is_lazy() -> None:
    assert loaded_after("import resilient_voice.asgi") == []


def test_vapi_middleware_needs_neither_prometheus_nor_twilio() -> None:
    assert loaded_after("from resilient_voice.asgi import VapiWebhookMiddleware") == []


def test_twilio_middleware_imports_twilio_only_when_built() -> None:
    assert loaded_after("from resilient_voice.asgi import TwilioSignatureMiddleware") == []


def test_metrics_middleware_loads_prometheus_only() -> None:
    assert loaded_after("from resilient_voice.asgi import MetricsMiddleware") == [
        "prometheus_client"
    ]


def test_all_and_dir() -> None:
    assert resilient_voice.asgi.__all__ == sorted(resilient_voice.asgi.__all__)
    for name in resilient_voice.asgi.__all__:
        assert getattr(resilient_voice.asgi, name) is not None
    assert dir(resilient_voice.asgi) == sorted(resilient_voice.asgi.__all__)
    with pytest.raises(AttributeError, match="Nope"):
        resilient_voice.asgi.Nope  # noqa: B018


def test_correlation_and_rate_limit_middleware_need_no_extra() -> None:
    statement = "from resilient_voice.asgi import CorrelationIdMiddleware, RateLimitMiddleware"
    assert loaded_after(statement) == []
