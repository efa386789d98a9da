"""FakeTelephony in-process (httpx's ASGI transport, on a ManualClock where time matters), and
serve() with the faults that need sockets over real loopback HTTP; on both backends.

A few tests run both ways (``via``) so the loopback path keeps a smoke test of each surface.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import httpx
import pytest
from twilio.request_validator import RequestValidator

from resilient_voice.testing import (
    CallbackFaults,
    FakeTelephony,
    Fault,
    ManualClock,
    serve,
)
from resilient_voice.testing._fake import ENDPOINTS
from resilient_voice.testing._serve import DropConnectionError

# One TLS context for every client: httpx builds a new one (about 100 ms) otherwise.
TLS = ssl.create_default_context()
SRC = str(Path(__file__).resolve().parents[1] / "src")
AC = "AC" + "1" * 32
AC2 = "AC" + "2" * 32
TOKEN = "auth-token-1"
SK = "SK" + "3" * 32
SK_SECRET = "key-secret"
VAPI_KEY = "vapi-private-key"
CALLS = f"/2010-04-01/Accounts/{AC}/Calls.json"
MESSAGES = f"/2010-04-01/Accounts/{AC}/Messages.json"
TO = "+14155550100"
FROM = "+14155550199"
CALL_FORM = {"To": TO, "From": FROM, "Url": "https://example.com/twiml"}
VAPI_AUTH = {"Authorization": f"Bearer {VAPI_KEY}"}
HOOKS = "http://hooks.test"  # the in-process webhook receiver's origin
IN_PROCESS, LOOPBACK = "in-process", "loopback"


def make_fake(**kwargs: Any) -> FakeTelephony:
    options: dict[str, Any] = {
        "twilio_accounts": {AC: TOKEN, AC2: "other-token"},
        "twilio_api_keys": {SK: (AC, SK_SECRET)},
        "vapi_api_keys": [VAPI_KEY],
        "calls_per_second": 1000.0,
        "call_duration": 0.05,
    }
    options.update(kwargs)
    return FakeTelephony(**options)


@asynccontextmanager
async def running(
    fake: FakeTelephony, *, webhooks: Receiver | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The fake in this test's event loop; its webhooks go to ``webhooks`` at ``HOOKS``."""
    hooks = None if webhooks is None else httpx.ASGITransport(app=webhooks)
    async with (
        fake.running(webhook_transport=hooks),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=fake), base_url="http://fake.test", timeout=5.0
        ) as client,
    ):
        yield client


@asynccontextmanager
async def over_loopback(fake: FakeTelephony) -> AsyncIterator[httpx.AsyncClient]:
    """The fake behind ``serve``, for what only real sockets show (drops, stalls, refusals)."""
    async with (
        serve(fake) as url,
        httpx.AsyncClient(base_url=url, timeout=5.0, verify=TLS) as client,
    ):
        yield client


@asynccontextmanager
async def hooked(
    via: str, fake: FakeTelephony, receiver: Receiver
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client of the fake and the receiver's URL, in-process or over loopback."""
    if via == IN_PROCESS:
        async with running(fake, webhooks=receiver) as client:
            yield client, HOOKS
    else:
        async with serve(receiver) as hook_url, over_loopback(fake) as client:
            yield client, hook_url


def clock_for(via: str) -> ManualClock | None:
    return ManualClock() if via == IN_PROCESS else None


async def pass_time(clock: ManualClock | None, seconds: float) -> None:
    """Advance the fake's ManualClock, or sleep for real when it runs on the system clock."""
    if clock is None:
        await anyio.sleep(seconds)
    else:
        clock.advance(seconds)


def connect(via: str, fake: FakeTelephony) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return running(fake) if via == IN_PROCESS else over_loopback(fake)


def create_call(client: httpx.AsyncClient, **extra: str) -> Any:
    return client.post(CALLS, data={**CALL_FORM, **extra}, auth=(AC, TOKEN))


@dataclass
class Receiver:
    """A tiny ASGI webhook receiver that keeps what it got."""

    received: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    status: int = 204

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append((scope["path"], scope["query_string"].decode(), headers, body))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, count: int, timeout: float = 3.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.received) < count:
                await anyio.sleep(0.01)


@pytest.mark.slow
def test_import_stays_light() -> None:
    code = (
        "import sys, json, resilient_voice.testing as t; t.FakeTelephony; t.Fault;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'httpx','pydantic','twilio','uvicorn','starlette'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC},
    ).stdout
    assert json.loads(out) == []


