"""Token-bucket rate limiting: pace calls to an upstream's cap exactly, fairly and cancel-safely.

A :class:`TokenBucket` holds at most ``burst`` tokens and refills at ``rate`` tokens per second.
Over any interval of length ``T`` it grants at most ``burst + rate * (T + 0.01)`` tokens: a
queued grant that the event loop wakes late keeps its slot on the schedule by up to 10 ms, so
wake-up lateness does not add up into a lower rate (see ``_LATENESS_KEPT``). Its state is one
number in GCRA form (the clock time at which the bucket would be full again), so an uncontended
acquire is one clock read, two float operations and a store.

Callers that must wait join a queue ordered by priority (higher first), first-come first-served
within a priority. Only the waiter at the front of the queue sleeps on the clock, until the moment
its tokens will be there; the others wait to become the front. Nothing is precomputed per
waiter, so a waiter that leaves (cancelled, or refused because its deadline can no longer be
met) gives back everything it had in the queue and the waiters behind it move up at once.

A :class:`KeyedLimiter` keeps one bucket per key (an account, a sender number, a client address)
with a bounded number of retained buckets.

The state of a bucket sits behind :class:`BucketStore`, so that a shared store (Redis) can make
several processes draw from one bucket without changing callers; the in-memory state is inlined.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

import anyio

from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice.errors import RateLimitedError
from resilient_voice.events import LimiterListener, emit

__all__ = [
    "BucketStore",
    "KeyedLimiter",
    "KeyedLimiterStatistics",
    "LimiterStatistics",
    "MemoryBucketStore",
    "TokenBucket",
]

P = ParamSpec("P")
R = TypeVar("R")

_WAITING = 0
_GRANTED = 1
_FAILED = 2
_GONE = 3

_NEG_INF = -math.inf

# How late a queued waiter may be granted and still keep its scheduled slot (seconds). Event loops
# wake sleepers late (0.15-0.3 ms at the median, 1-4 ms at the 99th percentile and up to about
# 15 ms on a shared two-core machine; benchmarks/limiter.py measures it); granting "at the late
# wake-up" instead of "at the slot" pushed every later slot back by that lateness, which lost
# 15-20 % of the rate at 1000 grants/s. Keeping the slot turns the bound into
# ``burst + rate * (T + _LATENESS_KEPT)``; a stall longer than this loses only the excess.
_LATENESS_KEPT = 0.010

# Shared, never-mutated stand-ins for the queue of a bucket nobody waits on: buckets (one per key
# in a KeyedLimiter) allocate their queue only when someone first has to wait.
_NO_CLASSES: dict[int, deque[_Waiter]] = {}
_NO_COSTS: dict[int, float] = {}
_NO_ORDER: list[int] = []


@runtime_checkable
class BucketStore(Protocol):
    """Where the state of shared buckets lives (the seam for a Redis backend).

    State is kept in GCRA form: per key, the time at which that bucket would be full again.
    Capacity is expressed in seconds of refill (``cost = tokens / rate``, ``tau = burst / rate``)
    and results are relative durations, so a remote store can use its own clock. Both methods
    must be atomic per key. Queue order (FIFO and priorities) is kept by each process's
    :class:`TokenBucket`; the store only arbitrates the capacity between processes.
    """

    async def take(self, key: str, cost: float, tau: float) -> float:
        """Take ``cost`` and return ``0.0`` if it fits now; else take nothing, return the wait."""
        ...

    async def wait_time(self, key: str, cost: float, tau: float) -> float:
        """Seconds until ``cost`` (which may exceed ``tau``) would fit; takes nothing."""
        ...


class MemoryBucketStore:
    """A :class:`BucketStore` in this process's memory: the reference for other stores.

    :class:`TokenBucket` does not need it (its default in-memory state is inlined on the fast
    path); it exists to specify and test the store contract, and to share one bucket state between
    several :class:`TokenBucket` objects in one process. Keys whose bucket is full again are
    dropped on access, so memory is bounded by the number of keys in use.

    Args:
        clock: The clock the stored times refer to.
    """

    __slots__ = ("_clock", "_full_at")

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SYSTEM_CLOCK
        self._full_at: dict[str, float] = {}

    async def take(self, key: str, cost: float, tau: float) -> float:
        now = self._clock.now()
        full = self._full_at.get(key, _NEG_INF)
        wait = full + cost - tau - now
        if wait > 0.0:
            return wait
        self._full_at[key] = (full if full > now else now) + cost
        return 0.0

    async def wait_time(self, key: str, cost: float, tau: float) -> float:
        now = self._clock.now()
        full = self._full_at.get(key, _NEG_INF)
        if full <= now:
            self._full_at.pop(key, None)
            full = now
        return max(0.0, full + cost - tau - now)

    def __len__(self) -> int:
        return len(self._full_at)

    def __repr__(self) -> str:
        return f"MemoryBucketStore(keys={len(self._full_at)})"


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
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


@dataclass(frozen=True, slots=True)
class KeyedLimiterStatistics:
    """A snapshot of a :class:`KeyedLimiter`.

    Attributes:
        name: The limiter's name.
        keys: Buckets currently retained (at most ``max_keys``).
        max_keys: The configured bound on retained buckets.
        waiters: Callers currently queued, over all keys.
        granted: Successful acquisitions so far, over all keys.
        rejected: Refusals so far, including new keys refused because every bucket was busy.
        evicted: Buckets dropped because they were full again (lossless).
        evicted_lossy: Buckets dropped while not full (only with ``on_full="evict"``).
    """

    name: str
    keys: int
    max_keys: int
    waiters: int
    granted: int
    rejected: int
    evicted: int
    evicted_lossy: int


class _Waiter:
    __slots__ = ("cost", "deadline", "event", "priority", "scope", "state", "tokens")

    def __init__(self, tokens: float, cost: float, priority: int, deadline: float | None) -> None:
        self.tokens = tokens
        self.cost = cost
        self.priority = priority
        self.deadline = deadline
        self.state = _WAITING
        self.event = anyio.Event()
        self.scope: anyio.CancelScope | None = None


def _check_priority(priority: object) -> int:
    """The slow path of the priority check: an ``int`` subclass (an ``IntEnum``) is accepted."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    return int(priority)


