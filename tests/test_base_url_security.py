"""``base_url`` of every client and adapter: no credential echoed, no plaintext to a remote host."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twilio.rest import Client

from resilient_voice._urls import redact_url
from resilient_voice.testing import FakeTelephony, serve
from resilient_voice.twilio import ResilientTwilioHttpClient, TwilioClient
from resilient_voice.vapi import VapiClient, no_sdk_retries, sdk_http_client

SID = "AC" + "1" * 32
TOKEN = "secret-token-value"
VAPI_KEY = "vapi-private-key"
SECRET = "pa55w0rd-in-url"


def twilio(base_url: Any, **options: Any) -> object:
    return TwilioClient(SID, TOKEN, base_url=base_url, **options)


def twilio_sdk(base_url: Any, **options: Any) -> object:
    return ResilientTwilioHttpClient(base_url=base_url, **options)


def vapi(base_url: Any, **options: Any) -> object:
    return VapiClient(VAPI_KEY, base_url=base_url, **options)


def vapi_sdk(base_url: Any, **options: Any) -> object:
    return sdk_http_client(base_url=base_url, **options)


BUILDERS: dict[str, Callable[..., object]] = {
    "TwilioClient": twilio,
    "ResilientTwilioHttpClient": twilio_sdk,
    "VapiClient": vapi,
    "sdk_http_client": vapi_sdk,
}
builders = pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())

BAD_URLS_WITH_CREDENTIALS = [
    f"https://user:{SECRET}@api.example.com",
    f"ftp://user:{SECRET}@api.example.com",
    f"https//user:{SECRET}@api.example.com",
    f"user:{SECRET}@api.example.com",
    f"https://user:{SECRET}@api.example.com:notaport",
    f"https://user:{SECRET}@[::1",
    f"http://user:{SECRET}@api.example.com",
    f"https://{SECRET}@api.example.com",
    f"https://user:{SECRET}@api.example.com/path?q=1#frag",
]


@builders
@pytest.mark.parametrize("url", BAD_URLS_WITH_CREDENTIALS)
def test_messages_never_echo_the_credentials_in_a_base_url(
    build: Callable[..., object], url: str
) -> None:
    with pytest.raises(ValueError, match="base_url") as info:
        build(url)
    text = str(info.value) + repr(info.value)
    assert SECRET not in text
    assert "user" not in text.replace("userinfo", "")


@builders
def test_a_non_string_base_url_is_a_type_error(build: Callable[..., object]) -> None:
    with pytest.raises(TypeError, match="base_url"):
        build(b"https://api.example.com")


@builders
@pytest.mark.parametrize(
    "url",
    ["http://api.example.com", "http://10.0.0.5:8080", "http://[2001:db8::1]", "http://localhost."],
)
def test_plain_http_to_a_remote_host_is_refused(build: Callable[..., object], url: str) -> None:
    with pytest.raises(ValueError, match="allow_insecure_http=True"):
        build(url)


@builders
def test_plain_http_to_a_remote_host_is_accepted_when_the_caller_opts_in(
    build: Callable[..., object],
) -> None:
    build("http://api.example.com", allow_insecure_http=True)
    with pytest.raises(TypeError, match="allow_insecure_http"):
        build("http://api.example.com", allow_insecure_http="yes")


@builders
@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080",
        "http://LOCALHOST:8080",
        "http://127.0.0.1",
        "http://127.9.8.7:1234",
        "http://[::1]:8080",
        "https://api.example.com",
    ],
)
def test_loopback_and_https_need_no_opt_in(build: Callable[..., object], url: str) -> None:
    build(url)


async def test_a_client_reaches_a_fake_on_localhost_over_plain_http() -> None:
    app = FakeTelephony(twilio_accounts={SID: TOKEN}, status_callbacks=False)
    async with serve(app) as url:
        port = url.rsplit(":", 1)[1]
        async with TwilioClient(SID, TOKEN, base_url=f"http://localhost:{port}") as client:
            assert await client.list_calls() == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@h.example/x?y#z", "https://***@h.example/x?y#z"),
        ("https://h.example/a@b", "https://h.example/a@b"),
        ("https://a@b@h.example", "https://***@h.example"),
        ("u:p@h.example", "***@h.example"),
        ("https//u:p@h.example/x", "***@h.example/x"),
        ("https://h.example", "https://h.example"),
        (42, "<int>"),
    ],
)
def test_redact_url(url: object, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_twilio_webhook_guard_does_not_echo_credentials_in_public_base_url() -> None:
    from resilient_voice.asgi import TwilioSignatureMiddleware

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    with pytest.raises(ValueError, match="public_base_url") as info:
        TwilioSignatureMiddleware(app, TOKEN, public_base_url=f"ftp://user:{SECRET}@hooks.example")
    assert SECRET not in str(info.value)


async def test_the_twilio_sdk_adapter_refuses_a_plaintext_url_the_sdk_built() -> None:
    app = FakeTelephony(twilio_accounts={SID: TOKEN}, status_callbacks=False)
    async with serve(app) as url:
        http_client = ResilientTwilioHttpClient()
        async with http_client:
            client = Client(SID, TOKEN, http_client=http_client)
            client.api.base_url = "http://api.twilio.example"
            with pytest.raises(ValueError, match="allow_insecure_http=True"):
                await client.calls.list_async()
            client.api.base_url = url  # loopback: allowed
            assert await client.calls.list_async() == []
    assert len(app.requests()) == 1


async def test_the_vapi_sdk_recipe_refuses_a_plaintext_url_the_sdk_was_given() -> None:
    import vapi

    http = sdk_http_client()
    client = vapi.AsyncVapi(token=VAPI_KEY, base_url="http://api.vapi.example", httpx_client=http)
    try:
        with pytest.raises(ValueError, match="allow_insecure_http=True") as info:
            await client.calls.get("call-1", request_options=no_sdk_retries())
    finally:
        await http.aclose()
    assert VAPI_KEY not in str(info.value)
