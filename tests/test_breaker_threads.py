"""A breaker shared by two threads (or event loops) at once is detected, not corrupted.

Each thread runs its own event loop (asyncio in one, trio in the other). The threads meet at
``threading.Event``s, so which call overlaps which is fixed by the test, not by timing; the
waits have generous timeouts only so that a broken build fails instead of hanging. Sequential
reuse (one loop after another, on either backend) stays allowed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import trio

from resilient_voice import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    FailureKind,
    Policy,
    RetryPolicy,
)
from resilient_voice.testing import ManualClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
SAFETY = 30.0  # seconds: a guard against a hang, never a measured bound
SHARED = r"CircuitBreaker 'shared' is used from two threads or event loops at once"


class UpstreamError(Exception):
    pass


async def ok() -> str:
    return "ok"


def wait(event: threading.Event) -> None:
    assert event.wait(SAFETY), "the other thread never got there"


class Worker(threading.Thread):
    """Runs ``main`` in its own event loop in a thread; re-raises its error on join."""

    def __init__(self, backend: str, main: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.backend = backend
        self.main = main
        self.error: BaseException | None = None
        self.ended = threading.Event()  # set once its event loop has returned

    def run(self) -> None:
        try:
            if self.backend == "asyncio":
                asyncio.run(self.main())
            else:
                trio.run(self.main)
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended.set()

    def finish(self) -> None:
        self.join(SAFETY)
        assert not self.is_alive(), "worker thread hung"
        if self.error is not None:
            raise self.error


def run_pair(
    first: Callable[[], Any], second: Callable[[], Any], *, backends: tuple[str, str]
) -> None:
    workers = [Worker(backends[0], first), Worker(backends[1], second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.finish()


@pytest.mark.parametrize(
    "backends", [("asyncio", "trio"), ("trio", "asyncio"), ("asyncio", "asyncio")]
)
def test_a_second_loop_is_refused_while_the_first_holds_permits(backends: tuple[str, str]) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("shared", window_size=4, clock=clock)
    held, checked = threading.Event(), threading.Event()
    handed: list[Any] = []
    workers: list[Worker] = []
    refused: list[str] = []

    async def first() -> None:
        mine = await breaker.acquire()
        handed.append(await breaker.acquire())
        held.set()
        wait(checked)  # blocks this loop on purpose: its permits stay outstanding meanwhile
        mine.settle()
        handed[0].settle()  # already settled (wrongly) by the other thread: a no-op
        async with breaker:  # still this loop's breaker
            pass

    async def second() -> None:
        wait(held)
        with pytest.raises(RuntimeError, match=SHARED) as info:
            await breaker.acquire()
        refused.append(str(info.value))
        with pytest.raises(RuntimeError, match=SHARED):
            breaker.reset()
        with pytest.raises(RuntimeError, match=SHARED):
            breaker.force_open()
        retrying = Policy(breaker=breaker, retry=RetryPolicy(max_attempts=3, clock=clock))
        with pytest.raises(RuntimeError, match=SHARED) as info:
            await retrying.call(ok)  # neither retried nor an unknown outcome
        assert info.value.failure_kind is FailureKind.PERMANENT  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError, match=SHARED):
            handed[0].settle()  # another loop's permit
        assert handed[0].done
        checked.set()
        wait(workers[0].ended)
        # The first loop has ended: this one takes the breaker over.
        async with breaker:
            pass
        assert breaker.statistics().calls == 3  # the first loop's two calls and this one

    workers.extend([Worker(backends[0], first), Worker(backends[1], second)])
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.finish()
    assert "holds its permits and is still running" in refused[0]
    assert "build one breaker per event loop or thread" in refused[0]
    assert breaker.state is CLOSED


def test_a_probe_held_by_one_loop_is_not_stolen_and_closes_the_breaker() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("shared", failure_threshold=1, recovery_timeout=5.0, clock=clock)
    breaker.force_open()
    clock.advance(5.0)
    probing, checked = threading.Event(), threading.Event()

    async def prober() -> None:
        probe = await breaker.acquire()
        assert probe.probe
        probing.set()
        wait(checked)
        probe.settle()
        assert breaker.state is CLOSED

    async def intruder() -> None:
        wait(probing)
        for _ in range(3):
            with pytest.raises(RuntimeError, match=SHARED):
                await breaker.acquire()  # told, not given CircuitOpenError nor a probe slot
        assert breaker.statistics().half_open_calls == 1
        checked.set()

    run_pair(prober, intruder, backends=("trio", "asyncio"))
    assert breaker.state is CLOSED
    assert breaker.statistics().half_open_calls == 0


def test_two_loops_hammering_one_breaker_never_leave_it_stuck() -> None:
    # After one forced overlap, both threads run the same bounded mix of calls (successes,
    # failures, probes after clock advances) through the breaker and a Policy at once, holding
    # each permit across a checkpoint; a tiny GIL switch interval interleaves them finely.
    # Whatever the interleaving, each call runs, is refused by the breaker, or raises the
    # RuntimeError naming it; afterwards the breaker still recovers and closes.
    clock = ManualClock()
    breaker = CircuitBreaker(
        "shared",
        window_size=4,
        minimum_calls=2,
        recovery_timeout=1.0,
        half_open_max_calls=2,
        clock=clock,
    )
    policy = Policy(breaker=breaker, clock=clock)
    holding, overlapped = threading.Event(), threading.Event()
    together = threading.Barrier(2, timeout=SAFETY)
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def count(outcome: str) -> None:
        with lock:
            seen[outcome] = seen.get(outcome, 0) + 1

    def detected(error: RuntimeError) -> str:
        return "detected" if "CircuitBreaker 'shared'" in str(error) else f"unexpected: {error}"

    async def ok() -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    async def fail() -> None:
        await anyio.lowlevel.checkpoint()
        raise UpstreamError

    async def hammer() -> None:
        together.wait()
        for i in range(400):
            fn = fail if i % 7 == 0 else ok
            try:
                if i % 2:
                    await breaker.call(fn)
                else:
                    await policy.call(fn)
            except UpstreamError:
                count("failed")
            except CircuitOpenError:
                count("refused")
            except RuntimeError as error:
                count(detected(error))
            else:
                count("ran")
            if i % 4 == 0:
                clock.advance(0.5)  # let probes in

    async def on_asyncio() -> None:
        # One guaranteed overlap: hold a permit until the other thread has been refused.
        async with breaker:
            holding.set()
            wait(overlapped)
        await hammer()

    async def on_trio() -> None:
        wait(holding)
        with pytest.raises(RuntimeError, match=SHARED):
            await breaker.call(ok)
        overlapped.set()
        await hammer()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run_pair(on_asyncio, on_trio, backends=("asyncio", "trio"))
    finally:
        sys.setswitchinterval(interval)
    assert set(seen) <= {"ran", "failed", "refused", "detected"}, seen
    assert sum(seen.values()) == 800

    async def recover() -> None:
        for _ in range(10):  # whatever state the hammering left, it must come back
            clock.advance(1.0)
            try:
                await breaker.call(ok)
            except CircuitOpenError:
                continue
            if breaker.state is CLOSED:
                break

    asyncio.run(recover())
    assert breaker.state is CLOSED
    assert breaker.statistics().half_open_calls == 0


def test_sequential_loops_and_backends_may_reuse_one_breaker() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("shared", failure_threshold=1, recovery_timeout=1.0, clock=clock)

    async def fail() -> None:
        raise UpstreamError

    async def trip_it() -> None:
        with pytest.raises(UpstreamError):
            await breaker.call(fail)

    async def leak_a_probe() -> None:
        clock.advance(1.0)
        await breaker.acquire()  # a probe never reported: its loop ends with it outstanding

    async def recover() -> None:
        assert breaker.state is HALF_OPEN
        # The leaking loop has ended: its probe slot is freed and a new probe runs here.
        async with breaker:
            pass
        assert breaker.state is CLOSED

    for step in (trip_it, leak_a_probe):
        asyncio.run(step())  # a new asyncio loop per task
    trio.run(recover)  # then another backend, in the same thread
    asyncio.run(trip_it())
    worker = Worker("trio", leak_a_probe)  # a loop in another thread, after this one ended
    worker.start()
    worker.finish()
    asyncio.run(recover())


async def test_one_test_after_another_on_both_backends_shares_a_module_breaker() -> None:
    # Runs once per backend (conftest): the module-level breaker below sees both loops in turn.
    permit = await MODULE_BREAKER.acquire()
    permit.settle()
    async with MODULE_BREAKER:
        pass
    assert MODULE_BREAKER.state is CLOSED


MODULE_BREAKER = CircuitBreaker("module-level")
