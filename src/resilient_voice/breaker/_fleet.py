"""The two fleet rules of a shared breaker: pure functions of what the replicas published.

Each replica keeps its own state machine and window; what it learns from the others is a list of
:class:`ReplicaSummary` (one per live replica, this one included), read from the shared store
about once a second. :func:`fleet_verdict` decides from that list alone (no clock, no I/O), so
the rules are property-tested on their own and every replica, given the same summaries, decides
the same way:

- **quorum**: more than ``quorum`` of the live replicas are open *on their own window* (a
  replica the fleet opened does not vote, or a majority that opened by following would keep
  itself open forever);
- **combined rate**: the fleet's calls reach ``minimum_calls`` and its failure rate reaches
  ``threshold``, *and this replica's own window holds a failure*. The last condition is what
  keeps one busy replica with a bad network path from opening healthy replicas that see no
  failures, while a quiet replica that does fail is protected at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "TALLY_TICKS",
    "FleetStatistics",
    "FleetTally",
    "ReplicaSummary",
    "fleet_verdict",
    "held_open",
]


@dataclass(frozen=True, slots=True)
class ReplicaSummary:
    """What one replica published: its state, whether a fleet rule opened it, its window."""

    replica: str
    open: bool  # OPEN or HALF_OPEN
    fleet_opened: bool
    calls: int
    failures: int


TALLY_TICKS: Final = 10
"""A breaker without a window publishes the outcomes of this many publication ticks."""


class FleetTally:
    """The outcomes a consecutive-failures breaker publishes to the fleet.

    Such a breaker keeps no window of its own (its closed path reads no clock), yet the
    combined-rate rule needs its calls and failures. It counts them here, one or two integer
    additions per call, and the store's background task calls :meth:`tick` once per
    publication, so the published figures cover the last ``TALLY_TICKS`` publications (about
    ten seconds).
    """

    __slots__ = ("calls", "failures", "past", "past_calls", "past_failures")

    def __init__(self) -> None:
        self.calls = 0  # in the tick in progress
        self.failures = 0
        self.past: deque[tuple[int, int]] = deque()
        self.past_calls = 0  # over the ticks in ``past``
        self.past_failures = 0

    def tick(self) -> tuple[int, int]:
        """Close the tick in progress; the calls and failures of the last ``TALLY_TICKS``."""
        self.past.append((self.calls, self.failures))
        self.past_calls += self.calls
        self.past_failures += self.failures
        self.calls = self.failures = 0
        if len(self.past) > TALLY_TICKS:
            calls, failures = self.past.popleft()
            self.past_calls -= calls
            self.past_failures -= failures
        return self.past_calls, self.past_failures

    @property
    def recent_failures(self) -> int:
        """Failures counted in the last ``TALLY_TICKS`` ticks and the one in progress."""
        return self.past_failures + self.failures


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetStatistics:
    """The fleet as this replica last saw it.

    Attributes:
        live: Live replicas (heartbeat not expired), this one included.
        open: How many of them are open or half-open (fleet-opened ones included).
        calls: Calls in the replicas' windows, summed.
        failure_rate: The combined failure rate (0.0 with no calls).
        fleet_opened: Whether this replica is open because a fleet rule opened it.
        available: Whether the last exchange with the shared store succeeded.
    """

    live: int
    open: int
    calls: int
    failure_rate: float
    fleet_opened: bool
    available: bool


def fleet_verdict(
    summaries: Sequence[ReplicaSummary],
    own_failures: int,
    *,
    quorum: float | None,
    threshold: float,
    minimum_calls: int,
) -> bool:
    """Whether a fleet rule says this replica should be open.

    Args:
        summaries: One per live replica, this one included (with its current window).
        own_failures: Failures in this replica's own window now.
        quorum: The quorum fraction, or ``None`` to disable the quorum rule.
        threshold: The failure rate that opens (``failure_rate_threshold``).
        minimum_calls: Calls the fleet's windows must hold before the rate is judged.
    """
    live = len(summaries)
    if live == 0:
        return False
    if quorum is not None:
        voters = sum(1 for s in summaries if s.open and not s.fleet_opened)
        if voters > quorum * live:
            return True
    if own_failures < 1:
        return False
    calls = sum(s.calls for s in summaries)
    failures = sum(s.failures for s in summaries)
    return calls >= max(minimum_calls, 1) and failures >= threshold * calls


def held_open(summaries: Sequence[ReplicaSummary], me: str) -> bool:
    """Whether a replica the fleet opened must stay open: another live replica is open on its
    own window (it is the one that probes; the follower closes when it recovers)."""
    return any(s.open and not s.fleet_opened and s.replica != me for s in summaries)
