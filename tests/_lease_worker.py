"""One replica of the two-process lease test: hold call leases from a shared Redis set.

Run as ``python tests/_lease_worker.py <json options>``; prints one JSON object: for every lease
this process held, the wall-clock time (``time.time()``, one clock for every process on the host)
just after ``acquire`` returned and just before ``release`` was sent, so the recorded interval
lies inside the interval the lease was really held. Options: ``url``, ``prefix``, ``name``,
``capacity``, ``ttl``, ``seconds``, ``tasks``, ``hold`` (seconds each lease is held),
``backend`` (``asyncio`` or ``trio``). It starts when the parent releases it (:mod:`_together`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio

from _together import released
from resilient_voice import CallLeases, CapacityExhaustedError
from resilient_voice.redis import RedisBackend


async def run(options: dict[str, Any]) -> dict[str, Any]:
    held: list[tuple[float, float]] = []
    refused = 0
    async with RedisBackend.from_url(options["url"], prefix=options["prefix"], timeout=1.0) as b:
        leases = CallLeases(options["name"], options["capacity"], ttl=options["ttl"], store=b)
        await b.client.ping()  # connected
        stop = await released() + options["seconds"]

        async def worker(index: int) -> None:
            nonlocal refused
            calls = 0
            while time.time() < stop:
                try:
                    lease = await leases.acquire(timeout=max(0.01, stop - time.time()))
                except CapacityExhaustedError:
                    refused += 1
                    continue
                got = time.time()
                calls += 1
                lease = await leases.bind(lease, f"{options['name']}-{index}-{calls}-{got}")
                await anyio.sleep(options["hold"])
                held.append((got, time.time()))
                if calls % 2:
                    await lease.release()
                else:
                    assert lease.call_id is not None
                    await leases.release(lease.call_id, generation=lease.generation)

        async with anyio.create_task_group() as tasks:
            for index in range(options["tasks"]):
                tasks.start_soon(worker, index)
        stats = leases.statistics()
    return {"held": held, "refused": refused, "acquired": stats.acquired}


if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    result = anyio.run(run, given, backend=given.get("backend", "asyncio"))
    sys.stdout.write(json.dumps(result))
