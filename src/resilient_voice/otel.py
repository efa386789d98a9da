"""OpenTelemetry metrics and span events: one listener for the primitives, transport and clients.

Attach the same object to everything it should observe (see :mod:`resilient_voice.events`)::

    telemetry = OpenTelemetryListener()  # the global meter and tracer providers
    breaker = CircuitBreaker("twilio", listeners=[telemetry])
    limiter = TokenBucket(1.0, name="twilio-cps", listeners=[telemetry])

Only the OpenTelemetry API is imported (the ``otel`` extra, ``pip install
'resilient-voice[otel]'``); the application brings the SDK and its exporters. ``import
resilient_voice`` does not import this module.

Why most instruments are observable: an SDK counter's ``add()`` builds an attribute set and walks
the provider's views and readers on every call, several microseconds. Events carry the
primitive's name, not the primitive, so the listener cannot read a breaker's or a limiter's own
statistics from an event; it keeps its own tallies instead (a dict increment under a lock per
event) and the SDK reads them through observable counters and gauges when it collects. Only the
two distributions (the limiter's wait, the request duration) are recorded per event, because a
histogram cannot be observed.

Names follow the shape of Polly v8's telemetry (``resilience.polly.strategy.events``,
``...attempt.duration``): everything lives under ``resilient_voice.``, one instrument per thing
counted, with the primitive's name and a small outcome as attributes. Attribute values are
bounded: names chosen by the user, enum values, configured route names and hosts, the HTTP method
(``_OTHER`` when not a standard one) and status class. Limiter keys, phone numbers, URLs,
attempt ids, correlation ids, lease ids and call ids are never attributes. Records the listener
has no instrument for are ignored; a new family of records adds rows to
``OpenTelemetryListener._table`` and tallies and instruments to ``_Recorder``.

Over 400 lines: it is one listener, like :mod:`resilient_voice.metrics`, and each instrument's
name, unit, description, tally and update stay side by side, so what an instrument means is read
in one place.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Final, Generic, TypeVar

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
except ImportError as exc:  # pragma: no cover  (tests/test_otel.py hides opentelemetry to see it)
    raise ImportError(
        "resilient_voice.otel needs the OpenTelemetry API: pip install 'resilient-voice[otel]'"
    ) from exc

from resilient_voice._version import __version__
from resilient_voice.events import (
    BreakerState,
    BucketEvicted,
    CallFailed,
    CallIgnored,
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
    TokensRejected,
)
from resilient_voice.failure import FailureKind

__all__ = ["OpenTelemetryListener"]

METER_NAME: Final = "resilient_voice"
"""The meter's instrumentation scope (with the package's version)."""

RETRY_EVENT: Final = "resilient_voice.retry"
"""The span event added to the current span when a retry is scheduled."""

GIVE_UP_EVENT: Final = "resilient_voice.retry.give_up"
"""The span event added to the current span when a retry policy gives up."""

OUTCOME_UNKNOWN_EVENT: Final = "resilient_voice.retry.outcome_unknown"
"""The span event added when a non-idempotent operation's outcome is unknown (not retried)."""

_LATENCY_LADDER = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The SDK's default boundaries are milliseconds-shaped (0, 5, 10, ... 10000); these durations
# are seconds, so the histograms advise seconds-shaped ones (the same as the Prometheus listener).
LIMITER_WAIT_BOUNDARIES: Final = (0.0, 0.001, 0.005, 0.01, *_LATENCY_LADDER, 30.0)
HTTP_CLIENT_BOUNDARIES: Final = (*_LATENCY_LADDER, 20.0, 30.0, 60.0)

# The methods the HTTP semantic conventions name; any other is reported as ``_OTHER``.
_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)

