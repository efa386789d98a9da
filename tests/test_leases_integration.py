"""Call leases end to end: the clients' ``leases=``, ``reconcile_leases()`` and
LeaseReleaseMiddleware behind the signature checks, against FakeTelephony.

In-process (httpx's ASGI transport both ways: the clients to the fake, the fake's webhooks to the
receiver) on a ManualClock with autojump, so minutes of calls run in a second; both backends.
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import pytest
from twilio.request_validator import RequestValidator

from _apps import LateCreate, leased_clients
from resilient_voice import (
    CallLeases,
    CapacityExhaustedError,
    InvalidRequestError,
    OutcomeUnknownError,
)
from resilient_voice._provider import SETTLE_AFTER
from resilient_voice.asgi import (
    LeaseReleaseMiddleware,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.events import Event, LeaseReleased
from resilient_voice.testing import CallbackFaults, FakeTelephony, ManualClock
from resilient_voice.twilio import TwilioAPIError, TwilioClient
from resilient_voice.vapi import VapiClient

SID = "AC" + "7" * 32
TOKEN = "lease-token"
VAPI_KEY = "vapi-lease-key"
VAPI_SECRET = "vapi-hook-secret"
HOOKS = "http://hooks.test"
FROM = "+14155550199"
TWIML = "https://example.com/twiml"
STATUS = f"{HOOKS}/twilio/status"
VAPI_HOOK = f"{HOOKS}/vapi/events"


def number(i: int) -> str:
    return f"+1555{i:07d}"


@dataclass
class Sink:
    """The app behind the middleware: keeps every body it was handed."""

    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@dataclass
class Released:
    """A listener counting how each lease was freed."""

    events: list[LeaseReleased] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        if isinstance(event, LeaseReleased):
            self.events.append(event)

    def per_lease(self) -> Counter[str]:
        return Counter(e.lease_id for e in self.events)

    def reasons(self) -> Counter[str]:
        return Counter(e.reason for e in self.events)


def twilio_receiver(leases: CallLeases, sink: Sink) -> Any:
    """The webhook app: the signature check outside, the lease release inside it."""
    return TwilioSignatureMiddleware(
        LeaseReleaseMiddleware(sink, leases=leases, paths=["/twilio/status"], verified=True),
        TOKEN,
        paths=["/twilio/*"],
    )


def vapi_receiver(leases: CallLeases, sink: Sink) -> Any:
    return VapiWebhookMiddleware(
        LeaseReleaseMiddleware(sink, leases=leases, paths=["/vapi/events"], verified=True),
        secret=VAPI_SECRET,
        paths=["/vapi/*"],
    )


@dataclass
class Setup:
    fake: FakeTelephony
    clock: ManualClock
    leases: CallLeases
    released: Released
    sink: Sink
    twilio: TwilioClient
    vapi: VapiClient


@asynccontextmanager
async def setup(
    *,
    capacity: int = 5,
    ttl: float = 600.0,
    capacity_recovery: float = 30.0,
    transport: Callable[[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport] | None = None,
    **fake_options: Any,
) -> AsyncIterator[Setup]:
    clock = ManualClock(autojump=True)
    released = Released()
    leases = CallLeases(
        "acct",
        capacity,
        ttl=ttl,
        clock=clock,
        capacity_recovery=capacity_recovery,
        listeners=[released],
    )
    fake_options.setdefault("calls_per_second", 1000.0)
    fake = FakeTelephony(
        twilio_accounts={SID: TOKEN},
        vapi_api_keys=[VAPI_KEY],
        vapi_server_url=VAPI_HOOK,
        vapi_credential=VAPI_SECRET,
        clock=clock,
        **fake_options,
    )
    sink = Sink()

    async def receiver(scope: Any, receive: Any, send: Any) -> None:
        app = twilio_receiver if scope.get("path", "").startswith("/twilio") else vapi_receiver
        await app(leases, sink)(scope, receive, send)

    upstream: httpx.AsyncBaseTransport = httpx.ASGITransport(app=fake)
    if transport is not None:
        upstream = transport(upstream)
    async with (
        fake.running(webhook_transport=httpx.ASGITransport(app=receiver)),
        anyio.create_task_group() as ticking,
    ):
        # Autojump moves time only while some task sleeps on the clock: this one always does,
        # so waits on deadline scopes alone (an acquire's timeout) are driven too.
        ticking.start_soon(every, clock, 3600.0, _nothing)
        twilio, vapi = leased_clients(
            upstream, clock, leases, sid=SID, token=TOKEN, vapi_key=VAPI_KEY
        )
        async with twilio, vapi:
            yield Setup(fake, clock, leases, released, sink, twilio, vapi)
        ticking.cancel_scope.cancel()


async def _nothing() -> None:
    pass


async def until(clock: ManualClock, done: Callable[[], bool], limit: float = 3600.0) -> None:
    """Let simulated time pass (autojump) until ``done()``; fail after ``limit`` seconds of it."""
    start = clock.now()
    while not done():
        assert clock.now() - start < limit, "simulated time ran out"
        await clock.sleep(1.0)


async def every(clock: ManualClock, seconds: float, action: Callable[[], Any]) -> None:
    while True:
        await clock.sleep(seconds)
        await action()


CAMPAIGN = 500


async def campaign(one: Callable[[int], Any], *, workers: int) -> None:
    """Place ``CAMPAIGN`` calls from ``workers`` concurrent callers (more than the capacity,
    so that the leases, not the callers, bound what is in progress)."""
    numbers = iter(range(CAMPAIGN))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(worker)


CAMPAIGN_FAULTS = CallbackFaults(loss=0.05, duplicate=0.1, reorder=0.2, reorder_delay=5.0)


async def test_twilio_campaign_never_exceeds_capacity_and_releases_each_lease_once() -> None:
    capacity = 5
    async with setup(
        capacity=capacity,
        call_duration=(5.0, 60.0),
        ring_duration=(0.0, 10.0),
        callback_delay=(0.0, 3.0),
        callback_faults=CAMPAIGN_FAULTS,
        twilio_call_concurrency_limit=capacity,
    ) as s:
        sids: list[str] = []

        async def one(i: int) -> None:
            call = await s.twilio.create_call(
                to=number(i), from_=FROM, url=TWIML, status_callback=STATUS
            )
            sids.append(call.sid)

        async with anyio.create_task_group() as group:
            group.start_soon(every, s.clock, 30.0, s.twilio.reconcile_leases)
            await campaign(one, workers=3 * capacity)
            await until(s.clock, lambda: s.leases.statistics().in_use == 0)
            group.cancel_scope.cancel()
        stats = s.leases.statistics()
    assert len(sids) == len(set(sids)) == CAMPAIGN
    assert s.fake.peak_calls_in_progress("twilio") == capacity  # full, never over
    failed = [c for c in s.fake.callbacks() if c.status == "failed"]
    assert failed == []  # no call ever met Twilio's 10004
    per_lease = s.released.per_lease()
    assert len(per_lease) == CAMPAIGN
    assert set(per_lease.values()) == {1}  # every lease released exactly once
    reasons = s.released.reasons()
    assert reasons["webhook"] > CAMPAIGN * 0.85
    assert reasons["reconcile"] > 0  # the lost callbacks' leases
    assert reasons["ttl"] == 0
    assert stats.capacity_signals == 0
    lost = [c for c in s.fake.callbacks() if c.lost]
    duplicated = [c for c in s.fake.callbacks() if c.duplicate]
    assert lost
    assert duplicated


def vapi_create(s: Setup, i: int) -> Any:
    return s.vapi.create_call(
        assistant_id=s.fake.vapi_assistants()[0]["id"],
        phone_number_id=s.fake.vapi_phone_numbers()[0]["id"],
        customer_number=number(i),
    )


async def test_vapi_campaign_never_exceeds_capacity_and_releases_each_lease_once() -> None:
    capacity = 4
    async with setup(
        capacity=capacity,
        call_duration=(5.0, 60.0),
        ring_duration=(0.0, 10.0),
        callback_delay=(0.0, 3.0),
        callback_faults=CAMPAIGN_FAULTS,
        vapi_concurrency_limit=capacity,
    ) as s:
        ids: list[str] = []
        blocked: list[str] = []

        async def one(i: int) -> None:
            call = await vapi_create(s, i)
            ids.append(call.id)
            if call.concurrency_blocked:
                blocked.append(call.id)

        async with anyio.create_task_group() as group:
            group.start_soon(every, s.clock, 30.0, s.vapi.reconcile_leases)
            await campaign(one, workers=3 * capacity)
            await until(s.clock, lambda: s.leases.statistics().in_use == 0)
            group.cancel_scope.cancel()
    assert len(set(ids)) == CAMPAIGN
    assert blocked == []
    assert s.fake.peak_calls_in_progress("vapi") == capacity
    per_lease = s.released.per_lease()
    assert len(per_lease) == CAMPAIGN
    assert set(per_lease.values()) == {1}
    reasons = s.released.reasons()
    # A call sends status-update(ended) and end-of-call-report: both lost is rare.
    assert reasons["webhook"] > CAMPAIGN * 0.95
    assert reasons["ttl"] == 0


async def test_lost_callbacks_are_reclaimed_by_ttl_without_reconciliation() -> None:
    async with setup(
        capacity=2, ttl=120.0, call_duration=10.0, callback_faults=CallbackFaults(loss=1.0)
    ) as s:
        for i in range(2):
            await s.twilio.create_call(to=number(i), from_=FROM, url=TWIML, status_callback=STATUS)
        with pytest.raises(CapacityExhaustedError):
            await s.leases.acquire(timeout=0)
        await s.clock.sleep(60.0)
        assert s.leases.statistics().in_use == 2  # the calls ended, nobody said so
        await until(s.clock, lambda: s.leases.statistics().in_use == 0)
        assert s.clock.now() >= 120.0
    assert s.released.reasons() == Counter(ttl=2)


async def test_reconcile_leases_frees_only_calls_that_ended() -> None:
    async with setup(
        capacity=3, call_duration=100.0, callback_faults=CallbackFaults(loss=1.0)
    ) as s:
        short = await s.twilio.create_call(
            to=number(1), from_=FROM, url=TWIML, status_callback=STATUS
        )
        await s.twilio.update_call(short.sid, status="completed")
        long = await s.twilio.create_call(
            to=number(2), from_=FROM, url=TWIML, status_callback=STATUS
        )
        assert await s.twilio.reconcile_leases() == 1
        assert s.leases.statistics().in_use == 1
        assert [e.call_id for e in s.released.events] == [short.sid]
        assert await s.twilio.reconcile_leases() == 0  # nothing twice
    assert long.sid != short.sid


async def test_a_stale_generation_frees_nothing() -> None:
    async with setup(capacity=2, call_duration=30.0, status_callbacks=False) as s:
        call = await s.twilio.create_call(
            to=number(1), from_=FROM, url=TWIML, status_callback=STATUS
        )
        receiver = twilio_receiver(s.leases, s.sink)
        planted = parse_qs(urlsplit(s.fake.calls()[0].callback_url or "").query)
        generation = int(planted["rv_lease_gen"][0])
        async with signed_client(receiver) as client:
            stale = await post_status(client, call.sid, "completed", generation - 1)
            assert stale.status_code == 204
            assert s.leases.statistics().in_use == 1
            fresh = await post_status(client, call.sid, "completed", generation)
            again = await post_status(client, call.sid, "completed", generation)
        assert (fresh.status_code, again.status_code) == (204, 204)
        assert s.leases.statistics().in_use == 0
    assert s.released.reasons() == Counter(webhook=1)
    assert len(s.sink.bodies) == 3  # every request reached the app


@asynccontextmanager
async def signed_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=HOOKS) as c:
        yield c


def post_status(
    client: httpx.AsyncClient,
    call_sid: str,
    status: str,
    generation: int,
    *,
    lease: str = "x",
    extra: dict[str, str] | None = None,
) -> Any:
    url = f"{STATUS}?{urlencode({'rv_lease': lease, 'rv_lease_gen': generation})}"
    form = {"CallSid": call_sid, "CallStatus": status, "AccountSid": SID, **(extra or {})}
    signature = RequestValidator(TOKEN).compute_signature(url, form)
    return client.post(url, data=form, headers={"X-Twilio-Signature": signature})


async def test_a_webhook_before_the_bind_frees_the_lease_when_the_bind_comes() -> None:
    async with setup(capacity=1, status_callbacks=False) as s:
        lease = await s.leases.acquire()
        async with signed_client(twilio_receiver(s.leases, s.sink)) as client:
            await post_status(client, "CA" + "1" * 32, "completed", lease.generation)
        assert s.leases.statistics().in_use == 1
        await s.leases.bind(lease, "CA" + "1" * 32)
        assert s.leases.statistics().in_use == 0


async def test_capacity_halves_on_10004_and_recovers() -> None:
    async with setup(
        capacity=8,
        capacity_recovery=10.0,
        call_duration=20.0,
        twilio_call_concurrency_limit=2,
    ) as s:
        async with anyio.create_task_group() as group:
            for i in range(6):
                group.start_soon(
                    lambda i=i: s.twilio.create_call(
                        to=number(i), from_=FROM, url=TWIML, status_callback=STATUS
                    )
                )
        await until(s.clock, lambda: s.leases.statistics().capacity_signals >= 4)
        low = s.leases.statistics()
        assert low.effective_capacity < 8
        failed = [c for c in s.fake.callbacks() if c.status == "failed"]
        assert len(failed) == 4  # six calls, two slots at Twilio
        await until(s.clock, lambda: s.leases.statistics().in_use == 0)
        start = s.clock.now()
        await until(s.clock, lambda: s.leases.statistics().effective_capacity == 8)
        recovered_after = s.clock.now() - start
    assert low.effective_capacity == 1  # 8 -> 4 -> 2 -> 1 -> 1
    assert recovered_after <= 8 * 10.0 + 1


@pytest.mark.parametrize("code", ["10004", "86008", "64109"])
async def test_each_concurrency_code_on_a_failed_call_is_a_signal(code: str) -> None:
    async with setup(capacity=4, status_callbacks=False) as s:
        async with signed_client(twilio_receiver(s.leases, s.sink)) as client:
            await post_status(client, "CA" + "2" * 32, "failed", 1, extra={"ErrorCode": code})
            await post_status(client, "CA" + "3" * 32, "failed", 2, extra={"ErrorCode": "13224"})
            await post_status(client, "CA" + "4" * 32, "busy", 3, extra={"ErrorCode": code})
        stats = s.leases.statistics()
    assert (stats.capacity_signals, stats.effective_capacity) == (1, 2)


class DropAfter(httpx.AsyncBaseTransport):
    """Sends to the fake, then loses the answer of the first ``count`` call creates."""

    def __init__(self, inner: httpx.AsyncBaseTransport, count: int = 1) -> None:
        self._inner = inner
        self._left = count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        create = request.method == "POST" and request.url.path.endswith(("/Calls.json", "/call"))
        if create and self._left:
            self._left -= 1
            await response.aread()
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return response


async def test_twilio_unknown_outcome_is_settled_by_reconcile_leases() -> None:
    async with setup(
        capacity=2,
        call_duration=300.0,
        status_callbacks=False,
        transport=lambda inner: DropAfter(inner, 1),
    ) as s:
        with pytest.raises(OutcomeUnknownError) as info:
            await s.twilio.create_call(to=number(1), from_=FROM, url=TWIML, status_callback=STATUS)
        (unknown,) = await s.leases.unknown()
        assert unknown.attempt_id == info.value.attempt_id
        (created,) = s.fake.calls("twilio")
        await s.twilio.reconcile_leases()  # found: bound at once, however young the lease
        assert await s.leases.unknown() == ()
        assert s.leases.statistics().in_use == 1  # bound to the call that was created
        await s.twilio.update_call(created.id, status="completed")
        await s.clock.sleep(1.0)  # a binding is reconciled by a list fetched after it
        assert await s.twilio.reconcile_leases() == 1
    assert [e.call_id for e in s.released.events] == [created.id]


async def test_an_unknown_outcome_that_created_nothing_is_released_after_settle_after() -> None:
    from resilient_voice.testing import Fault

    async with setup(
        capacity=2,
        status_callbacks=False,
        faults=[Fault.burst(1, status=500, endpoints=["twilio.calls.create", "vapi.calls.create"])],
    ) as s:
        with pytest.raises(OutcomeUnknownError):
            await s.twilio.create_call(to=number(1), from_=FROM, url=TWIML, status_callback=STATUS)
        assert len(await s.leases.unknown()) == 1
        assert s.fake.calls() == []
        await s.twilio.reconcile_leases()  # too young to tell "not created" from "not yet"
        assert len(await s.leases.unknown()) == 1
        await s.clock.sleep(SETTLE_AFTER)
        await s.twilio.reconcile_leases()
        assert await s.leases.unknown() == ()
        assert s.leases.statistics().in_use == 0
    assert s.released.reasons() == Counter(lease=1)


async def test_vapi_unknown_outcome_is_settled_by_reconcile_leases() -> None:
    async with setup(
        capacity=2,
        call_duration=300.0,
        status_callbacks=False,
        transport=lambda inner: DropAfter(inner, 1),
    ) as s:
        with pytest.raises(OutcomeUnknownError):
            await vapi_create(s, 1)
        (created,) = s.fake.calls("vapi")
        assert len(await s.leases.unknown()) == 1
        assert await s.vapi.reconcile_leases() == 0  # found: bound at once, however young
        assert await s.leases.unknown() == ()
        assert s.leases.statistics().in_use == 1
        await s.clock.sleep(301.0)  # the call ends; its report is not sent (status_callbacks off)
        assert await s.vapi.reconcile_leases() == 1
    assert [e.call_id for e in s.released.events] == [created.id]


def create_for(s: Setup, provider: str) -> Any:
    if provider == "twilio":
        return s.twilio.create_call(to=number(1), from_=FROM, url=TWIML, status_callback=STATUS)
    return vapi_create(s, 1)


def reconcile_for(s: Setup, provider: str) -> Callable[..., Any]:
    return s.twilio.reconcile_leases if provider == "twilio" else s.vapi.reconcile_leases


PROVIDERS = pytest.mark.parametrize("provider", ["twilio", "vapi"])


@PROVIDERS
async def test_a_create_processed_after_the_client_gave_up_keeps_its_lease(provider: str) -> None:
    late: list[LateCreate] = []

    def wrap(inner: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        late.append(LateCreate(inner))
        return late[0]

    async with setup(capacity=1, call_duration=300.0, status_callbacks=False, transport=wrap) as s:
        reconcile = reconcile_for(s, provider)
        with pytest.raises(OutcomeUnknownError):
            await create_for(s, provider)
        assert s.fake.calls() == []
        # No call listed yet, but the create is young: the slot stays held, so a second
        # create cannot take it while the first may still become a call.
        assert await reconcile(settle_after=60.0) == 0
        await s.clock.sleep(30.0)
        assert await reconcile(settle_after=60.0) == 0
        assert len(await s.leases.unknown()) == 1
        with pytest.raises(CapacityExhaustedError):
            await s.leases.acquire(timeout=0)
        await late[0].deliver()  # the provider gets round to it: the call exists now
        (created,) = s.fake.calls(provider)
        await s.clock.sleep(30.0)  # the lease is 60 s old: found, so bound, not released
        assert await reconcile(settle_after=60.0) == 0
        assert await s.leases.unknown() == ()
        assert s.leases.statistics().in_use == 1
        await s.clock.sleep(300.0)  # the call ends; nobody reports it (status_callbacks off)
        if provider == "twilio":
            await s.twilio.update_call(created.id, status="completed")
        assert await reconcile(settle_after=60.0) == 1
    assert [e.call_id for e in s.released.events] == [created.id]
    assert s.fake.peak_calls_in_progress(provider) == 1


@PROVIDERS
async def test_an_unknown_outcome_without_a_call_is_held_until_settle_after(provider: str) -> None:
    late: list[LateCreate] = []

    def wrap(inner: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        late.append(LateCreate(inner))
        return late[0]

    async with setup(capacity=1, status_callbacks=False, transport=wrap) as s:
        reconcile = reconcile_for(s, provider)
        with pytest.raises(OutcomeUnknownError):
            await create_for(s, provider)
        (lease,) = await s.leases.unknown()
        start = lease.acquired_at
        await reconcile(settle_after=10.0)
        await s.clock.sleep_until(start + 9.5)
        await reconcile(settle_after=10.0)
        assert len(await s.leases.unknown()) == 1
        await s.clock.sleep_until(start + 10.0)
        await reconcile(settle_after=10.0)
        assert await s.leases.unknown() == ()
        assert s.leases.statistics().in_use == 0
        (event,) = s.released.events
    assert (event.lease_id, event.reason) == (lease.id, "lease")
    assert s.fake.calls() == []


@PROVIDERS
async def test_reconcile_leases_waits_settle_after_by_default(provider: str) -> None:
    async with setup(capacity=1, status_callbacks=False, transport=LateCreate) as s:
        reconcile = reconcile_for(s, provider)
        with pytest.raises(OutcomeUnknownError):
            await create_for(s, provider)
        (lease,) = await s.leases.unknown()
        await s.clock.sleep_until(lease.acquired_at + SETTLE_AFTER - 1.0)
        await reconcile()
        assert len(await s.leases.unknown()) == 1
        await s.clock.sleep(1.0)
        await reconcile()
        assert await s.leases.unknown() == ()
    assert SETTLE_AFTER == 120.0
    for method in (TwilioClient.reconcile_leases, VapiClient.reconcile_leases):
        parameter = inspect.signature(method).parameters["settle_after"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
        assert parameter.default == SETTLE_AFTER


@PROVIDERS
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (10**400, ValueError),
        ("60", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
async def test_a_bad_settle_after_is_refused_before_anything_is_read(
    provider: str, value: Any, error: type[Exception]
) -> None:
    async with setup(capacity=1, status_callbacks=False) as s:
        with pytest.raises(error, match="settle_after"):
            await reconcile_for(s, provider)(settle_after=value)
        assert s.fake.requests() == []


async def test_a_definite_failure_releases_the_lease_and_nothing_waits() -> None:
    async with setup(capacity=1, status_callbacks=False) as s:
        wrong = TwilioClient(
            SID,
            "not-the-token",
            base_url="http://127.0.0.1",
            transport=httpx.ASGITransport(app=s.fake),
            clock=s.clock,
            leases=s.leases,
        )
        async with wrong:
            with pytest.raises(TwilioAPIError):
                await wrong.create_call(to=number(1), from_=FROM, url=TWIML, status_callback=STATUS)
        assert s.leases.statistics().in_use == 0
        assert s.released.reasons() == Counter(lease=1)


async def test_capacity_exhausted_sends_nothing() -> None:
    async with setup(capacity=1, call_duration=50.0, status_callbacks=False) as s:
        busy = TwilioClient(
            SID,
            TOKEN,
            base_url="http://127.0.0.1",
            transport=httpx.ASGITransport(app=s.fake),
            clock=s.clock,
            leases=s.leases,
            lease_timeout=5.0,
        )
        async with busy:
            await busy.create_call(to=number(1), from_=FROM, url=TWIML, status_callback=STATUS)
            with pytest.raises(CapacityExhaustedError):
                await busy.create_call(to=number(2), from_=FROM, url=TWIML, status_callback=STATUS)
    assert len(s.fake.requests("twilio.calls.create")) == 1


async def test_creates_that_could_not_release_their_lease_are_refused_before_sending() -> None:
    async with setup(capacity=1, status_callbacks=False) as s:
        with pytest.raises(InvalidRequestError) as no_callback:
            await s.twilio.create_call(to=number(1), from_=FROM, url=TWIML)
        with pytest.raises(InvalidRequestError) as no_completed:
            await s.twilio.create_call(
                to=number(1),
                from_=FROM,
                url=TWIML,
                status_callback=STATUS,
                status_callback_event=["initiated", "answered"],
            )
        plain = VapiClient(
            VAPI_KEY,
            base_url="http://127.0.0.1",
            transport=httpx.ASGITransport(app=s.fake),
            leases=s.leases,
        )
        async with plain:
            with pytest.raises(InvalidRequestError) as no_server:
                await plain.create_call(
                    assistant_id=s.fake.vapi_assistants()[0]["id"],
                    phone_number_id=s.fake.vapi_phone_numbers()[0]["id"],
                    customer_number=number(1),
                )
            call = await plain.create_call(
                assistant_id=s.fake.vapi_assistants()[0]["id"],
                phone_number_id=s.fake.vapi_phone_numbers()[0]["id"],
                customer_number=number(2),
                assistant_overrides={"server": {"url": VAPI_HOOK}},
            )
        assert s.leases.statistics().in_use == 1
    assert (no_callback.value.field, no_completed.value.field) == (
        "status_callback",
        "status_callback_event",
    )
    assert no_server.value.field == "assistant_overrides"
    assert "server URL" in str(no_server.value)
    assert len(s.fake.requests("*.calls.create")) == 1
    assert isinstance(call.metadata["rv_lease_gen"], int)


async def test_the_lease_is_planted_next_to_the_attempt_id() -> None:
    async with setup(capacity=2, status_callbacks=False) as s:
        call = await s.twilio.create_call(
            to=number(1), from_=FROM, url=f"{TWIML}?a=1", status_callback=f"{STATUS}?t=7"
        )
        vcall = await vapi_create(s, 2)
    form = s.fake.requests("twilio.calls.create")[0].form
    status = parse_qs(urlsplit(form["StatusCallback"][0]).query)
    twiml = parse_qs(urlsplit(form["Url"][0]).query)
    for query in (status, twiml):
        assert query["rv_attempt"] == [call.attempt_id]
        assert query["rv_lease"][0]
        assert int(query["rv_lease_gen"][0]) >= 1
    assert status["t"] == ["7"]
    assert twiml["a"] == ["1"]
    metadata = vcall.metadata
    assert metadata["rv_attempt_id"] == vcall.attempt_id
    assert isinstance(metadata["rv_lease"], str)
    assert metadata["rv_lease_gen"] > int(status["rv_lease_gen"][0])


async def test_vapi_subscription_limits_set_the_capacity() -> None:
    async with setup(capacity=4, call_duration=30.0, vapi_concurrency_limit=1) as s:
        first = await vapi_create(s, 1)
        assert s.leases.statistics().effective_capacity == 1  # set from subscriptionLimits
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: vapi_create(s, 2))
            await s.clock.sleep(1.0)
            assert s.leases.statistics().waiting == 1  # the second waits for the first's slot
        stats = s.leases.statistics()
        await until(s.clock, lambda: s.leases.statistics().in_use == 0)
    assert not first.concurrency_blocked
    assert stats.capacity_signals == 0
    assert s.released.reasons() == Counter(webhook=2)


async def test_vapi_blocked_create_is_a_signal_and_its_report_frees_the_lease() -> None:
    async with setup(capacity=4, call_duration=30.0, vapi_concurrency_limit=1) as s:
        outside = s.fake.vapi_phone_numbers()[0]["id"]
        # A call the leases do not know of takes the org's only slot.
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=s.fake), base_url="http://127.0.0.1"
        ) as raw:
            answer = await raw.post(
                "/call",
                json={
                    "assistantId": s.fake.vapi_assistants()[0]["id"],
                    "phoneNumberId": outside,
                    "customer": {"number": number(9)},
                },
                headers={"Authorization": f"Bearer {VAPI_KEY}"},
            )
            assert answer.status_code == 201
        blocked = await vapi_create(s, 1)
        assert blocked.concurrency_blocked
        stats = s.leases.statistics()
        assert (stats.capacity_signals, stats.effective_capacity) == (1, 2)
        await until(s.clock, lambda: s.leases.statistics().in_use == 0)
        signals = s.leases.statistics().capacity_signals
    assert signals == 1  # its end report carried the lease: no second signal
    assert [e.call_id for e in s.released.events] == [blocked.id]


async def test_vapi_concurrency_end_of_a_call_without_lease_is_a_signal() -> None:
    async with setup(capacity=4, status_callbacks=False) as s:
        body = {
            "message": {
                "type": "end-of-call-report",
                "endedReason": "call.start.error-subscription-concurrency-limit-reached",
                "call": {"id": "call-1"},
            }
        }
        async with signed_client(vapi_receiver(s.leases, s.sink)) as client:
            for _ in range(2):  # a duplicate is a second signal: Vapi does not retry, rare
                answer = await client.post(
                    "/vapi/events", json=body, headers={"X-Vapi-Secret": VAPI_SECRET}
                )
                assert answer.status_code == 204
            status = {**body["message"], "type": "status-update", "status": "ended"}
            await client.post(
                "/vapi/events", json={"message": status}, headers={"X-Vapi-Secret": VAPI_SECRET}
            )
        stats = s.leases.statistics()
    assert stats.capacity_signals == 2
    assert [json.loads(b)["message"]["type"] for b in s.sink.bodies] == [
        "end-of-call-report",
        "end-of-call-report",
        "status-update",
    ]


async def test_the_lease_parameters_are_reserved_in_callback_urls() -> None:
    async with setup(capacity=1, status_callbacks=False) as s:
        with pytest.raises(InvalidRequestError, match="reserved") as info:
            await s.twilio.create_call(
                to=number(1), from_=FROM, url=TWIML, status_callback=f"{STATUS}?rv_lease_gen=9"
            )
        assert s.leases.statistics().in_use == 0
    assert info.value.field == "status_callback"
    assert s.fake.requests() == []


@asynccontextmanager
async def other_replica(s: Setup) -> AsyncIterator[TwilioClient]:
    """Another replica's TwilioClient on the same lease set: it sent none of the creates (the
    replica that did may have crashed), so all it knows is what the leases store."""
    async with TwilioClient(
        SID,
        TOKEN,
        base_url="http://127.0.0.1",
        transport=httpx.ASGITransport(app=s.fake),
        clock=s.clock,
        calls_per_second=1000.0,
        leases=s.leases,
    ) as client:
        yield client


async def test_a_twilio_unknown_outcome_is_bound_by_another_replica() -> None:
    async with setup(
        capacity=2,
        call_duration=300.0,
        status_callbacks=False,
        transport=lambda inner: DropAfter(inner, 1),
    ) as s:
        with pytest.raises(OutcomeUnknownError):
            await s.twilio.create_call(to=number(1), from_=FROM, url=TWIML, status_callback=STATUS)
        (created,) = s.fake.calls("twilio")
        (marked,) = await s.leases.unknown()
        context = json.loads(marked.context or "null")
        assert (context["to"], context["from"]) == (number(1), FROM)
        async with other_replica(s) as replica:
            assert await replica.reconcile_leases() == 0  # found: bound at once
            assert await s.leases.unknown() == ()
            assert s.leases.statistics().in_use == 1
            await s.twilio.update_call(created.id, status="completed")
            await s.clock.sleep(1.0)
            assert await replica.reconcile_leases() == 1
    assert [e.call_id for e in s.released.events] == [created.id]


async def test_a_twilio_unknown_outcome_without_a_call_is_released_by_another_replica() -> None:
    from resilient_voice.testing import Fault

    async with setup(
        capacity=2,
        status_callbacks=False,
        faults=[Fault.burst(1, status=500, endpoints=["twilio.calls.create"])],
    ) as s:
        with pytest.raises(OutcomeUnknownError):
            await s.twilio.create_call(to=number(1), from_=FROM, url=TWIML, status_callback=STATUS)
        (lease,) = await s.leases.unknown()
        assert lease.marked_at is not None
        async with other_replica(s) as replica:
            await replica.reconcile_leases(settle_after=10.0)
            await s.clock.sleep_until(lease.marked_at + 9.5)
            await replica.reconcile_leases(settle_after=10.0)
            assert len(await s.leases.unknown()) == 1  # too young to tell "not yet" from "not"
            await s.clock.sleep_until(lease.marked_at + 10.0)
            await replica.reconcile_leases(settle_after=10.0)
        assert await s.leases.unknown() == ()
        assert s.leases.statistics().in_use == 0
    assert s.released.reasons() == Counter(lease=1)
    assert s.fake.calls() == []


async def test_settle_after_counts_from_the_unknown_mark_not_the_acquire() -> None:
    """A create that waited long (rate limits, retries) before its outcome became unknown: the
    provider may still process it up to ``settle_after`` after the client gave up."""
    from resilient_voice.twilio._client import _match_context

    async with setup(capacity=1, ttl=3600.0, status_callbacks=False) as s:
        lease = await s.leases.acquire()
        await s.clock.sleep(600.0)
        context = _match_context(number(1), FROM, datetime.now(UTC) - timedelta(seconds=5))
        marked = await s.leases.mark_unknown(lease, "att-late", context=context)
        assert marked.marked_at == s.clock.now()
        await s.twilio.reconcile_leases(settle_after=120.0)  # 600 s after the acquire: held
        assert len(await s.leases.unknown()) == 1
        await s.clock.sleep_until(marked.marked_at + 119.0)
        await s.twilio.reconcile_leases(settle_after=120.0)
        assert len(await s.leases.unknown()) == 1
        await s.clock.sleep_until(marked.marked_at + 120.0)
        await s.twilio.reconcile_leases(settle_after=120.0)
        assert await s.leases.unknown() == ()
    assert s.released.reasons() == Counter(lease=1)


@pytest.mark.parametrize("context", [None, "not json", "[1,2]", '{"to":"+1","from":2,"since":1}'])
async def test_twilio_leaves_a_lease_whose_context_it_cannot_read_to_the_ttl(
    context: str | None,
) -> None:
    async with setup(capacity=1, status_callbacks=False) as s:
        await s.leases.mark_unknown(await s.leases.acquire(), "att-x", context=context)
        await s.clock.sleep(SETTLE_AFTER + 1.0)
        await s.twilio.reconcile_leases()
        assert len(await s.leases.unknown()) == 1
