"""CallLeases: the async facade over a lease store and this process's queue of waiters.

The facade only awaits, times and reports. The rules (capacity, generations, bindings, early
releases, TTL, reconciliation, capacity learning) are :class:`~._core.LeaseTable`'s, applied by a
:class:`~._store.LeaseStore`; the order of this process's waiters is :mod:`._queue`'s.

How waiting works in memory: a caller who finds nobody queued asks the store at once. Otherwise
it queues, and only the front of the queue asks the store; a refused front sleeps until
something may have freed a slot: a release or reconciliation in this process (it is woken), or
the time the store named (the oldest lease's TTL, a step of capacity recovery). A front that
gets a lease wakes the next one.

On a shared store the order is fleet-wide. Every caller asks the store at once (one round trip,
as without waiters), as a newcomer: the store grants only if more slots are free than waiters of
the whole fleet outrank it, and otherwise hands a caller that will wait a ticket, its place in
the fleet's queue, in the same step. Every waiter holds a ticket, and this process queues its
waiters in the order of their tickets, so again only the front asks (with its ticket: granted
when fewer tickets rank ahead of it than slots are free); it also sleeps until woken by a
message from the store (a release, a waiter ahead that left), bounded by a poll interval. A
waiter that gives up (cancelled, past its deadline) leaves its place, shielded; the store lets a
ticket lapse whose process stopped refreshing it (a crash).

Nothing is ever handed to a waiter, so a waiter cancelled at any point (even right after a
release woke it) holds nothing: it leaves and wakes the next.

Over 400 lines: close to half of it is the public API's documentation (what each operation
promises about idempotence, generations, early releases and ``as_of``); the rest is one
facade whose operations all report through the same counters and events.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import anyio
import anyio.abc
import anyio.lowlevel

from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice.errors import CapacityExhaustedError
from resilient_voice.events import (
    CapacityChanged,
    LeaseAcquired,
    LeaseRefused,
    LeaseReleased,
    LeaseWaiting,
    Listener,
    check_listener,
    check_listeners,
    dispatch,
)
from resilient_voice.leases._fallback import FallbackLeaseStore
from resilient_voice.leases._queue import GONE, GRANTED, WAITING, Waiter, WaiterQueue
from resilient_voice.leases._records import (
    Lease,
    LeaseStatistics,
    check_call_id,
    check_context,
    check_lease,
)
from resilient_voice.leases._store import Grant, InMemoryLeaseStore, LeaseStore, LeaseView

__all__ = ["CallLeases", "OnBackendError"]

OnBackendError = Literal["local", "allow", "deny"]
_FALLBACKS: tuple[OnBackendError, ...] = ("local", "allow", "deny")

REMOTE_POLL = 2.0
"""Most seconds a refused front waiter sleeps on a remote store without a wake-up (a message
from another replica may be lost: Pub/Sub delivers at most once)."""

_ReleaseReason = Literal["webhook", "lease", "ttl", "reconcile"]


class CallLeases:
    """Call slots held for a whole phone call, released when the provider says it ended.

    An account (or an assistant, a phone number) may only have so many calls in progress. A
    lease is taken before a call is created and held until the provider's status callback or
    end-of-call report says the call is over, minutes later and perhaps in another replica:
    ``bind`` it to the call id the create returns, and ``release`` it by call id from the
    webhook. Lost webhooks are covered by the TTL (the longest a call may last) and by
    ``reconcile`` against the provider's list of live calls; duplicated and stale webhooks free
    nothing twice (releases are idempotent and fenced by the lease's generation). Build one per
    account at startup and share it::

        leases = CallLeases("twilio:AC...", 10, ttl=3600)
        lease = await leases.acquire(timeout=30)
        call = await create_call(..., status_callback=url_with(lease.id, lease.generation))
        await leases.bind(lease, call.sid)

    Waiting callers are served by priority (higher first), first come first served within a
    priority; with a shared store, across every process sharing the set (the order of arrival
    at the store). A cancelled waiter never holds a slot, and leaves its place to the next.

    Args:
        name: The set's name, bounded (it labels metrics and keys a shared store).
        capacity: The most leases held at once (>= 1): the account's concurrent-call limit.
        ttl: Seconds after its acquire at which a lease still held is reclaimed (> 0): the
            longest a call may last. Also how long a release by call id that arrives before the
            bind is remembered.
        clock: The clock to measure and wait on; inject a ManualClock in tests.
        store: A shared :class:`~resilient_voice.leases.LeaseStore` (a ``RedisBackend`` makes
            the capacity fleet-wide); ``None`` keeps the leases in this process.
        on_backend_error: While a shared store is unavailable: ``"local"`` (default) holds this
            replica's share (``capacity // live replicas``, at least 1; see ``RedisBackend``'s
            ``min_replicas``) in memory, ``"allow"`` grants every acquire, ``"deny"`` refuses
            every acquire.
        capacity_recovery: Seconds without a capacity signal after which the effective
            capacity grows back by 1 (> 0).
        listeners: Callables taking an :class:`~resilient_voice.events.Event`.

    Raises:
        ValueError: ``name`` empty or holding braces; a number out of range;
            ``on_backend_error`` unknown.
        TypeError: An argument of the wrong type; ``store`` not a lease store.
    """

    __slots__ = (
        "_acquired",
        "_capacity",
        "_clock",
        "_effective",
        "_listeners",
        "_mode",
        "_name",
        "_now",
        "_poll",
        "_queue",
        "_reclaimed_reconcile",
        "_reclaimed_ttl",
        "_recovery",
        "_refused",
        "_released",
        "_remote",
        "_signals",
        "_store",
        "_ttl",
    )

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        ttl: float,
        clock: Clock | None = None,
        store: LeaseStore | None = None,
        on_backend_error: OnBackendError = "local",
        capacity_recovery: float = 30.0,
        listeners: Iterable[Listener] = (),
    ) -> None:
        _validate.label("name", name)
        if "{" in name or "}" in name:
            raise ValueError(f"name must be a string without braces, got {name!r}")
        self._name = name
        self._capacity = _validate.whole("capacity", capacity)
        self._ttl = _validate.number("ttl", ttl)
        self._recovery = _validate.number("capacity_recovery", capacity_recovery)
        self._clock = _validate.clock(clock)
        self._now = self._clock.now
        self._mode: OnBackendError = _validate.choice(  # type: ignore[assignment]
            "on_backend_error", on_backend_error, _FALLBACKS
        )
        self._listeners = check_listeners(listeners)
        if store is None:
            store = InMemoryLeaseStore(clock=self._clock)
            self._remote = False
        elif isinstance(store, InMemoryLeaseStore):
            self._remote = False
        elif isinstance(store, LeaseStore):
            self._remote = True
            # A remote store may be slow or gone: answer locally behind a breaker meanwhile.
            store = FallbackLeaseStore(
                store,
                self._mode,
                clock=self._clock,
                name=name,
                listeners=lambda: self._listeners,
            )
        else:
            raise TypeError(
                f"store must be a lease store (a RedisBackend), got {type(store).__name__}"
            )
        store.declare_leases(name, self._capacity, self._ttl, self._recovery)
        self._store: LeaseStore = store
        self._poll = REMOTE_POLL if self._remote else math.inf
        self._queue = WaiterQueue()
        self._effective = self._capacity
        self._acquired = 0
        self._refused = 0
        self._released = 0
        self._reclaimed_ttl = 0
        self._reclaimed_reconcile = 0
        self._signals = 0

    @property
    def name(self) -> str:
        """The set's name."""
        return self._name

    @property
    def capacity(self) -> int:
        """The configured capacity."""
        return self._capacity

    @property
    def ttl(self) -> float:
        """Seconds a lease lives at most."""
        return self._ttl

    @property
    def capacity_recovery(self) -> float:
        """Seconds per step of capacity recovery."""
        return self._recovery

    @property
    def clock(self) -> Clock:
        """The clock this set measures and waits on."""
        return self._clock

    def add_listener(self, listener: Listener) -> None:
        """Attach a listener (for example a metrics exporter) after construction."""
        self._listeners = (*self._listeners, check_listener(listener))

    async def acquire(
        self,
        timeout: float | None = None,  # noqa: ASYNC109  (a queue-aware limit, not a cancel scope)
        deadline: float | None = None,
        priority: int = 0,
    ) -> Lease:
        """Wait for a free call slot and take it.

        Args:
            timeout: Give up after this many seconds; ``0`` takes a slot only if one is free
                now and nobody is queued.
            deadline: Give up at this time on the leases' clock; one already past refuses
                at once.
            priority: Higher priorities are served first; FIFO within a priority.

        Returns:
            The :class:`Lease`: bind it to the call id, or release it if the create failed.

        Raises:
            CapacityExhaustedError: No slot freed by the deadline.
            ValueError: ``timeout`` negative or NaN, ``deadline`` NaN.
            TypeError: ``priority`` not an int.
        """
        if type(priority) is not int:
            priority = _validate.integer("priority", priority)
        now = self._now()
        if timeout is not None or deadline is not None:
            deadline = self._deadline(timeout, deadline, now)
            if deadline < now:
                raise self._refuse("its deadline had already passed", self._store_view())
        ticket = None
        if self._remote and not self._queue.unticketed:
            # The fleet's queue is the store's: ask it (one round trip), whoever waits here
            # (unless some waiter here has no place in it yet: the store was unreachable).
            wait = deadline is None or deadline > now
            grant, ticket, view = await self._ask(priority, None, wait)
            if grant is not None:
                return self._grant(grant, now, view)
            if not wait:
                raise self._refuse("no slot is free for it", view)
        elif not self._queue.waiting:
            grant, view = await self._ask_here()
            if grant is not None:
                return self._grant(grant, now, view)
            if deadline is not None and deadline <= now:
                raise self._refuse("no slot is free", view)
        elif deadline is not None and deadline <= now:
            raise self._refuse("callers are queued ahead", self._store_view())
        return await self._wait(deadline, priority, now, ticket)

    async def bind(self, lease: Lease, call_id: str) -> Lease:
        """Bind ``lease`` to the provider's ``call_id``; return the bound lease.

        A release by this call id that arrived first (the webhook raced the create's response)
        frees the lease at once.

        Raises:
            TypeError: ``lease`` not a Lease, ``call_id`` not a string.
            ValueError: ``call_id`` empty.
        """
        check_lease(lease)
        check_call_id(call_id)
        if self._remote:
            with anyio.CancelScope(shield=True):
                answer = await self._store.lease_bind(self._name, lease.id, call_id)
        else:
            answer = await self._store.lease_bind(self._name, lease.id, call_id)
        freed, view = answer
        self._absorb(view)
        if freed:
            self._freed(lease.id, call_id, "webhook", view)
        return Lease(lease.id, lease.generation, lease.acquired_at, call_id, None, self)

    async def release(
        self, lease_or_call_id: Lease | str, *, generation: int | None = None
    ) -> bool:
        """Free a lease, by the lease or by its call id; idempotent.

        By call id (a status callback, an end-of-call report), it frees the lease bound to that
        call, and with ``generation`` only a binding of that generation: a stale webhook for an
        older binding frees nothing. A release by call id that arrives before the bind is
        remembered for ``ttl`` and frees the lease when the bind comes. Unknown ids and leases
        already freed are harmless.

        Returns:
            Whether this call freed a lease.

        Raises:
            TypeError: Neither a Lease nor a string; ``generation`` not an int.
        """
        if generation is not None:
            generation = _validate.integer("generation", generation)
        if isinstance(lease_or_call_id, Lease):
            if generation is not None and generation != lease_or_call_id.generation:
                return False
            if self._remote:
                # Shielded: a release lost to a cancellation would hold the slot until the TTL.
                with anyio.CancelScope(shield=True):
                    answer = await self._store.lease_release(self._name, lease_or_call_id.id)
            else:
                answer = await self._store.lease_release(self._name, lease_or_call_id.id)
            call_id, freed, view = answer
            self._absorb(view)
            if freed:
                self._freed(lease_or_call_id.id, call_id, "lease", view)
            return freed
        check_call_id(lease_or_call_id)
        if self._remote:
            with anyio.CancelScope(shield=True):
                answer_call = await self._store.lease_release_call(
                    self._name, lease_or_call_id, generation
                )
        else:
            answer_call = await self._store.lease_release_call(
                self._name, lease_or_call_id, generation
            )
        lease_id, view = answer_call
        self._absorb(view)
        if lease_id is None:
            return False
        self._freed(lease_id, lease_or_call_id, "webhook", view)
        return True

    async def mark_unknown(
        self, lease: Lease, attempt_id: str, *, context: str | None = None
    ) -> Lease:
        """Keep ``lease`` held for a create whose outcome is unknown; return the marked lease.

        The client's reconciliation settles it: bind it when the provider lists a call for
        ``attempt_id``, release it when not, once the create is too old to still be processed
        (``reconcile_leases(settle_after=)``, counted from this mark). Until then only the TTL
        frees it. The store keeps, with the attempt id, the time of the mark and ``context``,
        so that any replica sharing the set can settle it (:meth:`unknown` lists them).

        Args:
            lease: The lease of the create.
            attempt_id: The create's attempt id.
            context: What the client needs to find the call, in a form it defines (TwilioClient
                stores the destination, the caller and the attempt's start as JSON): a
                printable string of at most 1024 characters, or ``None``.

        Raises:
            TypeError: ``lease`` not a Lease, ``attempt_id`` not a string, ``context`` neither
                a string nor ``None``.
            ValueError: ``context`` empty, too long, or holding a control character.
        """
        check_lease(lease)
        if not isinstance(attempt_id, str) or not attempt_id:
            raise TypeError(f"attempt_id must be a non-empty string, got {attempt_id!r}")
        context = check_context(context)
        with anyio.CancelScope(shield=self._remote):
            await self._store.lease_mark_unknown(self._name, lease.id, attempt_id, context)
        return Lease(
            lease.id,
            lease.generation,
            lease.acquired_at,
            None,
            attempt_id,
            self,
            marked_at=self._now(),
            context=context,
        )

    async def unknown(self) -> tuple[Lease, ...]:
        """The held leases of creates whose outcome is unknown, oldest first.

        Every replica's marks, each with its ``marked_at`` (on this set's clock) and
        ``context``.
        """
        now = self._now()
        stored = await self._store.lease_unknown(self._name)
        return tuple(
            Lease(
                s.id,
                s.generation,
                now - s.age,
                s.call_id,
                s.attempt_id,
                self,
                marked_at=None if s.marked_age is None else now - s.marked_age,
                context=s.context,
            )
            for s in stored
        )

    async def reconcile(self, live_call_ids: Iterable[str], *, as_of: float | None = None) -> int:
        """Free the leases whose calls the provider no longer lists.

        Args:
            live_call_ids: The ids of the calls in progress, as the provider listed them.
            as_of: When that list was fetched, on the leases' clock (default: now). Only
                leases bound before it are considered: a lease acquired or bound later is not
                in the list because it is too new, not because its call ended. Leases whose
                create's outcome is unknown are never freed here.

        Returns:
            How many leases were freed.

        Raises:
            TypeError: ``live_call_ids`` is a string (not an iterable of ids).
            ValueError: ``as_of`` NaN or after now.
        """
        if isinstance(live_call_ids, str):
            raise TypeError("live_call_ids must be an iterable of call ids, not one string")
        live = frozenset(live_call_ids)
        now = self._now()
        if as_of is None:
            as_of = now
        else:
            as_of = _validate.number("as_of", as_of, minimum=-math.inf, inclusive=True)
            if as_of > now:
                raise ValueError(f"as_of ({as_of!r}) is after the leases' now ({now!r})")
        with anyio.CancelScope(shield=self._remote):
            gone, view = await self._store.lease_reconcile(self._name, live, as_of, now - as_of)
        self._absorb(view)
        for lease_id, call_id in gone:
            self._freed(lease_id, call_id, "reconcile", view)
        return len(gone)

    async def signal_capacity(self, reason: str) -> None:
        """The provider refused or ended a call for concurrency: halve the effective capacity.

        At least 1 remains; it grows back by 1 every ``capacity_recovery`` seconds without a
        signal, up to ``capacity``. Leases already held stay held.

        Args:
            reason: A short, bounded code for logs and events (``"twilio:10004"``).
        """
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a string, got {type(reason).__name__}")
        with anyio.CancelScope(shield=self._remote):
            old, new, view = await self._store.lease_capacity(self._name, True, None, None)
        self._signals += 1
        self._effective = view.effective
        self._absorb(view)
        if self._listeners:
            dispatch(self._listeners, CapacityChanged(self._name, old, new, "signal", reason))

    async def observe_provider_limits(
        self, concurrency_limit: int | None = None, remaining: int | None = None
    ) -> None:
        """Set the effective capacity from the limits the provider reported.

        ``concurrency_limit`` (Vapi's ``subscriptionLimits.concurrencyLimit``) caps it at
        ``min(capacity, concurrency_limit)``; ``remaining`` (``remainingConcurrentCalls``)
        sets it to ``in_use + remaining``, the slots the provider still counts free on top of
        the leases held; with both, the lower wins. The result is clamped to
        ``[1, capacity]`` and recovery restarts from it, as after a signal.

        Raises:
            TypeError: A limit not an int.
            ValueError: A limit negative.
        """
        limit = _validate.optional_whole("concurrency_limit", concurrency_limit, minimum=0)
        left = _validate.optional_whole("remaining", remaining, minimum=0)
        if limit is None and left is None:
            return
        with anyio.CancelScope(shield=self._remote):
            old, new, view = await self._store.lease_capacity(self._name, False, limit, left)
        self._effective = view.effective
        self._absorb(view)
        if old != new and self._listeners:
            dispatch(self._listeners, CapacityChanged(self._name, old, new, "provider", ""))

    def statistics(self) -> LeaseStatistics:
        """A snapshot (a shared store is not queried: its counts are as of its last answer)."""
        view = self._store_view()
        return LeaseStatistics(
            name=self._name,
            capacity=self._capacity,
            effective_capacity=view.effective,
            in_use=view.in_use,
            waiting=self._queue.waiting,
            acquired=self._acquired,
            refused=self._refused,
            released=self._released,
            reclaimed_by_ttl=self._reclaimed_ttl,
            reclaimed_by_reconcile=self._reclaimed_reconcile,
            capacity_signals=self._signals,
        )

    def __repr__(self) -> str:
        return (
            f"CallLeases(name={self._name!r}, capacity={self._capacity!r}, ttl={self._ttl!r}, "
            f"waiting={self._queue.waiting})"
        )

    def _deadline(self, timeout: float | None, deadline: float | None, now: float) -> float:
        if timeout is not None:
            by_timeout = now + _validate.non_negative("timeout", timeout)
            if deadline is None or by_timeout < deadline:
                return by_timeout
        if deadline is None or math.isnan(deadline):
            raise ValueError("deadline must not be NaN")
        return deadline

    def _store_view(self) -> LeaseView:
        view = self._store.lease_view(self._name)
        self._absorb(view)
        return view

    async def _ask_here(self) -> tuple[Grant | None, LeaseView]:
        answer = await self._store.lease_acquire(self._name)
        self._absorb(answer[1])
        return answer

    async def _ask(
        self, priority: int, ticket: str | None, wait: bool
    ) -> tuple[Grant | None, str | None, LeaseView]:
        # Shielded: a lease the store granted, or a ticket it handed out, must reach the
        # caller it was made for.
        with anyio.CancelScope(shield=True):
            answer = await self._store.lease_queue(self._name, priority, ticket, wait)
        self._absorb(answer[2])
        return answer

    async def _ask_front(self, waiter: Waiter) -> tuple[Grant | None, str | None, LeaseView]:
        """The front's ask: its ticket after the answer (None once spent, or if it has none)."""
        if not self._remote:
            grant, view = await self._ask_here()
            return grant, None, view
        return await self._ask(waiter.priority, waiter.ticket, True)

    async def _wait(
        self, deadline: float | None, priority: int, arrived: float, ticket: str | None
    ) -> Lease:
        queue = self._queue
        waiter = Waiter(priority, ticket)
        queue.insert(waiter)
        self._waiting_changed()
        lease: Lease | None = None
        try:
            if deadline is None:
                lease = await self._serve(waiter, arrived)
            else:
                with self._clock.deadline_scope(deadline):
                    lease = await self._serve(waiter, arrived)
        except BaseException:
            # Its place in the store first, so the next waiter here is not refused for it.
            try:
                await self._leave_place(waiter)
            finally:
                self._leave(waiter)
            raise
        try:
            await self._leave_place(waiter)
        finally:
            if lease is None:
                self._leave(waiter)
        if lease is None:
            raise self._refuse("no slot freed by its deadline", self._store_view())
        return lease

    async def _leave_place(self, waiter: Waiter) -> None:
        """Give the waiter's ticket back, if it still holds one (shielded: expiry is slower)."""
        ticket, waiter.ticket = waiter.ticket, None
        if ticket is not None:
            with anyio.CancelScope(shield=True):
                await self._store.lease_leave(self._name, ticket)

    async def _serve(self, waiter: Waiter, arrived: float) -> Lease | None:
        """Ask the store whenever at the front; sleep until woken or something may free.

        With a remote store, the front waiter subscribes to the store's wake-ups (other
        replicas' releases, waiters ahead leaving) before it first asks, and for as long as it
        waits, so that a release made meanwhile is not missed.
        """
        if not self._remote:
            return await self._serve_loop(waiter, arrived, None)
        lease = None
        async with anyio.create_task_group() as tasks:
            try:
                lease = await self._serve_loop(waiter, arrived, tasks)
            finally:
                tasks.cancel_scope.cancel()
        return lease

    async def _serve_loop(
        self, waiter: Waiter, arrived: float, tasks: anyio.abc.TaskGroup | None
    ) -> Lease | None:
        queue = self._queue
        watching = tasks is None
        while True:
            # A fresh event before asking: a wake-up during the round trip is not lost.
            waiter.event = anyio.Event()
            if queue.front() is not waiter:
                await waiter.event.wait()
                # Cancelled while a wake-up was on its way: leave now (the slot goes to the
                # next waiter) rather than take a lease the caller no longer wants.
                await anyio.lowlevel.checkpoint_if_cancelled()
                continue
            if not watching and tasks is not None:
                # Listening before asking: a release published meanwhile is not missed.
                watching = True
                await tasks.start(self._store.lease_watch, self._name, _waker(waiter))
            grant, ticket, view = await self._ask_front(waiter)
            if grant is None:
                queue.ticketed(waiter, ticket)
            else:
                queue.drop(waiter, GRANTED)
                # None: spent; a fallback's local grant leaves it held, to be left.
                waiter.ticket = ticket
                self._waiting_changed()
                queue.wake_front()
                return self._grant(grant, arrived, view)
            pause = self._poll if view.next_change is None else min(view.next_change, self._poll)
            if math.isinf(pause):
                await waiter.event.wait()
            else:
                with self._clock.deadline_scope(self._now() + pause):
                    await waiter.event.wait()
            await anyio.lowlevel.checkpoint_if_cancelled()

    def _leave(self, waiter: Waiter) -> None:
        queue = self._queue
        if waiter.state == WAITING:
            was_front = queue.front() is waiter
            queue.drop(waiter, GONE)
            self._waiting_changed()
            if was_front:
                queue.wake_front()

    def _waiting_changed(self) -> None:
        if self._listeners:
            dispatch(self._listeners, LeaseWaiting(self._name, self._queue.waiting))

    def _grant(self, grant: Grant, arrived: float, view: LeaseView) -> Lease:
        self._acquired += 1
        now = self._now()
        if self._listeners:
            event = LeaseAcquired(
                self._name, grant.id, grant.generation, now - arrived, view.in_use
            )
            dispatch(self._listeners, event)
        return Lease(grant.id, grant.generation, now, None, None, self)

    def _refuse(self, reason: str, view: LeaseView) -> CapacityExhaustedError:
        self._refused += 1
        retry_after = view.first_expiry
        if self._listeners:
            dispatch(self._listeners, LeaseRefused(self._name, retry_after, reason))
        return CapacityExhaustedError(self._name, retry_after, reason=reason)

    def _freed(
        self, lease_id: str, call_id: str | None, reason: _ReleaseReason, view: LeaseView
    ) -> None:
        if reason == "reconcile":
            self._reclaimed_reconcile += 1
        elif reason == "ttl":
            self._reclaimed_ttl += 1
        else:
            self._released += 1
        if self._listeners:
            dispatch(
                self._listeners, LeaseReleased(self._name, lease_id, call_id, reason, view.in_use)
            )
        self._queue.wake_front()

    def _absorb(self, view: LeaseView) -> None:
        """Report what a store's answer shows: leases past their TTL, a capacity that moved."""
        for lease_id, call_id in view.reclaimed:
            self._freed(lease_id, call_id, "ttl", view)
        if view.effective != self._effective:
            old, self._effective = self._effective, view.effective
            if self._listeners:
                cause: Literal["recovery", "shared"] = (
                    "recovery" if view.effective > old and not self._remote else "shared"
                )
                dispatch(
                    self._listeners, CapacityChanged(self._name, old, view.effective, cause, "")
                )
            self._queue.wake_front()


def _waker(waiter: Waiter) -> Callable[[], None]:
    """Wake ``waiter`` (whichever event it waits on now): what a store's watch calls."""

    def wake() -> None:
        waiter.event.set()

    return wake