BREAKER = "resilient_voice.breaker.name"
STATE = "resilient_voice.breaker.state"
PREVIOUS_STATE = "resilient_voice.breaker.previous_state"
BREAKER_OUTCOME = "resilient_voice.breaker.outcome"
FLEET_RULE = "resilient_voice.breaker.fleet_rule"
LIMITER = "resilient_voice.limiter.name"
LIMITER_OUTCOME = "resilient_voice.limiter.outcome"
LOSSY = "resilient_voice.limiter.lossy"
FALLBACK = "resilient_voice.limiter.fallback"
RETRY = "resilient_voice.retry.name"
RETRY_ATTEMPT = "resilient_voice.retry.attempt"
FAILURE_KIND = "resilient_voice.failure.kind"
TRANSPORT = "resilient_voice.transport.name"
OPERATION = "resilient_voice.operation"
STATUS_CLASS = "resilient_voice.http.status_class"
CLIENT = "resilient_voice.client.name"
CONCURRENCY_OUTCOME = "resilient_voice.provider.outcome"
BACKPRESSURE_OUTCOME = "resilient_voice.backpressure.outcome"
PRIMITIVE_KIND = "resilient_voice.primitive.kind"
PRIMITIVE_NAME = "resilient_voice.primitive.name"
STORE_FALLBACK = "resilient_voice.store.fallback"
LEASES = "resilient_voice.leases.name"
RELEASE_REASON = "resilient_voice.leases.reason"
CAPACITY_CAUSE = "resilient_voice.leases.cause"

_K = TypeVar("_K", bound=Hashable)
Attributes = Mapping[str, str | bool | int | float]


class _Tally(Generic[_K]):
    """Counts by a key of bounded values, read by one observable instrument at collection.

    ``add`` is the per-event cost: a dict update under the recorder's lock (listeners run in
    whichever thread caused the event). The attribute mapping of a key is built once, on the
    first collection that sees it.
    """

    __slots__ = ("_attributes", "_lock", "_make", "counts")

    def __init__(self, lock: threading.Lock, make: Callable[[_K], Attributes]) -> None:
        self._lock = lock
        self._make = make
        self._attributes: dict[_K, Attributes] = {}
        self.counts: dict[_K, float] = {}

    def add(self, key: _K, amount: float = 1) -> None:
        with self._lock:
            counts = self.counts
            counts[key] = counts.get(key, 0) + amount

    def set(self, key: _K, value: float) -> None:
        with self._lock:
            self.counts[key] = value

    def observe(self, _options: otel_metrics.CallbackOptions) -> Iterable[otel_metrics.Observation]:
        with self._lock:
            items = list(self.counts.items())
        attributes = self._attributes
        observations = []
        for key, value in items:
            attrs = attributes.get(key)
            if attrs is None:
                attrs = attributes[key] = self._make(key)
            observations.append(otel_metrics.Observation(value, attrs))
        return observations


def _states(
    lock: threading.Lock, states: dict[str, BreakerState]
) -> Callable[[otel_metrics.CallbackOptions], Iterable[otel_metrics.Observation]]:
    """The breaker state gauge's callback: 1 for each breaker's current state, 0 for the others."""
    attributes: dict[str, dict[BreakerState, Attributes]] = {}

    def observe(_options: otel_metrics.CallbackOptions) -> Iterable[otel_metrics.Observation]:
        with lock:
            current = list(states.items())
        observations = []
        for breaker, now in current:
            per_state = attributes.get(breaker)
            if per_state is None:
                per_state = attributes[breaker] = {
                    s: {BREAKER: breaker, STATE: s.value} for s in BreakerState
                }
            for state, attrs in per_state.items():
                observations.append(otel_metrics.Observation(int(state is now), attrs))
        return observations

    return observe


