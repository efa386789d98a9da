"""The exception tree of resilient_voice.

Every error this library raises derives from :class:`ResilientVoiceError`::

    ResilientVoiceError
      RejectedError(retry_after)            not attempted: nothing was sent
        CircuitOpenError                    .breaker, .retry_after
        RateLimitedError                    .limiter, .retry_after
        CapacityExhaustedError              .leases, .retry_after: no call slot freed in time
      OutcomeUnknownError(attempt_id)       sent, may have been processed, not retried
      ProviderError(status, code, message, kind)   the upstream answered with an error
        TwilioAPIError, VapiAPIError        in resilient_voice.twilio and resilient_voice.vapi
          TwilioAuthenticationError, VapiAuthenticationError, VapiConcurrencyLimitError
      InvalidRequestError(field)            also a ValueError: refused before sending
      WebhookVerificationError              raised by verifiers; the webhook guard answers 403

Rejections are raised *instead of* making a request, so they are always ``NOT_SENT``: retrying
them is safe, and a circuit breaker never counts them as the upstream's failure.
:class:`OutcomeUnknownError` is the one a caller must handle with care: the request may have been
acted on (a call may be ringing) and was deliberately not re-sent. Adapters chain the original
exception with ``raise ... from``.

Invalid configuration raises :class:`ValueError` or :class:`TypeError` at construction, never
later; those are not part of this tree.

Every public exception pickles with its fields (errors cross process boundaries in task
queues): unpickling rebuilds the instance without calling ``__init__`` again and restores its
attributes and notes. What names a local object is a name, not the object (``.breaker``,
``.limiter`` and ``.leases`` are the primitives' names), so it survives the trip. As for any
Python exception, ``__cause__``, ``__context__`` and the traceback are not pickled.
"""

from __future__ import annotations

from typing import Any

from resilient_voice._pickling import reduce_exception
from resilient_voice.failure import FailureKind

__all__ = [
    "CapacityExhaustedError",
    "CircuitOpenError",
    "InvalidRequestError",
    "OutcomeUnknownError",
    "ProviderError",
    "RateLimitedError",
    "RejectedError",
    "ResilientVoiceError",
    "WebhookVerificationError",
]


class ResilientVoiceError(Exception):
    """Base class of every exception raised by resilient_voice."""

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_exception(self)


class RejectedError(ResilientVoiceError):
    """A local primitive refused the operation before anything was sent.

    Attributes:
        retry_after: Seconds until trying again could succeed, or ``None`` if unknown.
    """

    failure_kind = FailureKind.NOT_SENT

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpenError(RejectedError):
    """The circuit breaker is open (or half-open with every probe slot taken).

    Attributes:
        breaker: The breaker's name.
        retry_after: Seconds until the breaker will admit a probe call.
    """

    def __init__(self, breaker: str, retry_after: float) -> None:
        # The message is built only when shown: an open breaker may refuse thousands of calls a
        # second, and formatting it costs more than the rest of the rejection.
        Exception.__init__(self, breaker, retry_after)
        self.breaker = breaker
        self.retry_after: float | None = retry_after

    def __str__(self) -> str:
        return (
            f"circuit breaker {self.breaker!r} is open; retry after {self.retry_after or 0.0:.3f}s"
        )


class RateLimitedError(RejectedError):
    """The rate limiter cannot grant the tokens in time.

    Attributes:
        limiter: The limiter's name.
        retry_after: Seconds until the request could be granted, or ``None`` if it never can
            under the current load (for example every keyed bucket is busy).
    """

    def __init__(self, limiter: str, retry_after: float | None, *, reason: str = "") -> None:
        wait = "unknown" if retry_after is None else f"{retry_after:.3f}s"
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"rate limiter {limiter!r} refused{detail}; retry after {wait}",
            retry_after=retry_after,
        )
        self.limiter = limiter
        self.reason = reason


class CapacityExhaustedError(RejectedError):
    """No call slot of a :class:`~resilient_voice.CallLeases` freed in time; nothing was sent.

    Attributes:
        leases: The lease set's name.
        retry_after: Seconds until the oldest held lease's TTL runs out (a slot is then
            certain to free), or ``None`` when no TTL bounds the wait (a slot frees when a call
            ends, which only the provider knows).
    """

    def __init__(self, leases: str, retry_after: float | None, *, reason: str = "") -> None:
        wait = "unknown" if retry_after is None else f"{retry_after:.3f}s"
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"call leases {leases!r} have no free slot{detail}; retry after {wait}",
            retry_after=retry_after,
        )
        self.leases = leases
        self.reason = reason


class OutcomeUnknownError(ResilientVoiceError):
    """A non-idempotent request may have been processed; it was not re-sent.

    Raised when an attempt of an operation such as "create call" failed in a way that leaves open
    whether the upstream acted on it (a read timeout, a connection dropped after the request was
    written, a 5xx). Retrying could ring a customer twice, so the library stops and tells you.
    Reconcile by looking the operation up upstream (for example list recent calls and match
    ``attempt_id``). The original exception is chained as ``__cause__``.

    Attributes:
        attempt_id: The id shared by every attempt of this logical operation.
        attempts: How many attempts were made.
    """

    failure_kind = FailureKind.MAYBE_PROCESSED
    retry_after: float | None = None

    def __init__(self, attempt_id: str, *, attempts: int = 1, message: str | None = None) -> None:
        super().__init__(
            message
            or (
                f"outcome of operation {attempt_id} is unknown after {attempts} attempt(s): "
                "it may have been processed and was not retried"
            )
        )
        self.attempt_id = attempt_id
        self.attempts = attempts


class ProviderError(ResilientVoiceError):
    """The upstream answered with an error.

    Attributes:
        status: HTTP status code.
        code: The provider's own error code, if it gave one (Twilio's 20429, 21211, ...).
        message: The provider's error message.
        kind: The :class:`FailureKind` the status maps to for this host and operation.
        retry_after: Seconds the provider asked us to wait, if it said.
        backpressure: Whether the answer was a 429 (see the property).
    """

    def __init__(
        self,
        status: int,
        code: int | str | None,
        message: str,
        kind: FailureKind,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            f"HTTP {status}" + (f" (code {code})" if code is not None else "") + f": {message}"
        )
        self.status = status
        self.code = code
        self.message = message
        self.kind = kind
        self.retry_after = retry_after

    @property
    def failure_kind(self) -> FailureKind:
        return self.kind

    @property
    def backpressure(self) -> bool:
        """Whether the upstream pushed back (HTTP 429) rather than failed.

        A 429 means "too many requests from you", not "I am broken": a circuit breaker ignores
        such answers so that pacing is left to limiters and backoff instead of cutting off a
        healthy upstream. Derived from ``status``, so every provider's error states it the same
        way and nothing is set on the instance.
        """
        return self.status == 429


class InvalidRequestError(ResilientVoiceError, ValueError):
    """An argument of a client call breaks the provider's rules; nothing was sent.

    A request the provider would refuse with a 400 costs a round trip, a breaker permit and a
    token, and can hide a bug until production, so clients check what the provider documents
    first. It is also a :class:`ValueError`, the exception Python code expects for a bad
    argument. (Named so as not to shadow pydantic's ``ValidationError`` in user code.)

    Attributes:
        field: The argument at fault, by its Python name (``from_`` for Twilio's sender).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class WebhookVerificationError(ResilientVoiceError):
    """An incoming webhook's signature or credential is missing, forged or stale.

    Raised by webhook verifiers; the webhook guard answers 403 and logs ``reason``, and never
    shows it to the sender (it would tell a forger which check failed).

    Attributes:
        reason: Why the request did not verify, for the log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
