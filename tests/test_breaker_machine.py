"""Property tests of the breaker's pure state machine: no clock, no event loop, time as numbers."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from resilient_voice.breaker import BreakerConfig, CircuitBreaker
from resilient_voice.breaker._machine import StateMachine
from resilient_voice.events import BreakerState

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def config(**options: Any) -> BreakerConfig:
    """The facade is the one way to build a configuration."""
    return CircuitBreaker("m", **options).config


def snapshot(machine: StateMachine) -> tuple[Any, ...]:
    return (
        machine.state,
        machine.epoch,
        machine.consecutive_failures,
        machine.trips,
        machine.open_until,
        tuple(machine.probes),
        machine.probes_waiting,
        machine.probe_successes,
        machine.window_counts(0.0),
    )


@given(threshold=st.integers(1, 5), outcomes=st.lists(st.booleans(), max_size=40))
def test_consecutive_mode_opens_exactly_at_a_run_of_failures(
    threshold: int, outcomes: list[bool]
) -> None:
    machine = StateMachine(config(failure_threshold=threshold))
    run = 0
    for failed in outcomes:
        if machine.state is OPEN:
            break
        if failed:
            machine.failed(machine.epoch, False, None, 0.0, False)
            run += 1
        else:
            machine.succeeded(machine.epoch, False, None, None, False)
            run = 0
        assert (machine.state is OPEN) == (run >= threshold)
        assert machine.consecutive_failures == run


@given(size=st.integers(1, 8), rate=st.sampled_from([0.25, 0.5, 1.0]), data=st.data())
def test_count_window_opens_when_the_rate_over_the_last_calls_reaches_the_threshold(
    size: int, rate: float, data: st.DataObject
) -> None:
    machine = StateMachine(config(window_size=size, failure_rate_threshold=rate))
    seen: list[bool] = []
    for failed in data.draw(st.lists(st.booleans(), max_size=30)):
        assert machine.state is CLOSED
        if failed:
            machine.failed(machine.epoch, False, None, 0.0, False)
        else:
            machine.succeeded(machine.epoch, False, None, 0.0, False)
        seen.append(failed)
        last = seen[-size:]
        expected = len(last) >= size and sum(last) / len(last) >= rate
        assert (machine.state is OPEN) == expected
        if expected:
            break


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "succeed", "fail", "release", "stale"]), st.floats(0, 5)
        ),
        max_size=60,
    ),
    max_calls=st.integers(1, 3),
    success_threshold=st.integers(1, 3),
)
def test_half_open_never_runs_more_probes_than_allowed(
    ops: list[tuple[str, float]], max_calls: int, success_threshold: int
) -> None:
    machine = StateMachine(
        config(
            failure_threshold=1,
            recovery_timeout=10.0,
            half_open_max_calls=max_calls,
            success_threshold=success_threshold,
        )
    )
    now = 0.0
    machine.trip(now)
    held: list[tuple[int, float]] = []
    for op, step in ops:
        now += step
        epoch = machine.epoch
        before = snapshot(machine)
        if op == "admit" and machine.state is CLOSED:
            machine.failed(epoch, False, None, now, False)  # a closed call (the facade's path)
        elif op == "admit":
            wait = machine.admit_probe(now, True)
            if wait is None:
                held.append((machine.epoch, now))
            else:
                assert wait > 0.0
        elif op == "stale":
            # An outcome from an epoch that is over changes nothing.
            machine.failed(epoch - 1, True, now, now, False)
            machine.succeeded(epoch - 1, False, None, now, False)
            assert snapshot(machine) == before
        elif held:
            probe_epoch, start = held.pop(0)
            if op == "succeed":
                machine.succeeded(probe_epoch, True, start, now, False)
            elif op == "fail":
                machine.failed(probe_epoch, True, start, now, False)
            else:
                machine.released(probe_epoch, True, start)
        held = [(e, s) for e, s in held if e == machine.epoch]
        assert len(machine.probes) + machine.probes_waiting <= max_calls
        assert machine.state is not CLOSED or not machine.probes
        assert machine.epoch >= epoch


@given(
    multiplier=st.sampled_from([1.0, 1.5, 2.0]),
    trips=st.integers(1, 8),
)
def test_open_duration_grows_by_the_multiplier_up_to_the_cap(multiplier: float, trips: int) -> None:
    machine = StateMachine(
        config(recovery_timeout=2.0, backoff_multiplier=multiplier, max_recovery_timeout=10.0)
    )
    now = 0.0
    expected = 2.0
    for trip in range(trips):
        if trip == 0:
            machine.trip(now)
        else:
            now = machine.open_until
            assert machine.admit_probe(now, True) is None
            assert machine.state is HALF_OPEN
            machine.failed(machine.epoch, True, now, now, False)
            expected = min(expected * multiplier, 10.0)
        assert machine.state is OPEN
        assert machine.open_until - now == expected
        assert machine.trips == trip + 1
    machine.close()
    assert (machine.state, machine.consecutive_trips, machine.open_until) == (CLOSED, 0, 0.0)


def test_every_state_entry_bumps_the_epoch_and_reports_the_transition() -> None:
    machine = StateMachine(config(failure_threshold=1, recovery_timeout=1.0))
    seen: list[tuple[BreakerState, BreakerState]] = []
    machine.on_transition = lambda old, new: seen.append((old, new))
    machine.failed(0, False, None, 0.0, False)
    assert machine.admit_probe(0.5, True) == 0.5
    assert machine.admit_probe(1.0, True) is None
    machine.succeeded(2, True, 1.0, 1.2, False)
    machine.close()
    assert machine.epoch == 4
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (CLOSED, CLOSED)]
