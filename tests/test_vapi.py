"""VapiClient against FakeTelephony (and tiny ASGI apps), on asyncio and trio.

Upstreams run in-process through httpx's ASGI transport, unless a test is about what real
sockets do (a lost or cut answer): those use the ``served`` fixture, and one create runs both
ways as a loopback smoke test.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from resilient_voice.events import ConcurrencyBlocked, Event, RequestFinished
from resilient_voice.policy import Policy
from resilient_voice.testing import FakeTelephony, Fault, ManualClock, serve
from resilient_voice.vapi import (
    CallStatus,
    CallType,
    PhoneNumberStatus,
    VapiAPIError,
    VapiAuthenticationError,
    VapiCall,
    VapiClient,
    VapiConcurrencyLimitError,
    attempt_overrides,
    default_policies,
)

KEY = "vapi-private-key-0123"
NUMBER = "+14155550100"


def fast_policy(*, breaker: CircuitBreaker | None = None, attempts: int = 3) -> Policy:
    return Policy(
        breaker=breaker,
        retry=RetryPolicy(max_attempts=attempts, base_delay=0.001, max_delay=0.05),
    )


LOCAL = "http://127.0.0.1"  # the base URL of clients whose transport is in-process


def asgi(app: Callable[..., Awaitable[None]]) -> dict[str, Any]:
    """Client options that send every request to ``app`` in-process."""
    return {"base_url": LOCAL, "transport": httpx.ASGITransport(app=app)}


@dataclass
class Upstream:
    app: FakeTelephony
    url: str
    assistant_id: str
    phone_number_id: str
    transport: httpx.AsyncBaseTransport | None = None  # None: over loopback at ``url``

    def client(self, **options: Any) -> VapiClient:
        options.setdefault("policy", fast_policy())
        if self.transport is not None:
            options.setdefault("transport", self.transport)
        return VapiClient(KEY, base_url=self.url, **options)

    def create_requests(self) -> list[Any]:
        return [r.json for r in self.app.requests("vapi.calls.create")]


def vapi_fake(**options: Any) -> FakeTelephony:
    return FakeTelephony(
        vapi_api_keys=[KEY],
        status_callbacks=False,
        call_duration=5.0,
        vapi_assistants=[{"name": "Support", "brandNewField": {"nested": [1, 2]}}],
        **options,
    )


@contextlib.asynccontextmanager
async def in_process(app: FakeTelephony) -> AsyncIterator[Upstream]:
    async with app.running():
        yield Upstream(
            app,
            LOCAL,
            app.vapi_assistants()[0]["id"],
            app.vapi_phone_numbers()[0]["id"],
            httpx.ASGITransport(app=app),
        )


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with in_process(vapi_fake()) as up:
        yield up


@pytest.fixture
async def served() -> AsyncIterator[Upstream]:
    """The fake behind ``serve``, for what only real sockets show."""
    app = vapi_fake()
    async with serve(app) as url:
        yield Upstream(app, url, app.vapi_assistants()[0]["id"], app.vapi_phone_numbers()[0]["id"])


@pytest.fixture(params=["upstream", "served"])
def either(request: pytest.FixtureRequest) -> Upstream:
    """Both of the above, for the create that also smoke-tests the loopback path."""
    value: Upstream = request.getfixturevalue(request.param)
    return value


async def create(up: Upstream, client: VapiClient, **options: Any) -> VapiCall:
    options.setdefault("customer_number", NUMBER)
    return await client.create_call(
        assistant_id=up.assistant_id, phone_number_id=up.phone_number_id, **options
    )


# Happy paths


async def test_create_call_plants_ids_keeps_user_metadata_and_name(either: Upstream) -> None:
    upstream = either
    overrides = {"variableValues": {"first": "Ada"}, "metadata": {"crm": "42", "rv_cid": "x"}}
    async with upstream.client() as vapi:
        with correlation_scope("req-7"):
            call = await create(upstream, vapi, assistant_overrides=overrides, name="Follow-up")
    assert call.status is CallStatus.QUEUED
    assert call.type is CallType.OUTBOUND_PHONE_CALL
    assert call.name == "Follow-up"
    assert call.customer is not None
    assert call.customer.number == NUMBER
    assert call.correlation_id == "req-7"
    assert call.attempt_id is not None
    (sent,) = upstream.create_requests()
    assert sent["name"] == "Follow-up"
    assert sent["assistantOverrides"]["variableValues"] == {"first": "Ada"}
    assert sent["assistantOverrides"]["metadata"] == {
        "crm": "42",
        "rv_attempt_id": call.attempt_id,
        "rv_cid": "req-7",
    }
    assert overrides["metadata"] == {"crm": "42", "rv_cid": "x"}  # the caller's dict untouched
    assert upstream.app.requests("vapi.calls.create")[0].headers["x-correlation-id"] == "req-7"


async def test_without_a_correlation_id_only_the_attempt_id_is_planted(
    upstream: Upstream,
) -> None:
    async with upstream.client() as vapi:
        call = await create(upstream, vapi)
    assert set(call.metadata) == {"rv_attempt_id"}
    assert call.correlation_id is None


async def test_each_create_gets_a_fresh_attempt_id(upstream: Upstream) -> None:
    async with upstream.client() as vapi:
        first = await create(upstream, vapi)
        second = await create(upstream, vapi, customer_number="+14155550101")
    assert first.attempt_id != second.attempt_id


async def test_reads_and_assistant_update(upstream: Upstream) -> None:
    async with upstream.client() as vapi:
        call = await create(upstream, vapi)
        fetched = await vapi.get_call(call.id)
        listed = await vapi.list_calls(
            assistant_id=upstream.assistant_id,
            created_at_gt=datetime.now(UTC) - timedelta(minutes=5),
            limit=10,
        )
        assistants = await vapi.list_assistants(limit=5)
        assistant = await vapi.get_assistant(upstream.assistant_id)
        updated = await vapi.update_assistant(
            upstream.assistant_id, first_message="Hi again", metadata={"tier": "gold"}
        )
        numbers = await vapi.list_phone_numbers()
    assert fetched.id == call.id
    assert fetched.attempt_id == call.attempt_id
    assert [c.id for c in listed] == [call.id]
    assert [a.id for a in assistants] == [upstream.assistant_id]
    assert assistant.name == "Support"
    assert updated.first_message == "Hi again"
    assert updated.metadata == {"tier": "gold"}
    (patch,) = upstream.app.requests("vapi.assistants.update")
    assert patch.json == {"firstMessage": "Hi again", "metadata": {"tier": "gold"}}
    assert numbers[0].id == upstream.phone_number_id
    assert numbers[0].status is PhoneNumberStatus.ACTIVE
    assert numbers[0].model_extra is not None
    assert "twilioAccountSid" in numbers[0].model_extra
    query = upstream.app.requests("vapi.calls.list")[0].query
    assert query["assistantId"] == (upstream.assistant_id,)
    assert query["limit"] == ("10",)
    assert query["createdAtGt"][0].endswith("Z")


async def test_unknown_assistant_fields_are_kept(upstream: Upstream) -> None:
    async with upstream.client() as vapi:
        assistant = await vapi.get_assistant(upstream.assistant_id)
    assert assistant.model_extra == {"brandNewField": {"nested": [1, 2]}}
    assert assistant.to_json_dict()["brandNewField"] == {"nested": [1, 2]}


# Tiny upstreams for answers the fake does not give

Handler = Callable[[dict[str, Any]], Awaitable[tuple[int, dict[str, str], Any]]]


def json_app(handler: Handler) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        status, headers, payload = await handler(scope)
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    *((k.encode(), v.encode()) for k, v in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    return app


FUTURE_CALL = {
    "id": "call-future",
    "orgId": "org-1",
    "createdAt": "2031-01-01T00:00:00.000Z",
    "updatedAt": "2031-01-01T00:00:00.000Z",
    "type": "holographicCall",
    "status": "teleporting",
    "endedReason": "a-reason-added-next-year",
    "quantumCost": {"qubits": 3},
}


async def test_unknown_call_fields_and_enum_values_never_break_parsing() -> None:
    async def handler(scope: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        return 200, {}, FUTURE_CALL

    async with VapiClient(KEY, **asgi(json_app(handler))) as vapi:
        call = await vapi.get_call("call-future")
    assert call.status == "teleporting"
    assert not isinstance(call.status, CallStatus)
    assert call.type == "holographicCall"
    assert call.ended_reason == "a-reason-added-next-year"
    assert call.model_extra == {"quantumCost": {"qubits": 3}}


def test_models_accept_snake_case_and_known_values_become_enums() -> None:
    call = VapiCall(id="c1", status="ended", assistant_overrides={"metadata": {"rv_cid": "r"}})
    assert call.status is CallStatus.ENDED
    assert call.correlation_id == "r"
    assert call.to_json_dict() == {
        "id": "c1",
        "status": "ended",
        "assistantOverrides": {"metadata": {"rv_cid": "r"}},
    }
    assert VapiCall.model_validate({"id": "c2", "assistantOverrides": None}).metadata == {}


# Errors


async def test_wrong_key_raises_authentication_error_without_the_key(upstream: Upstream) -> None:
    async with VapiClient(
        "wrong-key-xyz", base_url=upstream.url, policy=fast_policy(), transport=upstream.transport
    ) as vapi:
        with pytest.raises(VapiAuthenticationError) as info:
            await vapi.list_assistants()
    assert info.value.status == 401
    assert info.value.kind is FailureKind.PERMANENT
    assert "Invalid Key" in info.value.message
    assert isinstance(info.value.body, dict)
    assert "wrong-key-xyz" not in str(info.value)
    assert len(upstream.app.requests("vapi.assistants.list")) == 1


async def test_not_found_is_a_permanent_typed_error(upstream: Upstream) -> None:
    async with upstream.client() as vapi:
        with pytest.raises(VapiAPIError) as info:
            await vapi.get_call("no-such-call")
    assert type(info.value) is VapiAPIError
    assert info.value.status == 404
    assert info.value.message == "Call not found"
    assert info.value.kind is FailureKind.PERMANENT
    assert len(upstream.app.requests("vapi.calls.get")) == 1


async def test_list_message_bodies_are_joined() -> None:
    async def handler(scope: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        body = {"message": ["a must be x", "b must be y"], "error": "Bad Request"}
        return 400, {}, {**body, "statusCode": 400}

    async with VapiClient(KEY, **asgi(json_app(handler))) as vapi:
        with pytest.raises(VapiAPIError) as info:
            await vapi.list_assistants()
    assert info.value.message == "a must be x; b must be y"
    assert info.value.status == 400


async def test_over_concurrency_error_is_flagged_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(scope: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        return 400, {}, {"message": "Over Concurrency Limit.", "error": "Bad Request"}

    seen: list[tuple[str, str]] = []

    def recorder(event: Event) -> None:
        match event:
            case ConcurrencyBlocked(source=client, outcome=outcome):
                seen.append((client, outcome))

    caplog.set_level(logging.WARNING, logger="resilient_voice.vapi")
    listeners = [recorder]
    async with (
        VapiClient(KEY, **asgi(json_app(handler)), listeners=listeners) as v,
    ):
        with pytest.raises(VapiConcurrencyLimitError) as info:
            await v.create_call(assistant_id="a1", phone_number_id="p1", customer_number=NUMBER)
    assert type(info.value) is VapiConcurrencyLimitError
    assert info.value.kind is FailureKind.PERMANENT
    assert seen == [("vapi", "refused")]
    assert any("concurrency" in r.getMessage() for r in caplog.records)


async def test_concurrency_blocked_201_returns_the_call_and_records_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def recorder(event: Event) -> None:
        if isinstance(event, ConcurrencyBlocked):
            seen.append(event.outcome)

    app = FakeTelephony(
        vapi_api_keys=[KEY], status_callbacks=False, call_duration=30.0, vapi_concurrency_limit=1
    )
    caplog.set_level(logging.WARNING, logger="resilient_voice.vapi")
    async with in_process(app) as up, up.client(listeners=[recorder]) as vapi:
        first = await create(up, vapi)
        second = await create(up, vapi, customer_number="+14155550101")
    assert not first.concurrency_blocked
    assert second.concurrency_blocked
    assert second.subscription_limits is not None
    assert second.subscription_limits.concurrency_limit == 1
    assert seen == ["blocked"]
    assert len(app.calls("vapi")) == 2
    (record,) = [r for r in caplog.records if r.name == "resilient_voice.vapi"]
    assert second.id in record.getMessage()
    assert KEY not in caplog.text


# Failures that may have placed the call


async def test_response_lost_after_processing_is_not_resent_and_reconciles(
    served: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = served
    upstream.app.faults = [Fault.drop_after(1.0, count=1, endpoints="vapi.calls.create")]
    before = datetime.now(UTC) - timedelta(seconds=30)
    caplog.set_level(logging.DEBUG)
    async with upstream.client(policy=fast_policy(attempts=5)) as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(upstream, vapi)
        found = await vapi.reconcile_call(info.value.attempt_id, created_after=before)
        absent = await vapi.reconcile_call("0" * 32, created_after=before)
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert len(upstream.app.requests("vapi.calls.create")) == 1
    (created,) = upstream.app.calls("vapi")
    assert found is not None
    assert found.id == created.id
    assert found.attempt_id == info.value.attempt_id
    assert absent is None
    assert upstream.app.duplicate_destinations() == {}
    assert KEY not in caplog.text


async def test_reconcile_reads_past_a_full_page_before_it_says_not_created(
    served: Upstream,
) -> None:
    # Twelve calls created after the unknown one: with five per page, the first page does not
    # hold it. A None here would make the caller create, and ring the customer, twice.
    upstream = served
    upstream.app.faults = [Fault.drop_after(1.0, count=1, endpoints="vapi.calls.create")]
    before = datetime.now(UTC) - timedelta(seconds=30)
    async with upstream.client(policy=fast_policy(attempts=5)) as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(upstream, vapi)
        for _ in range(12):
            await create(upstream, vapi)
        found = await vapi.reconcile_call(info.value.attempt_id, created_after=before, limit=5)
        absent = await vapi.reconcile_call("0" * 32, created_after=before, limit=5)
    assert found is not None
    assert found.attempt_id == info.value.attempt_id
    assert absent is None
    assert len(upstream.app.calls("vapi")) == 13


async def test_5xx_on_create_is_outcome_unknown_with_the_parsed_error(upstream: Upstream) -> None:
    upstream.app.faults = [Fault.burst(1, status=500, endpoints="vapi.calls.create")]
    async with upstream.client() as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(upstream, vapi)
        assert await vapi.reconcile_call(info.value.attempt_id) is None
    cause = info.value.__cause__
    assert isinstance(cause, VapiAPIError)
    assert cause.status == 500
    assert cause.message == "Internal server error"
    (sent,) = upstream.create_requests()
    assert sent["assistantOverrides"]["metadata"]["rv_attempt_id"] == info.value.attempt_id


async def test_5xx_on_create_without_a_retry_policy_is_still_outcome_unknown(
    upstream: Upstream,
) -> None:
    upstream.app.faults = [Fault.burst(1, status=503, endpoints="vapi.calls.create")]
    async with upstream.client(policy=Policy()) as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(upstream, vapi)
    assert isinstance(info.value.__cause__, VapiAPIError)
    assert info.value.__cause__.status == 503


async def test_429_on_create_is_maybe_processed_by_default(upstream: Upstream) -> None:
    upstream.app.faults = [
        Fault.rate_limited(retry_after=0.01, count=1, endpoints="vapi.calls.create")
    ]
    async with upstream.client() as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(upstream, vapi)
    assert isinstance(info.value.__cause__, VapiAPIError)
    assert info.value.__cause__.status == 429
    assert info.value.__cause__.retry_after == pytest.approx(0.01)
    assert len(upstream.app.requests("vapi.calls.create")) == 1


async def test_unprocessed_429_opt_in_retries_create_with_the_same_body(
    upstream: Upstream,
) -> None:
    upstream.app.faults = [
        Fault.rate_limited(retry_after=0.01, count=2, endpoints="vapi.calls.create")
    ]
    async with upstream.client(unprocessed_429=True) as vapi:
        call = await create(upstream, vapi)
    bodies = upstream.create_requests()
    assert len(bodies) == 3
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["assistantOverrides"]["metadata"]["rv_attempt_id"] == call.attempt_id
    assert len(upstream.app.calls("vapi")) == 1


async def test_reads_retry_429_and_5xx(upstream: Upstream) -> None:
    upstream.app.faults = [
        Fault.rate_limited(retry_after=0.01, count=1, endpoints="vapi.assistants.list"),
        Fault.burst(1, status=502, endpoints="vapi.assistants.list"),
    ]
    async with upstream.client() as vapi:
        assistants = await vapi.list_assistants()
    assert len(assistants) == 1
    statuses = [r.status for r in upstream.app.requests("vapi.assistants.list")]
    assert statuses == [429, 502, 200]


async def test_retry_after_ms_is_honoured_and_exposed() -> None:
    hits: list[float] = []
    clock = ManualClock(autojump=True)

    async def handler(scope: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        hits.append(clock.now())
        if len(hits) == 1:
            return 429, {"retry-after-ms": "150"}, {"message": "slow down"}
        if len(hits) == 2:
            return 429, {"retry-after-ms": "250", "retry-after": "9"}, {"message": "slow"}
        return 200, {}, []

    retry = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=1.0, clock=clock)
    policy = Policy(retry=retry, clock=clock)
    async with VapiClient(KEY, **asgi(json_app(handler)), policy=policy) as v:
        with pytest.raises(VapiAPIError) as info:
            await v.list_phone_numbers()
    assert len(hits) == 2
    assert hits[1] - hits[0] >= 0.14
    assert info.value.retry_after == pytest.approx(0.25)  # retry-after-ms wins over Retry-After
    assert info.value.kind is FailureKind.MAYBE_PROCESSED


async def test_unreadable_2xx_on_create_is_outcome_unknown() -> None:
    async def handler(scope: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        return 201, {}, b"<html>oops</html>"

    async with VapiClient(KEY, **asgi(json_app(handler))) as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await vapi.create_call(assistant_id="a", phone_number_id="p", customer_number=NUMBER)
    assert isinstance(info.value.__cause__, VapiAPIError)


# Outage: the breaker opens, fails fast, and recovers


async def test_breaker_opens_during_an_outage_and_recovers(upstream: Upstream) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("vapi", failure_threshold=2, recovery_timeout=10.0, clock=clock)
    policy = Policy(breaker=breaker, retry=RetryPolicy(max_attempts=1, clock=clock))
    upstream.app.faults = [Fault.error_rate(1.0, status=503, endpoints="vapi.*")]
    async with upstream.client(policy=policy) as vapi:
        assert vapi.breaker is breaker
        for _ in range(2):
            with pytest.raises(VapiAPIError) as info:
                await vapi.list_calls()
            assert info.value.status == 503
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            await create(upstream, vapi)
        assert upstream.app.requests("vapi.calls.create") == []
        upstream.app.faults = []
        clock.advance(10.0)
        assert await vapi.list_calls() == []
        assert breaker.state is BreakerState.CLOSED
        call = await create(upstream, vapi)
    assert call.status is CallStatus.QUEUED


async def test_4xx_answers_do_not_trip_the_breaker(upstream: Upstream) -> None:
    breaker = CircuitBreaker("vapi", failure_threshold=1)
    async with upstream.client(policy=fast_policy(breaker=breaker)) as vapi:
        for _ in range(3):
            with pytest.raises(VapiAPIError):
                await vapi.get_call("missing")
    assert breaker.state is BreakerState.CLOSED


# Validation, before anything is sent


def refusing_transport() -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing should be sent, got {request.method} {request.url}")

    return httpx.MockTransport(handler)


CREATE_OK: dict[str, Any] = {
    "assistant_id": "a1",
    "phone_number_id": "p1",
    "customer_number": NUMBER,
}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"assistant_id": None}, "exactly one"),
        ({"assistant": {"name": "inline"}}, "exactly one"),
        ({"squad_id": "s1"}, "exactly one"),
        ({"assistant_id": ""}, "assistant_id"),
        ({"assistant_id": "a/../b"}, "assistant_id"),
        ({"phone_number_id": ""}, "phone_number_id"),
        ({"phone_number_id": None}, "phone_number_id"),
        ({"customer_number": "4155550100"}, "E.164"),
        ({"customer_number": "+0123"}, "E.164"),
        ({"customer_number": "+1415555010012345"}, "E.164"),
        ({"name": "x" * 41}, "40"),
        ({"name": ""}, "40"),
        ({"assistant_overrides": {"metadata": "not a mapping"}}, "metadata"),
        ({"assistant_overrides": ["no"]}, "mapping"),
        ({"customers": [{"number": NUMBER}]}, "batch"),
        ({"assistantOverrides": {}}, "own parameters"),
        ({"schedule_plan": {}, "schedulePlan": {}}, "twice"),
    ],
)
async def test_bad_create_arguments_are_rejected_before_sending(
    changes: dict[str, Any], match: str
) -> None:
    async with VapiClient(KEY, transport=refusing_transport()) as vapi:
        with pytest.raises(InvalidRequestError, match=match):
            await vapi.create_call(**{**CREATE_OK, **changes})


async def test_inline_assistant_is_accepted() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(201, json={"id": "c1", "status": "queued"})

    async with VapiClient(KEY, transport=httpx.MockTransport(handler)) as vapi:
        call = await vapi.create_call(
            assistant={"firstMessage": "Hello"},
            phone_number_id="p1",
            customer_number=NUMBER,
            schedule_plan={"earliestAt": "2031-01-01T00:00:00Z"},
        )
    assert call.id == "c1"
    assert sent[0]["assistant"] == {"firstMessage": "Hello"}
    assert sent[0]["schedulePlan"] == {"earliestAt": "2031-01-01T00:00:00Z"}
    assert "assistantId" not in sent[0]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda v: v.get_call(""), "call_id"),
        (lambda v: v.get_call("a b"), "call_id"),
        (lambda v: v.get_assistant("x?y=1"), "assistant_id"),
        (lambda v: v.update_assistant("a1"), "at least one"),
        (lambda v: v.update_assistant("a1", id="new"), "cannot be changed"),
        (lambda v: v.list_calls(limit=0), "limit"),
        (lambda v: v.list_calls(limit=1001), "limit"),
        (lambda v: v.list_calls(created_at_gt=datetime(2030, 1, 1)), "timezone"),
        (lambda v: v.list_assistants(limit=True), "limit"),
        (lambda v: v.reconcile_call(""), "attempt_id"),
    ],
)
async def test_bad_read_arguments_are_rejected_before_sending(
    call: Callable[[VapiClient], Awaitable[object]], match: str
) -> None:
    async with VapiClient(KEY, transport=refusing_transport()) as vapi:
        with pytest.raises(InvalidRequestError, match=match):
            await call(vapi)


def test_validation_error_is_a_value_error() -> None:
    assert issubclass(InvalidRequestError, ValueError)


# Configuration


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="api_key"):
        VapiClient("")
    with pytest.raises(ValueError, match="whitespace"):
        VapiClient("key\r\nX-Injected: 1")
    with pytest.raises(ValueError, match="http"):
        VapiClient(KEY, base_url="ftp://api.vapi.ai")
    with pytest.raises(ValueError, match="unknown operation"):
        VapiClient(KEY, policies={"create": Policy()})
    with pytest.raises(TypeError, match="Policy"):
        VapiClient(KEY, policies={"read": "fast"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="Policy"):
        VapiClient(KEY, policy=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        VapiClient(KEY, timeout=0)
    with pytest.raises(ValueError, match="http_client"):
        VapiClient(KEY, http_client=httpx.AsyncClient(), policy=Policy())
    with pytest.raises(TypeError, match="listeners"):
        VapiClient(KEY, listeners=[object()])  # type: ignore[list-item]


def test_policies_replace_defaults_one_by_one_and_share_one_breaker() -> None:
    read = Policy()
    client = VapiClient(KEY, policies={"read": read})
    assert client.policies["read"] is read
    assert client.policies["create_call"] is not read
    assert client.breaker is not None
    assert client.breaker.name == "vapi"
    assert client.policies["update_assistant"].breaker is client.breaker
    assert client.policies["update_assistant"].idempotent
    assert not client.policies["create_call"].idempotent
    assert client.transport is not None
    names = [route.name for route in client.transport.routes]
    assert names[0] == "vapi.calls.create"
    assert {route.host for route in client.transport.routes} == {"api.vapi.ai"}
    create_route = client.transport.routes[0]
    assert create_route.idempotent is False
    assert create_route.honours_idempotency_key is False
    assert create_route.unprocessed_statuses == frozenset()
    opted = VapiClient(KEY, unprocessed_429=True)
    assert opted.transport is not None
    assert opted.transport.routes[0].unprocessed_statuses == frozenset({429})
    one = Policy()
    assert set(VapiClient(KEY, policy=one).policies.values()) == {one}
    defaults = default_policies()
    assert set(defaults) == {"create_call", "read", "update_assistant"}


def test_the_api_key_never_appears_in_reprs() -> None:
    client = VapiClient(KEY)
    assert KEY not in repr(client)
    assert KEY not in repr(client.__dict__)
    assert KEY not in str(client.transport)


async def test_a_caller_provided_http_client_is_used_and_not_closed(upstream: Upstream) -> None:
    http = httpx.AsyncClient(transport=upstream.transport)
    async with VapiClient(KEY, base_url=upstream.url, http_client=http) as vapi:
        with pytest.raises(AttributeError, match="http_client="):
            vapi.transport  # noqa: B018
        with pytest.raises(AttributeError, match="http_client="):
            vapi.breaker  # noqa: B018
        assert getattr(vapi, "transport", None) is None
        assert len(await vapi.list_phone_numbers()) == 1
    assert not http.is_closed
    await http.aclose()


async def test_transport_listeners_are_attached(upstream: Upstream) -> None:
    routes: list[str] = []

    def record(event: Event) -> None:
        if isinstance(event, RequestFinished):
            routes.append(event.route)

    async with upstream.client(listeners=[record]) as vapi:
        await vapi.list_phone_numbers()
        await vapi.get_assistant(upstream.assistant_id)
        await create(upstream, vapi)
    assert routes == ["vapi.phone_numbers.list", "vapi.assistants.get", "vapi.calls.create"]


async def test_default_policies_never_resend_a_lost_create(served: Upstream) -> None:
    upstream = served
    upstream.app.faults = [Fault.drop_after(1.0, count=1, reset=True, endpoints="vapi.calls.*")]
    async with VapiClient(KEY, base_url=upstream.url) as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(upstream, vapi)
        assert info.value.attempts == 1
        found = await vapi.reconcile_call(info.value.attempt_id)
    assert isinstance(info.value.__cause__, httpx.ReadError)
    assert len(upstream.app.calls("vapi")) == 1
    assert found is not None


@settings(max_examples=60, deadline=None)
@given(
    user=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=5), max_size=5),
    cid=st.none() | st.text("abc123-", min_size=1, max_size=10),
)
def test_planting_keeps_every_user_key_but_ours(user: dict[str, Any], cid: str | None) -> None:
    overrides = {"metadata": user, "variableValues": {"a": 1}}
    with correlation_scope(cid) if cid else contextlib.nullcontext():
        attempt, planted = attempt_overrides(overrides, attempt_id="att-1")
    metadata = planted["metadata"]
    assert attempt == "att-1"
    assert metadata["rv_attempt_id"] == "att-1"
    assert metadata.get("rv_cid") == cid
    for key, value in user.items():
        if key not in ("rv_attempt_id", "rv_cid"):
            assert metadata[key] == value
    assert planted["variableValues"] == {"a": 1}
    assert overrides["metadata"] is user


def test_public_surface_shows_the_public_module() -> None:
    """The surface itself is pinned in tests/test_public_api.py."""
    import resilient_voice.vapi as module

    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type) and name.startswith("Vapi") and "Error" not in name:
            assert obj.__module__ == "resilient_voice.vapi", name
    assert module.VapiAPIError is VapiAPIError


# A 201 whose body never arrives


@pytest.mark.parametrize("stall", [False, True])
async def test_create_whose_201_body_is_lost_is_an_unknown_outcome_never_resent(
    served: Upstream, stall: bool
) -> None:
    upstream = served
    upstream.app.faults = [Fault.drop_mid_body(stall=stall, endpoints="vapi.calls.create")]
    async with upstream.client(policy=fast_policy(attempts=5), timeout=0.5) as vapi:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(upstream, vapi)
    (sent,) = upstream.create_requests()
    assert sent["assistantOverrides"]["metadata"]["rv_attempt_id"] == info.value.attempt_id
    (record,) = upstream.app.requests("vapi.calls.create")
    assert (record.status, record.fault) == (201, "drop_mid_body")
    assert len(upstream.app.calls("vapi")) == 1


@pytest.mark.parametrize("mode", ["drop", "stall"])
async def test_a_raw_201_cut_mid_body_is_an_unknown_outcome(mode: Mode) -> None:
    body = json.dumps({"id": "call-1", "status": "queued"}).encode()
    async with (
        raw_upstream(body, mode=mode) as raw,
        VapiClient(KEY, base_url=raw.url, policy=fast_policy(attempts=5), timeout=0.5) as vapi,
    ):
        with pytest.raises(OutcomeUnknownError) as info:
            await vapi.create_call(assistant_id="a1", phone_number_id="p1", customer_number=NUMBER)
    (request,) = raw.requests
    planted = json.loads(request.body)["assistantOverrides"]["metadata"]["rv_attempt_id"]
    assert info.value.attempt_id == planted


# Hostile JSON from the upstream

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("status", "operation", "expected"),
    [
        (201, "create_call", OutcomeUnknownError),
        (500, "create_call", OutcomeUnknownError),
        (400, "create_call", VapiAPIError),
        (200, "get_call", VapiAPIError),
        (200, "list_calls", VapiAPIError),
        (404, "get_call", VapiAPIError),
        (503, "list_assistants", VapiAPIError),
    ],
)
async def test_deeply_nested_json_is_an_unreadable_body_never_a_recursion_error(
    status: int, operation: str, expected: type[Exception]
) -> None:
    """Nesting deeper than Python's parser goes, on a 201 or a 5xx to POST /call: an unknown
    outcome, as promised (a bare RecursionError invites a second dial); a provider error on
    every other answer."""

    async def handler(scope: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        return status, {}, DEEP_JSON

    async with (
        VapiClient(KEY, **asgi(json_app(handler)), policy=fast_policy()) as vapi,
    ):
        calls = {
            "create_call": lambda: vapi.create_call(
                assistant_id="a1", phone_number_id="p1", customer_number=NUMBER
            ),
            "get_call": lambda: vapi.get_call("call-1"),
            "list_calls": vapi.list_calls,
            "list_assistants": vapi.list_assistants,
        }
        with pytest.raises(expected) as info:
            await calls[operation]()
    if isinstance(info.value, VapiAPIError):
        assert info.value.status == status


async def test_with_a_callers_http_client_listeners_hear_the_clients_records() -> None:
    async def handler(scope: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        return 400, {}, {"message": "Over Concurrency Limit."}

    seen: list[Event] = []
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=json_app(handler)))
    vapi = VapiClient(KEY, base_url="http://vapi.test", allow_insecure_http=True, http_client=http)
    vapi.add_listener(seen.append)
    with pytest.raises(VapiConcurrencyLimitError):
        await vapi.create_call(assistant_id="a1", phone_number_id="p1", customer_number=NUMBER)
    assert seen == [ConcurrencyBlocked("vapi", "refused")]  # the transport is the caller's
    await http.aclose()
