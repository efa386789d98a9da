"""The lease table: the pure, synchronous, clock-free bookkeeping of one lease set.

Every method takes ``now`` (seconds on the caller's clock) and reads no clock itself, so the
rules are property-tested on their own and a remote store (Redis' Lua script) follows the same
ones. The table holds:

- the held leases, in acquire order (which is also expiry order: every lease lives ``ttl``
  from its acquire, and ``now`` never goes back), each with its generation, its call id once
  bound, and the attempt id of a create whose outcome is unknown;
- the call id -> lease binding, so that a webhook releases by call id;
- early releases: a release by call id that arrived before the bind (a webhook racing the
  create's response), kept so that the bind frees the slot at once, but only while it can still
  match (below);
- the effective capacity: ``base`` set at ``since`` by a capacity signal or a provider
  observation, growing back by 1 every ``recovery`` seconds up to ``capacity``.

A generation increases over the whole set: the lease acquired later always has the larger one.

An early release received at ``r`` can only be for a lease acquired before ``r`` and still
unbound: a lease is acquired before its create is sent, and the provider sends webhooks for a
call only after creating it. So one is recorded only if a held lease is unbound (of its
generation, when it names one), and dropped as soon as every lease acquired at or before ``r``
is bound, released or reclaimed; that happens within ``ttl`` anyway (they are reclaimed by
``r + ttl``). A flood of replays of finished calls records nothing unless a create is pending,
and what it records goes when that create's lease is bound. Receive times are kept as expiries
(``r + ttl``) and compared as such, ``until < acquired_at + ttl`` meaning "acquired after
``r``", exactly as the Redis script compares them.

The table also keeps the reference form of a shared store's queue of waiters (:meth:`queue`,
:meth:`leave`): tickets named so that sorting the names is the order of service, higher priority
first, then a sequence. In memory they never lapse: they live and die with the process.

Over 400 lines: it is one table whose rules (acquire, bind, release, early releases, reconcile,
capacity learning, the order of waiters) read and write the same records, and the Redis script
(:mod:`resilient_voice.redis._lease_script`) mirrors it rule by rule; kept in one module, the
two can be read side by side.
"""

from __future__ import annotations

import bisect
import math
import uuid

__all__ = ["LeaseRecord", "LeaseTable", "rank_key"]

_RANK_TOP = 2**63 - 1


def rank_key(priority: int) -> str:
    """The priority as 16 hex digits that sort higher priorities first (clamped to 64 bits).

    A ticket is this key followed by 16 decimal digits of a sequence; a remote store compares
    names only (Redis' Lua has no 64-bit integers).
    """
    return format(_RANK_TOP - max(-_RANK_TOP - 1, min(_RANK_TOP, priority)), "016x")


class LeaseRecord:
    """One held lease (mutable: bound and marked in place; the facade hands out frozen copies)."""

    __slots__ = (
        "acquired_at",
        "attempt_id",
        "bound_at",
        "call_id",
        "context",
        "generation",
        "id",
        "marked_at",
    )

    def __init__(self, lease_id: str, generation: int, acquired_at: float) -> None:
        self.id = lease_id
        self.generation = generation
        self.acquired_at = acquired_at
        self.call_id: str | None = None
        self.bound_at: float | None = None
        self.attempt_id: str | None = None
        self.marked_at: float | None = None
        self.context: str | None = None


