"""One process of the 3-process leased soak: leased creates on one account, leases in Redis.

Run as ``python tests/soak/_leased_fleet_worker.py <json options>`` (options: ``url``, ``hook``,
``redis``, ``prefix``, ``sid``, ``token``, ``worker``, ``count``, ``cps``, ``capacity``,
``ttl``, ``tasks``, ``period``, ``start_at``, ``backend``). The account's pacing and its
``CallLeases`` live in the shared Redis; the webhook receiver (the parent) releases the leases.
This process runs ``reconcile_leases()`` every ``period`` seconds, as each replica's periodic
job would, and at the end until none of its own unknown outcomes is left (any replica settles
any replica's, from the context stored with the mark; waiting for its own is what it can
count on). Prints ``{"jobs", "unexpected",
"acquired", "releases", "reconcile_failures", "unsettled"}``: ``releases`` lists
``[lease_id, reason]`` for every release this process made.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
from _leased import EVENTS, SETTLE, SETTLE_AFTER, LeaseLedger
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

from resilient_voice import CallLeases, ResilientVoiceError
from resilient_voice.events import Event, LeaseReleased
from resilient_voice.redis import RedisBackend
from resilient_voice.twilio import TwilioClient


async def run(options: dict[str, Any]) -> dict[str, Any]:
    worker = int(options["worker"])
    ledger = LeaseLedger()
    releases: list[list[str]] = []

    def heard(event: Event) -> None:
        ledger(event)
        if isinstance(event, LeaseReleased):
            releases.append([event.lease_id, event.reason])

    failures = 0
    async with RedisBackend.from_url(options["redis"], prefix=options["prefix"], timeout=1.0) as b:
        leases = CallLeases(
            "fleet-leased", options["capacity"], ttl=options["ttl"], store=b, listeners=[heard]
        )
        log = BreakerLog(f"leased-{worker}")
        async with TwilioClient(
            options["sid"],
            options["token"],
            base_url=options["url"],
            calls_per_second=options["cps"],
            breaker=breaker(f"leased-{worker}", log),
            retry=retry(f"leased-{worker}"),
            timeout=1.0,
            store=b,
            leases=leases,
        ) as client:

            async def create(job: Job) -> tuple[str, str | None]:
                call = await client.create_call(
                    to=job.number,
                    from_=FROM,
                    url=TWIML,
                    status_callback=f"{options['hook']}/twilio/status",
                    status_callback_event=EVENTS,
                )
                return "placed", call.sid

            async def reconcile_leases() -> None:
                nonlocal failures
                try:
                    await client.reconcile_leases(settle_after=SETTLE_AFTER)
                except ResilientVoiceError:
                    failures += 1

            async def every(period: float) -> None:
                while True:
                    await anyio.sleep(period)
                    await reconcile_leases()

            lane = Lane("twilio-leased", "twilio", create, None, log, int(options["tasks"]))  # type: ignore[arg-type]
            lane.jobs = [
                Job("twilio-leased", i, number_of("twilio-leased", i, worker))
                for i in range(options["count"])
            ]
            await anyio.sleep(max(0.0, options["start_at"] - time.time()))
            async with anyio.create_task_group() as group:
                group.start_soon(every, float(options["period"]))
                await run_lane_jobs(lane, lane.jobs)
                group.cancel_scope.cancel()
            mine = {job.attempt_id for job in lane.jobs if job.outcome == "unknown"}
            await anyio.sleep(SETTLE)  # the last calls end, their webhooks arrive
            # An unknown outcome with no call is released SETTLE_AFTER after its mark.
            deadline = time.monotonic() + SETTLE_AFTER + 10.0
            while True:
                await reconcile_leases()
                left = [u for u in await leases.unknown() if u.attempt_id in mine]
                if not left or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.1)
    return {
        "jobs": dump_jobs(lane.jobs),
        "unexpected": lane.unexpected,
        "acquired": sorted(ledger.acquired),
        "most_in_use": ledger.most_in_use,
        "releases": releases,
        "reconcile_failures": failures,
        "unsettled": len(left),
    }


def main() -> None:
    options = json.loads(sys.argv[1])
    result = anyio.run(run, options, backend=options.get("backend", "asyncio"))
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
