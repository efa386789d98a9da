"""The breaker's facade: admit, time, run and report; every decision is the state machine's.

The decorator's CLOSED path in the default (consecutive-failures) mode is tuned to cost tens of
nanoseconds: it reads one flag, captures the epoch and awaits the call; it reads no clock, takes
no lock and allocates nothing. It is written once, in :meth:`CircuitBreaker._guard`: the decorator
guards the decorated function with it, and :meth:`CircuitBreaker.call` uses one guarded function
built at construction around :func:`_call_first`, so no call builds a wrapper. The window modes
have their own closed path (:meth:`CircuitBreaker._guard_window`): it also counts the call for
the owning loop, as a permit would, and adds each success to the window, with one clock read in
a time window and none in a count window. The other modes and forms pay only for what they use:
a permit, a clock read when something times calls, an event record when someone listens.

Over 400 lines: the public class carries the reference documentation of its sixteen options and
every entry point (over a third of the file is docstring), and splitting the entry points across
modules would hide the one place where the admission, timing and reporting paths sit side by
side.
"""

from __future__ import annotations

import contextvars
import functools
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

from resilient_voice._callables import is_async_callable, require_async_callable
from resilient_voice._clock import Clock
from resilient_voice._validate import clock as check_clock
from resilient_voice._validate import label, number
from resilient_voice.breaker._config import (
    BreakerConfig,
    Classification,
    ExceptionMatcher,
    classifier,
)
from resilient_voice.breaker._fleet import (
    FleetStatistics,
    FleetTally,
    ReplicaSummary,
    fleet_verdict,
    held_open,
)
from resilient_voice.breaker._health import TimeWindow
from resilient_voice.breaker._machine import FailureRate, StateMachine
from resilient_voice.breaker._owner import Owner, Ownership
from resilient_voice.breaker._permit import BreakerPermit
from resilient_voice.breaker._store import BreakerStore, InMemoryBreakerStore
from resilient_voice.errors import CircuitOpenError
from resilient_voice.events import (
    BreakerState,
    CallFailed,
    CallIgnored,
    CallRejected,
    CallSucceeded,
    FleetStateChanged,
    FleetViewUpdated,
    Listener,
    StateChanged,
    check_listener,
    check_listeners,
    dispatch,
)

__all__ = ["CircuitBreaker", "CircuitBreakerStatistics"]

P = ParamSpec("P")
T = TypeVar("T")

_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_get_ident: Final = threading.get_ident

# The permit held by the innermost ``async with breaker:`` block of the current task. One
# module-level variable serves every breaker: a permit knows its breaker, and nested blocks
# restore the outer permit through the token.
_ACTIVE: contextvars.ContextVar[BreakerPermit | None] = contextvars.ContextVar(
    "resilient_voice_breaker_permit", default=None
)