class _Recorder:
    """The instruments of one meter and the tallies behind them, shared by its listeners.

    The SDK keeps the first instrument registered under a name and drops a second one's
    callbacks, so two listeners on one meter must share their tallies: :func:`_recorder_for`
    keeps one recorder per meter, weakly: it lives as long as its meter.
    """

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self.lock = lock = threading.Lock()
        self.breaker_states: dict[str, BreakerState] = {}
        self.breaker_calls: _Tally[tuple[str, str]] = _Tally(
            lock, lambda k: {BREAKER: k[0], BREAKER_OUTCOME: k[1]}
        )
        self.state_changes: _Tally[tuple[str, BreakerState, BreakerState]] = _Tally(
            lock, lambda k: {BREAKER: k[0], PREVIOUS_STATE: k[1].value, STATE: k[2].value}
        )
        self.fleet_changes: _Tally[tuple[str, str, BreakerState]] = _Tally(
            lock, lambda k: {BREAKER: k[0], FLEET_RULE: k[1], STATE: k[2].value}
        )
        self.acquisitions: _Tally[tuple[str, str]] = _Tally(
            lock, lambda k: {LIMITER: k[0], LIMITER_OUTCOME: k[1]}
        )
        self.evictions: _Tally[tuple[str, bool]] = _Tally(
            lock, lambda k: {LIMITER: k[0], LOSSY: k[1]}
        )
        self.limiter_store_available: _Tally[str] = _Tally(lock, lambda k: {LIMITER: k})
        self.limiter_store_outages: _Tally[tuple[str, str]] = _Tally(
            lock, lambda k: {LIMITER: k[0], FALLBACK: k[1]}
        )
        self.store_available: _Tally[tuple[str, str]] = _Tally(
            lock, lambda k: {PRIMITIVE_KIND: k[0], PRIMITIVE_NAME: k[1]}
        )
        self.store_outages: _Tally[tuple[str, str, str]] = _Tally(
            lock, lambda k: {PRIMITIVE_KIND: k[0], PRIMITIVE_NAME: k[1], STORE_FALLBACK: k[2]}
        )
        self.fleet_replicas: _Tally[str] = _Tally(lock, lambda k: {BREAKER: k})
        self.fleet_open: _Tally[str] = _Tally(lock, lambda k: {BREAKER: k})
        self.fleet_calls: _Tally[str] = _Tally(lock, lambda k: {BREAKER: k})
        self.fleet_failure_rate: _Tally[str] = _Tally(lock, lambda k: {BREAKER: k})
        self.attempts: _Tally[str] = _Tally(lock, lambda k: {RETRY: k})
        self.retries: _Tally[tuple[str, FailureKind]] = _Tally(
            lock, lambda k: {RETRY: k[0], FAILURE_KIND: k[1].value}
        )
        self.give_ups: _Tally[tuple[str, FailureKind | None]] = _Tally(
            lock, lambda k: {RETRY: k[0], FAILURE_KIND: _kind(k[1])}
        )
        self.outcome_unknown: _Tally[str] = _Tally(lock, lambda k: {RETRY: k})
        self.http_attempts: _Tally[tuple[str, str, str, str, str]] = _Tally(lock, _http_attributes)
        self.backpressure: _Tally[tuple[str, str, str, str, str]] = _Tally(
            lock, _backpressure_attributes
        )
        self.concurrency: _Tally[tuple[str, str]] = _Tally(
            lock, lambda k: {CLIENT: k[0], CONCURRENCY_OUTCOME: k[1]}
        )
        self.leases_in_use: _Tally[str] = _Tally(lock, lambda k: {LEASES: k})
        self.leases_waiting: _Tally[str] = _Tally(lock, lambda k: {LEASES: k})
        self.leases_capacity: _Tally[str] = _Tally(lock, lambda k: {LEASES: k})
        self.leases_acquired: _Tally[str] = _Tally(lock, lambda k: {LEASES: k})
        self.leases_refused: _Tally[str] = _Tally(lock, lambda k: {LEASES: k})
        self.leases_released: _Tally[tuple[str, str]] = _Tally(
            lock, lambda k: {LEASES: k[0], RELEASE_REASON: k[1]}
        )
        self.leases_signals: _Tally[str] = _Tally(lock, lambda k: {LEASES: k})
        self.leases_capacity_changes: _Tally[tuple[str, str]] = _Tally(
            lock, lambda k: {LEASES: k[0], CAPACITY_CAUSE: k[1]}
        )
        self.http_attributes: dict[tuple[str, str, str, str, str], Attributes] = {}
        self.limiter_attributes: dict[str, Attributes] = {}

        gauge, counter = meter.create_observable_gauge, meter.create_observable_counter
        gauge(
            "resilient_voice.breaker.state",
            [_states(lock, self.breaker_states)],
            "1",
            "Circuit breaker state: 1 for the current state, 0 for the others.",
        )
        counter(
            "resilient_voice.breaker.state_changes",
            [self.state_changes.observe],
            "{change}",
            "Circuit breaker state transitions.",
        )
        counter(
            "resilient_voice.breaker.fleet_state_changes",
            [self.fleet_changes.observe],
            "{change}",
            "Shared circuit breaker transitions made by a fleet rule (quorum, rate, fleet).",
        )
        fleet = (  # the names spelled out: tests/test_public_api.py reads them from here
            ("resilient_voice.breaker.fleet.replicas", self.fleet_replicas, "{replica}",
             "Live replicas (this one included)"),
            ("resilient_voice.breaker.fleet.open_replicas", self.fleet_open, "{replica}",
             "Live replicas that are open or half-open"),
            ("resilient_voice.breaker.fleet.calls", self.fleet_calls, "{call}",
             "Calls in the live replicas' windows"),
            ("resilient_voice.breaker.fleet.failure_rate", self.fleet_failure_rate, "1",
             "Combined failure rate (0 to 1)"),
        )  # fmt: skip
        for name, tally, unit, text in fleet:
            gauge(
                name,
                [tally.observe],
                unit,
                f"{text} of a shared circuit breaker's fleet, as this replica last read it.",
            )
        counter(
            "resilient_voice.breaker.calls",
            [self.breaker_calls.observe],
            "{call}",
            "Calls through a circuit breaker by outcome (success, failure, ignored, rejected).",
        )
        counter(
            "resilient_voice.limiter.acquisitions",
            [self.acquisitions.observe],
            "{acquisition}",
            "Rate limiter acquisitions by outcome (granted, rejected).",
        )
        self.limiter_wait = meter.create_histogram(
            "resilient_voice.limiter.wait.duration",
            "s",
            "Time a rate limiter grant waited for tokens.",
            explicit_bucket_boundaries_advisory=LIMITER_WAIT_BOUNDARIES,
        )
        counter(
            "resilient_voice.limiter.evictions",
            [self.evictions.observe],
            "{bucket}",
            "Keyed rate limiter buckets dropped to bound memory (lossy: it was not full).",
        )
        gauge(
            "resilient_voice.limiter.store.available",
            [self.limiter_store_available.observe],
            "1",
            "Whether a rate limiter's shared store answers (1) or it runs on its fallback (0).",
        )
        counter(
            "resilient_voice.limiter.store.outages",
            [self.limiter_store_outages.observe],
            "{outage}",
            "Times a rate limiter's shared store became unavailable, by the fallback it used.",
        )
        gauge(
            "resilient_voice.store.available",
            [self.store_available.observe],
            "1",
            "Whether the shared store of a limiter, breaker or lease set answers (1) or not (0).",
        )
        counter(
            "resilient_voice.store.outages",
            [self.store_outages.observe],
            "{outage}",
            "Times the shared store of a limiter, breaker or lease set became unavailable.",
        )
        counter(
            "resilient_voice.retry.attempts",
            [self.attempts.observe],
            "{attempt}",
            "Attempts started by a retry policy, first attempts included.",
        )
        counter(
            "resilient_voice.retry.retries",
            [self.retries.observe],
            "{retry}",
            "Retries scheduled, by the failure kind of the failed attempt.",
        )
        counter(
            "resilient_voice.retry.give_ups",
            [self.give_ups.observe],
            "{operation}",
            "Operations that failed for good, by the failure kind of the last attempt.",
        )
        counter(
            "resilient_voice.retry.outcome_unknown",
            [self.outcome_unknown.observe],
            "{operation}",
            "Non-idempotent operations that may have been processed and were not retried.",
        )
        self.http_duration = meter.create_histogram(
            "resilient_voice.http.client.request.duration",
            "s",
            "Duration of outbound HTTP requests, retries included (its count is the requests).",
            explicit_bucket_boundaries_advisory=HTTP_CLIENT_BOUNDARIES,
        )
        counter(
            "resilient_voice.http.client.attempts",
            [self.http_attempts.observe],
            "{attempt}",
            "Attempts made for outbound HTTP requests.",
        )
        counter(
            "resilient_voice.http.client.backpressure",
            [self.backpressure.observe],
            "{answer}",
            "Provider backpressure (HTTP 429 answers) to outbound requests, by outcome "
            "(retried: a later attempt followed; final: the caller got it).",
        )
        counter(
            "resilient_voice.provider.concurrency",
            [self.concurrency.observe],
            "{answer}",
            "Answers saying the account's concurrent call slots were all taken, by outcome "
            "(blocked: the call was created and waits for a slot; refused).",
        )
        self._create_lease_instruments(meter)

    def _create_lease_instruments(self, meter: otel_metrics.Meter) -> None:
        gauge, counter = meter.create_observable_gauge, meter.create_observable_counter
        gauge(
            "resilient_voice.leases.in_use",
            [self.leases_in_use.observe],
            "{lease}",
            "Call leases held (with a shared store: the fleet's, as this replica last saw it).",
        )
        gauge(
            "resilient_voice.leases.waiting",
            [self.leases_waiting.observe],
            "{caller}",
            "Callers queued for a call lease in this process.",
        )
        gauge(
            "resilient_voice.leases.effective_capacity",
            [self.leases_capacity.observe],
            "{lease}",
            "Effective capacity of a call lease set, as learned from the provider.",
        )
        counter(
            "resilient_voice.leases.acquired",
            [self.leases_acquired.observe],
            "{lease}",
            "Call leases granted.",
        )
        counter(
            "resilient_voice.leases.refused",
            [self.leases_refused.observe],
            "{acquisition}",
            "Call lease acquires that got no slot by their deadline.",
        )
        counter(
            "resilient_voice.leases.released",
            [self.leases_released.observe],
            "{lease}",
            "Call leases freed, by reason (webhook, lease, ttl, reconcile).",
        )
        counter(
            "resilient_voice.leases.capacity_signals",
            [self.leases_signals.observe],
            "{signal}",
            "Capacity signals from the provider (each halves the effective capacity).",
        )
        counter(
            "resilient_voice.leases.capacity_changes",
            [self.leases_capacity_changes.observe],
            "{change}",
            "Changes of a call lease set's effective capacity, by cause "
            "(signal, provider, recovery, shared).",
        )

    def show_state(self, breaker: str, state: BreakerState) -> None:
        with self.lock:
            self.breaker_states[breaker] = state

    def ran(self, breaker: str, outcome: str) -> None:
        """Count a call that ran: a breaker first seen running is closed (every one starts so)."""
        if breaker not in self.breaker_states:
            with self.lock:
                self.breaker_states.setdefault(breaker, BreakerState.CLOSED)
        self.breaker_calls.add((breaker, outcome))

    def limiter_attributes_of(self, limiter: str) -> Attributes:
        attrs = self.limiter_attributes.get(limiter)
        if attrs is None:
            attrs = self.limiter_attributes[limiter] = {LIMITER: limiter}
        return attrs

    def http_attributes_of(self, key: tuple[str, str, str, str, str]) -> Attributes:
        attrs = self.http_attributes.get(key)
        if attrs is None:
            attrs = self.http_attributes[key] = _http_attributes(key)
        return attrs


