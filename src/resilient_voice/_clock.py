"""The clock every time-dependent primitive reads.

Intervals are measured on a monotonic clock, never wall time, and every primitive accepts
``clock=`` so tests can inject :class:`resilient_voice.testing.ManualClock` and run long scenarios
exactly and instantly. A clock provides four things:

- ``now()``: monotonic seconds (the origin is arbitrary);
- ``sleep(seconds)`` and ``sleep_until(deadline)``: wait on this clock;
- ``deadline_scope(deadline)``: an anyio cancel scope that is cancelled when this clock reaches
  ``deadline``; this is how timeouts are measured on an injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, runtime_checkable

import anyio

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A monotonic time source that can also wait and time out."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock (a checkpoint even when ``seconds <= 0``)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Wait until ``now() >= deadline``."""
        ...

    def deadline_scope(self, deadline: float) -> AbstractContextManager[anyio.CancelScope]:
        """Return a context manager around a cancel scope cancelled at ``deadline``."""
        ...


class SystemClock:
    """The real monotonic clock (``time.monotonic``) with anyio's sleeps and cancel scopes."""

    __slots__ = ()

    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - time.monotonic()))

    @contextmanager
    def deadline_scope(self, deadline: float) -> Iterator[anyio.CancelScope]:
        # The event loop's clock may have another origin (trio's does), so convert the remaining
        # time rather than the absolute deadline.
        remaining = deadline - time.monotonic()
        with anyio.CancelScope(deadline=anyio.current_time() + remaining) as scope:
            yield scope

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
"""The shared system clock; stateless, so sharing it is safe."""
