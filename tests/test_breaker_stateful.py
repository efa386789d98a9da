"""The breaker against a plain reference model, driven by random sequences of operations.

Hypothesis picks a configuration, then interleaves permit grants (held permits are concurrent
calls and concurrent probes; some are granted not started, as ``Policy`` does while a call waits
for a token, and started later), outcomes reported on held permits (success, failure, ignored,
released), whole calls through each use form (including cancelled ones), clock advances, and a
listener attached midway. The trip mode is consecutive failures, a count window or a time window;
with no listener, closed calls through the decorator and ``call()`` take the fast path of their
mode, and after the listener is attached they take permits. After every step the breaker's state
and statistics must equal the model's. The async code runs in a blocking portal, once on asyncio
and once on trio.
"""

from __future__ import annotations

import functools
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from resilient_voice.breaker import BreakerPermit, CircuitBreaker
from resilient_voice.errors import CircuitOpenError
from resilient_voice.events import BreakerState
from resilient_voice.testing import ManualClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class UpstreamError(Exception):
    pass


class IgnoredError(Exception):
    pass


@dataclass
class ModelPermit:
    epoch: int
    probe: bool
    started: float | None  # None: granted with started=False and not started yet


@dataclass
class Model:
    """The breaker's rules, written as plainly as possible."""

    failure_threshold: int
    recovery_timeout: float
    window_size: int | None
    window_duration: float | None
    minimum_calls: int
    failure_rate_threshold: float
    half_open_max_calls: int
    success_threshold: int
    max_wait: float | None
    multiplier: float
    cap: float
    now: float = 0.0
    state: BreakerState = CLOSED
    epoch: int = 0
    consecutive: int = 0
    window: list[bool] = field(default_factory=list)  # count window: the last outcomes
    timed: list[tuple[int, bool]] = field(default_factory=list)  # time window: (bucket, failed)
    open_until: float = 0.0
    open_duration: float = 0.0
    repeated_trips: int = 0
    trips: int = 0
    probes: list[float] = field(default_factory=list)  # start times of running probes
    waiting: int = 0  # probes granted, not started
    probe_successes: int = 0

    def acquire(self, *, started: bool = True) -> ModelPermit | float:
        """A permit, or the retry_after of the rejection."""
        if self.state is CLOSED:
            return ModelPermit(self.epoch, False, self.now if started else None)
        if self.state is OPEN:
            if self.now < self.open_until:
                return self.open_until - self.now
            self.state = HALF_OPEN
            self.epoch += 1
            self.probes = []
            self.waiting = 0
            self.probe_successes = 0
        running = sorted(self.probes)
        if self.max_wait is not None and running and self.now - running[0] >= self.max_wait:
            self.trip()
            return self.open_until - self.now
        if len(self.probes) + self.waiting >= self.half_open_max_calls:
            if self.max_wait is not None and running:
                return max(0.05, running[0] + self.max_wait - self.now)
            return max(0.05, min(self.recovery_timeout, 1.0))
        if started:
            self.probes.append(self.now)
        else:
            self.waiting += 1
        return ModelPermit(self.epoch, True, self.now if started else None)

    def start(self, permit: ModelPermit) -> None:
        if permit.probe and permit.epoch == self.epoch:
            self.free(permit)
            self.probes.append(self.now)
        permit.started = self.now

    def free(self, permit: ModelPermit) -> None:
        if permit.started is None:
            self.waiting -= 1
        else:
            self.probes.remove(permit.started)

    def success(self, permit: ModelPermit) -> None:
        if permit.epoch != self.epoch:
            return
        if permit.probe:
            self.free(permit)
            self.probe_successes += 1
            if self.probe_successes >= self.success_threshold:
                self.close()
            return
        self.consecutive = 0
        if self.windowed:
            self.add(failed=False)

    def failure(self, permit: ModelPermit) -> None:
        if permit.epoch != self.epoch:
            return
        if permit.probe:
            self.free(permit)
            self.trip()
            return
        self.consecutive += 1
        if self.windowed:
            self.add(failed=True)
        elif self.consecutive >= self.failure_threshold:
            self.trip()

    def release(self, permit: ModelPermit) -> None:
        if permit.epoch == self.epoch and permit.probe:
            self.free(permit)

    @property
    def windowed(self) -> bool:
        return self.window_size is not None or self.window_duration is not None

    def bucket(self) -> int:
        assert self.window_duration is not None
        return math.floor(self.now / (self.window_duration / 10))

    def outcomes(self) -> list[bool]:
        """The outcomes in the window now (a time window keeps its last ten buckets)."""
        if self.window_duration is None:
            return self.window
        return [failed for number, failed in self.timed if number > self.bucket() - 10]

    def add(self, *, failed: bool) -> None:
        if self.window_size is not None:
            self.window = [*self.window, failed][-self.window_size :]
        else:
            self.timed = [(n, f) for n, f in self.timed if n > self.bucket() - 10]
            self.timed.append((self.bucket(), failed))
        outcomes = self.outcomes()
        if (
            len(outcomes) >= self.minimum_calls
            and sum(outcomes) / len(outcomes) >= self.failure_rate_threshold
        ):
            self.trip()

    def trip(self) -> None:
        self.trips += 1
        self.repeated_trips += 1
        if self.repeated_trips == 1:
            self.open_duration = self.recovery_timeout
        else:
            self.open_duration = min(self.open_duration * self.multiplier, self.cap)
        self.open_until = self.now + self.open_duration
        self.state = OPEN
        self.epoch += 1
        self.probes = []
        self.waiting = 0
        self.probe_successes = 0

    def close(self) -> None:
        self.state = CLOSED
        self.epoch += 1
        self.consecutive = 0
        self.repeated_trips = 0
        self.window = []
        self.timed = []
        self.probes = []
        self.waiting = 0
        self.probe_successes = 0

    @property
    def retry_after(self) -> float:
        return max(0.0, self.open_until - self.now) if self.state is OPEN else 0.0


