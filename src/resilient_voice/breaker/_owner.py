"""Which thread and event loop may change a breaker's state right now.

The state machine takes no lock, so two loops using one breaker at once would corrupt it (a probe
slot lost for ever, say). The loop holding outstanding permits owns the breaker; another loop is
refused at admission, settlement and state changes while that loop still runs. Once it has ended,
whatever permits it left unreported can never be settled, so the next loop takes over: sequential
reuse (``asyncio.run`` per task, one test on asyncio and the next on trio) stays allowed. Only the
owner changes its own count, so the owner's path takes no lock; the closed fast path holds no
permit and checks nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

from resilient_voice._loops import current_loop, loop_finished
from resilient_voice.failure import ConcurrentUseError

__all__ = ["Owner", "Ownership"]

_get_ident: Final = threading.get_ident


class Owner:
    """The thread and event loop that hold a breaker's outstanding permits, and how many."""

    __slots__ = ("loop", "permits", "thread")

    def __init__(self, thread: int, loop: object | None) -> None:
        self.thread = thread
        self.loop = loop
        self.permits = 0


class Ownership:
    """Counts a breaker's outstanding permits per owner; refuses a second live loop.

    Args:
        name: The breaker's name, for the error.
        orphaned: Called (under the lock) when a loop takes over from one that ended with
            permits outstanding: their probe slots must be freed.
    """

    __slots__ = ("_lock", "_name", "_orphaned", "owner")

    def __init__(self, name: str, orphaned: Callable[[], None]) -> None:
        self._name = name
        self._orphaned = orphaned
        self._lock = threading.Lock()
        self.owner = Owner(0, None)

    def claim(self) -> Owner:
        """Count one more outstanding permit (or state change) for the calling loop.

        Raises:
            RuntimeError: Another loop that is still running holds permits.
        """
        thread = _get_ident()
        loop = current_loop()
        owner = self.owner
        if owner.thread == thread and owner.loop is loop:
            # Count first, then look again: a loop taking over sets the owner first, then
            # looks at the count (in _take_over), so at most one of the two goes ahead.
            owner.permits += 1
            if self.owner is owner:
                return owner
            owner.permits -= 1
        return self._take_over(thread, loop)

    def _take_over(self, thread: int, loop: object | None) -> Owner:
        with self._lock:
            owner = self.owner
            if owner.thread == thread and owner.loop is loop:
                owner.permits += 1
                return owner
            outstanding = owner.permits
            if outstanding and not loop_finished(owner.loop, owner.thread):
                raise self.shared_error(owner)
            new = Owner(thread, loop)
            new.permits = 1
            self.owner = new
            if owner.permits > outstanding:
                # The owner claimed again while this was deciding: it is alive, and in use.
                self.owner = owner
                raise self.shared_error(owner)
            if outstanding:
                # Every outstanding permit belonged to the loop that ended: none can be
                # reported now, and their late reports (if any) count nothing.
                self._orphaned()
            return new

    def may_settle(self, owner: Owner) -> bool:
        """Whether a permit counted for ``owner`` may record its outcome from here.

        True (and the caller records, then gives the count back) in the owner's own thread
        while it still owns the breaker. Otherwise the caller only frees the permit's probe
        slot: False for a permit orphaned by the end of its loop; a permit settled from another
        thread or loop while its own loop runs raises.

        Raises:
            RuntimeError: Settled from a second loop while the owner's loop still runs.
        """
        thread = _get_ident()
        # Settled in the thread that admitted it, whose loop still owns the breaker: no loop
        # lookup is needed (a thread runs one loop at a time, and a new loop in this thread
        # would have taken the breaker over at its first admission).
        if owner.thread == thread and self.owner is owner:
            return True
        loop = current_loop()
        if owner.thread == thread and owner.loop is loop:
            # Taken over while this permit was out: its loop looked finished (stopped between
            # two runs), or another thread raced for it, which this settlement now reveals.
            owner.permits -= 1
            current = self.owner
            if (
                current.permits
                and (current.thread != thread or current.loop is not loop)
                and not loop_finished(current.loop, current.thread)
            ):
                raise self.shared_error(current)
            return False
        if loop_finished(owner.loop, owner.thread):
            return False
        # Left counted: its loop keeps the breaker until it ends.
        raise self.shared_error(owner)

    def shared_error(self, owner: Owner) -> RuntimeError:
        # A programming error: a retry policy must neither retry it nor call it an unknown
        # outcome (at admission nothing was sent); its type says so.
        return ConcurrentUseError(
            f"CircuitBreaker {self._name!r} is used from two threads or event loops at once: "
            f"an event loop in thread {owner.thread} holds its permits and is still running. "
            "A breaker belongs to one event loop at a time (it keeps its state without "
            "locks): build one breaker per event loop or thread, or send every call to one "
            "loop (anyio.from_thread.run, asyncio.run_coroutine_threadsafe)."
        )
