"""The official twilio SDK, made resilient by ``ResilientTwilioHttpClient``, against a local fake.

Keep your ``twilio.rest.Client`` code and give it the adapter as its ``http_client``: every
request then goes through one breaker per account, pacing at the account's calls per second,
and retries that never place a call twice. Against a fake Twilio (``FakeTelephony``, on
loopback) the script shows three calls:

1. a normal ``calls.create_async``;
2. one answered 429 (Twilio's 20429: not processed), retried after ``Retry-After``: one call;
3. one whose response is lost after Twilio created the call: ``OutcomeUnknownError`` instead of
   a second POST, then ``calls.list_async`` finds the call that was placed.

Run: ``python examples/twilio_sdk.py`` (needs ``pip install 'resilient-voice[twilio]'``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
from twilio.rest import Client

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_voice import OutcomeUnknownError
from resilient_voice.testing import FakeTelephony, Fault, serve
from resilient_voice.twilio import ResilientTwilioHttpClient

SID, TOKEN = "AC" + "0" * 32, "example-auth-token"
CALLER, TWIML = "+15005550006", "https://example.com/twiml"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the upstream saw for each destination: POSTs received and calls created."""

    requests: dict[str, int]
    calls: dict[str, int]


async def main(*, calls_per_second: float = 5.0, retry_after: float = 1.0) -> Outcome:
    fake = FakeTelephony(
        twilio_accounts={SID: TOKEN}, calls_per_second=calls_per_second, status_callbacks=False
    )
    async with serve(fake) as url:
        # Built once and shared, like the SDK client itself. base_url points it at the fake.
        http_client = ResilientTwilioHttpClient(base_url=url, calls_per_second=calls_per_second)
        client = Client(SID, TOKEN, http_client=http_client)
        async with http_client:
            call = await client.calls.create_async(to="+15550100001", from_=CALLER, url=TWIML)
            print(f"1. placed {call.sid} ({call.status})")

            fake.faults = [
                Fault.rate_limited(count=1, retry_after=retry_after, endpoints="*.calls.create")
            ]
            call = await client.calls.create_async(to="+15550100002", from_=CALLER, url=TWIML)
            print(f"2. 429 first, retried after Retry-After, then placed {call.sid}")

            fake.faults = [Fault.drop_after(count=1, endpoints="*.calls.create")]
            try:
                await client.calls.create_async(to="+15550100003", from_=CALLER, url=TWIML)
            except OutcomeUnknownError as exc:
                print(
                    f"3. response lost: OutcomeUnknownError, attempt {exc.attempt_id}, not re-sent"
                )
                found = await client.calls.list_async(to="+15550100003", limit=5)
                print(f"   reconciled: Twilio has {[c.sid for c in found]}, so do not call again")

    requests: dict[str, int] = {}
    for request in fake.requests("twilio.calls.create"):
        to = request.form["To"][0]
        requests[to] = requests.get(to, 0) + 1
    calls: dict[str, int] = {}
    for created in fake.calls("twilio"):
        calls[created.to] = calls.get(created.to, 0) + 1
    print(f"upstream: POSTs per number {requests}, calls per number {calls}")
    return Outcome(requests, calls)


if __name__ == "__main__":
    anyio.run(main)
