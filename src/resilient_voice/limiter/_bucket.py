"""TokenBucket: the async facade over the GCRA core, the wait queue and an optional store.

The bucket only awaits, times and reports: the arithmetic is :mod:`._gcra`, the ordering of
waiters is :mod:`._queue`, a shared schedule is a :class:`~._store.BucketStore`. Its in-process
state is one number, ``_full_at`` (see :mod:`._gcra`); with a store it is a local mirror of the
shared schedule, refreshed by every answer, used only for projections and statistics.

The queued path with a store (batch reservations, handing on a cancelled slot) is in
:mod:`._shared`.

Over 400 lines: about a quarter of it is the public API's documentation (the rules of
``acquire``); what remains of the in-process queued path (one sleeper on the clock, deadlines
pushed back by priorities) belongs with the facade that counts and reports its outcomes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import anyio

from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice.errors import RateLimitedError
from resilient_voice.events import (
    Listener,
    TokensGranted,
    TokensRejected,
    check_listener,
    check_listeners,
    dispatch,
)
from resilient_voice.limiter import _gcra
from resilient_voice.limiter._fallback import FALLBACKS, FallbackStore, OnBackendError
from resilient_voice.limiter._queue import (
    FAILED,
    GONE,
    GRANTED,
    RESERVED,
    WAITING,
    Waiter,
    WaitQueue,
)
from resilient_voice.limiter._shared import SharedPath
from resilient_voice.limiter._store import BucketStore, InMemoryBucketStore

__all__ = ["TokenBucket", "TokenBucketStatistics"]

P = ParamSpec("P")
R = TypeVar("R")

_LOWEST = -(2**63)


@dataclass(frozen=True, slots=True)
class TokenBucketStatistics:
    """A snapshot of a :class:`TokenBucket`.

    Attributes:
        name: The bucket's name.
        rate: Tokens added per second.
        burst: Tokens the bucket holds when full.
        tokens_available: Tokens that could be taken right now (ignores the queue).
        waiters: Callers currently queued.
        granted: Successful acquisitions so far.
        rejected: Refusals so far (timeouts, deadlines, ``try_acquire`` returning False).
    """

    name: str
    rate: float
    burst: float
    tokens_available: float
    waiters: int
    granted: int
    rejected: int


def store_key(name: str, key: Hashable | None) -> str:
    """The store's name for a bucket: a digest stands in for a key (no personal data stored)."""
    if key is None:
        return name
    return f"{name}:{hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest()}"