def _ignore(_event: Event) -> None:
    """The handler of a record the listener has no instrument for."""


def _kind(kind: FailureKind | None) -> str:
    return "unclassified" if kind is None else kind.value


def _error_type(error: BaseException) -> str:
    """The exception's class, fully qualified; never its message, which may hold a number or URL."""
    kind = type(error)
    return f"{kind.__module__}.{kind.__qualname__}"


def _backpressure_attributes(key: tuple[str, str, str, str, str]) -> Attributes:
    transport, host, method, operation, outcome = key
    return {
        TRANSPORT: transport,
        "server.address": host,
        "http.request.method": method,
        OPERATION: operation,
        BACKPRESSURE_OUTCOME: outcome,
    }


def _http_attributes(key: tuple[str, str, str, str, str]) -> Attributes:
    transport, host, method, operation, status_class = key
    return {
        TRANSPORT: transport,
        "server.address": host,
        "http.request.method": method,
        OPERATION: operation,
        STATUS_CLASS: status_class,
    }


_RECORDERS: weakref.WeakKeyDictionary[otel_metrics.Meter, _Recorder] = weakref.WeakKeyDictionary()
_RECORDERS_LOCK = threading.Lock()


def _recorder_for(meter: otel_metrics.Meter) -> _Recorder:
    """The recorder of ``meter``, created with its instruments on first use."""
    with _RECORDERS_LOCK:
        try:
            recorder = _RECORDERS.get(meter)
        except TypeError:  # a meter that takes no weak reference: its listeners do not share
            return _Recorder(meter)
        if recorder is None:
            recorder = _RECORDERS[meter] = _Recorder(meter)
        return recorder


