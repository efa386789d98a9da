"""The fleet's order of a lease set's waiters: the ticket side of the Redis lease store.

Waiters are served in the fleet's order (:meth:`TicketFleet.lease_queue`, one ``q`` operation of
the lease script): a refused acquire that will wait gets a ticket in the set's queue of waiters,
in the same step. The backend remembers the tickets it handed out and not yet saw granted or
left, and a background task (run while the backend is entered) refreshes their liveness every
:data:`~._lease_script.TICKET_REFRESH_S` seconds, one call per set that has any; a process that
stops refreshing (crashed, or its backend closed) loses its places after
:data:`~._lease_script.TICKET_EXPIRY_S` seconds.

A waiter refused as a newcomer asks again once it listens, in case a release came in between;
the backend answers that ask itself when no release on the set was heard with a server time
after the refusal (and the listener did not resubscribe meanwhile): a release from then on
wakes the waiter anyway.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import TYPE_CHECKING

import anyio

from resilient_voice.leases._core import rank_key
from resilient_voice.leases._store import Grant, LeaseView
from resilient_voice.limiter import StoreUnavailableError
from resilient_voice.redis._lease_script import HELD_SWEEP_S, TICKET_REFRESH_S

if TYPE_CHECKING:
    from resilient_voice.redis._lease_listen import LeaseListener
    from resilient_voice.redis._leases import LeaseSet

__all__ = ["TicketFleet"]

_log = logging.getLogger("resilient_voice.redis")


class TicketFleet:
    """``lease_queue`` and ``lease_leave`` of the Redis lease store, and the tickets' keep-alive."""

    __slots__ = ()

    # Provided by LeaseFleet and RedisBackend.
    _lease_sets: dict[str, LeaseSet]
    _lease_state: LeaseListener

    if TYPE_CHECKING:

        def lease_view(self, name: str) -> LeaseView: ...

        async def _lease(
            self, name: str, op: str, args: list[str]
        ) -> tuple[LeaseView, list[str]]: ...

        async def _lease_at(
            self, name: str, op: str, args: list[str]
        ) -> tuple[LeaseView, list[str], float]: ...

        def _track(self, name: str, grant: Grant) -> None: ...

        async def _lease_sweep(self, name: str) -> None: ...

    async def lease_queue(
        self, name: str, priority: int, ticket: str | None, wait: bool, extra: int = 0
    ) -> tuple[Grant | None, str | None, LeaseView]:
        lease_set = self._lease_sets[name]
        state = self._lease_state
        refused = None if ticket is None else lease_set.fresh.pop(ticket, None)
        if (
            refused is not None
            and refused[0] == state.resets
            and state.heard.get(lease_set.channel, -math.inf) < refused[1]
        ):
            # The waiter's first ask with the ticket it was just refused with, now listening:
            # no release since that refusal was heard, and one heard from now on wakes it.
            # Asking again would only be refused again.
            return None, ticket, self.lease_view(name)
        resets = state.resets
        lease_id = uuid.uuid4().hex
        args = [lease_id, str(extra), rank_key(priority), ticket or "", "1" if wait else ""]
        # A ticket stays remembered (and refreshed) until an answer says it was granted, or
        # the waiter leaves; one handed out in an answer that never arrived lapses unrefreshed.
        view, result, stamp = await self._lease_at(name, "q", args)
        if result[0]:
            if ticket is not None:
                lease_set.tickets.discard(ticket)
            grant = Grant(lease_id, int(result[0]))
            self._track(name, grant)
            return grant, None, view
        held = result[1] or None
        if held is not None:
            lease_set.tickets.add(held)
            if ticket is None:
                lease_set.fresh[held] = (resets, stamp)
        return None, held, view

    async def lease_leave(self, name: str, ticket: str) -> None:
        # Forgotten first: a ticket left while Redis is unreachable is no longer refreshed, so
        # it lapses on its own.
        lease_set = self._lease_sets[name]
        lease_set.tickets.discard(ticket)
        lease_set.fresh.pop(ticket, None)
        await self._lease(name, "x", [ticket])

    async def _lease_keeper(self) -> None:
        """The backend's task: refresh the liveness of this process's tickets, set by set."""
        while True:
            await anyio.sleep(TICKET_REFRESH_S)
            for name, lease_set in list(self._lease_sets.items()):
                resets = self._lease_state.resets
                if not (lease_set.held and lease_set.incarnation):
                    lease_set.probed = resets
                elif (
                    lease_set.probed != resets
                    or len(lease_set.held) > lease_set.capacity
                    or time.monotonic() - lease_set.swept >= HELD_SWEEP_S
                ):
                    # The listener subscribed again (Redis was away: see at once whether it
                    # came back empty, so that this process restores the leases it holds
                    # without waiting for its next call), or the leases this process would
                    # restore include some released by other replicas (more than it can hold,
                    # or not checked for a while): forget those.
                    lease_set.probed, lease_set.swept = resets, time.monotonic()
                    try:
                        await self._lease_sweep(name)
                    except (StoreUnavailableError, ValueError) as exc:
                        _log.debug("lease set %r not checked: %s", name, exc)
                if not lease_set.tickets:
                    continue
                try:
                    await self._lease(name, "k", sorted(lease_set.tickets))
                except (StoreUnavailableError, ValueError) as exc:
                    # The waiters' own asks put their tickets back at their places.
                    _log.debug("lease tickets of %r not refreshed: %s", name, exc)
