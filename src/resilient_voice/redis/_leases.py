"""The call-lease side of :class:`~resilient_voice.redis.RedisBackend`: a shared lease store.

Each operation of :class:`~resilient_voice.leases.LeaseStore` is one ``EVALSHA`` of
:data:`~._lease_script.LEASES`, bounded by the backend's ``timeout``; Redis' errors and timeouts
become :class:`~resilient_voice.limiter.StoreUnavailableError`, which the lease set's
``on_backend_error`` fallback handles. Waiters are woken by Pub/Sub: :meth:`LeaseFleet.lease_watch`
registers a refused front waiter with the backend's listener, a background task (run while the
backend is entered) holding one subscription to the channels of every lease set declared; every
release publishes on its set's channel.

Waiters are served in the fleet's order: see :mod:`._lease_queue`; the Pub/Sub side is
:mod:`._lease_listen`.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

from resilient_voice.leases._store import Grant, LeaseView, Stored
from resilient_voice.limiter import StoreUnavailableError
from resilient_voice.redis import _lease_script
from resilient_voice.redis._lease_listen import LeaseListener, ListenerFleet, text_of
from resilient_voice.redis._lease_queue import TicketFleet
from resilient_voice.redis._lease_script import LEASES
from resilient_voice.redis._replicas import ReplicaPeak
from resilient_voice.redis._scripts import BEAT_S

__all__ = ["LeaseFleet", "LeaseSet"]

_log = logging.getLogger("resilient_voice.redis")

_HEADER = 9
_RESTORE_TRIES = 3


class Held:
    """A lease this process acquired and has not seen released: what it restores after a loss.

    Times are this process's monotonic clock; the restore sends ages, which the script turns
    into times on Redis' clock (no skew between replicas or across the loss).
    """

    __slots__ = ("acquired", "attempt", "bound", "call", "context", "generation", "marked")

    def __init__(self, generation: int, acquired: float) -> None:
        self.generation = generation
        self.acquired = acquired
        self.bound: float | None = None
        self.call = ""
        self.attempt = ""
        self.marked: float | None = None
        self.context = ""


class LeaseSet:
    """What the backend keeps per lease set: its keys, configuration and last answer."""

    __slots__ = (
        "answered_at",
        "beat",
        "capacity",
        "channel",
        "config",
        "fresh",
        "held",
        "incarnation",
        "keys",
        "live",
        "probed",
        "stamp",
        "swept",
        "tag",
        "tickets",
        "ttl",
        "view",
    )

    def __init__(self, tag: str, config: str, capacity: int, ttl: float) -> None:
        self.tag = tag
        self.capacity = capacity
        self.ttl = ttl
        # The incarnation of the set on Redis that the last answer came from ("" before any):
        # another one means Redis forgot the set (a restart without persistence, a failover).
        self.incarnation = ""
        # Lease id -> what this process restores when the set is forgotten; in acquire order,
        # so that the expired ones are at the front.
        self.held: dict[str, Held] = {}
        # The listener's resubscriptions, and the monotonic time, when this process last asked
        # which of ``held`` the set still holds.
        self.probed = 0
        self.swept = time.monotonic()
        self.channel = f"{tag}:w"
        self.config = config
        suffixes = ("z", "l", "c", "ez", "eg", "s", "hb", "q", "qd")
        self.keys = [f"{tag}:{suffix}" for suffix in suffixes]
        self.view = LeaseView(0, capacity, None, None)
        self.answered_at = time.monotonic()
        self.stamp = 0.0  # Redis' time of the answer ``view`` comes from
        self.live = ReplicaPeak()
        self.beat = -math.inf
        # The tickets of this process's waiters, refreshed until granted or left.
        self.tickets: set[str] = set()
        # Ticket -> (the listener's resubscriptions, the server time) of the refusal that
        # handed it out: a waiter listening since needs no second ask unless a message since.
        self.fresh: dict[str, tuple[int, float]] = {}


def _seconds(value: str) -> float | None:
    return float(value) if value else None


class LeaseFleet(TicketFleet, ListenerFleet):
    """The :class:`~resilient_voice.leases.LeaseStore` half of the Redis backend."""

    __slots__ = ()

    # Provided by RedisBackend.
    _client: Any
    _prefix: str
    _timeout: float
    _replica: str
    _min_replicas: int
    _errors: tuple[type[Exception], ...]
    _redispy: bool
    _lease_sets: dict[str, LeaseSet]
    _lease_state: LeaseListener

    if TYPE_CHECKING:

        async def _script(self, script: str, keys: list[str], argv: list[str]) -> Any: ...

    def declare_leases(self, name: str, capacity: int, ttl: float, recovery: float) -> None:
        """Record the configuration of set ``name``; the script refuses a conflicting one."""
        config = f"{capacity}/{ttl!r}/{recovery!r}"
        known = self._lease_sets.get(name)
        if known is not None and known.config != config:
            raise ValueError(
                f"lease set {name!r} is used with capacity/ttl/recovery {known.config} and "
                f"{config} on one shared store: give each configuration its own name"
            )
        if known is None:
            lease_set = LeaseSet(f"{{{self._prefix}:leases:{name}}}", config, capacity, ttl)
            self._lease_sets[name] = lease_set
            self._lease_state.declared.add(lease_set.channel)
            self._lease_state.poke()

    def lease_keys(self, name: str) -> list[str]:
        """The Redis keys of set ``name`` (all under one hash tag)."""
        return list(self._lease_sets[name].keys)

    def live_lease_replicas(self, name: str) -> int:
        """What ``on_backend_error="local"`` divides set ``name``'s capacity by.

        The most replicas that used the set within 3 s, as Redis reported them in the 60 s up
        to its last answer (:class:`~._replicas.ReplicaPeak`); never fewer than the backend's
        ``min_replicas`` (1 by default), also before any answer.
        """
        return max(self._min_replicas, self._lease_sets[name].live.most)

    def lease_view(self, name: str) -> LeaseView:
        lease_set = self._lease_sets[name]
        view = lease_set.view
        elapsed = time.monotonic() - lease_set.answered_at
        return LeaseView(
            view.in_use,
            view.effective,
            None if view.next_change is None else max(0.0, view.next_change - elapsed),
            None if view.first_expiry is None else max(0.0, view.first_expiry - elapsed),
        )

    async def _lease(self, name: str, op: str, args: list[str]) -> tuple[LeaseView, list[str]]:
        """One script call on set ``name``: the view of the answer and the operation's results."""
        view, result, _ = await self._lease_at(name, op, args)
        return view, result

    async def _lease_at(
        self, name: str, op: str, args: list[str]
    ) -> tuple[LeaseView, list[str], float]:
        """:meth:`_lease`, and the server time of the answer.

        The call names the set's incarnation this process last saw; the script answers
        ``lost`` (doing nothing) when Redis holds another one, that is when it forgot the set.
        This process then restores the leases it holds (:meth:`_restore`) and asks again, so
        the operation never runs on a set that lacks them: no extra round trip unless so.
        """
        lease_set = self._lease_sets[name]
        for _ in range(_RESTORE_TRIES):
            items = await self._call(name, op, args)
            if items[0] != "lost":
                break
            lease_set.incarnation = items[1]
            await self._restore(name)
        else:
            items = await self._call(name, op, args, check=False)
        return self._answer(name, items)

    async def _restore(self, name: str) -> None:
        """Put back, in one atomic step, the leases this process holds and the set forgot.

        The script inserts only those absent, with the time they have left, their bindings,
        and raises the generation counter above theirs; Redis answering ``lost`` again (lost
        once more meanwhile) is left to the caller's next try.
        """
        lease_set = self._lease_sets[name]
        self._prune(lease_set)
        now = time.monotonic()
        args: list[str] = []
        for lease_id, held in lease_set.held.items():
            args += [
                lease_id,
                str(held.generation),
                repr(now - held.acquired),
                "" if held.bound is None else repr(now - held.bound),
                held.call,
                held.attempt,
                "" if held.marked is None else repr(now - held.marked),
                held.context,
            ]
        items = await self._call(name, "P", [repr(_lease_script.RESTORE_HOLD_S), *args])
        if items[0] == "lost":
            lease_set.incarnation = items[1]
            return
        view, result, _ = self._answer(name, items)
        _log.warning(
            "lease set %r was forgotten by Redis: restored %s of the %d leases this process "
            "holds (in use now %d)",
            name,
            result[0] if result else "0",
            len(lease_set.held),
            view.in_use,
        )

    async def _call(self, name: str, op: str, args: list[str], *, check: bool = True) -> list[str]:
        """One script call: its answer as text (``lost`` and ``conflict`` answers included)."""
        lease_set = self._lease_sets[name]
        now = time.monotonic()
        beat = now - lease_set.beat >= BEAT_S
        if beat:
            lease_set.beat = now
        tagged = f"{op}:{lease_set.incarnation}" if check else op
        argv = [tagged, lease_set.config, self._replica if beat else "", lease_set.channel, *args]
        try:
            reply = await self._script(LEASES, lease_set.keys, argv)
        except TimeoutError as exc:
            raise StoreUnavailableError(f"Redis did not answer within {self._timeout} s") from exc
        except self._errors as exc:
            raise StoreUnavailableError(f"Redis failed: {type(exc).__name__}: {exc}") from exc
        items = [text_of(x) for x in reply]
        if items[0] == "conflict":
            raise ValueError(
                f"lease set {name!r} runs with capacity/ttl/recovery {lease_set.config} here but "
                f"{items[1]} in another replica sharing this Redis: give each its own name"
            )
        return items

    def _answer(self, name: str, items: list[str]) -> tuple[LeaseView, list[str], float]:
        """Read a script answer's header: the view, the operation's results, the server time."""
        lease_set = self._lease_sets[name]
        count = int(items[6])
        pairs = items[_HEADER : _HEADER + 2 * count]
        reclaimed = tuple((pairs[i], pairs[i + 1] or None) for i in range(0, len(pairs), 2))
        for lease_id, _ in reclaimed:
            lease_set.held.pop(lease_id, None)
        in_use, effective = int(items[1]), int(items[2])
        next_change, first_expiry = _seconds(items[3]), _seconds(items[4])
        lease_set.live.seen(int(items[5]))
        stamp = float(items[7])
        lease_set.incarnation = items[8]
        if stamp >= lease_set.stamp:
            # Replies of concurrent calls may be read in any order: keep the server's latest.
            lease_set.stamp = stamp
            lease_set.view = LeaseView(in_use, effective, next_change, first_expiry)
            lease_set.answered_at = time.monotonic()
        view = LeaseView(in_use, effective, next_change, first_expiry, reclaimed)
        return view, items[_HEADER + 2 * count :], stamp

    async def _lease_sweep(self, name: str) -> None:
        """Forget the held leases the set no longer holds (released by other replicas)."""
        lease_set = self._lease_sets[name]
        self._prune(lease_set)
        _, result = await self._lease(name, "H", list(lease_set.held))
        for lease_id in result:
            lease_set.held.pop(lease_id, None)

    @staticmethod
    def _prune(lease_set: LeaseSet) -> None:
        """Forget held leases past their TTL (Redis reclaimed them): the oldest are first."""
        cutoff = time.monotonic() - lease_set.ttl
        held = lease_set.held
        while held:
            lease_id = next(iter(held))
            if held[lease_id].acquired > cutoff:
                break
            del held[lease_id]

    def _track(self, name: str, grant: Grant) -> None:
        """Remember a granted lease until this process sees it released."""
        lease_set = self._lease_sets[name]
        self._prune(lease_set)
        lease_set.held[grant.id] = Held(grant.generation, time.monotonic())

    async def lease_acquire(self, name: str, extra: int = 0) -> tuple[Grant | None, LeaseView]:
        lease_id = uuid.uuid4().hex
        view, result = await self._lease(name, "a", [lease_id, str(extra)])
        if not result:
            return None, view
        grant = Grant(lease_id, int(result[0]))
        self._track(name, grant)
        return grant, view

    async def lease_bind(self, name: str, lease_id: str, call_id: str) -> tuple[bool, LeaseView]:
        view, result = await self._lease(name, "b", [lease_id, call_id])
        held = self._lease_sets[name].held
        if result:
            held.pop(lease_id, None)
        elif lease_id in held:
            for other in held.values():
                if other.call == call_id:
                    other.call = ""
            mine = held[lease_id]
            mine.call, mine.bound = call_id, time.monotonic()
            mine.attempt, mine.marked, mine.context = "", None, ""
        return bool(result), view

    async def lease_release(self, name: str, lease_id: str) -> tuple[str | None, bool, LeaseView]:
        view, result = await self._lease(name, "r", [lease_id])
        self._lease_sets[name].held.pop(lease_id, None)
        if not result:
            return None, False, view
        return result[1] or None, True, view

    async def lease_release_call(
        self, name: str, call_id: str, generation: int | None
    ) -> tuple[str | None, LeaseView]:
        gen = "" if generation is None else str(generation)
        view, result = await self._lease(name, "c", [call_id, gen])
        if result:
            self._lease_sets[name].held.pop(result[0], None)
        return (result[0] if result else None), view

    async def lease_mark_unknown(
        self, name: str, lease_id: str, attempt_id: str, context: str | None = None
    ) -> bool:
        args = [lease_id, attempt_id, context or ""]
        _, result = await self._lease(name, "u", args)
        held = self._lease_sets[name].held.get(lease_id)
        if result and held is not None:
            held.attempt, held.marked, held.context = attempt_id, time.monotonic(), context or ""
        return bool(result)

    async def lease_unknown(self, name: str) -> list[Stored]:
        _, result = await self._lease(name, "U", [])
        stored = [
            Stored(
                result[i],
                int(result[i + 1]),
                float(result[i + 2]),
                None,
                result[i + 3],
                _seconds(result[i + 4]),
                result[i + 5] or None,
            )
            for i in range(0, len(result), 6)
        ]
        stored.sort(key=lambda s: (-s.age, s.generation))
        return stored

    async def lease_reconcile(
        self, name: str, live: frozenset[str], as_of: float, age: float
    ) -> tuple[list[tuple[str, str | None]], LeaseView]:
        del as_of  # on another clock: the server compares with its own now less ``age``
        view, result = await self._lease(name, "R", [repr(age), *sorted(live)])
        held = self._lease_sets[name].held
        for i in range(0, len(result), 2):
            held.pop(result[i], None)
        return [(result[i], result[i + 1] or None) for i in range(0, len(result), 2)], view

    async def lease_capacity(
        self, name: str, signal: bool, concurrency_limit: int | None, remaining: int | None
    ) -> tuple[int, int, LeaseView]:
        args = [
            "" if concurrency_limit is None else str(concurrency_limit),
            "" if remaining is None else str(remaining),
        ]
        view, result = await self._lease(name, "s" if signal else "o", args)
        return int(result[0]), int(result[1]), view