def test_endpoint_names() -> None:
    assert set(ENDPOINTS) == {
        "twilio.calls.create",
        "twilio.calls.list",
        "twilio.calls.fetch",
        "twilio.calls.update",
        "twilio.messages.create",
        "twilio.messages.fetch",
        "vapi.calls.create",
        "vapi.calls.list",
        "vapi.calls.get",
        "vapi.assistants.list",
        "vapi.assistants.get",
        "vapi.assistants.update",
        "vapi.phone_numbers.list",
    }


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"twilio_accounts": {"XX1": "t"}}, ValueError),
        ({"twilio_accounts": {AC: ""}}, ValueError),
        ({"twilio_api_keys": {"SK1": (AC2 + "x", "s")}}, ValueError),
        ({"twilio_api_keys": {"AC1": (AC, "s")}}, ValueError),
        ({"vapi_api_keys": "one-key"}, TypeError),
        ({"calls_per_second": 0}, ValueError),
        ({"calls_per_second": {AC: -1.0}}, ValueError),
        ({"call_duration": float("nan")}, ValueError),
        ({"cps_tolerance": -0.1}, ValueError),
        ({"twilio_concurrency_limit": 0}, ValueError),
        ({"vapi_server_url": "ftp://x"}, ValueError),
        ({"seed": 1.5}, TypeError),
        ({"faults": ["error"]}, TypeError),
        ({"clock": 0.0}, TypeError),
    ],
)
def test_invalid_configuration_fails_at_construction(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make_fake(**kwargs)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Fault("nope"),  # type: ignore[arg-type]
        lambda: Fault.error_rate(1.5),
        lambda: Fault.error_rate(0.5, status=404),
        lambda: Fault.outage(2.0, 1.0),
        lambda: Fault.burst(0),
        lambda: Fault.latency(0.0),
        lambda: Fault.rate_limited(retry_after=-1),
        lambda: Fault.drop_after(endpoints=[]),
        lambda: Fault.drop_mid_body(1.5),
        lambda: Fault("drop_after", stall=True),
        lambda: Fault("drop_mid_body", reset=True),
        lambda: CallbackFaults(loss=2.0),
    ],
)
def test_invalid_faults_fail_at_construction(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


def test_repr_shows_no_secrets() -> None:
    text = repr(make_fake())
    assert TOKEN not in text
    assert SK_SECRET not in text
    assert VAPI_KEY not in text


@pytest.mark.parametrize("via", [IN_PROCESS, LOOPBACK])
async def test_twilio_create_fetch_list_update_call(via: str) -> None:
    clock = clock_for(via)
    fake = make_fake(**({} if clock is None else {"clock": clock}))
    async with connect(via, fake) as client:
        created = await create_call(client, StatusCallback="https://example.com/cb?rv_cid=x")
        assert created.status_code == 201
        call = created.json()
        assert re.fullmatch(r"CA[0-9a-f]{32}", call["sid"])
        assert call["account_sid"] == AC
        assert (call["to"], call["from"]) == (TO, FROM)
        assert call["to_formatted"] == "(415) 555-0100"
        assert call["status"] == "queued"
        assert call["direction"] == "outbound-api"
        assert call["queue_time"] == "0"
        assert call["uri"] == f"/2010-04-01/Accounts/{AC}/Calls/{call['sid']}.json"
        assert parsedate_to_datetime(call["date_created"]).utcoffset() is not None
        assert created.headers["twilio-request-id"].startswith("RQ")

        fetched = await client.get(call["uri"], auth=(AC, TOKEN))
        assert fetched.status_code == 200
        assert fetched.json()["sid"] == call["sid"]

        await create_call(client, To="+14155550111")
        listed = await client.get(CALLS, params={"To": TO}, auth=(AC, TOKEN))
        assert listed.status_code == 200
        page = listed.json()
        assert [c["sid"] for c in page["calls"]] == [call["sid"]]
        assert page["page_size"] == 50
        assert page["next_page_uri"] is None
        everything = (await client.get(CALLS, params={"PageSize": 1}, auth=(AC, TOKEN))).json()
        assert len(everything["calls"]) == 1
        assert everything["next_page_uri"] is not None
        assert everything["calls"][0]["to"] == "+14155550111"  # newest first

        await pass_time(clock, 0.15)
        done = (await client.get(call["uri"], auth=(AC, TOKEN))).json()
        assert done["status"] == "completed"
        assert done["start_time"] is not None
        assert done["end_time"] is not None
        assert done["duration"] == "0"

    assert fake.calls("twilio")[0].id == call["sid"]
    assert fake.twilio_call(call["sid"]) is not None


async def test_twilio_update_hangs_up_and_cancels() -> None:
    fake = make_fake(call_duration=5.0, calls_per_second={AC: 2.0}, clock=ManualClock())
    async with running(fake) as client:
        first = (await create_call(client)).json()
        queued = (await create_call(client, To="+14155550112")).json()
        hung_up = await client.post(first["uri"], data={"Status": "completed"}, auth=(AC, TOKEN))
        assert hung_up.status_code == 200
        assert hung_up.json()["status"] == "completed"
        canceled = await client.post(queued["uri"], data={"Status": "canceled"}, auth=(AC, TOKEN))
        assert canceled.json()["status"] == "canceled"
        assert canceled.json()["start_time"] is None
        bad = await client.post(first["uri"], data={"Status": "paused"}, auth=(AC, TOKEN))
        assert bad.status_code == 400
        redirect = await client.post(first["uri"], data={"Url": "https://x"}, auth=(AC, TOKEN))
        assert redirect.json()["code"] == 21220


async def test_twilio_messages() -> None:
    fake = make_fake()
    async with running(fake) as client:
        sent = await client.post(
            MESSAGES, data={"To": TO, "From": FROM, "Body": "hello"}, auth=(AC, TOKEN)
        )
        assert sent.status_code == 201
        message = sent.json()
        assert re.fullmatch(r"SM[0-9a-f]{32}", message["sid"])
        assert message["status"] == "queued"
        assert message["num_segments"] == "1"
        assert message["direction"] == "outbound-api"
        fetched = await client.get(message["uri"], auth=(AC, TOKEN))
        assert fetched.json()["body"] == "hello"
        pooled = await client.post(
            MESSAGES,
            data={"To": TO, "MessagingServiceSid": "MG" + "0" * 32, "MediaUrl": "https://x/a.png"},
            auth=(AC, TOKEN),
        )
        assert pooled.json()["sid"].startswith("MM")
        assert pooled.json()["status"] == "accepted"
        assert pooled.json()["num_media"] == "1"
        long_body = await client.post(
            MESSAGES, data={"To": TO, "From": FROM, "Body": "x" * 161}, auth=(AC, TOKEN)
        )
        assert long_body.json()["num_segments"] == "2"
    assert [m.to for m in fake.messages()] == [TO, TO, TO]


VALIDATION_CASES = [
    (CALLS, {"From": FROM, "Url": "https://x"}, 21201),
    (CALLS, {"To": TO, "Url": "https://x"}, 21213),
    (CALLS, {"To": "4155550100", "From": FROM, "Url": "https://x"}, 21211),
    (CALLS, {"To": TO, "From": FROM}, 21205),
    (MESSAGES, {"From": FROM, "Body": "x"}, 21604),
    (MESSAGES, {"To": TO, "Body": "x"}, 21603),
    (MESSAGES, {"To": TO, "From": FROM}, 21602),
    (MESSAGES, {"To": TO, "From": FROM, "Body": "x" * 1601}, 21617),
]


async def test_twilio_validation_errors() -> None:
    fake = make_fake()
    async with running(fake) as client:
        for path, form, code in VALIDATION_CASES:
            response = await client.post(path, data=form, auth=(AC, TOKEN))
            assert response.status_code == 400
            assert response.json() == {
                "code": code,
                "message": response.json()["message"],
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": 400,
            }
    assert fake.calls() == []
    assert fake.messages() == []


async def test_twilio_auth() -> None:
    fake = make_fake()
    async with running(fake) as client:
        key_auth = await create_call(client)
        assert key_auth.status_code == 201
        assert (await client.post(CALLS, data=CALL_FORM, auth=(SK, SK_SECRET))).status_code == 201
        for auth in [(AC, "wrong"), (AC2, "other-token"), (SK, "wrong"), ("ACnope", "x")]:
            denied = await client.post(CALLS, data=CALL_FORM, auth=auth)
            assert denied.status_code == 401
            assert denied.json()["code"] == 20003
            assert denied.json()["more_info"] == "https://www.twilio.com/docs/errors/20003"
            assert denied.headers["www-authenticate"].startswith("Basic")
        anonymous = await client.post(CALLS, data=CALL_FORM)
        assert anonymous.status_code == 401
        wrong_account_key = await client.post(
            f"/2010-04-01/Accounts/{AC2}/Calls.json", data=CALL_FORM, auth=(SK, SK_SECRET)
        )
        assert wrong_account_key.status_code == 401
        missing = await client.get(
            f"/2010-04-01/Accounts/{AC}/Calls/CA{'0' * 32}.json", auth=(AC, TOKEN)
        )
        assert missing.status_code == 404
        assert missing.json()["code"] == 20404
        other_account = await client.get(
            f"/2010-04-01/Accounts/{AC2}/Calls/{key_auth.json()['sid']}.json",
            auth=(AC2, "other-token"),
        )
        assert other_account.status_code == 404
        not_allowed = await client.delete(CALLS, auth=(AC, TOKEN))
        assert not_allowed.status_code == 405
    assert len(fake.calls()) == 2
    records = fake.requests("twilio.calls.create")
    assert records[0].auth_user == AC
    assert records[1].auth_user == SK
    assert records[0].headers["authorization"] == "Basic <redacted>"
    assert records[0].form["To"] == (TO,)
    assert records[0].created == key_auth.json()["sid"]


async def test_vapi_endpoints() -> None:
    clock = ManualClock()
    fake = make_fake(clock=clock)
    assistant_id = fake.vapi_assistants()[0]["id"]
    phone_number_id = fake.vapi_phone_numbers()[0]["id"]
    body = {
        "assistantId": assistant_id,
        "phoneNumberId": phone_number_id,
        "customer": {"number": TO},
        "name": "attempt-1",
        "assistantOverrides": {"metadata": {"rv_cid": "cid-1"}},
    }
    async with running(fake) as client:
        created = await client.post("/call", json=body, headers=VAPI_AUTH)
        assert created.status_code == 201
        call = created.json()
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", call["id"]
        )
        assert call["orgId"] == fake.vapi_org_id
        assert call["type"] == "outboundPhoneCall"
        assert call["status"] == "queued"
        assert call["customer"] == {"number": TO}
        assert call["assistantOverrides"]["metadata"] == {"rv_cid": "cid-1"}
        assert call["subscriptionLimits"]["concurrencyBlocked"] is False
        assert call["createdAt"].endswith("Z")

        fetched = await client.get(f"/call/{call['id']}", headers=VAPI_AUTH)
        assert fetched.status_code == 200
        assert fetched.json()["id"] == call["id"]
        assert "subscriptionLimits" not in fetched.json()

        clock.advance(0.01)
        second = (await client.post("/call", json=body, headers=VAPI_AUTH)).json()
        listed = await client.get("/call", headers=VAPI_AUTH)
        assert [c["id"] for c in listed.json()] == [second["id"], call["id"]]
        newer = await client.get(
            "/call", params={"createdAtGt": call["createdAt"]}, headers=VAPI_AUTH
        )
        assert [c["id"] for c in newer.json()] == [second["id"]]
        limited = await client.get("/call", params={"limit": 1}, headers=VAPI_AUTH)
        assert len(limited.json()) == 1
        bad_date = await client.get("/call", params={"createdAtGt": "yesterday"}, headers=VAPI_AUTH)
        assert bad_date.status_code == 400
        by_id = await client.get("/call", params={"id": call["id"]}, headers=VAPI_AUTH)
        assert [c["id"] for c in by_id.json()] == [call["id"]]

        assistants = (await client.get("/assistant", headers=VAPI_AUTH)).json()
        assert [a["id"] for a in assistants] == [assistant_id]
        assistant = (await client.get(f"/assistant/{assistant_id}", headers=VAPI_AUTH)).json()
        assert assistant["orgId"] == fake.vapi_org_id
        patched = await client.patch(
            f"/assistant/{assistant_id}", json={"firstMessage": "Hi"}, headers=VAPI_AUTH
        )
        assert patched.json()["firstMessage"] == "Hi"
        forbidden = await client.patch(
            f"/assistant/{assistant_id}", json={"id": "x"}, headers=VAPI_AUTH
        )
        assert forbidden.status_code == 400
        numbers = (await client.get("/phone-number", headers=VAPI_AUTH)).json()
        assert numbers[0]["id"] == phone_number_id
        assert numbers[0]["provider"] == "twilio"

        clock.advance(0.1)
        ended = (await client.get(f"/call/{call['id']}", headers=VAPI_AUTH)).json()
        assert ended["status"] == "ended"
        assert ended["endedReason"] == "customer-ended-call"
    assert [c.to for c in fake.calls("vapi")] == [TO, TO]
    assert fake.duplicate_destinations("vapi") == {TO: 2}


