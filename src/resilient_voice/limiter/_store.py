"""The store seam: where the schedule of a bucket shared by several processes lives.

A shared store (Redis, issue 14) arbitrates capacity between processes; each process keeps its own
FIFO / priority / deadline queue (:mod:`._queue`). The seam is shaped for one round trip per batch:

- :meth:`BucketStore.reserve` is called by the head of a process's queue for every local waiter
  that is ready, in queue order, and answers on the store's clock: "your slot is at store-now +
  Δ". The caller sleeps Δ on its own monotonic clock, so clock skew between processes changes
  nothing and the error is one round trip. A request whose Δ would exceed its limit (what is
  left of its deadline) is refused before anyone sleeps, and reserving stops there (FIFO).
- A cancelled waiter's slot passes to the next local waiter; with nobody to take it, it goes back
  with :meth:`BucketStore.give_back`, which only takes it when the shared schedule still ends where
  this process left it (otherwise the slot is dropped, never double-spent).
- :meth:`BucketStore.pause` pushes the shared schedule forward, so every process waits (a 429 with
  ``Retry-After`` seen by one replica).

Stores never see waiters, priorities or tokens: only costs and depths in seconds of refill
(``cost = tokens / rate``, ``tau = burst / rate``), and results relative to the store's clock.
:class:`InMemoryBucketStore` is the reference implementation; it computes with :mod:`._gcra`, as a
remote store's script must.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice.errors import ResilientVoiceError
from resilient_voice.limiter import _gcra

__all__ = ["BucketStore", "InMemoryBucketStore", "Reservation", "StoreUnavailableError"]


class StoreUnavailableError(ResilientVoiceError):
    """A shared store did not answer in time or failed: the limiter's fallback applies.

    Raised by a remote store's methods (a timeout, a lost connection); a bucket catches it and
    follows its ``on_backend_error`` choice, so it does not reach callers of ``acquire``.
    """


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to :meth:`BucketStore.reserve`, relative to the store's clock.

    Attributes:
        delays: Seconds from the store's now until each reserved slot, for a prefix of the
            requested costs (all of them unless one was refused).
        refused_wait: The wait the first refused request would have needed, or ``None``.
        backlog: Seconds from the store's now until the shared bucket is full again (after this
            reservation): what the caller mirrors locally for projections and statistics.
        end: The schedule's end after this reservation, on the store's clock: an opaque token
            to hand back to :meth:`BucketStore.give_back`. :meth:`BucketStore.pause` answers
            with a reservation of nothing, for ``backlog`` and ``end``.
    """

    delays: tuple[float, ...]
    refused_wait: float | None
    backlog: float
    end: float


@runtime_checkable
class BucketStore(Protocol):
    """Where the schedule of shared buckets lives; every method must be atomic per key.

    ``key`` names one bucket (the limiter's name, plus a digest of the key for a
    :class:`KeyedLimiter`); implementations may prefix it and must expire idle keys.
    """

    async def reserve(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        """Reserve slots for ``costs`` in order; stop at the first whose wait exceeds its limit."""
        ...

    async def give_back(self, key: str, cost: float, end: float) -> bool:
        """Return ``cost`` if the schedule still ends at ``end``; report whether it was taken."""
        ...

    async def pause(self, key: str, seconds: float) -> Reservation:
        """Push the schedule's end to at least store-now + ``seconds``; reserve nothing."""
        ...


class InMemoryBucketStore:
    """A :class:`BucketStore` in this process's memory: the reference for other stores.

    A :class:`TokenBucket` does not need it (its default state is a field, read on the
    uncontended path); it specifies and tests the store contract through the same code path a
    remote store takes, and lets several buckets in one process share one schedule. Keys whose
    bucket is full again are dropped on access, so memory is bounded by the keys in use.

    Args:
        clock: The store's clock (a remote store would use its server's).
    """

    __slots__ = ("_clock", "_full_at")

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = _validate.clock(clock)
        self._full_at: dict[str, float] = {}

    async def reserve(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        now = self._clock.now()
        full, delays, refused = _gcra.reserve(
            self._full_at.get(key, _gcra.NEVER), now, costs, limits, tau
        )
        if full > now:
            self._full_at[key] = full
        else:
            self._full_at.pop(key, None)
        return Reservation(tuple(delays), refused, max(0.0, full - now), full)

    async def give_back(self, key: str, cost: float, end: float) -> bool:
        if self._full_at.get(key) != end:
            return False
        self._full_at[key] = end - cost
        return True

    async def pause(self, key: str, seconds: float) -> Reservation:
        now = self._clock.now()
        full = max(self._full_at.get(key, _gcra.NEVER), now + seconds)
        self._full_at[key] = full
        return Reservation((), None, full - now, full)

    def __len__(self) -> int:
        return len(self._full_at)

    def __repr__(self) -> str:
        return f"InMemoryBucketStore(keys={len(self._full_at)})"
