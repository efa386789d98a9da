"""Event records and listeners: how metrics, logs and tests observe the primitives.

Every primitive, the transport and the provider clients accept ``listeners=[...]`` and
``add_listener()``. A listener is one type, :data:`Listener`: a callable taking a frozen, slotted
:class:`Event` record and telling records apart with ``match`` (one object can listen to every
primitive: :class:`~resilient_voice.metrics.PrometheusMetrics` does). Producers keep their
listeners in a tuple and test it before building any record, so when nothing listens, nothing is
built or called on the hot path; :func:`dispatch` hands a record to each listener.

Listeners run synchronously in the task that caused the event, so they must be cheap and must
not raise: an exception from a listener is logged and swallowed, because observing a call must
never change its outcome. Fields other than ``error`` and ``key`` are bounded (names chosen by
the user, enums, configured route names), so they are safe as metric labels.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

from resilient_voice.failure import FailureKind

__all__ = [
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
]

_log = logging.getLogger("resilient_voice.events")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event record: frozen, slotted, built only when someone listens.

    ``source`` is the name of the primitive that produced it (a bounded string chosen by the
    user). Listeners tell records apart with ``match``.
    """

    source: str


Listener = Callable[[Event], None]
"""A listener is any callable taking one event record; it must be cheap and must not raise."""


def check_listener(listener: object) -> Listener:
    """Return ``listener`` when it is callable; refuse it at attach time otherwise.

    Raises:
        TypeError: ``listener`` is not callable.
    """
    if not callable(listener):
        raise TypeError(
            f"listeners must be callables taking an event record, got {listener!r} (listener "
            "classes with on_... methods were replaced by callables)"
        )
    return listener


def check_listeners(listeners: Iterable[object]) -> tuple[Listener, ...]:
    """Return ``listeners`` as the tuple a producer keeps, each checked by :func:`check_listener`.

    Raises:
        TypeError: One of them is not callable.
    """
    return tuple(check_listener(listener) for listener in listeners)


# Retry and transport records (RetryPolicy, ResilientTransport). ``source`` is the policy's or
# transport's name.


@dataclass(frozen=True, slots=True)
class RetryAttemptStarted(Event):
    """Attempt ``attempt`` (1-based) of operation ``attempt_id`` is starting."""

    attempt: int
    attempt_id: str


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """Attempt ``attempt`` failed with ``kind``; the next starts after ``delay`` seconds."""

    attempt: int
    delay: float
    kind: FailureKind
    error: BaseException


@dataclass(frozen=True, slots=True)
class RetryGaveUp(Event):
    """The operation failed for good after ``attempt`` attempts; ``kind`` is ``None`` when the
    failure was unclassified (or the time ran out before any failure)."""

    attempt: int
    kind: FailureKind | None
    error: BaseException


@dataclass(frozen=True, slots=True)
class RetryOutcomeUnknown(Event):
    """A non-idempotent operation may have been processed and was not retried."""

    attempt_id: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class RequestFinished(Event):
    """A logical request through a :class:`~resilient_voice.ResilientTransport` finished.

    ``route`` is the configured route's name (never a raw path); ``host`` is the matched route's
    host, or ``"other"`` (never the raw request host); ``status_class`` is ``"1xx"`` ... ``"5xx"``,
    the :class:`~resilient_voice.FailureKind` value when no response came back, or
    ``"cancelled"``. All bounded, so they are safe as metric labels.
    """

    host: str
    method: str
    route: str
    status_class: str
    duration: float
    attempts: int


def dispatch(listeners: tuple[Listener, ...], event: Event) -> None:
    """Hand ``event`` to every listener, logging and swallowing what a listener raises.

    Primitives call this only after checking ``if self._listeners:``, so the record is never
    built when nothing listens.
    """
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # noqa: BLE001  (a listener bug must not change the call's outcome)
            _log.exception("listener %r raised on %s", listener, type(event).__name__)


class BreakerState(enum.Enum):
    """The three states of a circuit breaker.

    Defined here rather than in the breaker so that event records can name it without the events
    module importing the breaker (which imports this module to dispatch).
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CallSucceeded(Event):
    """A call through a circuit breaker succeeded.

    ``duration`` is ``None`` when the breaker did not time the call (it times calls only when
    someone listens or a slow-call rule needs it).
    """

    duration: float | None


@dataclass(frozen=True, slots=True)
class CallFailed(Event):
    """A call through a circuit breaker counted as a failure.

    ``error`` is ``None`` when the breaker's ``failure_result`` predicate judged a returned value.
    """

    error: BaseException | None
    duration: float | None


@dataclass(frozen=True, slots=True)
class CallIgnored(Event):
    """A call through a circuit breaker raised an exception the breaker does not count."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class CallRejected(Event):
    """A circuit breaker refused a call without running it (open, or every probe slot taken)."""

    retry_after: float


