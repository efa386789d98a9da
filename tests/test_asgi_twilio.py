"""TwilioSignatureMiddleware in Starlette, FastAPI and Litestar, signed by the twilio package."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from twilio.request_validator import RequestValidator

from _apps import FRAMEWORKS, build, http_client, serve_sync
from resilient_voice.asgi import TwilioSignatureMiddleware

TOKEN = "12345678901234567890123456789012"
SHARED_ID = "webhooks_sharedkey_1"
SHARED_SECRET = "shared-secret-abcdef"
FORM = {"content-type": "application/x-www-form-urlencoded"}
FORBIDDEN_JSON = '{"error":"forbidden"}'
PAIRS = [
    ("CallSid", "CA1234"),
    ("From", "+15550100"),
    ("To", "+15550199"),
    ("CallerCity", ""),
    ("Digits", "1"),
    ("Digits", "2"),
    ("SpeechResult", "yes, please & thank you"),
    ("Caller", "Zoë"),
]
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"shared_keys": {SHARED_ID: SHARED_SECRET}},
    "public": {"public_base_url": "https://hooks.example.com/base/"},
    "proxied": {"trusted_proxies": ["127.0.0.1"]},
}


class Multi(dict[str, list[str]]):
    """What the twilio validator reads repeated keys from."""

    def getall(self, name: str) -> list[str]:
        return self[name]


def multi(pairs: list[tuple[str, str]]) -> Multi:
    params = Multi()
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def sign(url: str, pairs: list[tuple[str, str]] | None = None, **kwargs: Any) -> str:
    secret = kwargs.pop("secret", TOKEN)
    params = multi(pairs) if pairs is not None else {}
    return str(RequestValidator(secret).compute_signature(url, params, **kwargs))


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[tuple[str, str], str]]:
    with ExitStack() as stack:

        class Lazy(dict[tuple[str, str], str]):
            def __missing__(self, key: tuple[str, str]) -> str:
                framework, variant = key
                app = build(
                    framework,
                    TwilioSignatureMiddleware,
                    auth_token=TOKEN,
                    paths=["/hook/*"],
                    max_body=4096,
                    **VARIANTS[variant],
                )
                self[key] = stack.enter_context(serve_sync(app))
                return self[key]

        yield Lazy()


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(framework: str, servers: dict[tuple[str, str], str]) -> str:
    return servers[framework, "plain"]


async def post(url: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with http_client(timeout=5.0) as client:
        return await client.post(url + path, content=body, headers=headers)


async def test_signed_form_is_accepted_and_replayed_untouched(url: str) -> None:
    body = urlencode(PAIRS).encode()
    signature = sign(f"{url}/hook/form?rv_cid=abc", PAIRS)
    headers = {**FORM, "x-twilio-signature": signature}
    response = await post(url, "/hook/form?rv_cid=abc", body, headers)
    assert response.status_code == 200, response.text
    assert sorted(tuple(p) for p in response.json()) == sorted(PAIRS)  # the app parsed it
    response = await post(
        url,
        "/hook/raw?rv_cid=abc",
        body,
        headers | {"x-twilio-signature": sign(f"{url}/hook/raw?rv_cid=abc", PAIRS)},
    )
    assert response.status_code == 200
    assert response.content == body


async def test_signature_over_url_with_default_port_variants(url: str) -> None:
    # The SDK accepts the URL with and without the port; so do we.
    without_port = url.rsplit(":", 1)[0]
    body = urlencode(PAIRS).encode()
    signature = sign(f"{without_port}/hook/form", PAIRS)
    response = await post(url, "/hook/form", body, {**FORM, "x-twilio-signature": signature})
    assert response.status_code == 200


TAMPERS = (
    "param_changed",
    "param_added",
    "param_dropped",
    "url_changed",
    "query_changed",
    "https",
    "token",
)


async def test_tampered_requests_are_rejected(url: str) -> None:
    for tamper in TAMPERS:
        signed_url, sent_pairs, path = f"{url}/hook/form?a=1", list(PAIRS), "/hook/form?a=1"
        secret = TOKEN
        if tamper == "param_changed":
            sent_pairs[1] = ("From", "+15550666")
        elif tamper == "param_added":
            sent_pairs.append(("Extra", "1"))
        elif tamper == "param_dropped":
            sent_pairs.pop()
        elif tamper == "url_changed":
            signed_url = f"{url}/hook/other?a=1"
        elif tamper == "query_changed":
            path = "/hook/form?a=2"
        elif tamper == "https":
            signed_url = signed_url.replace("http://", "https://")
        else:
            secret = "another-token-000000000000000000"
        headers = {**FORM, "x-twilio-signature": sign(signed_url, PAIRS, secret=secret)}
        response = await post(url, path, urlencode(sent_pairs).encode(), headers)
        assert (tamper, response.status_code, response.text) == (tamper, 403, FORBIDDEN_JSON)
    # The untampered request passes, so the rejections above are about the tampering.
    headers = {**FORM, "x-twilio-signature": sign(f"{url}/hook/form?a=1", PAIRS)}
    response = await post(url, "/hook/form?a=1", urlencode(PAIRS).encode(), headers)
    assert response.status_code == 200


async def test_missing_or_hostile_signature_header_is_403(url: str) -> None:
    body = urlencode(PAIRS).encode()
    assert (await post(url, "/hook/form", body, FORM)).status_code == 403
    assert (
        await post(url, "/hook/form", body, FORM | {"x-twilio-signature": ""})
    ).status_code == 403
    huge = {**FORM, "x-twilio-signature": "A" * 8000}
    assert (await post(url, "/hook/form", body, huge)).status_code == 403
    odd_host = {**FORM, "x-twilio-signature": sign(f"{url}/hook/form", PAIRS), "host": "a/b@c"}
    assert (await post(url, "/hook/form", body, odd_host)).status_code == 403


async def test_json_body_sha256_variant(url: str) -> None:
    import hashlib

    body = json.dumps({"CallSid": "CA1", "Status": "completed"}).encode()
    digest = hashlib.sha256(body).hexdigest()
    path = f"/hook/raw?bodySHA256={digest}"
    headers = {"content-type": "application/json", "x-twilio-signature": sign(url + path)}
    response = await post(url, path, body, headers)
    assert response.status_code == 200
    assert response.content == body
    tampered = body.replace(b"completed", b"failed   ")
    assert (await post(url, path, tampered, headers)).status_code == 403
    # A JSON body with no bodySHA256 would be unauthenticated: refused.
    headers = {"content-type": "application/json", "x-twilio-signature": sign(url + "/hook/raw")}
    assert (await post(url, "/hook/raw", body, headers)).status_code == 403


async def test_shared_key_hmac_sha256_variant(url: str) -> None:
    body = urlencode(PAIRS).encode()
    signature = sign(f"{url}/hook/form", PAIRS, secret=SHARED_SECRET, algorithm="HMAC_SHA256")
    settings = f"key={SHARED_ID},algorithm=HMAC_SHA256"
    headers = {
        **FORM,
        "x-twilio-signature": signature,
        "x-twilio-webhooks-signature-settings": settings,
    }
    assert (await post(url, "/hook/form", body, headers)).status_code == 200
    unknown = headers | {"x-twilio-webhooks-signature-settings": "key=other,algorithm=HMAC_SHA256"}
    assert (await post(url, "/hook/form", body, unknown)).status_code == 403
    odd = headers | {"x-twilio-webhooks-signature-settings": f"key={SHARED_ID},algorithm=MD5"}
    assert (await post(url, "/hook/form", body, odd)).status_code == 403
    without_settings = {**FORM, "x-twilio-signature": signature}
    assert (await post(url, "/hook/form", body, without_settings)).status_code == 403


async def test_unguarded_paths_pass_through(url: str) -> None:
    response = await post(url, "/open", b"anything", {"content-type": "text/plain"})
    assert response.status_code == 200
    assert response.content == b"anything"


async def test_body_limit_is_413(url: str) -> None:
    pairs = [("Body", "x" * 5000)]
    body = urlencode(pairs).encode()
    headers = {**FORM, "x-twilio-signature": sign(f"{url}/hook/form", pairs)}
    assert (await post(url, "/hook/form", body, headers)).status_code == 413

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    async with http_client(timeout=5.0) as client:
        response = await client.post(url + "/hook/form", content=chunked(), headers=headers)
    assert response.status_code == 413


async def test_public_base_url_is_what_is_checked(
    framework: str, servers: dict[tuple[str, str], str]
) -> None:
    url = servers[framework, "public"]
    body = urlencode(PAIRS).encode()
    public = "https://hooks.example.com/base/hook/form?x=1"
    headers = {**FORM, "x-twilio-signature": sign(public, PAIRS)}
    assert (await post(url, "/hook/form?x=1", body, headers)).status_code == 200
    local = {**FORM, "x-twilio-signature": sign(f"{url}/hook/form?x=1", PAIRS)}
    assert (await post(url, "/hook/form?x=1", body, local)).status_code == 403


async def test_forwarded_headers_only_from_trusted_proxies(
    framework: str, servers: dict[tuple[str, str], str]
) -> None:
    body = urlencode(PAIRS).encode()
    public = "https://voice.example.com/hook/form"
    headers = {
        **FORM,
        "x-twilio-signature": sign(public, PAIRS),
        "x-forwarded-proto": "http, https",  # the nearest proxy appended the right-most value
        "x-forwarded-host": "voice.example.com",
    }
    trusted = servers[framework, "proxied"]
    assert (await post(trusted, "/hook/form", body, headers)).status_code == 200
    untrusted = servers[framework, "plain"]
    assert (await post(untrusted, "/hook/form", body, headers)).status_code == 403
    forged = headers | {"x-forwarded-host": "voice.example.com\tevil"}
    assert (await post(trusted, "/hook/form", body, forged)).status_code == 403


# Direct ASGI calls: scopes a real server would never produce.


async def _run(
    middleware: Any, scope_overrides: dict[str, Any], body: bytes = b""
) -> tuple[int, list[str]]:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        events.append("app")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware.app = app
    status = 0

    async def receive() -> Any:
        events.append("receive")
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/hook/form",
        "raw_path": b"/hook/form",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    scope.update(scope_overrides)
    await middleware(scope, receive, send)
    return status, events


def _middleware(**options: Any) -> TwilioSignatureMiddleware:
    return TwilioSignatureMiddleware(_unused, TOKEN, paths=["/hook/*"], **options)


async def _unused(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("replaced in _run")


async def test_crlf_in_host_is_rejected_without_reading_the_body() -> None:
    headers = [(b"host", b"example.com\r\nx: y"), (b"x-twilio-signature", b"abc=")]
    status, events = await _run(_middleware(), {"headers": headers})
    assert (status, events) == (403, [])


async def test_untrusted_peer_forwarded_headers_are_ignored() -> None:
    middleware = _middleware(trusted_proxies=["10.0.0.0/8"])
    url = "https://public.example.com/hook/form"
    headers = [
        (b"host", b"internal:8000"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"public.example.com"),
        (b"x-twilio-signature", sign(url, []).encode()),
    ]
    # A server on a private address, as behind a load balancer: the peer is scope["client"].
    private = {"headers": headers, "server": ("10.9.9.9", 8000)}
    assert (await _run(middleware, private | {"client": ("192.0.2.1", 1)}))[0] == 403
    assert (await _run(middleware, private | {"client": ("10.1.2.3", 1)}))[0] == 200
    # A loopback peer is untrusted too.
    assert (await _run(middleware, {"headers": headers}))[0] == 403


async def test_headers_twilio_sends_once_are_refused_when_repeated() -> None:
    # Found by the forgery suite (tests/soak): the first copy was read, so a genuine signature
    # followed by a forged one, or a second Host, passed.
    genuine = sign("http://example.com/hook/form", []).encode()
    forged = sign("http://other.example.com/hook/form", []).encode()
    host = (b"host", b"example.com")
    settings = (b"x-twilio-webhooks-signature-settings", b"key=k,algorithm=HMAC_SHA256")
    middleware = _middleware(shared_keys={"k": "secret"})
    assert (await _run(middleware, {"headers": [host, (b"x-twilio-signature", genuine)]}))[0] == 200
    for headers in (
        [host, (b"x-twilio-signature", genuine), (b"x-twilio-signature", forged)],
        [host, (b"x-twilio-signature", genuine), (b"host", b"other.example.com")],
        [(b"host", b"other.example.com"), host, (b"x-twilio-signature", genuine)],
        [host, (b"x-twilio-signature", genuine), settings, settings],
    ):
        assert await _run(middleware, {"headers": headers}) == (403, [])


async def test_no_host_header_falls_back_to_server_address() -> None:
    headers = [(b"x-twilio-signature", sign("http://127.0.0.1:8000/hook/form", []).encode())]
    assert (await _run(_middleware(), {"headers": headers}))[0] == 200


async def test_a_server_address_outside_latin_1_is_refused_not_raised() -> None:
    # Found by tests/soak/test_asgi_fuzz.py: without a Host header the URL is rebuilt from
    # scope["server"], and encoding a name outside Latin-1 raised out of the middleware.
    headers = [(b"x-twilio-signature", b"A" * 27 + b"=")]
    for server in (("\u0100", 0), ("h\u00e9te", 80), ("\u2603", 443)):
        status, events = await _run(_middleware(), {"headers": headers, "server": server})
        assert (status, events) == (403, [])


async def test_unguarded_path_is_not_read() -> None:
    status, events = await _run(_middleware(), {"path": "/open", "raw_path": b"/open"})
    assert (status, events) == (200, ["app"])


async def test_lifespan_passes_through_and_websockets_are_guarded() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    sent: list[Any] = []

    async def connect() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    middleware = TwilioSignatureMiddleware(app, TOKEN)
    await middleware({"type": "lifespan"}, _unused, _unused)
    await middleware({"type": "websocket", "path": "/hook/x", "headers": []}, connect, send)
    assert seen == ["lifespan"]  # the unsigned handshake never reached the app
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_token_rotation_accepts_either_token() -> None:
    middleware = TwilioSignatureMiddleware(_unused, [TOKEN, "next-token"])
    for secret in (TOKEN, "next-token"):
        signature = sign("http://127.0.0.1:8000/hook/form", [], secret=secret)
        headers = [(b"x-twilio-signature", signature.encode())]
        assert (await _run(middleware, {"headers": headers}))[0] == 200


def test_missing_twilio_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "twilio.request_validator", None)
    with pytest.raises(ImportError, match=r"pip install 'resilient-voice\[twilio\]'"):
        TwilioSignatureMiddleware(_unused, TOKEN)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"auth_token": ""}, ValueError),
        ({"auth_token": []}, ValueError),
        ({"max_body": 0}, ValueError),
        ({"public_base_url": "ftp://x"}, ValueError),
        ({"public_base_url": "https://x/?q=1"}, ValueError),
        ({"paths": "/hook"}, TypeError),
        ({"paths": ["hook"]}, ValueError),
        ({"paths": []}, ValueError),
        ({"trusted_proxies": ["not-an-ip"]}, ValueError),
        ({"shared_keys": {"k": ""}}, ValueError),
    ],
)
def test_configuration_is_validated(options: dict[str, Any], error: type[Exception]) -> None:
    options.setdefault("auth_token", TOKEN)
    with pytest.raises(error):
        TwilioSignatureMiddleware(_unused, **options)


def test_repr_hides_the_token() -> None:
    assert TOKEN not in repr(TwilioSignatureMiddleware(_unused, TOKEN))


async def test_read_body_refuses_a_content_length_too_long_to_parse() -> None:
    from resilient_voice.asgi._common import BodyTooLargeError, read_body

    async def receive() -> Any:
        raise AssertionError("nothing may be read")

    scope = {"type": "http", "headers": [(b"content-length", b"9" * 5000)]}
    with pytest.raises(BodyTooLargeError):
        await read_body(scope, receive, 1024)
