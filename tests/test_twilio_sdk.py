"""The official twilio SDK through ResilientTwilioHttpClient, against FakeTelephony."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from _raw_upstream import Mode, raw_upstream
from resilient_voice import OutcomeUnknownError, RetryPolicy, correlation_scope
from resilient_voice.events import Event, RequestFinished
from resilient_voice.policy import Policy
from resilient_voice.testing import FakeTelephony, Fault, serve
from resilient_voice.twilio import ResilientTwilioHttpClient

SID = "AC" + "1" * 32
TOKEN = "secret-token-value"
FROM = "+15005550006"
TWIML_URL = "https://example.com/twiml"


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTelephony, str]]:
    app = FakeTelephony(twilio_accounts={SID: TOKEN}, calls_per_second=2000.0)
    async with serve(app) as url:
        yield app, url


def sdk(url: str, **options: Any) -> tuple[Client, ResilientTwilioHttpClient]:
    options.setdefault("calls_per_second", 2000.0)
    options.setdefault("messages_per_second", 2000.0)
    options.setdefault("retry", RetryPolicy(base_delay=0.001, max_delay=0.1))
    http_client = ResilientTwilioHttpClient(base_url=url, **options)
    return Client(SID, TOKEN, http_client=http_client), http_client


async def test_sdk_calls_and_messages_go_through_the_adapter(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    routes: list[str] = []

    def record(event: Event) -> None:
        if isinstance(event, RequestFinished):
            routes.append(event.route)

    client, http_client = sdk(url, listeners=[record])
    async with http_client:
        with correlation_scope("sdk-req-1"):
            call = await client.calls.create_async(to="+15550100001", from_=FROM, url=TWIML_URL)
        assert call.sid.startswith("CA")
        fetched = await client.calls(call.sid).fetch_async()
        assert fetched.to == "+15550100001"
        message = await client.messages.create_async(to="+15550100002", from_=FROM, body="hi")
        assert message.sid.startswith("SM")
        assert http_client.last_response is not None
        assert http_client.last_response.status_code in (200, 201)
        assert TOKEN not in repr(http_client.last_request.auth)
    (create,) = app.requests("twilio.calls.create")
    assert create.headers["x-correlation-id"] == "sdk-req-1"
    assert create.auth_user == SID
    assert routes == ["twilio.calls.create", "twilio.read", "twilio.messages.create"]


async def test_sdk_create_that_may_have_been_processed_is_not_resent(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    client, http_client = sdk(url)
    async with http_client:
        app.faults = [Fault.drop_after(count=1, endpoints="twilio.calls.create")]
        with pytest.raises(OutcomeUnknownError):
            await client.calls.create_async(to="+15550100003", from_=FROM, url=TWIML_URL)
        app.faults = [Fault.burst(1, status=500, endpoints="twilio.calls.create")]
        with pytest.raises(OutcomeUnknownError):
            await client.calls.create_async(to="+15550100004", from_=FROM, url=TWIML_URL)
    assert len(app.requests("twilio.calls.create")) == 2
    assert [c.to for c in app.calls()] == ["+15550100003"]
    assert app.duplicate_destinations() == {}


async def test_sdk_sees_twilio_errors_and_retried_429s(fake: tuple[FakeTelephony, str]) -> None:
    app, url = fake
    client, http_client = sdk(url)
    async with http_client:
        with pytest.raises(TwilioRestException) as info:
            await client.calls.create_async(
                to="+15550100005", from_="sip:x@example.com", url=TWIML_URL
            )
        assert info.value.code == 21212
        app.faults = [
            Fault.rate_limited(retry_after=0.01, count=1, endpoints="twilio.messages.create")
        ]
        await client.messages.create_async(to="+15550100006", from_=FROM, body="hi")
    assert len(app.requests("twilio.messages.create")) == 2
    assert len(app.messages()) == 1


async def test_sdk_adapter_options_and_logging(
    fake: tuple[FakeTelephony, str], caplog: pytest.LogCaptureFixture
) -> None:
    _app, url = fake
    mine = Policy()
    http_client = ResilientTwilioHttpClient(mine, base_url=url)
    assert all(p is mine for p in http_client.policies.values())
    assert http_client.is_async
    client = Client(SID, TOKEN, http_client=http_client)
    with caplog.at_level(logging.INFO, logger="resilient_voice.twilio.sdk"):
        async with http_client:
            await client.calls.list_async(limit=1)
    assert "Twilio API Request" in caplog.text
    assert TOKEN not in caplog.text
    with pytest.raises(ValueError, match="base_url"):
        ResilientTwilioHttpClient(base_url="localhost")
    with pytest.raises(ValueError, match="unknown operation"):
        ResilientTwilioHttpClient(policies={"calls": mine})
    assert repr(http_client).endswith(f"base_url='{url}')")


@pytest.mark.parametrize("stall", [False, True])
async def test_sdk_create_whose_201_body_is_lost_is_an_unknown_outcome(
    fake: tuple[FakeTelephony, str], stall: bool
) -> None:
    """The SDK's calls.create_async: 201 and headers arrive, the body never does. The
    adapter's transport reads it inside the attempt, so the SDK caller gets
    OutcomeUnknownError (not a raw httpx error it might retry) and nothing is re-sent."""
    app, url = fake
    app.faults = [Fault.drop_mid_body(stall=stall, endpoints="twilio.calls.create")]
    client, http_client = sdk(url, timeout=0.5)
    async with http_client:
        with pytest.raises(OutcomeUnknownError) as info:
            await client.calls.create_async(to="+15550100007", from_=FROM, url=TWIML_URL)
    assert info.value.attempt_id
    (record,) = app.requests("twilio.calls.create")
    assert (record.status, record.fault) == (201, "drop_mid_body")
    assert len(app.calls()) == 1


@pytest.mark.parametrize("mode", ["drop", "stall"])
async def test_sdk_create_cut_mid_body_by_a_raw_server_is_an_unknown_outcome(mode: Mode) -> None:
    body = json.dumps({"sid": "CA" + "0" * 32, "status": "queued"}).encode()
    async with raw_upstream(body, mode=mode) as upstream:
        client, http_client = sdk(upstream.url, timeout=0.5)
        async with http_client:
            with pytest.raises(OutcomeUnknownError):
                await client.calls.create_async(to="+15550100008", from_=FROM, url=TWIML_URL)
    assert [r.method for r in upstream.requests] == ["POST"]
