"""The OpenTelemetry listener, read back through the SDK's in-memory metric reader and exporter.

Every primitive is driven for real (a breaker trips, probes and closes; a bucket makes a caller
wait and refuses another; a retry policy retries, gives up and reports an outcome unknown; the
transport talks to FakeTelephony on loopback), and the test reads what a collector would receive:
instrument names, units, values and attribute sets. No attribute value may carry a phone number,
a URL, a limiter key, an attempt or correlation id, a lease id or a call id.
"""

from __future__ import annotations

import importlib
import re
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, free_port, fresh_prefix
from resilient_voice import (
    CallLeases,
    CapacityExhaustedError,
    CircuitOpenError,
    Lease,
    OutcomeUnknownError,
    RateLimitedError,
)
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.correlation import correlation_scope
from resilient_voice.events import (
    BreakerState,
    BucketEvicted,
    CallRejected,
    CallSucceeded,
    CapacityChanged,
    ConcurrencyBlocked,
    Event,
    FleetStateChanged,
    FleetViewUpdated,
    LeaseAcquired,
    LeaseRefused,
    LeaseReleased,
    LeaseWaiting,
    RequestFinished,
    RetryAttemptStarted,
    RetryGaveUp,
    RetryOutcomeUnknown,
    RetryScheduled,
    StateChanged,
    StoreAvailabilityChanged,
    TokensGranted,
    dispatch,
)
from resilient_voice.failure import FailureKind
from resilient_voice.http import ResilientTransport, Route
from resilient_voice.limiter import KeyedLimiter, TokenBucket
from resilient_voice.otel import OpenTelemetryListener
from resilient_voice.policy import Policy
from resilient_voice.redis import RedisBackend
from resilient_voice.retry import RetryPolicy
from resilient_voice.testing import FakeTelephony, Fault, ManualClock, serve

PHONE = "+15550100001"
SID = "AC" + "1" * 32
TOKEN = "secret-token-value"
CALLS = f"/2010-04-01/Accounts/{SID}/Calls.json"
CALLS_ROUTE = Route(
    name="twilio.calls.create",
    methods=frozenset({"POST"}),
    path=r"/2010-04-01/Accounts/[^/]+/Calls\.json",
)
LIST_ROUTE = Route(
    name="twilio.calls.list",
    methods=frozenset({"GET"}),
    path=r"/2010-04-01/Accounts/[^/]+/Calls\.json",
)
CALL_ID = "CA" + "2" * 32
# What must never appear in an attribute value: phone numbers, URLs, account ids, keys, call
# ids, lease ids (twelve hex digits, a dash, the generation in hex).
FORBIDDEN = re.compile(
    r"\+\d{6,}|://|127\.0\.0\.1|localhost|AC1{8}|CA2{8}|attempt-|corr-|secret"
    r"|[0-9a-f]{12}-[0-9a-f]+"
)

Points = dict[frozenset[tuple[str, Any]], Any]

# The Redis test's client leaves streams that the event loop's end releases, a test or two later.
pytestmark = COREDIS_CANCEL_LEAK
__all__ = ["collect_coredis_garbage"]  # an autouse fixture, used by being here


class Failure(Exception):
    """An exception that states its failure kind, as the adapters' exceptions do."""

    def __init__(self, kind: FailureKind) -> None:
        super().__init__(f"failed calling {PHONE} at https://api.example.com/x")
        self.failure_kind = kind


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def telemetry(reader: InMemoryMetricReader) -> OpenTelemetryListener:
    return OpenTelemetryListener(MeterProvider(metric_readers=[reader]), TracerProvider())


def collect(reader: InMemoryMetricReader) -> dict[str, tuple[str, Points]]:
    """Every instrument's unit and its points by attribute set (histograms: the point itself)."""
    data = reader.get_metrics_data()
    found: dict[str, tuple[str, Points]] = {}
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "resilient_voice"
            for metric in scope.metrics:
                points: Points = {}
                for point in metric.data.data_points:
                    key = frozenset(dict(point.attributes or {}).items())
                    points[key] = point if isinstance(point, HistogramDataPoint) else point.value
                found[metric.name] = (metric.unit or "", points)
    for _unit, points in found.values():
        for attributes in points:
            for name, value in attributes:
                assert not FORBIDDEN.search(str(value)), (name, value)
    return found


