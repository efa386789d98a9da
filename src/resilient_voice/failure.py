"""What a failed attempt tells us about whether the upstream acted on it.

Retrying a phone call is not like retrying a GET: if ``POST .../Calls.json`` reached Twilio and
only the response was lost, sending it again rings the customer twice. Every failure this library
handles is therefore sorted into one of four kinds, and the retry rules are written in terms of
the kind, never in terms of exception types:

``NOT_SENT``
    The request certainly never reached the upstream (connection refused, connect or pool
    timeout, DNS failure, a local breaker or rate-limit rejection). Always safe to retry.
``UNPROCESSED``
    The upstream answered and its documentation says it did not act on the request (Twilio's
    429 / error 20429). Safe to retry, after any ``Retry-After``.
``MAYBE_PROCESSED``
    The request may have been acted on (read timeout, connection dropped after the request was
    written, a 5xx). Retried only for idempotent operations; otherwise the caller gets
    :class:`~resilient_voice.OutcomeUnknownError` and must reconcile.
``PERMANENT``
    The caller's own error (other 4xx). Never retried.

Exceptions (and response wrappers) expose their kind through the small :class:`Classified`
protocol: an attribute ``failure_kind`` and an optional ``retry_after`` in seconds. The library's
own exceptions implement it as class attributes; a foreign exception (httpx's) is never given
the attribute: the adapter that knows it passes an explicit ``classify`` function instead (see
:class:`~resilient_voice.Policy.run`). The refusals the core raises itself before anything is
sent are their own types below, so they keep the built-in base a caller catches
(``TimeoutError``, ``RuntimeError``) and state their kind.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import ClassVar, Protocol, runtime_checkable

__all__ = ["FailureKind", "failure_kind_of"]


class FailureKind(enum.Enum):
    """How much of a failed request the upstream may have processed."""

    NOT_SENT = "not_sent"
    UNPROCESSED = "unprocessed"
    MAYBE_PROCESSED = "maybe_processed"
    PERMANENT = "permanent"

    def __repr__(self) -> str:
        return f"FailureKind.{self.name}"


@runtime_checkable
class Classified(Protocol):
    """An exception or result that knows its :class:`FailureKind`.

    ``retry_after`` is the number of seconds the upstream (or a local primitive) asked the caller
    to wait before trying again, or ``None`` when it gave no hint.
    """

    @property
    def failure_kind(self) -> FailureKind: ...

    @property
    def retry_after(self) -> float | None: ...


Classify = Callable[[BaseException], "FailureKind | None"]
"""An explicit classification of exceptions a component does not own (an adapter's table):
returns the kind, or ``None`` to fall back to :func:`failure_kind_of`."""


class OutOfTimeError(TimeoutError):
    """A deadline passed before anything was sent: kind ``NOT_SENT``, safe to retry later."""

    failure_kind: ClassVar[FailureKind] = FailureKind.NOT_SENT
    retry_after: ClassVar[float | None] = None


class NotSentError(RuntimeError):
    """A call refused by the library before anything was sent (kind ``NOT_SENT``).

    Raised for programming and lifecycle errors found on the way in (a re-entrant call into a
    bulkhead, a client used after its event loop closed): retrying cannot help, but nothing
    reached the upstream, so nothing is unknown.
    """

    failure_kind: ClassVar[FailureKind] = FailureKind.NOT_SENT
    retry_after: ClassVar[float | None] = None


class ConcurrentUseError(RuntimeError):
    """A primitive used from two threads or event loops at once: kind ``PERMANENT``.

    A programming error found on the way in: a retry policy must neither retry it nor call it
    an unknown outcome.
    """

    failure_kind: ClassVar[FailureKind] = FailureKind.PERMANENT
    retry_after: ClassVar[float | None] = None


class NotAwaitableError(TypeError):
    """A callable that should have returned an awaitable did not: kind ``PERMANENT``.

    A programming error, not a failure of the upstream: never retried, never counted by a
    breaker.
    """

    failure_kind: ClassVar[FailureKind] = FailureKind.PERMANENT
    retry_after: ClassVar[float | None] = None


def failure_kind_of(obj: object, classify: Classify | None = None) -> FailureKind | None:
    """Return the kind of ``obj``: what ``classify`` says, else ``obj.failure_kind``.

    ``classify`` is the explicit table of whoever owns the call (the transport's, for httpx
    exceptions); it is asked first and may return ``None`` for exceptions it does not know.
    ``None`` overall means "unclassified": the retry policy then treats the failure as
    ``MAYBE_PROCESSED``, the only assumption that can never cause a duplicate side effect.
    """
    if classify is not None and isinstance(obj, BaseException):
        found = classify(obj)
        if found is not None:
            return found
    kind = getattr(obj, "failure_kind", None)
    return kind if isinstance(kind, FailureKind) else None


def retry_after_of(obj: object) -> float | None:
    """Return a non-negative ``obj.retry_after`` in seconds, or ``None`` when absent or invalid."""
    value = getattr(obj, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if math.isnan(value) or value < 0.0:  # ignore rather than trust
        return None
    return value