async def test_vapi_errors() -> None:
    fake = make_fake()
    phone_number_id = fake.vapi_phone_numbers()[0]["id"]
    async with running(fake) as client:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": VAPI_KEY}]:
            denied = await client.get("/call", headers=headers)
            assert denied.status_code == 401
            assert denied.json()["statusCode"] == 401
            assert denied.json()["error"] == "Unauthorized"
        unknown = await client.post(
            "/call",
            json={
                "assistantId": "nope",
                "phoneNumberId": phone_number_id,
                "customer": {"number": TO},
            },
            headers=VAPI_AUTH,
        )
        assert unknown.status_code == 400
        assert "nope" in unknown.json()["message"]
        broken = await client.post(
            "/call", content=b"{", headers={**VAPI_AUTH, "Content-Type": "application/json"}
        )
        assert broken.status_code == 400
        assert isinstance(broken.json()["message"], list)
        missing = await client.get("/call/does-not-exist", headers=VAPI_AUTH)
        assert missing.status_code == 404
        route = await client.get("/nowhere", headers=VAPI_AUTH)
        assert route.status_code == 404
    assert fake.calls() == []


async def test_drop_before_processing_is_a_transport_error_and_creates_nothing() -> None:
    fake = make_fake(faults=[Fault.drop_before(endpoints="twilio.calls.create")])
    async with over_loopback(fake) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await create_call(client)
        fetched = await client.get(CALLS, auth=(AC, TOKEN))  # other endpoints unaffected
        assert fetched.json()["calls"] == []
    assert fake.calls() == []
    (record,) = fake.requests("twilio.calls.create")
    assert (record.status, record.fault, record.created) == (None, "drop_before", None)


