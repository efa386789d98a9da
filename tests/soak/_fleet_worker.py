"""One process of the 3-process outbound soak: creates on a shared account, paced through Redis.

Run as ``python tests/soak/_fleet_worker.py <json options>`` (options: ``url``, ``redis``,
``prefix``, ``sid``, ``token``, ``worker``, ``count``, ``cps``, ``tasks``, ``backend``, and for
the Vapi lane ``vapi_key``, ``vapi_count``, ``vapi_cps``, ``assistant``, ``phone``); prints
``{"jobs": [...], "unexpected": [...], "vapi_jobs": [...], "vapi_unexpected": [...]}``. It starts
when the parent releases it (:mod:`_together`, in tests/). The limiter and the breaker share the
Redis store, so the three processes pace the Twilio account, and the Vapi org, together and share
the fleet view. The two lanes run side by side, each on its own pacing.
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
from resilient_voice.vapi import VapiClient


async def run(options: dict[str, Any]) -> dict[str, Any]:
    worker = int(options["worker"])
    async with RedisBackend.from_url(options["redis"], prefix=options["prefix"], timeout=1.0) as b:
        log = BreakerLog(f"fleet-{worker}")
        shared = breaker("fleet", log, window_duration=5.0, minimum_calls=10, store=b)
        async with (
            TwilioClient(
                options["sid"],
                options["token"],
                base_url=options["url"],
                calls_per_second=options["cps"],
                breaker=shared,
                retry=retry(f"fleet-{worker}"),
                timeout=1.0,
                store=b,
            ) as client,
            VapiClient(
                options["vapi_key"],
                base_url=options["url"],
                calls_per_second=options["vapi_cps"],
                timeout=1.0,
                store=b,
            ) as vapi_client,
        ):

            async def create(job: Job) -> tuple[str, str | None]:
                call = await client.create_call(to=job.number, from_=FROM, url=TWIML)
                return "placed", call.sid

            lane = Lane("fleet", "twilio", create, None, log, int(options["tasks"]))  # type: ignore[arg-type]
            lane.jobs = [
                Job("fleet", i, number_of("fleet", i, worker)) for i in range(options["count"])
            ]

            async def vapi_create(job: Job) -> tuple[str, str | None]:
                call = await vapi_client.create_call(
                    assistant_id=options["assistant"],
                    phone_number_id=options["phone"],
                    customer_number=job.number,
                )
                return "placed", call.id

            vapi_lane = Lane(
                "fleet-vapi",
                "vapi",
                vapi_create,
                None,  # type: ignore[arg-type]
                BreakerLog(f"fleet-vapi-{worker}"),
                int(options["tasks"]),
            )
            vapi_lane.jobs = [
                Job("fleet-vapi", i, number_of("fleet-vapi", i, worker))
                for i in range(options["vapi_count"])
            ]
            await b.client.ping()  # connected
            await released()
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_lane_jobs, lane, lane.jobs)
                tg.start_soon(run_lane_jobs, vapi_lane, vapi_lane.jobs)
    return {
        "jobs": dump_jobs(lane.jobs),
        "unexpected": lane.unexpected,
        "vapi_jobs": dump_jobs(vapi_lane.jobs),
        "vapi_unexpected": vapi_lane.unexpected,
    }


def main() -> None:
    options = json.loads(sys.argv[1])
    result = anyio.run(run, options, backend=options.get("backend", "asyncio"))
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