def _check_positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


class TokenBucket:
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
        name: Bounded name used in errors, listeners and metrics.
        listeners: :class:`~resilient_voice.events.LimiterListener` objects.
        store: A shared :class:`BucketStore`; ``None`` keeps the state in this object.

    Raises:
        ValueError: ``rate`` or ``burst`` out of range or not finite.
        TypeError: ``rate`` or ``burst`` not a number.
    """

    __slots__ = (
        "_burst",
        "_class_cost",
        "_classes",
        "_clock",
        "_deadlines",
        "_fast",
        "_full_at",
        "_granted",
        "_interval",
        "_key",
        "_listeners",
        "_name",
        "_now",
        "_order",
        "_rate",
        "_rejected",
        "_store",
        "_store_key",
        "_tau",
        "_waiting",
    )

    def __init__(
        self,
        rate: float,
        burst: float = 1,
        *,
        clock: Clock | None = None,
        name: str | None = None,
        listeners: Iterable[LimiterListener] = (),
        store: BucketStore | None = None,
    ) -> None:
        rate = _check_positive_finite("rate", rate)
        burst = _check_positive_finite("burst", burst)
        if burst < 1:
            raise ValueError(f"burst must be >= 1 (a call takes at least one token), got {burst!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")
        if store is not None and not isinstance(store, BucketStore):
            raise TypeError("store must implement BucketStore (take and wait_time)")
        self._setup(
            rate,
            burst,
            clock or SYSTEM_CLOCK,
            name or "token_bucket",
            tuple(listeners),
            None,
            store,
        )

    def _setup(
        self,
        rate: float,
        burst: float,
        clock: Clock,
        name: str,
        listeners: tuple[LimiterListener, ...],
        key: Hashable | None,
        store: BucketStore | None,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._interval = 1.0 / rate
        # tau is the bucket's depth in seconds of refill. The slack (at most a nanosecond) absorbs
        # float rounding so that a grant due exactly "now" is not deferred by one ulp.
        depth = burst * self._interval
        self._tau = depth + min(1e-9, self._interval * 1e-6)
        self._clock = clock
        self._now = clock.now
        self._name = name
        self._listeners = listeners
        self._key = key
        self._store = store
        self._store_key = "" if store is None else name if key is None else f"{name}:{key!r}"
        self._full_at = _NEG_INF
        self._waiting = 0
        # No store and nobody queued: the uncontended path applies. One read on the hot path
        # instead of two pays for the argument checks there.
        self._fast = store is None
        self._deadlines = 0
        self._granted = 0
        self._rejected = 0
        self._classes = _NO_CLASSES
        self._class_cost = _NO_COSTS
        self._order = _NO_ORDER  # priorities present, ascending (walked in reverse)

    def _adopt_clock(self, clock: Clock) -> None:
        """Use ``clock`` when this bucket was built without one (see :class:`Policy`)."""
        if self._clock is SYSTEM_CLOCK:
            self._clock = clock
            self._now = clock.now
            store = self._store
            if isinstance(store, MemoryBucketStore) and store._clock is SYSTEM_CLOCK:
                store._clock = clock

    def _spawn(self, key: Hashable, listeners: tuple[LimiterListener, ...]) -> TokenBucket:
        """A fresh in-memory bucket with this one's settings, for ``key`` of a KeyedLimiter."""
        bucket = TokenBucket.__new__(TokenBucket)
        bucket._rate = self._rate
        bucket._burst = self._burst
        bucket._interval = self._interval
        bucket._tau = self._tau
        bucket._clock = self._clock
        bucket._now = self._now
        bucket._name = self._name
        bucket._listeners = listeners
        bucket._key = key
        bucket._store = None
        bucket._store_key = ""
        bucket._full_at = _NEG_INF
        bucket._waiting = 0
        bucket._fast = True
        bucket._deadlines = 0
        bucket._granted = 0
        bucket._rejected = 0
        bucket._classes = _NO_CLASSES
        bucket._class_cost = _NO_COSTS
        bucket._order = _NO_ORDER
        return bucket

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

    def add_listener(self, listener: LimiterListener) -> None:
        """Attach a listener (for example a metrics exporter) after construction."""
        self._listeners = (*self._listeners, listener)

    def _cost_of(self, tokens: float) -> float:
        if isinstance(tokens, bool) or not isinstance(tokens, int | float):
            raise TypeError(f"tokens must be a number, got {type(tokens).__name__}")
        if not math.isfinite(tokens) or tokens <= 0:
            raise ValueError(f"tokens must be a finite number > 0, got {tokens!r}")
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
            priority = _check_priority(priority)
        now = self._now()
        if timeout is not None or deadline is not None:
            deadline = self._effective_deadline(timeout, deadline, now)
            if deadline is not None and deadline < now:
                wait = await self._projected_wait(cost, priority)
                raise self._refuse(tokens, wait, "its deadline had already passed")
        if self._fast:
            full = self._full_at
            if full + cost - self._tau <= now:
                self._full_at = (full if full > now else now) + cost
                self._granted += 1
                if self._listeners:
                    emit(self._listeners, "on_granted", self._name, self._key, tokens, 0.0)
                return
        await self._queue(tokens, cost, deadline, priority, now)

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
        if not self._waiting:
            if self._store is None:
                now = self._now()
                full = self._full_at
                if full + cost - self._tau <= now:
                    self._full_at = (full if full > now else now) + cost
                    self._granted += 1
                    if self._listeners:
                        emit(self._listeners, "on_granted", self._name, self._key, tokens, 0.0)
                    return True
            elif await self._store.take(self._store_key, cost, self._tau) <= 0.0:
                self._granted += 1
                if self._listeners:
                    emit(self._listeners, "on_granted", self._name, self._key, tokens, 0.0)
                return True
        self._rejected += 1
        if self._listeners:
            wait = await self._projected_wait(cost, None)
            emit(self._listeners, "on_rejected", self._name, self._key, tokens, wait)
        return False

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
        """Tokens that could be taken now (in-memory level; a shared store is not queried).

        The cheap read behind ``statistics().tokens_available``, for per-request quota headers.
        """
        behind = self._full_at - self._now()
        if behind <= 0:
            return self._burst
        available = self._burst - behind * self._rate
        return available if available > 0.0 else 0.0

    def statistics(self) -> LimiterStatistics:
        """Return a snapshot of the bucket (in-memory level; a shared store is not queried)."""
        return LimiterStatistics(
            name=self._name,
            rate=self._rate,
            burst=self._burst,
            tokens_available=self.tokens_available(),
            waiters=self._waiting,
            granted=self._granted,
            rejected=self._rejected,
        )

    def __repr__(self) -> str:
        return (
            f"TokenBucket(name={self._name!r}, rate={self._rate!r}, burst={self._burst!r}, "
            f"waiters={self._waiting})"
        )

    def _effective_deadline(
        self, timeout: float | None, deadline: float | None, now: float
    ) -> float | None:
        if timeout is not None:
            if not timeout >= 0:
                raise ValueError(f"timeout must be >= 0, got {timeout!r}")
            by_timeout = now + timeout
            if deadline is None or by_timeout < deadline:
                return by_timeout
        elif deadline is not None and math.isnan(deadline):
            raise ValueError("deadline must not be NaN")
        return deadline

    def _is_full(self, now: float) -> bool:
        return not self._waiting and self._full_at <= now

    def _ahead(self, priority: int) -> float:
        """Cost queued by live waiters who would be served before a new one at ``priority``."""
        total = 0.0
        for p, cost in self._class_cost.items():
            if p >= priority:
                total += cost
        return total

    async def _projected_wait(self, cost: float, priority: int | None) -> float:
        ahead = self._ahead(-(2**63) if priority is None else priority) if self._waiting else 0.0
        if self._store is not None:
            return await self._store.wait_time(self._store_key, ahead + cost, self._tau)
        now = self._now()
        full = self._full_at
        return max(0.0, (full if full > now else now) + ahead + cost - self._tau - now)

    def _front(self) -> _Waiter | None:
        classes = self._classes
        order = self._order
        while order:
            priority = order[-1]
            queue = classes[priority]
            while queue and queue[0].state != _WAITING:
                queue.popleft()
            if queue:
                return queue[0]
            del classes[priority]
            del self._class_cost[priority]
            order.pop()
        return None

    def _insert(self, waiter: _Waiter) -> None:
        if not self._waiting:
            self._classes = {}
            self._class_cost = {}
            self._order = []
        priority = waiter.priority
        queue = self._classes.get(priority)
        if queue is None:
            queue = self._classes[priority] = deque()
            self._class_cost[priority] = 0.0
            bisect.insort(self._order, priority)
        queue.append(waiter)
        self._class_cost[priority] += waiter.cost
        self._waiting += 1
        self._fast = False
        if waiter.deadline is not None:
            self._deadlines += 1

    def _drop(self, waiter: _Waiter, state: int) -> None:
        waiter.state = state
        self._waiting -= 1
        if waiter.deadline is not None:
            self._deadlines -= 1
        if self._waiting:
            self._class_cost[waiter.priority] -= waiter.cost
        else:
            # Nobody is queued: drop the bookkeeping so float residue cannot accumulate.
            self._fast = self._store is None
            self._classes = _NO_CLASSES
            self._class_cost = _NO_COSTS
            self._order = _NO_ORDER

    def _wake_front(self) -> None:
        front = self._front()
        if front is not None:
            front.event.set()

    def _refuse(self, tokens: float, retry_after: float, reason: str) -> RateLimitedError:
        self._rejected += 1
        if self._listeners:
            emit(self._listeners, "on_rejected", self._name, self._key, tokens, retry_after)
        return RateLimitedError(self._name, retry_after, reason=reason)

    async def _queue(
        self, tokens: float, cost: float, deadline: float | None, priority: int, arrived: float
    ) -> None:
        if deadline is not None:
            wait = await self._projected_wait(cost, priority)
            if arrived + wait > deadline:
                raise self._refuse(tokens, wait, "the queue cannot serve it by its deadline")
        old_front = self._front() if self._waiting else None
        waiter = _Waiter(tokens, cost, priority, deadline)
        self._insert(waiter)
        if old_front is not None and priority > old_front.priority and old_front.scope is not None:
            # The newcomer overtakes the sleeping front and becomes the one that sleeps.
            old_front.scope.cancel()
        if self._deadlines and self._order[0] < priority:
            self._expire_pushed_back(priority, arrived)
        try:
            await self._serve(waiter)
        except BaseException:
            if waiter.state == _WAITING:
                was_front = self._front() is waiter
                self._drop(waiter, _GONE)
                if was_front:
                    self._wake_front()
            raise
        if waiter.state == _FAILED:
            raise self._refuse(tokens, await self._projected_wait(cost, priority), "deadline")
        self._granted += 1
        if self._listeners:
            waited = self._now() - arrived
            emit(self._listeners, "on_granted", self._name, self._key, tokens, waited)

    async def _serve(self, waiter: _Waiter) -> None:
        clock = self._clock
        store = self._store
        while waiter.state == _WAITING:
            if self._front() is not waiter:
                if waiter.event.is_set():
                    waiter.event = anyio.Event()
                await waiter.event.wait()
                continue
            now = self._now()
            if store is None:
                full = self._full_at
                when = full + waiter.cost - self._tau
                if when <= now:
                    # The grant counts at its slot when it woke late (within _LATENESS_KEPT), so
                    # the next slot follows the schedule, not the late wake-up.
                    kept = now - _LATENESS_KEPT
                    self._full_at = (full if full > kept else kept) + waiter.cost
                    self._drop(waiter, _GRANTED)
                    self._wake_front()
                    return
            else:
                wait = await store.take(self._store_key, waiter.cost, self._tau)
                if waiter.state != _WAITING:
                    continue
                if wait <= 0.0:
                    self._drop(waiter, _GRANTED)
                    self._wake_front()
                    return
                when = now + wait
            if waiter.deadline is not None and when > waiter.deadline:
                self._drop(waiter, _FAILED)
                self._wake_front()
                return
            with anyio.CancelScope() as scope:
                waiter.scope = scope
                try:
                    await clock.sleep_until(when)
                finally:
                    waiter.scope = None

    def _expire_pushed_back(self, priority: int, now: float) -> None:
        """Refuse lower-priority waiters whose deadline a newcomer at ``priority`` defeated."""
        full = self._full_at
        base = (full if full > now else now) - self._tau
        cumulative = self._ahead(priority)
        for p in reversed(self._order):
            if p >= priority:
                continue
            for waiter in self._classes[p]:
                if waiter.state != _WAITING:
                    continue
                cumulative += waiter.cost
                if waiter.deadline is not None and base + cumulative > waiter.deadline:
                    cumulative -= waiter.cost
                    self._drop(waiter, _FAILED)
                    waiter.event.set()
                    if waiter.scope is not None:
                        waiter.scope.cancel()
                    if not self._deadlines:
                        return