async def test_drop_with_reset_is_a_read_error() -> None:
    fake = make_fake(faults=[Fault.drop_before(reset=True)])
    async with over_loopback(fake) as client:
        with pytest.raises(httpx.ReadError):
            await client.get("/call", headers=VAPI_AUTH)


async def test_processed_then_dropped_creates_the_call() -> None:
    fake = make_fake(faults=[Fault.drop_after(count=1, endpoints=["*.calls.create"])])
    async with over_loopback(fake) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await create_call(client)
        assert (await create_call(client, To="+14155550112")).status_code == 201
    assert [c.to for c in fake.calls()] == [TO, "+14155550112"]
    first = fake.requests()[0]
    assert (first.status, first.fault) == (None, "drop_after")
    assert first.created == fake.calls()[0].id


@pytest.mark.parametrize("stall", [False, True])
async def test_drop_mid_body_creates_the_call_and_cuts_its_201(stall: bool) -> None:
    """Status line and headers with the full Content-Length arrive, then half the body, then
    the connection closes (or nothing more comes until the client's read timeout)."""
    fake = make_fake(
        faults=[Fault.drop_mid_body(stall=stall, count=1, endpoints="twilio.calls.create")]
    )
    async with over_loopback(fake) as client:
        request = client.build_request("POST", CALLS, data=CALL_FORM, timeout=0.3)
        response = await client.send(request, stream=True, auth=(AC, TOKEN))
        assert response.status_code == 201
        declared = int(response.headers["content-length"])
        expected = httpx.ReadTimeout if stall else httpx.RemoteProtocolError
        with pytest.raises(expected):
            await response.aread()
        await response.aclose()
        assert (await create_call(client, To="+14155550112")).status_code == 201
    assert [c.to for c in fake.calls()] == [TO, "+14155550112"]
    first = fake.requests()[0]
    assert (first.status, first.fault) == (201, "drop_mid_body")
    assert first.created == fake.calls()[0].id
    assert declared > len(fake.calls()[0].id)


