"""The store seam: how a breaker shares what it sees with other replicas, off its hot path.

Each replica keeps its own :class:`~._machine.StateMachine`, so one replica with a bad network
path never opens the breaker for the others, and the protected call makes no round trip (one
awaited Redis round trip costs hundreds of times the closed path's whole budget). A shared store
(the Redis fleet view of issue 15) therefore plugs in at three points only:

- :meth:`BreakerStore.attach` once, when the breaker is built: the store keeps the breaker and
  reads ``breaker.statistics()`` from its own bounded background task (the window summary about
  once a second, with a heartbeat); nothing is written per call.
- :meth:`BreakerStore.state_changed` on every transition: synchronous and non-blocking, it queues
  the change for the store's background writer (published at once, not awaited).
- :meth:`BreakerStore.probe_permit` when a call would be admitted as a half-open probe: the one
  place a round trip may happen, bounded by the store, for a fleet-wide probe permit stamped with
  the breaker's epoch. ``None`` (backend slow or gone) means "probe on your local permit".

The in-memory store does nothing at any of them, and the breaker skips the calls for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from resilient_voice.events import BreakerState

if TYPE_CHECKING:
    from resilient_voice.breaker._facade import CircuitBreaker

__all__ = ["BreakerStore", "InMemoryBreakerStore"]


@runtime_checkable
class BreakerStore(Protocol):
    """Where a breaker publishes its state and asks for fleet-wide probe permits."""

    def attach(self, breaker: CircuitBreaker) -> None:
        """Start serving ``breaker`` (called once, from its constructor).

        A shared store remembers it (weakly) so that its background task can publish
        ``breaker.statistics()`` as the window summary, and so that a fleet rule can open it.
        """
        ...

    def state_changed(self, name: str, epoch: int, old: BreakerState, new: BreakerState) -> None:
        """Queue a transition for publication; must not block, await or raise."""
        ...

    async def probe_permit(self, name: str, epoch: int) -> bool | None:
        """Ask the fleet for one of its ``half_open_max_calls`` probe permits.

        At most one round trip, bounded by the store's own timeout.

        Returns:
            ``True``: a fleet permit was granted (the local permit is still taken). ``False``:
            the fleet's probes are taken, the call is refused. ``None``: the backend did not
            answer in time; the replica probes on its local permit alone.
        """
        ...


class InMemoryBreakerStore:
    """The default store: the state lives in this process only, and nothing is published."""

    __slots__ = ()

    def attach(self, breaker: CircuitBreaker) -> None:
        del breaker

    def state_changed(self, name: str, epoch: int, old: BreakerState, new: BreakerState) -> None:
        del name, epoch, old, new

    async def probe_permit(self, name: str, epoch: int) -> bool | None:
        del name, epoch
        return None
