"""Every public constructor refuses bad configuration at construction, naming the argument.

``CONSTRUCTORS`` lists each public constructor (and the public functions that build
configured objects) with a valid baseline and, for every argument of its signature, the kinds
of bad value it must refuse (``ARGUMENTS``). Hypothesis draws values of each kind; each one,
put in place of the argument in the valid baseline, must raise ``TypeError`` or ``ValueError``
(``InvalidRequestError`` is a ``ValueError``) at construction, with the argument's name in the
message: a typo fails at startup, not on the first call at three in the morning.

A kind listed under ``tolerated`` may also be accepted (a huge count is large, not wrong); the
object is then used once, and that use must not raise anything but the library's own errors.

``test_every_argument_has_bad_values`` introspects each signature and fails when an argument
has no entry, so a new constructor argument is caught until someone says what is bad for it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import resilient_voice
from resilient_voice import (
    CallLeases,
    CircuitBreaker,
    KeyedLimiter,
    Policy,
    ResilientTransport,
    ResilientVoiceError,
    RetryBudget,
    RetryPolicy,
    TokenBucket,
)
from resilient_voice.asgi import (
    CorrelationIdMiddleware,
    LeaseReleaseMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    TrustedProxies,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
    make_metrics_app,
)
from resilient_voice.breaker import InMemoryBreakerStore
from resilient_voice.correlation import (
    CorrelationIdFilter,
    CorrelationIdValidator,
    correlation_scope,
)
from resilient_voice.http import Route
from resilient_voice.limiter import InMemoryBucketStore
from resilient_voice.metrics import PrometheusMetrics
from resilient_voice.otel import OpenTelemetryListener
from resilient_voice.redis import RedisBackend
from resilient_voice.testing import CallbackFaults, FakeTelephony, Fault, ManualClock
from resilient_voice.twilio import ResilientTwilioHttpClient, TwilioClient
from resilient_voice.twilio import default_policies as twilio_policies
from resilient_voice.vapi import VapiClient, no_sdk_retries, sdk_http_client
from resilient_voice.vapi import default_policies as vapi_policies

NAN = math.nan
INF = math.inf
OBJECT = object()

# Bad values by kind. Each argument lists the kinds that are wrong for it.
STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "none": st.none(),
    "false flag": st.just(False),
    "bool": st.booleans(),
    "nan": st.just(NAN),
    "inf": st.sampled_from([INF, -INF]),
    "negative": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
    | st.integers(max_value=-1),
    "negative int": st.integers(max_value=-1),
    "zero": st.sampled_from([0, 0.0, -0.0]),
    "zero int": st.just(0),
    "above one": st.floats(min_value=1.0001, allow_nan=False, allow_infinity=False),
    "overflow": st.just(10**400),  # an int no float can hold
    "huge": st.sampled_from([2**63, 10**30, 1e300]),
    "not a number": st.sampled_from(["1", b"1", [1.0], OBJECT, 1j]),
    "not an int": st.sampled_from(["1", b"1", 1.5, 2.0, OBJECT]),
    "not a str": st.sampled_from([1, 1.5, b"x", ["x"], OBJECT]),
    "empty str": st.sampled_from(["", " ", "\t"]),
    "control chars": st.sampled_from(["a\nb", "a\r\nX-Injected: 1", "\x00", "a\x7fb", "tab\tname"]),
    "not a url": st.sampled_from(["api.twilio.com", "ftp://api.twilio.com", "https://", "//x.y"]),
    "not a token": st.sampled_from(["a b", "a:b", "a/b", "\u00e9", "a\tb", "(x)"]),
    "not an identifier": st.sampled_from(["a b", "1a", "a-b", "a.b"]),
    "not a secret": st.sampled_from([1, 1.5, ["x"], OBJECT]),
    "not text": st.sampled_from([1, 1.5, OBJECT]),
    "http url": st.sampled_from(["http://api.twilio.com", "http://api.vapi.ai"]),
    "not a bool": st.sampled_from(["false", "no", "0", None, 1.5, [], OBJECT]),
    "not callable": st.sampled_from([1, "x", b"x", OBJECT]),
    "not a bool or None": st.sampled_from(["false", "no", "0", 1.5, [], OBJECT]),
    "bad headers": st.sampled_from([{1: "x"}, {"a b": "x"}, {"x": "a\nb"}, {"x": 1}]),
    "not iterable": st.sampled_from([1, 1.5, OBJECT]),
    "non-callable items": st.sampled_from([[1], ["x"], [None]]),
    "not a clock": st.sampled_from([1, "x", OBJECT, time.monotonic]),
    "wrong object": st.sampled_from([1, "x", OBJECT, {}]),
    "unknown choice": st.sampled_from(["nope", "", "REJECT", 1]),
    "not a mapping": st.sampled_from([1, "x", [1, 2]]),
    "bad mapping items": st.sampled_from([{1: "x"}, {"x": 1}, {"": "x"}, {"x": ""}]),
    "single string": st.sampled_from(["/hook", "10.0.0.1/8"]),
    "bad paths": st.sampled_from([["hook"], [1], [""], []]),
    "bad networks": st.sampled_from(
        [["*"], ["0.0.0.0/0"], ["::/0"], ["nope"], [1], ["10.0.0.1/8"]]
    ),
    "bad buckets": st.sampled_from([[], ["x"], [NAN], [0.5, 0.1], [-1.0], [True]]),
    "bad statuses": st.sampled_from([frozenset({99}), frozenset({"500"}), frozenset({600})]),
    "bad methods": st.sampled_from([frozenset({"get post"}), frozenset({1}), "GET"]),
    "bad endpoints": st.sampled_from(["", [], [1], ["a\nb"]]),
    "bad status": st.sampled_from([99, 600, "500", 500.0, True]),
    "bad routes": st.sampled_from([1, "x", {"/x": "1"}, {"x": (1.0, 1.0)}, [("/x", NAN, 1.0)]]),
    "bad patterns": st.sampled_from([["hook"], [1], [""]]),
    "bad exceptions": st.sampled_from([1, "x", [1], (ValueError, 1), object]),
    "bad tokens": st.sampled_from([[], [""], [1], [None]]),
    "bad sid": st.sampled_from(["XX" + "0" * 32, "AC123", "AC" + "g" * 32]),
    "bad pattern": st.sampled_from(["(", "[a-"]),
}


@dataclass(frozen=True)
class Arg:
    """What is bad for one argument: ``kinds`` must be refused, ``tolerated`` may be accepted.

    ``names``: what the message must contain (the argument's name, unless the error is about an
    entry of it, which may be named as such).
    """

    kinds: tuple[str, ...]
    tolerated: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    needs: Mapping[str, Any] = field(default_factory=dict)


def positive(*extra: str, optional: bool = False, infinite: bool = False) -> Arg:
    kinds = ["not a number", "bool", "nan", "negative", "zero", "overflow", *extra]
    if not optional:
        kinds.append("none")
    if not infinite:
        kinds.append("inf")
    return Arg(tuple(kinds))


def non_negative(*extra: str, optional: bool = False, infinite: bool = False) -> Arg:
    kinds = ["not a number", "bool", "nan", "negative", "overflow", *extra]
    if not optional:
        kinds.append("none")
    if not infinite:
        kinds.append("inf")
    return Arg(tuple(kinds))


def fraction(*, optional: bool = False, zero: bool = False) -> Arg:
    kinds = ["not a number", "bool", "nan", "inf", "negative", "above one", "overflow"]
    if not zero:
        kinds.append("zero")
    if not optional:
        kinds.append("none")
    return Arg(tuple(kinds))


def count(*, optional: bool = False, zero: bool = False) -> Arg:
    kinds = ["not an int", "bool", "negative int"]
    if not zero:
        kinds.append("zero int")
    if not optional:
        kinds.append("none")
    return Arg(tuple(kinds), tolerated=("huge",))


def text(*extra: str, optional: bool = False, empty: bool = False) -> Arg:
    kinds = ["not a str", "control chars", *extra]
    if not empty:
        kinds.append("empty str")
    if not optional:
        kinds.append("none")
    return Arg(tuple(kinds))


def secret(*, optional: bool = False) -> Arg:
    kinds = ["not a str", "empty str"]
    if not optional:
        kinds.append("none")
    return Arg(tuple(kinds))


def key(*, optional: bool = True) -> Arg:
    """A secret given as str or bytes (Vapi's webhook credentials)."""
    kinds = ["not a secret", "empty str"]
    if not optional:
        kinds.append("none")
    return Arg(tuple(kinds))


def flag() -> Arg:
    return Arg(("not a bool",))


def instance(*, optional: bool = True) -> Arg:
    return Arg(("wrong object",) if optional else ("wrong object", "none"))


def function(*, optional: bool = True) -> Arg:
    return Arg(("not callable",) if optional else ("not callable", "none"))


CLOCK = Arg(("not a clock",))
LISTENERS = Arg(("not iterable", "non-callable items"))
NETWORKS = Arg(("bad networks", "not iterable"), names=("trusted", "networks"))
PATHS = Arg(("single string", "bad paths", "not iterable"))


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


APP = Arg(("not callable", "none"))
_SID = "AC" + "0" * 32


async def _noop(_: Any) -> None:
    return None


async def _request(app: Any) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/")


async def _acquire(limiter: Any) -> None:
    await limiter.try_acquire()


async def _acquire_keyed(limiter: Any) -> None:
    await limiter.try_acquire("k")


async def _breaker(breaker: Any) -> None:
    async def ok() -> int:
        return 1

    await breaker.call(ok)


async def _lease(leases: Any) -> None:
    lease = await leases.acquire(timeout=0)
    await lease.release()


async def _retry(policy: Any) -> None:
    async def ok() -> int:
        return 1

    await policy.call(ok)


async def _close(client: Any) -> None:
    await client.aclose()


@dataclass(frozen=True)
class Constructor:
    build: Callable[..., Any]
    valid: Callable[[], dict[str, Any]]
    arguments: Mapping[str, Arg]
    use: Callable[[Any], Awaitable[None]] = _noop


CONSTRUCTORS: dict[str, Constructor] = {
    "CircuitBreaker": Constructor(
        CircuitBreaker,
        lambda: {"name": "b"},
        {
            "name": text(),
            "failure_threshold": count(),
            "recovery_timeout": positive(),
            "window_size": count(optional=True),
            "window_duration": positive(optional=True),
            "failure_rate_threshold": fraction(optional=True),
            "minimum_calls": count(optional=True),
            "slow_call_duration": positive(optional=True),
            "slow_call_rate_threshold": fraction(optional=True),
            "half_open_max_calls": count(),
            "success_threshold": count(),
            "max_wait_in_half_open": positive(optional=True),
            "backoff_multiplier": positive(),
            "max_recovery_timeout": positive(optional=True),
            "failure_on": Arg(("bad exceptions",)),
            "ignore_on": Arg(("bad exceptions",)),
            "failure_result": function(),
            "clock": CLOCK,
            "listeners": LISTENERS,
            "store": instance(),
            "fleet_quorum": fraction(optional=True, zero=True),
        },
        _breaker,
    ),
    "CallLeases": Constructor(
        CallLeases,
        lambda: {"name": "l", "capacity": 2, "ttl": 600.0},
        {
            "name": text(),
            "capacity": count(),
            "ttl": positive(),
            "clock": CLOCK,
            "store": instance(),
            "on_backend_error": Arg(("unknown choice", "none")),
            "capacity_recovery": positive(),
            "listeners": LISTENERS,
        },
        _lease,
    ),
    "TokenBucket": Constructor(
        TokenBucket,
        lambda: {"rate": 1.0},
        {
            "rate": positive(),
            "burst": positive(),
            "clock": CLOCK,
            "name": text(optional=True),
            "listeners": LISTENERS,
            "store": instance(),
            "on_backend_error": Arg(("unknown choice", "none")),
        },
        _acquire,
    ),
    "KeyedLimiter": Constructor(
        KeyedLimiter,
        lambda: {"rate": 1.0},
        {
            "rate": positive(),
            "burst": positive(),
            "max_keys": count(),
            "clock": CLOCK,
            "name": text(optional=True),
            "listeners": LISTENERS,
            "on_full": Arg(("unknown choice", "none")),
            "store": instance(),
            "on_backend_error": Arg(("unknown choice", "none")),
        },
        _acquire_keyed,
    ),
    "RetryPolicy": Constructor(
        RetryPolicy,
        dict,
        {
            "max_attempts": count(),
            "base_delay": non_negative(),
            "max_delay": non_negative(),
            "jitter": Arg(("unknown choice", "none")),
            "total_timeout": positive(optional=True),
            "retry_on": function(),
            "respect_retry_after": flag(),
            "budget": instance(),
            "clock": CLOCK,
            "random": Arg(("not callable",)),
            "name": text(),
            "listeners": LISTENERS,
        },
        _retry,
    ),
    "RetryBudget": Constructor(
        RetryBudget,
        dict,
        {
            "ratio": non_negative(),
            "min_retries_per_second": non_negative(),
            "window": positive(),
            "clock": CLOCK,
        },
    ),
    "Policy": Constructor(
        Policy,
        dict,
        {
            "breaker": instance(),
            "limiter": instance(),
            "key": function(),
            "retry": instance(),
            "timeout": positive(optional=True),
            "total_timeout": positive(optional=True),
            "max_concurrency": count(optional=True),
            "idempotent": flag(),
            "clock": CLOCK,
        },
    ),
    "ResilientTransport": Constructor(
        ResilientTransport,
        lambda: {"policy": Policy()},
        {
            "policy": instance(optional=False),
            "transport": instance(),
            "routes": Arg(("not iterable", "non-callable items")),
            "name": text(),
            "idempotency_key_header": text("not a token"),
            "correlation_header": text("not a token", optional=True),
            "listeners": LISTENERS,
            "max_response_bytes": count(optional=True),
        },
        _close,
    ),
    "Route": Constructor(
        Route,
        lambda: {"name": "r", "path": "/x"},
        {
            "name": text(),
            "path": text(optional=True),
            "methods": Arg(("bad methods",)),
            "host": text(optional=True),
            "policy": instance(),
            "unprocessed_statuses": Arg(("bad statuses",)),
            "honours_idempotency_key": flag(),
            "idempotent": Arg(("not a bool or None",)),
        },
    ),
    "TwilioClient": Constructor(
        TwilioClient,
        lambda: {"account_sid": _SID, "auth_token": "t" * 32},
        {
            "account_sid": text("bad sid"),
            "auth_token": secret(optional=True),
            "api_key": secret(optional=True),
            "api_secret": secret(optional=True),
            "base_url": text("not a url", "http url"),
            "allow_insecure_http": flag(),
            "policy": instance(),
            "policies": Arg(("not a mapping",)),
            "breaker": instance(),
            "retry": instance(),
            "transport": instance(),
            "calls_per_second": positive(),
            "messages_per_second": positive(),
            "timeout": positive(),
            "clock": CLOCK,
            "correlation_param": text(optional=True),
            "attempt_param": text(optional=True),
            "name": text(),
            "listeners": LISTENERS,
            "store": instance(),
            "leases": instance(),
            "lease_timeout": non_negative(optional=True),
        },
        _close,
    ),
    "VapiClient": Constructor(
        VapiClient,
        lambda: {"api_key": "k" * 16},
        {
            "api_key": secret(),
            "base_url": text("not a url", "http url"),
            "allow_insecure_http": flag(),
            "policy": instance(),
            "policies": Arg(("not a mapping",)),
            "http_client": instance(),
            "transport": instance(),
            "timeout": positive(),
            "unprocessed_429": flag(),
            "clock": CLOCK,
            "name": text(),
            "listeners": LISTENERS,
            "calls_per_second": positive(optional=True),
            "store": instance(),
            "leases": instance(),
            "lease_timeout": non_negative(optional=True),
            "server_url_configured": flag(),
        },
        _close,
    ),
    "ResilientTwilioHttpClient": Constructor(
        ResilientTwilioHttpClient,
        dict,
        {
            "policy": instance(),
            "policies": Arg(("not a mapping",)),
            "base_url": text("not a url", "http url", optional=True),
            "allow_insecure_http": flag(),
            "transport": instance(),
            "calls_per_second": positive(),
            "messages_per_second": positive(),
            "breaker": instance(),
            "retry": instance(),
            "timeout": positive(),
            "clock": CLOCK,
            "account_label": text(),
            "name": text(),
            "listeners": LISTENERS,
            "logger": instance(optional=False),
        },
        _close,
    ),
    "twilio.default_policies": Constructor(
        twilio_policies,
        lambda: {"account": _SID},
        {
            "account": text(),
            "calls_per_second": positive(),
            "messages_per_second": positive(),
            "timeout": positive(optional=True),
            "breaker": instance(),
            "retry": instance(),
            "clock": CLOCK,
            "store": instance(),
        },
    ),
    "vapi.default_policies": Constructor(
        vapi_policies,
        dict,
        {
            "breaker": instance(),
            "clock": CLOCK,
            "calls_per_second": positive(optional=True),
            "store": instance(),
            "name": text(),
        },
    ),
    "vapi.sdk_http_client": Constructor(
        sdk_http_client,
        dict,
        {
            "policy": instance(),
            "policies": Arg(("not a mapping",)),
            "base_url": text("not a url", "http url"),
            "allow_insecure_http": flag(),
            "transport": instance(),
            "timeout": positive(),
            "unprocessed_429": flag(),
            "clock": CLOCK,
            "name": text(),
            "listeners": LISTENERS,
        },
        _close,
    ),
    "vapi.no_sdk_retries": Constructor(
        no_sdk_retries,
        dict,
        {
            "timeout_in_seconds": count(optional=True),
            "additional_headers": Arg(("not a mapping", "bad headers")),
        },
    ),
    "CorrelationIdMiddleware": Constructor(
        CorrelationIdMiddleware,
        lambda: {"app": _app},
        {
            "app": APP,
            "header": text("not a token"),
            "validator": instance(),
            "generate": function(optional=False),
            "trust_traceparent": flag(),
            "query_param": text(optional=True),
            "echo": flag(),
        },
        _request,
    ),
    "MetricsMiddleware": Constructor(
        MetricsMiddleware,
        lambda: {"app": _app, "registry": CollectorRegistry()},
        {
            "app": APP,
            "registry": instance(),
            "route_template": function(),
            "buckets": Arg(("bad buckets", "not iterable")),
            "max_routes": count(),
        },
        _request,
    ),
    "LeaseReleaseMiddleware": Constructor(
        LeaseReleaseMiddleware,
        lambda: {
            "app": _app,
            "leases": CallLeases("l", 2, ttl=600.0),
            "paths": ["/twilio/status"],
            "verified": True,
        },
        {
            "app": APP,
            "leases": instance(optional=False),
            "paths": Arg(("single string", "bad paths", "not iterable", "none")),
            "verified": Arg(("not a bool", "false flag")),
            "max_body": count(),
        },
    ),
    "RateLimitMiddleware": Constructor(
        RateLimitMiddleware,
        lambda: {"app": _app, "rate": 1.0},
        {
            "app": APP,
            "rate": positive(optional=True),
            "burst": positive(),
            "key": function(),
            "exempt": Arg(("single string", "bad patterns", "not iterable")),
            "trusted_proxies": NETWORKS,
            "routes": Arg(("bad routes",)),
            "max_keys": count(),
            "clock": CLOCK,
            "listeners": LISTENERS,
            "policy_name": text(),
            "forwarded_hops": count(),
            "name": text(),
            "ipv6_prefix": Arg(("not an int", "bool", "negative int", "none"), tolerated=("huge",)),
            "store": instance(),
            "on_backend_error": Arg(("unknown choice", "none")),
        },
        _request,
    ),
    "TrustedProxies": Constructor(
        TrustedProxies,
        dict,
        {"networks": NETWORKS, "server_applied": flag()},
    ),
    "TwilioSignatureMiddleware": Constructor(
        TwilioSignatureMiddleware,
        lambda: {"app": _app, "auth_token": "t" * 32},
        {
            "app": APP,
            "auth_token": Arg(("not text", "empty str", "none", "bad tokens")),
            "paths": PATHS,
            "public_base_url": text("not a url", optional=True),
            "trusted_proxies": NETWORKS,
            "shared_keys": Arg(("not a mapping", "bad mapping items")),
            "max_body": count(),
            "max_fields": count(),
            "strict": flag(),
        },
        _request,
    ),
    "VapiWebhookMiddleware": Constructor(
        VapiWebhookMiddleware,
        lambda: {"app": _app, "secret": "s" * 16},
        {
            "app": APP,
            "secret": key(),
            "secret_header": text("not a token"),
            "bearer_token": key(),
            "bearer_header": text("not a token"),
            "bearer_prefix": flag(),
            "hmac_secret": key(),
            "signature_header": text("not a token"),
            "timestamp_header": text("not a token"),
            "algorithm": Arg(("unknown choice", "none")),
            "signature_encoding": Arg(("unknown choice", "none")),
            "tolerance": positive(),
            "max_body": count(),
            "paths": PATHS,
            "clock": function(),
            "trusted_proxies": NETWORKS,
        },
        _request,
    ),
    "make_metrics_app": Constructor(make_metrics_app, dict, {"registry": instance()}),
    "PrometheusMetrics": Constructor(
        PrometheusMetrics,
        lambda: {"registry": CollectorRegistry()},
        {
            "registry": instance(),
            "limiter_wait_buckets": Arg(("bad buckets", "not iterable")),
            "http_client_buckets": Arg(("bad buckets", "not iterable")),
        },
    ),
    "OpenTelemetryListener": Constructor(
        OpenTelemetryListener,
        dict,
        {"meter_provider": instance(), "tracer_provider": instance()},
    ),
    "RedisBackend": Constructor(
        RedisBackend,
        lambda: {"client": _coredis()},
        {
            "client": instance(optional=False),
            "prefix": text(),
            "timeout": positive(),
            "min_replicas": count(),
        },
    ),
    "InMemoryBreakerStore": Constructor(InMemoryBreakerStore, dict, {}),
    "InMemoryBucketStore": Constructor(InMemoryBucketStore, dict, {"clock": CLOCK}),
    "ManualClock": Constructor(
        ManualClock,
        dict,
        {
            "start": Arg(("not a number", "bool", "nan", "inf", "none", "overflow")),
            "autojump": flag(),
        },
    ),
    "CallbackFaults": Constructor(
        CallbackFaults,
        dict,
        {
            "loss": fraction(zero=True),
            "duplicate": fraction(zero=True),
            "reorder": fraction(zero=True),
            "reorder_delay": non_negative(),
        },
    ),
    "Fault": Constructor(
        Fault,
        lambda: {"kind": "error"},
        {
            "kind": Arg(("unknown choice", "none")),
            "endpoints": Arg(("bad endpoints",)),
            "start": non_negative(),
            "end": Arg(("not a number", "bool", "nan", "negative", "zero", "none", "overflow")),
            "probability": fraction(zero=True),
            "count": count(optional=True),
            "status": Arg(("bad status",)),
            "retry_after": non_negative(optional=True),
            "delay": non_negative(),
            "reset": flag(),
            "stall": flag(),
        },
    ),
    "Fault.burst": Constructor(
        Fault.burst,
        lambda: {"count": 1},
        {
            "count": count(),
            "status": Arg(("bad status",)),
            "endpoints": Arg(("bad endpoints",)),
            "start": non_negative(),
            "end": Arg(("not a number", "bool", "nan", "negative", "zero", "none", "overflow")),
        },
    ),
    "Fault.error_rate": Constructor(
        Fault.error_rate,
        lambda: {"probability": 0.5},
        {
            "probability": fraction(zero=True),
            "status": Arg(("bad status",)),
            "endpoints": Arg(("bad endpoints",)),
            "start": non_negative(),
            "end": Arg(("not a number", "bool", "nan", "negative", "zero", "none", "overflow")),
        },
    ),
    "Fault.latency": Constructor(
        Fault.latency,
        lambda: {"delay": 0.1},
        {
            "delay": positive(),
            "probability": fraction(zero=True),
            "endpoints": Arg(("bad endpoints",)),
            "start": non_negative(),
            "end": Arg(("not a number", "bool", "nan", "negative", "zero", "none", "overflow")),
        },
    ),
    "Fault.outage": Constructor(
        Fault.outage,
        lambda: {"start": 0.0, "end": 1.0},
        {
            "start": non_negative(),
            "end": Arg(("not a number", "bool", "nan", "negative", "zero", "none", "overflow")),
            "status": Arg(("bad status",)),
            "endpoints": Arg(("bad endpoints",)),
        },
    ),
    "Fault.rate_limited": Constructor(
        Fault.rate_limited,
        dict,
        {
            "probability": fraction(zero=True),
            "retry_after": non_negative(optional=True),
            "count": count(optional=True),
            "endpoints": Arg(("bad endpoints",)),
            "start": non_negative(),
            "end": Arg(("not a number", "bool", "nan", "negative", "zero", "none", "overflow")),
        },
    ),
    "FakeTelephony": Constructor(
        FakeTelephony,
        dict,
        {
            "seed": Arg(("not an int", "bool", "none")),
            "twilio_accounts": Arg(("not a mapping", "bad mapping items")),
            "twilio_api_keys": Arg(("not a mapping",)),
            "vapi_api_keys": Arg(("not iterable", "single string")),
            "calls_per_second": positive(),
            "cps_tolerance": non_negative(),
            "call_duration": non_negative(),
            "ring_duration": non_negative(),
            "status_callbacks": flag(),
            "callback_faults": instance(),
            "callback_timeout": positive(),
            "twilio_concurrency_limit": count(optional=True),
            "twilio_call_concurrency_limit": count(optional=True),
            "callback_delay": non_negative(),
            "vapi_server_url": text("not a url", optional=True),
            "vapi_credential": secret(optional=True),
            "vapi_credential_header": text("not a token"),
            "vapi_assistants": Arg(("not iterable",)),
            "vapi_phone_numbers": Arg(("not iterable", "single string")),
            "vapi_concurrency_limit": count(),
            "faults": Arg(("not iterable", "non-callable items")),
            "clock": CLOCK,
        },
    ),
    "CorrelationIdFilter": Constructor(
        CorrelationIdFilter,
        dict,
        {
            "name": text(empty=True),
            "default": text(empty=True),
            "attribute": text("not an identifier"),
        },
    ),
    "correlation_scope": Constructor(
        correlation_scope,
        dict,
        {
            # Request data, not configuration: an invalid id is replaced by a fresh one.
            "correlation_id": Arg(()),
            "validator": instance(),
        },
    ),
    "CorrelationIdValidator": Constructor(
        CorrelationIdValidator,
        dict,
        {"pattern": Arg(("bad pattern", "not a str")), "max_length": count()},
    ),
}


def _coredis() -> Any:
    import coredis

    return coredis.Redis(host="127.0.0.1", port=6379)


def _parameters(build: Callable[..., Any]) -> list[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        name
        for name, parameter in inspect.signature(build).parameters.items()
        if parameter.kind not in kinds and name != "self"
    ]


# Public names that are not constructors of configured objects, and why.
NOT_CONFIGURATION = {
    "resilient_voice": "errors, enums and correlation helpers; the constructors are listed",
    "resilient_voice.events": "event records the library builds",
    "resilient_voice.errors": "exceptions the library raises",
    "resilient_voice.failure": "an enum and a classifier function",
}


# Public classes that are not configuration, and why.
RECORDS = {
    "VapiCustomer": "a pydantic model of a request field: pydantic validates it",
    "Reservation": "a record a BucketStore returns, not built by users",
    "Lease": "a record CallLeases returns, not built by users",
}


def test_every_argument_has_bad_values() -> None:
    missing = {
        name: sorted(set(_parameters(c.build)) - set(c.arguments))
        for name, c in CONSTRUCTORS.items()
    }
    stale = {
        name: sorted(set(c.arguments) - set(_parameters(c.build)))
        for name, c in CONSTRUCTORS.items()
    }
    assert {k: v for k, v in missing.items() if v} == {}, "list bad values for these arguments"
    assert {k: v for k, v in stale.items() if v} == {}, "these arguments no longer exist"
    for name, constructor in CONSTRUCTORS.items():
        for argument, arg in constructor.arguments.items():
            unknown = set(arg.kinds + arg.tolerated) - STRATEGIES.keys()
            assert not unknown, (name, argument, unknown)


def test_every_public_class_with_arguments_is_covered() -> None:
    from test_public_api import SURFACE

    covered = {c.build for c in CONSTRUCTORS.values()}
    uncovered = []
    for module_name, names in SURFACE.items():
        if module_name in NOT_CONFIGURATION:
            continue
        module = __import__(module_name, fromlist=["_"])
        for name in names:
            obj = getattr(module, name)
            if not inspect.isclass(obj) or issubclass(obj, BaseException):
                continue
            if getattr(obj, "_is_protocol", False) or obj in covered:
                continue
            if name in RECORDS:
                continue
            uncovered.append(f"{module_name}.{name}")
    assert uncovered == []


CASES = [
    (name, argument, kind)
    for name, constructor in CONSTRUCTORS.items()
    for argument, arg in constructor.arguments.items()
    for kind in arg.kinds + arg.tolerated
]


def _names(argument: str, arg: Arg) -> tuple[str, ...]:
    return arg.names or (argument,)


@pytest.mark.parametrize(("constructor", "argument", "kind"), CASES)
def test_bad_value_is_refused_at_construction(constructor: str, argument: str, kind: str) -> None:
    spec = CONSTRUCTORS[constructor]
    arg = spec.arguments[argument]
    tolerated = kind in arg.tolerated
    accepted: list[Any] = []

    @settings(
        max_examples=8,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(STRATEGIES[kind])
    def check(value: Any) -> None:
        options = {**spec.valid(), **arg.needs, argument: value}
        try:
            built = spec.build(**options)
        except (TypeError, ValueError) as exc:
            refused: Exception | None = exc
        else:
            refused = None
        if refused is None:
            assert tolerated, f"{constructor}({argument}={value!r}) was accepted"
            accepted.append(built)
            return
        names = _names(argument, arg)
        assert any(n in str(refused) for n in names), (
            f"{constructor}({argument}={value!r}) raised {refused!r}, not naming {argument}"
        )

    check()
    for built in accepted[:2]:
        _use_once(spec, built)


def _use_once(spec: Constructor, built: Any) -> None:
    import anyio

    with contextlib.suppress(ResilientVoiceError):
        anyio.run(spec.use, built)


def test_the_root_surface_constructors_are_all_listed() -> None:
    roots = [
        name
        for name in resilient_voice.__all__
        if inspect.isclass(getattr(resilient_voice, name))
        and not issubclass(getattr(resilient_voice, name), BaseException)
        and name not in ("BreakerState", "FailureKind", *RECORDS)
    ]
    assert sorted(roots) == sorted(n for n in roots if n in CONSTRUCTORS)


def test_the_published_counts_match_the_table() -> None:
    """docs/reliability.md states how many constructors, arguments, kinds and cases this file
    checks; a new constructor or argument must update the published row, not leave it stale."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    kinds = {
        k
        for c in CONSTRUCTORS.values()
        for a in c.arguments.values()
        for k in a.kinds + a.tolerated
    }
    arguments = sum(len(c.arguments) for c in CONSTRUCTORS.values())
    row = f"| {len(CONSTRUCTORS)} | {arguments} | {len(kinds)} | {len(CASES):,} | up to 8,"
    assert row in text, f"update the Bad configuration table in docs/reliability.md: {row}"