async def test_vapi_processed_then_dropped() -> None:
    fake = make_fake(faults=[Fault.drop_after(endpoints="vapi.calls.create")])
    body = {
        "assistantId": fake.vapi_assistants()[0]["id"],
        "phoneNumberId": fake.vapi_phone_numbers()[0]["id"],
        "customer": {"number": TO},
    }
    async with over_loopback(fake) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/call", json=body, headers=VAPI_AUTH)
    assert [c.provider for c in fake.calls()] == ["vapi"]


async def test_error_faults_use_provider_bodies() -> None:
    fake = make_fake(
        faults=[
            Fault.burst(1, status=500, endpoints="twilio.calls.create"),
            Fault.burst(1, status=503, endpoints="twilio.calls.create"),
            Fault.burst(1, status=502, endpoints="twilio.calls.create"),
            Fault.error_rate(1.0, status=500, endpoints="vapi.*"),
        ]
    )
    async with running(fake) as client:
        internal = await create_call(client)
        assert internal.status_code == 500
        assert internal.json()["code"] == 20500
        unavailable = await create_call(client)
        assert (unavailable.status_code, unavailable.json()["code"]) == (503, 20503)
        gateway = await create_call(client)
        assert gateway.status_code == 502
        assert gateway.headers["content-type"].startswith("text/html")
        assert (await create_call(client)).status_code == 201
        vapi = await client.get("/assistant", headers=VAPI_AUTH)
        assert vapi.status_code == 500
        assert vapi.json() == {"message": "Internal server error", "statusCode": 500}
    assert len(fake.calls()) == 1
    assert [r.fault for r in fake.requests()] == ["error", "error", "error", None, "error"]


async def test_outage_window_then_recovery() -> None:
    clock = ManualClock()
    fake = make_fake(clock=clock)
    async with running(fake) as client:
        now = fake.elapsed()
        fake.faults = [Fault.outage(now, now + 0.3)]
        during = await create_call(client)
        assert during.status_code == 503
        clock.advance(max(now + 0.3 - fake.elapsed(), 0) + 0.02)
        after = await create_call(client)
        assert after.status_code == 201


