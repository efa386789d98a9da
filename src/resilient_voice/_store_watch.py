"""The small breaker every shared-store fallback keeps around its store (limiter, call leases).

A call that finds the store slow or gone marks it down: calls are answered locally, without
touching the network, until a re-probe time that backs off (0.5 s doubling to 8 s, with +-20 %
jitter so replicas do not probe together); the first call after it probes the store with its
real request, and a success marks it up. Each transition is one log line and one
:class:`~resilient_voice.events.StoreAvailabilityChanged` event, never one per call. What is
answered while the store is down is the fallback's own business.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Final

from resilient_voice.events import Listener, StoreAvailabilityChanged, dispatch

__all__ = ["PROBE_FIRST", "PROBE_MAX", "StoreWatch"]

PROBE_FIRST: Final = 0.5
"""Seconds to the first re-probe after the store failed."""
PROBE_MAX: Final = 8.0
"""The longest wait between re-probes."""


class StoreWatch:
    """Whether one primitive's shared store is answering, and when to ask it again."""

    __slots__ = (
        "_backoff",
        "_listeners",
        "_log",
        "_mode",
        "_name",
        "_now",
        "_primitive",
        "_subject",
        "down",
        "next_probe",
        "transitions",
    )

    def __init__(
        self,
        *,
        subject: str,
        primitive: str,
        name: str,
        mode: str,
        now: Callable[[], float],
        listeners: Callable[[], tuple[Listener, ...]],
        log: logging.Logger,
    ) -> None:
        self._subject = subject  # how log lines name the primitive: "limiter", "call leases"
        self._primitive = primitive  # the event's bounded label: "limiter", "leases"
        self._name = name
        self._mode = mode
        self._now = now
        self._listeners = listeners
        self._log = log
        self._backoff = PROBE_FIRST
        self.down = False
        self.next_probe = 0.0
        self.transitions = 0

    def probing(self) -> bool:
        """Whether to call the store: it is up, or a re-probe is due (then schedule the next).

        Calls arriving while that probe is in flight answer locally.
        """
        if not self.down:
            return True
        now = self._now()
        if now < self.next_probe:
            return False
        self._schedule(now)
        return True

    def failed(self, error: BaseException) -> bool:
        """The store did not answer; whether this call marked it down (a transition)."""
        if self.down:
            return False
        self.down = True
        self.transitions += 1
        self._schedule(self._now())
        self._log.warning(
            "%s %r: shared store unavailable (%s); on_backend_error=%r until it answers",
            self._subject,
            self._name,
            str(error),  # not the exception: a kept log record would keep its frames alive
            self._mode,
        )
        self._tell(available=False)
        return True

    def recovered(self) -> None:
        """The store answered after being marked down."""
        self.down = False
        self._backoff = PROBE_FIRST
        self.transitions += 1
        self._log.warning("%s %r: shared store available again", self._subject, self._name)
        self._tell(available=True)

    def _schedule(self, now: float) -> None:
        self.next_probe = now + self._backoff * random.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, PROBE_MAX)

    def _tell(self, *, available: bool) -> None:
        listeners = self._listeners()
        if listeners:
            event = StoreAvailabilityChanged(self._name, available, self._mode, self._primitive)
            dispatch(listeners, event)