def _call_first(fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Awaitable[Any]:
    """Call the function passed first: what :meth:`CircuitBreaker.call` guards.

    Guarding this once, at construction, gives ``call(fn, ...)`` the decorator's fast path
    without building a guarded function per call, and leaves the decorator's own path as it is
    (the decorated function stays in a closure cell, the cheapest read).
    """
    return fn(*args, **kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakerStatistics:
    """A snapshot of a breaker, for tests and dashboards.

    Window counts and rates are ``None`` in consecutive mode, which keeps no window.

    Attributes:
        name: The breaker's name.
        state: The state now (an OPEN breaker whose timeout ran out is still OPEN until the
            next call arrives; ``retry_after`` is then 0.0).
        calls: Calls (successes and failures) in the window.
        failures: Failures in the window.
        slow_calls: Slow calls in the window.
        failure_rate: ``failures / calls`` (0.0 with no calls).
        slow_call_rate: ``slow_calls / calls`` (0.0 with no calls).
        consecutive_failures: Failures since the last success in the CLOSED state.
        half_open_calls: Probes admitted and not finished: running, or admitted with
            ``acquire(started=False)`` and not yet started.
        retry_after: Seconds until the breaker admits a probe (0.0 when not OPEN).
        trips: How many times the breaker opened since it was built.
        fleet: The fleet as this replica last saw it (shared store only, else ``None``).
    """

    name: str
    state: BreakerState
    calls: int | None
    failures: int | None
    slow_calls: int | None
    failure_rate: float | None
    slow_call_rate: float | None
    consecutive_failures: int
    half_open_calls: int
    retry_after: float
    trips: int
    fleet: FleetStatistics | None = None


class CircuitBreaker:
    """Stop calling a failing upstream; probe it after a while; close when it recovers.

    Build one per upstream at startup and share it; never build one per call (it would never
    see more than one failure). Use it as a decorator on async functions, as ``async with
    breaker:``, or as ``await breaker.call(fn, *args, **kwargs)``; composed code (a policy, a
    transport) uses :meth:`acquire` and the returned :class:`BreakerPermit`.

    While OPEN every call is refused with :class:`~resilient_voice.CircuitOpenError` (``.breaker``
    and ``.retry_after``) without running. Once ``recovery_timeout`` has passed, the next call
    moves the breaker to HALF_OPEN and runs as a probe; at most ``half_open_max_calls`` probes
    run at once and the others are refused. ``success_threshold`` successful probes close it; a
    failed (or, with a slow-call rule, slow) probe opens it again, for longer when
    ``backoff_multiplier`` > 1.

    The trip mode follows from the window options: with neither ``window_size`` nor
    ``window_duration`` the breaker opens after ``failure_threshold`` consecutive failures; with
    one of them it opens when, over the last ``window_size`` calls or the last
    ``window_duration`` seconds and once at least ``minimum_calls`` were seen, the failure rate
    reaches ``failure_rate_threshold`` or the slow-call rate reaches
    ``slow_call_rate_threshold``.

    Exceptions propagate unchanged; see :meth:`classify` for which count as failures.

    Args:
        name: Names the breaker in errors, statistics and event records.
        failure_threshold: Consecutive failures that open the breaker (consecutive mode).
        recovery_timeout: Seconds the breaker stays open before admitting a probe.
        window_size: Count-based window: judge the last this-many calls.
        window_duration: Time-based window: judge the calls of the last this-many seconds (kept
            in ten buckets, so the window slides in steps of a tenth of it).
        failure_rate_threshold: Failure rate in (0, 1] that opens the breaker (window modes
            only). Defaults to 0.5 with a window.
        minimum_calls: Calls the window must hold before rates are judged. Defaults to
            ``window_size`` for a count window and 10 for a time window.
        slow_call_duration: Calls lasting at least this many seconds are slow (window modes).
        slow_call_rate_threshold: Slow-call rate in (0, 1] that opens the breaker (only with
            ``slow_call_duration``). Defaults to 1.0 with a slow-call rule.
        half_open_max_calls: Probes allowed to run at once while half-open.
        success_threshold: Successful probes needed to close the breaker again.
        max_wait_in_half_open: A probe running longer than this re-opens the breaker (judged on
            the next ``acquire``; no background task), timed from when it started (see
            :meth:`BreakerPermit.mark_started`). ``None`` waits forever.
        backoff_multiplier: Each trip that follows a failed recovery multiplies the open
            duration by this (1.0: no growth).
        max_recovery_timeout: Cap on the grown open duration; defaults to ten times
            ``recovery_timeout``.
        failure_on: When set, only matching exceptions count as failures; the others are ignored.
        ignore_on: Matching exceptions never count (this wins over ``failure_on``).
        failure_result: Predicate on a returned value that makes it count as a failure (for
            example an HTTP 503 response object).
        clock: Time source (default: the system's monotonic clock).
        listeners: Callables taking each :class:`~resilient_voice.events.Event` record.
        store: Where state is shared (default: :class:`InMemoryBreakerStore`, not shared).
            With a shared store (:class:`~resilient_voice.redis.RedisBackend`) each replica
            still decides on its own window, and also opens on the fleet rules (see
            docs/scale-out.md); its open periods carry +-15 % jitter.
        fleet_quorum: With a shared store: open when *more than* this fraction of the live
            replicas is open on its own window (``None``: no quorum rule). The default, 0.5,
            is a strict majority: one open replica out of two or three opens nobody else.

    The window options default to ``None`` so that an option given without the window it needs
    is told apart from an omitted one and refused, rather than silently ignored.

    Raises:
        TypeError, ValueError: Invalid configuration (see :class:`BreakerConfig`).
    """

    __slots__ = (
        "__weakref__",
        "_classify",
        "_clock",
        "_config",
        "_failure_result",
        "_fleet",
        "_fleet_opened",
        "_fleet_quorum",
        "_fleet_rule",
        "_guarded_call",
        "_listeners",
        "_local",
        "_machine",
        "_name",
        "_ownership",
        "_slow_after",
        "_store",
        "_tally",
        "_timed",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        recovery_timeout: float = 30.0,
        window_size: int | None = None,
        window_duration: float | None = None,
        failure_rate_threshold: float | None = None,
        minimum_calls: int | None = None,
        slow_call_duration: float | None = None,
        slow_call_rate_threshold: float | None = None,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        max_wait_in_half_open: float | None = None,
        backoff_multiplier: float = 1.0,
        max_recovery_timeout: float | None = None,
        failure_on: ExceptionMatcher | None = None,
        ignore_on: ExceptionMatcher | None = None,
        failure_result: Callable[[Any], bool] | None = None,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        store: BreakerStore | None = None,
        fleet_quorum: float | None = 0.5,
    ) -> None:
        label("name", name)
        config = BreakerConfig(
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            window_size=window_size,
            window_duration=window_duration,
            failure_rate_threshold=failure_rate_threshold,
            minimum_calls=minimum_calls,
            slow_call_duration=slow_call_duration,
            slow_call_rate_threshold=slow_call_rate_threshold,
            half_open_max_calls=half_open_max_calls,
            success_threshold=success_threshold,
            max_wait_in_half_open=max_wait_in_half_open,
            backoff_multiplier=backoff_multiplier,
            max_recovery_timeout=max_recovery_timeout,
            failure_on=failure_on,
            ignore_on=ignore_on,
            failure_result=failure_result,
        )
        listeners = check_listeners(listeners)
        if fleet_quorum is not None:
            number("fleet_quorum", fleet_quorum)
            if not 0.0 <= fleet_quorum < 1.0:
                raise ValueError(f"fleet_quorum must be in [0, 1) or None, got {fleet_quorum!r}")
        self._fleet_quorum = fleet_quorum
        self._fleet: FleetStatistics | None = None
        self._fleet_opened = False
        self._fleet_rule: str | None = None
        self._name = name
        self._config = config
        self._clock: Clock = check_clock(clock)
        self._listeners: tuple[Listener, ...] = listeners
        if store is not None and not isinstance(store, BreakerStore):
            raise TypeError(f"store must implement BreakerStore, got {store!r}")
        self._store: BreakerStore = InMemoryBreakerStore() if store is None else store
        self._local = type(self._store) is InMemoryBreakerStore
        self._classify = classifier(config)
        self._failure_result = config.failure_result
        self._slow_after = config.slow_call_duration
        self._machine = StateMachine(config)
        self._ownership = Ownership(name, self._machine.forget_probes)
        self._timed = False
        # A consecutive-failures breaker has no window to publish: with a shared store it
        # counts its outcomes for the fleet's combined-rate rule (in-memory: nothing to count).
        self._tally = FleetTally() if not self._local and self._machine.window is None else None
        self._guarded_call = self._guard(_call_first)
        self._refresh()
        if not self._local:
            self._machine.jitter = _jitter
            self._store.attach(self)

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self._name

    @property
    def config(self) -> BreakerConfig:
        """The validated configuration, with the window options' defaults resolved."""
        return self._config

    @property
    def state(self) -> BreakerState:
        """The current state (OPEN stays OPEN until a call arrives after the timeout)."""
        return self._machine.state

    @property
    def clock(self) -> Clock:
        """The clock this breaker measures on, fixed at construction (a :class:`Policy` checks
        that its parts agree on one and never replaces it)."""
        return self._clock

    def add_listener(self, listener: Listener) -> None:
        """Attach a listener (a callable taking each event record); it sees every event from
        now on."""
        check_listener(listener)
        self._listeners = (*self._listeners, listener)
        self._refresh()

    def classify(self, error: BaseException) -> Classification:
        """Say how this breaker treats ``error``.

        Order: a ``BaseException`` that is not an ``Exception`` (cancellation, interrupts) is
        ``"cancelled"``; ``ignore_on`` matches are ``"ignored"``; so is every
        :class:`~resilient_voice.RejectedError`; when ``failure_on`` is set its matches are
        ``"failure"`` and everything else ``"ignored"``; otherwise errors of kind
        ``UNPROCESSED`` or ``PERMANENT``, and back-pressure answers (an HTTP 429: the upstream
        is busy, not sick), are ``"ignored"`` and the rest ``"failure"``.
        """
        return self._classify(error)

    async def acquire(self, *, started: bool = True) -> BreakerPermit:
        """Ask to make one call; report its outcome on the returned permit.

        With the in-memory store this does not yield to the event loop. With a shared store, a
        call that would be admitted as a half-open probe first asks the store for a fleet-wide
        probe permit (one bounded round trip); the closed path never does.

        Args:
            started: Whether the call starts now. Pass ``False`` when it first waits in your
                own queues (a rate limiter, a bulkhead) and call
                :meth:`BreakerPermit.mark_started` when it is made: until then a probe holds
                its slot but is not timed, so a long queue never makes it look hung.

        Raises:
            CircuitOpenError: The breaker is open, or half-open with every probe slot taken.
            RuntimeError: Another thread or event loop, still running, holds permits of this
                breaker (see docs/breaker.md, "Threads and event loops").
        """
        machine = self._machine
        if (
            not self._local
            and machine.state is not _CLOSED
            and machine.probe_due(self._clock.now())
        ):
            granted = await self._store.probe_permit(self._name, machine.epoch)
            if granted is False:
                raise self._reject(machine.probe_wait(self._clock.now()))
        return self._admit(started)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so that every call goes through the breaker.

        Raises:
            TypeError: ``fn`` is not an async function (checked here, once).
        """
        require_async_callable(fn, "the CircuitBreaker decorator")
        return functools.wraps(fn)(self._guard(fn))

    def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, T]:
        """Run ``await fn(*args, **kwargs)`` through the breaker; await this for its result.

        A plain method returning the guarded call's coroutine: a call builds nothing but that.

        Raises:
            CircuitOpenError: The breaker refused the call; ``fn`` was not called.
            TypeError: ``fn`` is not an async function (raised here, before anything is
                awaited); it was not called and nothing counts.
        """
        if not is_async_callable(fn):
            require_async_callable(fn, "CircuitBreaker.call()")
        return self._guarded_call(fn, *args, **kwargs)

    def _guard(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """The guarded form of ``fn``: the closed fast path, else a permit around the call."""
        machine = self._machine
        failed_fast = self._failed_fast
        admit = self._admit
        acquire = self.acquire
        run = self._run
        local = self._local
        tally = self._tally
        if tally is not None:
            return self._guard_counting(fn, tally)
        if machine.window is not None:
            return self._guard_window(fn)

        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            if machine.fast:
                epoch = machine.epoch
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    failed_fast(exc, epoch)
                    raise
                if machine.consecutive_failures and machine.epoch == epoch:
                    machine.consecutive_failures = 0
                return result
            permit = admit() if local else await acquire()
            return await run(permit, fn, args, kwargs)

        return guarded

    def _guard_counting(
        self, fn: Callable[P, Awaitable[T]], tally: FleetTally
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """:meth:`_guard` for a shared consecutive-failures breaker: the same fast path, which
        also counts each success for the fleet (failures are counted in :meth:`_failed_fast`)."""
        machine = self._machine
        failed_fast = self._failed_fast
        acquire = self.acquire
        run = self._run

        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            if machine.fast:
                epoch = machine.epoch
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    failed_fast(exc, epoch)
                    raise
                tally.calls += 1
                if machine.consecutive_failures and machine.epoch == epoch:
                    machine.consecutive_failures = 0
                return result
            return await run(await acquire(), fn, args, kwargs)

        return guarded

    def _guard_window(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """:meth:`_guard` for the window modes: a closed fast path that records each outcome in
        the window, as a permit would, without building one.

        Unlike consecutive mode this path writes the window, whose totals two threads could
        corrupt, so it keeps the permit's ownership rule: it runs only in the thread of the
        breaker's owner, counted as one of the owner's permits while the call runs (another
        loop is refused meanwhile, as by a permit), and a call from another thread takes the
        permit path, which takes the breaker over or refuses it. A success is added to the
        window here (one clock read in a time window, none in a count window unless it trips);
        a failure, an ignored or cancelled call, and a breaker taken over meanwhile go through
        :meth:`_ended_fast`.
        """
        machine = self._machine
        ownership = self._ownership
        window = machine.window
        trip_mode = machine.trip_mode
        if window is None or not isinstance(trip_mode, FailureRate):  # pragma: no cover
            raise AssertionError("a window-mode guard without a window")
        add = window.add
        tripped = trip_mode.tripped
        ended = self._ended_fast
        now = self._clock.now
        timed = type(window) is TimeWindow
        admit = self._admit
        acquire = self.acquire
        run = self._run
        local = self._local

        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            if machine.fast:
                owner = ownership.owner
                if owner.thread == _get_ident():
                    # Counted first, then looked at again, as Ownership.claim does.
                    owner.permits += 1
                    if ownership.owner is owner:
                        epoch = machine.epoch
                        try:
                            result = await fn(*args, **kwargs)
                        except BaseException as exc:
                            ended(exc, epoch, owner)
                            raise
                        if ownership.owner is not owner:
                            ended(None, epoch, owner)
                            return result
                        try:
                            # StateMachine.judged_fast for a success, inlined; with no
                            # slow-call rule only a failure in the window can trip it.
                            if machine.epoch == epoch:
                                machine.consecutive_failures = 0
                                if timed:
                                    at = now()
                                    add(at, False, False)
                                    if window.failures and tripped():
                                        machine.trip(at)
                                else:
                                    add(0.0, False, False)
                                    if window.failures and tripped():
                                        machine.trip(now())
                        finally:
                            owner.permits -= 1
                        return result
                    owner.permits -= 1
            permit = admit() if local else await acquire()
            return await run(permit, fn, args, kwargs)

        return guarded

    async def __aenter__(self) -> CircuitBreaker:
        permit = self._admit() if self._local else await self.acquire()
        permit._token = _ACTIVE.set(permit)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = _ACTIVE.get()
        if permit is None or permit._token is None:
            raise RuntimeError("CircuitBreaker.__aexit__ without a matching __aenter__")
        _ACTIVE.reset(permit._token)
        permit._token = None
        permit.settle(exc)

    def reset(self) -> None:
        """Close the breaker and forget its counters (the trip count is kept).

        Raises:
            RuntimeError: Another thread or event loop holds permits of this breaker.
        """
        owner = self._ownership.claim()
        try:
            self._machine.close()
        finally:
            owner.permits -= 1

    def force_open(self, duration: float | None = None) -> None:
        """Open the breaker now, for ``duration`` seconds or the configured open duration.

        It then recovers like after any trip: the next call after the open period is a probe.

        Raises:
            RuntimeError: Another thread or event loop holds permits of this breaker.
        """
        if duration is not None:
            number("duration", duration)
        owner = self._ownership.claim()
        try:
            self._machine.trip(self._clock.now(), duration)
        finally:
            owner.permits -= 1

    def statistics(self) -> CircuitBreakerStatistics:
        """A frozen snapshot of the state and counters."""
        machine = self._machine
        now = self._clock.now()
        counts = machine.window_counts(now)
        calls = failures = slow = None
        failure_rate = slow_rate = None
        if counts is not None:
            calls, failures, slow = counts
            failure_rate = failures / calls if calls else 0.0
            slow_rate = slow / calls if calls else 0.0
        return CircuitBreakerStatistics(
            name=self._name,
            state=machine.state,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_rate=failure_rate,
            slow_call_rate=slow_rate,
            consecutive_failures=machine.consecutive_failures,
            half_open_calls=len(machine.probes) + machine.probes_waiting,
            retry_after=machine.retry_after(now),
            trips=machine.trips,
            fleet=self._fleet,
        )

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._name!r}, state={self._machine.state.value})"

    def _refresh(self) -> None:
        config = self._config
        self._timed = bool(self._listeners) or config.slow_call_duration is not None
        machine = self._machine
        machine.on_transition = self._transitioned if self._listeners or not self._local else None
        # A shared store keeps the fast path: it is taken only while CLOSED, where the store is
        # never consulted, every trip still reaches it through on_transition, and a window's
        # summary is read from the window the fast path writes. The window modes have one
        # too, except with a slow-call rule (it times every call).
        machine.set_fast_eligible(
            not self._listeners
            and config.failure_result is None
            and config.slow_call_duration is None
        )

    def _admit(self, started: bool = True) -> BreakerPermit:
        machine = self._machine
        state = machine.state
        if state is _CLOSED:
            return BreakerPermit(
                self,
                machine.epoch,
                False,
                self._clock.now() if self._timed else None,
                None,
                self._ownership.claim(),
            )
        now = self._clock.now()
        if state is _OPEN and now < machine.open_until:
            raise self._reject(machine.open_until - now)
        # What follows may change the state or grant a probe: claimed first, so not from a
        # second loop, and given back below if no probe is granted.
        owner = self._ownership.claim()
        try:
            wait = machine.admit_probe(now, started)
        except BaseException:
            owner.permits -= 1
            raise
        if wait is not None:
            owner.permits -= 1
            raise self._reject(wait)
        return BreakerPermit(self, machine.epoch, True, now, now if started else None, owner)

    def _reject(self, retry_after: float) -> CircuitOpenError:
        if self._listeners:
            dispatch(self._listeners, CallRejected(self._name, retry_after))
        return CircuitOpenError(self._name, retry_after)

    async def _run(
        self, permit: BreakerPermit, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any
    ) -> T:
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            permit.settle(exc)
            raise
        permit.settle(result=result)
        return result

    def _failed_fast(self, error: BaseException, epoch: int) -> None:
        # The fast path runs only CLOSED, in consecutive mode, with nothing listening.
        if self._classify(error) != "failure":
            return
        tally = self._tally
        if tally is not None and epoch == self._machine.epoch:
            tally.calls += 1
            tally.failures += 1
        if self._machine.failed_fast(epoch):
            owner = self._ownership.claim()
            try:
                self._machine.trip(self._clock.now())
            finally:
                owner.permits -= 1

    def _ended_fast(self, error: BaseException | None, epoch: int, owner: Owner) -> None:
        """A call on a window mode's closed fast path ended: record it as settling its permit
        would (:meth:`BreakerPermit.settle` and :meth:`_succeeded` or :meth:`_failed`, with
        nothing listening and no slow-call rule), then give the owner's count back."""
        verdict = "success" if error is None else self._classify(error)
        # Raises, or says no, for a call whose breaker another loop took over meanwhile.
        if not self._ownership.may_settle(owner):
            return
        try:
            machine = self._machine
            if verdict in {"cancelled", "ignored"} or epoch != machine.epoch:
                return
            now = self._clock.now()
            if machine.judged_fast(epoch, now, verdict == "failure"):
                machine.trip(now)
        finally:
            owner.permits -= 1

    def _timing(self, permit: BreakerPermit, now: float | None) -> tuple[float | None, bool]:
        if now is None or permit.started is None:
            return None, False
        duration = now - permit.started
        slow_after = self._slow_after
        return duration, slow_after is not None and duration >= slow_after

    def _succeeded(self, permit: BreakerPermit) -> None:
        machine = self._machine
        if permit.epoch != machine.epoch:
            return
        now = self._clock.now() if self._timed or machine.window is not None else None
        duration, slow = self._timing(permit, now)
        if self._listeners:
            dispatch(self._listeners, CallSucceeded(self._name, duration))
        if self._tally is not None and not permit.probe:
            self._tally.calls += 1
        machine.succeeded(permit.epoch, permit.probe, permit._probe_start, now, slow)

    def _failed(self, permit: BreakerPermit, error: BaseException | None) -> None:
        machine = self._machine
        if permit.epoch != machine.epoch:
            return
        now = self._clock.now()
        duration, slow = self._timing(permit, now)
        if self._listeners:
            dispatch(self._listeners, CallFailed(self._name, error, duration))
        tally = self._tally
        if tally is not None and not permit.probe:
            tally.calls += 1
            tally.failures += 1
        machine.failed(permit.epoch, permit.probe, permit._probe_start, now, slow)

    def _ignored(self, permit: BreakerPermit, error: BaseException) -> None:
        if permit.epoch != self._machine.epoch:
            return
        if self._listeners:
            dispatch(self._listeners, CallIgnored(self._name, error))
        self._released(permit)

    def _released(self, permit: BreakerPermit) -> None:
        self._machine.released(permit.epoch, permit.probe, permit._probe_start)

    def _transitioned(self, old: BreakerState, new: BreakerState) -> None:
        rule = self._fleet_rule
        if not self._local:
            # Any transition but the fleet's own makes this replica its own again: a follower
            # that probes (its store was gone) and fails has now seen the failure itself.
            self._fleet_opened = rule is not None and new is _OPEN
            self._store.state_changed(self._name, self._machine.epoch, old, new)
        if self._listeners and new is not old:
            dispatch(self._listeners, StateChanged(self._name, old, new))
            if rule is not None:
                dispatch(self._listeners, FleetStateChanged(self._name, old, new, rule))

    # The fleet view: called by a shared store's background task, on this breaker's loop.

    def _fleet_summary(self) -> tuple[bool, bool, int, int]:
        """What this replica publishes: open (or half-open), fleet-opened, calls, failures."""
        machine = self._machine
        counts = machine.window_counts(self._clock.now())
        if counts is not None:
            calls, failures = counts[0], counts[1]
        elif self._tally is not None:
            calls, failures = self._tally.tick()
        else:
            calls = failures = 0
        return machine.state is not _CLOSED, self._fleet_opened, calls, failures

    def _fleet_unavailable(self) -> None:
        """The store did not answer: keep the local breaker, mark the view stale."""
        fleet = self._fleet
        if fleet is not None and fleet.available:
            self._fleet = FleetStatistics(
                live=fleet.live,
                open=fleet.open,
                calls=fleet.calls,
                failure_rate=fleet.failure_rate,
                fleet_opened=self._fleet_opened,
                available=False,
            )

    def _fleet_apply(self, summaries: list[ReplicaSummary], me: str, tick: float) -> None:
        """Apply the fleet rules to what the live replicas published (this one included).

        Opens a closed replica when a rule holds; keeps a replica the fleet opened open while a
        rule holds or another replica open on its own window is still open (that one probes,
        so a fleet recovers with exactly ``half_open_max_calls`` probes), and closes it when
        neither is left. A replica that opened on its own window recovers by its own probes.
        ``tick`` is how often this is called: a held replica's open period is pushed that far
        ahead, so that it probes on its own once the store stops answering.
        """
        machine = self._machine
        config = self._config
        now = self._clock.now()
        counts = machine.window_counts(now)
        if counts is not None:
            own_failures = counts[1]
        elif self._tally is not None:
            own_failures = max(machine.consecutive_failures, self._tally.recent_failures)
        else:
            own_failures = machine.consecutive_failures
        calls = sum(s.calls for s in summaries)
        failures = sum(s.failures for s in summaries)
        self._fleet = FleetStatistics(
            live=len(summaries),
            open=sum(1 for s in summaries if s.open),
            calls=calls,
            failure_rate=failures / calls if calls else 0.0,
            fleet_opened=self._fleet_opened,
            available=True,
        )
        quorum = self._fleet_quorum
        threshold = config.failure_rate_threshold or 0.5
        minimum = config.minimum_calls or config.failure_threshold
        verdict = fleet_verdict(
            summaries, own_failures, quorum=quorum, threshold=threshold, minimum_calls=minimum
        )
        state = machine.state
        if state is _CLOSED and verdict:
            voters = sum(1 for s in summaries if s.open and not s.fleet_opened)
            rule = "quorum" if quorum is not None and voters > quorum * len(summaries) else "rate"
            self._fleet_transition(rule, lambda: machine.trip(now))
        elif state is _OPEN and self._fleet_opened:
            if verdict or held_open(summaries, me):
                machine.open_until = max(machine.open_until, now + 2 * tick)
            else:
                self._fleet_transition("fleet", machine.close)
        if self._fleet is not None and self._fleet.fleet_opened != self._fleet_opened:
            self._fleet = FleetStatistics(
                live=self._fleet.live,
                open=self._fleet.open,
                calls=self._fleet.calls,
                failure_rate=self._fleet.failure_rate,
                fleet_opened=self._fleet_opened,
                available=True,
            )
        fleet = self._fleet
        if self._listeners and fleet is not None:
            dispatch(
                self._listeners,
                FleetViewUpdated(
                    self._name, fleet.live, fleet.open, fleet.calls, fleet.failure_rate
                ),
            )

    def _fleet_transition(self, rule: str, change: Callable[[], None]) -> None:
        owner = self._ownership.claim()
        self._fleet_rule = rule
        try:
            change()
        finally:
            self._fleet_rule = None
            owner.permits -= 1


def _jitter(duration: float) -> float:
    """An open duration spread by +-15 %, so that replicas opened together probe apart."""
    return duration * random.uniform(0.85, 1.15)
