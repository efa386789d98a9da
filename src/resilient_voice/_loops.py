"""Which event loop is running the calling code, and whether a loop seen earlier has ended.

Two owners ask, with two meanings of "ended":

- The breaker keeps its state without locks because one event loop runs one task at a time.
  Used from two threads (or two loops) at once, that state is corrupted silently, so the breaker
  remembers the loop holding its outstanding permits and refuses another one while that loop
  still runs (:func:`loop_finished`: not running any more). It asks on its slow paths only
  (permit admission and settlement, state transitions), never on the closed fast path.
- The transport's pooled connections belong to the loop that opened them and stay usable while
  that loop is merely paused between runs; only a *closed* loop makes them unusable
  (:func:`loop_closed`). It asks once per request, so :func:`current_loop` stays cheap.

Neither backend is imported here: trio is looked up in ``sys.modules`` (a trio run has imported
it, and sniffio with it), so ``import resilient_voice`` stays light.
"""

from __future__ import annotations

import asyncio
import sys
import threading

__all__ = ["current_loop", "current_task_id", "loop_closed", "loop_finished"]


def current_loop() -> object | None:
    """The running loop of this thread: the trio run's token or the asyncio loop, else ``None``.

    Trio is checked first because a trio guest run ticks inside an asyncio host loop's thread;
    trio sets ``sniffio.thread_local.name`` only while it runs.
    """
    sniffio = sys.modules.get("sniffio")
    if sniffio is not None and sniffio.thread_local.name == "trio":
        token: object = sys.modules["trio"].lowlevel.current_trio_token()
        return token
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def current_task_id() -> int:
    """The running task's id, the value ``anyio.get_current_task().id`` gives (``id()`` of the
    asyncio or trio task), without building anyio's ``TaskInfo``: about a tenth of its cost,
    which matters on a per-call path.

    Raises:
        RuntimeError: No task is running in this thread.
    """
    sniffio = sys.modules.get("sniffio")
    if sniffio is not None and sniffio.thread_local.name == "trio":
        return id(sys.modules["trio"].lowlevel.current_task())
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("no task is running in this thread")
    return id(task)


def loop_finished(loop: object | None, thread: int) -> bool:
    """Whether ``loop`` (found by :func:`current_loop` in ``thread``) can no longer run code.

    An asyncio loop that is not running (closed, or between ``run_until_complete`` calls) and
    a trio run that has returned count as finished; so does the loop-less context of a thread
    that has ended. Safe to call from any thread.
    """
    if loop is None:
        return thread == threading.get_ident() or all(
            other.ident != thread for other in threading.enumerate()
        )
    if isinstance(loop, asyncio.AbstractEventLoop):
        return not loop.is_running()
    return _trio_run_finished(loop)


def loop_closed(loop: object) -> bool:
    """Whether ``loop`` (found by :func:`current_loop`) is closed for good.

    Unlike :func:`loop_finished`, an asyncio loop that is only paused between
    ``run_until_complete`` calls is not closed: what it opened (connections) still works.
    """
    if isinstance(loop, asyncio.AbstractEventLoop):
        return loop.is_closed()
    return _trio_run_finished(loop)


def _trio_run_finished(token: object) -> bool:
    """Whether the trio run of ``token`` has returned (a trio run is never paused)."""
    trio = sys.modules.get("trio")
    if trio is None:  # pragma: no cover - a trio token implies trio is imported
        return True
    try:
        token.run_sync_soon(_nothing)  # type: ignore[attr-defined]
    except trio.RunFinishedError:
        return True
    return False


def _nothing() -> None:
    return None
