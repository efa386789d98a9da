"""The store seam of :class:`~resilient_voice.CallLeases`: where the leases of a set live.

A store arbitrates the slots of lease sets by name. A :class:`~resilient_voice.CallLeases` on
its own in-memory store orders its waiters itself and asks with
:meth:`LeaseStore.lease_acquire`. On a shared store the order is the fleet's: every caller asks
with :meth:`LeaseStore.lease_queue`, which grants only in the order of the store's queue of
waiters (higher priority first, then first come first served) and gives a refused caller that
will wait a ticket, its place in that queue; each process keeps its waiters in the order of
their tickets and asks only from the front of them, and a waiter that gives up leaves its place
(:meth:`LeaseStore.lease_leave`).

Every method is atomic per name (a remote store runs each as one script), and answers with a
:class:`LeaseView`: the counts as of that answer and, relative to the store's now, when a refused
acquire could succeed by itself (a lease's TTL running out, a step of capacity recovery). Times
cross the seam as ages and delays in seconds, never as absolute readings of the store's clock,
so a remote store's clock never has to agree with the caller's.

:class:`InMemoryLeaseStore` is the default and the reference: it runs
:class:`~._core.LeaseTable` on the caller's clock. ``RedisBackend`` implements the same methods
in Lua (see :mod:`resilient_voice.redis`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio
from anyio.abc import TaskStatus

from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice.leases._core import LeaseRecord, LeaseTable

__all__ = ["Grant", "InMemoryLeaseStore", "LeaseStore", "LeaseView", "Stored"]


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A store's answer about one lease set, as of that answer.

    Attributes:
        in_use: Leases held across every process sharing the set.
        effective: The effective capacity (learned from the provider, recovering).
        next_change: Seconds until a refused acquire could succeed without a release (the
            oldest lease's TTL, or a step of capacity recovery), or ``None``.
        first_expiry: Seconds until the oldest held lease's TTL runs out, or ``None``.
        reclaimed: ``(lease id, call id)`` of the leases this answer found past their TTL and
            freed (each is reported once, by the answer that freed it).
    """

    in_use: int
    effective: int
    next_change: float | None
    first_expiry: float | None
    reclaimed: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease the store granted: its id and generation."""

    id: str
    generation: int


@dataclass(frozen=True, slots=True)
class Stored:
    """A held lease as the store lists it; ``age`` is seconds since its acquire.

    A lease marked unknown also has ``marked_age``, seconds since the mark (an age, like
    ``age``: the store's clock never crosses the seam), and the client's ``context``.
    """

    id: str
    generation: int
    age: float
    call_id: str | None
    attempt_id: str | None
    marked_age: float | None = None
    context: str | None = None


@runtime_checkable
class LeaseStore(Protocol):
    """Where lease sets live; every method is atomic for one ``name``.

    ``declare_leases`` is called once per :class:`~resilient_voice.CallLeases` with its
    configuration; the other methods follow :class:`~._core.LeaseTable`'s rules.
    """

    def declare_leases(self, name: str, capacity: int, ttl: float, recovery: float) -> None:
        """Record the configuration of set ``name`` (a store may refuse a conflicting one)."""
        ...

    def lease_view(self, name: str) -> LeaseView:
        """The last known state of set ``name`` (a remote store answers from its last reply)."""
        ...

    async def lease_acquire(self, name: str, extra: int = 0) -> tuple[Grant | None, LeaseView]:
        """A new lease if fewer than the effective capacity are held (``extra`` more count as
        held: leases this process granted locally while the store was unavailable)."""
        ...

    async def lease_queue(
        self, name: str, priority: int, ticket: str | None, wait: bool, extra: int = 0
    ) -> tuple[Grant | None, str | None, LeaseView]:
        """An acquire in the order of the set's waiters, fleet-wide.

        With ``ticket`` (a place in the queue this store handed out), granted while fewer live
        tickets rank ahead of it than slots are free; the ticket is then spent. Without one, as
        a newcomer at ``priority``: granted while more slots are free than live tickets outrank
        it, so that nobody jumps the queue; refused, it gets a ticket in the same atomic step
        when it will ``wait``. ``extra`` is as for :meth:`lease_acquire`.

        Returns:
            ``(grant, ticket, view)``: the ticket the caller holds after this answer (``None``
            once granted, or when it has none).
        """
        ...

    async def lease_leave(self, name: str, ticket: str) -> None:
        """Give up the place ``ticket`` holds (a waiter cancelled or past its deadline).

        The waiters behind move up; a store wakes them (:meth:`lease_watch`) when a slot is
        free. Idempotent; a remote store also lets a ticket lapse that its process stopped
        refreshing.
        """
        ...

    async def lease_bind(self, name: str, lease_id: str, call_id: str) -> tuple[bool, LeaseView]:
        """Bind a held lease to ``call_id``; True when an early release freed it at once."""
        ...

    async def lease_release(self, name: str, lease_id: str) -> tuple[str | None, bool, LeaseView]:
        """Free lease ``lease_id``: ``(call id, freed)``."""
        ...

    async def lease_release_call(
        self, name: str, call_id: str, generation: int | None
    ) -> tuple[str | None, LeaseView]:
        """Free the lease bound to ``call_id`` (of ``generation`` if given): its id, if freed."""
        ...

    async def lease_mark_unknown(
        self, name: str, lease_id: str, attempt_id: str, context: str | None = None
    ) -> bool:
        """Mark a held lease as a create of unknown outcome; False when it is not held.

        The store keeps ``attempt_id``, ``context`` and the time of the mark on its own clock
        (listed as an age by :meth:`lease_unknown`); the lease's binding clears them.
        """
        ...

    async def lease_unknown(self, name: str) -> list[Stored]:
        """The held, unbound leases marked unknown, oldest first."""
        ...

    async def lease_reconcile(
        self, name: str, live: frozenset[str], as_of: float, age: float
    ) -> tuple[list[tuple[str, str | None]], LeaseView]:
        """Free leases bound before a time whose call id is not in ``live``.

        The time is ``as_of`` on the caller's clock, which is also ``age`` seconds before the
        caller's now: a store on the caller's clock compares with ``as_of`` exactly, a remote
        one with its own now less ``age``.
        """
        ...

    async def lease_capacity(
        self, name: str, signal: bool, concurrency_limit: int | None, remaining: int | None
    ) -> tuple[int, int, LeaseView]:
        """Halve the effective capacity (``signal``) or set it from provider limits: (old, new)."""
        ...

    async def lease_watch(
        self,
        name: str,
        wake: Callable[[], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``wake`` whenever another process may have freed a lease of ``name``.

        Runs until cancelled, in a task of the front waiter; reports started once it listens
        (or gave up listening: the waiter then polls). Never raises but cancellation.
        """
        ...


class InMemoryLeaseStore:
    """A :class:`LeaseStore` in this process's memory, on the caller's clock (the default).

    Args:
        clock: The clock of the :class:`~resilient_voice.CallLeases` using it.
        id_prefix: Put before every lease id it makes (the fallback of a shared set tells
            its local leases apart by it).
    """

    __slots__ = ("_clock", "_id_prefix", "_tables")

    def __init__(self, *, clock: Clock | None = None, id_prefix: str = "") -> None:
        self._clock = clock or SYSTEM_CLOCK
        self._id_prefix = id_prefix
        self._tables: dict[str, LeaseTable] = {}

    def declare_leases(self, name: str, capacity: int, ttl: float, recovery: float) -> None:
        self._tables[name] = LeaseTable(capacity, ttl, recovery)

    def table(self, name: str) -> LeaseTable:
        """The table of set ``name`` (tests and the local fallback read it)."""
        return self._tables[name]

    def _view(self, table: LeaseTable, now: float, reclaimed: list[LeaseRecord]) -> LeaseView:
        in_use = table.in_use
        effective = table.effective(now)
        gone = tuple((r.id, r.call_id) for r in reclaimed) if reclaimed else ()
        if in_use < effective:
            # A free slot: nobody is refused, so nobody reads when the next one frees.
            return LeaseView(in_use, effective, None, None, gone)
        change = table.next_change(now)
        expiry = table.first_expiry()
        return LeaseView(
            in_use,
            effective,
            None if change is None else change - now,
            None if expiry is None else expiry - now,
            gone,
        )

    def _at(self, name: str) -> tuple[LeaseTable, float, list[LeaseRecord]]:
        table = self._tables[name]
        now = self._clock.now()
        return table, now, table.expire(now)

    def lease_view(self, name: str) -> LeaseView:
        table, now, reclaimed = self._at(name)
        return self._view(table, now, reclaimed)

    async def lease_acquire(self, name: str, extra: int = 0) -> tuple[Grant | None, LeaseView]:
        table, now, reclaimed = self._at(name)
        lease_id = f"{self._id_prefix}{uuid.uuid4().hex}" if self._id_prefix else None
        record = table.try_acquire(now, lease_id, extra=extra)
        grant = None if record is None else Grant(record.id, record.generation)
        return grant, self._view(table, now, reclaimed)

    async def lease_queue(
        self, name: str, priority: int, ticket: str | None, wait: bool, extra: int = 0
    ) -> tuple[Grant | None, str | None, LeaseView]:
        table, now, reclaimed = self._at(name)
        lease_id = f"{self._id_prefix}{uuid.uuid4().hex}" if self._id_prefix else None
        record, held = table.queue(now, priority, ticket, wait, lease_id, extra=extra)
        grant = None if record is None else Grant(record.id, record.generation)
        return grant, held, self._view(table, now, reclaimed)

    async def lease_leave(self, name: str, ticket: str) -> None:
        self._tables[name].leave(ticket)

    async def lease_bind(self, name: str, lease_id: str, call_id: str) -> tuple[bool, LeaseView]:
        table, now, reclaimed = self._at(name)
        _, freed = table.bind(lease_id, call_id, now)
        return freed is not None, self._view(table, now, reclaimed)

    async def lease_release(self, name: str, lease_id: str) -> tuple[str | None, bool, LeaseView]:
        table, now, reclaimed = self._at(name)
        record = table.release(lease_id)
        call_id = None if record is None else record.call_id
        return call_id, record is not None, self._view(table, now, reclaimed)

    async def lease_release_call(
        self, name: str, call_id: str, generation: int | None
    ) -> tuple[str | None, LeaseView]:
        table, now, reclaimed = self._at(name)
        record = table.release_call(call_id, generation, now)
        return None if record is None else record.id, self._view(table, now, reclaimed)

    async def lease_mark_unknown(
        self, name: str, lease_id: str, attempt_id: str, context: str | None = None
    ) -> bool:
        table = self._tables[name]
        return table.mark_unknown(lease_id, attempt_id, context, self._clock.now()) is not None

    async def lease_unknown(self, name: str) -> list[Stored]:
        table = self._tables[name]
        now = self._clock.now()
        # Leases past their TTL are not listed (the next operation reclaims and reports them).
        return [
            Stored(
                r.id,
                r.generation,
                now - r.acquired_at,
                r.call_id,
                r.attempt_id,
                None if r.marked_at is None else now - r.marked_at,
                r.context,
            )
            for r in table.unknown()
            if now - r.acquired_at < table.ttl
        ]

    async def lease_reconcile(
        self, name: str, live: frozenset[str], as_of: float, age: float
    ) -> tuple[list[tuple[str, str | None]], LeaseView]:
        del age  # same clock as the caller: compare with as_of exactly
        table, now, reclaimed = self._at(name)
        gone = table.reconcile(live, as_of)
        return [(r.id, r.call_id) for r in gone], self._view(table, now, reclaimed)

    async def lease_capacity(
        self, name: str, signal: bool, concurrency_limit: int | None, remaining: int | None
    ) -> tuple[int, int, LeaseView]:
        table, now, reclaimed = self._at(name)
        if signal:
            old, new = table.signal(now)
        else:
            old, new = table.observe(now, concurrency_limit, remaining)
        return old, new, self._view(table, now, reclaimed)

    async def lease_watch(
        self,
        name: str,
        wake: Callable[[], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        # Every release of an in-memory set happens in this process, which wakes its waiters.
        del name, wake
        task_status.started()
        await anyio.sleep_forever()

    def __repr__(self) -> str:
        return f"InMemoryLeaseStore(sets={len(self._tables)})"
