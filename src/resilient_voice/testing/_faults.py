"""Fault scripts for :class:`~resilient_voice.testing.FakeTelephony`.

A script is a sequence of :class:`Fault` rules. Each rule names the endpoints it applies to
(glob patterns over endpoint names such as ``"twilio.calls.create"`` or ``"vapi.*"``), a time
window in seconds since the fake started (real time), a probability and an optional count. For
each request the fake adds up the delays of every matching ``latency`` rule, then applies the
first matching rule of any other kind. Randomness comes from a ``random.Random`` seeded by the
fake's ``seed``, so a script replays identically for the same sequence of requests.
"""

from __future__ import annotations

import fnmatch
import math
import random
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from resilient_voice import _validate

__all__ = ["CallbackFaults", "Fault", "FaultKind"]

FaultKind = Literal["error", "rate_limit", "latency", "drop_before", "drop_after", "drop_mid_body"]
_KINDS = frozenset(("error", "rate_limit", "latency", "drop_before", "drop_after", "drop_mid_body"))


def _patterns(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    if not isinstance(endpoints, str | Iterable):
        raise TypeError(f"endpoints must be glob patterns, got {endpoints!r}")
    items = (endpoints,) if isinstance(endpoints, str) else tuple(endpoints)
    if not items or not all(
        isinstance(item, str) and item and item.isprintable() for item in items
    ):
        raise ValueError(f"endpoints must be non-empty glob patterns, got {endpoints!r}")
    return items


@dataclass(frozen=True, slots=True)
class Fault:
    """One rule of a fault script.

    Prefer the constructors (:meth:`error_rate`, :meth:`burst`, :meth:`outage`,
    :meth:`rate_limited`, :meth:`latency`, :meth:`drop_before`, :meth:`drop_after`,
    :meth:`drop_mid_body`), which read as what they do.

    Kinds:

    - ``error``: answer ``status`` (5xx) without processing. Twilio gets its JSON error body
      (20500 for 500, 20503 for 503); 502 and 504 get an HTML gateway page, as a real edge
      proxy would send. Vapi gets its NestJS-style JSON error.
    - ``rate_limit``: answer 429 without processing (Twilio code 20429), with ``Retry-After``
      unless ``retry_after`` is None.
    - ``latency``: wait ``delay`` seconds before handling; combines with any other rule.
    - ``drop_before``: close the connection without a response, nothing processed.
    - ``drop_after``: process the request (a call is really created), then close the
      connection without a response. The dangerous one.
    - ``drop_mid_body``: process the request, send the status line and the headers (with
      ``Content-Length``) and half of the body, then close the connection; with ``stall``,
      send nothing more and keep the connection open until the client gives up. The client
      has seen ``201 Created`` and still has no call. Needs :func:`serve`.

    Args:
        kind: What the rule does.
        endpoints: Glob patterns over endpoint names; ``"*"`` matches every endpoint.
        start: Seconds since the fake started when the rule begins to apply (inclusive).
        end: Seconds since the fake started when it stops applying (exclusive).
        probability: Chance that a matching request is affected (seeded draw).
        count: Apply to at most this many requests (a burst), then never again.
        status: The HTTP status of an ``error`` rule, 500-599.
        retry_after: Seconds for the ``Retry-After`` header of a ``rate_limit`` rule; a whole
            number is sent as an integer (standard), a fraction as a decimal (non-standard, but
            it keeps tests fast). None omits the header.
        delay: Seconds added by a ``latency`` rule.
        reset: For ``drop_before`` and ``drop_after``, reset the connection (TCP RST, httpx
            ``ReadError``) instead of closing it (FIN, httpx ``RemoteProtocolError``).
        stall: For ``drop_mid_body``, stop sending mid-body and wait for the client to leave
            (its read timeout fires) instead of closing the connection.
    """

    kind: FaultKind
    endpoints: tuple[str, ...] = ("*",)
    start: float = 0.0
    end: float = math.inf
    probability: float = 1.0
    count: int | None = None
    status: int = 500
    retry_after: float | None = 1.0
    delay: float = 0.0
    reset: bool = False
    stall: bool = False
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "endpoints", _patterns(self.endpoints))
        regex = "|".join(f"(?:{fnmatch.translate(p)})" for p in self.endpoints)
        object.__setattr__(self, "_regex", re.compile(regex))
        start = _validate.number("start", self.start, inclusive=True)
        if start == math.inf:
            raise ValueError(f"start must be a finite number >= 0, got {self.start!r}")
        end = _validate.non_negative("end", self.end)
        if end <= start:
            raise ValueError(f"end must be greater than start, got {self.end!r}")
        probability = _validate.number("probability", self.probability, inclusive=True)
        if probability > 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability!r}")
        _validate.optional_whole("count", self.count)
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise TypeError(f"status must be an int, got {self.status!r}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status, got {self.status!r}")
        if self.kind == "error" and not 500 <= self.status <= 599:
            raise ValueError(f"an error fault needs a 5xx status, got {self.status!r}")
        if self.retry_after is not None:
            retry_after = _validate.non_negative("retry_after", self.retry_after)
            if retry_after == math.inf:
                raise ValueError(f"retry_after must be None or >= 0, got {self.retry_after!r}")
        delay = _validate.non_negative("delay", self.delay)
        if delay == math.inf:
            raise ValueError(f"delay must be a finite number >= 0, got {self.delay!r}")
        if self.kind == "latency" and delay == 0:
            raise ValueError("a latency fault needs delay > 0")
        _validate.flag("reset", self.reset)
        _validate.flag("stall", self.stall)
        if self.stall and self.kind != "drop_mid_body":
            raise ValueError("stall applies to drop_mid_body faults only")
        if self.reset and self.kind == "drop_mid_body":
            raise ValueError("reset applies to drop_before and drop_after faults only")

    def matches(self, endpoint: str) -> bool:
        """Whether this rule names ``endpoint``."""
        return self._regex.fullmatch(endpoint) is not None

    @classmethod
    def error_rate(
        cls,
        probability: float,
        *,
        status: int = 500,
        endpoints: str | Sequence[str] = "*",
        start: float = 0.0,
        end: float = math.inf,
    ) -> Fault:
        """Answer a fraction of requests with a 5xx, unprocessed."""
        return cls(
            "error", _patterns(endpoints), start, end, probability=probability, status=status
        )

    @classmethod
    def burst(
        cls,
        count: int,
        *,
        status: int = 500,
        endpoints: str | Sequence[str] = "*",
        start: float = 0.0,
        end: float = math.inf,
    ) -> Fault:
        """Answer the next ``count`` matching requests after ``start`` with a 5xx."""
        _validate.whole("count", count)
        return cls("error", _patterns(endpoints), start, end, count=count, status=status)

    @classmethod
    def outage(
        cls,
        start: float,
        end: float,
        *,
        status: int = 503,
        endpoints: str | Sequence[str] = "*",
    ) -> Fault:
        """Answer every matching request in ``[start, end)`` with a 5xx (503 by default)."""
        return cls("error", _patterns(endpoints), start, end, status=status)

    @classmethod
    def rate_limited(
        cls,
        probability: float = 1.0,
        *,
        retry_after: float | None = 1.0,
        count: int | None = None,
        endpoints: str | Sequence[str] = "*",
        start: float = 0.0,
        end: float = math.inf,
    ) -> Fault:
        """Answer 429 (Twilio 20429: not processed, safe to retry) with ``Retry-After``."""
        return cls(
            "rate_limit",
            _patterns(endpoints),
            start,
            end,
            probability=probability,
            count=count,
            retry_after=retry_after,
        )

    @classmethod
    def latency(
        cls,
        delay: float,
        *,
        probability: float = 1.0,
        endpoints: str | Sequence[str] = "*",
        start: float = 0.0,
        end: float = math.inf,
    ) -> Fault:
        """Wait ``delay`` seconds before handling matching requests."""
        return cls(
            "latency", _patterns(endpoints), start, end, probability=probability, delay=delay
        )

    @classmethod
    def drop_before(
        cls,
        probability: float = 1.0,
        *,
        count: int | None = None,
        reset: bool = False,
        endpoints: str | Sequence[str] = "*",
        start: float = 0.0,
        end: float = math.inf,
    ) -> Fault:
        """Drop the connection without a response; nothing is processed."""
        return cls(
            "drop_before",
            _patterns(endpoints),
            start,
            end,
            probability=probability,
            count=count,
            reset=reset,
        )

    @classmethod
    def drop_after(
        cls,
        probability: float = 1.0,
        *,
        count: int | None = None,
        reset: bool = False,
        endpoints: str | Sequence[str] = "*",
        start: float = 0.0,
        end: float = math.inf,
    ) -> Fault:
        """Process the request (create the call), then drop the connection without a response."""
        return cls(
            "drop_after",
            _patterns(endpoints),
            start,
            end,
            probability=probability,
            count=count,
            reset=reset,
        )

    @classmethod
    def drop_mid_body(
        cls,
        probability: float = 1.0,
        *,
        stall: bool = False,
        count: int | None = None,
        endpoints: str | Sequence[str] = "*",
        start: float = 0.0,
        end: float = math.inf,
    ) -> Fault:
        """Process the request, send the status and headers and half the body, then close.

        With ``stall=True`` the connection stays open with nothing more sent, so the client's
        read timeout fires. Either way a create really happened while its answer never
        arrived whole: the case a client must report as an unknown outcome.
        """
        return cls(
            "drop_mid_body",
            _patterns(endpoints),
            start,
            end,
            probability=probability,
            count=count,
            stall=stall,
        )


