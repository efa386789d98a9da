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

This module imports nothing from httpx: :func:`parse_retry_after` and
:func:`parse_retry_after_ms` are pure functions the transport applies to header values.
"""

from __future__ import annotations

import functools
import math
import random as _random_module
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar

from resilient_voice import events
from resilient_voice._callables import is_async_callable, require_async_callable
from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice.correlation import DEFAULT_CORRELATION_ID_VALIDATOR, new_attempt_id
from resilient_voice.errors import OutcomeUnknownError, RejectedError
from resilient_voice.events import RetryListener
from resilient_voice.failure import FailureKind, failure_kind_of, retry_after_of

__all__ = [
    "AttemptInfo",
    "Jitter",
    "RetryBudget",
    "RetryBudgetStatistics",
    "RetryPolicy",
    "current_attempt",
    "default_retry_on",
    "parse_retry_after",
    "parse_retry_after_ms",
]

P = ParamSpec("P")
T = TypeVar("T")

Jitter = Literal["full", "equal", "none"]
"""How a backoff delay is randomised; see :class:`RetryPolicy`."""

RetryOn = Callable[[Exception, FailureKind, bool], bool]

_JITTERS: frozenset[str] = frozenset({"full", "equal", "none"})
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


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot of a :class:`RetryBudget` over its current window.

    Attributes:
        requests: Operations started (deposits) in the window.
        retries: Retries granted (withdrawals) in the window.
        available: Retries that would be granted now.
    """

    requests: int
    retries: int
    available: int