async def test_rate_limited_with_retry_after() -> None:
    fake = make_fake(
        faults=[
            Fault.rate_limited(retry_after=2, count=1),
            Fault.rate_limited(retry_after=0.25, count=1),
            Fault.rate_limited(retry_after=None, count=1),
            Fault.rate_limited(retry_after=1, endpoints="vapi.*"),
        ]
    )
    async with running(fake) as client:
        first = await create_call(client)
        assert first.status_code == 429
        assert first.headers["retry-after"] == "2"
        assert first.json() == {
            "code": 20429,
            "message": "Too Many Requests",
            "more_info": "https://www.twilio.com/docs/errors/20429",
            "status": 429,
        }
        assert (await create_call(client)).headers["retry-after"] == "0.25"
        assert "retry-after" not in (await create_call(client)).headers
        assert (await create_call(client)).status_code == 201
        vapi = await client.get("/call", headers=VAPI_AUTH)
        assert (vapi.status_code, vapi.headers["retry-after"]) == (429, "1")
        assert vapi.json()["statusCode"] == 429
    assert len(fake.calls()) == 1


async def test_latency_is_added() -> None:
    clock = ManualClock(autojump=True)
    fake = make_fake(faults=[Fault.latency(0.2, endpoints="vapi.phone_numbers.list")], clock=clock)
    async with running(fake) as client:
        started = clock.now()
        response = await client.get("/phone-number", headers=VAPI_AUTH)
        assert response.status_code == 200
        assert clock.now() - started >= 0.2
        await client.get("/assistant", headers=VAPI_AUTH)
    assert [r.delay for r in fake.requests()] == [0.2, 0.0]


async def test_error_rate_is_seeded() -> None:
    outcomes: list[list[int]] = []
    for _ in range(2):
        fake = make_fake(seed=7, faults=[Fault.error_rate(0.5, endpoints="vapi.assistants.list")])
        async with running(fake) as client:
            statuses = [
                (await client.get("/assistant", headers=VAPI_AUTH)).status_code for _ in range(20)
            ]
        outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert 3 <= outcomes[0].count(500) <= 17


async def test_twilio_concurrency_limit_answers_20429() -> None:
    fake = make_fake(
        twilio_concurrency_limit=1,
        faults=[Fault.latency(0.2, endpoints="twilio.calls.list")],
        clock=ManualClock(autojump=True),
    )
    statuses: list[int] = []
    async with running(fake) as client:

        async def one() -> None:
            statuses.append((await client.get(CALLS, auth=(AC, TOKEN))).status_code)

        async with anyio.create_task_group() as group:
            group.start_soon(one)
            group.start_soon(one)
    assert sorted(statuses) == [200, 429]
    assert "concurrency" in [r.fault for r in fake.requests()]


async def test_calls_over_cps_are_queued_and_counted() -> None:
    fake = make_fake(calls_per_second=2.0, clock=ManualClock())
    responses: list[httpx.Response] = []
    async with running(fake) as client:

        async def one(number: str) -> None:
            responses.append(await create_call(client, To=number))

        async with anyio.create_task_group() as group:
            for i in range(4):
                group.start_soon(one, f"+1415555010{i}")
    assert [r.status_code for r in responses] == [201] * 4
    assert [r.json()["status"] for r in responses] == ["queued"] * 4
    assert fake.cps_violations() == 3
    assert fake.cps_violations(AC) == 3
    assert fake.cps_violations(AC2) == 0
    calls = fake.calls()
    assert [c.cps_violation for c in calls] == [False, True, True, True]
    assert calls[3].queue_time == pytest.approx(1.5 - (calls[3].time - calls[0].time), abs=0.01)
    assert max(int(r.json()["queue_time"]) for r in responses) > 1000


async def test_paced_client_has_no_cps_violations() -> None:
    cps = 20.0
    clock = ManualClock()
    fake = make_fake(calls_per_second=cps, clock=clock)
    async with running(fake) as client:
        await client.get(CALLS, auth=(AC, TOKEN))  # connect first: the first request is slower
        start = clock.now()
        for i in range(6):
            clock.advance_to(start + i / cps)
            assert (await create_call(client, To=f"+1415555020{i}")).status_code == 201
    assert fake.cps_violations() == 0
    assert fake.duplicate_destinations() == {}


