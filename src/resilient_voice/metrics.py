"""Prometheus metrics for the breaker, limiter, retry policy and transport.

Attach as listeners of the primitives (see :mod:`resilient_voice.events`)::

    metrics = PrometheusMetrics()  # or PrometheusMetrics(registry=my_registry)
    breaker = CircuitBreaker("twilio", listeners=[metrics.breaker])
    limiter = TokenBucket("twilio-cps", rate=1.0, listeners=[metrics.limiter])

There is one listener per primitive (:class:`BreakerMetrics`, :class:`LimiterMetrics`,
:class:`RetryMetrics`, :class:`TransportMetrics`). :class:`BreakerMetrics` and
:class:`LimiterMetrics` are callables taking typed event records, told apart with ``match``;
the others follow as their primitives move to typed events. :class:`PrometheusMetrics` builds
the four on one registry for convenience.

Why get-or-create: prometheus-client raises "Duplicated timeseries" when a second collector with
the same name is registered. Building an app twice in one process (every test suite does) or
creating one listener per breaker would crash with plain ``Counter(...)`` calls. Every collector
here is looked up in the target registry first and created only when absent, so any number of
listeners can share a registry. Label children are cached per label tuple, so an observation is a
dict lookup and an increment, never a ``labels()`` call.

Labels are bounded: breaker, limiter, policy and transport names are chosen by the user; hosts
and routes come from the transport's configuration. Limiter keys (client addresses, phone
numbers) are never used as labels.

This module imports ``prometheus_client`` at import time; ``import resilient_voice`` does not
import this module.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from resilient_voice.events import (
    BreakerState,
    BucketEvicted,
    CallFailed,
    CallIgnored,
    CallRejected,
    CallSucceeded,
    Event,
    RequestFinished,
    RetryAttemptStarted,
    RetryGaveUp,
    RetryOutcomeUnknown,
    RetryScheduled,
    StateChanged,
    TokensGranted,
    TokensRejected,
)
from resilient_voice.failure import FailureKind

__all__ = ["PrometheusMetrics"]

PREFIX = "resilient_voice_"

_LATENCY_LADDER = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

LIMITER_WAIT_BUCKETS: tuple[float, ...] = (0.0, 0.001, 0.005, 0.01, *_LATENCY_LADDER, 30.0)
"""Buckets of ``resilient_voice_limiter_wait_seconds``: most grants wait nothing at all."""

HTTP_CLIENT_BUCKETS: tuple[float, ...] = (*_LATENCY_LADDER, 20.0, 30.0, 60.0)
"""Buckets of ``resilient_voice_http_client_request_duration_seconds`` (telephony APIs answer
in tens to hundreds of milliseconds; retried requests take seconds)."""

SERVER_BUCKETS: tuple[float, ...] = (0.005, 0.01, *_LATENCY_LADDER)
"""Buckets of ``resilient_voice_http_server_request_duration_seconds`` (our own handlers)."""

_C = TypeVar("_C", Counter, Gauge, Histogram)
_lock = threading.Lock()


def _get_or_create(
    cls: type[_C],
    name: str,
    documentation: str,
    labelnames: Sequence[str],
    registry: CollectorRegistry,
    **kwargs: Any,
) -> _C:
    """Return the collector called ``name`` in ``registry``, creating it if absent.

    An existing collector is reused only when it has the same type and label names; anything else
    is a real conflict and raises ``ValueError`` naming the metric.

    Args:
        cls: ``Counter``, ``Gauge`` or ``Histogram``.
        name: Full metric name (for counters, without the ``_total`` suffix).
        documentation: The HELP text.
        labelnames: The label names, in order.
        registry: Where to look and register.
        **kwargs: Passed to the constructor when creating (``buckets``, ``multiprocess_mode``).

    Raises:
        ValueError: ``name`` is taken by an incompatible collector.
    """
    labels = tuple(labelnames)
    with _lock:
        # prometheus-client has no public lookup; _names_to_collectors has been stable since 0.1.
        names: dict[str, object] = getattr(registry, "_names_to_collectors", {})
        existing = names.get(name)
        if existing is None:
            return cls(name, documentation, labels, registry=registry, **kwargs)
        if type(existing) is not cls or tuple(getattr(existing, "_labelnames", ())) != labels:
            raise ValueError(
                f"metric {name!r} is already registered as {type(existing).__name__} with labels "
                f"{getattr(existing, '_labelnames', ())!r}; expected {cls.__name__} with {labels!r}"
            )
        return existing


def _registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    if registry is None:
        return REGISTRY
    if not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client.CollectorRegistry, not {registry!r}")
    return registry


class _BreakerSeries:
    """The label children of one breaker, built on first sight of its name."""

    __slots__ = ("_breaker", "_gauge", "failure", "ignored", "rejected", "states", "success")

    def __init__(self, metrics: BreakerMetrics, breaker: str) -> None:
        self._breaker = breaker
        self._gauge = metrics.state
        # State children appear only once the state is known: a series at 0 would claim it.
        self.states: dict[BreakerState, Any] | None = None
        self.success = metrics.calls.labels(breaker, "success")
        self.failure = metrics.calls.labels(breaker, "failure")
        self.ignored = metrics.calls.labels(breaker, "ignored")
        self.rejected = metrics.calls.labels(breaker, "rejected")

    def set_state(self, state: BreakerState) -> None:
        states = self.states
        if states is None:
            states = self.states = {
                s: self._gauge.labels(self._breaker, s.value) for s in BreakerState
            }
        for candidate, child in states.items():
            child.set(1.0 if candidate is state else 0.0)


class BreakerMetrics:
    """Records a circuit breaker's state, transitions and call outcomes.

    A listener: pass the instance itself in ``listeners=[...]``; it is called with every event
    record and ignores those that are not a breaker's.

    Metrics (label ``breaker`` is the breaker's name):

    - ``resilient_voice_breaker_state{breaker,state}`` gauge: 1 for the current state, 0 for the
      others. A breaker appears after its first event; until its first transition it is shown
      ``closed`` if it ran a call (every breaker starts closed). In multiprocess mode the gauge
      uses ``livemax``: a state is 1 if it is current in any live process.
    - ``resilient_voice_breaker_transitions_total{breaker,from_state,to_state}`` counter.
    - ``resilient_voice_breaker_calls_total{breaker,outcome}`` counter, ``outcome`` one of
      ``success``, ``failure``, ``ignored``, ``rejected``.

    Args:
        registry: Where to register; default ``prometheus_client.REGISTRY``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = _registry(registry)
        self.state = _get_or_create(
            Gauge,
            PREFIX + "breaker_state",
            "Circuit breaker state: 1 for the current state, 0 for the others.",
            ("breaker", "state"),
            reg,
            multiprocess_mode="livemax",
        )
        self.transitions = _get_or_create(
            Counter,
            PREFIX + "breaker_transitions",
            "Circuit breaker state transitions.",
            ("breaker", "from_state", "to_state"),
            reg,
        )
        self.calls = _get_or_create(
            Counter,
            PREFIX + "breaker_calls",
            "Calls through a circuit breaker by outcome (success, failure, ignored, rejected).",
            ("breaker", "outcome"),
            reg,
        )
        self._series: dict[str, _BreakerSeries] = {}
        self._transitions: dict[tuple[str, BreakerState, BreakerState], Any] = {}

    def _get(self, breaker: str) -> _BreakerSeries:
        series = self._series.get(breaker)
        if series is None:
            series = self._series[breaker] = _BreakerSeries(self, breaker)
        return series

    def _ran(self, breaker: str) -> _BreakerSeries:
        series = self._get(breaker)
        if series.states is None:
            series.set_state(BreakerState.CLOSED)
        return series

    def __call__(self, event: Event) -> None:
        match event:
            case CallSucceeded(source=breaker):
                self._ran(breaker).success.inc()
            case CallFailed(source=breaker):
                self._ran(breaker).failure.inc()
            case CallIgnored(source=breaker):
                self._ran(breaker).ignored.inc()
            case CallRejected(source=breaker):
                self._get(breaker).rejected.inc()
            case StateChanged(source=breaker, old=old, new=new):
                self._get(breaker).set_state(new)
                key = (breaker, old, new)
                child = self._transitions.get(key)
                if child is None:
                    child = self._transitions[key] = self.transitions.labels(
                        breaker, old.value, new.value
                    )
                child.inc()
            case _:
                pass


class _LimiterSeries:
    __slots__ = ("evicted", "granted", "lossy", "rejected", "wait")

    def __init__(self, metrics: LimiterMetrics, limiter: str) -> None:
        self.granted = metrics.granted.labels(limiter)
        self.rejected = metrics.rejected.labels(limiter)
        self.evicted = metrics.evicted.labels(limiter, "false")
        self.lossy = metrics.evicted.labels(limiter, "true")
        self.wait = metrics.wait.labels(limiter)


class LimiterMetrics:
    """Records a token bucket's or keyed limiter's grants, rejections, evictions and waits.

    A listener: pass the instance itself in ``listeners=[...]``; other events are ignored.

    Metrics (label ``limiter`` is the limiter's name; keys are never labels):

    - ``resilient_voice_limiter_granted_total{limiter}`` counter of grants.
    - ``resilient_voice_limiter_rejected_total{limiter}`` counter of refusals.
    - ``resilient_voice_limiter_evicted_total{limiter,lossy}`` counter of dropped keyed buckets;
      ``lossy="true"`` when the bucket was not full (the key got a fresh allowance).
    - ``resilient_voice_limiter_wait_seconds{limiter}`` histogram of the time a grant waited.

    Args:
        registry: Where to register; default ``prometheus_client.REGISTRY``.
        buckets: Histogram buckets of the wait time (used only when this creates the histogram).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = LIMITER_WAIT_BUCKETS,
    ) -> None:
        reg = _registry(registry)
        self.granted = _get_or_create(
            Counter, PREFIX + "limiter_granted", "Rate limiter grants.", ("limiter",), reg
        )
        self.rejected = _get_or_create(
            Counter, PREFIX + "limiter_rejected", "Rate limiter refusals.", ("limiter",), reg
        )
        self.evicted = _get_or_create(
            Counter,
            PREFIX + "limiter_evicted",
            "Keyed rate limiter buckets dropped to bound memory (lossy: the bucket was not full).",
            ("limiter", "lossy"),
            reg,
        )
        self.wait = _get_or_create(
            Histogram,
            PREFIX + "limiter_wait_seconds",
            "Time a rate limiter grant waited for tokens.",
            ("limiter",),
            reg,
            buckets=tuple(buckets),
        )
        self._series: dict[str, _LimiterSeries] = {}

    def _get(self, limiter: str) -> _LimiterSeries:
        series = self._series.get(limiter)
        if series is None:
            series = self._series[limiter] = _LimiterSeries(self, limiter)
        return series

    def __call__(self, event: Event) -> None:
        match event:
            case TokensGranted(source=limiter, waited=waited):
                series = self._get(limiter)
                series.granted.inc()
                series.wait.observe(waited)
            case TokensRejected(source=limiter):
                self._get(limiter).rejected.inc()
            case BucketEvicted(source=limiter, lossy=lossy):
                series = self._get(limiter)
                (series.lossy if lossy else series.evicted).inc()
            case _:
                pass


class RetryMetrics:
    """Records a retry policy's attempts, retries by reason, give-ups and unknown outcomes.

    A listener: pass it in ``RetryPolicy(listeners=[...])``; it ignores other records.

    Metrics (label ``policy`` is the retry policy's name; ``reason`` is a
    :class:`~resilient_voice.FailureKind` value, or ``unclassified``):

    - ``resilient_voice_retry_attempts_total{policy}`` counter of attempts (first ones included).
    - ``resilient_voice_retry_retries_total{policy,reason}`` counter of retries scheduled.
    - ``resilient_voice_retry_give_ups_total{policy,reason}`` counter of operations that failed
      for good.
    - ``resilient_voice_retry_outcome_unknown_total{policy}`` counter of non-idempotent operations
      that may have been processed and were not retried (each is a call to reconcile).

    Args:
        registry: Where to register; default ``prometheus_client.REGISTRY``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = _registry(registry)
        self.attempts = _get_or_create(
            Counter,
            PREFIX + "retry_attempts",
            "Attempts started by a retry policy, first attempts included.",
            ("policy",),
            reg,
        )
        self.retries = _get_or_create(
            Counter,
            PREFIX + "retry_retries",
            "Retries scheduled, by the failure kind of the failed attempt.",
            ("policy", "reason"),
            reg,
        )
        self.give_ups = _get_or_create(
            Counter,
            PREFIX + "retry_give_ups",
            "Operations that failed for good, by the failure kind of the last attempt.",
            ("policy", "reason"),
            reg,
        )
        self.outcome_unknown = _get_or_create(
            Counter,
            PREFIX + "retry_outcome_unknown",
            "Non-idempotent operations that may have been processed and were not retried.",
            ("policy",),
            reg,
        )
        self._attempts: dict[str, Any] = {}
        self._unknown: dict[str, Any] = {}
        self._retries: dict[tuple[str, FailureKind], Any] = {}
        self._give_ups: dict[tuple[str, FailureKind | None], Any] = {}

    def __call__(self, event: Event) -> None:
        """Count one retry record; other records are ignored."""
        match event:
            case RetryAttemptStarted(source=policy):
                child = self._attempts.get(policy)
                if child is None:
                    child = self._attempts[policy] = self.attempts.labels(policy)
                child.inc()
            case RetryScheduled(source=policy, kind=kind):
                key = (policy, kind)
                child = self._retries.get(key)
                if child is None:
                    child = self._retries[key] = self.retries.labels(policy, kind.value)
                child.inc()
            case RetryGaveUp(source=policy, kind=kind):
                given = (policy, kind)
                child = self._give_ups.get(given)
                if child is None:
                    reason = "unclassified" if kind is None else kind.value
                    child = self._give_ups[given] = self.give_ups.labels(policy, reason)
                child.inc()
            case RetryOutcomeUnknown(source=policy):
                child = self._unknown.get(policy)
                if child is None:
                    child = self._unknown[policy] = self.outcome_unknown.labels(policy)
                child.inc()
            case _:
                pass


class TransportMetrics:
    """Records outbound HTTP requests made through ``ResilientTransport``.

    A listener: pass it in ``ResilientTransport(listeners=[...])``; it ignores other records.

    Metrics (labels ``transport``, ``host``, ``method``, ``route``, ``status_class``; ``route`` is
    the transport's configured route name, never a raw path; ``host`` is the matched route's
    host or ``other``, never the raw request host; ``status_class`` is ``1xx`` ... ``5xx``, the
    failure kind when no response arrived, or ``cancelled``):

    - ``resilient_voice_http_client_requests_total`` counter of logical requests.
    - ``resilient_voice_http_client_request_duration_seconds`` histogram of their duration,
      retries included.
    - ``resilient_voice_http_client_attempts_total`` counter of attempts (a request retried
      twice counts 3).

    Args:
        registry: Where to register; default ``prometheus_client.REGISTRY``.
        buckets: Histogram buckets (used only when this creates the histogram).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = HTTP_CLIENT_BUCKETS,
    ) -> None:
        reg = _registry(registry)
        labels = ("transport", "host", "method", "route", "status_class")
        self.requests = _get_or_create(
            Counter,
            PREFIX + "http_client_requests",
            "Outbound HTTP requests (logical requests; retries are attempts).",
            labels,
            reg,
        )
        self.duration = _get_or_create(
            Histogram,
            PREFIX + "http_client_request_duration_seconds",
            "Duration of outbound HTTP requests, retries included.",
            labels,
            reg,
            buckets=tuple(buckets),
        )
        self.attempts = _get_or_create(
            Counter,
            PREFIX + "http_client_attempts",
            "Attempts made for outbound HTTP requests.",
            labels,
            reg,
        )
        self._series: dict[tuple[str, str, str, str, str], tuple[Any, Any, Any]] = {}

    def __call__(self, event: Event) -> None:
        """Record one finished request; other records are ignored."""
        match event:
            case RequestFinished(source, host, method, route, status_class, duration, attempts):
                key = (source, host, method, route, status_class)
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = (
                        self.requests.labels(*key),
                        self.duration.labels(*key),
                        self.attempts.labels(*key),
                    )
                series[0].inc()
                series[1].observe(duration)
                series[2].inc(attempts)
            case _:
                pass


class PrometheusMetrics:
    """The four metric listeners on one registry.

    Attributes:
        breaker: a :class:`BreakerMetrics` for ``CircuitBreaker(listeners=[...])``.
        limiter: a :class:`LimiterMetrics` for ``TokenBucket`` / ``KeyedLimiter``.
        retry: a :class:`RetryMetrics` for ``RetryPolicy``.
        transport: a :class:`TransportMetrics` for ``ResilientTransport``.
        registry: the registry they record into.

    Args:
        registry: Where to register; default ``prometheus_client.REGISTRY``. Creating this twice
            on one registry is safe: the collectors are shared.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = _registry(registry)
        self.breaker = BreakerMetrics(self.registry)
        self.limiter = LimiterMetrics(self.registry)
        self.retry = RetryMetrics(self.registry)
        self.transport = TransportMetrics(self.registry)

    def __repr__(self) -> str:
        return f"PrometheusMetrics(registry={self.registry!r})"
