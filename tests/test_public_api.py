"""The public surface is a contract: these tests pin it."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import resilient_voice

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Every public module's ``__all__`` (sorted), pinned: docs/api.md lists the same names.
SURFACE: dict[str, list[str]] = {
    "resilient_voice": [
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
    ],
    "resilient_voice.asgi": [
        "CorrelationIdMiddleware",
        "LeaseReleaseMiddleware",
        "MetricsMiddleware",
        "RateLimitMiddleware",
        "TrustedProxies",
        "TwilioSignatureMiddleware",
        "VapiWebhookMiddleware",
        "make_metrics_app",
    ],
    "resilient_voice.breaker": ["BreakerStore", "CircuitBreaker", "InMemoryBreakerStore"],
    "resilient_voice.cli": ["main"],
    "resilient_voice.correlation": [
        "CorrelationIdFilter",
        "CorrelationIdValidator",
        "add_correlation_id",
        "correlation_scope",
        "get_correlation_id",
    ],
    "resilient_voice.errors": [
        "CapacityExhaustedError",
        "CircuitOpenError",
        "InvalidRequestError",
        "OutcomeUnknownError",
        "ProviderError",
        "RateLimitedError",
        "RejectedError",
        "ResilientVoiceError",
        "WebhookVerificationError",
    ],
    "resilient_voice.events": [
        "BreakerState",
        "BucketEvicted",
        "CallFailed",
        "CallIgnored",
        "CallRejected",
        "CallSucceeded",
        "CapacityChanged",
        "ConcurrencyBlocked",
        "Event",
        "FleetStateChanged",
        "FleetViewUpdated",
        "LeaseAcquired",
        "LeaseRefused",
        "LeaseReleased",
        "LeaseWaiting",
        "Listener",
        "RequestFinished",
        "RetryAttemptStarted",
        "RetryGaveUp",
        "RetryOutcomeUnknown",
        "RetryScheduled",
        "StateChanged",
        "StoreAvailabilityChanged",
        "TokensGranted",
        "TokensRejected",
    ],
    "resilient_voice.failure": ["FailureKind", "failure_kind_of"],
    "resilient_voice.http": [
        "ATTEMPT_ID_EXTENSION",
        "IDEMPOTENT_EXTENSION",
        "LIMITER_KEY_EXTENSION",
        "ResilientTransport",
        "ResponseTooLargeError",
        "Route",
        "UpstreamStatusError",
    ],
    "resilient_voice.leases": ["CallLeases", "Lease", "LeaseStore"],
    "resilient_voice.limiter": [
        "BucketStore",
        "InMemoryBucketStore",
        "KeyedLimiter",
        "Reservation",
        "StoreUnavailableError",
        "TokenBucket",
    ],
    "resilient_voice.metrics": ["PrometheusMetrics"],
    "resilient_voice.otel": ["OpenTelemetryListener"],
    "resilient_voice.policy": ["Policy"],
    "resilient_voice.redis": ["RedisBackend"],
    "resilient_voice.retry": ["RetryBudget", "RetryPolicy", "current_attempt", "default_retry_on"],
    "resilient_voice.testing": ["CallbackFaults", "FakeTelephony", "Fault", "ManualClock", "serve"],
    "resilient_voice.twilio": [
        "ResilientTwilioHttpClient",
        "TwilioAPIError",
        "TwilioAuthenticationError",
        "TwilioClient",
        "default_policies",
    ],
    "resilient_voice.vapi": [
        "VapiAPIError",
        "VapiAuthenticationError",
        "VapiClient",
        "VapiConcurrencyLimitError",
        "VapiCustomer",
        "attempt_overrides",
        "default_policies",
        "no_sdk_retries",
        "sdk_http_client",
    ],
}

# Entries across every ``__all__`` (the root re-exports 22 of them), and distinct names.
TOTAL = 118
DISTINCT = 96

# Records handed back to be read: importable from their module (for annotations), shown with it
# as their ``__module__``, never in ``__all__``; docs/api.md lists them under "Return types".
RETURN_TYPES: dict[str, list[str]] = {
    "resilient_voice.breaker": [
        "BreakerConfig",
        "BreakerPermit",
        "CircuitBreakerStatistics",
        "FleetStatistics",
    ],
    "resilient_voice.leases": ["LeaseStatistics"],
    "resilient_voice.limiter": ["KeyedLimiterStatistics", "TokenBucketStatistics"],
    "resilient_voice.retry": ["AttemptInfo", "RetryBudgetStatistics"],
    "resilient_voice.testing": [
        "CallbackRecord",
        "CreatedCall",
        "CreatedMessage",
        "FaultKind",
        "RecordedRequest",
    ],
    "resilient_voice.twilio": [
        "Call",
        "CallDirection",
        "CallStatus",
        "Message",
        "MessageDirection",
        "MessageStatus",
    ],
    "resilient_voice.vapi": [
        "CallStatus",
        "CallType",
        "PhoneNumberStatus",
        "SdkRequestOptions",
        "SubscriptionLimits",
        "VapiAssistant",
        "VapiCall",
        "VapiPhoneNumber",
    ],
}

PUBLIC_MODULES = sorted(SURFACE)
API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _public_modules_on_disk() -> list[str]:
    package = Path(resilient_voice.__file__).parent
    found = set()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            found.add(".".join(parts))
    return sorted(found)


def test_every_public_module_is_pinned() -> None:
    """A new module without a leading underscore is public: pin its ``__all__`` here."""
    assert _public_modules_on_disk() == PUBLIC_MODULES


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_sorted_and_pinned(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(module.__all__)
    assert list(module.__all__) == SURFACE[module_name]


def test_surface_size() -> None:
    assert sum(len(names) for names in SURFACE.values()) == TOTAL
    homes = {
        (getattr(getattr(importlib.import_module(m), n), "__module__", m), n)
        for m, names in SURFACE.items()
        for n in names
    }
    assert len(homes) == DISTINCT


@pytest.mark.parametrize("module_name", sorted(RETURN_TYPES))
def test_return_types_are_importable_and_not_exported(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in RETURN_TYPES[module_name]:
        assert name not in module.__all__
        value = getattr(module, name)
        if isinstance(value, type):  # not a type alias (``FaultKind`` is a ``Literal``)
            assert value.__module__ == module_name, name


def _documented() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    listed: dict[str, list[str]] = {}
    returned: dict[str, list[str]] = {}
    target: list[str] | None = None
    module = ""
    for line in API_DOC.read_text().splitlines():
        heading = re.fullmatch(r"## `([\w.]+)`", line)
        if heading:
            module = heading.group(1)
            target = listed.setdefault(module, [])
        elif line == "### Return types":
            target = returned.setdefault(module, [])
        elif line.startswith("- `") and target is not None:
            target.append(line[3 : line.index("`", 3)])
    return listed, returned


def test_api_doc_lists_exactly_the_pinned_names() -> None:
    listed, returned = _documented()
    assert {m: sorted(n) for m, n in listed.items()} == SURFACE
    assert {m: sorted(n) for m, n in returned.items()} == RETURN_TYPES


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
        "{'httpx','pydantic','prometheus_client','twilio','redis','coredis','uvicorn','starlette','trio','opentelemetry'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC},
    ).stdout
    assert json.loads(out) == []


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_objects_show_their_public_module(module_name: str) -> None:
    import inspect

    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            owner = obj.__module__
            assert not any(part.startswith("_") for part in owner.split(".")), (name, owner)


# Internal names the docs still show, with the change that removes them.
DOCUMENTED_OUTSIDE_THE_SURFACE: dict[tuple[str, str], str] = {}
DOCS = [API_DOC.parents[1] / "README.md", *sorted(API_DOC.parent.glob("*.md"))]
# OpenTelemetry instrument and attribute names share the package's dotted prefix
# (``resilient_voice.breaker.state``) but are strings, not module paths: the ones written in
# resilient_voice/otel.py are not references to names.
TELEMETRY_NAMES = frozenset(
    re.findall(
        r"\"(resilient_voice(?:\.\w+)+)\"",
        (API_DOC.parents[1] / "src" / "resilient_voice" / "otel.py").read_text(),
    )
)


def _references() -> set[tuple[str, str]]:
    """(module, name) for every ``from resilient_voice... import`` and dotted path in the docs."""
    found: set[tuple[str, str]] = set()
    for doc in DOCS:
        text = doc.read_text()
        for module, grouped, single in re.findall(
            r"^from (resilient_voice[\w.]*) import (?:\(([^)]*)\)|([\w, ]+)$)", text, re.M
        ):
            names = (grouped or single).replace("\n", " ").split(",")
            names = [name.split("#")[0].split(" as ")[0].strip() for name in names]
            found.update((module, name) for name in names if name)
        # A dotted path in prose; a quoted one is a string value (an extension key).
        for path in re.findall(r"(?<![\"'\w.])resilient_voice((?:\.\w+)+)", text):
            if "resilient_voice" + path in TELEMETRY_NAMES:
                continue
            parts = ["resilient_voice", *path.strip(".").split(".")]
            for cut in range(len(parts), 0, -1):
                if ".".join(parts[:cut]) in SURFACE:
                    if cut < len(parts):
                        found.add((".".join(parts[:cut]), parts[cut]))
                    break
    return found


def test_the_docs_show_only_public_names() -> None:
    references = _references()
    assert len(references) > 40  # the scan sees the docs
    outside = {
        (module, name)
        for module, name in references
        if name not in SURFACE.get(module, [])
        and name not in RETURN_TYPES.get(module, [])
        and f"{module}.{name}" not in SURFACE  # ``from resilient_voice import limiter``
    }
    assert outside == set(DOCUMENTED_OUTSIDE_THE_SURFACE)
