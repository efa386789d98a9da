"""Event records and listeners: how metrics, logs and tests observe the primitives.

Every primitive accepts ``listeners=[...]`` and ``add_listener()``. The target shape is one
listener type, :data:`Listener`, a callable taking a frozen :class:`Event` record and telling
records apart with ``match``; the circuit breaker has moved to it (its records and
:class:`BreakerState` are defined here), the other primitives still call the named callbacks of
the listener base classes below through :func:`emit` until they move. Primitives keep their
listeners in a tuple and test it before building any record or argument, so when nothing
listens, nothing is built or called on the hot path.

Callbacks run synchronously in the task that caused the event, so they must be cheap and must not
raise: an exception from a listener is logged and swallowed by the primitive, because observing a
call must never change its outcome. Arguments are names (bounded strings chosen by the user), never
request data, so they are safe as metric labels.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from resilient_voice.failure import FailureKind

__all__ = [
    "BreakerState",
    "BucketEvicted",
    "CallFailed",
    "CallIgnored",
    "CallRejected",
    "CallSucceeded",
    "Event",
    "Listener",
    "RetryListener",
    "StateChanged",
    "StoreAvailabilityChanged",
    "TokensGranted",
    "TokensRejected",
    "TransportListener",
    "dispatch",
    "emit",
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


def emit(listeners: tuple[object, ...], callback: str, *args: object) -> None:
    """Call ``callback`` on every listener, logging and swallowing what a listener raises.

    Primitives call this only after checking ``if self._listeners:`` so that the argument tuple is
    never built when nothing listens.
    """
    for listener in listeners:
        try:
            getattr(listener, callback)(*args)
        except Exception:  # noqa: BLE001  (a listener bug must not change the call's outcome)
            _log.exception("listener %r raised in %s", listener, callback)


class RetryListener:
    """Observes a :class:`~resilient_voice.RetryPolicy`."""

    def on_attempt(self, policy: str, attempt: int, attempt_id: str) -> None:
        """Attempt number ``attempt`` (1-based) of operation ``attempt_id`` is starting."""

    def on_retry(
        self, policy: str, attempt: int, delay: float, kind: FailureKind, error: BaseException
    ) -> None:
        """Attempt ``attempt`` failed with ``kind``; the next starts after ``delay`` seconds."""

    def on_give_up(
        self, policy: str, attempt: int, kind: FailureKind | None, error: BaseException
    ) -> None:
        """The operation failed for good after ``attempt`` attempts."""

    def on_outcome_unknown(self, policy: str, attempt_id: str, error: BaseException) -> None:
        """A non-idempotent operation may have been processed and was not retried."""


class TransportListener:
    """Observes :class:`~resilient_voice.ResilientTransport` requests."""

    def on_request(
        self,
        transport: str,
        host: str,
        method: str,
        route: str,
        status_class: str,
        duration: float,
        attempts: int,
    ) -> None:
        """A logical request finished.

        ``route`` is the configured route's name (never a raw path); ``host`` is the matched
        route's host, or ``"other"`` (never the raw request host); ``status_class`` is ``"1xx"``
        ... ``"5xx"``, the :class:`~resilient_voice.FailureKind` value when no response came
        back, or ``"cancelled"``. All bounded, so they are safe as metric labels.
        """
