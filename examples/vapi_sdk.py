"""The official Vapi SDK (``vapi-server-sdk``) made resilient, against a local fake Vapi.

The recipe: give ``AsyncVapi`` an httpx client from ``sdk_http_client()`` (a breaker, retries
that never dial twice), pass ``request_options=no_sdk_retries()`` on every call so the SDK's own
retries (which re-send ``POST /call`` on any 5xx) stay off, and plant an attempt id in the call's
metadata with ``attempt_overrides()`` so an unknown outcome can be reconciled. Against a fake
Vapi (``FakeTelephony``, on loopback) the script places one call normally, then one whose
response is lost after the call was created: ``OutcomeUnknownError``, no second ``POST /call``,
and ``VapiClient.reconcile_call`` finds the call by its planted attempt id.

The SDK builds its models on the first use of ``client.calls``: expect several seconds there.

Run: ``python examples/vapi_sdk.py`` (needs ``pip install vapi-server-sdk``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
from vapi import AsyncVapi

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_voice import OutcomeUnknownError
from resilient_voice.testing import FakeTelephony, Fault, serve
from resilient_voice.vapi import VapiClient, attempt_overrides, no_sdk_retries, sdk_http_client

KEY = "example-vapi-private-key"


async def main() -> tuple[int, dict[str, int]]:
    """Place two calls through the SDK; return the POST /call count and calls per number."""
    fake = FakeTelephony(vapi_api_keys=[KEY], status_callbacks=False)
    async with serve(fake) as url:
        # In production these ids are configuration; the fake creates one of each.
        assistant_id = fake.vapi_assistants()[0]["id"]
        phone_number_id = fake.vapi_phone_numbers()[0]["id"]
        http = sdk_http_client(base_url=url)  # built once; the SDK does not close it
        client = AsyncVapi(token=KEY, base_url=url, httpx_client=http)
        # The typed client, also built once, reconciles by the planted attempt id.
        async with http, VapiClient(KEY, base_url=url) as vapi:
            call = await client.calls.create(
                assistant_id=assistant_id,
                phone_number_id=phone_number_id,
                customer={"number": "+14155550100"},
                request_options=no_sdk_retries(),  # on every call
            )
            print(f"1. placed {call.id} ({call.status})")

            fake.faults = [Fault.drop_after(count=1, endpoints="vapi.calls.create")]
            attempt_id, overrides = attempt_overrides({"variableValues": {"name": "Ada"}})
            try:
                await client.calls.create(
                    assistant_id=assistant_id,
                    phone_number_id=phone_number_id,
                    customer={"number": "+14155550101"},
                    assistant_overrides=overrides,
                    request_options=no_sdk_retries(),
                )
            except OutcomeUnknownError:
                print(f"2. response lost: OutcomeUnknownError, not re-sent (attempt {attempt_id})")
                found = await vapi.reconcile_call(attempt_id)
                verdict = "placed, do not call again" if found else "not placed"
                print(f"   reconciled: {found.id if found else None}: {verdict}")

    created: dict[str, int] = {}
    for record in fake.calls("vapi"):
        created[record.to] = created.get(record.to, 0) + 1
    posts = len(fake.requests("vapi.calls.create"))
    print(f"upstream: POST /call received {posts} times, calls per number {created}")
    return posts, created


if __name__ == "__main__":
    anyio.run(main)
