"""A circuit breaker tripping and recovering, in about half a second, with no network.

A fake upstream fails for a while and then recovers. The breaker opens after three consecutive
failures, refuses calls while open (without calling the upstream), lets one probe through after
``recovery_timeout`` and closes when the probe succeeds.

Run: ``python examples/quickstart.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_voice.breaker import CircuitBreaker
from resilient_voice.errors import CircuitOpenError
from resilient_voice.events import Event, StateChanged

START = time.monotonic()


class UpstreamDownError(Exception):
    """The fake telephony API is down."""


class FakeUpstream:
    """Fails until ``healthy`` is set, and counts the requests that reached it."""

    def __init__(self) -> None:
        self.healthy = False
        self.requests = 0

    async def create_call(self, to: str) -> str:
        self.requests += 1
        await anyio.sleep(0.01)
        if not self.healthy:
            raise UpstreamDownError("503 Service Unavailable")
        return f"CA{self.requests:04d} ringing {to}"


def log(message: str) -> None:
    print(f"{time.monotonic() - START:5.2f}s  {message}")


def on_event(event: Event) -> None:
    if isinstance(event, StateChanged):
        log(f"breaker {event.source!r}: {event.old.value} -> {event.new.value}")


async def main() -> None:
    upstream = FakeUpstream()
    # Built once, at startup, and shared: never build a breaker per call.
    breaker = CircuitBreaker(
        "twilio", failure_threshold=3, recovery_timeout=0.3, listeners=[on_event]
    )
    create_call = breaker(upstream.create_call)

    async def attempt(number: int) -> None:
        try:
            log(f"call {number}: {await create_call('+15551234567')}")
        except UpstreamDownError as error:
            log(f"call {number}: upstream failed ({error})")
        except CircuitOpenError as error:
            log(f"call {number}: rejected locally, retry after {error.retry_after:.2f}s")

    for number in range(1, 6):
        await attempt(number)
    log(f"upstream saw {upstream.requests} requests for 5 calls")

    upstream.healthy = True
    await anyio.sleep(0.3)
    for number in range(6, 8):
        await attempt(number)
    stats = breaker.statistics()
    log(f"state={stats.state.value} trips={stats.trips} upstream requests={upstream.requests}")


if __name__ == "__main__":
    anyio.run(main)
