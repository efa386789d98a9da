"""One replica of the multi-process Redis tests: acquire from a shared bucket, print grant times.

Run as ``python tests/_redis_worker.py <json options>``; prints one JSON object: the wall-clock
time (``time.time()``, one clock for every process on the host) of each grant, and of a
``pause()`` if it made one. Options: ``url``, ``prefix``, ``name``, ``rate``, ``burst``,
``seconds``, ``tasks``, ``skew`` (seconds added to the limiter's clock: a replica whose clock
runs ahead), ``pause_at`` and ``pause`` (pause the fleet ``pause`` seconds, ``pause_at`` seconds
after the start), ``backend`` (``asyncio`` or ``trio``). It starts when the parent releases it
(:mod:`_together`), so that the processes start together.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from _together import released
from resilient_voice import TokenBucket
from resilient_voice.redis import RedisBackend
from resilient_voice.twilio import TwilioClient


class SkewedClock:
    """The system's monotonic clock, ``skew`` seconds ahead: another host's idea of the time."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def now(self) -> float:
        return time.monotonic() + self.skew

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - self.now()))

    @contextmanager
    def deadline_scope(self, deadline: float) -> Iterator[anyio.CancelScope]:
        remaining = deadline - self.now()
        with anyio.CancelScope(deadline=anyio.current_time() + remaining) as scope:
            yield scope


async def run(options: dict[str, Any]) -> dict[str, Any]:
    grants: list[float] = []
    paused: list[float] = []
    async with RedisBackend.from_url(options["url"], prefix=options["prefix"], timeout=1.0) as b:
        bucket = TokenBucket(
            options["rate"],
            options["burst"],
            name=options["name"],
            store=b,
            clock=SkewedClock(options.get("skew", 0.0)),
        )
        await b.client.ping()  # connected
        end = await released() + options["seconds"]

        async def task() -> None:
            while time.time() < end:
                with anyio.move_on_after(max(0.0, end - time.time())):
                    await bucket.acquire()
                    if time.time() <= end:
                        grants.append(time.time())

        async def pauser() -> None:
            await anyio.sleep(options["pause_at"])
            paused.append(time.time())
            await bucket.pause(options["pause"])

        async with anyio.create_task_group() as tg:
            for _ in range(options.get("tasks", 10)):
                tg.start_soon(task)
            if "pause_at" in options:
                tg.start_soon(pauser)
    return {"grants": grants, "paused": paused}


async def run_twilio(options: dict[str, Any]) -> dict[str, Any]:
    """Create calls through a TwilioClient whose default CPS bucket lives in Redis."""
    created: list[float] = []
    async with (
        RedisBackend.from_url(options["url"], prefix=options["prefix"], timeout=1.0) as b,
        TwilioClient(
            options["account"],
            "token",
            base_url=options["base_url"],
            calls_per_second=options["rate"],
            store=b,
        ) as twilio,
    ):
        await b.client.ping()  # connected
        end = await released() + options["seconds"]

        async def task() -> None:
            while time.time() < end:
                with anyio.move_on_after(max(0.0, end - time.time())):
                    await twilio.create_call(
                        to="+15551234567", from_="+15557654321", url="https://example.com/t"
                    )
                    created.append(time.time())

        async with anyio.create_task_group() as tg:
            for _ in range(options.get("tasks", 3)):
                tg.start_soon(task)
    return {"grants": created, "paused": []}


def main() -> None:
    options = json.loads(sys.argv[1])
    work = run_twilio if options.get("mode") == "twilio" else run
    result = anyio.run(work, options, backend=options.get("backend", "asyncio"))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
