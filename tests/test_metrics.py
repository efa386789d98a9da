"""The Prometheus listener: exact names and labels, get-or-create, cached children."""

from __future__ import annotations

import random
from collections.abc import Sequence

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge

from resilient_voice import metrics as metrics_module
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.events import (
    BreakerState,
    BucketEvicted,
    CallFailed,
    CallIgnored,
    CallRejected,
    CallSucceeded,
    ConcurrencyBlocked,
    Event,
    FleetStateChanged,
    FleetViewUpdated,
    RequestFinished,
    RetryAttemptStarted,
    RetryGaveUp,
    RetryOutcomeUnknown,
    RetryScheduled,
    StateChanged,
    StoreAvailabilityChanged,
    TokensGranted,
    TokensRejected,
    dispatch,
)
from resilient_voice.failure import FailureKind
from resilient_voice.http import LIMITER_KEY_EXTENSION, ResilientTransport, Route
from resilient_voice.limiter import (
    InMemoryBucketStore,
    KeyedLimiter,
    Reservation,
    StoreUnavailableError,
    TokenBucket,
)
from resilient_voice.metrics import PrometheusMetrics
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy
from resilient_voice.testing import ManualClock


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_one_listener_for_every_primitive() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    assert callable(metrics)
    for name in ("BreakerMetrics", "LimiterMetrics", "RetryMetrics", "TransportMetrics"):
        assert not hasattr(metrics_module, name)


def test_breaker_state_transitions_and_outcomes() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    listeners = (listener,)
    dispatch(listeners, CallSucceeded("twilio", 0.1))
    dispatch(listeners, CallFailed("twilio", RuntimeError("x"), 0.2))
    dispatch(listeners, CallFailed("twilio", None, None))
    dispatch(listeners, CallIgnored("twilio", ValueError("x")))
    state = "resilient_voice_breaker_state"
    assert value(registry, state, breaker="twilio", state="closed") == 1.0
    assert value(registry, state, breaker="twilio", state="open") == 0.0
    dispatch(listeners, StateChanged("twilio", BreakerState.CLOSED, BreakerState.OPEN))
    dispatch(listeners, CallRejected("twilio", 4.5))
    dispatch(listeners, CallRejected("twilio", 3.5))
    assert value(registry, state, breaker="twilio", state="closed") == 0.0
    assert value(registry, state, breaker="twilio", state="open") == 1.0
    assert value(registry, state, breaker="twilio", state="half_open") == 0.0
    dispatch(listeners, StateChanged("twilio", BreakerState.OPEN, BreakerState.HALF_OPEN))
    dispatch(listeners, StateChanged("twilio", BreakerState.HALF_OPEN, BreakerState.OPEN))
    dispatch(listeners, StateChanged("twilio", BreakerState.OPEN, BreakerState.HALF_OPEN))
    assert value(registry, state, breaker="twilio", state="half_open") == 1.0
    assert value(registry, state, breaker="twilio", state="open") == 0.0
    transitions = "resilient_voice_breaker_transitions_total"
    assert (
        value(registry, transitions, breaker="twilio", from_state="open", to_state="half_open") == 2
    )
    assert value(registry, transitions, breaker="twilio", from_state="closed", to_state="open") == 1
    calls = "resilient_voice_breaker_calls_total"
    assert value(registry, calls, breaker="twilio", outcome="success") == 1
    assert value(registry, calls, breaker="twilio", outcome="failure") == 2
    assert value(registry, calls, breaker="twilio", outcome="ignored") == 1
    assert value(registry, calls, breaker="twilio", outcome="rejected") == 2


def test_fleet_transitions_are_counted_by_rule() -> None:
    registry = CollectorRegistry()
    listeners = (PrometheusMetrics(registry),)
    opened = FleetStateChanged("twilio", BreakerState.CLOSED, BreakerState.OPEN, "rate")
    dispatch(listeners, opened)
    dispatch(
        listeners, FleetStateChanged("twilio", BreakerState.OPEN, BreakerState.CLOSED, "fleet")
    )
    name = "resilient_voice_breaker_fleet_transitions_total"
    assert value(registry, name, breaker="twilio", rule="rate", to_state="open") == 1
    assert value(registry, name, breaker="twilio", rule="fleet", to_state="closed") == 1