class LeaseTable:
    """The held leases of one set, their bindings, early releases and the effective capacity.

    Args:
        capacity: The most leases held at once (the configured account limit).
        ttl: Seconds a lease lives from its acquire; also the longest an early release is kept.
        recovery: Seconds without a signal after which the effective capacity grows by 1.
    """

    __slots__ = (
        "_base",
        "_by_call",
        "_early",
        "_generation",
        "_held",
        "_queue",
        "_sequence",
        "_since",
        "_token",
        "capacity",
        "recovery",
        "ttl",
    )

    def __init__(self, capacity: int, ttl: float, recovery: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.recovery = recovery
        self._held: dict[str, LeaseRecord] = {}
        self._by_call: dict[str, LeaseRecord] = {}
        # call id -> (generation or None for any, expiry: its receive time + ttl); insertion
        # order is expiry order.
        self._early: dict[str, tuple[int | None, float]] = {}
        self._generation = 0
        # Ids are this token and the generation: unique in the set, and cheaper than a uuid4.
        self._token = uuid.uuid4().hex[:12] + "-"
        self._base = capacity
        self._since = -math.inf
        self._queue: list[str] = []  # tickets, sorted: the order of service
        self._sequence = 0

    @property
    def in_use(self) -> int:
        """Leases held (as of the last :meth:`expire`)."""
        return len(self._held)

    def bound(self, call_id: str) -> bool:
        """Whether a held lease is bound to ``call_id``."""
        return call_id in self._by_call

    def early(self) -> list[tuple[str, int | None, float]]:
        """The early releases kept: ``(call id, generation, expiry)``, oldest first."""
        return [(call_id, gen, until) for call_id, (gen, until) in self._early.items()]

    def resize(self, capacity: int) -> None:
        """Make ``capacity`` the configured and effective capacity (a fallback's share)."""
        self.capacity = capacity
        self._base = capacity
        self._since = -math.inf

    def held(self) -> list[LeaseRecord]:
        """The held leases, oldest first."""
        return list(self._held.values())

    def get(self, lease_id: str) -> LeaseRecord | None:
        """The held lease ``lease_id``, if it is held."""
        return self._held.get(lease_id)

    def expire(self, now: float) -> list[LeaseRecord]:
        """Drop leases and early releases whose ``ttl`` ran out by ``now``; return the leases."""
        reclaimed: list[LeaseRecord] = []
        held = self._held
        limit = now - self.ttl
        while held:
            record = next(iter(held.values()))
            if record.acquired_at > limit:
                break
            self._drop(record)
            reclaimed.append(record)
        early = self._early
        while early:
            call_id, (_, until) = next(iter(early.items()))
            if until > now:
                break
            del early[call_id]
        if reclaimed:
            self._forget_early()
        return reclaimed

    def effective(self, now: float) -> int:
        """The effective capacity at ``now``: the learned base plus what recovery gave back."""
        if self._base >= self.capacity:
            return self.capacity
        steps = math.floor((now - self._since) / self.recovery)
        return min(self.capacity, self._base + steps)

    def next_change(self, now: float) -> float | None:
        """The earliest time after ``now`` at which a refused acquire could succeed by itself.

        The first lease's expiry, or the next step of capacity recovery, whichever is first;
        ``None`` when neither can happen (nothing held and capacity fully recovered cannot
        refuse anyway).
        """
        candidates = []
        expiry = self.first_expiry()
        if expiry is not None:
            candidates.append(expiry)
        if self.effective(now) < self.capacity:
            steps = math.floor((now - self._since) / self.recovery) + 1
            candidates.append(self._since + steps * self.recovery)
        return min(candidates) if candidates else None

    def first_expiry(self) -> float | None:
        """When the oldest held lease expires, if any is held."""
        if not self._held:
            return None
        return next(iter(self._held.values())).acquired_at + self.ttl

    def try_acquire(
        self, now: float, lease_id: str | None = None, *, extra: int = 0
    ) -> LeaseRecord | None:
        """A new lease if fewer than the effective capacity are held (call :meth:`expire` first).

        ``extra`` leases held elsewhere count as held too.
        """
        if len(self._held) + extra >= self.effective(now):
            return None
        self._generation += 1
        generation = self._generation
        record = LeaseRecord(lease_id or f"{self._token}{generation:x}", generation, now)
        self._held[record.id] = record
        return record

    def bind(self, lease_id: str, call_id: str, now: float) -> tuple[bool, LeaseRecord | None]:
        """Bind held lease ``lease_id`` to ``call_id``.

        Returns:
            ``(held, freed)``: whether the lease was held, and the lease itself when an early
            release for this call id (of its generation, or of any) freed it at once.
        """
        record = self._held.get(lease_id)
        if record is None:
            return False, None
        early = self._early.get(call_id)
        if early is not None and early[0] in (None, record.generation):
            del self._early[call_id]
            record.call_id = call_id
            record.bound_at = now
            self._drop(record)
            self._forget_early()
            return True, record
        if record.call_id is not None and self._by_call.get(record.call_id) is record:
            del self._by_call[record.call_id]
        previous = self._by_call.get(call_id)
        if previous is not None and previous is not record:
            # A call id bound twice (a provider reusing ids is not expected): the newer binding
            # wins, the older lease stays held until its own release, reconcile or ttl.
            previous.call_id = None
        record.call_id = call_id
        record.bound_at = now
        record.attempt_id = None
        record.marked_at = None
        record.context = None
        self._by_call[call_id] = record
        self._forget_early()
        return True, None

    def release(self, lease_id: str) -> LeaseRecord | None:
        """Free held lease ``lease_id``; ``None`` if it is not held (released already, unknown)."""
        record = self._held.get(lease_id)
        if record is not None:
            self._drop(record)
            self._forget_early()
        return record

    def release_call(self, call_id: str, generation: int | None, now: float) -> LeaseRecord | None:
        """Free the lease bound to ``call_id`` (only of ``generation`` when given).

        A call id bound to nothing is remembered (its generation too) when a held lease is
        unbound (the lease of ``generation``, when given), so that a bind arriving later frees
        its lease at once; it is forgotten once every lease acquired before it is bound or
        gone, and after ``ttl`` at the latest. A binding of another generation is stale and
        frees nothing.
        """
        record = self._by_call.get(call_id)
        if record is None:
            if self._could_bind(generation):
                self._early.pop(call_id, None)
                self._early[call_id] = (generation, now + self.ttl)
            return None
        if generation is not None and record.generation != generation:
            return None
        self._drop(record)
        return record

    def mark_unknown(
        self, lease_id: str, attempt_id: str, context: str | None, now: float
    ) -> LeaseRecord | None:
        """Mark held lease ``lease_id`` as the lease of a create whose outcome is unknown.

        Kept with the attempt id: the client's ``context`` (what any replica needs to find the
        call) and ``now``, the time the outcome became unknown, from which ``settle_after``
        counts. Marking again replaces all three.
        """
        record = self._held.get(lease_id)
        if record is not None:
            record.attempt_id = attempt_id
            record.context = context
            record.marked_at = now
        return record

    def unknown(self) -> list[LeaseRecord]:
        """The held, unbound leases marked unknown, oldest first."""
        return [r for r in self._held.values() if r.attempt_id is not None and r.call_id is None]

    def reconcile(self, live: frozenset[str] | set[str], as_of: float) -> list[LeaseRecord]:
        """Free the leases bound before ``as_of`` whose call id is not in ``live``.

        A lease acquired or bound at or after ``as_of`` stays: the list of live calls was
        fetched before it existed. Unbound leases (unknown outcome included) stay.
        """
        gone = [
            r
            for r in self._held.values()
            if r.call_id is not None
            and r.bound_at is not None
            and r.bound_at < as_of
            and r.acquired_at < as_of
            and r.call_id not in live
        ]
        for record in gone:
            self._drop(record)
        return gone

    def signal(self, now: float) -> tuple[int, int]:
        """Halve the effective capacity (at least 1); recovery restarts. Returns (old, new)."""
        old = self.effective(now)
        self._base = max(1, old // 2)
        self._since = now
        return old, self._base

    def observe(
        self, now: float, concurrency_limit: int | None, remaining: int | None
    ) -> tuple[int, int]:
        """Set the effective capacity from the provider's limits. Returns (old, new).

        ``concurrency_limit`` caps it (``min(capacity, concurrency_limit)``); ``remaining``
        (slots the provider has left) sets it to ``in_use + remaining``; with both, the lower
        one wins; the result is clamped to ``[1, capacity]``. Recovery restarts from it.
        """
        old = self.effective(now)
        candidates = []
        if concurrency_limit is not None:
            candidates.append(concurrency_limit)
        if remaining is not None:
            candidates.append(len(self._held) + remaining)
        if not candidates:
            return old, old
        new = max(1, min(self.capacity, *candidates))
        self._base = new
        self._since = now
        return old, new

    def _could_bind(self, generation: int | None) -> bool:
        """Whether a held lease is unbound (of ``generation``, when given)."""
        return any(
            r.call_id is None and generation in (None, r.generation) for r in self._held.values()
        )

    def _forget_early(self) -> None:
        """Drop the early releases received before every held unbound lease was acquired.

        Called after a lease is bound or dropped. Expiry order is receive order, so the ones
        to drop are a prefix; nothing is scanned while no early release is kept.
        """
        early = self._early
        if not early:
            return
        ttl = self.ttl
        oldest = next((r for r in self._held.values() if r.call_id is None), None)
        while early:
            call_id, (_, until) = next(iter(early.items()))
            if oldest is not None and until >= oldest.acquired_at + ttl:
                break
            del early[call_id]

    def queue(
        self,
        now: float,
        priority: int,
        ticket: str | None,
        wait: bool,
        lease_id: str | None = None,
        *,
        extra: int = 0,
    ) -> tuple[LeaseRecord | None, str | None]:
        """An acquire in the order of waiters (call :meth:`expire` first).

        With ``ticket``, granted while fewer tickets rank ahead of it than slots are free (a
        ticket unknown here is put back at its place); without, while more slots are free
        than tickets outrank ``priority``. A refused acquire that will ``wait`` gets a ticket.

        Returns:
            ``(lease, ticket)``: the lease granted (the ticket is then spent), or ``None`` and
            the ticket the waiter holds.
        """
        tickets = self._queue
        if ticket is not None:
            ahead = bisect.bisect_left(tickets, ticket)
            if ahead == len(tickets) or tickets[ahead] != ticket:
                tickets.insert(ahead, ticket)
        else:
            ahead = bisect.bisect_left(tickets, rank_key(priority) + "~")
        if ahead < self.effective(now) - len(self._held) - extra:
            if ticket is not None:
                self.leave(ticket)
            return self.try_acquire(now, lease_id, extra=extra), None
        if ticket is None and wait:
            self._sequence += 1
            ticket = f"{rank_key(priority)}{self._sequence:016d}"
            bisect.insort(tickets, ticket)
        return None, ticket

    def leave(self, ticket: str) -> bool:
        """Give up ``ticket``'s place; whether it held one."""
        tickets = self._queue
        at = bisect.bisect_left(tickets, ticket)
        if at < len(tickets) and tickets[at] == ticket:
            del tickets[at]
            return True
        return False

    @property
    def queued(self) -> int:
        """Tickets in the queue of waiters."""
        return len(self._queue)

    def _drop(self, record: LeaseRecord) -> None:
        del self._held[record.id]
        if record.call_id is not None and self._by_call.get(record.call_id) is record:
            del self._by_call[record.call_id]
