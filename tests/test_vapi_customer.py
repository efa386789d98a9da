"""``VapiClient.create_call(customer=..., customer_id=...)``: Vapi's customer object, validated.

Against FakeTelephony over loopback (asyncio and trio); the fake accepts and echoes the fields.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from resilient_voice import InvalidRequestError, RetryPolicy
from resilient_voice.policy import Policy
from resilient_voice.testing import FakeTelephony, serve
from resilient_voice.vapi import (
    VapiCall,
    VapiClient,
    VapiCustomer,
    no_sdk_retries,
    sdk_http_client,
)

KEY = "vapi-private-key-customer"
NUMBER = "+14155550100"


@dataclass
class Upstream:
    app: FakeTelephony
    url: str
    ids: dict[str, str]

    def client(self) -> VapiClient:
        return VapiClient(KEY, base_url=self.url, policy=Policy(retry=RetryPolicy(max_attempts=1)))

    def sent_customers(self) -> list[tuple[Any, Any]]:
        return [
            (r.json.get("customer"), r.json.get("customerId"))
            for r in self.app.requests("vapi.calls.create")
        ]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = FakeTelephony(vapi_api_keys=[KEY], status_callbacks=False)
    async with serve(app) as url:
        ids = {
            "assistant_id": app.vapi_assistants()[0]["id"],
            "phone_number_id": app.vapi_phone_numbers()[0]["id"],
        }
        yield Upstream(app, url, ids)


async def create(up: Upstream, **customer: Any) -> VapiCall:
    async with up.client() as vapi:
        return await vapi.create_call(**up.ids, **customer)


async def test_a_customer_mapping_sets_every_documented_field(upstream: Upstream) -> None:
    customer = {
        "number": NUMBER,
        "name": "Ada Lovelace",
        "extension": "0042",
        "email": "ada@example.com",
        "external_id": "crm-42",  # snake_case is accepted and sent as camelCase
        "numberE164CheckEnabled": True,
    }
    call = await create(upstream, customer=customer)
    sent = {
        "number": NUMBER,
        "name": "Ada Lovelace",
        "extension": "0042",
        "email": "ada@example.com",
        "externalId": "crm-42",
        "numberE164CheckEnabled": True,
    }
    assert upstream.sent_customers() == [(sent, None)]
    assert call.customer == VapiCustomer(
        number=NUMBER,
        name="Ada Lovelace",
        extension="0042",
        email="ada@example.com",
        external_id="crm-42",
        number_e164_check_enabled=True,
    )
    assert customer["external_id"] == "crm-42"  # the caller's mapping is not changed


async def test_a_vapi_customer_model_with_a_sip_uri(upstream: Upstream) -> None:
    call = await create(upstream, customer=VapiCustomer(sip_uri="sip:ada@pbx.example.com"))
    assert upstream.sent_customers() == [({"sipUri": "sip:ada@pbx.example.com"}, None)]
    assert call.customer is not None
    assert call.customer.sip_uri == "sip:ada@pbx.example.com"
    assert call.customer.number is None


async def test_a_non_e164_number_when_the_check_is_off(upstream: Upstream) -> None:
    call = await create(upstream, customer={"number": "1234", "numberE164CheckEnabled": False})
    assert call.customer is not None
    assert (call.customer.number, call.customer.number_e164_check_enabled) == ("1234", False)


async def test_a_saved_customer_by_id(upstream: Upstream) -> None:
    call = await create(upstream, customer_id="cust-123")
    assert upstream.sent_customers() == [(None, "cust-123")]
    assert call.customer_id == "cust-123"
    assert call.customer is None


async def test_customer_number_stays_the_short_form(upstream: Upstream) -> None:
    call = await create(upstream, customer_number=NUMBER)
    assert upstream.sent_customers() == [({"number": NUMBER}, None)]
    assert call.customer is not None
    assert call.customer.number == NUMBER


@pytest.mark.parametrize(
    ("customer", "match"),
    [
        ({}, "exactly one of customer_number=, customer= and customer_id= \\(got none\\)"),
        ({"customer_number": NUMBER, "customer": {"number": NUMBER}}, "exactly one"),
        ({"customer": {"number": NUMBER}, "customer_id": "c1"}, "exactly one"),
        ({"customer_number": NUMBER, "customer_id": "c1"}, "exactly one"),
        ({"customerId": "c1"}, "own parameters"),
        ({"customer_id": "a/b"}, "customer_id"),
        ({"customer": "+14155550100"}, "mapping or a VapiCustomer"),
        ({"customer": {"name": "Ada"}}, "exactly one of 'number' and 'sipUri'"),
        ({"customer": {"number": NUMBER, "sipUri": "sip:a@b"}}, "exactly one of 'number'"),
        ({"customer": {"number": NUMBER, "sipUrl": "sip:a@b"}}, "unknown field.*sipUrl"),
        ({"customer": {"number": "4155550100"}}, "E.164"),
        ({"customer": {"number": "+0123"}}, "E.164"),
        ({"customer": {"number": "12", "numberE164CheckEnabled": False}}, "3..40"),
        ({"customer": {"number": "12-34", "numberE164CheckEnabled": False}}, "3..40"),
        ({"customer": {"number": NUMBER, "numberE164CheckEnabled": "no"}}, "bool"),
        ({"customer": {"sipUri": "sip:a@b", "numberE164CheckEnabled": False}}, "'number' only"),
        ({"customer": {"number": NUMBER, "extension": "12a"}}, "extension"),
        ({"customer": {"number": NUMBER, "extension": "12345678901"}}, "extension"),
        ({"customer": {"number": NUMBER, "extension": 42}}, "extension"),
        ({"customer": {"sipUri": "https://pbx.example.com"}}, "sip: or sips:"),
        ({"customer": {"sipUri": "sip:"}}, "sip: or sips:"),
        ({"customer": {"sipUri": "sip:ada @pbx"}}, "sip: or sips:"),
        ({"customer": {"number": NUMBER, "name": "x" * 41}}, "name.*1..40"),
        ({"customer": {"number": NUMBER, "email": ""}}, "email.*1..40"),
        ({"customer": {"number": NUMBER, "assistantOverrides": {}}}, "assistant_overrides="),
        ({"customer": {"number": NUMBER, "sip_uri": None, "sipUri": None}}, "twice"),
    ],
)
async def test_bad_customers_are_refused_before_sending(
    upstream: Upstream, customer: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        await create(upstream, **customer)
    assert upstream.app.requests("vapi.calls.create") == []


async def test_the_fake_refuses_what_vapi_would(upstream: Upstream) -> None:
    """The fake's own checks, reached with a plain httpx client (no client-side validation)."""
    async with httpx.AsyncClient(base_url=upstream.url) as http:
        headers = {"Authorization": f"Bearer {KEY}"}
        both = await http.post(
            "/call",
            json={**_camel(upstream.ids), "customer": {"number": NUMBER}, "customerId": "c1"},
            headers=headers,
        )
        long_extension = await http.post(
            "/call",
            json={
                **_camel(upstream.ids),
                "customer": {"number": NUMBER, "extension": "12345678901"},
            },
            headers=headers,
        )
    assert both.status_code == 400
    assert long_extension.status_code == 400
    assert upstream.app.calls() == []


async def test_the_sdk_recipe_carries_the_customer_fields(upstream: Upstream) -> None:
    import vapi

    http = sdk_http_client(base_url=upstream.url)
    client = vapi.AsyncVapi(token=KEY, base_url=upstream.url, httpx_client=http)
    try:
        call = await client.calls.create(
            **upstream.ids,
            customer={"number": NUMBER, "name": "Ada", "extension": "7"},
            request_options=no_sdk_retries(),
        )
    finally:
        await http.aclose()
    assert (call.customer.name, call.customer.extension) == ("Ada", "7")


def _camel(ids: dict[str, str]) -> dict[str, str]:
    return {"assistantId": ids["assistant_id"], "phoneNumberId": ids["phone_number_id"]}