def test_rejection_first_does_not_guess_a_state() -> None:
    registry = CollectorRegistry()
    dispatch((PrometheusMetrics(registry),), CallRejected("vapi", 1.0))
    assert value(registry, "resilient_voice_breaker_state", breaker="vapi", state="closed") is None


def test_breakers_are_separate_series() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    listener(StateChanged("a", BreakerState.CLOSED, BreakerState.OPEN))
    listener(CallSucceeded("b", None))
    assert value(registry, "resilient_voice_breaker_state", breaker="a", state="open") == 1
    assert value(registry, "resilient_voice_breaker_state", breaker="b", state="closed") == 1
    assert value(registry, "resilient_voice_breaker_state", breaker="b", state="open") == 0


def test_limiter_metrics_never_label_keys() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    listener(TokensGranted("inbound", "+15550100", 1.0, 0.0))
    listener(TokensGranted("inbound", "+15550101", 1.0, 0.3))
    listener(TokensGranted("cps", None, 1.0, 0.002))
    listener(TokensRejected("inbound", "+15550100", 1.0, 2.0))
    listener(TokensRejected("inbound", "+15550100", 1.0, None))
    listener(BucketEvicted("inbound", "+15550100", False))
    listener(BucketEvicted("inbound", "+15550101", True))
    listener(Event("inbound"))  # records of other primitives are ignored
    assert value(registry, "resilient_voice_limiter_granted_total", limiter="inbound") == 2
    assert value(registry, "resilient_voice_limiter_granted_total", limiter="cps") == 1
    assert value(registry, "resilient_voice_limiter_rejected_total", limiter="inbound") == 2
    evicted = "resilient_voice_limiter_evicted_total"
    assert value(registry, evicted, limiter="inbound", lossy="false") == 1
    assert value(registry, evicted, limiter="inbound", lossy="true") == 1
    wait = "resilient_voice_limiter_wait_seconds"
    assert value(registry, wait + "_count", limiter="inbound") == 2
    assert value(registry, wait + "_sum", limiter="inbound") == pytest.approx(0.3)
    assert value(registry, wait + "_bucket", limiter="inbound", le="0.0") == 1
    labels = {k for m in registry.collect() for s in m.samples for k in s.labels.values()}
    assert not any("+1555" in label for label in labels)


def test_retry_metrics_by_reason() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    error = RuntimeError("x")
    for attempt in (1, 2, 3):
        listener(RetryAttemptStarted("create_call", attempt, "op-1"))
    listener(RetryScheduled("create_call", 1, 0.5, FailureKind.NOT_SENT, error))
    listener(RetryScheduled("create_call", 2, 1.0, FailureKind.UNPROCESSED, error))
    listener(RetryScheduled("create_call", 3, 1.0, FailureKind.UNPROCESSED, error))
    listener(RetryGaveUp("create_call", 3, FailureKind.PERMANENT, error))
    listener(RetryGaveUp("create_call", 1, None, error))
    listener(RetryOutcomeUnknown("create_call", "op-1", error))
    assert value(registry, "resilient_voice_retry_attempts_total", policy="create_call") == 3
    retries = "resilient_voice_retry_retries_total"
    assert value(registry, retries, policy="create_call", reason="not_sent") == 1
    assert value(registry, retries, policy="create_call", reason="unprocessed") == 2
    give_ups = "resilient_voice_retry_give_ups_total"
    assert value(registry, give_ups, policy="create_call", reason="permanent") == 1
    assert value(registry, give_ups, policy="create_call", reason="unclassified") == 1
    unknown = "resilient_voice_retry_outcome_unknown_total"
    assert value(registry, unknown, policy="create_call") == 1


