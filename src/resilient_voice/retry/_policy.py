"""Retries that never place a call twice.

A :class:`RetryPolicy` decides from the :class:`~resilient_voice.FailureKind` of a failure, never
from its exception type, whether trying again is safe:

=====================  ==================  =====================================================
kind                   idempotent          non-idempotent (the default)
=====================  ==================  =====================================================
``NOT_SENT``           retried             retried
``UNPROCESSED``        retried             retried
``MAYBE_PROCESSED``    retried             :class:`~resilient_voice.OutcomeUnknownError`
``PERMANENT``          raised              raised
unclassified           as MAYBE_PROCESSED  as MAYBE_PROCESSED
=====================  ==================  =====================================================

Local rejections (:class:`~resilient_voice.RejectedError`) are retried only when their
``retry_after`` fits in ``max_delay`` and in the time left. Waits grow exponentially with jitter,
honour the upstream's ``Retry-After``, never overrun ``total_timeout`` or ``deadline``, and can be
capped across calls by a shared :class:`RetryBudget`. When the policy gives up, the caller gets
the real last exception, with the attempt count and attempt id added as exception notes.

The decision itself is :func:`~resilient_voice.retry._decision.decide`, pure and clock-free; this
module is the async facade that measures time, sleeps, keeps the attempt context and reports.

Over 400 lines: only by its documentation; the public entry points (decorator, ``wrap``,
``call``, ``run``) each state their contract.
"""

from __future__ import annotations

import functools
import random as _random_module
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar

from resilient_voice._callables import is_async_callable, require_async_callable
from resilient_voice._clock import Clock
from resilient_voice._validate import clock as check_clock
from resilient_voice._validate import label, optional_number
from resilient_voice.correlation import DEFAULT_CORRELATION_ID_VALIDATOR, new_attempt_id
from resilient_voice.errors import OutcomeUnknownError, RejectedError
from resilient_voice.events import (
    Listener,
    RetryAttemptStarted,
    RetryGaveUp,
    RetryOutcomeUnknown,
    RetryScheduled,
    check_listener,
    check_listeners,
    dispatch,
)
from resilient_voice.failure import (
    Classify,
    FailureKind,
    OutOfTimeError,
    failure_kind_of,
    retry_after_of,
)
from resilient_voice.retry._budget import RetryBudget
from resilient_voice.retry._decision import (
    Failure,
    GiveUp,
    Jitter,
    Retry,
    RetryConfig,
    Unknown,
    backoff,
    decide,
    stop,
)

__all__ = ["AttemptInfo", "RetryPolicy", "current_attempt", "default_retry_on"]

P = ParamSpec("P")
T = TypeVar("T")

RetryOn = Callable[[Exception, FailureKind, bool], bool]

_MAYBE = FailureKind.MAYBE_PROCESSED
_PERMANENT = FailureKind.PERMANENT


@dataclass(frozen=True, slots=True)
class AttemptInfo:
    """The attempt that the current task is running inside :meth:`RetryPolicy.run`.

    Attributes:
        attempt_id: The id shared by every attempt of this logical operation.
        number: 1 for the first attempt, 2 for the first retry, and so on.
    """

    attempt_id: str
    number: int


_CURRENT_ATTEMPT: ContextVar[AttemptInfo | None] = ContextVar(
    "resilient_voice.current_attempt", default=None
)


def current_attempt() -> AttemptInfo | None:
    """Return the attempt being run by the innermost :meth:`RetryPolicy.run`, or ``None``.

    An application can put it into a request (a Twilio ``StatusCallback`` URL, say) to
    reconcile an operation whose outcome is unknown. (The httpx transport takes the id the other
    way round: from ``request.extensions``, set by the typed clients.)
    """
    return _CURRENT_ATTEMPT.get()


def default_retry_on(error: Exception, kind: FailureKind, idempotent: bool) -> bool:
    """The rule used when ``retry_on`` is ``None``; call it from a predicate that narrows it.

    ``NOT_SENT`` and ``UNPROCESSED`` are retried, ``MAYBE_PROCESSED`` only for idempotent
    operations, ``PERMANENT`` never. ``kind`` is already ``MAYBE_PROCESSED`` for an unclassified
    exception.
    """
    if kind is _MAYBE:
        return idempotent
    return kind is not _PERMANENT


