"""One replica of the fleet-breaker process tests: calls an upstream at a steady rate through a
``CircuitBreaker(store=RedisBackend)`` and prints what happened as JSON.

Options (JSON, argv[1]): ``url``, ``prefix``, ``rate`` (calls a second), ``fail`` (the upstream
raises), ``recover_in`` (seconds after the start from which it succeeds), ``recovery_timeout``,
``seconds`` (how long it calls), ``delay`` (seconds after the start before its first call),
``backend`` (anyio backend). It starts when the parent releases it (:mod:`_together`), once its
breaker is in the fleet view; times are wall-clock ``time.time()``, the one clock every process
on the host shares.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio

from _together import released
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

    recover = float("inf")

    async def upstream() -> None:
        if options["fail"] and time.time() < recover:
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
        # Fully set up: connected, and this replica's summary is in the fleet view.
        with anyio.fail_after(30):
            while breaker.statistics().fleet is None:
                await anyio.sleep(0.01)
        start = await released()
        stop = start + options["seconds"]
        recover = start + options.get("recover_in", float("inf"))
        period = 1.0 / options["rate"]
        due = time.monotonic() + options.get("delay", 0.0)
        await anyio.sleep(max(0.0, due - time.monotonic()))
        while time.time() < stop:
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
