"""The retry decision: a synchronous, clock-free function from a failure to what happens next.

:func:`decide` answers ``Retry(delay)``, ``GiveUp(reason)`` or ``Unknown(reason)`` from the
attempt number, the failure's kind and ``retry_after``, whether the operation is idempotent, the
time left and the configuration; randomness comes in as a ``draw`` callable. It reads no clock,
raises nothing and keeps no state, so the rules (never re-send what may have been processed,
never wait past the deadline, honour ``Retry-After``) are property-tested without time passing.
:class:`~resilient_voice.RetryPolicy` is the async facade that measures, sleeps and reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from resilient_voice._validate import number, whole
from resilient_voice.failure import FailureKind

__all__ = [
    "Decision",
    "Failure",
    "GiveUp",
    "Jitter",
    "Retry",
    "RetryConfig",
    "Unknown",
    "backoff",
    "decide",
    "stop",
]

Jitter = Literal["full", "equal", "none"]
"""How a backoff delay is randomised; see :class:`~resilient_voice.RetryPolicy`."""

_JITTERS: frozenset[str] = frozenset({"full", "equal", "none"})


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """The validated numbers of a retry policy (built by :class:`RetryPolicy`, never by users).

    Raises:
        TypeError, ValueError: An option is out of range; the message names it.
    """

    max_attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 10.0
    jitter: Jitter = "full"
    respect_retry_after: bool = True

    def __post_init__(self) -> None:
        whole("max_attempts", self.max_attempts)
        object.__setattr__(
            self, "base_delay", number("base_delay", self.base_delay, inclusive=True)
        )
        object.__setattr__(self, "max_delay", number("max_delay", self.max_delay, inclusive=True))
        if self.base_delay > self.max_delay:
            raise ValueError(
                f"base_delay ({self.base_delay!r}) must not exceed max_delay ({self.max_delay!r})"
            )
        if self.jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of 'full', 'equal', 'none'; got {self.jitter!r}")
        if not isinstance(self.respect_retry_after, bool):
            raise TypeError(f"respect_retry_after must be a bool, got {self.respect_retry_after!r}")


@dataclass(frozen=True, slots=True)
class Failure:
    """What the decision needs to know about one failed attempt.

    Attributes:
        attempt: 1 for the first attempt, 2 for the first retry, and so on.
        kind: The failure's kind; ``MAYBE_PROCESSED`` for an unclassified failure.
        retryable: What the policy's ``retry_on`` predicate said.
        retry_after: The wait the failure asked for, in seconds, or ``None``.
        rejected: A local refusal (:class:`~resilient_voice.RejectedError`): retried only after
            a known ``retry_after``, whatever ``respect_retry_after`` says.
        maybe_processed: Whether this or an earlier attempt of the operation may have been
            processed: then a non-idempotent operation that stops ends as ``Unknown``.
    """

    attempt: int
    kind: FailureKind
    retryable: bool
    retry_after: float | None = None
    rejected: bool = False
    maybe_processed: bool = False


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay`` seconds (if the retry budget grants it)."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop and re-raise the failure; ``reason`` becomes an exception note when it is set."""

    reason: str | None


@dataclass(frozen=True, slots=True)
class Unknown:
    """Stop: a non-idempotent operation may have been processed (an unknown outcome)."""

    reason: str | None


Decision = Retry | GiveUp | Unknown


def backoff(config: RetryConfig, retry: int, draw: Callable[[], float]) -> float:
    """The backoff delay before retry number ``retry`` (1 after the first attempt).

    ``draw`` returns a float in ``[0, 1)``; it is called once for ``"full"`` and ``"equal"``
    jitter and never for ``"none"``.
    """
    # ldexp(base, n) is base * 2**n without overflow for any reasonable n.
    cap = min(config.max_delay, math.ldexp(config.base_delay, min(retry - 1, 1000)))
    if config.jitter == "full":
        return cap * draw()
    if config.jitter == "equal":
        half = cap / 2.0
        return half + half * draw()
    return cap


def stop(reason: str | None, *, idempotent: bool, maybe_processed: bool) -> GiveUp | Unknown:
    """How an operation that will not be retried ends: ``Unknown`` when it may have placed a
    non-idempotent side effect, else ``GiveUp``."""
    if not idempotent and maybe_processed:
        return Unknown(reason)
    return GiveUp(reason)


def decide(
    config: RetryConfig,
    failure: Failure,
    *,
    idempotent: bool,
    left: float | None,
    draw: Callable[[], float],
) -> Decision:
    """Decide what follows ``failure``.

    Args:
        config: The policy's numbers.
        failure: The failed attempt.
        idempotent: Whether the operation may safely run twice.
        left: Seconds until the operation's deadline, or ``None`` without one.
        draw: The jitter source, a callable returning a float in ``[0, 1)``.
    """
    number = failure.attempt
    reason: str | None = None
    if not failure.retryable:
        if number > 1:
            reason = f"{failure.kind.name} failure is not retried"
    elif number >= config.max_attempts:
        reason = "no attempt left"
    else:
        wait = failure.retry_after if failure.rejected or config.respect_retry_after else None
        if failure.rejected and wait is None:
            reason = "rejected locally with no known retry_after"
        elif wait is not None and wait > config.max_delay:
            reason = f"retry_after {wait:.3f}s exceeds max_delay {config.max_delay:.3f}s"
        elif wait is not None and left is not None and wait >= left:
            reason = f"retry_after {wait:.3f}s exceeds the {max(left, 0.0):.3f}s left"
        else:
            delay = backoff(config, number, draw)
            if wait is not None and wait > delay:
                delay = wait
            if left is None or delay < left:
                return Retry(delay)
            reason = f"next wait {delay:.3f}s exceeds the {max(left, 0.0):.3f}s left"
    return stop(reason, idempotent=idempotent, maybe_processed=failure.maybe_processed)
