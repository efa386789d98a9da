"""The breaker's state machine: synchronous, clock-free, and the only place that changes state.

Polly splits a breaker into a state controller, one behaviour per trip mode and health metrics;
this module is the controller (:class:`StateMachine`) and the two behaviours
(:class:`ConsecutiveFailures`, :class:`FailureRate`); the windows they read are in
:mod:`._health`. Every method takes ``now`` as an argument and nothing here reads a clock,
awaits, takes a lock or reports an event, so the machine can be property-tested on its own and a
shared store can replace nothing but the publishing around it.

Outcomes carry the *epoch* their call was admitted in, a number bumped on every state change:
an outcome from an older epoch (a straggler that started before the breaker opened) changes
nothing. The facade's closed fast path reads and writes ``fast``, ``epoch`` and
``consecutive_failures`` directly, which is why they are plain slotted attributes; in a window
mode it also adds a success to ``window`` and asks ``trip_mode.tripped`` itself, as
:meth:`StateMachine.succeeded` would, two calls fewer on the path every successful call takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

from resilient_voice.breaker._config import BreakerConfig
from resilient_voice.breaker._health import CountWindow, TimeWindow
from resilient_voice.events import BreakerState

__all__ = ["ConsecutiveFailures", "FailureRate", "StateMachine"]

_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN
# A caller refused while probes run is told to come back soon (bounded by these, in seconds).
_PROBE_WAIT_CAP: Final = 1.0
_PROBE_WAIT_FLOOR: Final = 0.05


class ConsecutiveFailures:
    """Trip mode without a window: open after ``failure_threshold`` failures in a row."""

    __slots__ = ("threshold",)

    window: None = None

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def judge(self, consecutive_failures: int, now: float, failed: bool, slow: bool) -> bool:
        """Whether the breaker opens after this outcome."""
        del now, slow
        return failed and consecutive_failures >= self.threshold


class FailureRate:
    """Trip mode with a window: open on a failure (or slow-call) rate once enough calls ran."""

    __slots__ = ("failure_rate", "minimum", "slow_rate", "window")

    def __init__(self, window: CountWindow | TimeWindow, config: BreakerConfig) -> None:
        self.window = window
        self.minimum = config.minimum_calls or 1
        self.failure_rate = config.failure_rate_threshold
        self.slow_rate = config.slow_call_rate_threshold

    def judge(self, consecutive_failures: int, now: float, failed: bool, slow: bool) -> bool:
        """Add the outcome to the window; whether the breaker opens after it."""
        del consecutive_failures
        self.window.add(now, failed, slow)  # expires what ``now`` leaves out, too
        return self.tripped()

    def tripped(self) -> bool:
        """Whether the window, as it stands, opens the breaker."""
        window = self.window
        # Thresholds are in (0, 1]: a window with no failure and no slow call never trips,
        # which settles most successes without a division.
        failures = window.failures
        slow = window.slow
        if not (failures or slow):
            return False
        calls = window.calls
        if calls < self.minimum:
            return False
        failure_rate = self.failure_rate
        if failure_rate is not None and failures / calls >= failure_rate:
            return True
        slow_rate = self.slow_rate
        return slow_rate is not None and slow / calls >= slow_rate


class StateMachine:
    """CLOSED, OPEN and HALF_OPEN, with the counters that move a breaker between them.

    ``on_transition(old, new)`` is called after every state entry (also CLOSED to CLOSED on a
    reset); the facade reports it to listeners and to a shared store.
    """

    __slots__ = (
        "_config",
        "consecutive_failures",
        "consecutive_trips",
        "epoch",
        "fast",
        "fast_eligible",
        "jitter",
        "on_transition",
        "open_duration",
        "open_until",
        "probe_successes",
        "probes",
        "probes_waiting",
        "state",
        "trip_mode",
        "trips",
        "window",
    )

    def __init__(self, config: BreakerConfig) -> None:
        self._config = config
        window: CountWindow | TimeWindow | None = None
        if config.window_size is not None:
            window = CountWindow(config.window_size)
        elif config.window_duration is not None:
            window = TimeWindow(config.window_duration)
        self.window = window
        self.trip_mode: ConsecutiveFailures | FailureRate = (
            ConsecutiveFailures(config.failure_threshold)
            if window is None
            else FailureRate(window, config)
        )
        self.state = _CLOSED
        self.epoch = 0
        self.fast = False
        self.fast_eligible = False
        self.on_transition: Callable[[BreakerState, BreakerState], None] | None = None
        # Scales each configured open duration (a shared store spreads replicas by +-15 %, so
        # that they do not all probe a recovering upstream at once); None: no jitter.
        self.jitter: Callable[[float], float] | None = None
        self.consecutive_failures = 0
        self.consecutive_trips = 0
        self.trips = 0
        self.open_duration = 0.0
        self.open_until = 0.0
        self.probes: list[float] = []  # start times of the running probes, oldest first
        self.probes_waiting = 0  # probes admitted but not started yet (queued for a token)
        self.probe_successes = 0

    def set_fast_eligible(self, eligible: bool) -> None:
        """Say whether the facade may skip permits while CLOSED (nothing to observe or time)."""
        self.fast_eligible = eligible
        self.fast = eligible and self.state is _CLOSED

    def admit_probe(self, now: float, started: bool) -> float | None:
        """Admit a probe when OPEN has run out or HALF_OPEN has a free slot (never called while
        CLOSED: the facade admits closed calls itself).

        Returns ``None`` when a probe was admitted (its start is recorded at ``now`` when
        ``started``, else it waits uncounted in time), or the ``retry_after`` of the refusal.
        """
        if self.state is _OPEN:
            if now < self.open_until:
                return self.open_until - now
            self.probes.clear()
            self.probes_waiting = 0
            self.probe_successes = 0
            self._enter(_HALF_OPEN)
        probes = self.probes
        max_wait = self._config.max_wait_in_half_open
        # Only started probes are judged: probes[0] is the oldest start (starts are appended
        # in clock order), and a probe still queued for a token has sent nothing yet.
        if max_wait is not None and probes and now - probes[0] >= max_wait:
            self.trip(now)
            return self.open_until - now
        if len(probes) + self.probes_waiting >= self._config.half_open_max_calls:
            return self.probe_wait(now)
        if started:
            probes.append(now)
        else:
            self.probes_waiting += 1
        return None

    def probe_due(self, now: float) -> bool:
        """Whether a call arriving at ``now`` would be admitted as a probe (OPEN run out, or
        HALF_OPEN with a free slot): the only admission a shared store is consulted for."""
        if self.state is _CLOSED or now < self.open_until:
            return False
        return len(self.probes) + self.probes_waiting < self._config.half_open_max_calls

    def probe_wait(self, now: float) -> float:
        """The ``retry_after`` for a caller refused while probes run: soon, not a full open
        period, since a probe usually answers in a moment and then the breaker closes."""
        max_wait = self._config.max_wait_in_half_open
        if max_wait is not None and self.probes:
            wait = self.probes[0] + max_wait - now
        else:
            wait = min(self._config.recovery_timeout, _PROBE_WAIT_CAP)
        return max(wait, _PROBE_WAIT_FLOOR)

    def start_probe(self, epoch: int, probe_start: float | None, now: float) -> bool:
        """A probe admitted at ``probe_start`` (``None``: not started) starts now."""
        if epoch != self.epoch:
            return False
        self._remove_probe(probe_start)
        self.probes.append(now)
        return True

    def succeeded(
        self, epoch: int, probe: bool, probe_start: float | None, now: float | None, slow: bool
    ) -> None:
        """A call admitted in ``epoch`` succeeded; ``now`` may be ``None`` in consecutive mode
        when nothing times calls (a slow call always comes with a time)."""
        if epoch != self.epoch:
            return
        if probe:
            self._remove_probe(probe_start)
            if slow and now is not None:
                self.trip(now)
                return
            self.probe_successes += 1
            if self.probe_successes >= self._config.success_threshold:
                self.close()
            return
        self.consecutive_failures = 0
        if self.window is not None and now is not None:
            self._judge(now, False, slow)

    def failed(
        self, epoch: int, probe: bool, probe_start: float | None, now: float, slow: bool
    ) -> None:
        """A call admitted in ``epoch`` counted as a failure."""
        if epoch != self.epoch:
            return
        if probe:
            self._remove_probe(probe_start)
            self.trip(now)
            return
        self.consecutive_failures += 1
        self._judge(now, True, slow)

    def failed_fast(self, epoch: int) -> bool:
        """A call admitted on the closed fast path failed; whether the breaker must now trip
        (the facade then calls :meth:`trip` with the time, read only in that case)."""
        if epoch != self.epoch:
            return False
        self.consecutive_failures += 1
        return self.consecutive_failures >= self._config.failure_threshold

    def judged_fast(self, epoch: int, now: float, failed: bool) -> bool:
        """A call admitted on a window mode's closed fast path succeeded or failed: count it as
        :meth:`succeeded` and :meth:`failed` count a closed call (no slow-call rule: the fast
        path never runs with one); whether the breaker must now trip (the facade then calls
        :meth:`trip`, so that a count window reads the clock only in that case: ``now`` is
        only the time window's)."""
        if epoch != self.epoch:
            return False
        if failed:
            self.consecutive_failures += 1
        else:
            self.consecutive_failures = 0
        return self.trip_mode.judge(self.consecutive_failures, now, failed, False)

    def released(self, epoch: int, probe: bool, probe_start: float | None) -> None:
        """A call admitted in ``epoch`` counted nothing (cancelled, ignored, never made)."""
        if probe and epoch == self.epoch:
            self._remove_probe(probe_start)

    def _judge(self, now: float, failed: bool, slow: bool) -> None:
        if self.trip_mode.judge(self.consecutive_failures, now, failed, slow):
            self.trip(now)

    def _remove_probe(self, start: float | None) -> None:
        # Slots may have been freed already (the owning loop ended); freeing twice must not fail.
        if start is None:
            if self.probes_waiting > 0:
                self.probes_waiting -= 1
        else:
            with contextlib.suppress(ValueError):
                self.probes.remove(start)

    def forget_probes(self) -> None:
        """Free every probe slot (their permits can never be reported)."""
        self.probes.clear()
        self.probes_waiting = 0

    def trip(self, now: float, duration: float | None = None) -> None:
        """Open now, for ``duration`` or the (grown) configured open duration."""
        self.trips += 1
        self.consecutive_trips += 1
        if duration is None:
            config = self._config
            if self.consecutive_trips == 1 or self.open_duration <= 0.0:
                duration = config.recovery_timeout
            else:
                cap = config.max_recovery_timeout or config.recovery_timeout
                duration = min(self.open_duration * config.backoff_multiplier, cap)
            self.open_duration = duration
            if self.jitter is not None:
                duration = self.jitter(duration)
        else:
            self.open_duration = duration
        self.open_until = now + duration
        self.forget_probes()
        self.probe_successes = 0
        self._enter(_OPEN)

    def close(self) -> None:
        """Close and forget the counters (the trip count is kept)."""
        self.consecutive_failures = 0
        self.consecutive_trips = 0
        self.open_duration = 0.0
        self.open_until = 0.0
        self.forget_probes()
        self.probe_successes = 0
        if self.window is not None:
            self.window.clear()
        self._enter(_CLOSED)

    def _enter(self, new: BreakerState) -> None:
        old = self.state
        self.state = new
        self.epoch += 1
        self.fast = self.fast_eligible and new is _CLOSED
        if self.on_transition is not None:
            self.on_transition(old, new)

    def window_counts(self, now: float) -> tuple[int, int, int] | None:
        """Calls, failures and slow calls in the window at ``now``; ``None`` without a window."""
        window = self.window
        if window is None:
            return None
        window.expire(now)
        return window.calls, window.failures, window.slow

    def retry_after(self, now: float) -> float:
        """Seconds until a probe may be admitted (0.0 when not OPEN, or OPEN but run out)."""
        return max(0.0, self.open_until - now) if self.state is _OPEN else 0.0
