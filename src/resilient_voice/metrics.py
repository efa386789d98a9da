"""Prometheus metrics: one listener for every primitive, the transport and the clients.

Attach the same object to everything it should observe (see :mod:`resilient_voice.events`)::

    metrics = PrometheusMetrics()  # or PrometheusMetrics(registry=my_registry)
    breaker = CircuitBreaker("twilio", listeners=[metrics])
    limiter = TokenBucket(1.0, name="twilio-cps", listeners=[metrics])

:class:`PrometheusMetrics` is a callable taking every event record; it tells them apart with
``match`` (breaker, limiter, retry, transport and provider client records) and ignores the rest.

Why get-or-create: prometheus-client raises "Duplicated timeseries" when a second collector with
the same name is registered. Building an app twice in one process (every test suite does) or
creating one listener per breaker would crash with plain ``Counter(...)`` calls. Every collector
here is looked up in the target registry first and created only when absent
(:func:`resilient_voice._prometheus.get_or_create`, shared with the ASGI middleware), so any
number of listeners can share a registry. Label children are cached per key
(:class:`_Children`), so an observation is a dict lookup and an increment, never a ``labels()``
call.

Labels are bounded: breaker, limiter, policy, transport and client names are chosen by the user;
hosts and routes come from the transport's configuration. Limiter keys (client addresses, phone
numbers) are never used as labels.

This module imports ``prometheus_client`` at import time; ``import resilient_voice`` does not
import this module.

Over 400 lines: it is one listener, and each metric's collector, label children and update stay
side by side, so a metric's name, labels and meaning are read in one place; the shared
get-or-create and label-cache machinery already lives elsewhere (``_prometheus``, ``_Children``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from resilient_voice import _validate
from resilient_voice._prometheus import get_or_create, resolve_registry
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

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _Children(dict[_K, _V], Generic[_K, _V]):
    """Label children (or tuples of them) by key, built by ``make`` on first sight and kept.

    A hit is a plain dict lookup in C (``__missing__`` runs only on a miss), so recording an
    event costs no ``labels()`` call and builds nothing but the key. Keys are bounded because
    they are made of label values only.
    """

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[_K], _V]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: _K) -> _V:
        value = self[key] = self._make(key)
        return value


class _LimiterChildren(NamedTuple):
    granted: Any
    rejected: Any
    wait: Any
    evicted: Any
    lossy: Any


class _LeaseChildren(NamedTuple):
    acquired: Any
    refused: Any
    in_use: Any
    waiting: Any
    effective: Any
    signals: Any


_OUTCOMES = ("success", "failure", "ignored", "rejected")


class PrometheusMetrics:
    """Records every primitive's, transport's and client's events into Prometheus metrics.

    A listener: pass the instance itself in ``listeners=[...]`` of every breaker, limiter,
    retry policy, transport and client it should observe (or ``add_listener(metrics)``); it is
    called with every event record and ignores the ones it has no metric for. Build it once at
    startup, like the primitives; any number of instances may share a registry.

    Metrics (every name starts with ``resilient_voice_``; see docs/metrics.md):

    - ``breaker_state{breaker,state}`` gauge: 1 for the current state, 0 for the others. A
      breaker appears after its first event; until its first transition it is shown ``closed``
      if it ran a call (every breaker starts closed). In multiprocess mode the gauge uses
      ``livemax``: a state is 1 if it is current in any live process.
    - ``breaker_transitions_total{breaker,from_state,to_state}``,
      ``breaker_calls_total{breaker,outcome}`` (``success``, ``failure``, ``ignored``,
      ``rejected``).
    - ``breaker_fleet_transitions_total{breaker,rule,to_state}``: a shared breaker's fleet rule
      (``quorum``, ``rate``) opened this replica, or the fleet closed it (``fleet``); counted
      in addition to ``breaker_transitions_total``.
    - ``breaker_fleet_replicas{breaker}``, ``breaker_fleet_open_replicas{breaker}``,
      ``breaker_fleet_calls{breaker}``, ``breaker_fleet_failure_rate{breaker}`` gauges: the
      fleet as this replica last read it (live replicas, how many are open, the calls in their
      windows and the combined failure rate); a shared breaker's series appear at its first
      reading. Multiprocess mode: ``livemax``.
    - ``limiter_granted_total{limiter}``, ``limiter_rejected_total{limiter}``,
      ``limiter_evicted_total{limiter,lossy}`` (``lossy="true"``: the dropped keyed bucket was
      not full), ``limiter_wait_seconds{limiter}`` histogram.
    - ``limiter_store_available{limiter}`` gauge: 1 while the limiter's shared store (Redis)
      answers, 0 while it runs on its ``on_backend_error`` fallback; a limiter appears after its
      first transition (no series: it never lost its store). In multiprocess mode the gauge
      uses ``livemin``: 0 if any live process is on its fallback.
      ``limiter_store_unavailable_total{limiter,fallback}``: transitions to the fallback
      (``fallback``: ``local``, ``allow`` or ``deny``), one per outage and process. Limiters
      only.
    - ``store_available{primitive,name}`` gauge and
      ``store_unavailable_total{primitive,name,fallback}``: the same for every object with a
      shared store, ``primitive`` telling them apart (``limiter``, ``breaker``, ``leases``).
    - ``retry_attempts_total{policy}``, ``retry_retries_total{policy,reason}``,
      ``retry_give_ups_total{policy,reason}`` (``reason``: a
      :class:`~resilient_voice.FailureKind` value, or ``unclassified``),
      ``retry_outcome_unknown_total{policy}``.
    - ``http_client_requests_total``, ``http_client_request_duration_seconds`` and
      ``http_client_attempts_total``, labelled ``transport``, ``host``, ``method``, ``route``,
      ``status_class`` (see :class:`~resilient_voice.events.RequestFinished`).
    - ``http_client_backpressure_total{transport,host,method,route,outcome}``: answers with
      HTTP 429 (Twilio's 20429), one per attempt; ``outcome`` is ``retried`` when another
      attempt followed, ``final`` when it was the request's last answer.
    - ``provider_concurrency_total{client,outcome}``: a provider said the account's concurrent
      call slots were all taken (``blocked``: the call was created and waits; ``refused``).
    - ``leases_in_use{leases}``, ``leases_effective_capacity{leases}`` gauges (with a shared
      store: the fleet's, as this process last saw it; ``livemax`` in multiprocess mode) and
      ``leases_waiting{leases}`` (callers queued in this process; ``livesum``);
      ``leases_acquired_total{leases}``, ``leases_refused_total{leases}``,
      ``leases_released_total{leases,reason}`` (``webhook``, ``lease``, ``ttl``,
      ``reconcile``), ``leases_capacity_signals_total{leases}``.

    Attributes:
        registry: The registry recorded into.

    The collectors are attributes too: ``breaker_state``, ``breaker_transitions``,
    ``breaker_calls``, ``breaker_fleet_transitions``, ``breaker_fleet_replicas``,
    ``breaker_fleet_open_replicas``, ``breaker_fleet_calls``, ``breaker_fleet_failure_rate``,
    ``limiter_granted``,
    ``limiter_rejected``, ``limiter_evicted``, ``limiter_wait``, ``limiter_store_available``,
    ``limiter_store_unavailable``, ``store_available``, ``store_unavailable``,
    ``retry_attempts``, ``retry_retries``, ``retry_give_ups``, ``retry_outcome_unknown``,
    ``http_client_requests``, ``http_client_duration``, ``http_client_attempts``,
    ``http_client_backpressure``, ``provider_concurrency``, ``leases_in_use``,
    ``leases_waiting``, ``leases_effective_capacity``, ``leases_acquired``, ``leases_refused``,
    ``leases_released`` and ``leases_capacity_signals``.

    Args:
        registry: Where to register; default ``prometheus_client.REGISTRY``.
        limiter_wait_buckets: Buckets of the limiter wait histogram (used only when this
            creates it: the first creator's buckets win).
        http_client_buckets: Buckets of the outbound request duration histogram (likewise).

    Raises:
        TypeError: ``registry`` is not a ``CollectorRegistry``.
        ValueError: A metric name is taken by an incompatible collector.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        limiter_wait_buckets: Sequence[float] = LIMITER_WAIT_BUCKETS,
        http_client_buckets: Sequence[float] = HTTP_CLIENT_BUCKETS,
    ) -> None:
        self.registry = reg = resolve_registry(registry)
        self.breaker_state = get_or_create(
            Gauge,
            PREFIX + "breaker_state",
            "Circuit breaker state: 1 for the current state, 0 for the others.",
            ("breaker", "state"),
            reg,
            multiprocess_mode="livemax",
        )
        self.breaker_transitions = get_or_create(
            Counter,
            PREFIX + "breaker_transitions",
            "Circuit breaker state transitions.",
            ("breaker", "from_state", "to_state"),
            reg,
        )
        self.breaker_calls = get_or_create(
            Counter,
            PREFIX + "breaker_calls",
            "Calls through a circuit breaker by outcome (success, failure, ignored, rejected).",
            ("breaker", "outcome"),
            reg,
        )
        self.breaker_fleet_transitions = get_or_create(
            Counter,
            PREFIX + "breaker_fleet_transitions",
            "Shared circuit breaker transitions made by a fleet rule (quorum, rate, fleet).",
            ("breaker", "rule", "to_state"),
            reg,
        )
        fleet = {
            "breaker_fleet_replicas": "Live replicas of a shared circuit breaker (this one too).",
            "breaker_fleet_open_replicas": "Replicas of a shared circuit breaker that are open.",
            "breaker_fleet_calls": "Calls in the windows of a shared breaker's live replicas.",
            "breaker_fleet_failure_rate": "Combined failure rate of a shared breaker's replicas.",
        }
        (
            self.breaker_fleet_replicas,
            self.breaker_fleet_open_replicas,
            self.breaker_fleet_calls,
            self.breaker_fleet_failure_rate,
        ) = (
            get_or_create(
                Gauge, PREFIX + name, text, ("breaker",), reg, multiprocess_mode="livemax"
            )
            for name, text in fleet.items()
        )
        self.limiter_granted = get_or_create(
            Counter, PREFIX + "limiter_granted", "Rate limiter grants.", ("limiter",), reg
        )
        self.limiter_rejected = get_or_create(
            Counter, PREFIX + "limiter_rejected", "Rate limiter refusals.", ("limiter",), reg
        )
        self.limiter_evicted = get_or_create(
            Counter,
            PREFIX + "limiter_evicted",
            "Keyed rate limiter buckets dropped to bound memory (lossy: the bucket was not full).",
            ("limiter", "lossy"),
            reg,
        )
        self.limiter_wait = get_or_create(
            Histogram,
            PREFIX + "limiter_wait_seconds",
            "Time a rate limiter grant waited for tokens.",
            ("limiter",),
            reg,
            buckets=_validate.buckets("limiter_wait_buckets", limiter_wait_buckets),
        )
        self.limiter_store_available = get_or_create(
            Gauge,
            PREFIX + "limiter_store_available",
            "Whether a rate limiter's shared store answers (1) or it runs on its fallback (0).",
            ("limiter",),
            reg,
            multiprocess_mode="livemin",
        )
        self.limiter_store_unavailable = get_or_create(
            Counter,
            PREFIX + "limiter_store_unavailable",
            "Times a rate limiter's shared store became unavailable, by the fallback it used.",
            ("limiter", "fallback"),
            reg,
        )
        self.store_available = get_or_create(
            Gauge,
            PREFIX + "store_available",
            "Whether the shared store (Redis) of a limiter or breaker answers (1) or not (0).",
            ("primitive", "name"),
            reg,
            multiprocess_mode="livemin",
        )
        self.store_unavailable = get_or_create(
            Counter,
            PREFIX + "store_unavailable",
            "Times the shared store of a limiter or breaker became unavailable, by fallback.",
            ("primitive", "name", "fallback"),
            reg,
        )
        self.retry_attempts = get_or_create(
            Counter,
            PREFIX + "retry_attempts",
            "Attempts started by a retry policy, first attempts included.",
            ("policy",),
            reg,
        )
        self.retry_retries = get_or_create(
            Counter,
            PREFIX + "retry_retries",
            "Retries scheduled, by the failure kind of the failed attempt.",
            ("policy", "reason"),
            reg,
        )
        self.retry_give_ups = get_or_create(
            Counter,
            PREFIX + "retry_give_ups",
            "Operations that failed for good, by the failure kind of the last attempt.",
            ("policy", "reason"),
            reg,
        )
        self.retry_outcome_unknown = get_or_create(
            Counter,
            PREFIX + "retry_outcome_unknown",
            "Non-idempotent operations that may have been processed and were not retried.",
            ("policy",),
            reg,
        )
        http = ("transport", "host", "method", "route", "status_class")
        self.http_client_requests = get_or_create(
            Counter,
            PREFIX + "http_client_requests",
            "Outbound HTTP requests (logical requests; retries are attempts).",
            http,
            reg,
        )
        self.http_client_duration = get_or_create(
            Histogram,
            PREFIX + "http_client_request_duration_seconds",
            "Duration of outbound HTTP requests, retries included.",
            http,
            reg,
            buckets=_validate.buckets("http_client_buckets", http_client_buckets),
        )
        self.http_client_attempts = get_or_create(
            Counter,
            PREFIX + "http_client_attempts",
            "Attempts made for outbound HTTP requests.",
            http,
            reg,
        )
        self.http_client_backpressure = get_or_create(
            Counter,
            PREFIX + "http_client_backpressure",
            "Outbound answers with HTTP 429 (the provider pushing back), one per attempt, by "
            "outcome (retried: another attempt followed; final: the request's last answer).",
            ("transport", "host", "method", "route", "outcome"),
            reg,
        )
        self.provider_concurrency = get_or_create(
            Counter,
            PREFIX + "provider_concurrency",
            "Answers saying the account's concurrent call slots were all taken, by outcome "
            "(blocked: the call was created and waits for a slot; refused).",
            ("client", "outcome"),
            reg,
        )
        self._create_lease_metrics(reg)
        self._prepare()

    def _create_lease_metrics(self, reg: CollectorRegistry) -> None:
        self.leases_in_use = get_or_create(
            Gauge,
            PREFIX + "leases_in_use",
            "Call leases held (with a shared store: the fleet's, as last seen).",
            ("leases",),
            reg,
            multiprocess_mode="livemax",
        )
        self.leases_waiting = get_or_create(
            Gauge,
            PREFIX + "leases_waiting",
            "Callers queued for a call lease in this process.",
            ("leases",),
            reg,
            multiprocess_mode="livesum",
        )
        self.leases_effective_capacity = get_or_create(
            Gauge,
            PREFIX + "leases_effective_capacity",
            "Effective capacity of a call lease set, as learned from the provider.",
            ("leases",),
            reg,
            multiprocess_mode="livemax",
        )
        self.leases_acquired = get_or_create(
            Counter, PREFIX + "leases_acquired", "Call leases granted.", ("leases",), reg
        )
        self.leases_refused = get_or_create(
            Counter,
            PREFIX + "leases_refused",
            "Call lease acquires that got no slot by their deadline.",
            ("leases",),
            reg,
        )
        self.leases_released = get_or_create(
            Counter,
            PREFIX + "leases_released",
            "Call leases freed, by reason (webhook, lease, ttl, reconcile).",
            ("leases", "reason"),
            reg,
        )
        self.leases_capacity_signals = get_or_create(
            Counter,
            PREFIX + "leases_capacity_signals",
            "Capacity signals from the provider (each halves the effective capacity).",
            ("leases",),
            reg,
        )

    def _prepare(self) -> None:
        """The children caches: every label child is built once, on first sight of its key."""
        state, transitions = self.breaker_state, self.breaker_transitions
        self._breaker_calls: _Children[str, dict[str, Any]] = _Children(
            lambda breaker: {o: self.breaker_calls.labels(breaker, o) for o in _OUTCOMES}
        )
        # A state's child appears only once the breaker's state is known: a series at 0 would
        # claim it; all three appear together on the first state shown.
        self._breaker_states: _Children[str, dict[BreakerState, Any]] = _Children(
            lambda breaker: {s: state.labels(breaker, s.value) for s in BreakerState}
        )
        self._transitions: _Children[tuple[str, BreakerState, BreakerState], Any] = _Children(
            lambda key: transitions.labels(key[0], key[1].value, key[2].value)
        )
        self._limiters: _Children[str, _LimiterChildren] = _Children(
            lambda limiter: _LimiterChildren(
                self.limiter_granted.labels(limiter),
                self.limiter_rejected.labels(limiter),
                self.limiter_wait.labels(limiter),
                self.limiter_evicted.labels(limiter, "false"),
                self.limiter_evicted.labels(limiter, "true"),
            )
        )
        self._attempts: _Children[str, Any] = _Children(self.retry_attempts.labels)
        self._unknown: _Children[str, Any] = _Children(self.retry_outcome_unknown.labels)
        self._retries: _Children[tuple[str, FailureKind], Any] = _Children(
            lambda key: self.retry_retries.labels(key[0], key[1].value)
        )
        self._give_ups: _Children[tuple[str, FailureKind | None], Any] = _Children(
            lambda key: self.retry_give_ups.labels(
                key[0], "unclassified" if key[1] is None else key[1].value
            )
        )
        self._http_series: _Children[tuple[str, str, str, str, str], tuple[Any, Any, Any]] = (
            _Children(
                lambda key: (
                    self.http_client_requests.labels(*key),
                    self.http_client_duration.labels(*key),
                    self.http_client_attempts.labels(*key),
                )
            )
        )
        self._backpressure: _Children[tuple[str, str, str, str], tuple[Any, Any]] = _Children(
            lambda key: (
                self.http_client_backpressure.labels(*key, "retried"),
                self.http_client_backpressure.labels(*key, "final"),
            )
        )
        self._fleet_gauges: _Children[str, tuple[Any, Any, Any, Any]] = _Children(
            lambda breaker: (
                self.breaker_fleet_replicas.labels(breaker),
                self.breaker_fleet_open_replicas.labels(breaker),
                self.breaker_fleet_calls.labels(breaker),
                self.breaker_fleet_failure_rate.labels(breaker),
            )
        )
        self._concurrency: _Children[tuple[str, str], Any] = _Children(
            lambda key: self.provider_concurrency.labels(*key)
        )
        self._leases: _Children[str, _LeaseChildren] = _Children(
            lambda leases: _LeaseChildren(
                self.leases_acquired.labels(leases),
                self.leases_refused.labels(leases),
                self.leases_in_use.labels(leases),
                self.leases_waiting.labels(leases),
                self.leases_effective_capacity.labels(leases),
                self.leases_capacity_signals.labels(leases),
            )
        )
        self._lease_releases: _Children[tuple[str, str], Any] = _Children(
            lambda key: self.leases_released.labels(*key)
        )

    def _show_state(self, breaker: str, current: BreakerState) -> None:
        for state, child in self._breaker_states[breaker].items():
            child.set(1.0 if state is current else 0.0)

    def _ran(self, breaker: str, outcome: str) -> None:
        """Count a call that ran: a breaker first seen running is closed (every one starts so)."""
        if breaker not in self._breaker_states:
            self._show_state(breaker, BreakerState.CLOSED)
        self._breaker_calls[breaker][outcome].inc()

    def __call__(self, event: Event) -> None:
        """Record one event; records without a metric are ignored."""
        match event:
            case CallSucceeded(source=breaker):
                self._ran(breaker, "success")
            case CallFailed(source=breaker):
                self._ran(breaker, "failure")
            case CallIgnored(source=breaker):
                self._ran(breaker, "ignored")
            case CallRejected(source=breaker):
                self._breaker_calls[breaker]["rejected"].inc()
            case StateChanged(source=breaker, old=old, new=new):
                self._show_state(breaker, new)
                self._transitions[breaker, old, new].inc()
            case FleetStateChanged(source=breaker, new=new, rule=rule):
                self.breaker_fleet_transitions.labels(breaker, rule, new.value).inc()
            case TokensGranted(source=limiter, waited=waited):
                children = self._limiters[limiter]
                children.granted.inc()
                children.wait.observe(waited)
            case TokensRejected(source=limiter):
                self._limiters[limiter].rejected.inc()
            case BucketEvicted(source=limiter, lossy=lossy):
                children = self._limiters[limiter]
                (children.lossy if lossy else children.evicted).inc()
            case FleetViewUpdated(source=breaker, live=live, open=opened, calls=calls):
                gauges = self._fleet_gauges[breaker]
                gauges[0].set(live)
                gauges[1].set(opened)
                gauges[2].set(calls)
                gauges[3].set(event.failure_rate)
            case StoreAvailabilityChanged(
                source=name, available=available, fallback=mode, primitive=primitive
            ):
                # Rare (one record per transition): no children cache.
                up = 1.0 if available else 0.0
                self.store_available.labels(primitive, name).set(up)
                if not available:
                    self.store_unavailable.labels(primitive, name, mode).inc()
                if primitive == "limiter":  # the limiter's own series predate the others
                    self.limiter_store_available.labels(name).set(up)
                    if not available:
                        self.limiter_store_unavailable.labels(name, mode).inc()
            case RetryAttemptStarted(source=policy):
                self._attempts[policy].inc()
            case RetryScheduled(source=policy, kind=kind):
                self._retries[policy, kind].inc()
            case RetryGaveUp(source=policy, kind=kind):
                self._give_ups[policy, kind].inc()
            case RetryOutcomeUnknown(source=policy):
                self._unknown[policy].inc()
            case RequestFinished(source, host, method, route, status_class, duration, attempts):
                requests, durations, tries = self._http_series[
                    source, host, method, route, status_class
                ]
                requests.inc()
                durations.observe(duration)
                tries.inc(attempts)
                pushed = event.backpressure
                if pushed:
                    retried, final = self._backpressure[source, host, method, route]
                    if event.ended_in_backpressure:
                        final.inc()
                        pushed -= 1
                    if pushed:
                        retried.inc(pushed)
            case ConcurrencyBlocked(source=client, outcome=outcome):
                self._concurrency[client, outcome].inc()
            case LeaseAcquired(source=leases, in_use=in_use):
                lease_set = self._leases[leases]
                lease_set.acquired.inc()
                lease_set.in_use.set(in_use)
            case LeaseReleased(source=leases, reason=reason, in_use=in_use):
                self._lease_releases[leases, reason].inc()
                self._leases[leases].in_use.set(in_use)
            case LeaseRefused(source=leases):
                self._leases[leases].refused.inc()
            case LeaseWaiting(source=leases, waiting=waiting):
                self._leases[leases].waiting.set(waiting)
            case CapacityChanged(source=leases, new=new, cause=cause):
                lease_set = self._leases[leases]
                lease_set.effective.set(new)
                if cause == "signal":
                    lease_set.signals.inc()
            case _:
                pass

    def __repr__(self) -> str:
        return f"PrometheusMetrics(registry={self.registry!r})"
