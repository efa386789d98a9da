"""One process of the 3-process outbound soak: creates on a shared account, paced through Redis.

Run as ``python tests/soak/_fleet_worker.py <json options>`` (options: ``url``, ``redis``,
``prefix``, ``sid``, ``token``, ``worker``, ``count``, ``cps``, ``tasks``, ``backend``); prints
``{"jobs": [...], "unexpected": [...]}``. It starts when the parent releases it (:mod:`_together`,
in tests/). The limiter and the breaker share the Redis store, so the three processes pace the
account together and share the fleet view.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from _soak import (
    FROM,
    TWIML,
    BreakerLog,
    Job,
    Lane,
    breaker,
    dump_jobs,
    number_of,
    retry,
    run_lane_jobs,
)

from _together import released
from resilient_voice.redis import RedisBackend
from resilient_voice.twilio import TwilioClient


async def run(options: dict[str, Any]) -> dict[str, Any]:
    worker = int(options["worker"])
    async with RedisBackend.from_url(options["redis"], prefix=options["prefix"], timeout=1.0) as b:
        log = BreakerLog(f"fleet-{worker}")
        shared = breaker("fleet", log, window_duration=5.0, minimum_calls=10, store=b)
        async with TwilioClient(
            options["sid"],
            options["token"],
            base_url=options["url"],
            calls_per_second=options["cps"],
            breaker=shared,
            retry=retry(f"fleet-{worker}"),
            timeout=1.0,
            store=b,
        ) as client:

            async def create(job: Job) -> tuple[str, str | None]:
                call = await client.create_call(to=job.number, from_=FROM, url=TWIML)
                return "placed", call.sid

            lane = Lane("fleet", "twilio", create, None, log, int(options["tasks"]))  # type: ignore[arg-type]
            lane.jobs = [
                Job("fleet", i, number_of("fleet", i, worker)) for i in range(options["count"])
            ]
            await b.client.ping()  # connected
            await released()
            await run_lane_jobs(lane, lane.jobs)
    return {"jobs": dump_jobs(lane.jobs), "unexpected": lane.unexpected}


def main() -> None:
    options = json.loads(sys.argv[1])
    result = anyio.run(run, options, backend=options.get("backend", "asyncio"))
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
