"""The records a :class:`~resilient_voice.CallLeases` hands out: Lease and LeaseStatistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resilient_voice.leases._facade import CallLeases

__all__ = ["Lease", "LeaseStatistics", "check_call_id", "check_lease"]


@dataclass(frozen=True, slots=True)
class Lease:
    """A call slot held from the create until the provider says the call ended.

    Attributes:
        id: The lease's id (unique within its set): plant it in the call's callback URL.
        generation: A fencing number, larger for every later lease of the set, known before
            the create is sent: plant it next to the id, so that a webhook releases exactly
            this binding (``leases.release(call_id, generation=...)``).
        acquired_at: When it was granted, on the leases' clock.
        call_id: The provider's call id once bound (``leases.bind``), else ``None``.
        attempt_id: The create's attempt id when its outcome is unknown
            (``leases.mark_unknown``), else ``None``.
    """

    id: str
    generation: int
    acquired_at: float
    call_id: str | None = None
    attempt_id: str | None = None
    owner: CallLeases | None = field(default=None, compare=False, repr=False)

    async def release(self) -> bool:
        """Free this lease (a create that failed for certain: nothing was sent, or rejected).

        Idempotent: releasing it again, or after a webhook or the TTL freed it, does nothing.

        Returns:
            Whether this call freed it.
        """
        if self.owner is None:
            return False
        return await self.owner.release(self)


@dataclass(frozen=True, slots=True)
class LeaseStatistics:
    """A snapshot of a :class:`CallLeases`.

    With a shared store, ``in_use`` and ``effective_capacity`` are the fleet's as of this
    process's last answer from the store; the counters count what this process did or saw.

    Attributes:
        name: The lease set's name.
        capacity: The configured capacity.
        effective_capacity: The capacity now, learned from the provider (``<= capacity``).
        in_use: Leases held.
        waiting: Callers of this process queued for a lease.
        acquired: Leases granted.
        refused: Acquires that got no slot by their deadline.
        released: Leases freed by a release (by call id from a webhook, or by the lease).
        reclaimed_by_ttl: Leases freed because their TTL ran out.
        reclaimed_by_reconcile: Leases freed because the provider no longer lists the call.
        capacity_signals: Capacity signals received (each halves the effective capacity).
    """

    name: str
    capacity: int
    effective_capacity: int
    in_use: int
    waiting: int
    acquired: int
    refused: int
    released: int
    reclaimed_by_ttl: int
    reclaimed_by_reconcile: int
    capacity_signals: int


def check_lease(lease: object) -> None:
    if not isinstance(lease, Lease):
        raise TypeError(f"expected a Lease, got {type(lease).__name__}")


def check_call_id(call_id: object) -> None:
    if not isinstance(call_id, str):
        raise TypeError(f"call_id must be a string, got {type(call_id).__name__}")
    if not call_id:
        raise ValueError("call_id must not be empty")