def test_transport_metrics() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    listener(RequestFinished("twilio", "api.twilio.com", "POST", "create_call", "2xx", 0.2, 1))
    listener(RequestFinished("twilio", "api.twilio.com", "POST", "create_call", "2xx", 0.4, 3))
    listener(RequestFinished("twilio", "api.twilio.com", "POST", "create_call", "not_sent", 0.1, 1))
    labels = {
        "transport": "twilio",
        "host": "api.twilio.com",
        "method": "POST",
        "route": "create_call",
        "status_class": "2xx",
    }
    assert registry.get_sample_value("resilient_voice_http_client_requests_total", labels) == 2
    assert registry.get_sample_value("resilient_voice_http_client_attempts_total", labels) == 4
    duration = "resilient_voice_http_client_request_duration_seconds"
    assert registry.get_sample_value(duration + "_sum", labels) == pytest.approx(0.6)
    assert registry.get_sample_value(duration + "_count", labels) == 2
    labels["status_class"] = "not_sent"
    assert registry.get_sample_value("resilient_voice_http_client_requests_total", labels) == 1


def test_many_listeners_share_collectors_without_duplicate_errors() -> None:
    registry = CollectorRegistry()
    first = PrometheusMetrics(registry)
    others = [PrometheusMetrics(registry) for _ in range(5)]
    assert all(o.breaker_calls is first.breaker_calls for o in others)
    assert all(o.http_client_duration is first.http_client_duration for o in others)
    first(CallSucceeded("x", None))
    others[-1](CallSucceeded("x", None))
    calls = "resilient_voice_breaker_calls_total"
    assert value(registry, calls, breaker="x", outcome="success") == 2


def test_default_registry_twice_is_fine() -> None:
    from prometheus_client import REGISTRY

    PrometheusMetrics()
    metrics = PrometheusMetrics()
    assert metrics.registry is REGISTRY


def test_children_are_cached() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    listener(CallSucceeded("x", None))
    calls: list[tuple[str, ...]] = []
    original = listener.breaker_calls.labels

    def counting(*labels: str) -> object:
        calls.append(labels)
        return original(*labels)

    listener.breaker_calls.labels = counting  # type: ignore[method-assign]
    for _ in range(10):
        listener(CallSucceeded("x", None))
        listener(CallRejected("x", 1.0))
    assert calls == []


def test_incompatible_existing_metric_is_a_clear_error() -> None:
    registry = CollectorRegistry()
    Gauge("resilient_voice_breaker_calls", "someone else's", ["name"], registry=registry)
    with pytest.raises(ValueError, match="resilient_voice_breaker_calls"):
        PrometheusMetrics(registry)


def test_registry_type_is_checked() -> None:
    with pytest.raises(TypeError, match="CollectorRegistry"):
        PrometheusMetrics(registry="default")  # type: ignore[arg-type]


def label_values(registry: CollectorRegistry, metric: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in registry.collect()
        if family.name == metric
        for sample in family.samples
    }


async def test_transport_metrics_stay_bounded_over_2000_random_hosts() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    transport = ResilientTransport(
        Policy(),
        transport=httpx.MockTransport(lambda request: httpx.Response(200)),
        routes=[Route(name="twilio.read", host="api.twilio.com", methods=frozenset({"GET"}))],
        name="twilio",
        listeners=[metrics],
    )
    rng = random.Random(11)
    async with httpx.AsyncClient(transport=transport) as http:
        await http.get("https://api.twilio.com/2010-04-01/Accounts.json")
        for _ in range(2000):
            await http.get(f"https://{rng.getrandbits(64):x}.example.com/")
    requests = "resilient_voice_http_client_requests"
    assert label_values(registry, requests, "host") == {"api.twilio.com", "other"}
    assert len(metrics._http_series) == 2  # the child cache is bounded too
    labels = {"transport": "twilio", "host": "other", "method": "GET", "route": "default"}
    assert value(registry, requests + "_total", **labels, status_class="2xx") == 2000


