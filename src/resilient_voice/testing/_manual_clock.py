"""A clock that only moves when a test moves it."""

from __future__ import annotations

import asyncio
import heapq
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import anyio.lowlevel

from resilient_voice import _validate

__all__ = ["ManualClock"]


class _Sleeper:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()

    def wake(self) -> None:
        self.event.set()


class ManualClock:
    """A monotonic clock advanced by hand, for exact and instant tests of time-dependent code.

    Inject it with ``clock=`` into any primitive. ``advance(seconds)`` moves time forward and
    wakes every sleeper (and cancels every :meth:`deadline_scope`) whose deadline has passed, in
    deadline order. Nothing else moves it, so a test states exactly when each timeout fires.

    With ``autojump=True`` the clock also moves by itself, like trio's ``MockClock`` autojump:
    whenever every task in the event loop is blocked (``anyio.wait_all_tasks_blocked``) and some
    task is sleeping on this clock, time jumps to the earliest pending deadline. Long simulated
    scenarios (a 30 s open circuit, a minute of paced calls) then run in milliseconds. One
    sleeping task at a time drives the jumps; a task blocked on real I/O counts as blocked, so
    use autojump only for code that waits on this clock, not on the network. Deadline scopes
    alone do not drive jumps: some task must be sleeping on the clock.

    Args:
        start: The initial reading of :meth:`now`.
        autojump: Jump to the next deadline whenever all tasks are blocked.
    """

    def __init__(self, start: float = 0.0, *, autojump: bool = False) -> None:
        self._now = _validate.number("start", start, minimum=-math.inf)
        self._autojump = _validate.flag("autojump", autojump)
        # Heap entries are [deadline, seq, callback, sleeper]; a removed entry gets callback None.
        self._heap: list[list[object]] = []
        self._seq = 0
        self._driver: _Sleeper | None = None

    def now(self) -> float:
        """The current reading, in seconds."""
        return self._now

    @property
    def autojump(self) -> bool:
        """Whether the clock jumps by itself when every task is blocked."""
        return self._autojump

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire everything now due.

        Raises:
            ValueError: ``seconds`` is negative or not finite; monotonic time cannot go back.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        self._set(self._now + seconds)

    def advance_to(self, deadline: float) -> None:
        """Move time forward to ``deadline`` (no-op if already there) and fire what is due."""
        if not math.isfinite(deadline):
            raise ValueError(f"deadline must be finite, got {deadline!r}")
        if deadline > self._now:
            self._set(deadline)

    def next_deadline(self) -> float | None:
        """The earliest pending deadline of a sleeper or deadline scope, or ``None``."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        return float(heap[0][0]) if heap else None  # type: ignore[arg-type]

    @property
    def pending(self) -> int:
        """How many sleepers and deadline scopes are waiting on this clock."""
        return sum(1 for entry in self._heap if entry[2] is not None)

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has advanced by ``seconds``."""
        await self.sleep_until(self._now + max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        """Wait until ``now() >= deadline``; a checkpoint even when it already is."""
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper()
        entry = self._push(deadline, sleeper.wake, sleeper)
        try:
            while self._now < deadline:
                if self._autojump and self._driver is None:
                    self._driver = sleeper
                    try:
                        await self._drive(deadline)
                    finally:
                        self._driver = None
                        entry[2] = None
                        self._promote()
                else:
                    await sleeper.event.wait()
                    # Woken either because time passed or to take over driving the autojump.
                    sleeper.event = anyio.Event()
        finally:
            entry[2] = None
            entry[3] = None

    @contextmanager
    def deadline_scope(self, deadline: float) -> Iterator[anyio.CancelScope]:
        """A cancel scope that this clock cancels when it reaches ``deadline``."""
        scope = anyio.CancelScope()
        entry: list[object] | None = None
        if deadline <= self._now:
            scope.cancel()
        else:
            entry = self._push(deadline, scope.cancel, None)
        try:
            with scope:
                yield scope
        finally:
            if entry is not None:
                entry[2] = None

    def _push(
        self, deadline: float, callback: Callable[[], None], sleeper: _Sleeper | None
    ) -> list[object]:
        self._seq += 1
        entry: list[object] = [deadline, self._seq, callback, sleeper]
        heapq.heappush(self._heap, entry)
        return entry

    def _set(self, new_now: float) -> None:
        self._now = new_now
        heap = self._heap
        while heap and float(heap[0][0]) <= new_now:  # type: ignore[arg-type]
            entry = heapq.heappop(heap)
            callback = entry[2]
            if callback is not None:
                entry[2] = None
                callback()  # type: ignore[operator]

    async def _drive(self, deadline: float) -> None:
        while self._now < deadline:
            await _wait_all_tasks_blocked()
            if self._now >= deadline:
                return
            target = self.next_deadline()
            if target is not None and target > self._now:
                self._set(target)
            else:
                self._set(deadline)

    def _promote(self) -> None:
        # The driver left: wake one other live sleeper so it takes over the jumping.
        for entry in self._heap:
            sleeper = entry[3]
            if entry[2] is not None and isinstance(sleeper, _Sleeper):
                sleeper.wake()
                return

    def __repr__(self) -> str:
        return (
            f"ManualClock(now={self._now!r}, autojump={self._autojump!r}, pending={self.pending})"
        )


async def _wait_all_tasks_blocked() -> None:
    """Return once every other task is blocked.

    anyio's own helper polls with a real 0.1 s sleep on asyncio, which would make autojump slow;
    this one yields with ``sleep(0)`` instead. On trio, trio's helper is exact.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            from trio.testing import wait_all_tasks_blocked

            await wait_all_tasks_blocked()
            return
    this_task = asyncio.current_task()
    await asyncio.sleep(0)
    while True:
        for task in asyncio.all_tasks():
            if task is this_task:
                continue
            waiter = task._fut_waiter  # type: ignore[attr-defined]
            if waiter is None or waiter.done():
                await asyncio.sleep(0)
                break
        else:
            return
