"""TwilioClient against FakeTelephony (asyncio and trio).

The fake runs in-process through httpx's ASGI transport, with the client and the fake on one
ManualClock, unless a test is about what real sockets do (dropped or stalled answers): those
use the ``served`` fixture, and one round trip runs both ways as a loopback smoke test.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from _apps import answering
from _raw_upstream import Mode, raw_upstream
from resilient_voice import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    FailureKind,
    InvalidRequestError,
    OutcomeUnknownError,
    RetryPolicy,
    correlation_scope,
)
from resilient_voice.limiter import KeyedLimiter, TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.testing import FakeTelephony, Fault, ManualClock, serve
from resilient_voice.twilio import (
    Call,
    CallDirection,
    CallStatus,
    Message,
    MessageStatus,
    TwilioAPIError,
    TwilioAuthenticationError,
    TwilioClient,
)
from resilient_voice.twilio._errors import api_error
from resilient_voice.twilio._policies import OPERATIONS

SID = "AC" + "1" * 32
TOKEN = "secret-token-value"
KEY = "SK" + "2" * 32
KEY_SECRET = "key-secret-value"
FROM = "+15005550006"
TWIML_URL = "https://example.com/twiml"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def fast_retry(**options: Any) -> RetryPolicy:
    return RetryPolicy(base_delay=0.001, max_delay=0.2, **options)


def number(i: int) -> str:
    return f"+1555{i:07d}"


LOCAL = "http://127.0.0.1"  # the base URL of clients whose transport is in-process
# In-process fakes answer at loopback URLs no server listens on; make_client routes a client
# of one of those URLs through httpx.ASGITransport to the fake, on the fake's clock.
IN_PROCESS: dict[str, tuple[httpx.AsyncBaseTransport, ManualClock | None]] = {}
_HOSTS = itertools.count()


@asynccontextmanager
async def in_process(
    app: FakeTelephony,
    clock: ManualClock | None = None,
    *,
    webhooks: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[str]:
    url = f"http://127.0.1.{next(_HOSTS) % 250 + 1}"
    IN_PROCESS[url] = (httpx.ASGITransport(app=app), clock)
    try:
        async with app.running(webhook_transport=webhooks):
            yield url
    finally:
        del IN_PROCESS[url]


def twilio_fake(clock: ManualClock | None = None) -> FakeTelephony:
    return FakeTelephony(
        twilio_accounts={SID: TOKEN},
        twilio_api_keys={KEY: (SID, KEY_SECRET)},
        calls_per_second=2000.0,
        status_callbacks=False,
        **({} if clock is None else {"clock": clock}),
    )


@pytest.fixture
def clock() -> ManualClock:
    """The time of the in-process fake and its clients: retries and pacing wait on it."""
    return ManualClock(autojump=True)


@pytest.fixture
async def fake(clock: ManualClock) -> AsyncIterator[tuple[FakeTelephony, str]]:
    app = twilio_fake(clock)
    async with in_process(app, clock) as url:
        yield app, url


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeTelephony, str]]:
    """The fake behind ``serve``, on real time, for what only real sockets show."""
    app = twilio_fake()
    async with serve(app) as url:
        yield app, url


@pytest.fixture(params=["fake", "served"])
def upstream(request: pytest.FixtureRequest) -> tuple[FakeTelephony, str]:
    """Both of the above, for the round trip that also smoke-tests the loopback path."""
    value: tuple[FakeTelephony, str] = request.getfixturevalue(request.param)
    return value


def local_transport(url: str) -> httpx.AsyncBaseTransport | None:
    return IN_PROCESS[url][0] if url in IN_PROCESS else None


def make_client(url: str, **options: Any) -> TwilioClient:
    options.setdefault("calls_per_second", 2000.0)
    options.setdefault("messages_per_second", 2000.0)
    if url in IN_PROCESS:
        transport, clock = IN_PROCESS[url]
        options.setdefault("transport", transport)
        if clock is not None:
            options.setdefault("clock", clock)
    return TwilioClient(SID, TOKEN, base_url=url, **options)


def local_client(app: Callable[..., Awaitable[None]], **options: Any) -> TwilioClient:
    """A client of a tiny ASGI upstream, in-process."""
    return make_client(LOCAL, transport=httpx.ASGITransport(app=app), **options)


async def test_every_operation_round_trips(upstream: tuple[FakeTelephony, str]) -> None:
    app, url = upstream
    async with make_client(url) as twilio:
        call = await twilio.create_call(
            to=number(1),
            from_=FROM,
            url=TWIML_URL,
            status_callback="https://example.com/status?tenant=7#rc=2",
            status_callback_event=["initiated", "completed"],
            Timeout=20,
            Record=True,
        )
        assert isinstance(call, Call)
        assert call.sid.startswith("CA")
        assert call.status is CallStatus.QUEUED
        assert call.direction is CallDirection.OUTBOUND_API
        assert call.from_ == FROM
        assert call.to == number(1)
        assert call.date_created is not None
        assert call.date_created.tzinfo is not None
        assert call.queue_time is not None
        assert call.model_extra is not None
        assert "from_formatted" not in call.model_extra  # a declared field, not an extra

        fetched = await twilio.get_call(call.sid)
        assert fetched.sid == call.sid
        listed = await twilio.list_calls(to=number(1))
        assert [c.sid for c in listed] == [call.sid]
        ended = await twilio.update_call(call.sid, status="completed")
        assert ended.status in (CallStatus.COMPLETED, CallStatus.CANCELED)

        message = await twilio.send_message(
            to=number(2), from_=FROM, body="hello", status_callback="https://example.com/sms"
        )
        assert isinstance(message, Message)
        assert message.status is MessageStatus.QUEUED
        assert (await twilio.get_message(message.sid)).body == "hello"
        service = await twilio.send_message(
            to="whatsapp:+15550100003",
            messaging_service_sid="MG" + "3" * 32,
            media_url=["https://example.com/a.png"],
        )
        assert service.status is MessageStatus.ACCEPTED

    (create,) = app.requests("twilio.calls.create")
    form = create.form
    assert form["Timeout"] == ("20",)
    assert form["Record"] == ("true",)
    assert form["StatusCallbackEvent"] == ("initiated", "completed")
    callback = urlsplit(form["StatusCallback"][0])
    query = parse_qs(callback.query)
    assert query["tenant"] == ["7"]  # the caller's own query and fragment survive
    assert callback.fragment == "rc=2"
    assert query["rv_cid"] == [call.correlation_id]
    assert query["rv_attempt"] == [call.attempt_id]
    assert parse_qs(urlsplit(form["Url"][0]).query)["rv_cid"] == [call.correlation_id]
    assert create.headers["x-correlation-id"] == call.correlation_id
    assert create.auth_user == SID


async def test_api_key_auth_keeps_the_account_in_the_path(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    async with TwilioClient(
        SID,
        api_key=KEY,
        api_secret=KEY_SECRET,
        base_url=url,
        calls_per_second=1000,
        transport=local_transport(url),
    ) as twilio:
        await twilio.create_call(
            to=number(3), from_=FROM, twiml="<Response><Say>hi</Say></Response>"
        )
    (request,) = app.requests("twilio.calls.create")
    assert request.auth_user == KEY
    assert SID in request.path


async def test_paging_follows_next_page_uri_up_to_the_limit(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    async with make_client(url) as twilio:
        for _i in range(5):
            await twilio.create_call(to=number(10), from_=FROM, url=TWIML_URL)
        assert len(await twilio.list_calls(to=number(10), page_size=2, limit=None)) == 5
        assert len(await twilio.list_calls(to=number(10), page_size=2, limit=3)) == 3
    assert len(app.requests("twilio.calls.list")) == 3 + 2


BAD_CALLS: list[tuple[dict[str, Any], str]] = [
    ({"to": "5551234567", "from_": FROM, "url": TWIML_URL}, "to"),
    ({"to": "+0551234567", "from_": FROM, "url": TWIML_URL}, "to"),
    ({"to": "+1555", "from_": FROM, "url": TWIML_URL}, "to"),
    ({"to": "+1" + "5" * 15, "from_": FROM, "url": TWIML_URL}, "to"),
    ({"to": "whatsapp:+15551234567", "from_": FROM, "url": TWIML_URL}, "to"),
    ({"to": "client:", "from_": FROM, "url": TWIML_URL}, "to"),
    ({"to": number(1), "from_": "Acme", "url": TWIML_URL}, "from_"),
    ({"to": number(1), "from_": FROM}, "url"),
    ({"to": number(1), "from_": FROM, "url": TWIML_URL, "twiml": "<Response/>"}, "url"),
    ({"to": number(1), "from_": FROM, "twiml": "x" * 4001}, "twiml"),
    ({"to": number(1), "from_": FROM, "url": "ftp://example.com/x"}, "url"),
    ({"to": number(1), "from_": FROM, "application_sid": "AP123"}, "application_sid"),
    (
        {"to": number(1), "from_": FROM, "url": TWIML_URL, "status_callback_event": ["done"]},
        "status_callback_event",
    ),
    ({"to": number(1), "from_": FROM, "url": TWIML_URL, "timeout": 20}, "timeout"),
    ({"to": number(1), "from_": FROM, "twiml": "<Response/>", "Url": TWIML_URL}, "Url"),
    ({"to": number(1), "from_": FROM, "url": TWIML_URL, "method": "PUT"}, "method"),
]

BAD_MESSAGES: list[tuple[dict[str, Any], str]] = [
    ({"to": "sip:alice@example.com", "from_": FROM, "body": "x"}, "to"),
    ({"to": "whatsapp:15551234567", "from_": FROM, "body": "x"}, "to"),
    ({"to": number(1), "body": "x"}, "from_"),
    ({"to": number(1), "from_": "A very long sender", "body": "x"}, "from_"),
    ({"to": number(1), "from_": FROM}, "body"),
    ({"to": number(1), "from_": FROM, "body": "x" * 1601}, "body"),
    ({"to": number(1), "from_": FROM, "media_url": ["https://e.com/a"] * 11}, "media_url"),
    ({"to": number(1), "from_": FROM, "media_url": "https://e.com/a"}, "media_url"),
    (
        {"to": number(1), "messaging_service_sid": "MG" + "z" * 32, "body": "x"},
        "messaging_service_sid",
    ),
    ({"to": number(1), "from_": FROM, "content_sid": "HX" + "1" * 31}, "content_sid"),
]


def refusing_client(sent: list[httpx.Request]) -> TwilioClient:
    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    return TwilioClient(SID, TOKEN, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("kwargs", "field"), BAD_CALLS)
async def test_bad_call_input_sends_nothing(kwargs: dict[str, Any], field: str) -> None:
    sent: list[httpx.Request] = []
    async with refusing_client(sent) as twilio:
        with pytest.raises(InvalidRequestError) as info:
            await twilio.create_call(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert sent == []


@pytest.mark.parametrize(("kwargs", "field"), BAD_MESSAGES)
async def test_bad_message_input_sends_nothing(kwargs: dict[str, Any], field: str) -> None:
    sent: list[httpx.Request] = []
    async with refusing_client(sent) as twilio:
        with pytest.raises(InvalidRequestError) as info:
            await twilio.send_message(**kwargs)
    assert info.value.field == field
    assert sent == []


async def test_bad_sids_and_updates_send_nothing() -> None:
    sent: list[httpx.Request] = []
    call_sid = "CA" + "a" * 32
    attempts: list[Callable[[TwilioClient], Awaitable[object]]] = [
        lambda t: t.get_call("CA123"),
        lambda t: t.get_call("SM" + "a" * 32),
        lambda t: t.get_message("CA" + "a" * 32),
        lambda t: t.update_call(call_sid),
        lambda t: t.update_call(call_sid, status="busy"),
        lambda t: t.update_call(call_sid, url=TWIML_URL, twiml="<Response/>"),
        lambda t: t.list_calls(page_size=0),
        lambda t: t.list_calls(to="nope"),
        lambda t: t.reconcile_call(to=number(1), since=datetime(2024, 1, 1)),  # naive
    ]
    async with refusing_client(sent) as twilio:
        for attempt in attempts:
            with pytest.raises(InvalidRequestError):
                await attempt(twilio)
    assert sent == []


@pytest.mark.parametrize(
    "address",
    ["+15551234567", "+4930123456", "client:alice", "sip:alice@example.com", "sim:DE" + "1" * 32],
)
async def test_accepted_call_destinations(address: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(parse_qs(request.content.decode())["To"][0])
        return httpx.Response(201, json={"sid": "CA" + "b" * 32, "status": "queued"})

    async with TwilioClient(SID, TOKEN, transport=httpx.MockTransport(handler)) as twilio:
        await twilio.create_call(to=address, from_=FROM, application_sid="AP" + "c" * 32)
    assert seen == [address]


def test_configuration_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="account_sid"):
        TwilioClient("AC123", TOKEN)
    with pytest.raises(ValueError, match="auth_token"):
        TwilioClient(SID)
    with pytest.raises(ValueError, match="api_key"):
        TwilioClient(SID, TOKEN, api_key=KEY, api_secret=KEY_SECRET)
    with pytest.raises(ValueError, match="api_key"):
        TwilioClient(SID, api_key="AC" + "1" * 32, api_secret=KEY_SECRET)
    with pytest.raises(ValueError, match="unknown operation"):
        TwilioClient(SID, TOKEN, policies={"create_calls": Policy()})
    with pytest.raises(TypeError, match="Policy"):
        TwilioClient(SID, TOKEN, policies={"read": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not both"):
        TwilioClient(SID, TOKEN, policy=Policy(), policies={"read": Policy()})
    with pytest.raises(ValueError, match="ignored"):
        TwilioClient(SID, TOKEN, policy=Policy(), breaker=CircuitBreaker("x"))
    with pytest.raises(ValueError, match="base_url"):
        TwilioClient(SID, TOKEN, base_url="api.twilio.com")
    with pytest.raises(ValueError, match="base_url"):
        TwilioClient(SID, TOKEN, base_url="https://api.twilio.com/2010-04-01")
    with pytest.raises(ValueError, match="calls_per_second"):
        TwilioClient(SID, TOKEN, calls_per_second=0)
    with pytest.raises(ValueError, match="correlation_param must be a plain URL-safe word"):
        TwilioClient(SID, TOKEN, correlation_param="a b")
    with pytest.raises(ValueError, match="credentials"):
        TwilioClient(SID, TOKEN, base_url="https://user:s3cret@api.twilio.com")


def test_policies_defaults_and_overrides() -> None:
    twilio = TwilioClient(SID, TOKEN, calls_per_second=7)
    policies = twilio.policies
    assert set(policies) == set(OPERATIONS)
    assert twilio.breaker is not None
    assert twilio.breaker.name == f"twilio:{SID}"
    assert all(p.breaker is twilio.breaker for p in policies.values())
    calls = policies["create_call"].limiter
    assert isinstance(calls, TokenBucket)
    assert (calls.rate, calls.burst) == (7.0, 1.0)
    assert isinstance(policies["send_message"].limiter, KeyedLimiter)
    assert policies["read"].limiter is None
    assert policies["read"].idempotent
    assert not policies["create_call"].idempotent

    mine = Policy()
    replaced = TwilioClient(SID, TOKEN, policies={"read": mine})
    assert replaced.policies["read"] is mine
    assert replaced.policies["create_call"] is not mine
    everything = TwilioClient(SID, TOKEN, policy=mine)
    assert all(p is mine for p in everything.policies.values())
    with pytest.raises(AttributeError, match="no circuit breaker"):
        everything.breaker  # noqa: B018
    assert getattr(everything, "breaker", None) is None


def test_secrets_stay_out_of_reprs() -> None:
    twilio = TwilioClient(SID, TOKEN)
    keyed = TwilioClient(SID, api_key=KEY, api_secret=KEY_SECRET)
    for text in (repr(twilio), str(twilio), repr(keyed), repr(twilio.transport)):
        assert TOKEN not in text
        assert KEY_SECRET not in text


def test_models_tolerate_what_twilio_adds() -> None:
    call = Call.model_validate(
        {
            "sid": "CA1",
            "status": "teleported",
            "direction": "sideways",
            "from": "+15005550006",
            "date_created": "Tue, 31 Aug 2010 20:36:28 +0000",
            "start_time": "",
            "duration": "15",
            "price": "-0.01500",
            "stir_verstat": "TN-Validation-Passed-A",
        }
    )
    assert call.status == "teleported"
    assert call.direction == "sideways"
    assert call.from_ == "+15005550006"
    assert call.date_created == datetime(2010, 8, 31, 20, 36, 28, tzinfo=UTC)
    assert call.start_time is None
    assert call.duration == 15
    assert str(call.price) == "-0.01500"
    assert call.model_extra == {"stir_verstat": "TN-Validation-Passed-A"}
    assert call.correlation_id is None
    assert call.model_dump(by_alias=True)["from"] == "+15005550006"
    known = Call.model_validate({"sid": "CA2", "status": "in-progress"})
    assert known.status is CallStatus.IN_PROGRESS
    assert known.status == "in-progress"
    message = Message.model_validate({"sid": "SM1", "status": "delivered", "error_code": None})
    assert message.status is MessageStatus.DELIVERED


def response(status: int, content: bytes, **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        content=content,
        headers=headers,
        request=httpx.Request("POST", "https://api.twilio.com/x"),
    )


def test_error_bodies_become_typed_errors() -> None:
    legacy = api_error(
        response(
            400,
            b'{"code": 21211, "message": "Invalid \'To\' Phone Number", '
            b'"more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}',
        )
    )
    assert (legacy.status, legacy.code, legacy.kind) == (400, 21211, FailureKind.PERMANENT)
    assert legacy.more_info == "https://www.twilio.com/docs/errors/21211"
    assert "Invalid 'To'" in legacy.message
    problem = api_error(
        response(
            422,
            b'{"type": "https://www.twilio.com/docs/errors/20001", "title": "Bad", '
            b'"status": 422, "code": 20001, "detail": "field x is wrong"}',
            **{"content-type": "application/problem+json"},
        )
    )
    assert (problem.code, problem.message) == (20001, "field x is wrong")
    assert problem.more_info == "https://www.twilio.com/docs/errors/20001"
    html = api_error(response(502, b"<html>Bad Gateway</html>"))
    assert (html.code, html.kind) == (502, FailureKind.MAYBE_PROCESSED)
    limited = api_error(
        response(429, b'{"code": 20429, "message": "Too Many"}', **{"retry-after": "2"})
    )
    assert (limited.kind, limited.retry_after) == (FailureKind.UNPROCESSED, 2.0)
    auth = api_error(response(401, b'{"code": 20003, "message": "Authenticate"}'))
    assert isinstance(auth, TwilioAuthenticationError)
    assert isinstance(api_error(response(403, b"")), TwilioAuthenticationError)


async def test_twilio_errors_and_bad_credentials(fake: tuple[FakeTelephony, str]) -> None:
    app, url = fake
    async with make_client(url) as twilio:
        # Valid for us (Twilio accepts sip: callers on SIP calls), refused by the fake.
        with pytest.raises(TwilioAPIError) as info:
            await twilio.create_call(to=number(1), from_="sip:bob@example.com", url=TWIML_URL)
    assert (info.value.status, info.value.code) == (400, 21212)
    assert info.value.kind is FailureKind.PERMANENT
    assert len(app.requests("twilio.calls.create")) == 1
    async with TwilioClient(SID, "wrong", base_url=url, transport=local_transport(url)) as twilio:
        with pytest.raises(TwilioAuthenticationError) as auth:
            await twilio.get_call("CA" + "0" * 32)
    assert auth.value.code == 20003
    assert "wrong" not in str(auth.value)


async def test_breaker_opens_during_an_outage_and_recovers(
    fake: tuple[FakeTelephony, str], clock: ManualClock
) -> None:
    app, url = fake
    breaker = CircuitBreaker("twilio", failure_threshold=2, recovery_timeout=0.2, clock=clock)
    async with make_client(
        url, breaker=breaker, retry=fast_retry(max_attempts=1, clock=clock)
    ) as twilio:
        await twilio.list_calls()  # warm the connection
        start = app.elapsed()
        app.faults = [Fault.outage(start, start + 0.3)]
        with pytest.raises(OutcomeUnknownError):
            await twilio.create_call(to=number(1), from_=FROM, url=TWIML_URL)
        with pytest.raises(TwilioAPIError) as info:
            await twilio.list_calls()
        assert info.value.status == 503
        assert breaker.state is BreakerState.OPEN
        sent = len(app.requests())
        with pytest.raises(CircuitOpenError):
            await twilio.create_call(to=number(2), from_=FROM, url=TWIML_URL)
        assert len(app.requests()) == sent  # rejected locally
        await clock.sleep(max(0.0, start + 0.32 - app.elapsed()))
        await twilio.list_calls()  # the probe succeeds
        assert breaker.state is BreakerState.CLOSED
        call = await twilio.create_call(to=number(3), from_=FROM, url=TWIML_URL)
    assert [c.to for c in app.calls()] == [number(3)]
    assert call.sid == app.calls()[0].id


async def test_429_is_retried_after_retry_after_even_for_create(
    fake: tuple[FakeTelephony, str], clock: ManualClock
) -> None:
    app, url = fake
    app.faults = [Fault.rate_limited(retry_after=0.05, count=2, endpoints="twilio.calls.create")]
    breaker = CircuitBreaker("twilio", failure_threshold=1, clock=clock)
    async with make_client(
        url, breaker=breaker, retry=fast_retry(max_attempts=3, clock=clock)
    ) as twilio:
        await twilio.create_call(to=number(1), from_=FROM, url=TWIML_URL)
        times = [r.time for r in app.requests("twilio.calls.create")]
        assert len(times) == 3
        assert all(b - a >= 0.045 for a, b in itertools.pairwise(times))
        assert breaker.state is BreakerState.CLOSED  # back-pressure is not sickness
        app.faults = [Fault.rate_limited(retry_after=0.01, endpoints="twilio.calls.create")]
        with pytest.raises(TwilioAPIError) as info:
            await twilio.create_call(to=number(2), from_=FROM, url=TWIML_URL)
    assert (info.value.status, info.value.code) == (429, 20429)
    assert info.value.kind is FailureKind.UNPROCESSED
    assert info.value.retry_after == 0.01
    assert len(app.calls()) == 1


async def test_thousand_calls_under_drops_never_ring_anyone_twice(
    served: tuple[FakeTelephony, str],
) -> None:
    app, url = served
    app.faults = [
        Fault.rate_limited(0.03, retry_after=0.0, endpoints="twilio.calls.create"),
        Fault.drop_before(0.03, endpoints="twilio.calls.create"),
        Fault.drop_before(0.02, reset=True, endpoints="twilio.calls.create"),
        Fault.drop_after(0.03, endpoints="twilio.calls.create"),
        Fault.drop_after(0.02, reset=True, endpoints="twilio.calls.create"),
    ]
    total = 1000
    succeeded: dict[str, str] = {}
    unknown: list[str] = []
    failed: list[str] = []
    limiter = anyio.CapacityLimiter(40)
    # A breaker that trips would turn most of the run into local rejections: keep it closed
    # so that every call is really attempted.
    breaker = CircuitBreaker("twilio", failure_threshold=total)
    async with make_client(url, breaker=breaker, retry=fast_retry(max_attempts=3)) as twilio:

        async def place(i: int) -> None:
            async with limiter:
                try:
                    call = await twilio.create_call(to=number(i), from_=FROM, url=TWIML_URL)
                except OutcomeUnknownError:
                    unknown.append(number(i))
                except Exception:
                    failed.append(number(i))
                else:
                    succeeded[number(i)] = call.sid

        async with anyio.create_task_group() as group:
            for i in range(total):
                group.start_soon(place, i)

    created = {c.to: c.id for c in app.calls()}
    assert app.duplicate_destinations() == {}
    assert len(succeeded) + len(unknown) + len(failed) == total
    assert len(succeeded) <= len(created) <= len(succeeded) + len(unknown)
    assert all(created[to] == sid for to, sid in succeeded.items())
    assert not set(created) & set(failed)  # a definite failure never created a call
    assert unknown, "the drop faults should have produced unknown outcomes"
    assert len(app.requests("twilio.calls.create")) > total  # 429s were retried


async def test_unknown_outcome_carries_the_attempt_id_and_can_be_reconciled(
    served: tuple[FakeTelephony, str],
) -> None:
    app, url = served
    app.faults = [Fault.drop_after(count=1, endpoints="twilio.calls.create")]
    before = datetime.now(UTC) - timedelta(seconds=2)
    async with make_client(url, retry=fast_retry(max_attempts=5)) as twilio:
        with pytest.raises(OutcomeUnknownError) as info:
            await twilio.create_call(
                to=number(5), from_=FROM, url=TWIML_URL, status_callback="https://e.com/s"
            )
        assert len(app.requests("twilio.calls.create")) == 1  # not re-sent
        found = await twilio.reconcile_call(to=number(5), from_=FROM, since=before)
        later = await twilio.reconcile_call(
            to=number(5), since=datetime.now(UTC) + timedelta(seconds=5)
        )
    (created,) = app.calls()
    assert [c.sid for c in found] == [created.id]
    assert later == []
    assert created.callback_url is not None
    query = parse_qs(urlsplit(created.callback_url).query)
    assert query["rv_attempt"] == [info.value.attempt_id]
    assert any("reconcile_call" in note for note in info.value.__notes__)


async def test_hang_up_is_retried_but_a_redirect_is_not(
    fake: tuple[FakeTelephony, str], clock: ManualClock
) -> None:
    app, url = fake
    async with make_client(url, retry=fast_retry(max_attempts=3, clock=clock)) as twilio:
        call = await twilio.create_call(to=number(1), from_=FROM, url=TWIML_URL)
        app.faults = [Fault.burst(1, status=503, endpoints="twilio.calls.update")]
        await twilio.update_call(call.sid, status="completed")
        assert len(app.requests("twilio.calls.update")) == 2
        other = await twilio.create_call(to=number(2), from_=FROM, url=TWIML_URL)
        app.faults = [Fault.burst(1, status=503, endpoints="twilio.calls.update")]
        with pytest.raises(OutcomeUnknownError):
            await twilio.update_call(other.sid, url="https://example.com/next")
    assert len(app.requests("twilio.calls.update")) == 3


async def test_messages_are_paced_per_sender(fake: tuple[FakeTelephony, str]) -> None:
    app, url = fake
    other = "+15005550007"
    async with make_client(url, messages_per_second=20.0) as twilio:
        await twilio.list_calls()  # warm a connection

        async def send(sender: str, i: int) -> None:
            await twilio.send_message(to=number(i), from_=sender, body="hi")

        async with anyio.create_task_group() as group:
            for i in range(3):
                group.start_soon(send, FROM, i)
                group.start_soon(send, other, 10 + i)
    by_sender: dict[str, list[float]] = {}
    for request in app.requests("twilio.messages.create"):
        by_sender.setdefault(request.form["From"][0], []).append(request.time)
    for times in by_sender.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) == 3
        assert min(gaps) >= 0.03  # 20 per second per sender, less arrival jitter
    # The two senders do not wait for each other: each one's first message goes out before the
    # other's second (one shared bucket would serialise all six).
    assert by_sender[FROM][0] < by_sender[other][1]
    assert by_sender[other][0] < by_sender[FROM][1]


async def test_pacing_at_the_accounts_cps_causes_no_violations() -> None:
    cps = 40.0
    clock = ManualClock(autojump=True)
    app = FakeTelephony(
        twilio_accounts={SID: TOKEN}, calls_per_second=cps, status_callbacks=False, clock=clock
    )
    async with in_process(app, clock) as url:
        async with make_client(url, calls_per_second=cps) as twilio:
            await twilio.list_calls()  # warm the connection

            async with anyio.create_task_group() as group:
                for i in range(12):
                    group.start_soon(
                        lambda i=i: twilio.create_call(to=number(i), from_=FROM, url=TWIML_URL)
                    )
        assert len(app.calls()) == 12
        assert app.cps_violations() == 0
        # The same burst unpaced is caught: the assertion above can fail.
        unpaced = make_client(url, calls_per_second=10_000.0)
        async with unpaced, anyio.create_task_group() as group:
            for i in range(12):
                group.start_soon(
                    lambda i=i: unpaced.create_call(to=number(100 + i), from_=FROM, url=TWIML_URL)
                )
        assert app.cps_violations() > 0


class CallbackSink:
    """A tiny ASGI app that records the query of every webhook it receives."""

    def __init__(self) -> None:
        self.queries: list[dict[str, list[str]]] = []
        self.headers: list[dict[bytes, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if not message.get("more_body", False):
                break
        self.queries.append(parse_qs(scope.get("query_string", b"").decode()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def test_correlation_id_goes_to_twilio_and_comes_back_in_callbacks() -> None:
    app = FakeTelephony(twilio_accounts={SID: TOKEN}, calls_per_second=1000.0, call_duration=0.02)
    sink = CallbackSink()
    sink_url = "http://hooks.test"
    async with in_process(app, webhooks=httpx.ASGITransport(app=sink)) as url:  # type: ignore[arg-type]
        async with make_client(url) as twilio:
            with correlation_scope("req-42.abc") as cid:
                await twilio.create_call(
                    to=number(1),
                    from_=FROM,
                    url=TWIML_URL,
                    status_callback=f"{sink_url}/status?tenant=7",
                    status_callback_event=["initiated", "completed"],
                )
            generated = await twilio.create_call(
                to=number(2), from_=FROM, url=TWIML_URL, status_callback=f"{sink_url}/status"
            )
        with anyio.fail_after(3):
            while len(sink.queries) < 3:
                await anyio.sleep(0.01)
    headers = [r.headers.get("x-correlation-id") for r in app.requests("twilio.calls.create")]
    assert headers == [cid, generated.correlation_id]
    assert generated.correlation_id is not None
    assert generated.correlation_id != cid
    ours = [q for q in sink.queries if q.get("rv_cid") == [cid]]
    assert len(ours) == 2
    assert all(q["tenant"] == ["7"] for q in ours)
    assert [q for q in sink.queries if q.get("rv_cid") == [generated.correlation_id]]


async def test_correlation_param_can_be_disabled() -> None:
    forms: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        forms.append(parse_qs(request.content.decode()))
        return httpx.Response(201, json={"sid": "CA" + "b" * 32, "status": "queued"})

    async with TwilioClient(
        SID,
        TOKEN,
        transport=httpx.MockTransport(handler),
        correlation_param=None,
        attempt_param=None,
        calls_per_second=1000,
    ) as twilio:
        await twilio.create_call(to=number(1), from_=FROM, url=TWIML_URL)
        await twilio.create_call(to=number(1), from_=FROM, url=f"{TWIML_URL}?rv_cid=mine")
    assert forms[0]["Url"] == [TWIML_URL]
    assert forms[1]["Url"] == [f"{TWIML_URL}?rv_cid=mine"]


@pytest.mark.slow
def test_importing_the_package_does_not_import_the_sdk() -> None:
    code = (
        "import sys, json, resilient_voice.twilio;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'twilio')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC},
    ).stdout
    assert out.strip() == "[]"


def test_unknown_attribute_of_the_package() -> None:
    import resilient_voice.twilio as package

    with pytest.raises(AttributeError):
        package.nothing_here  # type: ignore[attr-defined]  # noqa: B018
    assert "TwilioClient" in dir(package)


async def test_the_attempt_parameter_is_reserved_in_callback_urls() -> None:
    twilio = TwilioClient(SID, TOKEN, base_url="http://127.0.0.1:9")
    with pytest.raises(InvalidRequestError, match="rv_attempt") as info:
        await twilio.create_call(to=number(1), from_=FROM, url=TWIML_URL + "?rv_attempt=mine")
    assert info.value.field == "url"
    await twilio.aclose()


async def test_an_unreadable_created_answer_is_an_unknown_outcome_not_a_failure() -> None:
    async def html_201(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"<html>created</html>"})

    async with local_client(html_201) as twilio:
        with pytest.raises(OutcomeUnknownError) as call_info:
            await twilio.create_call(to=number(2), from_=FROM, url=TWIML_URL)
        with pytest.raises(OutcomeUnknownError):
            await twilio.send_message(to=number(3), from_=FROM, body="hi")
    assert isinstance(call_info.value.__cause__, TwilioAPIError)


# A 201 whose body never arrives


def planted_attempt(form: dict[str, tuple[str, ...]], field: str) -> str:
    return parse_qs(urlsplit(form[field][0]).query)["rv_attempt"][0]


@pytest.mark.parametrize("stall", [False, True])
@pytest.mark.parametrize("operation", ["create_call", "send_message"])
async def test_a_create_whose_201_body_is_lost_is_an_unknown_outcome_never_resent(
    served: tuple[FakeTelephony, str], operation: str, stall: bool
) -> None:
    """Twilio created the call (or message) and its answer broke off mid-body or stalled:
    OutcomeUnknownError with the planted attempt id, one request, one resource, even though
    the default policy retries."""
    app, url = served
    endpoint = "twilio.calls.create" if operation == "create_call" else "twilio.messages.create"
    app.faults = [Fault.drop_mid_body(stall=stall, endpoints=endpoint)]
    async with make_client(url, timeout=0.5, retry=fast_retry(max_attempts=5)) as twilio:
        create = (
            twilio.create_call(to=number(40), from_=FROM, url=TWIML_URL)
            if operation == "create_call"
            else twilio.send_message(
                to=number(40), from_=FROM, body="hi", status_callback="https://e.com/sms"
            )
        )
        with pytest.raises(OutcomeUnknownError) as info:
            await create
    (record,) = app.requests(endpoint)
    assert (record.status, record.fault) == (201, "drop_mid_body")
    field = "Url" if operation == "create_call" else "StatusCallback"
    assert info.value.attempt_id == planted_attempt(record.form, field)
    created = app.calls() if operation == "create_call" else app.messages()
    assert len(created) == 1
    # Whichever bound fires first: httpx's read timeout or the policy's per-attempt timeout.
    expected = (httpx.ReadTimeout, TimeoutError) if stall else httpx.RemoteProtocolError
    assert isinstance(info.value.__cause__, expected)


@pytest.mark.parametrize("mode", ["drop", "stall"])
async def test_a_raw_201_cut_mid_body_is_an_unknown_outcome_for_the_typed_client(
    mode: Mode,
) -> None:
    body = json.dumps({"sid": "CA" + "0" * 32, "status": "queued"}).encode()
    async with (
        raw_upstream(body, mode=mode) as upstream,
        make_client(upstream.url, timeout=0.5, retry=fast_retry(max_attempts=5)) as twilio,
    ):
        with pytest.raises(OutcomeUnknownError) as info:
            await twilio.create_call(to=number(41), from_=FROM, url=TWIML_URL)
    (request,) = upstream.requests
    form = {k: tuple(v) for k, v in parse_qs(request.body.decode()).items()}
    assert info.value.attempt_id == planted_attempt(form, "Url")


# Hostile JSON from the upstream

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("status", "operation", "expected"),
    [
        (201, "create_call", OutcomeUnknownError),
        (500, "create_call", OutcomeUnknownError),
        (400, "create_call", TwilioAPIError),
        (200, "list_calls", TwilioAPIError),
        (200, "get_call", TwilioAPIError),
        (404, "get_call", TwilioAPIError),
        (503, "get_message", TwilioAPIError),
    ],
)
async def test_deeply_nested_json_is_an_unreadable_body_never_a_recursion_error(
    status: int, operation: str, expected: type[Exception]
) -> None:
    """Nesting deeper than Python's parser goes: an unknown outcome on creates, Twilio's error
    elsewhere, as for any unreadable body (never a bare RecursionError a caller may retry)."""
    async with local_client(answering(status, DEEP_JSON)) as twilio:
        calls = {
            "create_call": lambda: twilio.create_call(to=number(50), from_=FROM, url=TWIML_URL),
            "list_calls": twilio.list_calls,
            "get_call": lambda: twilio.get_call("CA" + "0" * 32),
            "get_message": lambda: twilio.get_message("SM" + "0" * 32),
        }
        with pytest.raises(expected) as info:
            await calls[operation]()
    if isinstance(info.value, TwilioAPIError):
        assert info.value.status == status