class RetryPolicy:
    """Retry an async operation when, and only when, trying again cannot duplicate it.

    Build one per upstream at startup and reuse it; it holds no per-call state. Use it as a
    decorator (``@policy``: the function is treated as non-idempotent), through
    :meth:`call` or :meth:`wrap`, or through :meth:`run`, the engine under them, which the
    :class:`~resilient_voice.Policy` and the httpx transport use.

    The delay before retry ``n`` (``n = 1`` after the first attempt) is drawn from
    ``cap = min(max_delay, base_delay * 2 ** (n - 1))``:

    - ``"full"`` (default, AWS "full jitter"): uniform in ``[0, cap]``;
    - ``"equal"``: ``cap / 2`` plus uniform in ``[0, cap / 2]``;
    - ``"none"``: exactly ``cap`` (deterministic; for tests and single clients only).

    Args:
        max_attempts: Attempts in total, including the first; ``1`` disables retries.
        base_delay: The backoff cap before the first retry, in seconds.
        max_delay: The largest wait between attempts; a ``Retry-After`` above it gives up at
            once.
        jitter: ``"full"``, ``"equal"`` or ``"none"``.
        total_timeout: Seconds for the whole operation (attempts and waits), or ``None``. An
            attempt still running at the end is cancelled.
        retry_on: ``(error, kind, idempotent) -> bool`` replacing :func:`default_retry_on`. Use
            it to narrow the default. Widening it to retry ``MAYBE_PROCESSED`` failures of
            non-idempotent operations places duplicate calls.
        respect_retry_after: Wait at least the ``retry_after`` that a failure carries, and give
            up at once when it is longer than ``max_delay`` or the time left.
        budget: A :class:`RetryBudget` shared across calls, or ``None``.
        clock: The clock that measures and sleeps; the system clock by default.
        random: The jitter source: a ``random.Random``-like object or a callable returning a
            float in ``[0, 1)``; the ``random`` module by default.
        name: A short label for events and exception notes.
        listeners: Callables taking an event record (:class:`~resilient_voice.events.Event`);
            the retry records are ``RetryAttemptStarted``, ``RetryScheduled``, ``RetryGaveUp``
            and ``RetryOutcomeUnknown``.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``max_attempts < 1``, a negative or non-finite delay,
            ``base_delay > max_delay``, ``total_timeout <= 0``, an unknown ``jitter``, or an
            empty ``name``.
    """

    __slots__ = (
        "__weakref__",
        "_budget",
        "_clock",
        "_config",
        "_listeners",
        "_name",
        "_random",
        "_retry_on",
        "_total_timeout",
    )

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        jitter: Jitter = "full",
        total_timeout: float | None = None,
        retry_on: RetryOn | None = None,
        respect_retry_after: bool = True,
        budget: RetryBudget | None = None,
        clock: Clock | None = None,
        random: _random_module.Random | Callable[[], float] | None = None,
        name: str = "retry",
        listeners: Iterable[Listener] = (),
    ) -> None:
        self._config = RetryConfig(max_attempts, base_delay, max_delay, jitter, respect_retry_after)
        self._total_timeout = optional_number("total_timeout", total_timeout)
        if retry_on is not None and not callable(retry_on):
            raise TypeError(f"retry_on must be callable, got {retry_on!r}")
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a RetryBudget, got {budget!r}")
        label("name", name)
        if random is None:
            draw: Callable[[], float] = _random_module.random
        elif callable(getattr(random, "random", None)):
            draw = random.random  # type: ignore[union-attr]
        elif callable(random):
            draw = random
        else:
            raise TypeError(f"random must be a random.Random or a callable, got {random!r}")
        self._retry_on = retry_on
        self._budget = budget
        self._clock = check_clock(clock)
        self._random = draw
        self._name = name
        self._listeners: tuple[Listener, ...] = check_listeners(listeners)

    @property
    def name(self) -> str:
        """The label used in events and exception notes."""
        return self._name

    @property
    def max_attempts(self) -> int:
        """Attempts in total, including the first."""
        return self._config.max_attempts

    @property
    def max_delay(self) -> float:
        """The largest wait between attempts (a :class:`~resilient_voice.Policy` also caps a
        provider's pushback pause of its limiter by it)."""
        return self._config.max_delay

    @property
    def total_timeout(self) -> float | None:
        """Seconds for the whole operation, or ``None``."""
        return self._total_timeout

    @property
    def clock(self) -> Clock:
        """The clock this policy measures and sleeps on, fixed at construction."""
        return self._clock

    @property
    def budget(self) -> RetryBudget | None:
        """The shared retry budget, or ``None``."""
        return self._budget

    def add_listener(self, listener: Listener) -> None:
        """Attach a callable taking an event record.

        Raises:
            TypeError: ``listener`` is not callable.
        """
        self._listeners = (*self._listeners, check_listener(listener))

    def backoff(self, retry: int) -> float:
        """Draw the backoff delay before retry number ``retry`` (1 after the first attempt)."""
        return backoff(self._config, retry, self._random)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function; each call is run as a non-idempotent operation."""
        return self.wrap(fn)

    def wrap(
        self, fn: Callable[P, Awaitable[T]], *, idempotent: bool = False
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Return ``fn`` wrapped so that every call runs under this policy.

        Args:
            fn: An async function (or a callable returning an awaitable).
            idempotent: True only when running ``fn`` twice has the effect of running it once.

        Raises:
            TypeError: ``fn`` is not an async function (checked here, once).
        """
        require_async_callable(fn, "RetryPolicy.wrap()")
        if not isinstance(idempotent, bool):
            raise TypeError(f"idempotent must be a bool, got {idempotent!r}")

        @functools.wraps(fn)
        async def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.run(functools.partial(fn, *args, **kwargs), idempotent=idempotent)

        return retrying

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` under this policy as a non-idempotent operation.

        For an idempotent operation use ``await policy.run(partial(fn, ...), idempotent=True)``
        or :meth:`wrap` with ``idempotent=True``.

        Raises:
            TypeError: ``fn`` is not an async function; it was not called.
        """
        if not is_async_callable(fn):
            require_async_callable(fn, "RetryPolicy.call()")
        return await self.run(functools.partial(fn, *args, **kwargs), idempotent=False)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        idempotent: bool,
        attempt_id: str | None = None,
        deadline: float | None = None,
        in_flight: Callable[[], bool] | None = None,
        classify: Classify | None = None,
    ) -> T:
        """Call ``attempt()`` until it succeeds or retrying is unsafe, useless or out of time.

        ``attempt`` is called once per attempt; inside it :func:`current_attempt` returns the
        attempt id and number. Cancellation is never retried: it propagates at once, from an
        attempt or from a wait.

        Args:
            attempt: A zero-argument callable returning an awaitable.
            idempotent: Whether the operation may safely run twice (see the module table).
            attempt_id: The id shared by every attempt of this operation, for reconciliation;
                generated when omitted.
            deadline: An absolute time on this policy's clock by which the operation must end;
                the earlier of it and ``total_timeout`` applies.
            in_flight: For compositions that wait inside an attempt (for a token, a slot):
                says whether an attempt cut by the deadline had sent its request. Without it a
                cut attempt is assumed to have been sent.
            classify: The caller's explicit classification of exceptions it knows but does
                not own (the transport's table for httpx errors), asked before an
                exception's own ``failure_kind``; see :func:`~resilient_voice.failure_kind_of`.

        Returns:
            What the successful attempt returned.

        Raises:
            OutcomeUnknownError: A non-idempotent operation failed in a way that may have been
                processed (``MAYBE_PROCESSED`` or unclassified); the failure is its ``__cause__``.
            TimeoutError: The time ran out before or during an attempt of an idempotent
                operation (or before anything was sent).
            Exception: The last attempt's own exception, when retrying is not allowed or no
                attempt is left; notes give the attempt count, attempt id and reason.
        """
        if attempt_id is None:
            attempt_id = new_attempt_id()
        elif not DEFAULT_CORRELATION_ID_VALIDATOR.is_valid(attempt_id):
            raise ValueError("attempt_id must be 1..128 characters of [A-Za-z0-9._:-]")
        clock = self._clock
        stop_at = deadline
        if self._total_timeout is not None:
            limit = clock.now() + self._total_timeout
            stop_at = limit if stop_at is None or limit < stop_at else stop_at
        if self._budget is not None:
            self._budget.deposit()
        maybe_processed = False
        last: Exception | None = None
        last_kind: FailureKind | None = None
        number = 0
        while True:
            number += 1
            if stop_at is not None and clock.now() >= stop_at:
                self._expired(attempt_id, number - 1, idempotent, maybe_processed, last, last_kind)
            if self._listeners:
                dispatch(self._listeners, RetryAttemptStarted(self._name, number, attempt_id))
            token = _CURRENT_ATTEMPT.set(AttemptInfo(attempt_id, number))
            delay: float | None = None
            try:
                if stop_at is None:
                    return await attempt()
                with clock.deadline_scope(stop_at):
                    return await attempt()
            except Exception as error:
                kind = failure_kind_of(error, classify)
                effective = _MAYBE if kind is None else kind
                maybe_processed = maybe_processed or effective is _MAYBE
                delay = self._judge(
                    error, kind, effective, number, attempt_id, idempotent, maybe_processed, stop_at
                )
                if delay is None:
                    raise
                last = error
                last_kind = kind
            finally:
                _CURRENT_ATTEMPT.reset(token)
            if delay is None:
                # The deadline scope cancelled the attempt while it was running: unless the
                # caller knows it was still waiting, it may have been sent, so for a
                # non-idempotent operation the outcome is unknown.
                self._expired(
                    attempt_id,
                    number,
                    idempotent,
                    maybe_processed or in_flight is None or in_flight(),
                    None,
                    None,
                )
            await clock.sleep(delay)

    def _judge(
        self,
        error: Exception,
        kind: FailureKind | None,
        effective: FailureKind,
        number: int,
        attempt_id: str,
        idempotent: bool,
        maybe_processed: bool,
        stop_at: float | None,
    ) -> float | None:
        """Apply :func:`decide` to ``error``: the delay before the next attempt, or ``None`` to
        re-raise ``error``; raises :class:`OutcomeUnknownError` itself when that is the outcome.
        """
        if self._retry_on is None:
            retryable = default_retry_on(error, effective, idempotent)
        else:
            retryable = bool(self._retry_on(error, effective, idempotent))
        failure = Failure(
            number,
            effective,
            retryable,
            retry_after_of(error),
            isinstance(error, RejectedError),
            maybe_processed,
        )
        left = None if stop_at is None else stop_at - self._clock.now()
        decision = decide(
            self._config, failure, idempotent=idempotent, left=left, draw=self._random
        )
        if isinstance(decision, Retry):
            if self._budget is None or self._budget.try_withdraw():
                if self._listeners:
                    dispatch(
                        self._listeners,
                        RetryScheduled(self._name, number, decision.delay, effective, error),
                    )
                return decision.delay
            decision = stop(
                "retry budget exhausted", idempotent=idempotent, maybe_processed=maybe_processed
            )
        self._end(decision, attempt_id, number, kind, error, noted=error)
        return None

    def _end(
        self,
        decision: GiveUp | Unknown,
        attempt_id: str,
        attempts: int,
        kind: FailureKind | None,
        error: Exception,
        *,
        noted: Exception | None,
    ) -> None:
        """Report how the operation ended; raise :class:`OutcomeUnknownError` for ``Unknown``.

        ``noted`` gets the reason as an exception note (``None`` for our own timeout error).
        """
        if isinstance(decision, Unknown):
            if self._listeners:
                dispatch(self._listeners, RetryOutcomeUnknown(self._name, attempt_id, error))
            raise OutcomeUnknownError(attempt_id, attempts=attempts) from error
        if self._listeners:
            dispatch(self._listeners, RetryGaveUp(self._name, attempts, kind, error))
        if decision.reason is not None and noted is not None:
            noted.add_note(
                f"resilient_voice: retry policy {self._name!r} gave up after {attempts} "
                f"attempt(s) of operation {attempt_id}: {decision.reason}"
            )

    def _expired(
        self,
        attempt_id: str,
        attempts: int,
        idempotent: bool,
        maybe_processed: bool,
        last: Exception | None,
        last_kind: FailureKind | None,
    ) -> NoReturn:
        """Give up because the deadline passed; ``last`` is the failure before the wait."""
        error: Exception
        if last is not None:
            error = last
        else:
            message = (
                f"retry policy {self._name!r}: operation {attempt_id} ran out of time "
                f"after {attempts} attempt(s)"
            )
            error = TimeoutError(message) if maybe_processed else OutOfTimeError(message)
        decision = stop("out of time", idempotent=idempotent, maybe_processed=maybe_processed)
        self._end(decision, attempt_id, attempts, last_kind, error, noted=last)
        raise error

    def __repr__(self) -> str:
        config = self._config
        return (
            f"RetryPolicy(name={self._name!r}, max_attempts={config.max_attempts}, "
            f"base_delay={config.base_delay!r}, max_delay={config.max_delay!r}, "
            f"jitter={config.jitter!r}, total_timeout={self._total_timeout!r})"
        )
