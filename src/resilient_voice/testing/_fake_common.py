"""Plumbing shared by the Twilio and Vapi halves of the fake: requests, responses, ids, time."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.abc

from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice._validate import number

JSON_TYPE = (b"content-type", b"application/json; charset=utf-8")

Span = tuple[float, float]
"""Seconds as ``(low, high)``; a fixed value is ``(value, value)``."""


@dataclass(slots=True)
class Request:
    """One parsed request, as the handlers see it."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    json: Any
    body: bytes
    headers: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)

    def first(self, name: str) -> str | None:
        """The first form value of ``name``, or None."""
        values = self.form.get(name)
        return values[0] if values else None

    def query_first(self, name: str) -> str | None:
        """The first query value of ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(slots=True)
class Response:
    """What a handler answers; ``created`` names a resource the request really created."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    created: str | None = None


def json_response(
    status: int,
    payload: Any,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    created: str | None = None,
) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, [JSON_TYPE, *(headers or [])], created)


def html_response(status: int, title: str) -> Response:
    body = f"<html><head><title>{status} {title}</title></head><body>{title}</body></html>"
    return Response(status, body.encode(), [(b"content-type", b"text/html")])


class Core:
    """State both providers share: clock, time origin, seeded randomness, the lock, tasks.

    Requests are handled on the server's event loop while tests read records from their own
    thread, so every mutation and every snapshot happens under ``lock`` (never across an await).
    Every reading of time and every wait goes through ``clock``, so a fake on a ManualClock
    moves exactly as far as the test advances it.
    """

    def __init__(self, seed: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.origin = clock.now()
        self.wall_origin = datetime.now(UTC)
        self.ids = random.Random(f"{seed}:ids")
        self.faults = random.Random(f"{seed}:faults")
        self.callbacks = random.Random(f"{seed}:callbacks")
        # Their own streams, so that adding random durations or delays to a test leaves the
        # ids, faults and webhook misbehaviour of the same seed as they were.
        self.durations = random.Random(f"{seed}:durations")
        self.delays = random.Random(f"{seed}:delays")
        self.task_group: anyio.abc.TaskGroup | None = None

    def restart(self) -> None:
        """Move the time origin to now (the server started)."""
        self.origin = self.clock.now()
        self.wall_origin = datetime.now(UTC)

    def elapsed(self) -> float:
        """Seconds since the fake started."""
        return self.clock.now() - self.origin

    def wall(self, elapsed: float) -> datetime:
        """The UTC wall-clock time of an ``elapsed`` reading."""
        return self.wall_origin + timedelta(seconds=elapsed)

    def hex_sid(self, prefix: str) -> str:
        """A Twilio-style SID: a two-letter prefix and 32 lowercase hex digits."""
        with self.lock:
            bits = self.ids.getrandbits(128)
        return f"{prefix}{bits:032x}"

    def uuid(self) -> str:
        """A version-4 UUID string from the seeded generator."""
        with self.lock:
            bits = self.ids.getrandbits(128)
        return str(uuid.UUID(int=bits, version=4))

    def draw(self, span: Span, rng: random.Random) -> float:
        """A value of ``span``: itself when fixed, else uniform in it; call under ``lock``."""
        low, high = span
        return low if low == high else rng.uniform(low, high)

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Start background work in the lifespan task group; False when there is none."""
        group = self.task_group
        if group is None:
            return False
        group.start_soon(fn, *args)
        return True


def span(name: str, value: object) -> Span:
    """A duration option: seconds, or a ``(min, max)`` range drawn per call from the seed.

    Raises:
        TypeError: Neither a number nor a pair of numbers.
        ValueError: Negative, not finite, or ``min > max``.
    """
    if isinstance(value, tuple):
        if len(value) != 2:
            raise TypeError(f"{name} must be seconds or a (min, max) pair, got {value!r}")
        low = number(f"{name}[0]", value[0], inclusive=True)
        high = number(f"{name}[1]", value[1], inclusive=True)
        if low > high:
            raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
        return low, high
    fixed = number(name, value, inclusive=True)
    return fixed, fixed


def frozen_multi(values: Mapping[str, list[str]]) -> dict[str, tuple[str, ...]]:
    return {key: tuple(items) for key, items in values.items()}


def iso_ms(moment: datetime) -> str:
    """ISO 8601 with milliseconds and ``Z``, as Vapi writes dates."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def truncate_ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def peak(spans: list[tuple[float, float]]) -> int:
    """The largest number of ``[start, end)`` spans that overlap at one moment."""
    edges = sorted(
        [(start, 1) for start, end in spans if end > start]
        + [(end, -1) for start, end in spans if end > start]
    )
    busy = best = 0
    for _, step in edges:  # an end sorts before a start at the same moment: [start, end)
        busy += step
        best = max(best, busy)
    return best