class RetryBudget:
    """Caps retries across calls so that an outage cannot multiply the load on an upstream.

    The Finagle/Envoy idea: every operation deposits into the budget, every retry withdraws, and
    retries are granted while, over the last ``window`` seconds,
    ``retries < ratio * operations + min_retries_per_second * window``. With the defaults, retries
    add at most 20 % to the traffic once it exceeds 50 operations per second, instead of
    multiplying it by ``max_attempts``; the floor keeps retries possible for quiet clients.

    Share one budget between every policy that calls the same upstream. The budget keeps plain
    counters: share it within one event loop (one thread).

    Args:
        ratio: Retries allowed per operation, ``>= 0``.
        min_retries_per_second: The floor of retries always allowed, ``>= 0``.
        window: The sliding window in seconds, ``> 0``; counted in ten slots.
        clock: The monotonic clock; the system clock by default.

    Raises:
        ValueError: A parameter is negative, not finite, or ``window <= 0``.
    """

    __slots__ = (
        "_clock",
        "_deposits",
        "_floor",
        "_index",
        "_ratio",
        "_requests",
        "_retries",
        "_slot_width",
        "_window",
        "_withdrawals",
    )

    _SLOTS = 10

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_second: float = 10,
        *,
        window: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        _check_number("ratio", ratio, minimum=0.0)
        _check_number("min_retries_per_second", min_retries_per_second, minimum=0.0)
        _check_number("window", window, minimum=0.0)
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        self._clock = _check_clock(clock)
        self._ratio = float(ratio)
        self._window = float(window)
        self._floor = float(min_retries_per_second) * self._window
        self._slot_width = self._window / self._SLOTS
        self._deposits = [0] * self._SLOTS
        self._withdrawals = [0] * self._SLOTS
        self._requests = 0
        self._retries = 0
        self._index = math.floor(self._clock.now() / self._slot_width)

    def _roll(self) -> int:
        index = math.floor(self._clock.now() / self._slot_width)
        passed = index - self._index
        if passed > 0:
            deposits, withdrawals = self._deposits, self._withdrawals
            for step in range(1, min(passed, self._SLOTS) + 1):
                slot = (self._index + step) % self._SLOTS
                self._requests -= deposits[slot]
                self._retries -= withdrawals[slot]
                deposits[slot] = withdrawals[slot] = 0
            self._index = index
        return index % self._SLOTS

    def _available(self) -> int:
        return math.floor(self._floor + self._ratio * self._requests - self._retries)

    def deposit(self) -> None:
        """Record that an operation started (its first attempt)."""
        self._deposits[self._roll()] += 1
        self._requests += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; ``False`` when it is exhausted."""
        slot = self._roll()
        if self._available() < 1:
            return False
        self._withdrawals[slot] += 1
        self._retries += 1
        return True

    def statistics(self) -> RetryBudgetStatistics:
        """Return the counts over the current window."""
        self._roll()
        return RetryBudgetStatistics(self._requests, self._retries, max(0, self._available()))

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self._ratio!r}, "
            f"min_retries_per_second={self._floor / self._window!r}, window={self._window!r})"
        )


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
        name: A short label for listeners and exception notes.
        listeners: :class:`~resilient_voice.events.RetryListener` instances.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``max_attempts < 1``, a negative or non-finite delay,
            ``base_delay > max_delay``, ``total_timeout <= 0``, an unknown ``jitter``, or an
            empty ``name``.
    """

    __slots__ = (
        "__weakref__",
        "_base_delay",
        "_budget",
        "_clock",
        "_jitter",
        "_listeners",
        "_max_attempts",
        "_max_delay",
        "_name",
        "_random",
        "_respect_retry_after",
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
        listeners: Iterable[RetryListener] = (),
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError(f"max_attempts must be an int, got {max_attempts!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        _check_number("base_delay", base_delay, minimum=0.0)
        _check_number("max_delay", max_delay, minimum=0.0)
        if base_delay > max_delay:
            raise ValueError(
                f"base_delay ({base_delay!r}) must not exceed max_delay ({max_delay!r})"
            )
        if jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of 'full', 'equal', 'none'; got {jitter!r}")
        if total_timeout is not None:
            _check_number("total_timeout", total_timeout, minimum=0.0)
            if total_timeout <= 0:
                raise ValueError(f"total_timeout must be > 0, got {total_timeout!r}")
        if retry_on is not None and not callable(retry_on):
            raise TypeError(f"retry_on must be callable, got {retry_on!r}")
        if not isinstance(respect_retry_after, bool):
            raise TypeError(f"respect_retry_after must be a bool, got {respect_retry_after!r}")
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a RetryBudget, got {budget!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if random is None:
            draw: Callable[[], float] = _random_module.random
        elif callable(getattr(random, "random", None)):
            draw = random.random  # type: ignore[union-attr]
        elif callable(random):
            draw = random
        else:
            raise TypeError(f"random must be a random.Random or a callable, got {random!r}")
        self._max_attempts = max_attempts
        self._base_delay = float(base_delay)
        self._max_delay = float(max_delay)
        self._jitter = jitter
        self._total_timeout = None if total_timeout is None else float(total_timeout)
        self._retry_on = retry_on
        self._respect_retry_after = respect_retry_after
        self._budget = budget
        self._clock = _check_clock(clock)
        self._random = draw
        self._name = name
        self._listeners: tuple[RetryListener, ...] = ()
        for listener in listeners:
            self.add_listener(listener)

    @property
    def name(self) -> str:
        """The label used in listener events and exception notes."""
        return self._name

    @property
    def max_attempts(self) -> int:
        """Attempts in total, including the first."""
        return self._max_attempts

    @property
    def total_timeout(self) -> float | None:
        """Seconds for the whole operation, or ``None``."""
        return self._total_timeout

    @property
    def clock(self) -> Clock:
        """The clock this policy measures and sleeps on."""
        return self._clock

    def _adopt_clock(self, clock: Clock) -> None:
        """Use ``clock`` when this policy was built without one (see :class:`Policy`)."""
        if self._clock is SYSTEM_CLOCK:
            self._clock = clock

    def add_listener(self, listener: RetryListener) -> None:
        """Attach a :class:`~resilient_voice.events.RetryListener`."""
        if not isinstance(listener, RetryListener):
            raise TypeError(f"listener must be a RetryListener, got {listener!r}")
        self._listeners = (*self._listeners, listener)

    def backoff(self, retry: int) -> float:
        """Draw the backoff delay before retry number ``retry`` (1 after the first attempt)."""
        # ldexp(base, n) is base * 2**n without overflow for any reasonable n.
        cap = min(self._max_delay, math.ldexp(self._base_delay, min(retry - 1, 1000)))
        if self._jitter == "full":
            return cap * self._random()
        if self._jitter == "equal":
            half = cap / 2.0
            return half + half * self._random()
        return cap

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
        stop = deadline
        if self._total_timeout is not None:
            limit = clock.now() + self._total_timeout
            stop = limit if stop is None or limit < stop else stop
        if self._budget is not None:
            self._budget.deposit()
        maybe_processed = False
        last: Exception | None = None
        number = 0
        while True:
            number += 1
            if stop is not None and clock.now() >= stop:
                self._expired(attempt_id, number - 1, idempotent, maybe_processed, last)
            if self._listeners:
                events.emit(self._listeners, "on_attempt", self._name, number, attempt_id)
            token = _CURRENT_ATTEMPT.set(AttemptInfo(attempt_id, number))
            delay: float | None = None
            try:
                if stop is None:
                    return await attempt()
                with clock.deadline_scope(stop):
                    return await attempt()
            except Exception as error:
                kind = failure_kind_of(error)
                effective = _MAYBE if kind is None else kind
                maybe_processed = maybe_processed or effective is _MAYBE
                delay = self._decide(
                    error, kind, effective, number, attempt_id, idempotent, maybe_processed, stop
                )
                if delay is None:
                    raise
                last = error
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
                )
            await clock.sleep(delay)

    def _decide(
        self,
        error: Exception,
        kind: FailureKind | None,
        effective: FailureKind,
        number: int,
        attempt_id: str,
        idempotent: bool,
        maybe_processed: bool,
        stop: float | None,
    ) -> float | None:
        """Return the delay before the next attempt, or ``None`` to re-raise ``error``.

        Raises :class:`OutcomeUnknownError` itself when that is the outcome.
        """
        if self._retry_on is None:
            retry = default_retry_on(error, effective, idempotent)
        else:
            retry = bool(self._retry_on(error, effective, idempotent))
        reason: str | None = None
        delay = 0.0
        if not retry:
            if number > 1:
                reason = f"{effective.name} failure is not retried"
        elif number >= self._max_attempts:
            reason = "no attempt left"
        else:
            wait: float | None = None
            if isinstance(error, RejectedError):
                wait = retry_after_of(error)
                if wait is None:
                    reason = "rejected locally with no known retry_after"
            elif self._respect_retry_after:
                wait = retry_after_of(error)
            left = None if stop is None else stop - self._clock.now()
            if reason is not None:
                pass
            elif wait is not None and wait > self._max_delay:
                reason = f"retry_after {wait:.3f}s exceeds max_delay {self._max_delay:.3f}s"
            elif wait is not None and left is not None and wait >= left:
                reason = f"retry_after {wait:.3f}s exceeds the {max(left, 0.0):.3f}s left"
            else:
                delay = self.backoff(number)
                if wait is not None and wait > delay:
                    delay = wait
                if left is not None and delay >= left:
                    reason = f"next wait {delay:.3f}s exceeds the {max(left, 0.0):.3f}s left"
                elif self._budget is not None and not self._budget.try_withdraw():
                    reason = "retry budget exhausted"
                else:
                    if self._listeners:
                        events.emit(
                            self._listeners, "on_retry", self._name, number, delay, effective, error
                        )
                    return delay
        if not idempotent and maybe_processed:
            if self._listeners:
                events.emit(self._listeners, "on_outcome_unknown", self._name, attempt_id, error)
            raise OutcomeUnknownError(attempt_id, attempts=number) from error
        if self._listeners:
            events.emit(self._listeners, "on_give_up", self._name, number, kind, error)
        if reason is not None:
            error.add_note(
                f"resilient_voice: retry policy {self._name!r} gave up after {number} "
                f"attempt(s) of operation {attempt_id}: {reason}"
            )
        return None

    def _expired(
        self,
        attempt_id: str,
        attempts: int,
        idempotent: bool,
        maybe_processed: bool,
        last: Exception | None,
    ) -> NoReturn:
        """Give up because the deadline passed; ``last`` is the failure before the wait."""
        if last is not None:
            error: Exception = last
        else:
            error = TimeoutError(
                f"retry policy {self._name!r}: operation {attempt_id} ran out of time "
                f"after {attempts} attempt(s)"
            )
            if not maybe_processed:
                error.failure_kind = FailureKind.NOT_SENT  # type: ignore[attr-defined]
        if not idempotent and maybe_processed:
            if self._listeners:
                events.emit(self._listeners, "on_outcome_unknown", self._name, attempt_id, error)
            raise OutcomeUnknownError(attempt_id, attempts=attempts) from error
        if self._listeners:
            kind = None if last is None else failure_kind_of(last)
            events.emit(self._listeners, "on_give_up", self._name, attempts, kind, error)
        if last is not None:
            last.add_note(
                f"resilient_voice: retry policy {self._name!r} gave up after {attempts} "
                f"attempt(s) of operation {attempt_id}: out of time"
            )
        raise error

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(name={self._name!r}, max_attempts={self._max_attempts}, "
            f"base_delay={self._base_delay!r}, max_delay={self._max_delay!r}, "
            f"jitter={self._jitter!r}, total_timeout={self._total_timeout!r})"
        )


def parse_retry_after(value: str | None, *, now_wall: float | None = None) -> float | None:
    """Parse an HTTP ``Retry-After`` header value into seconds from now.

    Accepts delay-seconds (``"120"``; a decimal such as ``"1.5"`` is tolerated) and an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``; a date in the past gives ``0.0``). Anything else, an
    over-long value, non-ASCII text, a negative or non-finite number, gives ``None``: a garbled
    header must never make the client wait forever or crash.

    Args:
        value: The header value; ``None`` (header absent) gives ``None``.
        now_wall: The current wall-clock time (``time.time()``) for HTTP-dates; read when
            omitted. HTTP-dates are the one place wall time is needed.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > 64 or not value.isascii():
        return None
    seconds = _parse_decimal(value)
    if seconds is not None:
        return seconds
    # Imported here: email.utils is slow to import and HTTP-dates are rare.
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=UTC)
    try:
        target = when.timestamp()
    except (OverflowError, OSError, ValueError):  # pragma: no cover  (platform limits)
        return None
    now = time.time() if now_wall is None else now_wall
    return max(0.0, target - now)


def parse_retry_after_ms(value: str | None) -> float | None:
    """Parse a ``retry-after-ms`` header value (milliseconds, as Vapi's SDK reads it) to seconds.

    Returns ``None`` for anything but a non-negative decimal number.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > 64 or not value.isascii():
        return None
    millis = _parse_decimal(value)
    return None if millis is None else millis / 1000.0


def _parse_decimal(value: str) -> float | None:
    # float() alone would accept "nan", "inf", "1e400", "1_000" and signs.
    whole, dot, fraction = value.partition(".")
    if not whole.isdigit() or (dot and not fraction.isdigit()):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _check_number(name: str, value: object, *, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


def _check_clock(clock: Clock | None) -> Clock:
    if clock is None:
        return SYSTEM_CLOCK
    if not isinstance(clock, Clock):
        raise TypeError(f"clock must implement resilient_voice Clock, got {clock!r}")
    return clock