@dataclass(frozen=True, slots=True)
class CallbackFaults:
    """Misbehaviour of the webhooks the fake sends (status callbacks, Vapi server messages).

    Each callback is decided independently with the fake's seeded randomness.

    Args:
        loss: Probability that a callback is never sent.
        duplicate: Probability that it is sent twice (same body, same Twilio idempotency token).
        reorder: Probability that it is held back a random time, so that callbacks sent after
            it can arrive first.
        reorder_delay: The longest a reordered callback is held back, in seconds (the hold is
            uniform between 0 and this).
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.05

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = _validate.number(name, getattr(self, name), inclusive=True)
            if value > 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        delay = _validate.non_negative("reorder_delay", self.reorder_delay)
        if delay == math.inf:
            raise ValueError(f"reorder_delay must be finite, got {self.reorder_delay!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the script decided for one request."""

    delay: float
    fault: Fault | None


_NO_FAULT = Decision(0.0, None)


class FaultScript:
    """Evaluates a fault script: counts applications and draws seeded randomness."""

    __slots__ = ("_applied", "_faults", "_lock", "_random")

    def __init__(self, faults: Sequence[Fault], rng: random.Random) -> None:
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"faults must be Fault instances, got {fault!r}")
        self._faults = tuple(faults)
        self._applied = [0] * len(self._faults)
        self._random = rng
        self._lock = threading.Lock()

    @property
    def faults(self) -> tuple[Fault, ...]:
        return self._faults

    def decide(self, endpoint: str, elapsed: float) -> Decision:
        """Pick the delay and the outcome fault for a request to ``endpoint`` at ``elapsed``."""
        if not self._faults:
            return _NO_FAULT
        delay = 0.0
        outcome: Fault | None = None
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.kind != "latency" and outcome is not None:
                    continue
                if not fault.start <= elapsed < fault.end or not fault.matches(endpoint):
                    continue
                if fault.count is not None and self._applied[index] >= fault.count:
                    continue
                if fault.probability < 1.0 and self._random.random() >= fault.probability:
                    continue
                self._applied[index] += 1
                if fault.kind == "latency":
                    delay += fault.delay
                else:
                    outcome = fault
        if outcome is None and delay == 0.0:
            return _NO_FAULT
        return Decision(delay, outcome)