class KeyedLimiter:
    """One token bucket per key, with a bound on how many buckets are kept.

    A bucket that is full again is equivalent to a fresh one, so it can be dropped without losing
    anything. When a new key arrives and ``max_keys`` buckets are retained, the least recently
    used full bucket is dropped (all full buckets are dropped when the oldest is not full). If
    none is full, every retained key is actively limited: ``on_full="reject"`` (default) refuses
    the new key with :class:`~resilient_voice.RateLimitedError`, keeping every bound exact (fail
    closed); ``on_full="evict"`` drops the least recently used bucket anyway (fail open), which a
    listener sees as ``on_evicted(name, key, lossy=True)``.

    Args:
        rate: Tokens added per second, per key.
        burst: Tokens held per key when full.
        max_keys: Most buckets retained at once.
        clock: Clock to measure and wait on.
        name: Bounded name used in errors, listeners and metrics (never the key).
        listeners: :class:`~resilient_voice.events.LimiterListener` objects.
        on_full: ``"reject"`` or ``"evict"``, see above.

    Raises:
        ValueError: A value out of range, or an unknown ``on_full``.
        TypeError: A value of the wrong type.
    """

    __slots__ = (
        "_buckets",
        "_burst",
        "_clock",
        "_evict_lossy",
        "_evicted",
        "_listeners",
        "_max_keys",
        "_name",
        "_next_full",
        "_on_full",
        "_rate",
        "_retired_granted",
        "_retired_rejected",
        "_template",
    )

    def __init__(
        self,
        rate: float,
        burst: float = 1,
        *,
        max_keys: int = 10_000,
        clock: Clock | None = None,
        name: str | None = None,
        listeners: Iterable[LimiterListener] = (),
        on_full: Literal["reject", "evict"] = "reject",
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int):
            raise TypeError(f"max_keys must be an int, got {type(max_keys).__name__}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        if on_full not in ("reject", "evict"):
            raise ValueError(f"on_full must be 'reject' or 'evict', got {on_full!r}")
        self._name = name or "keyed_limiter"
        # The template validates rate/burst once; per-key buckets copy its prepared settings.
        self._template = TokenBucket(rate, burst, clock=clock, name=self._name)
        self._rate = self._template.rate
        self._burst = self._template.burst
        self._clock = clock or SYSTEM_CLOCK
        self._listeners: tuple[LimiterListener, ...] = tuple(listeners)
        self._max_keys = max_keys
        self._on_full = on_full
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._next_full = _NEG_INF  # no retained bucket is full before this time
        self._evicted = 0
        self._evict_lossy = 0
        self._retired_granted = 0
        self._retired_rejected = 0

    @property
    def name(self) -> str:
        """The limiter's name."""
        return self._name

    def _adopt_clock(self, clock: Clock) -> None:
        """Use ``clock`` when this limiter was built without one (see :class:`Policy`)."""
        if self._clock is SYSTEM_CLOCK:
            self._clock = clock
            self._template._adopt_clock(clock)
            for bucket in self._buckets.values():
                bucket._adopt_clock(clock)

    def add_listener(self, listener: LimiterListener) -> None:
        """Attach a listener to the limiter and every bucket it holds."""
        self._listeners = (*self._listeners, listener)
        for bucket in self._buckets.values():
            bucket._listeners = self._listeners

    def bucket(self, key: Hashable) -> TokenBucket | None:
        """The bucket currently retained for ``key``, if any (for inspection)."""
        return self._buckets.get(key)

    async def acquire(
        self,
        key: Hashable,
        tokens: float = 1,
        *,
        timeout: float | None = None,  # noqa: ASYNC109  (a queue-aware limit, not a cancel scope)
        deadline: float | None = None,
        priority: int = 0,
    ) -> None:
        """Wait until ``tokens`` are available in ``key``'s bucket, then take them.

        Same rules as :meth:`TokenBucket.acquire`, per key. Arguments are checked before a
        bucket is made for a new key, and a new key whose deadline has already passed is
        refused without one, so a refused call never evicts another key's bucket.

        Raises:
            RateLimitedError: As for a bucket, or a new key arrived while all ``max_keys``
                buckets are busy and ``on_full="reject"``.
            ValueError: Bad ``tokens`` or ``timeout``.
            TypeError: ``key`` not hashable, ``tokens`` not a number, ``priority`` not an int.
        """
        if not (tokens == 1 and tokens is not True):
            self._template._cost_of(tokens)
        if type(priority) is not int:
            priority = _check_priority(priority)
        bucket = self._lookup(key)
        if bucket is None:
            if timeout is not None or deadline is not None:
                now = self._clock.now()
                due = self._template._effective_deadline(timeout, deadline, now)
                if due is not None and due < now:
                    # A fresh bucket is full, so the only thing in the way is the deadline.
                    raise self._refuse_new(key, tokens, 0.0, "its deadline had already passed")
            bucket = self._admit(key, tokens)
            if bucket is None:
                raise RateLimitedError(
                    self._name,
                    max(0.0, self._next_full - self._clock.now()),
                    reason=f"all {self._max_keys} keyed buckets are busy",
                )
        else:
            self._buckets.move_to_end(key)
        await bucket.acquire(tokens, timeout=timeout, deadline=deadline, priority=priority)

    async def try_acquire(self, key: Hashable, tokens: float = 1) -> bool:
        """Take ``tokens`` from ``key``'s bucket if available now; never waits.

        Returns:
            True if taken; False if the bucket is short or (fail closed) no bucket is free.

        Raises:
            ValueError: Bad ``tokens``.
            TypeError: ``key`` not hashable, ``tokens`` not a number.
        """
        if not (tokens == 1 and tokens is not True):
            self._template._cost_of(tokens)
        bucket = self._lookup(key)
        if bucket is None:
            bucket = self._admit(key, tokens)
            if bucket is None:
                return False
        else:
            self._buckets.move_to_end(key)
        return await bucket.try_acquire(tokens)

    def _lookup(self, key: Hashable) -> TokenBucket | None:
        try:
            return self._buckets.get(key)
        except TypeError as exc:
            raise TypeError(
                f"the key of keyed limiter {self._name!r} must be hashable, "
                f"got {type(key).__name__}"
            ) from exc

    def _refuse_new(
        self, key: Hashable, tokens: float, retry_after: float, reason: str
    ) -> RateLimitedError:
        self._retired_rejected += 1
        if self._listeners:
            emit(self._listeners, "on_rejected", self._name, key, tokens, retry_after)
        return RateLimitedError(self._name, retry_after, reason=reason)

    def statistics(self) -> KeyedLimiterStatistics:
        """Return a snapshot of the limiter (walks the retained buckets)."""
        buckets = self._buckets.values()
        return KeyedLimiterStatistics(
            name=self._name,
            keys=len(self._buckets),
            max_keys=self._max_keys,
            waiters=sum(b._waiting for b in buckets),
            granted=self._retired_granted + sum(b._granted for b in buckets),
            rejected=self._retired_rejected + sum(b._rejected for b in buckets),
            evicted=self._evicted,
            evicted_lossy=self._evict_lossy,
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return (
            f"KeyedLimiter(name={self._name!r}, rate={self._rate!r}, burst={self._burst!r}, "
            f"keys={len(self._buckets)}, max_keys={self._max_keys})"
        )

    def _admit(self, key: Hashable, tokens: float) -> TokenBucket | None:
        """Make a bucket for a new key, or return ``None`` if it is refused (fail closed)."""
        buckets = self._buckets
        now = self._clock.now()
        if len(buckets) >= self._max_keys and not self._evict_full(now):
            if self._on_full == "reject":
                self._retired_rejected += 1
                if self._listeners:
                    retry_after = max(0.0, self._next_full - now)
                    emit(self._listeners, "on_rejected", self._name, key, tokens, retry_after)
                return None
            old_key, old = buckets.popitem(last=False)
            self._retire(old_key, old, lossy=True)
        bucket = self._template._spawn(key, self._listeners)
        buckets[key] = bucket
        # The newcomer may be full again sooner than the buckets seen by the last sweep: as soon
        # as the tokens it is about to take have refilled.
        soonest = now + tokens * self._template._interval
        self._next_full = min(self._next_full, soonest)
        return bucket

    def _evict_full(self, now: float) -> bool:
        """Drop full buckets, oldest first; return whether any room was made."""
        buckets = self._buckets
        oldest_key = next(iter(buckets))
        oldest = buckets[oldest_key]
        if oldest._is_full(now):
            del buckets[oldest_key]
            self._retire(oldest_key, oldest, lossy=False)
            return True
        if now < self._next_full:
            return False
        # Sweep once, and remember the earliest time any survivor could be full, so that a
        # stream of new keys against busy buckets costs O(1) each until then.
        full_keys = [k for k, b in buckets.items() if b._is_full(now)]
        for k in full_keys:
            self._retire(k, buckets.pop(k), lossy=False)
        # A bucket's fill time only moves later as it grants, so this stays a lower bound.
        self._next_full = min((b._full_at for b in buckets.values()), default=_NEG_INF)
        return bool(full_keys)

    def _retire(self, key: Hashable, bucket: TokenBucket, *, lossy: bool) -> None:
        self._retired_granted += bucket._granted
        self._retired_rejected += bucket._rejected
        if lossy:
            self._evict_lossy += 1
        else:
            self._evicted += 1
        if self._listeners:
            emit(self._listeners, "on_evicted", self._name, key, lossy)
