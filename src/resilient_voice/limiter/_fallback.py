"""What a bucket does while its shared store is slow or gone: ``on_backend_error``.

:class:`FallbackStore` wraps a remote store (Redis) for one limiter. While the store answers,
it passes every call through. A call that raises :class:`~._store.StoreUnavailableError` (a
timeout, a lost connection) opens a small breaker around the store
(:class:`~resilient_voice._store_watch.StoreWatch`, shared with call leases): calls are answered
locally, without touching the network, until a re-probe time that backs off (0.5 s doubling to
8 s, with jitter); the first call after it probes the store with its real request, and a
success closes the breaker. Each transition is one log line and one
:class:`~resilient_voice.events.StoreAvailabilityChanged` event, never one per call.

While the store is unavailable:

- ``"local"``: this replica keeps its share of the limit, ``rate / replicas``, in memory.
  The number of replicas is the store's (``live_replicas(key)``: heartbeats written with each
  reservation, expiring after about 3 s). :class:`~resilient_voice.redis.RedisBackend` answers
  the most it reported in the 60 s up to its last answer, not the last count, since a replica
  missing from one count still serves its share; never fewer than its ``min_replicas`` (1
  unless the operator states the fleet's size), which covers a replica that never heard from
  Redis or saw itself alone at start-up.
- ``"allow"``: everything is granted; ``"deny"``: everything is refused.

**No burst on the way out**: the local schedule of a key starts where the shared one was last
seen to end (slots reserved from the store still stand). **No burst on return**: the probe
first pushes the shared schedule past what this replica granted locally during the outage (one
extra round trip, once per key and outage), so the fleet does not grant a fresh burst on top of
the local grants.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

from resilient_voice._clock import Clock
from resilient_voice._store_watch import StoreWatch
from resilient_voice.events import Listener
from resilient_voice.limiter._store import (
    BucketStore,
    InMemoryBucketStore,
    Reservation,
    StoreUnavailableError,
)

__all__ = ["FALLBACKS", "FallbackStore", "OnBackendError"]

OnBackendError = Literal["local", "allow", "deny"]
FALLBACKS: tuple[OnBackendError, ...] = ("local", "allow", "deny")

_log = logging.getLogger("resilient_voice.limiter")
_SEEN_MAX = 4096  # schedules remembered before the ones already full are swept


class FallbackStore:
    """A remote :class:`BucketStore` behind a breaker, with a local answer while it is down."""

    __slots__ = (
        "_listeners",
        "_local",
        "_mode",
        "_name",
        "_now",
        "_outage_keys",
        "_seen",
        "_store",
        "_watch",
    )

    def __init__(
        self,
        store: BucketStore,
        mode: OnBackendError,
        *,
        clock: Clock,
        name: str,
        listeners: Callable[[], tuple[Listener, ...]],
    ) -> None:
        self._store = store
        self._mode = mode
        self._now = clock.now
        self._local = InMemoryBucketStore(clock=clock)
        self._name = name
        self._listeners = listeners
        self._watch = StoreWatch(
            subject="limiter",
            primitive="limiter",
            name=name,
            mode=mode,
            now=self._now,
            listeners=listeners,
            log=_log,
        )
        self._outage_keys: set[str] = set()
        self._seen: dict[str, float] = {}

    @property
    def inner(self) -> BucketStore:
        """The wrapped store."""
        return self._store

    @property
    def available(self) -> bool:
        """Whether the store answered the last call made to it."""
        return not self._watch.down

    @property
    def transitions(self) -> int:
        """How many times the store went down or came back."""
        return self._watch.transitions

    async def reserve(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        if self._watch.probing():
            try:
                if key in self._outage_keys:
                    # No burst on return: the shared schedule first moves past the local grants.
                    backlog = self._local._full_at.get(key, 0.0) - self._now()
                    if backlog > 0.0:
                        await self._store.pause(key, backlog)
                answer = await self._store.reserve(key, costs, limits, tau)
            except StoreUnavailableError as error:
                self._watch.failed(error)
            else:
                if self._watch.down:
                    self._watch.recovered()
                self._outage_keys.discard(key)
                self._remember(key, answer)
                return answer
        return await self._fallback(key, costs, limits, tau)

    def _remember(self, key: str, answer: Reservation) -> None:
        """Keep where the shared schedule ends, on the local clock, to start the fallback there.

        Slots reserved from the store still stand when it goes away; a local schedule starting
        full would grant a burst on top of them.
        """
        seen = self._seen
        if len(seen) >= _SEEN_MAX:
            now = self._now()
            for stale in [k for k, v in seen.items() if v <= now]:
                del seen[stale]
        seen[key] = self._now() + answer.backlog

    async def _fallback(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        if self._mode == "allow":
            return Reservation(tuple(0.0 for _ in costs), None, 0.0, 0.0)
        if self._mode == "deny":
            return Reservation((), max(0.0, self._watch.next_probe - self._now()), 0.0, 0.0)
        live = getattr(self._store, "live_replicas", None)
        share = max(1, live(key)) if live is not None else 1
        scaled = [cost * share for cost in costs]
        seen = self._seen.pop(key, None)
        if seen is not None and seen > self._local._full_at.get(key, -math.inf):
            self._local._full_at[key] = seen
        self._outage_keys.add(key)
        return await self._local.reserve(key, scaled, limits, max(tau, *scaled))

    async def give_back(self, key: str, cost: float, end: float) -> bool:
        if self._watch.down:
            return await self._local.give_back(key, cost, end)
        try:
            return await self._store.give_back(key, cost, end)
        except StoreUnavailableError as error:
            self._watch.failed(error)
            return False

    async def pause(self, key: str, seconds: float) -> Reservation:
        if self._watch.probing():
            try:
                answer = await self._store.pause(key, seconds)
            except StoreUnavailableError as error:
                self._watch.failed(error)
            else:
                if self._watch.down:
                    self._watch.recovered()
                self._remember(key, answer)
                return answer
        self._outage_keys.add(key)
        return await self._local.pause(key, seconds)

    def __repr__(self) -> str:
        return (
            f"FallbackStore({self._store!r}, mode={self._mode!r}, available={not self._watch.down})"
        )