@pytest.mark.parametrize("via", [IN_PROCESS, LOOPBACK])
async def test_twilio_status_callbacks_are_signed_and_keep_the_query(via: str) -> None:
    receiver = Receiver()
    clock = clock_for(via)
    fake = make_fake(call_duration=0.05, **({} if clock is None else {"clock": clock}))
    async with hooked(via, fake, receiver) as (client, hook_url):
        callback = f"{hook_url}/status?rv_cid=cid-42"
        created = await client.post(
            CALLS,
            data={
                **CALL_FORM,
                "StatusCallback": callback,
                "StatusCallbackEvent": ["initiated", "answered", "completed"],
            },
            auth=(SK, SK_SECRET),
        )
        await pass_time(clock, 0.05)
        await receiver.wait_for(3)
    sid = created.json()["sid"]
    statuses = []
    for path, query, headers, body in receiver.received:
        assert path == "/status"
        assert query == "rv_cid=cid-42"
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        assert params["CallSid"] == sid
        assert params["AccountSid"] == AC
        assert (params["To"], params["From"]) == (TO, FROM)
        assert headers["content-type"] == "application/x-www-form-urlencoded"
        signature = headers["x-twilio-signature"]
        assert RequestValidator(TOKEN).validate(callback, params, signature)
        assert not RequestValidator("other-token").validate(callback, params, signature)
        statuses.append((params["SequenceNumber"], params["CallStatus"]))
    assert statuses == [("0", "initiated"), ("1", "in-progress"), ("2", "completed")]
    assert [r.status for r in fake.callbacks()] == ["initiated", "in-progress", "completed"]
    assert all(r.response_status == 204 for r in fake.callbacks())


async def test_hangup_sends_the_completed_callback_early() -> None:
    receiver = Receiver()
    fake = make_fake(call_duration=30.0, clock=ManualClock())
    async with running(fake, webhooks=receiver) as client:
        created = (await create_call(client, StatusCallback=f"{HOOKS}/s")).json()
        await client.post(created["uri"], data={"Status": "completed"}, auth=(AC, TOKEN))
        await receiver.wait_for(1)
    params = dict(parse_qsl(receiver.received[0][3].decode()))
    assert params["CallStatus"] == "completed"


async def test_vapi_server_messages() -> None:
    receiver = Receiver()
    clock = ManualClock()
    fake = make_fake(vapi_server_url=f"{HOOKS}/vapi", vapi_credential="shh", clock=clock)
    body = {
        "assistantId": fake.vapi_assistants()[0]["id"],
        "phoneNumberId": fake.vapi_phone_numbers()[0]["id"],
        "customer": {"number": TO},
        "assistantOverrides": {"metadata": {"rv_cid": "cid-7"}},
    }
    async with running(fake, webhooks=receiver) as client:
        call = (await client.post("/call", json=body, headers=VAPI_AUTH)).json()
        clock.advance(0.05)
        await receiver.wait_for(3)
    messages = [json.loads(b)["message"] for _, _, _, b in receiver.received]
    assert [(m["type"], m.get("status")) for m in messages] == [
        ("status-update", "in-progress"),
        ("status-update", "ended"),
        ("end-of-call-report", None),
    ]
    assert all(h["x-vapi-secret"] == "shh" for _, _, h, _ in receiver.received)
    for message in messages:
        assert message["call"]["id"] == call["id"]
        assert message["call"]["assistantOverrides"]["metadata"] == {"rv_cid": "cid-7"}
    assert messages[2]["endedReason"] == "customer-ended-call"


async def test_callback_loss_and_duplication() -> None:
    receiver = Receiver()
    clock = ManualClock()
    lossy = make_fake(callback_faults=CallbackFaults(loss=1.0), clock=clock)
    doubled = make_fake(callback_faults=CallbackFaults(duplicate=1.0), clock=clock)
    async with running(lossy, webhooks=receiver) as client:
        await create_call(client, StatusCallback=f"{HOOKS}/lost")
        clock.advance(0.2)
        await anyio.wait_all_tasks_blocked()
    async with running(doubled, webhooks=receiver) as client:
        await create_call(client, StatusCallback=f"{HOOKS}/twice")
        clock.advance(0.2)
        await receiver.wait_for(2)
    assert [r.lost for r in lossy.callbacks()] == [True]
    assert [path for path, *_ in receiver.received] == ["/twice", "/twice"]
    tokens = {h["i-twilio-idempotency-token"] for _, _, h, _ in receiver.received}
    assert len(tokens) == 1
    assert [r.duplicate for r in doubled.callbacks()] == [False, True]


async def test_callback_reordering() -> None:
    receiver = Receiver()
    fake = make_fake(
        seed=3,
        callback_faults=CallbackFaults(reorder=1.0, reorder_delay=0.3),
        call_duration=0.0,
        clock=ManualClock(autojump=True),
    )
    events = ["initiated", "ringing", "answered", "completed"]
    async with running(fake, webhooks=receiver) as client:
        await create_call(client, StatusCallback=f"{HOOKS}/r", StatusCallbackEvent=events)
        await receiver.wait_for(4)
    order = [dict(parse_qsl(b.decode()))["SequenceNumber"] for *_, b in receiver.received]
    assert sorted(order) == ["0", "1", "2", "3"]
    assert order != ["0", "1", "2", "3"]


