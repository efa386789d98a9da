"""The official SDK (vapi-server-sdk) through the recipe, against FakeTelephony over loopback.

Only ``client.calls`` is used: the SDK builds its pydantic models on first access to each
resource client, which costs seconds per resource.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import vapi

from resilient_voice import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    OutcomeUnknownError,
    RetryPolicy,
    correlation_scope,
)
from resilient_voice.policy import Policy
from resilient_voice.testing import FakeTelephony, Fault, serve
from resilient_voice.vapi import (
    VapiClient,
    attempt_overrides,
    no_sdk_retries,
    sdk_http_client,
)

KEY = "vapi-private-key-sdk"
NUMBER = "+14155550100"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeTelephony, str]]:
    app = FakeTelephony(vapi_api_keys=[KEY], status_callbacks=False, call_duration=5.0)
    async with serve(app) as url:
        yield app, url


def fast_policy(breaker: CircuitBreaker | None = None) -> Policy:
    return Policy(breaker=breaker, retry=RetryPolicy(max_attempts=3, base_delay=0.001))


def ids(app: FakeTelephony) -> dict[str, Any]:
    return {
        "assistant_id": app.vapi_assistants()[0]["id"],
        "phone_number_id": app.vapi_phone_numbers()[0]["id"],
    }


def test_no_sdk_retries_matches_the_sdks_request_options() -> None:
    from vapi.core.request_options import RequestOptions

    options = no_sdk_retries(timeout_in_seconds=5, additional_headers={"X-A": "1"})
    assert options == {
        "max_retries": 0,
        "timeout_in_seconds": 5,
        "additional_headers": {"X-A": "1"},
    }
    assert set(options) <= set(RequestOptions.__annotations__)
    assert no_sdk_retries() is not no_sdk_retries()


async def test_happy_path_through_the_sdk(upstream: tuple[FakeTelephony, str]) -> None:
    app, url = upstream
    http = sdk_http_client(base_url=url, policy=fast_policy())
    client = vapi.AsyncVapi(token=KEY, base_url=url, httpx_client=http)
    try:
        with correlation_scope("sdk-req-1"):
            call = await client.calls.create(
                **ids(app), customer={"number": NUMBER}, request_options=no_sdk_retries()
            )
        fetched = await client.calls.get(call.id, request_options=no_sdk_retries())
        listed = await client.calls.list(request_options=no_sdk_retries())
    finally:
        await http.aclose()
    assert fetched.id == call.id
    assert call.status == "queued"
    assert [c.id for c in listed] == [call.id]
    (request,) = app.requests("vapi.calls.create")
    assert request.headers["x-correlation-id"] == "sdk-req-1"
    assert request.headers["authorization"] == "Bearer <redacted>"


async def test_maybe_processed_create_through_the_sdk_is_not_resent(
    upstream: tuple[FakeTelephony, str],
) -> None:
    """The response is lost after Vapi created the call: exactly one call, and the SDK caller
    gets our OutcomeUnknownError unwrapped (the SDK does not catch it, so it cannot retry it).
    The attempt id planted with attempt_overrides() finds the call afterwards."""
    app, url = upstream
    app.faults = [Fault.drop_after(1.0, count=1, endpoints="vapi.calls.create")]
    http = sdk_http_client(base_url=url, policy=fast_policy())
    client = vapi.AsyncVapi(token=KEY, base_url=url, httpx_client=http)
    attempt_id, overrides = attempt_overrides({"variableValues": {"x": "1"}})
    try:
        with pytest.raises(OutcomeUnknownError):
            await client.calls.create(
                **ids(app),
                customer={"number": NUMBER},
                assistant_overrides=overrides,
                request_options=no_sdk_retries(),
            )
    finally:
        await http.aclose()
    assert len(app.requests("vapi.calls.create")) == 1
    assert len(app.calls("vapi")) == 1
    async with VapiClient(KEY, base_url=url) as typed:
        found = await typed.reconcile_call(attempt_id)
    assert found is not None
    assert found.id == app.calls("vapi")[0].id
    assert found.assistant_overrides is not None
    assert found.assistant_overrides["variableValues"] == {"x": "1"}


async def test_5xx_on_create_through_the_sdk_is_outcome_unknown_even_with_sdk_retries_on(
    upstream: tuple[FakeTelephony, str],
) -> None:
    """Even if a caller forgets no_sdk_retries(), the transport raises before the SDK sees a
    5xx it would retry, so POST /call is not re-sent."""
    app, url = upstream
    app.faults = [Fault.burst(1, status=503, endpoints="vapi.calls.create")]
    http = sdk_http_client(base_url=url, policy=fast_policy())
    client = vapi.AsyncVapi(token=KEY, base_url=url, httpx_client=http)
    try:
        with pytest.raises(OutcomeUnknownError):
            await client.calls.create(**ids(app), customer={"number": NUMBER})
    finally:
        await http.aclose()
    assert len(app.requests("vapi.calls.create")) == 1
    assert app.calls("vapi") == []


async def test_the_breaker_guards_the_sdk(upstream: tuple[FakeTelephony, str]) -> None:
    app, url = upstream
    app.faults = [Fault.error_rate(1.0, status=500, endpoints="vapi.calls.list")]
    breaker = CircuitBreaker("vapi", failure_threshold=2, recovery_timeout=60.0)
    http = sdk_http_client(
        base_url=url, policy=Policy(breaker=breaker, retry=RetryPolicy(max_attempts=1))
    )
    client = vapi.AsyncVapi(token=KEY, base_url=url, httpx_client=http)
    try:
        for _ in range(2):
            with pytest.raises(vapi.core.api_error.ApiError) as info:
                await client.calls.list(request_options=no_sdk_retries())
            assert info.value.status_code == 500
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            await client.calls.list(request_options=no_sdk_retries())
    finally:
        await http.aclose()
    assert len(app.requests("vapi.calls.list")) == 2


def test_sdk_http_client_validates_its_configuration() -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        sdk_http_client(policies={"calls": Policy()})
    with pytest.raises(ValueError, match="http"):
        sdk_http_client(base_url="api.vapi.ai")
    with pytest.raises(ValueError, match="timeout"):
        sdk_http_client(timeout=-1)


@pytest.mark.parametrize("stall", [False, True])
async def test_create_whose_201_body_is_lost_through_the_sdk_is_an_unknown_outcome(
    upstream: tuple[FakeTelephony, str], stall: bool
) -> None:
    app, url = upstream
    app.faults = [Fault.drop_mid_body(stall=stall, endpoints="vapi.calls.create")]
    policy = Policy(retry=RetryPolicy(max_attempts=3, base_delay=0.001), timeout=0.5)
    http = sdk_http_client(base_url=url, policy=policy)
    client = vapi.AsyncVapi(token=KEY, base_url=url, httpx_client=http)
    try:
        with pytest.raises(OutcomeUnknownError):
            await client.calls.create(
                **ids(app), customer={"number": NUMBER}, request_options=no_sdk_retries()
            )
    finally:
        await http.aclose()
    assert len(app.requests("vapi.calls.create")) == 1
    assert len(app.calls("vapi")) == 1
