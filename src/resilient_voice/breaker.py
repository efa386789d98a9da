"""Circuit breaker: stop calling an upstream that is failing, and probe it to recover.

A breaker is built once per upstream at startup and shared by every task that calls it. It is a
three-state machine (CLOSED, OPEN, HALF_OPEN) whose counters live in a :class:`BreakerRecord`
held by a :class:`BreakerStore`; the in-memory store is the default, and a shared store (Redis)
can replace it without touching the state machine.

Every admitted call holds a :class:`BreakerPermit` stamped with the breaker's *epoch*, a number
bumped on every state change. An outcome reported with a stale epoch (a call that started before
the breaker opened and finished after) is dropped, so a slow straggler can never flip the state.

The decorator's CLOSED path in the default (consecutive-failures) mode is tuned to cost tens of
nanoseconds: it reads one flag, captures the epoch and awaits the call; it reads no clock, takes
no lock and allocates nothing. The other modes and forms pay only for what they use.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

from resilient_voice import events
from resilient_voice._breaker_windows import CountWindow, TimeWindow
from resilient_voice._callables import is_async_callable, require_async_callable
from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice._loops import current_loop, loop_finished
from resilient_voice.errors import CircuitOpenError, RejectedError
from resilient_voice.failure import FailureKind, failure_kind_of, is_backpressure

__all__ = [
    "BreakerConfig",
    "BreakerPermit",
    "BreakerRecord",
    "BreakerState",
    "BreakerStatistics",
    "BreakerStore",
    "CircuitBreaker",
    "Classification",
    "ExceptionMatcher",
    "InMemoryBreakerStore",
]

P = ParamSpec("P")
T = TypeVar("T")

ExceptionMatcher = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)
"""An exception type, a tuple of types, or a predicate on the exception."""

Classification = Literal["failure", "ignored", "cancelled"]
"""How the breaker treats an exception: count it, let it pass uncounted, or treat it as
cancellation (neither success nor failure; a probe slot is released)."""


class BreakerState(enum.Enum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN
_get_ident: Final = threading.get_ident
_IGNORED_KINDS: Final = frozenset({FailureKind.UNPROCESSED, FailureKind.PERMANENT})
# A caller refused while probes run is told to come back soon (bounded by these, in seconds).
_PROBE_WAIT_CAP: Final = 1.0
_PROBE_WAIT_FLOOR: Final = 0.05


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def _positive_float(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _needs_window(option: str) -> str:
    return f"{option} needs a window: set window_size or window_duration too"


def _check_matcher(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, type):
        if not issubclass(value, BaseException):
            raise TypeError(f"{name}: {value.__name__} is not an exception type")
        return
    if isinstance(value, tuple):
        for item in value:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise TypeError(f"{name}: {item!r} is not an exception type")
        return
    if not callable(value):
        raise TypeError(f"{name} must be an exception type, a tuple of them or a predicate")


def _compile_matcher(matcher: ExceptionMatcher | None) -> Callable[[BaseException], bool] | None:
    if matcher is None:
        return None
    if isinstance(matcher, type | tuple):
        types = matcher
        return lambda exc: isinstance(exc, types)
    return matcher


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """A breaker's configuration, validated when it is built.

    The trip mode follows from the window options: with neither ``window_size`` nor
    ``window_duration`` the breaker opens after ``failure_threshold`` consecutive failures; with
    one of them it opens when, over the last ``window_size`` calls or the last
    ``window_duration`` seconds and once at least ``minimum_calls`` were seen, the failure rate
    reaches ``failure_rate_threshold`` or the slow-call rate reaches
    ``slow_call_rate_threshold``.

    Args:
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
            the next ``acquire``; no background task). A probe runs from when it started (see
            :meth:`BreakerPermit.mark_started`), not from when it was admitted: time spent in
            our own queues is not the upstream hanging. ``None`` waits forever.
        backoff_multiplier: Each trip that follows a failed recovery multiplies the open
            duration by this (1.0: no growth).
        max_recovery_timeout: Cap on the grown open duration; defaults to ten times
            ``recovery_timeout``.
        failure_on: When set, only matching exceptions count as failures; the others are ignored.
        ignore_on: Matching exceptions never count (this wins over ``failure_on``).
        failure_result: Predicate on a returned value that makes it count as a failure (for
            example an HTTP 503 response object).

    The window options default to ``None`` so that an option given without the window it needs
    is told apart from an omitted one and refused, rather than silently ignored.

    Raises:
        TypeError: An option has the wrong type.
        ValueError: An option is out of range, options contradict each other, or an option is
            set without the window (or slow-call rule) it needs.
    """

    failure_threshold: int = 3
    recovery_timeout: float = 30.0
    window_size: int | None = None
    window_duration: float | None = None
    failure_rate_threshold: float | None = None
    minimum_calls: int | None = None
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float | None = None
    half_open_max_calls: int = 1
    success_threshold: int = 1
    max_wait_in_half_open: float | None = None
    backoff_multiplier: float = 1.0
    max_recovery_timeout: float | None = None
    failure_on: ExceptionMatcher | None = None
    ignore_on: ExceptionMatcher | None = None
    failure_result: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        _positive_int("failure_threshold", self.failure_threshold)
        _positive_float("recovery_timeout", self.recovery_timeout)
        if self.window_size is not None:
            _positive_int("window_size", self.window_size)
        _positive_float("window_duration", self.window_duration, optional=True)
        if self.window_size is not None and self.window_duration is not None:
            raise ValueError("set window_size (count window) or window_duration, not both")
        windowed = self.window_size is not None or self.window_duration is not None
        if self.failure_rate_threshold is not None:
            _rate("failure_rate_threshold", self.failure_rate_threshold)
            if not windowed:
                raise ValueError(_needs_window("failure_rate_threshold"))
        elif windowed:
            object.__setattr__(self, "failure_rate_threshold", 0.5)
        if self.minimum_calls is not None:
            _positive_int("minimum_calls", self.minimum_calls)
            if not windowed:
                raise ValueError(_needs_window("minimum_calls"))
            if self.window_size is not None and self.minimum_calls > self.window_size:
                raise ValueError(
                    f"minimum_calls ({self.minimum_calls}) must not exceed "
                    f"window_size ({self.window_size})"
                )
        elif windowed:
            object.__setattr__(
                self, "minimum_calls", self.window_size if self.window_size is not None else 10
            )
        _positive_float("slow_call_duration", self.slow_call_duration, optional=True)
        if self.slow_call_duration is not None and not windowed:
            raise ValueError(_needs_window("slow_call_duration"))
        if self.slow_call_rate_threshold is not None:
            _rate("slow_call_rate_threshold", self.slow_call_rate_threshold)
            if self.slow_call_duration is None:
                raise ValueError(
                    "slow_call_rate_threshold needs slow_call_duration (and a window: "
                    "window_size or window_duration) to judge which calls are slow"
                )
        elif self.slow_call_duration is not None:
            object.__setattr__(self, "slow_call_rate_threshold", 1.0)
        _positive_int("half_open_max_calls", self.half_open_max_calls)
        _positive_int("success_threshold", self.success_threshold)
        _positive_float("max_wait_in_half_open", self.max_wait_in_half_open, optional=True)
        multiplier = self.backoff_multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            raise TypeError("backoff_multiplier must be a number")
        if not math.isfinite(multiplier) or multiplier < 1.0:
            raise ValueError(f"backoff_multiplier must be a finite number >= 1, got {multiplier!r}")
        if self.max_recovery_timeout is None:
            object.__setattr__(self, "max_recovery_timeout", 10.0 * self.recovery_timeout)
        else:
            _positive_float("max_recovery_timeout", self.max_recovery_timeout)
            if self.max_recovery_timeout < self.recovery_timeout:
                raise ValueError("max_recovery_timeout must be >= recovery_timeout")
        _check_matcher("failure_on", self.failure_on)
        _check_matcher("ignore_on", self.ignore_on)
        if self.failure_result is not None and not callable(self.failure_result):
            raise TypeError("failure_result must be a predicate on the returned value")

    @property
    def windowed(self) -> bool:
        """Whether the breaker judges a failure rate over a sliding window."""
        return self.window_size is not None or self.window_duration is not None


_OPTION_DEFAULTS: Final = {field.name: field.default for field in dataclasses.fields(BreakerConfig)}


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStatistics:
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


class BreakerRecord:
    """The mutable state of one breaker: what a :class:`BreakerStore` keeps.

    The state machine reads and changes it synchronously, between awaits, so with the in-memory
    store no lock is needed. ``fast`` is derived by the breaker (CLOSED and nothing to observe
    or time) and read by the decorator's fast path.
    """

    __slots__ = (
        "consecutive_failures",
        "consecutive_trips",
        "epoch",
        "fast",
        "open_duration",
        "open_until",
        "probe_successes",
        "probes",
        "probes_waiting",
        "state",
        "trips",
        "window",
    )

    def __init__(self) -> None:
        self.state = _CLOSED
        self.epoch = 0
        self.fast = False
        self.consecutive_failures = 0
        self.consecutive_trips = 0
        self.trips = 0
        self.open_duration = 0.0
        self.open_until = 0.0
        self.probes: list[float] = []  # start times of the running probes, oldest first
        self.probes_waiting = 0  # probes admitted but not started yet (queued for a token)
        self.probe_successes = 0
        self.window: CountWindow | TimeWindow | None = None


@runtime_checkable
class BreakerStore(Protocol):
    """Where a breaker's :class:`BreakerRecord` lives.

    The state machine never awaits while it changes the record. ``await load()`` runs before each
    admission decision so that a shared store can refresh its local copy; ``changed()`` runs
    after every change so that it can queue the write. The in-memory store does neither, and the
    breaker skips both calls for it.
    """

    @property
    def record(self) -> BreakerRecord:
        """The record the state machine reads and changes (always the same object)."""
        ...

    async def load(self) -> None:
        """Refresh :attr:`record` before an admission decision."""
        ...

    def changed(self) -> None:
        """The state machine changed :attr:`record`."""
        ...


class InMemoryBreakerStore:
    """The default store: the record lives in this process only."""

    __slots__ = ("_record",)

    def __init__(self) -> None:
        self._record = BreakerRecord()

    @property
    def record(self) -> BreakerRecord:
        return self._record

    async def load(self) -> None:
        return None

    def changed(self) -> None:
        return None


class BreakerPermit:
    """Admission to make one call, granted by :meth:`CircuitBreaker.acquire`.

    Report exactly one outcome: :meth:`success`, :meth:`failure`, :meth:`ignore` or
    :meth:`release`. Only the first report counts, so reporting twice (or from a ``finally``
    after an ``except``) is harmless. Outcomes of a permit granted before the breaker last
    changed state are dropped.

    Attributes:
        epoch: The breaker state generation this permit was granted in.
        probe: Whether this call is a half-open probe.
    """

    __slots__ = (
        "_breaker",
        "_done",
        "_owner",
        "_probe_start",
        "_token",
        "epoch",
        "granted_at",
        "probe",
        "started",
    )

    def __init__(
        self,
        breaker: CircuitBreaker,
        epoch: int,
        probe: bool,
        granted_at: float | None,
        probe_start: float | None = None,
        owner: _Owner | None = None,
    ) -> None:
        self._breaker = breaker
        self._done = False
        self.epoch = epoch
        self.probe = probe
        self.granted_at = granted_at
        self.started = granted_at
        # A probe's entry in the record: its start time in ``probes``, or None while it is
        # counted in ``probes_waiting``.
        self._probe_start = probe_start
        # The thread and loop this permit is counted for (see CircuitBreaker._claim); None
        # for a permit the breaker does not count.
        self._owner = owner
        self._token: contextvars.Token[BreakerPermit | None] | None = None

    @property
    def done(self) -> bool:
        """Whether an outcome was already reported."""
        return self._done

    def mark_started(self) -> None:
        """Start timing the call now (after waiting for a rate limiter, say).

        Durations are measured from here, and so is a probe's run time: a probe counts as hung
        only once it has *run* for ``max_wait_in_half_open``.
        """
        if self.started is not None:
            now = self._breaker._clock.now()
            self.started = now
            if self.probe and not self._done:
                self._breaker._start_probe(self, now)

    def success(self) -> None:
        """The call succeeded.

        Raises:
            RuntimeError: Reported from another thread or event loop than the one that holds
                the breaker's permits (the outcome is not counted; a probe slot is freed).
        """
        if not self._done:
            self._done = True
            self._report(self._breaker._record_success)

    def failure(self, error: BaseException | None = None) -> None:
        """The call failed; ``error`` is ``None`` when a result predicate decided."""
        if not self._done:
            self._done = True
            self._report(self._breaker._record_failure, error)

    def ignore(self, error: BaseException) -> None:
        """The call raised an exception that does not count; frees a probe slot."""
        if not self._done:
            self._done = True
            self._report(self._breaker._record_ignored, error)

    def release(self) -> None:
        """The call was cancelled or never made: frees a probe slot, counts nothing."""
        if not self._done:
            self._done = True
            self._report(self._breaker._release)

    def _report(self, record: Callable[..., None], *args: Any) -> None:
        # The permit stays counted while its outcome is recorded, so that no other loop can
        # take the breaker over halfway through the change.
        owner = self._owner
        if owner is None:
            record(self, *args)
            return
        breaker = self._breaker
        # Settled in the thread that admitted it, whose loop still owns the breaker: no loop
        # lookup is needed (a thread runs one loop at a time, and a new loop in this thread
        # would have taken the breaker over at its first admission).
        if (owner.thread == _get_ident() and breaker._owner is owner) or (
            breaker._settle_elsewhere(self, owner)
        ):
            try:
                record(self, *args)
            finally:
                owner.permits -= 1

    def record_result(self, result: object) -> None:
        """Report a returned value: a failure when the breaker's ``failure_result`` says so.

        Used by compositions (:class:`~resilient_voice.Policy`) that run the call themselves.
        If the predicate raises, the permit is released and the exception propagates.
        """
        predicate = self._breaker._failure_result
        if predicate is not None:
            try:
                failed = predicate(result)
            except BaseException:
                self.release()
                raise
            if failed:
                self.failure(None)
                return
        self.success()

    def settle(self, error: BaseException) -> None:
        """Report ``error`` as the breaker classifies it (failure, ignored or cancelled)."""
        kind = self._breaker.classify(error)
        if kind == "failure":
            self.failure(error)
        elif kind == "ignored":
            self.ignore(error)
        else:
            self.release()

    def __repr__(self) -> str:
        return (
            f"<BreakerPermit breaker={self._breaker.name!r} epoch={self.epoch} "
            f"probe={self.probe} done={self._done}>"
        )


# The permit held by the innermost ``async with breaker:`` block of the current task. One
# module-level variable serves every breaker: a permit knows its breaker, and nested blocks
# restore the outer permit through the token.
_ACTIVE: contextvars.ContextVar[BreakerPermit | None] = contextvars.ContextVar(
    "resilient_voice_breaker_permit", default=None
)


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

    Exceptions propagate unchanged. By default every exception counts as a failure except
    :class:`~resilient_voice.RejectedError` (a local rejection) and errors whose
    :class:`~resilient_voice.FailureKind` is ``UNPROCESSED`` or ``PERMANENT``. Cancellation
    (and any other ``BaseException`` that is not an ``Exception``) is neither success nor
    failure and frees a probe slot.

    Args:
        name: Names the breaker in errors, statistics and listener events.
        failure_threshold, recovery_timeout, ...: The options of :class:`BreakerConfig`.
        config: A ready :class:`BreakerConfig` instead of the individual options.
        clock: Time source (default: the system's monotonic clock).
        listeners: :class:`~resilient_voice.events.BreakerListener` objects.
        store: Where the state lives (default: :class:`InMemoryBreakerStore`).

    Raises:
        TypeError, ValueError: Invalid configuration (see :class:`BreakerConfig`).
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_config",
        "_failure_on",
        "_failure_result",
        "_fast_eligible",
        "_ignore_on",
        "_listeners",
        "_local",
        "_lock",
        "_name",
        "_owner",
        "_record",
        "_slow_after",
        "_store",
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
        config: BreakerConfig | None = None,
        clock: Clock | None = None,
        listeners: Iterable[events.BreakerListener] = (),
        store: BreakerStore | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str")
        options: dict[str, Any] = {
            "failure_threshold": failure_threshold,
            "recovery_timeout": recovery_timeout,
            "window_size": window_size,
            "window_duration": window_duration,
            "failure_rate_threshold": failure_rate_threshold,
            "minimum_calls": minimum_calls,
            "slow_call_duration": slow_call_duration,
            "slow_call_rate_threshold": slow_call_rate_threshold,
            "half_open_max_calls": half_open_max_calls,
            "success_threshold": success_threshold,
            "max_wait_in_half_open": max_wait_in_half_open,
            "backoff_multiplier": backoff_multiplier,
            "max_recovery_timeout": max_recovery_timeout,
            "failure_on": failure_on,
            "ignore_on": ignore_on,
            "failure_result": failure_result,
        }
        if config is None:
            config = BreakerConfig(**options)
        elif not isinstance(config, BreakerConfig):
            raise TypeError("config must be a BreakerConfig")
        elif any(value != _OPTION_DEFAULTS[option] for option, value in options.items()):
            # Checked before any option is validated: with config= given, an option is a
            # mistake whatever its value.
            raise TypeError("pass either config= or individual options, not both")
        self._name = name
        self._config = config
        self._clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self._listeners: tuple[events.BreakerListener, ...] = tuple(listeners)
        self._store: BreakerStore = InMemoryBreakerStore() if store is None else store
        self._local = type(self._store) is InMemoryBreakerStore
        self._record = self._store.record
        self._failure_on = _compile_matcher(config.failure_on)
        self._ignore_on = _compile_matcher(config.ignore_on)
        self._failure_result = config.failure_result
        self._slow_after = config.slow_call_duration
        if config.window_size is not None:
            self._record.window = CountWindow(config.window_size)
        elif config.window_duration is not None:
            self._record.window = TimeWindow(config.window_duration)
        self._fast_eligible = False
        self._timed = False
        # Who holds the outstanding permits (see _claim). The lock is taken only when another
        # thread or loop arrives; the state machine itself takes no lock.
        self._lock = threading.Lock()
        self._owner = _Owner(0, None)
        self._refresh()

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self._name

    @property
    def config(self) -> BreakerConfig:
        """The validated configuration."""
        return self._config

    @property
    def state(self) -> BreakerState:
        """The current state (OPEN stays OPEN until a call arrives after the timeout)."""
        return self._record.state

    def _adopt_clock(self, clock: Clock) -> None:
        """Use ``clock`` when this breaker was built without one (a :class:`Policy` passes its
        clock down so that every part of a composition measures time the same way)."""
        if self._clock is SYSTEM_CLOCK:
            self._clock = clock

    def add_listener(self, listener: events.BreakerListener) -> None:
        """Attach a listener; it sees every event from now on."""
        self._listeners = (*self._listeners, listener)
        self._refresh()

    def on_state_change(
        self, callback: Callable[[str, BreakerState, BreakerState], object]
    ) -> Callable[[str, BreakerState, BreakerState], object]:
        """Call ``callback(name, old, new)`` on every state change; usable as a decorator."""
        self.add_listener(_StateChangeListener(callback))
        return callback

    def classify(self, error: BaseException) -> Classification:
        """Say how this breaker treats ``error``.

        Order: a ``BaseException`` that is not an ``Exception`` (cancellation, interrupts) is
        ``"cancelled"``; ``ignore_on`` matches are ``"ignored"``; so is every
        :class:`~resilient_voice.RejectedError`; when ``failure_on`` is set its matches are
        ``"failure"`` and everything else ``"ignored"``; otherwise errors of kind
        ``UNPROCESSED`` or ``PERMANENT``, and back-pressure answers (an HTTP 429: the upstream
        is busy, not sick), are ``"ignored"`` and the rest ``"failure"``.
        """
        if not isinstance(error, Exception):
            return "cancelled"
        if self._ignore_on is not None and self._ignore_on(error):
            return "ignored"
        if isinstance(error, RejectedError):
            return "ignored"
        if self._failure_on is not None:
            return "failure" if self._failure_on(error) else "ignored"
        if failure_kind_of(error) in _IGNORED_KINDS or is_backpressure(error):
            return "ignored"
        return "failure"

    async def acquire(self, *, started: bool = True) -> BreakerPermit:
        """Ask to make one call; report its outcome on the returned permit.

        With the in-memory store this does not yield to the event loop.

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
        if not self._local:
            await self._store.load()
        return self._admit(started)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so that every call goes through the breaker.

        Raises:
            TypeError: ``fn`` is not an async function (checked here, once).
        """
        require_async_callable(fn, "the CircuitBreaker decorator")
        record = self._record
        fast_error = self._fast_error
        admit = self._admit
        acquire = self.acquire
        run = self._run
        local = self._local

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            if record.fast:
                epoch = record.epoch
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    fast_error(exc, epoch)
                    raise
                if record.consecutive_failures and record.epoch == epoch:
                    record.consecutive_failures = 0
                return result
            permit = admit() if local else await acquire()
            return await run(permit, fn, args, kwargs)

        return wrapper

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through the breaker and return its result.

        Raises:
            CircuitOpenError: The breaker refused the call; ``fn`` was not called.
            TypeError: ``fn`` is not an async function; it was not called and nothing counts.
        """
        if not is_async_callable(fn):
            require_async_callable(fn, "CircuitBreaker.call()")
        record = self._record
        if record.fast:
            epoch = record.epoch
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                self._fast_error(exc, epoch)
                raise
            if record.consecutive_failures and record.epoch == epoch:
                record.consecutive_failures = 0
            return result
        permit = self._admit() if self._local else await self.acquire()
        return await self._run(permit, fn, args, kwargs)

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
        if exc is None:
            permit.success()
        else:
            permit.settle(exc)

    def reset(self) -> None:
        """Close the breaker and forget its counters (the trip count is kept).

        Raises:
            RuntimeError: Another thread or event loop holds permits of this breaker.
        """
        owner = self._claim()
        try:
            record = self._record
            old = record.state
            self._clear_closed(record)
            self._enter(record, _CLOSED, old)
        finally:
            owner.permits -= 1

    def force_open(self, duration: float | None = None) -> None:
        """Open the breaker now, for ``duration`` seconds or the configured open duration.

        It then recovers like after any trip: the next call after the open period is a probe.

        Raises:
            RuntimeError: Another thread or event loop holds permits of this breaker.
        """
        if duration is not None:
            _positive_float("duration", duration)
        owner = self._claim()
        try:
            self._trip(self._clock.now(), duration)
        finally:
            owner.permits -= 1

    def statistics(self) -> BreakerStatistics:
        """A frozen snapshot of the state and counters."""
        record = self._record
        window = record.window
        now = self._clock.now()
        calls = failures = slow = None
        failure_rate = slow_rate = None
        if window is not None:
            window.expire(now)
            calls, failures, slow = window.calls, window.failures, window.slow
            failure_rate = failures / calls if calls else 0.0
            slow_rate = slow / calls if calls else 0.0
        retry_after = max(0.0, record.open_until - now) if record.state is _OPEN else 0.0
        return BreakerStatistics(
            name=self._name,
            state=record.state,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_rate=failure_rate,
            slow_call_rate=slow_rate,
            consecutive_failures=record.consecutive_failures,
            half_open_calls=len(record.probes) + record.probes_waiting,
            retry_after=retry_after,
            trips=record.trips,
        )

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._name!r}, state={self._record.state.value})"

    # The state machine. Nothing below awaits, so with the in-memory store it needs no lock.

    def _refresh(self) -> None:
        config = self._config
        self._timed = bool(self._listeners) or config.slow_call_duration is not None
        self._fast_eligible = (
            self._local
            and not self._listeners
            and not config.windowed
            and config.failure_result is None
        )
        self._record.fast = self._fast_eligible and self._record.state is _CLOSED

    def _admit(self, started: bool = True) -> BreakerPermit:
        record = self._record
        state = record.state
        if state is _CLOSED:
            return BreakerPermit(
                self,
                record.epoch,
                False,
                self._clock.now() if self._timed else None,
                None,
                self._claim(),
            )
        now = self._clock.now()
        if state is _OPEN and now < record.open_until:
            raise self._reject(record.open_until - now)
        # What follows may change the state or grant a probe: claimed first, so not from a
        # second loop, and given back below if no probe is granted.
        owner = self._claim()
        try:
            return self._admit_probe(record, state, now, started, owner)
        except BaseException:
            owner.permits -= 1
            raise

    def _admit_probe(
        self, record: BreakerRecord, state: BreakerState, now: float, started: bool, owner: _Owner
    ) -> BreakerPermit:
        if state is _OPEN:
            record.probes.clear()
            record.probes_waiting = 0
            record.probe_successes = 0
            self._enter(record, _HALF_OPEN, _OPEN)
        probes = record.probes
        max_wait = self._config.max_wait_in_half_open
        # Only started probes are judged: probes[0] is the oldest start (starts are appended
        # in clock order), and a probe still queued for a token has sent nothing yet.
        if max_wait is not None and probes and now - probes[0] >= max_wait:
            self._trip(now)
            raise self._reject(record.open_until - now)
        if len(probes) + record.probes_waiting >= self._config.half_open_max_calls:
            raise self._reject(self._probe_wait(record, now))
        if started:
            probes.append(now)
        else:
            record.probes_waiting += 1
        if not self._local:
            self._store.changed()
        return BreakerPermit(self, record.epoch, True, now, now if started else None, owner)

    def _probe_wait(self, record: BreakerRecord, now: float) -> float:
        """The ``retry_after`` for a caller refused while probes run: soon, not a full open
        period, since a probe usually answers in a moment and then the breaker closes."""
        max_wait = self._config.max_wait_in_half_open
        if max_wait is not None and record.probes:
            wait = record.probes[0] + max_wait - now
        else:
            wait = min(self._config.recovery_timeout, _PROBE_WAIT_CAP)
        return max(wait, _PROBE_WAIT_FLOOR)

    def _start_probe(self, permit: BreakerPermit, now: float) -> None:
        record = self._record
        if permit.epoch != record.epoch:
            return
        self._remove_probe(record, permit)
        record.probes.append(now)
        permit._probe_start = now
        if not self._local:
            self._store.changed()

    # Ownership: one thread and event loop at a time. The state machine takes no lock, so two
    # loops using one breaker at once would corrupt it (a probe slot lost for ever, say). The
    # loop holding outstanding permits owns the breaker; another loop is refused at admission,
    # settlement and state changes while that loop still runs. Once it has ended, whatever
    # permits it left unreported can never be settled, so the next loop takes over: sequential
    # reuse (asyncio.run per task, one test on asyncio and the next on trio) stays allowed.
    # Only the owner changes its own count, so the owner's path takes no lock; the closed fast
    # path holds no permit and checks nothing.

    def _claim(self) -> _Owner:
        """Count one more outstanding permit (or state change) for the calling loop.

        Raises:
            RuntimeError: Another loop that is still running holds permits.
        """
        thread = _get_ident()
        loop = current_loop()
        owner = self._owner
        if owner.thread == thread and owner.loop is loop:
            # Count first, then look again: a loop taking over sets the owner first, then
            # looks at the count (in _take_over), so at most one of the two goes ahead.
            owner.permits += 1
            if self._owner is owner:
                return owner
            owner.permits -= 1
        return self._take_over(thread, loop)

    def _take_over(self, thread: int, loop: object | None) -> _Owner:
        with self._lock:
            owner = self._owner
            if owner.thread == thread and owner.loop is loop:
                owner.permits += 1
                return owner
            outstanding = owner.permits
            if outstanding and not loop_finished(owner.loop, owner.thread):
                raise self._shared_error(owner)
            new = _Owner(thread, loop)
            new.permits = 1
            self._owner = new
            if owner.permits > outstanding:
                # The owner claimed again while this was deciding: it is alive, and in use.
                self._owner = owner
                raise self._shared_error(owner)
            if outstanding:
                # Every outstanding permit belonged to the loop that ended: none can be
                # reported now. Free their probe slots, so that they cannot hold the breaker
                # half-open for ever; their late reports (if any) count nothing.
                record = self._record
                record.probes.clear()
                record.probes_waiting = 0
            return new

    def _settle_elsewhere(self, permit: BreakerPermit, owner: _Owner) -> bool:
        """Say whether a permit settled outside its owner's thread, or after its owner was
        replaced, may still record its outcome.

        False for a permit orphaned by the end of its loop: nothing counts, but its probe slot
        is freed. A permit settled from another thread or loop while its own loop runs frees
        its probe slot and raises.
        """
        thread = _get_ident()
        loop = current_loop()
        if owner.thread == thread and owner.loop is loop:
            # Taken over while this permit was out: its loop looked finished (stopped between
            # two runs), or another thread raced for it, which this settlement now reveals.
            owner.permits -= 1
            current = self._owner
            self._release(permit)
            if (
                current.permits
                and (current.thread != thread or current.loop is not loop)
                and not loop_finished(current.loop, current.thread)
            ):
                raise self._shared_error(current)
            return False
        if loop_finished(owner.loop, owner.thread):
            self._release(permit)
            return False
        # Left counted: its loop keeps the breaker until it ends (only the owner changes its
        # own count, so the owner's path needs no lock).
        self._release(permit)
        raise self._shared_error(owner)

    def _shared_error(self, owner: _Owner) -> RuntimeError:
        error = RuntimeError(
            f"CircuitBreaker {self._name!r} is used from two threads or event loops at once: "
            f"an event loop in thread {owner.thread} holds its permits and is still running. "
            "A breaker belongs to one event loop at a time (it keeps its state without "
            "locks): build one breaker per event loop or thread, or send every call to one "
            "loop (anyio.from_thread.run, asyncio.run_coroutine_threadsafe)."
        )
        # A programming error: a retry policy must neither retry it nor call it an unknown
        # outcome (at admission nothing was sent).
        error.failure_kind = FailureKind.PERMANENT  # type: ignore[attr-defined]
        return error

    def _reject(self, retry_after: float) -> CircuitOpenError:
        if self._listeners:
            events.emit(self._listeners, "on_rejected", self._name, retry_after)
        return CircuitOpenError(self._name, retry_after)

    async def _run(
        self, permit: BreakerPermit, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any
    ) -> T:
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            permit.settle(exc)
            raise
        permit.record_result(result)
        return result

    def _fast_error(self, error: BaseException, epoch: int) -> None:
        # The fast path runs only CLOSED, in consecutive mode, with nothing listening.
        if self.classify(error) != "failure":
            return
        record = self._record
        if record.epoch != epoch:
            return
        record.consecutive_failures += 1
        if record.consecutive_failures >= self._config.failure_threshold:
            owner = self._claim()
            try:
                self._trip(self._clock.now())
            finally:
                owner.permits -= 1

    def _duration(self, permit: BreakerPermit, now: float | None) -> float | None:
        if now is None or permit.started is None:
            return None
        return now - permit.started

    def _is_slow(self, duration: float | None) -> bool:
        return (
            self._slow_after is not None and duration is not None and duration >= self._slow_after
        )

    def _record_success(self, permit: BreakerPermit) -> None:
        record = self._record
        if permit.epoch != record.epoch:
            return
        needs_now = self._timed or record.window is not None
        now = self._clock.now() if needs_now else None
        duration = self._duration(permit, now)
        if self._listeners:
            events.emit(self._listeners, "on_success", self._name, duration)
        slow = self._is_slow(duration)
        if permit.probe:
            self._remove_probe(record, permit)
            if slow:
                self._trip(now if now is not None else self._clock.now())
                return
            record.probe_successes += 1
            if record.probe_successes >= self._config.success_threshold:
                self._clear_closed(record)
                self._enter(record, _CLOSED, _HALF_OPEN)
            elif not self._local:
                self._store.changed()
            return
        record.consecutive_failures = 0
        window = record.window
        if window is not None and now is not None:
            window.add(now, False, slow)
            self._judge(record, window, now)
        elif not self._local:
            self._store.changed()

    def _record_failure(self, permit: BreakerPermit, error: BaseException | None) -> None:
        record = self._record
        if permit.epoch != record.epoch:
            return
        now = self._clock.now()
        duration = self._duration(permit, now)
        if self._listeners:
            events.emit(self._listeners, "on_failure", self._name, error, duration)
        if permit.probe:
            self._remove_probe(record, permit)
            self._trip(now)
            return
        record.consecutive_failures += 1
        window = record.window
        if window is not None:
            window.add(now, True, self._is_slow(duration))
            self._judge(record, window, now)
        elif record.consecutive_failures >= self._config.failure_threshold:
            self._trip(now)
        elif not self._local:
            self._store.changed()

    def _record_ignored(self, permit: BreakerPermit, error: BaseException) -> None:
        if permit.epoch != self._record.epoch:
            return
        if self._listeners:
            events.emit(self._listeners, "on_ignored", self._name, error)
        self._release(permit)

    def _release(self, permit: BreakerPermit) -> None:
        record = self._record
        if permit.probe and permit.epoch == record.epoch:
            self._remove_probe(record, permit)
            if not self._local:
                self._store.changed()

    @staticmethod
    def _remove_probe(record: BreakerRecord, permit: BreakerPermit) -> None:
        # A foreign store may have lost the slot already; freeing it twice must not fail.
        start = permit._probe_start
        if start is None:
            if record.probes_waiting > 0:
                record.probes_waiting -= 1
        else:
            with contextlib.suppress(ValueError):
                record.probes.remove(start)

    def _judge(self, record: BreakerRecord, window: CountWindow | TimeWindow, now: float) -> None:
        window.expire(now)
        config = self._config
        calls = window.calls
        minimum = config.minimum_calls or 1
        failure_rate = config.failure_rate_threshold
        slow_rate = config.slow_call_rate_threshold
        if calls >= minimum and (
            (failure_rate is not None and window.failures / calls >= failure_rate)
            or (slow_rate is not None and window.slow / calls >= slow_rate)
        ):
            self._trip(now)
        elif not self._local:
            self._store.changed()

    def _trip(self, now: float, duration: float | None = None) -> None:
        record = self._record
        old = record.state
        record.trips += 1
        record.consecutive_trips += 1
        if duration is None:
            config = self._config
            if record.consecutive_trips == 1 or record.open_duration <= 0.0:
                duration = config.recovery_timeout
            else:
                cap = config.max_recovery_timeout or config.recovery_timeout
                duration = min(record.open_duration * config.backoff_multiplier, cap)
        record.open_duration = duration
        record.open_until = now + duration
        record.probes.clear()
        record.probes_waiting = 0
        record.probe_successes = 0
        self._enter(record, _OPEN, old)

    @staticmethod
    def _clear_closed(record: BreakerRecord) -> None:
        record.consecutive_failures = 0
        record.consecutive_trips = 0
        record.open_duration = 0.0
        record.open_until = 0.0
        record.probes.clear()
        record.probes_waiting = 0
        record.probe_successes = 0
        if record.window is not None:
            record.window.clear()

    def _enter(self, record: BreakerRecord, new: BreakerState, old: BreakerState) -> None:
        record.state = new
        record.epoch += 1
        record.fast = self._fast_eligible and new is _CLOSED
        if not self._local:
            self._store.changed()
        if self._listeners and new is not old:
            events.emit(self._listeners, "on_state_change", self._name, old, new)


class _Owner:
    """The thread and event loop that hold a breaker's outstanding permits, and how many."""

    __slots__ = ("loop", "permits", "thread")

    def __init__(self, thread: int, loop: object | None) -> None:
        self.thread = thread
        self.loop = loop
        self.permits = 0


class _StateChangeListener(events.BreakerListener):
    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[str, BreakerState, BreakerState], object]) -> None:
        self._callback = callback

    def on_state_change(self, breaker: str, old: BreakerState, new: BreakerState) -> None:
        self._callback(breaker, old, new)
