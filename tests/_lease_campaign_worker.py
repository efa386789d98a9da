"""One replica of the two-process client campaign: a TwilioClient whose leases live in Redis.

Run as ``python tests/_lease_campaign_worker.py <json options>``; places ``calls`` calls to the
fake at ``fake_url`` from ``tasks`` concurrent callers, every call holding a lease of the shared
set (released by the webhook receiver at ``hook_url``, a third process's job), and prints one
JSON object: how many calls were created and how many creates failed. Options: ``url``
(Redis), ``prefix``, ``name``, ``capacity``, ``ttl``, ``sid``, ``token``, ``fake_url``,
``hook_url``, ``calls``, ``first`` (the first destination number), ``tasks``, ``backend``
(``asyncio`` or ``trio``). It starts when the parent releases it (:mod:`_together`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

from _together import released
from resilient_voice import CallLeases
from resilient_voice.redis import RedisBackend
from resilient_voice.twilio import TwilioClient


async def run(options: dict[str, Any]) -> dict[str, Any]:
    created: list[str] = []
    failed: list[str] = []
    async with RedisBackend.from_url(options["url"], prefix=options["prefix"], timeout=1.0) as b:
        leases = CallLeases(options["name"], options["capacity"], ttl=options["ttl"], store=b)
        client = TwilioClient(
            options["sid"],
            options["token"],
            base_url=options["fake_url"],
            calls_per_second=1000.0,
            leases=leases,
        )
        numbers = iter(range(options["first"], options["first"] + options["calls"]))

        async def worker() -> None:
            for i in numbers:
                try:
                    call = await client.create_call(
                        to=f"+1555{i:07d}",
                        from_="+14155550199",
                        url="https://example.com/twiml",
                        status_callback=f"{options['hook_url']}/twilio/status",
                    )
                except Exception as exc:  # reported, then asserted on
                    failed.append(f"{type(exc).__name__}: {exc}")
                else:
                    created.append(call.sid)

        async with client:
            await b.client.ping()  # connected
            await released()
            async with anyio.create_task_group() as group:
                for _ in range(options["tasks"]):
                    group.start_soon(worker)
    return {"created": created, "failed": failed}


if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    result = anyio.run(run, given, backend=given.get("backend", "asyncio"))
    sys.stdout.write(json.dumps(result))
