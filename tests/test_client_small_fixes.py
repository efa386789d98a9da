"""Small things a new user hit with the clients (issue 11), each through real parts."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from resilient_voice import FailureKind, InvalidRequestError, RetryPolicy
from resilient_voice.policy import Policy
from resilient_voice.testing import FakeTelephony, serve
from resilient_voice.twilio import (
    ResilientTwilioHttpClient,
    TwilioAPIError,
    TwilioClient,
)

SID = "AC" + "1" * 32
TOKEN = "secret-token-value"
FROM = "+15005550006"
TWIML_URL = "https://example.com/twiml"

_App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def answering(status: int, payload: object) -> _App:
    """An ASGI app that answers every request with ``payload`` as JSON."""
    body = json.dumps(payload).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


TWILIO_ERROR_WITH_DETAILS = {
    "code": 21211,
    "message": "Invalid 'To' Phone Number",
    "more_info": "https://www.twilio.com/docs/errors/21211",
    "status": 400,
    "details": {"field": "To", "reasons": ["not a number"]},
}


async def test_twilio_api_error_keeps_details_like_the_sdk() -> None:
    async with serve(answering(400, TWILIO_ERROR_WITH_DETAILS)) as url:
        async with TwilioClient(SID, TOKEN, base_url=url) as twilio:
            with pytest.raises(TwilioAPIError) as info:
                await twilio.create_call(to="+15550100001", from_=FROM, url=TWIML_URL)
        http_client = ResilientTwilioHttpClient(
            base_url=url, policy=Policy(retry=RetryPolicy(max_attempts=1))
        )
        async with http_client:
            client = Client(SID, TOKEN, http_client=http_client)
            with pytest.raises(TwilioRestException) as sdk:
                await client.calls.create_async(to="+15550100001", from_=FROM, url=TWIML_URL)
    error = info.value
    assert (error.status, error.code, error.kind) == (400, 21211, FailureKind.PERMANENT)
    assert error.details == {"field": "To", "reasons": ["not a number"]}
    assert error.details == sdk.value.details


async def test_twilio_api_error_details_is_none_when_absent_or_not_an_object() -> None:
    for details in (None, "text", ["a"]):
        payload = {**TWILIO_ERROR_WITH_DETAILS, "details": details}
        async with (
            serve(answering(400, payload)) as url,
            TwilioClient(SID, TOKEN, base_url=url) as twilio,
        ):
            with pytest.raises(TwilioAPIError) as info:
                await twilio.get_call("CA" + "0" * 32)
        assert info.value.details is None


async def test_serve_without_uvicorn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import uvicorn` fail as if it were not installed; monkeypatch
    # puts the real module back afterwards.
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'resilient-voice\[testing\]'"):
        async with serve(answering(200, {})):
            pass


@pytest.mark.parametrize(
    ("call", "keyword"),
    [
        ({"Url": TWIML_URL}, "url"),
        ({"Twiml": "<Response/>"}, "twiml"),
        ({"ApplicationSid": "AP" + "0" * 32}, "application_sid"),
        ({"url": TWIML_URL, "StatusCallback": TWIML_URL}, "status_callback"),
    ],
)
async def test_create_call_names_a_twilio_spelled_argument_before_what_is_missing(
    call: dict[str, Any], keyword: str
) -> None:
    app = FakeTelephony(twilio_accounts={SID: TOKEN}, status_callbacks=False)
    async with serve(app) as url, TwilioClient(SID, TOKEN, base_url=url) as twilio:
        with pytest.raises(InvalidRequestError, match=f"pass {keyword}= instead") as info:
            await twilio.create_call(to="+15550100001", from_=FROM, **call)
        assert info.value.field == next(name for name in call if name[0].isupper())
        with pytest.raises(InvalidRequestError, match="pass from_= instead"):
            await twilio.send_message(to="+15550100001", From=FROM, body="hi")
        with pytest.raises(InvalidRequestError, match="pass url= instead"):
            await twilio.update_call("CA" + "0" * 32, Url=TWIML_URL)
    assert app.requests() == []
