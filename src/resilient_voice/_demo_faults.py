"""The demo's fault plan: which fault the fake provider injects for each (number, attempt).

A fault profile names phases of the campaign by the position of a number in it (the numbers
dialled first meet no storm, the next stretch meets a 429 storm, and so on), so that what a
number meets on its n-th attempt is a pure function of the seed, the number and n
(:meth:`FaultPlan.draw`), never of timing. Timing still decides what the breaker lets through
(its open periods), so the counts of a run may differ between runs with the same seed; the fault
each (number, attempt) pair meets does not.

:class:`PlannedFaults` is the ASGI app in front of :class:`~resilient_voice.testing.FakeTelephony`
that applies the plan. The campaign tags each create request with the number and its campaign
attempt (the ``x-demo-attempt`` header, added by the demo's own transport: plumbing of the demo,
not something a provider sees), and the app answers, delays, drops or loses the answer of that
request as the plan says.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import anyio

__all__ = [
    "ATTEMPT_HEADER",
    "FAULT_KINDS",
    "FAULT_PROFILES",
    "PROFILE_HELP",
    "FaultPlan",
    "PlannedFaults",
    "attempt_tag",
]

ATTEMPT_HEADER: Final = "x-demo-attempt"
FAULT_PROFILES = ("none", "flaky", "outage", "storm")
PROFILE_HELP: Final[Mapping[str, str]] = {
    "none": "no faults: the provider answers every request at once.",
    "flaky": (
        "about one attempt in eight meets a fault: a 500 (retried), a lost answer (the call "
        "was created, the answer never came: reconciled), a dropped connection, or a slow answer."
    ),
    "outage": (
        "flaky, and an outage: every request for the numbers 30 to 36 percent of the way "
        "through the campaign fails with 503 on their first attempt; the breaker opens."
    ),
    "storm": (
        "flaky, then three phases on a number's first attempt: a 429 storm (numbers 10 to 20 "
        "percent of the way through), an outage (35 to 41) and lost answers (60 to 75)."
    ),
}

FaultName = Literal["http_429", "http_500", "http_503", "lost_answer", "dropped", "slow"]
FAULT_KINDS: tuple[FaultName, ...] = (
    "http_429",
    "http_500",
    "http_503",
    "lost_answer",
    "dropped",
    "slow",
)
# An outage lasts as long as the attempt does: every request of it (the retries too) meets it.
# The others hit the attempt's first request only, so a retry can get through.
_PERSISTENT = frozenset(("http_503",))
_SLOW_SECONDS = 0.3
_RETRY_AFTER = 0.1
_STEADY = "steady"
_FLAKY = "flaky"

# profile -> (phase name, start, end) as fractions of the campaign's numbers.
_PHASES: Mapping[str, tuple[tuple[str, float, float], ...]] = {
    "none": (),
    "flaky": (),
    "outage": (("outage", 0.30, 0.36),),
    "storm": (("429 storm", 0.10, 0.20), ("outage", 0.35, 0.41), ("lost answers", 0.60, 0.75)),
}


class FaultPlan:
    """The faults a profile injects, drawn per (number, attempt) from ``seed``.

    Args:
        profile: One of :data:`FAULT_PROFILES`.
        seed: Seeds every draw.
        numbers: The campaign's numbers in dialling order (their position picks the phase).
    """

    __slots__ = ("_index", "profile", "seed")

    def __init__(self, profile: str, seed: int, numbers: Sequence[str]) -> None:
        if profile not in FAULT_PROFILES:
            raise ValueError(f"profile must be one of {FAULT_PROFILES}, got {profile!r}")
        self.profile = profile
        self.seed = seed
        self._index = {n: i for i, n in enumerate(numbers)}

    def phase(self, number: str) -> str:
        """The phase of the campaign ``number`` belongs to (``"429 storm"``, ``"outage"``...)."""
        if self.profile == "none":
            return _STEADY
        position = self._index.get(number, 0) / max(1, len(self._index))
        for name, start, end in _PHASES[self.profile]:
            if start <= position < end:
                return name
        return _FLAKY

    def draw(self, number: str, attempt: int) -> FaultName | None:
        """The fault ``number`` meets on its ``attempt``-th try (0-based), or None.

        A pure function of the seed, the profile's phases, ``number`` and ``attempt``: the draw
        comes from a generator seeded with exactly these (a string seed is hashed with SHA-512,
        the same in every process), never from shared state.
        """
        if self.profile == "none":
            return None
        u = random.Random(f"{self.seed}/{number}/{attempt}").random()
        phase = self.phase(number)
        if attempt == 0:
            if phase == "429 storm" and u < 0.9:
                return "http_429"
            if phase == "outage":
                return "http_503"
            if phase == "lost answers":
                return "lost_answer" if u < 0.5 else "dropped" if u < 0.6 else None
        if u < 0.04:
            return "http_500"
        if u < 0.07:
            return "lost_answer"
        if u < 0.09:
            return "dropped"
        if u < 0.12:
            return "slow"
        return None


def attempt_tag(number: str, attempt: int) -> str:
    """The ``x-demo-attempt`` header value for ``number``'s ``attempt``."""
    return f"{number}/{attempt}"