class OpenTelemetryListener:
    """Records every primitive's, transport's and client's events as OpenTelemetry metrics.

    A listener: pass the instance itself in ``listeners=[...]`` of every breaker, limiter,
    retry policy, transport and client it should observe (or ``add_listener(telemetry)``); it
    is called with every event record and ignores the ones it has no instrument for. Build it
    once at startup, like the primitives. Listeners built on one meter provider share its
    instruments and tallies (like ``PrometheusMetrics`` instances sharing a registry).

    Instruments (meter ``resilient_voice``; see docs/opentelemetry.md for units and
    attributes): ``resilient_voice.breaker.state``, ``.breaker.state_changes``,
    ``.breaker.fleet_state_changes``, ``.breaker.fleet.replicas``,
    ``.breaker.fleet.open_replicas``, ``.breaker.fleet.calls``, ``.breaker.fleet.failure_rate``,
    ``.breaker.calls`` (outcome ``rejected`` counts the rejections), ``.limiter.acquisitions``,
    ``.limiter.wait.duration``, ``.limiter.evictions``, ``.limiter.store.available``,
    ``.limiter.store.outages``, ``.store.available``, ``.store.outages``, ``.retry.attempts``,
    ``.retry.retries``, ``.retry.give_ups``, ``.retry.outcome_unknown``,
    ``.http.client.request.duration``, ``.http.client.attempts``,
    ``.http.client.backpressure``, ``.provider.concurrency``, ``.leases.in_use``,
    ``.leases.waiting``, ``.leases.effective_capacity``, ``.leases.acquired``,
    ``.leases.refused``, ``.leases.released``, ``.leases.capacity_signals`` and
    ``.leases.capacity_changes``.

    When a retry is scheduled, the listener adds the span event ``resilient_voice.retry`` to the
    current span if it is recording, with ``http.request.resend_count`` (the number of the
    attempt that failed, so the first retry is resend 1), the policy's name, the failure kind,
    the delay in seconds and ``error.type`` (the exception's class). A policy giving up adds
    ``resilient_voice.retry.give_up`` (name, last attempt's number, failure kind,
    ``error.type``), an outcome left unknown ``resilient_voice.retry.outcome_unknown`` (name,
    ``error.type``): the span then says why the call failed, or that it must be reconciled.

    Args:
        meter_provider: Where the instruments are created; default the global one
            (``opentelemetry.metrics.get_meter_provider()``).
        tracer_provider: Default the global one. Retries annotate the current span whichever
            provider made it; passing ``opentelemetry.trace.NoOpTracerProvider()`` turns the
            span events off (metrics only).

    Raises:
        TypeError: A provider is not an OpenTelemetry ``MeterProvider`` / ``TracerProvider``.
    """

    __slots__ = ("_handlers", "_recorder", "_spans", "meter_provider", "tracer_provider")

    def __init__(
        self,
        meter_provider: otel_metrics.MeterProvider | None = None,
        tracer_provider: otel_trace.TracerProvider | None = None,
    ) -> None:
        if meter_provider is None:
            meter_provider = otel_metrics.get_meter_provider()
        elif not isinstance(meter_provider, otel_metrics.MeterProvider):
            raise TypeError(
                f"meter_provider must be an opentelemetry MeterProvider, got {meter_provider!r}"
            )
        if tracer_provider is None:
            tracer_provider = otel_trace.get_tracer_provider()
        elif not isinstance(tracer_provider, otel_trace.TracerProvider):
            raise TypeError(
                f"tracer_provider must be an opentelemetry TracerProvider, got {tracer_provider!r}"
            )
        self.meter_provider = meter_provider
        self.tracer_provider = tracer_provider
        self._recorder = _recorder_for(meter_provider.get_meter(METER_NAME, __version__))
        self._spans = not isinstance(tracer_provider, otel_trace.NoOpTracerProvider)
        self._handlers = self._table()

    def _table(self) -> dict[type[Event], Callable[[Any], None]]:
        """One row per record type: a dict lookup finds it, whatever the number of rows."""
        r = self._recorder
        return {
            CallSucceeded: lambda e: r.ran(e.source, "success"),
            CallFailed: lambda e: r.ran(e.source, "failure"),
            CallIgnored: lambda e: r.ran(e.source, "ignored"),
            CallRejected: lambda e: r.breaker_calls.add((e.source, "rejected")),
            StateChanged: self._state_changed,
            FleetStateChanged: lambda e: r.fleet_changes.add((e.source, e.rule, e.new)),
            FleetViewUpdated: self._fleet_view,
            TokensGranted: self._granted,
            TokensRejected: lambda e: r.acquisitions.add((e.source, "rejected")),
            BucketEvicted: lambda e: r.evictions.add((e.source, e.lossy)),
            StoreAvailabilityChanged: self._store,
            RetryAttemptStarted: lambda e: r.attempts.add(e.source),
            RetryScheduled: self._retry_scheduled,
            RetryGaveUp: self._gave_up,
            RetryOutcomeUnknown: self._outcome_unknown,
            RequestFinished: self._request_finished,
            ConcurrencyBlocked: lambda e: r.concurrency.add((e.source, e.outcome)),
            LeaseAcquired: self._lease_acquired,
            LeaseReleased: self._lease_released,
            LeaseRefused: lambda e: r.leases_refused.add(e.source),
            LeaseWaiting: lambda e: r.leases_waiting.set(e.source, e.waiting),
            CapacityChanged: self._capacity_changed,
        }

    def __call__(self, event: Event) -> None:
        """Record one event; records without an instrument are ignored."""
        handler = self._handlers.get(type(event))
        if handler is None:
            handler = self._handler_of(type(event))
        handler(event)

    def _handler_of(self, kind: type[Event]) -> Callable[[Any], None]:
        """A type first seen: a subclass of a handled record is handled as it, others ignored.

        The answer is kept, so an unknown record costs one dict lookup from then on; record
        types are few (classes, not values), so the table stays small.
        """
        handler = next((self._handlers[c] for c in kind.__mro__ if c in self._handlers), _ignore)
        self._handlers[kind] = handler
        return handler

    def _state_changed(self, event: StateChanged) -> None:
        r = self._recorder
        r.show_state(event.source, event.new)
        r.state_changes.add((event.source, event.old, event.new))

    def _granted(self, event: TokensGranted) -> None:
        r = self._recorder
        r.acquisitions.add((event.source, "granted"))
        r.limiter_wait.record(event.waited, r.limiter_attributes_of(event.source))

    def _fleet_view(self, event: FleetViewUpdated) -> None:
        r, breaker = self._recorder, event.source
        with r.lock:  # one reading: the four gauges never mix two of them
            r.fleet_replicas.counts[breaker] = event.live
            r.fleet_open.counts[breaker] = event.open
            r.fleet_calls.counts[breaker] = event.calls
            r.fleet_failure_rate.counts[breaker] = event.failure_rate

    def _store(self, event: StoreAvailabilityChanged) -> None:
        r, up = self._recorder, int(event.available)
        key = (event.primitive, event.source)
        r.store_available.set(key, up)
        if not event.available:
            r.store_outages.add((*key, event.fallback))
        if event.primitive == "limiter":  # the limiter's own instruments predate the others
            r.limiter_store_available.set(event.source, up)
            if not event.available:
                r.limiter_store_outages.add((event.source, event.fallback))

    def _lease_acquired(self, event: LeaseAcquired) -> None:
        r = self._recorder  # the lease id and generation stay out: they are unbounded
        r.leases_acquired.add(event.source)
        r.leases_in_use.set(event.source, event.in_use)

    def _lease_released(self, event: LeaseReleased) -> None:
        r = self._recorder  # so do the lease id and the call id
        r.leases_released.add((event.source, event.reason))
        r.leases_in_use.set(event.source, event.in_use)

    def _capacity_changed(self, event: CapacityChanged) -> None:
        r = self._recorder  # the signal's reason is a code the caller chose: left out
        r.leases_capacity.set(event.source, event.new)
        if event.cause == "signal":
            r.leases_signals.add(event.source)
        if event.new != event.old:
            r.leases_capacity_changes.add((event.source, event.cause))

    def _retry_scheduled(self, event: RetryScheduled) -> None:
        self._recorder.retries.add((event.source, event.kind))
        if self._spans:
            span = otel_trace.get_current_span()
            if span.is_recording():
                span.add_event(
                    RETRY_EVENT,
                    {
                        "http.request.resend_count": event.attempt,
                        RETRY: event.source,
                        FAILURE_KIND: event.kind.value,
                        "resilient_voice.retry.delay": event.delay,
                        "error.type": _error_type(event.error),
                    },
                )

    def _gave_up(self, event: RetryGaveUp) -> None:
        self._recorder.give_ups.add((event.source, event.kind))
        if self._spans:
            span = otel_trace.get_current_span()
            if span.is_recording():
                span.add_event(
                    GIVE_UP_EVENT,
                    {
                        RETRY: event.source,
                        RETRY_ATTEMPT: event.attempt,
                        FAILURE_KIND: _kind(event.kind),
                        "error.type": _error_type(event.error),
                    },
                )

    def _outcome_unknown(self, event: RetryOutcomeUnknown) -> None:
        self._recorder.outcome_unknown.add(event.source)
        if self._spans:
            span = otel_trace.get_current_span()
            if span.is_recording():  # the attempt id stays out: it is unbounded
                span.add_event(
                    OUTCOME_UNKNOWN_EVENT,
                    {RETRY: event.source, "error.type": _error_type(event.error)},
                )

    def _request_finished(self, event: RequestFinished) -> None:
        method = event.method if event.method in _METHODS else "_OTHER"
        key = (event.source, event.host, method, event.route, event.status_class)
        r = self._recorder
        r.http_duration.record(event.duration, r.http_attributes_of(key))
        r.http_attempts.add(key, event.attempts)
        pushed = event.backpressure
        if pushed:
            route = (event.source, event.host, method, event.route)
            if event.ended_in_backpressure:
                r.backpressure.add((*route, "final"))
                pushed -= 1
            if pushed:
                r.backpressure.add((*route, "retried"), pushed)

    def __repr__(self) -> str:
        return (
            f"OpenTelemetryListener(meter_provider={self.meter_provider!r}, "
            f"tracer_provider={self.tracer_provider!r})"
        )
