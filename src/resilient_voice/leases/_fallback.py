"""What a lease set does while its shared store is slow or gone: ``on_backend_error``.

:class:`FallbackLeaseStore` wraps a remote :class:`~._store.LeaseStore` (Redis) for one lease
set. While the store answers, every call passes through. A call that raises
:class:`~resilient_voice.limiter.StoreUnavailableError` opens a small breaker around the store
(:class:`~resilient_voice._store_watch.StoreWatch`, shared with the limiter):
calls are answered locally until a re-probe time that backs off (0.5 s doubling to 8 s, with
jitter); the next acquire after it probes the store, and a success closes the breaker. Each
transition is one log line and one :class:`~resilient_voice.events.StoreAvailabilityChanged`.

While the store is unavailable, acquires follow the mode:

- ``"local"``: this replica grants up to its share of the capacity, ``capacity // live
  replicas`` (at least 1), from an in-memory table, sized when the store goes away; the live
  replicas are the store's count of heartbeats (``live_lease_replicas(name)``; the Redis
  backend answers the most it reported in the 60 s up to its last answer, as for the limiter,
  and never fewer than its ``min_replicas``, which is 1 unless the operator states the fleet's
  size).
- ``"allow"``: every acquire is granted (nothing is counted); ``"deny"``: every acquire waits or
  is refused until the store answers again.

Leases granted locally carry ids starting ``local-`` (``allow-`` for ``"allow"``) and live in
the local table until released, reconciled or past their TTL, also after the store is back;
until then they count against the shared capacity of this replica's acquires (``extra``). A
bind, release or unknown mark of a shared lease that cannot reach the store is kept (at most
:data:`PENDING_MAX`, oldest dropped) and replayed in order when the store answers again, so a
webhook received during the outage still frees its slot. A release by call id bound to no
local lease goes to the store, and is also kept by the local table as an early release while
one of its leases is unbound, so that a local lease whose webhook beats its bind is freed too.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import anyio
from anyio.abc import TaskStatus

from resilient_voice._clock import Clock
from resilient_voice._store_watch import StoreWatch
from resilient_voice.events import Listener
from resilient_voice.leases._store import Grant, InMemoryLeaseStore, LeaseStore, LeaseView, Stored
from resilient_voice.limiter import StoreUnavailableError

__all__ = ["PENDING_MAX", "FallbackLeaseStore"]

_log = logging.getLogger("resilient_voice.leases")

PENDING_MAX = 10_000
"""Most binds, releases and marks kept for replay while the store is unavailable."""

LOCAL = "local-"
ALLOW = "allow-"

T = TypeVar("T")
# (op, lease or call id, call or attempt id, generation, an unknown mark's context)
_Pending = tuple[Literal["b", "r", "c", "u"], str, str, int | None, str | None]


class FallbackLeaseStore:
    """A remote :class:`~._store.LeaseStore` behind a breaker, answered locally while down."""

    __slots__ = (
        "_allowed",
        "_capacity",
        "_listeners",
        "_local",
        "_mode",
        "_name",
        "_now",
        "_pending",
        "_store",
        "_watch",
    )

    def __init__(
        self,
        store: LeaseStore,
        mode: Literal["local", "allow", "deny"],
        *,
        clock: Clock,
        name: str,
        listeners: Callable[[], tuple[Listener, ...]],
    ) -> None:
        self._store = store
        self._mode = mode
        self._now = clock.now
        # Its lease ids are named so that their binds and releases stay local.
        self._local = InMemoryLeaseStore(clock=clock, id_prefix=LOCAL)
        self._name = name
        self._listeners = listeners
        self._watch = StoreWatch(
            subject="call leases",
            primitive="leases",
            name=name,
            mode=mode,
            now=self._now,
            listeners=listeners,
            log=_log,
        )
        self._pending: deque[_Pending] = deque(maxlen=PENDING_MAX)
        self._allowed = 0
        self._capacity = 1

    @property
    def inner(self) -> LeaseStore:
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

    def declare_leases(self, name: str, capacity: int, ttl: float, recovery: float) -> None:
        self._store.declare_leases(name, capacity, ttl, recovery)
        self._local.declare_leases(name, capacity, ttl, recovery)
        self._capacity = capacity

    def _failed(self, error: StoreUnavailableError) -> None:
        if self._watch.failed(error):
            live = getattr(self._store, "live_lease_replicas", None)
            replicas = max(1, live(self._name)) if live is not None else 1
            self._local.table(self._name).resize(max(1, self._capacity // replicas))

    async def _recovered(self, name: str) -> None:
        self._watch.recovered()
        while self._pending:
            op, first, second, generation, context = self._pending[0]
            try:
                if op == "b":
                    await self._store.lease_bind(name, first, second)
                elif op == "r":
                    await self._store.lease_release(name, first)
                elif op == "c":
                    await self._store.lease_release_call(name, first, generation)
                else:
                    # Marked on the store's clock when replayed: later than the mark, so a
                    # settle_after counted from it only holds the slot longer.
                    await self._mark(name, first, second, context)
            except StoreUnavailableError as error:
                self._failed(error)
                return
            self._pending.popleft()

    async def _remote(self, name: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()`` on the store when it is up or a probe is due; ``None`` when it is down."""
        if not self._watch.probing():
            return None
        try:
            answer = await call()
        except StoreUnavailableError as error:
            self._failed(error)
            return None
        if self._watch.down:
            await self._recovered(name)
        return answer

    def _local_view(self, name: str) -> LeaseView:
        return self._local.lease_view(name)

    def lease_view(self, name: str) -> LeaseView:
        return self._local_view(name) if self._watch.down else self._store.lease_view(name)

    async def lease_acquire(self, name: str, extra: int = 0) -> tuple[Grant | None, LeaseView]:
        held_here = self._local.table(name).in_use + extra
        answer = await self._remote(name, lambda: self._store.lease_acquire(name, held_here))
        if answer is not None:
            return answer
        return await self._acquire_here(name)

    async def _acquire_here(self, name: str) -> tuple[Grant | None, LeaseView]:
        """An acquire answered by the mode while the store is unavailable."""
        if self._mode == "allow":
            self._allowed += 1
            return Grant(f"{ALLOW}{uuid.uuid4().hex}", self._allowed), self._local_view(name)
        if self._mode == "deny":
            view = self._local_view(name)
            wait = max(0.0, self._watch.next_probe - self._now())
            return None, LeaseView(view.in_use, view.effective, wait, None)
        return await self._local.lease_acquire(name)

    async def lease_queue(
        self, name: str, priority: int, ticket: str | None, wait: bool, extra: int = 0
    ) -> tuple[Grant | None, str | None, LeaseView]:
        held_here = self._local.table(name).in_use + extra
        answer = await self._remote(
            name, lambda: self._store.lease_queue(name, priority, ticket, wait, held_here)
        )
        if answer is not None:
            return answer
        # Answered here: the local queue keeps this process's order; a ticket stays held
        # (the caller leaves it), and the store's queue takes the waiter back when it answers.
        grant, view = await self._acquire_here(name)
        return grant, ticket, view

    async def lease_leave(self, name: str, ticket: str) -> None:
        # Tried even while the store is down: the store then forgets the ticket, which lapses.
        with contextlib.suppress(StoreUnavailableError):
            await self._store.lease_leave(name, ticket)

    async def lease_bind(self, name: str, lease_id: str, call_id: str) -> tuple[bool, LeaseView]:
        if lease_id.startswith(LOCAL):
            return await self._local.lease_bind(name, lease_id, call_id)
        if lease_id.startswith(ALLOW):
            return False, self._local_view(name)
        answer = await self._remote(name, lambda: self._store.lease_bind(name, lease_id, call_id))
        if answer is None:
            self._pending.append(("b", lease_id, call_id, None, None))
            return False, self._local_view(name)
        return answer

    async def lease_release(self, name: str, lease_id: str) -> tuple[str | None, bool, LeaseView]:
        if lease_id.startswith(LOCAL):
            return await self._local.lease_release(name, lease_id)
        if lease_id.startswith(ALLOW):
            return None, False, self._local_view(name)
        answer = await self._remote(name, lambda: self._store.lease_release(name, lease_id))
        if answer is None:
            self._pending.append(("r", lease_id, "", None, None))
            return None, False, self._local_view(name)
        return answer

    async def lease_release_call(
        self, name: str, call_id: str, generation: int | None
    ) -> tuple[str | None, LeaseView]:
        table = self._local.table(name)
        if table.bound(call_id):
            return await self._local.lease_release_call(name, call_id, generation)
        # Also an early release for a local lease whose create is pending: the local table
        # keeps it only while one of its leases is unbound, and its bind frees the slot. The
        # table directly: its next operation reports the leases its TTL reclaims.
        table.release_call(call_id, generation, self._now())
        answer = await self._remote(
            name, lambda: self._store.lease_release_call(name, call_id, generation)
        )
        if answer is None:
            self._pending.append(("c", call_id, "", generation, None))
            return None, self._local_view(name)
        return answer

    async def lease_mark_unknown(
        self, name: str, lease_id: str, attempt_id: str, context: str | None = None
    ) -> bool:
        if lease_id.startswith(LOCAL):
            return await self._local.lease_mark_unknown(name, lease_id, attempt_id, context)
        if lease_id.startswith(ALLOW):
            return False
        answer = await self._remote(name, lambda: self._mark(name, lease_id, attempt_id, context))
        if answer is None:
            self._pending.append(("u", lease_id, attempt_id, None, context))
            return True
        return answer

    async def _mark(self, name: str, lease_id: str, attempt_id: str, context: str | None) -> bool:
        """The store's mark; without a context in the older form, so a store written before
        marks carried one still takes them."""
        if context is None:
            return await self._store.lease_mark_unknown(name, lease_id, attempt_id)
        return await self._store.lease_mark_unknown(name, lease_id, attempt_id, context)

    async def lease_unknown(self, name: str) -> list[Stored]:
        local = await self._local.lease_unknown(name)
        remote = await self._remote(name, lambda: self._store.lease_unknown(name))
        return [*(remote or []), *local]

    async def lease_reconcile(
        self, name: str, live: frozenset[str], as_of: float, age: float
    ) -> tuple[list[tuple[str, str | None]], LeaseView]:
        gone, view = await self._local.lease_reconcile(name, live, as_of, age)
        answer = await self._remote(
            name, lambda: self._store.lease_reconcile(name, live, as_of, age)
        )
        if answer is None:
            return gone, view
        return [*gone, *answer[0]], answer[1]

    async def lease_capacity(
        self, name: str, signal: bool, concurrency_limit: int | None, remaining: int | None
    ) -> tuple[int, int, LeaseView]:
        local = await self._local.lease_capacity(name, signal, concurrency_limit, remaining)
        answer = await self._remote(
            name, lambda: self._store.lease_capacity(name, signal, concurrency_limit, remaining)
        )
        return local if answer is None else answer

    async def lease_watch(
        self,
        name: str,
        wake: Callable[[], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._store.lease_watch(name, wake, task_status=task_status)

    def __repr__(self) -> str:
        available = not self._watch.down
        return f"FallbackLeaseStore({self._store!r}, mode={self._mode!r}, available={available})"