class TokenBucket(SharedPath):
    """A token bucket: at most ``burst`` tokens, refilled at ``rate`` tokens per second.

    Build one per upstream limit at startup (for example Twilio's calls-per-second cap for one
    account) and share it; a bucket created per request limits nothing.

    Waiting callers are served by priority (higher first) and first-come first-served within a
    priority. A caller that cannot be served by its ``timeout``/``deadline`` is refused with
    :class:`~resilient_voice.RateLimitedError` before it sleeps, computed from the queue at
    arrival; one pushed back later by higher-priority arrivals is refused as soon as its deadline
    can no longer be met. An uncontended acquire takes no lock, creates no task or event, reads
    the clock once, and does not yield to the event loop (see the docs on checkpoints).

    Args:
        rate: Tokens added per second (> 0, finite).
        burst: Tokens held when full (>= 1, finite); also the most one call may take.
        clock: Clock to measure and wait on; inject a ManualClock in tests.
        name: Bounded name used in errors, events and metrics.
        listeners: Callables taking an :class:`~resilient_voice.events.Event`.
        store: A shared :class:`BucketStore` (a ``RedisBackend`` makes the limit fleet-wide);
            ``None`` keeps the state in this object. ``name`` is required with one: it is the
            bucket's key in the store.
        on_backend_error: What to do while a remote store is slow or unavailable:
            ``"local"`` (default) keeps this replica's share of the rate (rate / live
            replicas), ``"allow"`` grants everything, ``"deny"`` refuses everything. A
            breaker around the store re-probes with backoff and returns to the shared state
            without a burst (see ``docs/scale-out.md``).

    Raises:
        ValueError: ``rate`` or ``burst`` out of range or not finite; a store without a name.
        TypeError: ``rate`` or ``burst`` not a number.
    """

    __slots__ = (
        "_burst",
        "_clock",
        "_fast",
        "_granted",
        "_interval",
        "_key",
        "_listeners",
        "_name",
        "_now",
        "_queue",
        "_rate",
        "_rejected",
        "_store",
        "_store_key",
        "_tau",
    )

    def __init__(
        self,
        rate: float,
        burst: float = 1,
        *,
        clock: Clock | None = None,
        name: str | None = None,
        listeners: Iterable[Listener] = (),
        store: BucketStore | None = None,
        on_backend_error: OnBackendError = "local",
    ) -> None:
        rate = _validate.number("rate", rate)
        burst = _validate.number("burst", burst, minimum=1.0, inclusive=True)
        _validate.optional_label("name", name)
        if store is not None and not isinstance(store, BucketStore):
            raise TypeError("store must implement BucketStore (reserve, give_back and pause)")
        if store is not None and name is None:
            raise ValueError(
                "a bucket with a shared store needs a name: the name is its key in the store "
                "(for example name='twilio:<account sid>:calls')"
            )
        _validate.choice("on_backend_error", on_backend_error, FALLBACKS)
        self._setup(
            rate,
            burst,
            _validate.clock(clock),
            name or "token_bucket",
            check_listeners(listeners),
        )
        if store is not None and not isinstance(store, InMemoryBucketStore):
            # A remote store may be slow or gone: answer locally behind a breaker meanwhile.
            store = FallbackStore(
                store,
                on_backend_error,
                clock=self._clock,
                name=self._name,
                listeners=lambda: self._listeners,
            )
        self._attach(None, store)

    def _setup(
        self, rate: float, burst: float, clock: Clock, name: str, listeners: tuple[Listener, ...]
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._interval = 1.0 / rate
        self._tau = _gcra.depth(burst, self._interval)
        self._clock = clock
        self._now = clock.now
        self._name = name
        self._listeners = listeners

    def _attach(self, key: Hashable | None, store: BucketStore | None) -> None:
        """Fresh state for ``key`` (None for a plain bucket), kept here or in ``store``."""
        self._key = key
        self._store = store
        self._store_key = "" if store is None else store_key(self._name, key)
        remote = store.inner if isinstance(store, FallbackStore) else store
        declare = getattr(remote, "declare", None)
        if key is None and declare is not None:
            # A remote store compares the configuration across replicas sharing the name.
            declare(self._name, self._rate, self._burst)
        self._store_end = 0.0
        self._full_at = _gcra.NEVER
        self._queue: WaitQueue | None = None
        self._reserved = []
        self._reserving = False
        self._catching_up = False
        self._dropped = 0
        # No store and nobody queued: the uncontended path applies. One read on the hot path
        # instead of two pays for the argument checks there.
        self._fast = store is None
        self._granted = 0
        self._rejected = 0

    def _spawn(self, key: Hashable, listeners: tuple[Listener, ...]) -> TokenBucket:
        """A fresh bucket with this one's settings and store, for ``key`` of a KeyedLimiter."""
        bucket = TokenBucket.__new__(TokenBucket)
        bucket._setup(self._rate, self._burst, self._clock, self._name, listeners)
        bucket._attach(key, self._store)
        return bucket

    @property
    def clock(self) -> Clock:
        """The clock this bucket measures and sleeps on, fixed at construction."""
        return self._clock

    @property
    def name(self) -> str:
        """The bucket's name."""
        return self._name

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """Tokens held when full."""
        return self._burst

    def add_listener(self, listener: Listener) -> None:
        """Attach a listener (for example a metrics exporter) after construction."""
        self._listeners = (*self._listeners, check_listener(listener))

    def _cost_of(self, tokens: float) -> float:
        tokens = _validate.number("tokens", tokens)
        if tokens > self._burst:
            raise ValueError(
                f"tokens ({tokens!r}) exceeds burst ({self._burst!r}) of limiter "
                f"{self._name!r}: the request could never be granted"
            )
        return tokens * self._interval

    async def acquire(
        self,
        tokens: float = 1,
        *,
        timeout: float | None = None,  # noqa: ASYNC109  (a queue-aware limit, not a cancel scope)
        deadline: float | None = None,
        priority: int = 0,
    ) -> None:
        """Wait until ``tokens`` are available, then take them.

        Args:
            tokens: How many tokens to take (> 0, at most ``burst``).
            timeout: Refuse if the tokens cannot be granted within this many seconds.
            deadline: Refuse if the tokens cannot be granted by this clock time.
            priority: Higher priorities are served first; FIFO within a priority.

        A ``deadline`` already in the past is refused at once, even on an idle bucket;
        ``timeout=0`` (a deadline of now) takes the tokens only if they can be granted at once.

        Raises:
            RateLimitedError: The wait would exceed ``timeout``/``deadline``, or the deadline
                has already passed; raised at arrival when the queue already shows it, or as
                soon as later higher-priority arrivals push the slot past the deadline.
                ``retry_after`` is the projected wait.
            ValueError: ``tokens`` out of range, or ``timeout`` negative or NaN.
            TypeError: ``tokens`` not a number (a bool is not one), ``priority`` not an int.
        """
        # Checked on every path, so that a bad argument fails on an idle bucket as it would
        # under load. ``tokens is not True`` and ``type(...) is int`` keep the common case to
        # identity tests: this is the hot path.
        cost = self._interval if tokens == 1 and tokens is not True else self._cost_of(tokens)
        if type(priority) is not int:
            priority = _validate.integer("priority", priority)
        now = self._now()
        if timeout is not None or deadline is not None:
            deadline = self._effective_deadline(timeout, deadline, now)
            if deadline is not None and deadline < now:
                wait = self._projected_wait(cost, priority)
                raise self._refuse(tokens, wait, "its deadline had already passed")
        if self._fast:
            # _gcra.fits and _gcra.take, inlined: a call costs more than the rest of this path.
            full = self._full_at
            if full + cost - self._tau <= now:
                self._full_at = (full if full > now else now) + cost
                self._granted += 1
                if self._listeners:
                    dispatch(self._listeners, TokensGranted(self._name, self._key, tokens, 0.0))
                return
        await self._wait(tokens, cost, deadline, priority, now)

    async def try_acquire(self, tokens: float = 1) -> bool:
        """Take ``tokens`` if they are available now and nobody is queued; never waits.

        It is async because a shared store may be remote. It does not yield when the state is
        local, so do not spin on it: use :meth:`acquire` to wait.

        Returns:
            True if the tokens were taken.

        Raises:
            ValueError: ``tokens`` out of range.
        """
        cost = self._interval if tokens == 1 and tokens is not True else self._cost_of(tokens)
        if self._fast:
            # No store, nobody queued: the inlined _gcra.fits and _gcra.take, as in acquire()
            # (a middleware calls this once per request; the inlined copy is pinned by
            # tests/test_limiter_gcra.py).
            now = self._now()
            full = self._full_at
            if full + cost - self._tau <= now:
                self._full_at = (full if full > now else now) + cost
                self._granted += 1
                if self._listeners:
                    dispatch(self._listeners, TokensGranted(self._name, self._key, tokens, 0.0))
                return True
        elif not self._waiters():
            store = self._store
            if store is None:
                now = self._now()
                taken = _gcra.fits(self._full_at, cost, self._tau, now)
                if taken:
                    self._full_at = _gcra.take(self._full_at, cost, now)
            else:
                reservation = await store.reserve(self._store_key, (cost,), (0.0,), self._tau)
                self._mirror(reservation.backlog, reservation.end)
                taken = bool(reservation.delays)
            if taken:
                self._granted += 1
                if self._listeners:
                    dispatch(self._listeners, TokensGranted(self._name, self._key, tokens, 0.0))
                return True
        self._rejected += 1
        if self._listeners:
            wait = self._projected_wait(cost, None)
            dispatch(self._listeners, TokensRejected(self._name, self._key, tokens, wait))
        return False

    async def pause(self, seconds: float) -> None:
        """Grant nothing for ``seconds`` from now, then resume at ``rate`` without a burst.

        For pushback: an upstream answered 429 with ``Retry-After``. With a shared store the whole
        fleet pauses. Slots already reserved by waiters stand.

        Raises:
            ValueError: ``seconds`` negative or NaN.
        """
        seconds = _validate.non_negative("seconds", seconds)
        # Empty at now + seconds, less one token: the next single token fits exactly then.
        until = seconds + self._tau - self._interval
        if self._store is None:
            self._full_at = max(self._full_at, self._now() + until)
            self._fast = self._queue is None or not self._queue.waiting
        else:
            answer = await self._store.pause(self._store_key, until)
            self._mirror(answer.backlog, answer.end)

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate an async function so that every call first acquires one token.

        Raises:
            TypeError: ``fn`` is not an async function.
        """
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{fn!r} is not an async function; the limiter decorates async code")
        acquire = self.acquire

        @functools.wraps(fn)
        async def limited(*args: P.args, **kwargs: P.kwargs) -> R:
            await acquire()
            return await fn(*args, **kwargs)

        return limited

    def tokens_available(self) -> float:
        """Tokens that could be taken now (with a store: as of its last answer to this bucket).

        The cheap read behind ``statistics().tokens_available``, for per-request quota headers.
        """
        return _gcra.available(self._full_at, self._now(), self._burst, self._rate)

    def statistics(self) -> TokenBucketStatistics:
        """Return a snapshot of the bucket (a shared store is not queried)."""
        return TokenBucketStatistics(
            name=self._name,
            rate=self._rate,
            burst=self._burst,
            tokens_available=self.tokens_available(),
            waiters=self._waiters(),
            granted=self._granted,
            rejected=self._rejected,
        )

    def __repr__(self) -> str:
        return (
            f"TokenBucket(name={self._name!r}, rate={self._rate!r}, burst={self._burst!r}, "
            f"waiters={self._waiters()})"
        )

    def _waiters(self) -> int:
        queue = self._queue
        return len(self._reserved) + (queue.waiting if queue is not None else 0)

    def _effective_deadline(
        self, timeout: float | None, deadline: float | None, now: float
    ) -> float | None:
        if timeout is not None:
            by_timeout = now + _validate.non_negative("timeout", timeout)
            if deadline is None or by_timeout < deadline:
                return by_timeout
        elif deadline is not None and math.isnan(deadline):
            raise ValueError("deadline must not be NaN")
        return deadline

    def _is_full(self, now: float) -> bool:
        return not self._waiters() and self._full_at <= now

    def _mirror(self, backlog: float, end: float) -> None:
        self._full_at = self._now() + backlog
        self._store_end = end

    def _projected_wait(self, cost: float, priority: int | None) -> float:
        """The wait a new request would face (with a store: from the mirror, an estimate)."""
        queue = self._queue
        ahead = queue.ahead(_LOWEST if priority is None else priority) if queue else 0.0
        return _gcra.wait(max(self._full_at, self._now()) + ahead, cost, self._tau, self._now())

    def _refuse(self, tokens: float, retry_after: float, reason: str) -> RateLimitedError:
        self._rejected += 1
        if self._listeners:
            dispatch(self._listeners, TokensRejected(self._name, self._key, tokens, retry_after))
        return RateLimitedError(self._name, retry_after, reason=reason)

    async def _wait(
        self, tokens: float, cost: float, deadline: float | None, priority: int, arrived: float
    ) -> None:
        if deadline is not None:
            wait = self._projected_wait(cost, priority)
            if arrived + wait > deadline:
                raise self._refuse(tokens, wait, "the queue cannot serve it by its deadline")
        queue = self._queue
        store = self._store
        if store is not None and not self._reserving and (queue is None or not queue.waiting):
            refused = await self._alone(store, tokens, cost, deadline, priority)
            if refused is not None:
                reason = "the shared schedule cannot serve it by its deadline"
                raise self._refuse(tokens, refused, reason)
            self._count_grant(tokens, arrived)
            return
        if queue is None:
            queue = self._queue = WaitQueue()
        old_front = queue.front() if queue.waiting else None
        waiter = Waiter(tokens, cost, priority, deadline)
        queue.insert(waiter)
        self._fast = False
        if old_front is not None and priority > old_front.priority and old_front.scope is not None:
            # The newcomer overtakes the sleeping front and becomes the one that sleeps.
            old_front.scope.cancel()
        if queue.deadlines and queue.lowest() < priority:
            self._expire_pushed_back(queue, priority, arrived)
        try:
            if self._store is None:
                await self._serve(queue, waiter)
            else:
                await self._serve_shared(queue, waiter, self._store)
        except BaseException:
            await self._leave(queue, waiter)
            raise
        finally:
            self._fast = self._store is None and not queue.waiting
        if waiter.state == FAILED:
            raise self._refuse(tokens, self._projected_wait(cost, priority), "deadline")
        self._count_grant(tokens, arrived)

    def _count_grant(self, tokens: float, arrived: float) -> None:
        self._granted += 1
        if self._listeners:
            waited = self._now() - arrived
            dispatch(self._listeners, TokensGranted(self._name, self._key, tokens, waited))

    async def _leave(self, queue: WaitQueue, waiter: Waiter) -> None:
        """A waiter is cancelled: the waiters behind it move up; a reserved slot is handed on."""
        if waiter.state == WAITING:
            was_front = queue.front() is waiter
            queue.drop(waiter, GONE)
            if was_front:
                queue.wake_front()
        elif waiter.state == RESERVED:
            with anyio.CancelScope(shield=True):
                await self._release(queue, waiter)

    async def _serve(self, queue: WaitQueue, waiter: Waiter) -> None:
        """In-process state: only the front waiter sleeps, until its tokens are there."""
        while waiter.state == WAITING:
            if queue.front() is not waiter:
                await self._wait_for_turn(waiter)
                continue
            now = self._now()
            full = self._full_at
            when = full + waiter.cost - self._tau
            if when <= now:
                # The grant counts at its slot when it woke late (within LATENESS_KEPT), so the
                # next slot follows the schedule, not the late wake-up.
                self._full_at = _gcra.take(full, waiter.cost, now - _gcra.LATENESS_KEPT)
                queue.drop(waiter, GRANTED)
                queue.wake_front()
                return
            if waiter.deadline is not None and when > waiter.deadline:
                queue.drop(waiter, FAILED)
                queue.wake_front()
                return
            await self._sleep(waiter, when)

    def _expire_pushed_back(self, queue: WaitQueue, priority: int, now: float) -> None:
        """Refuse lower-priority waiters whose deadline a newcomer at ``priority`` defeated."""
        full = self._full_at
        base = (full if full > now else now) - self._tau
        cumulative = queue.ahead(priority)
        for waiter in list(queue.in_order(below=priority)):
            cumulative += waiter.cost
            if waiter.deadline is not None and base + cumulative > waiter.deadline:
                cumulative -= waiter.cost
                queue.drop(waiter, FAILED)
                waiter.event.set()
                if waiter.scope is not None:
                    waiter.scope.cancel()
                if not queue.deadlines:
                    return
