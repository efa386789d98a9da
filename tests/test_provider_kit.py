"""The provider kit: one reading contract and one number rule for every client.

Each test runs the same case through TwilioClient and VapiClient over real sockets: what a
client cannot read is mapped once, the same way, whichever provider answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from _apps import answering
from resilient_voice import InvalidRequestError, OutcomeUnknownError, Policy, RetryPolicy
from resilient_voice._request_checks import is_e164
from resilient_voice.failure import FailureKind
from resilient_voice.testing import serve
from resilient_voice.twilio import TwilioAPIError, TwilioClient
from resilient_voice.vapi import VapiAPIError, VapiClient

SID = "AC" + "1" * 32
NUMBER = "+14155550100"
ONCE = Policy(retry=RetryPolicy(max_attempts=1))


def twilio(url: str) -> TwilioClient:
    return TwilioClient(SID, "token", base_url=url, policy=ONCE)


def vapi(url: str) -> VapiClient:
    return VapiClient("vapi-key", base_url=url, policy=ONCE)


READS: list[tuple[Callable[[str], Any], Callable[[Any], Awaitable[object]], type[Exception]]] = [
    (twilio, lambda c: c.get_call("CA" + "0" * 32), TwilioAPIError),
    (vapi, lambda c: c.get_call("call-1"), VapiAPIError),
    (vapi, lambda c: c.list_calls(), VapiAPIError),
]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>hello</html>", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'"a string"', "model"),
    ],
)
@pytest.mark.parametrize(("client", "read", "error"), READS)
async def test_an_unreadable_2xx_read_is_one_permanent_error_that_says_what_happened(
    client: Callable[[str], Any],
    read: Callable[[Any], Awaitable[object]],
    error: type[Exception],
    body: bytes,
    says: str,
) -> None:
    async with serve(answering(200, body)) as url, client(url) as api:
        with pytest.raises(error) as info:
            await read(api)
    exc = info.value
    assert isinstance(exc, TwilioAPIError | VapiAPIError)
    assert (exc.status, exc.code, exc.kind) == (200, "unreadable_answer", FailureKind.PERMANENT)
    assert says in exc.message
    if says == "not JSON":
        assert exc.__cause__ is not None  # the parser's own error, for the debugger


async def test_a_shape_mismatch_names_the_model_not_the_upstream() -> None:
    async with serve(answering(200, b'{"id": 5}')) as url, vapi(url) as api:
        with pytest.raises(VapiAPIError, match="did not match the VapiCall model"):
            await api.get_call("call-1")


CREATES: list[tuple[Callable[[str], Any], Callable[[Any], Awaitable[object]]]] = [
    (twilio, lambda c: c.create_call(to=NUMBER, from_=NUMBER, url="https://example.com/t")),
    (twilio, lambda c: c.send_message(to=NUMBER, from_=NUMBER, body="hi")),
    (vapi, lambda c: c.create_call(assistant_id="a", phone_number_id="p", customer_number=NUMBER)),
]


@pytest.mark.parametrize(("client", "create"), CREATES)
async def test_an_unreadable_created_answer_is_an_unknown_outcome_from_the_same_error(
    client: Callable[[str], Any], create: Callable[[Any], Awaitable[object]]
) -> None:
    async with serve(answering(201, b'"created, in a way"')) as url, client(url) as api:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(api)
    cause = info.value.__cause__
    assert isinstance(cause, TwilioAPIError | VapiAPIError)
    assert cause.code == "unreadable_answer"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("+1234567", True),
        ("+123456789012345", True),
        ("+123456", False),
        ("+1234567890123456", False),
        ("+0234567", False),
        ("1234567", False),
        ("+1234567\n", False),
        (1234567, False),
    ],
)
def test_e164_is_one_rule(value: object, valid: bool) -> None:
    assert is_e164(value) is valid


@pytest.mark.parametrize(
    "create",
    [
        lambda c: c.create_call(to="+123456", from_=NUMBER, url="https://example.com/t"),
        lambda c: c.send_message(to="+123456", from_=NUMBER, body="hi"),
    ],
)
async def test_the_twilio_client_refuses_a_number_shorter_than_e164_allows(
    create: Callable[[Any], Awaitable[object]],
) -> None:
    async with twilio("http://127.0.0.1:9") as api:
        with pytest.raises(InvalidRequestError) as info:
            await create(api)
    assert info.value.field == "to"


async def test_the_vapi_client_applies_the_same_rule() -> None:
    async with vapi("http://127.0.0.1:9") as api:
        for customer in ({"customer_number": "+123456"}, {"customer": {"number": "+123456"}}):
            with pytest.raises(InvalidRequestError, match=r"E\.164"):
                await api.create_call(assistant_id="a", phone_number_id="p", **customer)


@pytest.mark.parametrize(
    ("client", "read", "field"),
    [
        (twilio, lambda c: c.list_calls(page_size=True), "page_size"),
        (twilio, lambda c: c.list_calls(page_size=1001), "page_size"),
        (twilio, lambda c: c.list_calls(limit=0), "limit"),
        (vapi, lambda c: c.list_calls(limit=0), "limit"),
        (vapi, lambda c: c.list_assistants(limit=1001), "limit"),
    ],
)
async def test_counts_follow_one_rule_in_every_client(
    client: Callable[[str], Any], read: Callable[[Any], Awaitable[object]], field: str
) -> None:
    async with client("http://127.0.0.1:9") as api:
        with pytest.raises(InvalidRequestError, match="must be an int") as info:
            await read(api)
    assert info.value.field == field


@pytest.mark.parametrize(("client", "create"), CREATES)
async def test_a_5xx_to_a_create_is_unknown_with_the_providers_error_as_its_cause(
    client: Callable[[str], Any], create: Callable[[Any], Awaitable[object]]
) -> None:
    """The transport decides the outcome is unknown; every client chains its own error."""
    body = b'{"message": "upstream trouble", "code": 20500}'
    async with serve(answering(503, body)) as url, client(url) as api:
        with pytest.raises(OutcomeUnknownError) as info:
            await create(api)
    cause = info.value.__cause__
    assert isinstance(cause, TwilioAPIError | VapiAPIError)
    assert (cause.status, cause.kind) == (503, FailureKind.MAYBE_PROCESSED)
    assert "upstream trouble" in cause.message