async def test_status_class_is_a_status_a_failure_kind_or_cancelled_never_a_class_name() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/boom":
            raise RuntimeError("an unclassified failure of the inner transport")
        return httpx.Response(int(request.url.path.strip("/") or 200))

    registry = CollectorRegistry()
    keyed = Policy(limiter=KeyedLimiter(rate=1000.0, burst=10))
    transport = ResilientTransport(
        Policy(),
        transport=httpx.MockTransport(answer),
        routes=[Route(name="keyed", path="/keyed", policy=keyed)],
        listeners=[PrometheusMetrics(registry)],
    )
    async with httpx.AsyncClient(base_url="http://h", transport=transport) as http:
        await http.get("/204")
        await http.get("/503")
        with pytest.raises(RuntimeError):  # sent, and it failed: it may have been processed
            await http.get("/boom")
        with pytest.raises(TypeError, match="hashable"):  # refused before anything was sent
            await http.get("/keyed", extensions={LIMITER_KEY_EXTENSION: ["unhashable"]})
    classes = label_values(registry, "resilient_voice_http_client_requests", "status_class")
    assert classes == {"2xx", "5xx", "maybe_processed", "not_sent"}


def test_provider_concurrency_records() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    listener(ConcurrencyBlocked("vapi", "blocked"))
    listener(ConcurrencyBlocked("vapi", "blocked"))
    listener(ConcurrencyBlocked("vapi", "refused"))
    concurrency = "resilient_voice_provider_concurrency_total"
    assert value(registry, concurrency, client="vapi", outcome="blocked") == 2
    assert value(registry, concurrency, client="vapi", outcome="refused") == 1


async def test_the_same_object_listens_to_every_primitive_of_a_policy() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    policy = Policy(
        breaker=CircuitBreaker("up", listeners=[metrics]),
        limiter=TokenBucket(100.0, burst=10, name="cps", listeners=[metrics]),
        retry=RetryPolicy(name="op", listeners=[metrics]),
    )
    transport = ResilientTransport(
        policy,
        transport=httpx.MockTransport(lambda request: httpx.Response(200)),
        name="out",
        listeners=[metrics],
    )
    async with httpx.AsyncClient(transport=transport) as http:
        await http.get("https://api.example.com/")
    assert value(registry, "resilient_voice_breaker_calls_total", breaker="up", outcome="success")
    assert value(registry, "resilient_voice_limiter_granted_total", limiter="cps") == 1
    assert value(registry, "resilient_voice_retry_attempts_total", policy="op") == 1
    labels = {"transport": "out", "host": "other", "method": "GET", "route": "default"}
    requests = "resilient_voice_http_client_requests_total"
    assert value(registry, requests, **labels, status_class="2xx") == 1


def test_store_availability_records() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    available = "resilient_voice_limiter_store_available"
    outages = "resilient_voice_limiter_store_unavailable_total"
    assert value(registry, available, limiter="cps") is None  # no series before a transition
    listener(StoreAvailabilityChanged("cps", False, "local"))
    assert value(registry, available, limiter="cps") == 0
    assert value(registry, outages, limiter="cps", fallback="local") == 1
    listener(StoreAvailabilityChanged("cps", True, "local"))
    assert value(registry, available, limiter="cps") == 1
    assert value(registry, outages, limiter="cps", fallback="local") == 1  # returns not counted
    listener(StoreAvailabilityChanged("inbound", False, "deny"))
    assert value(registry, available, limiter="inbound") == 0
    assert value(registry, outages, limiter="inbound", fallback="deny") == 1
    assert value(registry, available, limiter="cps") == 1


def test_store_availability_by_primitive_keeps_breakers_out_of_the_limiter_series() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    available = "resilient_voice_store_available"
    outages = "resilient_voice_store_unavailable_total"
    # "name" is a label here: get_sample_value, not value(), which takes name= itself.
    breaker = {"primitive": "breaker", "name": "twilio"}
    limiter = {"primitive": "limiter", "name": "cps"}
    listener(StoreAvailabilityChanged("twilio", False, "local", "breaker"))
    assert registry.get_sample_value(available, breaker) == 0
    assert registry.get_sample_value(outages, {**breaker, "fallback": "local"}) == 1
    # A breaker is not a limiter: no limiter series claims it.
    assert value(registry, "resilient_voice_limiter_store_available", limiter="twilio") is None
    listener(StoreAvailabilityChanged("twilio", True, "local", "breaker"))
    assert registry.get_sample_value(available, breaker) == 1
    # A limiter shows in both: its own series (a contract) and the common one.
    listener(StoreAvailabilityChanged("cps", False, "deny"))
    assert registry.get_sample_value(available, limiter) == 0
    assert registry.get_sample_value(outages, {**limiter, "fallback": "deny"}) == 1
    assert value(registry, "resilient_voice_limiter_store_available", limiter="cps") == 0


