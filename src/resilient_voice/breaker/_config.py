"""The breaker's validated configuration and its exception classification.

:class:`BreakerConfig` is the record :class:`~resilient_voice.CircuitBreaker` builds from its
keyword arguments and exposes as ``breaker.config``. It has no defaults of its own: the defaults
live once, in the breaker's signature, so there is one way to configure a breaker and nothing to
reconcile. Validation runs when the record is built, so a wrong option fails at startup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from resilient_voice._validate import fraction, number, optional_number, optional_whole, whole
from resilient_voice.errors import ProviderError, RejectedError
from resilient_voice.failure import FailureKind, failure_kind_of

__all__ = ["MAX_WINDOW_SIZE", "BreakerConfig", "Classification", "ExceptionMatcher", "classifier"]

MAX_WINDOW_SIZE = 1_000_000
"""The largest count window: a ring of that many slots is allocated when the breaker is built."""

ExceptionMatcher = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)
"""An exception type, a tuple of types, or a predicate on the exception."""

Classification = Literal["failure", "ignored", "cancelled"]
"""How the breaker treats an exception: count it, let it pass uncounted, or treat it as
cancellation (neither success nor failure; a probe slot is released)."""

IGNORED_KINDS: Final = frozenset({FailureKind.UNPROCESSED, FailureKind.PERMANENT})


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


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """A breaker's configuration, validated when the breaker is built.

    The options are documented on :class:`~resilient_voice.CircuitBreaker`, which builds this
    record; read it back as ``breaker.config``. Options that depend on a window
    (``failure_rate_threshold``, ``minimum_calls``, ``slow_call_rate_threshold``) hold their
    resolved values here: 0.5, ``window_size`` (or 10 for a time window) and 1.0 when a window
    (or slow-call rule) is set, ``None`` otherwise. ``max_recovery_timeout`` holds ten times
    ``recovery_timeout`` when it was not given.

    Raises:
        TypeError: An option has the wrong type.
        ValueError: An option is out of range, options contradict each other, or an option is
            set without the window (or slow-call rule) it needs.
    """

    failure_threshold: int
    recovery_timeout: float
    window_size: int | None
    window_duration: float | None
    failure_rate_threshold: float | None
    minimum_calls: int | None
    slow_call_duration: float | None
    slow_call_rate_threshold: float | None
    half_open_max_calls: int
    success_threshold: int
    max_wait_in_half_open: float | None
    backoff_multiplier: float
    max_recovery_timeout: float | None
    failure_on: ExceptionMatcher | None
    ignore_on: ExceptionMatcher | None
    failure_result: Callable[[Any], bool] | None

    def __post_init__(self) -> None:
        def resolve(option: str, value: object) -> None:
            object.__setattr__(self, option, value)

        whole("failure_threshold", self.failure_threshold)
        number("recovery_timeout", self.recovery_timeout)
        optional_whole("window_size", self.window_size)
        if self.window_size is not None and self.window_size > MAX_WINDOW_SIZE:
            # The count window is a ring of this many slots, allocated up front.
            raise ValueError(
                f"window_size must be <= {MAX_WINDOW_SIZE}, got {self.window_size!r}: "
                "use window_duration for a window over time"
            )
        optional_number("window_duration", self.window_duration)
        if self.window_size is not None and self.window_duration is not None:
            raise ValueError("set window_size (count window) or window_duration, not both")
        windowed = self.windowed
        if self.failure_rate_threshold is not None:
            fraction("failure_rate_threshold", self.failure_rate_threshold)
            if not windowed:
                raise ValueError(_needs_window("failure_rate_threshold"))
        elif windowed:
            resolve("failure_rate_threshold", 0.5)
        if self.minimum_calls is not None:
            whole("minimum_calls", self.minimum_calls)
            if not windowed:
                raise ValueError(_needs_window("minimum_calls"))
            if self.window_size is not None and self.minimum_calls > self.window_size:
                raise ValueError(
                    f"minimum_calls ({self.minimum_calls}) must not exceed "
                    f"window_size ({self.window_size})"
                )
        elif windowed:
            resolve("minimum_calls", self.window_size if self.window_size is not None else 10)
        optional_number("slow_call_duration", self.slow_call_duration)
        if self.slow_call_duration is not None and not windowed:
            raise ValueError(_needs_window("slow_call_duration"))
        if self.slow_call_rate_threshold is not None:
            fraction("slow_call_rate_threshold", self.slow_call_rate_threshold)
            if self.slow_call_duration is None:
                raise ValueError(
                    "slow_call_rate_threshold needs slow_call_duration (and a window: "
                    "window_size or window_duration) to judge which calls are slow"
                )
        elif self.slow_call_duration is not None:
            resolve("slow_call_rate_threshold", 1.0)
        whole("half_open_max_calls", self.half_open_max_calls)
        whole("success_threshold", self.success_threshold)
        optional_number("max_wait_in_half_open", self.max_wait_in_half_open)
        number("backoff_multiplier", self.backoff_multiplier, minimum=1.0, inclusive=True)
        if self.max_recovery_timeout is None:
            resolve("max_recovery_timeout", 10.0 * self.recovery_timeout)
        else:
            number("max_recovery_timeout", self.max_recovery_timeout)
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


def _compile(matcher: ExceptionMatcher | None) -> Callable[[BaseException], bool] | None:
    if matcher is None:
        return None
    if isinstance(matcher, type | tuple):
        types = matcher
        return lambda exc: isinstance(exc, types)
    return matcher


def classifier(config: BreakerConfig) -> Callable[[BaseException], Classification]:
    """Build the function that says how a breaker with ``config`` treats an exception.

    Order: a ``BaseException`` that is not an ``Exception`` (cancellation, interrupts) is
    ``"cancelled"``; ``ignore_on`` matches are ``"ignored"``; so is every
    :class:`~resilient_voice.RejectedError`; when ``failure_on`` is set its matches are
    ``"failure"`` and everything else ``"ignored"``; otherwise errors of kind ``UNPROCESSED`` or
    ``PERMANENT``, and back-pressure answers (a :class:`~resilient_voice.ProviderError` whose
    ``backpressure`` is true, an HTTP 429: the upstream is busy, not sick), are ``"ignored"`` and
    the rest ``"failure"``.
    """
    ignore_on = _compile(config.ignore_on)
    failure_on = _compile(config.failure_on)

    def classify(error: BaseException) -> Classification:
        if not isinstance(error, Exception):
            return "cancelled"
        if ignore_on is not None and ignore_on(error):
            return "ignored"
        if isinstance(error, RejectedError):
            return "ignored"
        if failure_on is not None:
            return "failure" if failure_on(error) else "ignored"
        if failure_kind_of(error) in IGNORED_KINDS or (
            isinstance(error, ProviderError) and error.backpressure
        ):
            return "ignored"
        return "failure"

    return classify