async def test_failed_callbacks_are_recorded_not_raised() -> None:
    fake = make_fake(callback_timeout=0.5)
    async with over_loopback(fake) as client:
        await create_call(client, StatusCallback="http://127.0.0.1:9/unreachable")
        with anyio.fail_after(3):
            while not fake.callbacks():
                await anyio.sleep(0.01)
        assert (await create_call(client)).status_code == 201
    (record,) = fake.callbacks()
    assert record.response_status is None
    assert record.error is not None


async def test_serve_runs_any_asgi_app_and_stops_quickly() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/drop":
            raise DropConnectionError
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"pong"})

    # shutdown_timeout bounds the stop: serve() raises if the server has not stopped by then.
    async with (
        serve(app, shutdown_timeout=2.0) as url,
        httpx.AsyncClient(base_url=url, verify=TLS) as client,
    ):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert (await client.get("/ping")).text == "pong"
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/drop")
        assert (await client.get("/ping")).text == "pong"
    async with httpx.AsyncClient(verify=TLS) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/ping")


async def test_serve_rejects_bad_timeouts() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        return

    with pytest.raises(ValueError, match="timeout"):
        async with serve(app, shutdown_timeout=0):
            pass


async def test_fault_windows_follow_the_fake_clock() -> None:
    clock = ManualClock()
    fake = make_fake(
        faults=[Fault.error_rate(1.0, start=0.0, end=3600.0, endpoints="vapi.*")], clock=clock
    )
    async with running(fake) as client:
        assert fake.elapsed() < 5
        assert (await client.get("/call", headers=VAPI_AUTH)).status_code == 500
        fake.faults = [Fault.error_rate(1.0, start=3600.0, endpoints="vapi.*")]
        assert (await client.get("/call", headers=VAPI_AUTH)).status_code == 200
    assert len(fake.faults) == 1
    assert urlsplit(fake.requests()[0].path).path == "/call"


async def test_a_body_cut_short_by_a_disconnect_is_not_processed() -> None:
    fake = make_fake()
    messages = iter(
        [
            {"type": "http.request", "body": b"To=%2B15550100001&Fr", "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[Any] = []

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": f"/2010-04-01/Accounts/{AC}/Calls.json",
        "query_string": b"",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded")],
    }
    await fake(scope, receive, send)
    assert sent == []
    assert fake.calls() == []
    assert fake.requests() == []


async def test_fault_windows_call_lifetimes_and_cps_follow_an_injected_clock() -> None:
    clock = ManualClock(1000.0)
    fake = make_fake(
        calls_per_second=1.0,
        call_duration=10.0,
        faults=[Fault.outage(5.0, 6.0, endpoints="twilio.calls.create")],
        clock=clock,
    )
    async with running(fake) as client:
        assert fake.elapsed() == 0.0
        call = (await create_call(client)).json()
        clock.advance(0.5)
        assert (await create_call(client, To="+14155550112")).json()["status"] == "queued"
        assert fake.cps_violations() == 1
        assert fake.twilio_call(call["sid"])["status"] == "in-progress"  # type: ignore[index]
        clock.advance_to(1005.0)
        assert (await create_call(client, To="+14155550113")).status_code == 503
        clock.advance_to(1006.0)
        assert (await create_call(client, To="+14155550113")).status_code == 201
        clock.advance_to(1010.0)
        assert fake.twilio_call(call["sid"])["status"] == "completed"  # type: ignore[index]
    assert [r.time for r in fake.requests()] == [0.0, 0.5, 5.0, 6.0]
    assert fake.cps_violations() == 1


async def test_running_starts_webhooks_once_and_stops_them() -> None:
    receiver = Receiver()
    clock = ManualClock()
    fake = make_fake(call_duration=1.0, clock=clock)
    async with running(fake, webhooks=receiver) as client:
        with pytest.raises(RuntimeError, match="already running"):
            async with fake.running():
                pass  # pragma: no cover
        await create_call(client, StatusCallback=f"{HOOKS}/s")
    # Left before the call ended: its pending callback is cancelled, nothing is sent later.
    clock.advance(5.0)
    await anyio.wait_all_tasks_blocked()
    assert receiver.received == []
    async with running(fake, webhooks=receiver) as client:  # and it starts again
        await create_call(client, To="+14155550112", StatusCallback=f"{HOOKS}/again")
        clock.advance(1.5)
        await receiver.wait_for(1)
    assert [path for path, *_ in receiver.received] == ["/again"]