def points(reader: InMemoryMetricReader, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
    return collect(reader)[name][1]


def attrs(**values: Any) -> frozenset[tuple[str, Any]]:
    """An attribute set: ``breaker__name`` is ``resilient_voice.breaker.name``; a name given
    with its dots (``**{"server.address": ...}``) is taken as it is."""
    return frozenset(
        (name if "." in name else "resilient_voice." + name.replace("__", "."), value)
        for name, value in values.items()
    )


async def fail() -> None:
    raise Failure(FailureKind.MAYBE_PROCESSED)


async def succeed() -> str:
    return "ok"


async def test_breaker_trips_probes_and_closes(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "twilio", failure_threshold=2, recovery_timeout=5.0, clock=clock, listeners=[telemetry]
    )
    await breaker.call(succeed)
    state = {
        s: attrs(breaker__name="twilio", breaker__state=s) for s in ("closed", "open", "half_open")
    }
    assert points(reader, "resilient_voice.breaker.state") == {
        state["closed"]: 1,
        state["open"]: 0,
        state["half_open"]: 0,
    }
    for _ in range(2):
        with pytest.raises(Failure):
            await breaker.call(fail)
    with pytest.raises(CircuitOpenError):
        await breaker.call(succeed)
    assert points(reader, "resilient_voice.breaker.state")[state["open"]] == 1
    clock.advance(5.0)
    await breaker.call(succeed)  # the probe closes it
    found = collect(reader)
    unit, values = found["resilient_voice.breaker.state"]
    assert unit == "1"
    assert values == {state["closed"]: 1, state["open"]: 0, state["half_open"]: 0}
    unit, changes = found["resilient_voice.breaker.state_changes"]
    assert unit == "{change}"
    change = "breaker__previous_state"
    assert changes == {
        attrs(breaker__name="twilio", **{change: "closed"}, breaker__state="open"): 1,
        attrs(breaker__name="twilio", **{change: "open"}, breaker__state="half_open"): 1,
        attrs(breaker__name="twilio", **{change: "half_open"}, breaker__state="closed"): 1,
    }
    unit, calls = found["resilient_voice.breaker.calls"]
    assert unit == "{call}"
    assert calls == {
        attrs(breaker__name="twilio", breaker__outcome="success"): 2,
        attrs(breaker__name="twilio", breaker__outcome="failure"): 2,
        attrs(breaker__name="twilio", breaker__outcome="rejected"): 1,
    }


async def test_limiter_wait_and_refusals(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(1.0, clock=clock, name="twilio-cps", listeners=[telemetry])
    await bucket.acquire()
    await bucket.acquire()  # waits one second for its token
    with pytest.raises(RateLimitedError):
        await bucket.acquire(timeout=0.1)
    assert not await bucket.try_acquire()
    keyed = KeyedLimiter(1.0, clock=clock, name="per-caller", listeners=[telemetry])
    assert await keyed.try_acquire(PHONE)
    assert not await keyed.try_acquire(PHONE)
    found = collect(reader)
    unit, acquisitions = found["resilient_voice.limiter.acquisitions"]
    assert unit == "{acquisition}"
    assert acquisitions == {
        attrs(limiter__name="twilio-cps", limiter__outcome="granted"): 2,
        attrs(limiter__name="twilio-cps", limiter__outcome="rejected"): 2,
        attrs(limiter__name="per-caller", limiter__outcome="granted"): 1,
        attrs(limiter__name="per-caller", limiter__outcome="rejected"): 1,
    }
    unit, waits = found["resilient_voice.limiter.wait.duration"]
    assert unit == "s"
    wait = waits[attrs(limiter__name="twilio-cps")]
    assert (wait.count, wait.min) == (2, 0.0)
    assert wait.sum == wait.max == pytest.approx(1.0)
    assert wait.explicit_bounds[:4] == (0.0, 0.001, 0.005, 0.01)  # seconds, not milliseconds
    assert waits[attrs(limiter__name="per-caller")].count == 1


async def test_retry_scheduled_gave_up_and_outcome_unknown(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    clock = ManualClock(autojump=True)
    retry = RetryPolicy(
        max_attempts=3, base_delay=0.5, jitter="none", clock=clock, name="calls",
        listeners=[telemetry],
    )  # fmt: skip
    with pytest.raises(Failure):  # idempotent: retried twice, then given up
        await retry.run(fail, idempotent=True)
    with pytest.raises(OutcomeUnknownError):  # not idempotent: never re-sent
        await retry.call(fail)
    found = collect(reader)
    name = attrs(retry__name="calls")
    assert found["resilient_voice.retry.attempts"] == ("{attempt}", {name: 4})
    kind = attrs(retry__name="calls", failure__kind="maybe_processed")
    assert found["resilient_voice.retry.retries"] == ("{retry}", {kind: 2})
    assert found["resilient_voice.retry.give_ups"] == ("{operation}", {kind: 1})
    assert found["resilient_voice.retry.outcome_unknown"] == ("{operation}", {name: 1})


async def test_retry_adds_a_span_event_with_the_resend_count() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = OpenTelemetryListener(MeterProvider(), provider)
    clock = ManualClock(autojump=True)
    retry = RetryPolicy(
        max_attempts=3, base_delay=0.5, jitter="none", clock=clock, listeners=[telemetry]
    )
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("create call"), pytest.raises(Failure):
        await retry.run(fail, idempotent=True)
    (span,) = exporter.get_finished_spans()
    names = [event.name for event in span.events]
    assert names == ["resilient_voice.retry"] * 2 + ["resilient_voice.retry.give_up"]
    first, second, gave_up = (dict(event.attributes or {}) for event in span.events)
    assert first == {
        "http.request.resend_count": 1,
        "resilient_voice.retry.name": "retry",
        "resilient_voice.failure.kind": "maybe_processed",
        "resilient_voice.retry.delay": 0.5,
        "error.type": f"{__name__}.Failure",
    }
    assert second["http.request.resend_count"] == 2
    assert second["resilient_voice.retry.delay"] == 1.0
    assert gave_up == {
        "resilient_voice.retry.name": "retry",
        "resilient_voice.retry.attempt": 3,
        "resilient_voice.failure.kind": "maybe_processed",
        "error.type": f"{__name__}.Failure",
    }
    for event in span.events:
        for value in (event.attributes or {}).values():
            assert not FORBIDDEN.search(str(value))


async def test_an_outcome_unknown_and_a_permanent_failure_add_span_events() -> None:
    """The span says the call must be reconciled; the attempt id (unbounded) stays out of it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = OpenTelemetryListener(MeterProvider(), provider)
    clock = ManualClock(autojump=True)
    retry = RetryPolicy(max_attempts=3, clock=clock, name="calls", listeners=[telemetry])

    async def refused() -> None:
        raise Failure(FailureKind.PERMANENT)

    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("create call"), pytest.raises(OutcomeUnknownError):
        await retry.call(fail)  # not idempotent: never re-sent
    with tracer.start_as_current_span("read call"), pytest.raises(Failure):
        await retry.run(refused, idempotent=True)  # permanent: never retried
    created, read = exporter.get_finished_spans()
    (unknown,) = created.events
    assert unknown.name == "resilient_voice.retry.outcome_unknown"
    assert dict(unknown.attributes or {}) == {
        "resilient_voice.retry.name": "calls",
        "error.type": f"{__name__}.Failure",
    }
    (gave_up,) = read.events
    assert gave_up.name == "resilient_voice.retry.give_up"
    assert dict(gave_up.attributes or {}) == {
        "resilient_voice.retry.name": "calls",
        "resilient_voice.retry.attempt": 1,
        "resilient_voice.failure.kind": "permanent",
        "error.type": f"{__name__}.Failure",
    }
    for span in (created, read):
        for event in span.events:
            for value in (event.attributes or {}).values():
                assert not FORBIDDEN.search(str(value))


async def test_no_span_no_event_and_a_no_op_tracer_provider_turns_events_off() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    metrics_only = OpenTelemetryListener(
        MeterProvider(metric_readers=[reader]), trace.NoOpTracerProvider()
    )
    outside = OpenTelemetryListener(MeterProvider(), provider)
    clock = ManualClock(autojump=True)
    retry = RetryPolicy(max_attempts=2, clock=clock, listeners=[metrics_only])
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("create call"), pytest.raises(Failure):
        await retry.run(fail, idempotent=True)
    with pytest.raises(Failure):  # no current span: nothing to annotate, nothing raised
        await RetryPolicy(max_attempts=2, clock=clock, listeners=[outside]).run(
            fail, idempotent=True
        )
    (span,) = exporter.get_finished_spans()
    assert span.events == ()
    assert points(reader, "resilient_voice.retry.retries") == {
        attrs(retry__name="retry", failure__kind="maybe_processed"): 1
    }


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTelephony, str]]:
    app = FakeTelephony(
        twilio_accounts={SID: TOKEN}, calls_per_second=1000.0, status_callbacks=False
    )
    async with serve(app) as url:
        yield app, url


async def test_transport_requests_against_a_fake_upstream(
    fake: tuple[FakeTelephony, str],
    reader: InMemoryMetricReader,
    telemetry: OpenTelemetryListener,
) -> None:
    app, url = fake
    app.faults = [Fault.burst(1, status=503, endpoints="twilio.calls.list")]
    retry = RetryPolicy(base_delay=0.001, max_delay=0.01, name="twilio", listeners=[telemetry])
    transport = ResilientTransport(
        Policy(retry=retry), routes=[CALLS_ROUTE, LIST_ROUTE], name="twilio",
        listeners=[telemetry],
    )  # fmt: skip
    form = {"To": PHONE, "From": "+15005550006", "Url": "https://example.com/twiml"}
    async with httpx.AsyncClient(base_url=url, transport=transport, auth=(SID, TOKEN)) as http:
        with correlation_scope("corr-123"):
            assert (await http.get(CALLS)).status_code == 200
            assert (await http.post(CALLS, data=form)).status_code == 201
            assert (await http.request("PURGE", "/nowhere")).status_code == 404
    found = collect(reader)
    unit, durations = found["resilient_voice.http.client.request.duration"]
    assert unit == "s"

    def request(method: str, operation: str, status_class: str) -> frozenset[tuple[str, Any]]:
        return attrs(
            transport__name="twilio",
            **{"server.address": "other", "http.request.method": method},
            operation=operation,
            http__status_class=status_class,
        )

    listed = request("GET", "twilio.calls.list", "2xx")
    created = request("POST", "twilio.calls.create", "2xx")
    other = request("_OTHER", "default", "4xx")  # PURGE is no standard method
    assert set(durations) == {listed, created, other}
    for point in durations.values():
        assert point.count == 1
        assert 0 < point.sum < 30
    unit, attempts = found["resilient_voice.http.client.attempts"]
    assert unit == "{attempt}"
    assert attempts == {listed: 2, created: 1, other: 1}


async def test_provider_backpressure_is_counted_apart_by_outcome(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    """A 429 that a later attempt got past is ``retried``; the one the caller got, ``final``."""
    answers = {"/busy": [429, 201], "/full": [429, 429], "/fine": [201]}

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(answers[request.url.path].pop(0), json={})

    retry = RetryPolicy(max_attempts=2, base_delay=0.001, name="create", listeners=[telemetry])
    route = Route("create_call", host="api.example.com", unprocessed_statuses=frozenset({429}))
    transport = ResilientTransport(
        Policy(retry=retry), transport=httpx.MockTransport(upstream), routes=[route],
        name="twilio", listeners=[telemetry],
    )  # fmt: skip
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as c:
        assert (await c.post("/busy", data={"To": PHONE})).status_code == 201
        assert (await c.post("/full", data={"To": PHONE})).status_code == 429
        assert (await c.post("/fine", data={"To": PHONE})).status_code == 201

    def pushed(outcome: str) -> frozenset[tuple[str, Any]]:
        return attrs(
            transport__name="twilio",
            **{"server.address": "api.example.com", "http.request.method": "POST"},
            operation="create_call",
            backpressure__outcome=outcome,
        )

    found = collect(reader)
    assert found["resilient_voice.http.client.backpressure"] == (
        "{answer}",
        {pushed("retried"): 2, pushed("final"): 1},  # /busy's first, /full's first and last
    )
    attempts = found["resilient_voice.http.client.attempts"][1]
    assert sum(attempts.values()) == 5  # the status classes are unchanged: 2 + 2 + 1


async def test_a_shared_breakers_fleet_view_and_store_outages_by_primitive(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    """Real Redis, real time: two replicas see each other within a fleet tick (1 s; 5 s allowed),
    the follower reads the other's failure within two ticks (5 s allowed), and a dead store is
    noticed within its 0.05 s timeout (5 s allowed)."""
    seen: list[Event] = []
    prefix = fresh_prefix()
    async with (
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as one,
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as other,
    ):
        tripping = CircuitBreaker("fleet", failure_threshold=1, store=one)
        follower = CircuitBreaker(
            "fleet", fleet_quorum=0.4, store=other, listeners=[telemetry, seen.append]
        )
        with anyio.fail_after(5):
            while (fleet := follower.statistics().fleet) is None or fleet.live < 2:
                await anyio.sleep(0.05)
        with pytest.raises(Failure):
            await tripping.call(fail)
        with anyio.fail_after(5):
            while not any(isinstance(e, FleetStateChanged) for e in seen):
                await anyio.sleep(0.05)
        found = collect(reader)  # no await in between: no reading can land between the two
        last = [e for e in seen if isinstance(e, FleetViewUpdated)][-1]
    name = attrs(breaker__name="fleet")
    assert found["resilient_voice.breaker.fleet.replicas"] == ("{replica}", {name: 2})
    opened = found["resilient_voice.breaker.fleet.open_replicas"]
    assert opened[0] == "{replica}"
    assert opened[1][name] in (1, 2)  # the tripped one; the follower too once it published
    calls = found["resilient_voice.breaker.fleet.calls"]
    assert calls[0] == "{call}"
    assert calls[1][name] >= 1
    unit, rates = found["resilient_voice.breaker.fleet.failure_rate"]
    assert unit == "1"
    assert 0 < rates[name] <= 1
    # The gauges show the last reading, whichever it was.
    assert (opened[1][name], calls[1][name], rates[name]) == (
        last.open,
        last.calls,
        last.failure_rate,
    )

    seen.clear()
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with RedisBackend.from_url(dead, prefix=fresh_prefix(), timeout=0.05) as backend:
        lonely = CircuitBreaker("lonely", store=backend, listeners=[telemetry, seen.append])
        paced = TokenBucket(10, name="shared-cps", store=backend, listeners=[telemetry])
        await paced.acquire()  # Redis is gone: the local fallback grants
        with anyio.fail_after(5):
            while not any(isinstance(e, StoreAvailabilityChanged) for e in seen):
                await anyio.sleep(0.05)
        del lonely
    found = collect(reader)
    breaker = attrs(primitive__kind="breaker", primitive__name="lonely")
    limiter = attrs(primitive__kind="limiter", primitive__name="shared-cps")
    assert found["resilient_voice.store.available"] == ("1", {breaker: 0, limiter: 0})
    assert found["resilient_voice.store.outages"] == (
        "{outage}",
        {breaker | attrs(store__fallback="local"): 1, limiter | attrs(store__fallback="local"): 1},
    )
    # A breaker is not a limiter: the limiter's own instruments show the limiter only.
    assert found["resilient_voice.limiter.store.available"][1] == {
        attrs(limiter__name="shared-cps"): 0
    }
    assert found["resilient_voice.limiter.store.outages"][1] == {
        attrs(limiter__name="shared-cps", limiter__fallback="local"): 1
    }


def test_fleet_store_and_provider_records(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    listeners = (telemetry,)
    closed, opened = BreakerState.CLOSED, BreakerState.OPEN
    dispatch(listeners, FleetStateChanged("twilio", closed, opened, "quorum"))
    dispatch(listeners, StoreAvailabilityChanged("cps", False, "local"))
    dispatch(listeners, BucketEvicted("per-caller", PHONE, False))
    dispatch(listeners, BucketEvicted("per-caller", PHONE, True))
    dispatch(listeners, ConcurrencyBlocked("vapi", "blocked"))
    dispatch(listeners, StoreAvailabilityChanged("twilio", False, "local", "breaker"))
    dispatch(listeners, FleetViewUpdated("twilio", 3, 1, 40, 0.25))
    dispatch(listeners, FleetViewUpdated("twilio", 2, 0, 0, 0.0))  # the last reading is shown
    found = collect(reader)
    fleet = attrs(breaker__name="twilio")
    assert found["resilient_voice.breaker.fleet.replicas"][1] == {fleet: 2}
    assert found["resilient_voice.breaker.fleet.open_replicas"][1] == {fleet: 0}
    assert found["resilient_voice.breaker.fleet.calls"][1] == {fleet: 0}
    assert found["resilient_voice.breaker.fleet.failure_rate"][1] == {fleet: 0.0}
    assert found["resilient_voice.store.available"][1] == {
        attrs(primitive__kind="limiter", primitive__name="cps"): 0,
        attrs(primitive__kind="breaker", primitive__name="twilio"): 0,
    }
    assert found["resilient_voice.breaker.fleet_state_changes"] == (
        "{change}",
        {attrs(breaker__name="twilio", breaker__fleet_rule="quorum", breaker__state="open"): 1},
    )
    assert found["resilient_voice.limiter.store.available"] == (
        "1",
        {attrs(limiter__name="cps"): 0},
    )
    assert found["resilient_voice.limiter.store.outages"][1] == {
        attrs(limiter__name="cps", limiter__fallback="local"): 1
    }
    assert found["resilient_voice.limiter.evictions"][1] == {
        attrs(limiter__name="per-caller", limiter__lossy=False): 1,
        attrs(limiter__name="per-caller", limiter__lossy=True): 1,
    }
    assert found["resilient_voice.provider.concurrency"][1] == {
        attrs(client__name="vapi", provider__outcome="blocked"): 1
    }
    dispatch(listeners, StoreAvailabilityChanged("cps", True, "local"))
    assert points(reader, "resilient_voice.limiter.store.available") == {
        attrs(limiter__name="cps"): 1
    }


async def test_call_leases_acquire_wait_refuse_release_reclaim_and_signal(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    """A real lease set on a ManualClock: every lease record, read back with bounded attributes."""
    clock = ManualClock()
    leases = CallLeases(
        "twilio-calls", 2, ttl=600.0, clock=clock, capacity_recovery=30.0, listeners=[telemetry]
    )
    seen: list[Event] = []
    leases.add_listener(seen.append)
    first = await leases.bind(await leases.acquire(), CALL_ID)
    await leases.acquire()  # full now
    got: list[Lease] = []

    async def wait() -> None:
        got.append(await leases.acquire())

    name = attrs(leases__name="twilio-calls")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait)
        with anyio.fail_after(5):
            while leases.statistics().waiting == 0:
                await anyio.sleep(0)
        found = collect(reader)
        assert found["resilient_voice.leases.waiting"] == ("{caller}", {name: 1})
        assert found["resilient_voice.leases.in_use"] == ("{lease}", {name: 2})
        with pytest.raises(CapacityExhaustedError):
            await leases.acquire(timeout=0)  # full, and a caller is queued ahead
        assert await leases.release(CALL_ID, generation=first.generation)  # the webhook
    assert len(got) == 1  # the waiter took the freed slot
    assert points(reader, "resilient_voice.leases.waiting") == {name: 0}
    clock.advance(600.0)  # both leases outlive their TTL: the next look reclaims them
    assert leases.statistics().in_use == 0
    await leases.signal_capacity("twilio:10004")  # halved: 2 -> 1
    await leases.signal_capacity("twilio:10004")  # at 1 already: a signal that changes nothing
    clock.advance(30.0)
    assert leases.statistics().effective_capacity == 2  # grown back by one
    found = collect(reader)
    assert found["resilient_voice.leases.in_use"] == ("{lease}", {name: 0})
    assert found["resilient_voice.leases.effective_capacity"] == ("{lease}", {name: 2})
    assert found["resilient_voice.leases.acquired"] == ("{lease}", {name: 3})
    assert found["resilient_voice.leases.refused"] == ("{acquisition}", {name: 1})
    assert found["resilient_voice.leases.released"] == (
        "{lease}",
        {name | attrs(leases__reason="webhook"): 1, name | attrs(leases__reason="ttl"): 2},
    )
    assert found["resilient_voice.leases.capacity_signals"] == ("{signal}", {name: 2})
    assert found["resilient_voice.leases.capacity_changes"] == (
        "{change}",
        {name | attrs(leases__cause="signal"): 1, name | attrs(leases__cause="recovery"): 1},
    )
    # The records did carry the ids that the attributes leave out.
    acquired = [e for e in seen if isinstance(e, LeaseAcquired)]
    released = [e for e in seen if isinstance(e, LeaseReleased)]
    assert all(FORBIDDEN.search(e.lease_id) for e in acquired + released)
    assert [e.call_id for e in released if e.reason == "webhook"] == [CALL_ID]


def test_a_rejection_first_does_not_guess_a_state(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    telemetry(CallRejected("twilio", 3.0))
    assert "resilient_voice.breaker.state" not in collect(reader)


def test_unknown_records_are_ignored(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    class LeaseTaken(Event):
        pass

    telemetry(LeaseTaken("leases"))
    telemetry(Event("nothing"))
    assert collect(reader) == {}


def test_listeners_on_one_meter_provider_share_instruments(reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader])
    first, second = OpenTelemetryListener(provider), OpenTelemetryListener(provider)
    first(TokensGranted("cps", None, 1.0, 0.0))
    second(TokensGranted("cps", None, 1.0, 0.0))
    assert points(reader, "resilient_voice.limiter.acquisitions") == {
        attrs(limiter__name="cps", limiter__outcome="granted"): 2
    }


def test_global_providers_by_default() -> None:
    telemetry = OpenTelemetryListener()
    assert telemetry.meter_provider is not None
    assert telemetry.tracer_provider is trace.get_tracer_provider()
    telemetry(RequestFinished("t", "other", "GET", "default", "2xx", 0.01, 1))  # no SDK: no-op
    assert "OpenTelemetryListener(meter_provider=" in repr(telemetry)


def test_providers_are_type_checked() -> None:
    with pytest.raises(TypeError, match="meter_provider"):
        OpenTelemetryListener(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tracer_provider"):
        OpenTelemetryListener(None, object())  # type: ignore[arg-type]


@pytest.fixture
def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """``opentelemetry`` made unimportable (a ``None`` in sys.modules), as if not installed."""
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "resilient_voice.otel")


@pytest.mark.usefixtures("without_opentelemetry")
def test_without_the_extra_the_import_error_names_it() -> None:
    with pytest.raises(ImportError, match=re.escape("pip install 'resilient-voice[otel]'")):
        importlib.import_module("resilient_voice.otel")


def test_the_docs_table_lists_every_instrument_with_its_kind_and_unit(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    """One record of every kind the listener handles; docs/opentelemetry.md must match."""
    closed, opened = BreakerState.CLOSED, BreakerState.OPEN
    for event in (
        CallSucceeded("b", 0.1),
        StateChanged("b", closed, opened),
        FleetStateChanged("b", closed, opened, "rate"),
        TokensGranted("l", None, 1.0, 0.0),
        BucketEvicted("l", "k", False),
        StoreAvailabilityChanged("l", False, "deny"),
        RetryAttemptStarted("r", 1, "attempt-1"),
        RetryScheduled("r", 1, 0.1, FailureKind.NOT_SENT, RuntimeError()),
        RetryGaveUp("r", 2, None, RuntimeError()),
        RetryOutcomeUnknown("r", "attempt-2", RuntimeError()),
        RequestFinished("t", "other", "GET", "default", "2xx", 0.1, 3, 2, False),
        ConcurrencyBlocked("c", "refused"),
        FleetViewUpdated("b", 2, 1, 10, 0.5),
        LeaseAcquired("s", "0123456789ab-1", 1, 0.0, 1),
        LeaseReleased("s", "0123456789ab-1", CALL_ID, "webhook", 0),
        LeaseRefused("s", None, "no slot is free"),
        LeaseWaiting("s", 0),
        CapacityChanged("s", 2, 1, "signal", "twilio:10004"),
    ):
        telemetry(event)
    data = reader.get_metrics_data()
    assert data is not None
    kinds = {Sum: "observable counter", Gauge: "observable gauge", Histogram: "histogram"}
    created = {
        (metric.name, kinds[type(metric.data)], metric.unit)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    page = (Path(__file__).resolve().parents[1] / "docs" / "opentelemetry.md").read_text()
    documented = set(
        re.findall(r"^\| `(resilient_voice\.[\w.]+)` \| ([\w ]+) \| `(.+?)` \|", page, re.M)
    )
    assert created == documented
    assert len(created) == 31


def test_a_subclass_of_a_handled_record_is_recorded_as_it(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    class PacedGrant(TokensGranted):
        pass

    telemetry(PacedGrant("cps", None, 1.0, 0.0))
    telemetry(PacedGrant("cps", None, 1.0, 0.0))
    assert points(reader, "resilient_voice.limiter.acquisitions") == {
        attrs(limiter__name="cps", limiter__outcome="granted"): 2
    }


def test_threads_sharing_a_listener_lose_no_count(
    reader: InMemoryMetricReader, telemetry: OpenTelemetryListener
) -> None:
    """Listeners run in whichever thread caused the event: one per event loop, say."""
    event = RetryAttemptStarted("calls", 1, "attempt-1")

    def emit() -> None:
        for _ in range(20_000):
            telemetry(event)

    threads = [threading.Thread(target=emit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert points(reader, "resilient_voice.retry.attempts") == {attrs(retry__name="calls"): 80_000}
