"""Policy: the one documented way to compose the primitives around a call.

Order, outermost first (see docs/policy.md for the reasons)::

    total timeout > retry > breaker > limiter > bulkhead > per-attempt timeout > the call

- The total timeout bounds everything, sleeps between attempts included.
- Each retry attempt takes a breaker permit first, so an open breaker rejects before a token is
  spent: a token stands for a request the upstream will count, and a rejected attempt sends none.
- Then the attempt pays a token: the upstream counts every attempt, retries included, so pacing
  must too.
- The bulkhead (a concurrency cap) sits inside the limiter so that waiting for a slot never holds a
  token's time window hostage, and the breaker's timer starts only after both waits: the breaker
  judges the upstream, not our own queues.
- The per-attempt timeout is innermost, around the call alone.

Over 400 lines: the composition is one piece (the order above, the checks that every part shares
one clock, and the rules for what was and was not sent are read together), and splitting it would
scatter one contract over files.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, ParamSpec, TypeVar

import anyio

from resilient_voice._callables import is_async_callable, require_async_callable
from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice._loops import current_task_id
from resilient_voice._validate import clock as check_clock
from resilient_voice._validate import optional_number
from resilient_voice.breaker import BreakerPermit, CircuitBreaker
from resilient_voice.correlation import new_attempt_id
from resilient_voice.errors import OutcomeUnknownError, ProviderError, RejectedError
from resilient_voice.failure import (
    Classify,
    NotAwaitableError,
    NotSentError,
    OutOfTimeError,
    failure_kind_of,
)
from resilient_voice.limiter import KeyedLimiter, TokenBucket
from resilient_voice.retry import RetryPolicy

__all__ = ["Policy"]

#: The longest pushback pause (seconds) a provider's ``Retry-After`` may impose on a policy's
#: limiter when the policy has no retry policy (with one, its ``max_delay`` is the cap): a
#: hostile or garbled header must not stop a whole fleet for hours.
MAX_PUSHBACK = 60.0

P = ParamSpec("P")
T = TypeVar("T")

KeyFunction = Callable[..., Hashable]


class Policy:
    """Compose a breaker, a limiter, retries, timeouts and a bulkhead around async calls.

    Build one per upstream operation at startup and share it; every part is optional::

        twilio_calls = Policy(
            breaker=CircuitBreaker("twilio"),
            limiter=TokenBucket(rate=1.0),          # the account's calls per second
            retry=RetryPolicy(max_attempts=3),
            timeout=10.0,                           # per attempt
            total_timeout=30.0,                     # whole operation, sleeps included
        )

        @twilio_calls
        async def place_call(to: str) -> str: ...

    Args:
        breaker: Circuit breaker consulted before every attempt.
        limiter: A :class:`TokenBucket`, or a :class:`KeyedLimiter` together with ``key``.
        key: For a keyed limiter: a function of the call's arguments returning the bucket key
            (for example the sender number). Without it, every :meth:`run` must pass ``key=``
            (the httpx transport takes it from the request's extensions).
        retry: Retry policy; without one the operation is attempted once.
        timeout: Seconds allowed for each attempt (the call only, not the waits before it).
        total_timeout: Seconds allowed for the whole operation; when the retry policy sets one
            too, the smaller wins.
        max_concurrency: Cap on attempts in flight at once (a bulkhead).
        idempotent: Whether the wrapped operation may safely run twice. Decides whether a
            failure that may have been processed is retried or raised as
            :class:`OutcomeUnknownError`.
        clock: Clock on which timeouts are measured. Every part must have been built with
            this same clock (it is never swapped); without it, the parts' common clock is
            used, or the system clock.

    Raises:
        TypeError, ValueError: Invalid configuration, at construction; ``ValueError`` also
            when the parts' clocks disagree with each other or with ``clock``.
    """

    __slots__ = (
        "_breaker",
        "_bulkhead",
        "_clock",
        "_idempotent",
        "_key",
        "_keyed",
        "_limiter",
        "_retry",
        "_slot_holders",
        "_timeout",
        "_total_timeout",
    )

    def __init__(
        self,
        *,
        breaker: CircuitBreaker | None = None,
        limiter: TokenBucket | KeyedLimiter | None = None,
        key: KeyFunction | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        total_timeout: float | None = None,
        max_concurrency: int | None = None,
        idempotent: bool = False,
        clock: Clock | None = None,
    ) -> None:
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        if limiter is not None and not isinstance(limiter, TokenBucket | KeyedLimiter):
            raise TypeError(
                f"limiter must be a TokenBucket or KeyedLimiter, got {type(limiter).__name__}"
            )
        if key is not None and not isinstance(limiter, KeyedLimiter):
            raise ValueError("key= only applies to a KeyedLimiter")
        if key is not None and not callable(key):
            raise TypeError("key must be callable")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        if not isinstance(idempotent, bool):
            raise TypeError("idempotent must be a bool")
        if clock is not None:
            check_clock(clock)
        self._breaker = breaker
        self._limiter = limiter
        self._keyed = isinstance(limiter, KeyedLimiter)
        self._key = key
        self._retry = retry
        self._timeout = optional_number("timeout", timeout)
        self._total_timeout = optional_number("total_timeout", total_timeout)
        self._bulkhead = (
            anyio.CapacityLimiter(max_concurrency) if max_concurrency is not None else None
        )
        # Tasks holding a bulkhead slot, so that a re-entrant call is refused instead of waiting
        # on itself (anyio refuses it too, but only after a token was paid).
        self._slot_holders: set[int] = set()
        self._idempotent = idempotent
        self._clock: Clock = _resolve_clock(clock, breaker=breaker, limiter=limiter, retry=retry)

    @property
    def breaker(self) -> CircuitBreaker | None:
        return self._breaker

    @property
    def limiter(self) -> TokenBucket | KeyedLimiter | None:
        return self._limiter

    @property
    def retry(self) -> RetryPolicy | None:
        return self._retry

    @property
    def idempotent(self) -> bool:
        return self._idempotent

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def timeout(self) -> float | None:
        """Seconds allowed for each attempt (the transport bounds body reads by it too)."""
        return self._timeout

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Decorate an async function so every call goes through this policy.

        Raises:
            TypeError: ``fn`` is not an async function (checked here, once).
        """
        require_async_callable(fn, "the Policy decorator")

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self._call(fn, args, kwargs)

        return wrapper

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` under this policy.

        Raises:
            TypeError: ``fn`` is not an async function; it was not called and nothing counts.
        """
        if not is_async_callable(fn):
            require_async_callable(fn, "Policy.call()")
        return await self._call(fn, args, kwargs)

    async def _call(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        key = self._key(*args, **kwargs) if self._key is not None else None

        async def attempt() -> T:
            return await fn(*args, **kwargs)

        return await self.run(attempt, key=key)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        idempotent: bool | None = None,
        attempt_id: str | None = None,
        key: Hashable | None = None,
        deadline: float | None = None,
        priority: int = 0,
        classify: Classify | None = None,
    ) -> T:
        """Run a zero-argument async callable under this policy; the engine behind ``call``.

        Args:
            attempt: Called once per attempt; must return an awaitable (an async function, or
                a lambda returning a coroutine).
            idempotent: Overrides the policy's ``idempotent`` for this operation (the httpx
                transport decides it per request).
            attempt_id: The id shared by every attempt of this operation; generated if omitted.
            key: The keyed limiter's bucket key.
            deadline: An absolute time on the policy's clock by which the operation must end;
                combined with ``total_timeout`` (the earlier wins).
            priority: Passed to the limiter: higher overtakes queued lower-priority work.
            classify: The caller's explicit kinds for exceptions it knows but does not own
                (the transport passes its httpx table), asked before an exception's own
                ``failure_kind``: the retry policy judges by it, and an error it calls
                ``PERMANENT`` is the caller's own, which the breaker does not count.

        Raises:
            TimeoutError: The total time ran out, or ``deadline`` had already passed (then
                nothing is called or spent, and its failure kind is ``NOT_SENT``).
            OutcomeUnknownError: A non-idempotent attempt may have been processed.
            TypeError: ``attempt()`` returned something that is not awaitable (kind
                ``PERMANENT``: not retried; the breaker counts nothing).
            RuntimeError: A re-entrant call from a task that holds one of this policy's
                ``max_concurrency`` slots (failure kind ``NOT_SENT``; see docs/policy.md).
            Exception: Whatever the last attempt raised, when retries are exhausted. An
                error raised before anything was sent (a bad limiter key, a re-entrant call)
                propagates at once and unchanged, never retried and never as an unknown
                outcome; only refusals (:class:`~resilient_voice.RejectedError`) are retried.
        """
        if self._keyed and key is None:
            raise ValueError(
                "this policy's KeyedLimiter needs a key for every call: give the Policy key=, "
                "or pass run(key=...)"
            )
        clock = self._clock
        if deadline is not None and deadline <= clock.now():
            # No attempt can run in no time: refuse before a permit, a token or the call.
            raise OutOfTimeError("the operation's deadline had passed before it started")
        safe = self._idempotent if idempotent is None else idempotent
        if self._total_timeout is not None:
            own = clock.now() + self._total_timeout
            deadline = own if deadline is None else min(deadline, own)
        state = _RunState()
        retry = self._retry
        if retry is not None:
            if retry.total_timeout is not None:
                # The limiter must know the retry policy's budget too, so that it refuses a
                # token that would come too late instead of letting the deadline cut the wait
                # (a cut the retry policy could not tell from a request in flight).
                own = clock.now() + retry.total_timeout
                deadline = own if deadline is None else min(deadline, own)

            async def one_attempt() -> T:
                sent = state.attempts
                try:
                    return await self._attempt(attempt, key, deadline, priority, state, classify)
                except RejectedError:
                    raise  # a refusal (open breaker, no token in time) may be retried later
                except Exception as exc:
                    if state.attempts == sent or isinstance(exc, _WaitsOnItselfError):
                        # Raised before anything was sent (here, or by a re-entrant call in
                        # the operation): the retry policy would take it for a possibly
                        # processed failure, or retry what must fail again. Carry it past.
                        raise _Unsent(exc) from None
                    raise

            # The retry policy enforces the deadline (and its own total_timeout) itself,
            # including the unknown outcome of a non-idempotent attempt it cuts short.
            try:
                return await retry.run(
                    one_attempt,
                    idempotent=safe,
                    attempt_id=attempt_id,
                    deadline=deadline,
                    in_flight=state.is_in_flight,
                    classify=classify,
                )
            except _Unsent as unsent:
                error = unsent.error
            raise error
        if deadline is None:
            return await self._attempt(attempt, key, None, priority, state, classify)
        with clock.deadline_scope(deadline) as scope:
            result = await self._attempt(attempt, key, deadline, priority, state, classify)
        if not scope.cancelled_caught:
            return result
        message = "operation did not finish within its total timeout"
        if not state.in_flight:
            # Cut while waiting (for a token, a bulkhead slot): nothing was sent.
            raise OutOfTimeError(message)
        timeout = TimeoutError(message)
        if not safe:
            raise OutcomeUnknownError(
                attempt_id or new_attempt_id(),
                attempts=state.attempts,
                message="the total timeout cancelled an attempt that may have been processed",
            ) from timeout
        raise timeout

    async def _attempt(
        self,
        attempt: Callable[[], Awaitable[T]],
        key: Hashable | None,
        deadline: float | None,
        priority: int,
        state: _RunState,
        classify: Classify | None,
    ) -> T:
        breaker = self._breaker
        # Not started until the waits below are over: a probe queued for a token has sent
        # nothing, so max_wait_in_half_open must not count its queueing.
        permit = await breaker.acquire(started=False) if breaker is not None else None
        bulkhead = self._bulkhead
        try:
            holder = await self._wait_turn(key, deadline, priority)
        except BaseException:
            # Nothing was sent: give the permit (a probe slot, perhaps) back uncounted.
            if permit is not None:
                permit.release()
            raise
        # Here the waits completed: the bulkhead slot (if any) is held until the attempt ends.
        try:
            return await self._timed_call(attempt, permit, state)
        except BaseException as exc:
            if permit is not None:
                # A no-op when the attempt already reported.
                kind = failure_kind_of(exc, classify) if classify is not None else None
                permit.settle(exc, kind=kind)
            if isinstance(exc, ProviderError):
                await self._push_back(exc, key)
            raise
        finally:
            if bulkhead is not None:
                self._slot_holders.discard(holder)
                bulkhead.release_on_behalf_of(holder)

    async def _push_back(self, error: ProviderError, key: Hashable | None) -> None:
        """Pause the limiter when the upstream answered 429 and said how long to wait.

        The pushback is about the account, not this call: pausing only the retrying caller (the
        retry policy's own wait) lets every other waiter, and every other replica sharing the
        limiter's store, keep sending into the same 429s. So the limiter itself is paused
        (:meth:`TokenBucket.pause`; for a :class:`KeyedLimiter`, the key's bucket, when it is
        still retained). Done here, once, because the policy is what knows both the failure and
        its limiter; the transport and the clients only raise the provider's error.

        Bounded: at most the retry policy's ``max_delay`` (the longest wait this operation
        accepts), or :data:`MAX_PUSHBACK` without one. A 429 without a usable ``Retry-After`` /
        ``retry-after-ms`` pauses nothing: its length would be a guess, and the retry backoff
        already spaces the caller's own retries.
        """
        wait = error.retry_after
        limiter = self._limiter
        if limiter is None or not error.backpressure or wait is None or not wait > 0:
            return
        cap = self._retry.max_delay if self._retry is not None else MAX_PUSHBACK
        bucket = limiter.bucket(key) if isinstance(limiter, KeyedLimiter) else limiter
        if bucket is not None and cap > 0:
            # Shielded: a deadline expiring during the store's round trip (bounded by the
            # store's own timeout) must neither lose the pause nor replace the provider's error.
            with anyio.CancelScope(shield=True):
                await bucket.pause(min(wait, cap))

    async def _wait_turn(self, key: Hashable | None, deadline: float | None, priority: int) -> int:
        """Pay a token, then take a bulkhead slot (held until the attempt ends).

        Returns the slot's holder (the current task's id), or 0 without a bulkhead.
        """
        bulkhead = self._bulkhead
        holder = 0
        if bulkhead is not None:
            holder = current_task_id()
            if holder in self._slot_holders:
                raise _WaitsOnItselfError(
                    "re-entrant call: this task already holds one of this policy's "
                    f"{int(bulkhead.total_tokens)} max_concurrency slots and would wait on "
                    "itself; call the inner function undecorated, or give it a policy of its own"
                )
        limiter = self._limiter
        if limiter is not None:
            if isinstance(limiter, KeyedLimiter):
                await limiter.acquire(key, deadline=deadline, priority=priority)
            else:
                await limiter.acquire(deadline=deadline, priority=priority)
        if bulkhead is not None:
            await bulkhead.acquire_on_behalf_of(holder)
            self._slot_holders.add(holder)
        return holder

    async def _timed_call(
        self, attempt: Callable[[], Awaitable[T]], permit: BreakerPermit | None, state: _RunState
    ) -> T:
        if permit is not None:
            permit.mark_started()
        state.attempts += 1
        # in_flight stays True if the attempt is cancelled from outside (the total timeout):
        # that is exactly when the request may have reached the upstream unanswered.
        state.in_flight = True
        timed_out = False
        try:
            if self._timeout is None:
                result = await _awaitable(attempt(), attempt, permit)
            else:
                with self._clock.deadline_scope(self._clock.now() + self._timeout) as scope:
                    result = await _awaitable(attempt(), attempt, permit)
                timed_out = scope.cancelled_caught
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException:
            state.in_flight = False
            raise
        state.in_flight = False
        if timed_out:
            raise TimeoutError(f"attempt did not finish within {self._timeout} s")
        if permit is not None:
            permit.settle(result=result)
        return result


class _RunState:
    """Per-operation bookkeeping shared by its attempts."""

    __slots__ = ("attempts", "in_flight")

    def __init__(self) -> None:
        self.attempts = 0
        self.in_flight = False

    def is_in_flight(self) -> bool:
        """Whether the current attempt got past its waits and may have sent its request."""
        return self.in_flight


def _resolve_clock(
    clock: Clock | None, **parts: CircuitBreaker | TokenBucket | KeyedLimiter | RetryPolicy | None
) -> Clock:
    """Return the composition's clock after checking that every part measures time on it.

    A part keeps the clock it was built with (the system clock when it was given none), and a
    part may be shared by several policies, so the policy never swaps it: one timeout measured
    on a ``ManualClock`` and a backoff slept on the system clock would make every deadline
    wrong. Without ``clock=``, the policy takes its parts' common clock; with it, every part
    must have been built with that very clock.

    Raises:
        ValueError: The parts' clocks differ from each other or from ``clock``.
    """
    present: dict[str, Clock] = {}
    for name, part in parts.items():
        if part is not None:
            present[name] = part.clock
            if isinstance(part, RetryPolicy) and part.budget is not None:
                # The budget's window and the policy's backoff must count the same seconds.
                present[f"{name} budget"] = part.budget.clock
    if clock is None:
        distinct = {id(c): c for c in present.values()}
        if len(distinct) > 1:
            names = ", ".join(f"{name} on {c!r}" for name, c in present.items())
            raise ValueError(
                f"the policy's parts were built with different clocks ({names}): build every "
                "part with the same clock="
            )
        return next(iter(distinct.values()), SYSTEM_CLOCK)
    others = [name for name, c in present.items() if c is not clock]
    if others:
        raise ValueError(
            f"the policy's clock {clock!r} is not the clock its {', '.join(others)} was built "
            "with: pass the same clock= to every part (a part built without one uses the "
            "system clock; the policy never replaces a part's clock)"
        )
    return clock


class _WaitsOnItselfError(NotSentError):
    """A re-entrant call into a policy's bulkhead, refused before anything was sent.

    Refused on every re-entry, not only when the slots are taken: a re-entrant call that finds
    a free slot works in a quiet test and deadlocks under load, when every slot is held by a
    task waiting for a second one.
    """


class _Unsent(BaseException):
    """Carries an error raised before anything was sent through the retry policy, unjudged.

    A ``BaseException`` so that the retry policy's ``except Exception`` lets it pass; ``run``
    unwraps it at once and raises the original.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _awaitable(
    result: object, attempt: Callable[[], Awaitable[T]], permit: BreakerPermit | None
) -> Awaitable[T]:
    """Pass ``attempt()``'s result on when it can be awaited; else refuse it, counting nothing.

    ``run`` takes a thunk (a lambda returning a coroutine is its normal use), so it cannot be
    checked before it runs; a result that cannot be awaited is a programming error, not a
    failure of the upstream: the breaker permit is released and the error is ``PERMANENT``,
    so it is not retried.
    """
    if inspect.isawaitable(result):
        return result
    if permit is not None:
        permit.release()
    raise NotAwaitableError(
        f"Policy.run() awaits what attempt() returns, but {attempt!r} returned "
        f"{type(result).__name__}, which is not awaitable. Pass an async function or a lambda "
        "returning a coroutine (lambda: client.calls.create_async(...)); a plain function has "
        "already run by the time its result is seen."
    )
