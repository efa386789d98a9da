"""One replica of the fleet-breaker process tests: calls an upstream at a steady rate through a
``CircuitBreaker(store=RedisBackend)`` and prints what happened as JSON.

Options (JSON, argv[1]): ``url``, ``prefix``, ``rate`` (calls a second), ``fail`` (the upstream
raises), ``recover`` (wall-clock time from which it succeeds), ``recovery_timeout``, ``start`` and
``stop`` (wall-clock ``time.time()`` bounds, the one clock every process
on the host shares), ``backend`` (anyio backend).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio

from resilient_voice import CircuitBreaker, CircuitOpenError
from resilient_voice.events import BreakerState, Event, FleetStateChanged, StateChanged
from resilient_voice.redis import RedisBackend


async def main(options: dict[str, Any]) -> dict[str, Any]:
    transitions: list[tuple[float, str, str]] = []

    def listen(event: Event) -> None:
        if isinstance(event, FleetStateChanged):
            transitions.append((time.time(), f"fleet:{event.rule}", event.new.value))
        elif isinstance(event, StateChanged):
            transitions.append((time.time(), "state", event.new.value))

    async def upstream() -> None:
        if options["fail"] and time.time() < options.get("recover", float("inf")):
            raise ConnectionError("upstream down")

    outcomes: list[tuple[float, str]] = []
    async with RedisBackend.from_url(options["url"], prefix=options["prefix"], timeout=0.2) as b:
        breaker = CircuitBreaker(
            "upstream",
            window_duration=5.0,
            minimum_calls=10,
            failure_rate_threshold=0.5,
            recovery_timeout=options.get("recovery_timeout", 30.0),
            store=b,
            listeners=[listen],
        )
        await anyio.sleep(max(0.0, options["start"] - time.time()))
        period = 1.0 / options["rate"]
        due = time.monotonic()
        while time.time() < options["stop"]:
            probe = breaker.state is not BreakerState.CLOSED  # admitted now: a probe
            try:
                await breaker.call(upstream)
                outcome = "probe" if probe else "ok"
            except CircuitOpenError:
                outcome = "rejected"
            except ConnectionError:
                outcome = "failed probe" if probe else "failed"
            outcomes.append((time.time(), outcome))
            due += period
            await anyio.sleep(max(0.0, due - time.monotonic()))
    return {"transitions": transitions, "outcomes": outcomes, "state": breaker.state.value}


if __name__ == "__main__":
    opts = json.loads(sys.argv[1])
    sys.stdout.write(json.dumps(anyio.run(main, opts, backend=opts.get("backend", "asyncio"))))