@dataclass(frozen=True, slots=True)
class StateChanged(Event):
    """A circuit breaker moved from ``old`` to ``new``."""

    old: BreakerState
    new: BreakerState


@dataclass(frozen=True, slots=True)
class FleetStateChanged(Event):
    """A fleet rule of a shared breaker moved this replica from ``old`` to ``new``.

    Sent next to the usual :class:`StateChanged`, so that a dashboard tells a replica that saw
    the failures itself from one that followed the fleet. ``rule`` is ``"quorum"`` or
    ``"rate"`` when the fleet opened it, ``"fleet"`` when the fleet closed it again.
    """

    old: BreakerState
    new: BreakerState
    rule: str


# Limiter records (TokenBucket, KeyedLimiter). ``key`` is None for a plain bucket; it is kept so
# that logs and tests can see which key was limited, but keys are unbounded (client addresses,
# phone numbers): a metrics listener must never turn one into a label.


@dataclass(frozen=True, slots=True)
class TokensGranted(Event):
    """``tokens`` were granted after waiting ``waited`` seconds (0.0 when uncontended)."""

    key: Hashable | None
    tokens: float
    waited: float


@dataclass(frozen=True, slots=True)
class TokensRejected(Event):
    """A request for ``tokens`` was refused; ``retry_after`` is the projected wait, if known."""

    key: Hashable | None
    tokens: float
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class BucketEvicted(Event):
    """A keyed bucket was dropped to bound memory; ``lossy`` when it was not full (fail open)."""

    key: Hashable
    lossy: bool


@dataclass(frozen=True, slots=True)
class StoreAvailabilityChanged(Event):
    """A limiter's shared store (Redis) became unavailable, or available again.

    ``fallback`` is what the limiter does while it is unavailable (``"local"``, ``"allow"``
    or ``"deny"``); one record per transition, never one per call.
    """

    available: bool
    fallback: str


# Call lease records (CallLeases). ``source`` is the lease set's name. Lease and call ids are
# unbounded: a metrics listener must never turn one into a label.


@dataclass(frozen=True, slots=True)
class LeaseAcquired(Event):
    """Lease ``lease_id`` (``generation``) was granted after waiting ``waited`` seconds.

    ``in_use`` is the number of leases held after the grant (across the fleet with a shared
    store, as of its answer).
    """

    lease_id: str
    generation: int
    waited: float
    in_use: int


@dataclass(frozen=True, slots=True)
class LeaseReleased(Event):
    """A lease was freed. ``reason`` says by what:

    ``"webhook"`` (a release by call id, as the provider's status callback makes it, or a bind
    meeting an earlier such release), ``"lease"`` (``lease.release()``: the create failed),
    ``"ttl"`` (its TTL ran out: a lost webhook or a crashed replica), ``"reconcile"`` (the
    provider no longer lists its call). ``call_id`` is ``None`` for a lease never bound.
    """

    lease_id: str
    call_id: str | None
    reason: Literal["webhook", "lease", "ttl", "reconcile"]
    in_use: int


@dataclass(frozen=True, slots=True)
class LeaseRefused(Event):
    """An acquire got no slot by its deadline; ``retry_after`` as on the error raised."""

    retry_after: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseWaiting(Event):
    """The number of callers queued for a lease changed to ``waiting``."""

    waiting: int


@dataclass(frozen=True, slots=True)
class CapacityChanged(Event):
    """The effective capacity of a lease set went from ``old`` to ``new`` (maybe equal).

    ``cause`` is ``"signal"`` (the provider refused a call for concurrency: halved; sent for
    every signal, even one that changes nothing, with the signal's ``reason``),
    ``"provider"`` (the provider's reported limits set it), ``"recovery"`` (it grew back
    after ``capacity_recovery`` seconds without a signal) or ``"shared"`` (another replica
    sharing the store changed it). ``reason`` is a short, bounded code (``"twilio:10004"``).
    """

    old: int
    new: int
    cause: Literal["signal", "provider", "recovery", "shared"]
    reason: str


# Provider client records (VapiClient). ``source`` is the client's name.


@dataclass(frozen=True, slots=True)
class ConcurrencyBlocked(Event):
    """The provider said the account's concurrent call slots are all taken.

    ``outcome`` is ``"blocked"`` when the call was created but flagged as waiting for a slot
    (Vapi's ``subscriptionLimits.concurrencyBlocked`` on a 201: the call is returned to the
    caller), or ``"refused"`` when the provider answered with an over-concurrency error.
    """

    outcome: Literal["blocked", "refused"]
