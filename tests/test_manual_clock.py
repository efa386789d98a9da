from __future__ import annotations

import anyio
import pytest

from resilient_voice.testing import ManualClock


def test_advance_rejects_negative_and_nan() -> None:
    clock = ManualClock()
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(float("nan"))
    with pytest.raises(ValueError, match="start"):
        ManualClock(float("inf"))


async def test_sleep_wakes_only_when_advanced_past_deadline() -> None:
    clock = ManualClock(100.0)
    woke: list[float] = []

    async def sleeper(delay: float) -> None:
        await clock.sleep(delay)
        woke.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper, 2.0)
        tg.start_soon(sleeper, 1.0)
        await anyio.wait_all_tasks_blocked()
        assert clock.pending == 2
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == [101.0]
        clock.advance(5)
    assert woke == [101.0, 106.0]
    assert clock.pending == 0


async def test_deadline_scope_cancels_at_deadline() -> None:
    clock = ManualClock()
    reached = False
    async with anyio.create_task_group() as tg:

        async def guarded() -> None:
            nonlocal reached
            with clock.deadline_scope(3.0) as scope:
                await anyio.sleep_forever()
            reached = scope.cancelled_caught

        tg.start_soon(guarded)
        await anyio.wait_all_tasks_blocked()
        clock.advance(2.9)
        await anyio.wait_all_tasks_blocked()
        assert not reached
        clock.advance(0.1)
    assert reached


async def test_deadline_scope_in_the_past_is_cancelled_at_once() -> None:
    clock = ManualClock(5.0)
    with clock.deadline_scope(5.0) as scope:
        await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught


async def test_cancelled_sleeper_leaves_no_pending_entry() -> None:
    clock = ManualClock()
    with anyio.move_on_after(0.01):
        await clock.sleep(10)
    assert clock.pending == 0
    assert clock.next_deadline() is None


async def test_autojump_runs_long_scenarios_instantly_in_order() -> None:
    clock = ManualClock(autojump=True)
    order: list[tuple[str, float]] = []

    async def worker(name: str, delays: list[float]) -> None:
        for delay in delays:
            await clock.sleep(delay)
            order.append((name, clock.now()))

    with anyio.fail_after(5):  # real seconds: a guard against a hang, not a measurement
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, "a", [30.0, 30.0, 30.0])
            tg.start_soon(worker, "b", [45.0, 45.0])
            tg.start_soon(worker, "c", [3600.0])
    # "a" and "b" both wake at 90.0; their relative order at a tie is the scheduler's choice.
    assert order[:3] == [("a", 30.0), ("b", 45.0), ("a", 60.0)]
    assert sorted(order[3:5]) == [("a", 90.0), ("b", 90.0)]
    assert order[5] == ("c", 3600.0)
    assert clock.now() == 3600.0


async def test_autojump_fires_deadline_scope_of_a_sleeping_task() -> None:
    clock = ManualClock(autojump=True)
    with anyio.fail_after(5):
        with clock.deadline_scope(1.5) as scope:
            await clock.sleep(10)
    assert scope.cancelled_caught
    assert clock.now() == 1.5
