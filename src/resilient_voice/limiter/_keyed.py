"""KeyedLimiter: one token bucket per key (an account, a sender number, a client address).

Memory is bounded: at most ``max_keys`` buckets are retained, full ones are dropped first (a full
bucket equals a fresh one), and with every retained bucket busy a new key is refused (fail
closed) or the least recently used bucket is dropped anyway (fail open). With a ``store``, every
key's schedule is shared through it; the bound on retained buckets stays local.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

from resilient_voice import _validate
from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice.errors import RateLimitedError
from resilient_voice.events import (
    BucketEvicted,
    Listener,
    TokensRejected,
    check_listener,
    check_listeners,
    dispatch,
)
from resilient_voice.limiter import _gcra
from resilient_voice.limiter._bucket import TokenBucket
from resilient_voice.limiter._fallback import FallbackStore, OnBackendError
from resilient_voice.limiter._store import BucketStore

__all__ = ["KeyedLimiter", "KeyedLimiterStatistics"]


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


class KeyedLimiter:
    """One token bucket per key, with a bound on how many buckets are kept.

    A bucket that is full again is equivalent to a fresh one, so it can be dropped without losing
    anything. When a new key arrives and ``max_keys`` buckets are retained, the least recently
    used full bucket is dropped (all full buckets are dropped when the oldest is not full). If
    none is full, every retained key is actively limited: ``on_full="reject"`` (default) refuses
    the new key with :class:`~resilient_voice.RateLimitedError`, keeping every bound exact (fail
    closed); ``on_full="evict"`` drops the least recently used bucket anyway (fail open), which a
    listener sees as ``BucketEvicted(name, key, lossy=True)``.

    Args:
        rate: Tokens added per second, per key.
        burst: Tokens held per key when full.
        max_keys: Most buckets retained at once.
        clock: Clock to measure and wait on.
        name: Bounded name used in errors, listeners and metrics (never the key).
        listeners: Callables taking an :class:`~resilient_voice.events.Event`.
        on_full: ``"reject"`` or ``"evict"``, see above.
        store: A shared :class:`BucketStore` for every key's schedule (keys reach it as digests).
        on_backend_error: ``"local"``, ``"allow"`` or ``"deny"`` while a remote store is
            unavailable (see :class:`TokenBucket`).

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
        listeners: Iterable[Listener] = (),
        on_full: Literal["reject", "evict"] = "reject",
        store: BucketStore | None = None,
        on_backend_error: OnBackendError = "local",
    ) -> None:
        max_keys = _validate.whole("max_keys", max_keys)
        _validate.choice("on_full", on_full, ("reject", "evict"))
        _validate.optional_label("name", name)
        if store is not None and name is None:
            raise ValueError(
                "a keyed limiter with a shared store needs a name: the name is its key prefix "
                "in the store"
            )
        self._name = name or "keyed_limiter"
        # The template validates rate/burst/store once; per-key buckets copy its settings.
        self._template = TokenBucket(
            rate,
            burst,
            clock=clock,
            name=self._name,
            store=store,
            on_backend_error=on_backend_error,
        )
        self._rate = self._template.rate
        self._burst = self._template.burst
        self._clock = clock or SYSTEM_CLOCK
        self._listeners: tuple[Listener, ...] = check_listeners(listeners)
        shared = self._template._store
        if isinstance(shared, FallbackStore):
            shared._listeners = lambda: self._listeners  # one breaker for every key
        self._max_keys = max_keys
        self._on_full = on_full
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._next_full = _gcra.NEVER  # no retained bucket is full before this time
        self._evicted = 0
        self._evict_lossy = 0
        self._retired_granted = 0
        self._retired_rejected = 0

    @property
    def name(self) -> str:
        """The limiter's name."""
        return self._name

    @property
    def clock(self) -> Clock:
        """The clock every key's bucket measures and sleeps on, fixed at construction."""
        return self._clock

    def add_listener(self, listener: Listener) -> None:
        """Attach a listener to the limiter and every bucket it holds."""
        self._listeners = (*self._listeners, check_listener(listener))
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
            priority = _validate.integer("priority", priority)
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
        try:
            bucket = self._buckets.get(key)
        except TypeError:
            bucket = self._lookup(key)  # raises the TypeError that names this limiter
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
            dispatch(self._listeners, TokensRejected(self._name, key, tokens, retry_after))
        return RateLimitedError(self._name, retry_after, reason=reason)

    def statistics(self) -> KeyedLimiterStatistics:
        """Return a snapshot of the limiter (walks the retained buckets)."""
        buckets = self._buckets.values()
        return KeyedLimiterStatistics(
            name=self._name,
            keys=len(self._buckets),
            max_keys=self._max_keys,
            waiters=sum(b._waiters() for b in buckets),
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
                    event = TokensRejected(self._name, key, tokens, retry_after)
                    dispatch(self._listeners, event)
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
        self._next_full = min((b._full_at for b in buckets.values()), default=_gcra.NEVER)
        return bool(full_keys)

    def _retire(self, key: Hashable, bucket: TokenBucket, *, lossy: bool) -> None:
        self._retired_granted += bucket._granted
        self._retired_rejected += bucket._rejected
        if lossy:
            self._evict_lossy += 1
        else:
            self._evicted += 1
        if self._listeners:
            dispatch(self._listeners, BucketEvicted(self._name, key, lossy))
