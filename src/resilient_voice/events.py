"""Listener protocols: how metrics, logs and tests observe the primitives.

Every primitive accepts ``listeners=[...]`` and ``add_listener()``. A listener subclasses the
matching base class below and overrides only the callbacks it cares about; the others are no-ops.
Primitives keep their listeners in a tuple and test it before building any event argument, so when
nothing listens, nothing is built or called on the hot path.

Callbacks run synchronously in the task that caused the event, so they must be cheap and must not
raise: an exception from a listener is logged and swallowed by the primitive, because observing a
call must never change its outcome. Arguments are names (bounded strings chosen by the user), never
request data, so they are safe as metric labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from resilient_voice.failure import FailureKind

if TYPE_CHECKING:
    from resilient_voice.breaker import BreakerState

__all__ = [
    "BreakerListener",
    "Event",
    "LimiterListener",
    "Listener",
    "RequestFinished",
    "RetryAttemptStarted",
    "RetryGaveUp",
    "RetryOutcomeUnknown",
    "RetryScheduled",
    "check_listener",
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


def check_listener(listener: object) -> Listener:
    """Return ``listener`` when it is callable; refuse it at attach time otherwise.

    Raises:
        TypeError: ``listener`` is not callable.
    """
    if not callable(listener):
        raise TypeError(f"a listener must be a callable taking one event, got {listener!r}")
    return listener


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


class BreakerListener:
    """Observes a :class:`~resilient_voice.CircuitBreaker`."""

    def on_success(self, breaker: str, duration: float | None) -> None:
        """A call succeeded; ``duration`` is ``None`` when the breaker did not time it."""

    def on_failure(self, breaker: str, error: BaseException | None, duration: float | None) -> None:
        """A call counted as a failure; ``error`` is ``None`` when a result predicate decided."""

    def on_ignored(self, breaker: str, error: BaseException) -> None:
        """A call raised an exception that the breaker does not count (and re-raised it)."""

    def on_rejected(self, breaker: str, retry_after: float) -> None:
        """A call was refused without running because the breaker is open or probing."""

    def on_state_change(self, breaker: str, old: BreakerState, new: BreakerState) -> None:
        """The breaker moved from ``old`` to ``new``."""


class LimiterListener:
    """Observes a :class:`~resilient_voice.TokenBucket` or :class:`~resilient_voice.KeyedLimiter`.

    ``key`` is ``None`` for a plain bucket. Metric exporters must not use it as a label: keys are
    unbounded (client addresses, phone numbers).
    """

    def on_granted(self, limiter: str, key: Hashable | None, tokens: float, waited: float) -> None:
        """Tokens were granted after waiting ``waited`` seconds (0.0 when uncontended)."""

    def on_rejected(
        self, limiter: str, key: Hashable | None, tokens: float, retry_after: float | None
    ) -> None:
        """A request for tokens was refused."""

    def on_evicted(self, limiter: str, key: Hashable, lossy: bool) -> None:
        """A keyed bucket was dropped; ``lossy`` is True when it was not full (fail-open)."""
