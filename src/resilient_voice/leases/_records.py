"""The records a :class:`~resilient_voice.CallLeases` hands out: Lease and LeaseStatistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resilient_voice.leases._facade import CallLeases

__all__ = [
    "CONTEXT_MAX",
    "Lease",
    "LeaseStatistics",
    "check_call_id",
    "check_context",
    "check_lease",
]

CONTEXT_MAX = 1024
"""Most characters of an unknown mark's ``context``: it is kept with the lease in the store and
read back by every reconciliation, so it stays small (a few addresses and a time)."""


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
        marked_at: When it was marked unknown, on the leases' clock (a shared store's age of
            the mark, subtracted from this process's now), else ``None``: a client's
            ``settle_after`` counts from it.
        context: What the client that marked it stored to find its call
            (``mark_unknown(..., context=)``), else ``None``: any replica can read it.

    Equality compares ``id``, ``generation``, ``acquired_at``, ``call_id`` and
    ``attempt_id``, as before the mark carried more: ``marked_at`` and ``context`` are
    details of the mark, and ``marked_at`` read from a shared store moves with each read.
    """

    id: str
    generation: int
    acquired_at: float
    call_id: str | None = None
    attempt_id: str | None = None
    owner: CallLeases | None = field(default=None, compare=False, repr=False)
    marked_at: float | None = field(default=None, compare=False)
    context: str | None = field(default=None, compare=False)

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


def check_context(context: object) -> str | None:
    """``mark_unknown(context=)``, checked: ``None``, or a non-empty str of printable
    characters, at most :data:`CONTEXT_MAX` long.

    Raises:
        TypeError: Not a str (nor ``None``).
        ValueError: Empty, too long, or holding a control character.
    """
    if context is None:
        return None
    if not isinstance(context, str):
        raise TypeError(f"context must be a str or None, got {type(context).__name__}")
    if not context:
        raise ValueError("context must not be empty (pass None for no context)")
    if len(context) > CONTEXT_MAX:
        raise ValueError(
            f"context is {len(context)} characters; at most {CONTEXT_MAX} are kept with a lease"
        )
    if not context.isprintable():
        raise ValueError(f"context must hold printable characters only, got {context[:80]!r}")
    return context