def test_fleet_view_gauges() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    assert value(registry, "resilient_voice_breaker_fleet_replicas", breaker="twilio") is None
    listener(FleetViewUpdated("twilio", 3, 1, 40, 0.25))
    assert value(registry, "resilient_voice_breaker_fleet_replicas", breaker="twilio") == 3
    assert value(registry, "resilient_voice_breaker_fleet_open_replicas", breaker="twilio") == 1
    assert value(registry, "resilient_voice_breaker_fleet_calls", breaker="twilio") == 40
    assert value(registry, "resilient_voice_breaker_fleet_failure_rate", breaker="twilio") == 0.25
    listener(FleetViewUpdated("twilio", 2, 0, 0, 0.0))
    assert value(registry, "resilient_voice_breaker_fleet_replicas", breaker="twilio") == 2
    assert value(registry, "resilient_voice_breaker_fleet_failure_rate", breaker="twilio") == 0.0


def test_backpressure_is_counted_per_answer_apart_from_the_status_class() -> None:
    registry = CollectorRegistry()
    listener = PrometheusMetrics(registry)
    labels = {"transport": "tw", "host": "api.twilio.com", "method": "POST", "route": "create"}
    name = "resilient_voice_http_client_backpressure_total"
    listener(RequestFinished("tw", "api.twilio.com", "POST", "create", "2xx", 0.1, 3, 2, False))
    assert value(registry, name, **labels, outcome="retried") == 2
    assert value(registry, name, **labels, outcome="final") == 0
    listener(RequestFinished("tw", "api.twilio.com", "POST", "create", "4xx", 0.1, 2, 2, True))
    assert value(registry, name, **labels, outcome="retried") == 3
    assert value(registry, name, **labels, outcome="final") == 1
    requests = "resilient_voice_http_client_requests_total"
    assert value(registry, requests, **labels, status_class="4xx") == 1  # unchanged contract
    listener(RequestFinished("tw", "other", "GET", "get", "2xx", 0.1, 1))
    assert value(registry, name, transport="tw", host="other", method="GET", route="get",
                 outcome="retried") is None  # fmt: skip


class _Flaky:
    """A shared store that can be cut off: raises StoreUnavailableError while ``down``."""

    def __init__(self, clock: ManualClock) -> None:
        self.inner = InMemoryBucketStore(clock=clock)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("cut off")

    async def reserve(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        self._check()
        return await self.inner.reserve(key, costs, limits, tau)

    async def give_back(self, key: str, cost: float, end: float) -> bool:
        self._check()
        return await self.inner.give_back(key, cost, end)

    async def pause(self, key: str, seconds: float) -> Reservation:
        self._check()
        return await self.inner.pause(key, seconds)


async def test_a_limiter_losing_its_store_shows_in_the_gauge() -> None:
    registry = CollectorRegistry()
    clock = ManualClock(autojump=True)  # the second grant waits one interval
    store = _Flaky(clock)
    bucket = TokenBucket(
        100, name="cps", store=store, clock=clock, listeners=[PrometheusMetrics(registry)]
    )
    available = "resilient_voice_limiter_store_available"
    await bucket.acquire()
    assert value(registry, available, limiter="cps") is None
    store.down = True
    await bucket.acquire()  # served by the local fallback
    assert value(registry, available, limiter="cps") == 0
    outages = "resilient_voice_limiter_store_unavailable_total"
    assert value(registry, outages, limiter="cps", fallback="local") == 1
    store.down = False
    clock.advance(10.0)  # past the first re-probe
    await bucket.acquire()
    assert value(registry, available, limiter="cps") == 1