class PlannedFaults:
    """ASGI app: the fake provider behind the plan; counts what it injected, by kind."""

    def __init__(self, app: Any, plan: FaultPlan) -> None:
        self._app = app
        self._plan = plan
        self._requests: Counter[tuple[str, int]] = Counter()
        self._injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last = ""

    def phase(self) -> str:
        """The phase of the number whose request reached the upstream last."""
        with self._lock:
            last = self._last
        return self._plan.phase(last) if last else "starting"

    def injected(self) -> dict[str, int]:
        """Faults injected so far, by kind (a snapshot)."""
        with self._lock:
            return dict(sorted(self._injected.items()))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        tag = None
        if scope["type"] == "http" and scope["method"] == "POST":
            for name, value in scope["headers"]:
                if name == ATTEMPT_HEADER.encode():
                    tag = value.decode("latin-1")
        if tag is None:
            await self._app(scope, receive, send)
            return
        number, _, attempt_text = tag.rpartition("/")
        attempt = int(attempt_text)
        kind = self._plan.draw(number, attempt)
        with self._lock:
            self._last = number
            first = self._requests[(number, attempt)] == 0
            self._requests[(number, attempt)] += 1
            if kind is not None and (first or kind in _PERSISTENT):
                self._injected[kind] += 1
            else:
                kind = None
        if kind is None:
            await self._app(scope, receive, send)
        elif kind == "slow":
            # The call is created on time; its answer is late (a delay before processing
            # would shift the creation and look like a burst at the upstream's CPS check).
            delayed = False

            async def send_late(message: Any) -> None:
                nonlocal delayed
                if not delayed:
                    delayed = True
                    await anyio.sleep(_SLOW_SECONDS)
                await send(message)

            await self._app(scope, receive, send_late)
        elif kind in ("http_429", "http_500", "http_503"):
            await _drain(receive)
            await _answer(scope, send, int(kind[5:]))
        else:
            from resilient_voice.testing._serve import DropConnectionError

            if kind == "lost_answer":
                # The fake creates the call; its answer goes nowhere and the connection closes.
                await self._app(scope, receive, _discard)
            else:
                await _drain(receive)
            raise DropConnectionError


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _discard(message: Any) -> None:
    return None


async def _answer(scope: Any, send: Any, status: int) -> None:
    """Answer like the provider would, with its error body (Twilio's 20429 and so on)."""
    from resilient_voice.testing._fake_http import retry_after_value
    from resilient_voice.testing._fake_twilio import twilio_fault_response
    from resilient_voice.testing._fake_vapi import vapi_fault_response

    header = retry_after_value(_RETRY_AFTER) if status == 429 else None
    twilio = str(scope["path"]).startswith("/2010-04-01/")
    response = (
        twilio_fault_response(status, header) if twilio else vapi_fault_response(status, header)
    )
    await send({"type": "http.response.start", "status": status, "headers": response.headers})
    await send({"type": "http.response.body", "body": response.body})
