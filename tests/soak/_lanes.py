"""The four lanes of the outbound soak, built against one served FakeTelephony.

Each lane has its own breaker (logged), retry policy and pacing; the two Twilio lanes use two
accounts of the fake so that each account's CPS is measured on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import vapi
from _soak import (
    FROM,
    SID,
    TIMEOUT,
    TOKEN,
    TWIML,
    VAPI_KEY,
    BreakerLog,
    Job,
    Lane,
    breaker,
    retry,
    since,
    vapi_policies,
)
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client
from vapi.core.api_error import ApiError

from resilient_voice.testing import FakeTelephony
from resilient_voice.twilio import ResilientTwilioHttpClient, TwilioClient
from resilient_voice.vapi import VapiClient, attempt_overrides, no_sdk_retries, sdk_http_client


def fake_telephony(twilio_cps: float, seed: int = 19) -> FakeTelephony:
    from _soak import CPS_TOLERANCE

    accounts = {SID["twilio-typed"], SID["twilio-sdk"], SID["latency"], SID["fleet"]}
    cps = dict.fromkeys(accounts, twilio_cps)
    cps[SID["latency"]] = 1e6  # the latency lane measures the library, not pacing
    return FakeTelephony(
        seed=seed,
        twilio_accounts=dict.fromkeys(accounts, TOKEN),
        vapi_api_keys=[VAPI_KEY],
        calls_per_second=cps,
        cps_tolerance=CPS_TOLERANCE,
        call_duration=0.05,
        status_callbacks=False,
        vapi_concurrency_limit=1_000_000,
    )


@asynccontextmanager
async def lanes(
    fake: FakeTelephony, url: str, *, twilio_cps: float, vapi_cps: float, workers: int
) -> AsyncIterator[dict[str, Lane]]:
    """The four lanes, open for the duration of the block."""
    async with AsyncExitStack() as stack:
        built: dict[str, Lane] = {}

        log = BreakerLog("twilio-typed")
        typed = await stack.enter_async_context(
            TwilioClient(
                SID["twilio-typed"],
                TOKEN,
                base_url=url,
                calls_per_second=twilio_cps,
                breaker=breaker("twilio-typed", log),
                retry=retry("twilio-typed"),
                timeout=TIMEOUT,
            )
        )

        async def typed_create(job: Job) -> tuple[str, str | None]:
            call = await typed.create_call(to=job.number, from_=FROM, url=TWIML)
            return "placed", call.sid

        async def twilio_reconcile(client: TwilioClient, job: Job) -> str | None:
            found = await client.reconcile_call(to=job.number, since=since(job))
            return found[0].sid if found else None

        built["twilio-typed"] = Lane(
            "twilio-typed",
            "twilio",
            typed_create,
            lambda job: twilio_reconcile(typed, job),
            log,
            workers,
        )

        log = BreakerLog("twilio-sdk")
        http_client = ResilientTwilioHttpClient(
            base_url=url,
            calls_per_second=twilio_cps,
            breaker=breaker("twilio-sdk", log),
            retry=retry("twilio-sdk"),
            timeout=TIMEOUT,
            account_label="soak-sdk",
        )
        stack.push_async_callback(http_client.close)
        sdk = Client(SID["twilio-sdk"], TOKEN, http_client=http_client)
        # The SDK has no reconciliation: the typed client reads the same account.
        sdk_reader = await stack.enter_async_context(
            TwilioClient(SID["twilio-sdk"], TOKEN, base_url=url, retry=retry("sdk-reader"))
        )

        async def sdk_create(job: Job) -> tuple[str, str | None]:
            call = await sdk.calls.create_async(to=job.number, from_=FROM, url=TWIML)
            return "placed", str(call.sid)

        built["twilio-sdk"] = Lane(
            "twilio-sdk",
            "twilio",
            sdk_create,
            lambda job: twilio_reconcile(sdk_reader, job),
            log,
            workers,
            definite=(TwilioRestException,),
        )

        assistant = fake.vapi_assistants()[0]["id"]
        phone = fake.vapi_phone_numbers()[0]["id"]

        log = BreakerLog("vapi-typed")
        vapi_typed = await stack.enter_async_context(
            VapiClient(
                VAPI_KEY,
                base_url=url,
                policies=vapi_policies("vapi-typed", log, vapi_cps),
                timeout=TIMEOUT,
            )
        )

        async def vapi_create(job: Job) -> tuple[str, str | None]:
            call = await vapi_typed.create_call(
                assistant_id=assistant, phone_number_id=phone, customer_number=job.number
            )
            return "placed", call.id

        async def vapi_reconcile(job: Job) -> str | None:
            assert job.attempt_id is not None
            found = await vapi_typed.reconcile_call(
                job.attempt_id, created_after=since(job), limit=1000
            )
            return None if found is None else found.id

        built["vapi-typed"] = Lane(
            "vapi-typed", "vapi", vapi_create, vapi_reconcile, log, max(workers // 2, 2)
        )

        log = BreakerLog("vapi-sdk")
        sdk_http = sdk_http_client(
            base_url=url, policies=vapi_policies("vapi-sdk", log, vapi_cps), timeout=TIMEOUT
        )
        stack.push_async_callback(sdk_http.aclose)
        vapi_sdk = vapi.AsyncVapi(token=VAPI_KEY, base_url=url, httpx_client=sdk_http)
        # The SDK builds its pydantic models on first access to ``calls`` (some 30 s on a
        # loaded 2-core machine, once per process): pay it here, not inside a phase.
        await anyio.to_thread.run_sync(lambda: vapi_sdk.calls)

        async def vapi_sdk_create(job: Job) -> tuple[str, str | None]:
            # The SDK builds its own body: plant the attempt id that reconciliation looks for.
            job.attempt_id, overrides = attempt_overrides()
            call: Any = await vapi_sdk.calls.create(
                assistant_id=assistant,
                phone_number_id=phone,
                customer={"number": job.number},
                assistant_overrides=overrides,
                request_options=no_sdk_retries(),
            )
            return "placed", str(call.id)

        built["vapi-sdk"] = Lane(
            "vapi-sdk",
            "vapi",
            vapi_sdk_create,
            vapi_reconcile,
            log,
            max(workers // 2, 2),
            definite=(ApiError,),
        )
        yield built