configs = st.fixed_dictionaries(
    {
        "failure_threshold": st.integers(1, 4),
        "recovery_timeout": st.sampled_from([1.0, 5.0, 30.0]),
        "window": st.none()
        | st.tuples(st.just("count"), st.integers(1, 5))
        | st.tuples(st.just("time"), st.sampled_from([2.0, 10.0])),
        "minimum_calls": st.integers(1, 4),
        "failure_rate_threshold": st.sampled_from([0.25, 0.5, 1.0]),
        "half_open_max_calls": st.integers(1, 3),
        "success_threshold": st.integers(1, 3),
        "max_wait": st.none() | st.sampled_from([2.0, 10.0]),
        "multiplier": st.sampled_from([1.0, 2.0]),
    }
)

OUTCOMES = ("success", "failure", "ignored", "released")


class BreakerMachine(RuleBasedStateMachine):
    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            self.backend
        )
        self.portal = self._portal_cm.__enter__()
        self.clock = ManualClock()
        self.breaker: CircuitBreaker
        self.model: Model
        self.held: list[tuple[BreakerPermit, ModelPermit]] = []
        self.events: list[object] = []

    def teardown(self) -> None:
        self._portal_cm.__exit__(None, None, None)

    @initialize(config=configs)
    def build(self, config: dict[str, Any]) -> None:
        cap = config["recovery_timeout"] * 4
        config = dict(config)
        kind, value = config.pop("window") or (None, None)
        size = value if kind == "count" else None
        duration = value if kind == "time" else None
        # A count window judges once full, as by default; a time window from minimum_calls.
        minimum = config.pop("minimum_calls")
        if kind != "time":
            minimum = size or 1
        self.model = Model(
            cap=cap, window_size=size, window_duration=duration, minimum_calls=minimum, **config
        )
        self.breaker = CircuitBreaker(
            "model",
            failure_threshold=config["failure_threshold"],
            recovery_timeout=config["recovery_timeout"],
            window_size=size,
            window_duration=duration,
            minimum_calls=minimum if kind == "time" else None,
            failure_rate_threshold=(config["failure_rate_threshold"] if kind is not None else None),
            half_open_max_calls=config["half_open_max_calls"],
            success_threshold=config["success_threshold"],
            max_wait_in_half_open=config["max_wait"],
            backoff_multiplier=config["multiplier"],
            max_recovery_timeout=cap,
            ignore_on=IgnoredError,
            clock=self.clock,
        )

    @precondition(lambda self: not self.events)
    @rule()
    def listen(self) -> None:
        # From here on closed calls take permits (the fast path is for breakers nobody hears).
        self.breaker.add_listener(self.events.append)
        self.events.append(None)

    @precondition(lambda self: len(self.held) < 6)
    @rule(started=st.booleans())
    def acquire(self, started: bool) -> None:
        before = self.model.retry_after
        expected = self.model.acquire(started=started)
        try:
            permit = self.portal.call(functools.partial(self.breaker.acquire, started=started))
        except CircuitOpenError as error:
            rejected = error.retry_after
        else:
            rejected = None
        if rejected is not None:
            assert isinstance(expected, float), f"rejected, model granted (retry {before})"
            assert rejected == pytest.approx(expected)
            return
        assert isinstance(expected, ModelPermit), "granted, model rejected"
        assert (permit.probe, permit.epoch) == (expected.probe, self.breaker_epoch())
        self.held.append((permit, expected))

    def breaker_epoch(self) -> int:
        return self.breaker._machine.epoch

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(0, 5))
    def start(self, index: int) -> None:
        permit, expected = self.held[index % len(self.held)]
        self.portal.call(permit.mark_started)
        self.model.start(expected)

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(0, 5), outcome=st.sampled_from(OUTCOMES), twice=st.booleans())
    def finish(self, index: int, outcome: str, twice: bool) -> None:
        permit, expected = self.held.pop(index % len(self.held))
        for _ in range(2 if twice else 1):
            if outcome == "success":
                self.portal.call(permit.settle)
            elif outcome == "failure":
                self.portal.call(permit.settle, UpstreamError())
            elif outcome == "ignored":
                self.portal.call(permit.settle, IgnoredError())
            else:
                self.portal.call(permit.release)
        if outcome == "success":
            self.model.success(expected)
        elif outcome == "failure":
            self.model.failure(expected)
        else:
            self.model.release(expected)

    @rule(
        outcome=st.sampled_from(("success", "failure", "ignored", "cancelled")),
        form=st.sampled_from(("decorator", "call", "async_with")),
    )
    def call(self, outcome: str, form: str) -> None:
        expected = self.model.acquire()
        ran: list[bool] = []

        async def body() -> str:
            ran.append(True)
            if outcome == "failure":
                raise UpstreamError
            if outcome == "ignored":
                raise IgnoredError
            if outcome == "cancelled":
                await anyio.sleep_forever()
            return "success"

        async def run() -> str:
            with anyio.CancelScope() as scope:
                if outcome == "cancelled":
                    scope.cancel()
                if form == "decorator":
                    return await self.breaker(body)()
                if form == "call":
                    return await self.breaker.call(body)
                async with self.breaker:
                    return await body()
            return "cancelled"

        rejected: float | None = None
        result = "raised"
        try:
            result = self.portal.call(run)
        except CircuitOpenError as error:
            rejected = error.retry_after
        except (UpstreamError, IgnoredError):
            pass
        if rejected is not None:
            assert isinstance(expected, float)
            assert rejected == pytest.approx(expected)
            assert not ran
            return
        assert result == {"failure": "raised", "ignored": "raised"}.get(outcome, outcome)
        assert isinstance(expected, ModelPermit)
        assert ran
        if outcome == "success":
            self.model.success(expected)
        elif outcome == "failure":
            self.model.failure(expected)
        else:
            self.model.release(expected)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 5.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.portal.call(self.clock.advance, seconds)
        self.model.now += seconds

    @invariant()
    def matches_the_model(self) -> None:
        if not hasattr(self, "model"):
            return
        stats = self.breaker.statistics()
        model = self.model
        assert stats.state is model.state
        assert self.breaker.state is model.state
        assert self.breaker_epoch() == model.epoch
        assert stats.consecutive_failures == model.consecutive
        assert stats.half_open_calls == len(model.probes) + model.waiting
        assert stats.trips == model.trips
        assert stats.retry_after == pytest.approx(model.retry_after)
        if model.windowed:
            outcomes = model.outcomes()
            assert stats.calls == len(outcomes)
            assert stats.failures == sum(outcomes)
        else:
            assert stats.calls is None
        listening = bool(self.events)
        assert self.breaker._machine.fast == (model.state is CLOSED and not listening)


class TrioBreakerMachine(BreakerMachine):
    backend = "trio"


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBreakerOnAsyncio = BreakerMachine.TestCase
TestBreakerOnAsyncio.settings = SETTINGS
TestBreakerOnTrio = TrioBreakerMachine.TestCase
TestBreakerOnTrio.settings = SETTINGS
