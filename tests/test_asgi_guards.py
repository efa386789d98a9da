"""Hardening of the two webhook guards: websocket handshakes, pre-authentication work, strict
mode, configuration errors and the JSON refusals, under real servers where the server matters.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import anyio
import pytest
from anyio.from_thread import start_blocking_portal
from fastapi import FastAPI
from fastapi import WebSocket as FastAPIWebSocket
from litestar import Litestar, post
from litestar import Request as LitestarRequest
from litestar import WebSocket as LitestarWebSocket
from litestar import websocket as litestar_websocket
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator

from _apps import FRAMEWORKS, build, http_client, serve_sync
from _ws import handshake, serve_ws
from resilient_voice.asgi import (
    CorrelationIdMiddleware,
    RateLimitMiddleware,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.asgi import _twilio as twilio_guard
from resilient_voice.asgi._common import sanitized_id
from resilient_voice.correlation import get_correlation_id
from resilient_voice.testing import FakeTelephony, ManualClock, serve

TOKEN = "12345678901234567890123456789012"
VAPI_BEARER = "vapi-bearer-token"
VAPI_SECRET = "vapi-shared-secret"
FORM = {"content-type": "application/x-www-form-urlencoded"}
FORBIDDEN = {"error": "forbidden"}
HEX_ID = re.compile(r"[0-9a-f]{32}")
PAIRS = [
    ("CallSid", "CA1234"),
    ("From", "+15550100"),
    ("Digits", "1"),
    ("Digits", "2"),
    ("SpeechResult", "yes, please & thank you"),
    ("Caller", "Zoë"),
    ("CallerCity", ""),
]


class Multi(dict[str, list[str]]):
    def getall(self, name: str) -> list[str]:
        return self[name]


def sign(url: str, pairs: list[tuple[str, str]] | None = None, secret: str = TOKEN) -> str:
    params = Multi()
    for name, value in pairs or []:
        params.setdefault(name, []).append(value)
    return str(RequestValidator(secret).compute_signature(url, params))


# WebSocket handshakes under a real uvicorn (wsproto), in each framework.


async def _greet(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


async def _raw(request: Request) -> Response:
    return Response(await request.body())


def _starlette(middleware: type[Any], **options: Any) -> Any:
    routes = [
        WebSocketRoute("/hook/ws", _greet),
        WebSocketRoute("/open/ws", _greet),
        Route("/hook/raw", _raw, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(middleware, **options)])


def _fastapi(middleware: type[Any], **options: Any) -> Any:
    app = FastAPI()

    @app.websocket("/hook/ws")
    async def hook(websocket: FastAPIWebSocket) -> None:
        await _greet(websocket)

    @app.websocket("/open/ws")
    async def open_ws(websocket: FastAPIWebSocket) -> None:
        await _greet(websocket)

    app.add_api_route("/hook/raw", _raw, methods=["POST"])
    app.add_middleware(middleware, **options)
    return app


@litestar_websocket(["/hook/ws", "/open/ws"])
async def _ls_greet(socket: LitestarWebSocket[Any, Any, Any]) -> None:
    await socket.accept()
    await socket.send_text("hello")
    await socket.close()


@post("/hook/raw", status_code=200)
async def _ls_raw(request: LitestarRequest[Any, Any, Any]) -> bytes:
    return bytes(await request.body())


def _litestar(middleware: type[Any], **options: Any) -> Any:
    app = Litestar(route_handlers=[_ls_greet, _ls_raw], debug=False, logging_config=None)
    return middleware(app, **options)


WS_BUILDERS = {"starlette": _starlette, "fastapi": _fastapi, "litestar": _litestar}
WS_VARIANTS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "twilio": (TwilioSignatureMiddleware, {"auth_token": TOKEN, "paths": ["/hook/*"]}),
    "twilio-public": (
        TwilioSignatureMiddleware,
        {
            "auth_token": TOKEN,
            "paths": ["/hook/*"],
            "public_base_url": "https://voice.example.com/base",
        },
    ),
    "vapi": (
        VapiWebhookMiddleware,
        {"bearer_token": VAPI_BEARER, "secret": VAPI_SECRET, "paths": ["/hook/*"]},
    ),
    "vapi-hmac-only": (VapiWebhookMiddleware, {"hmac_secret": "k", "paths": ["/hook/*"]}),
}


@contextmanager
def serve_ws_sync(app: Any) -> Iterator[str]:
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_ws(app)) as address,
    ):
        yield address


@pytest.fixture(scope="module")
def ws_servers() -> Iterator[dict[tuple[str, str], str]]:
    with ExitStack() as stack:

        class Lazy(dict[tuple[str, str], str]):
            def __missing__(self, key: tuple[str, str]) -> str:
                framework, variant = key
                middleware, options = WS_VARIANTS[variant]
                app = WS_BUILDERS[framework](middleware, **options)
                self[key] = stack.enter_context(serve_ws_sync(app))
                return self[key]

        yield Lazy()


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _refused(result: Any) -> None:
    assert result.status == 403, result
    assert json.loads(result.body) == FORBIDDEN
    assert HEX_ID.fullmatch(result.headers["x-correlation-id"])
    assert result.message is None


async def test_twilio_websocket_handshake_is_verified(
    framework: str, ws_servers: dict[tuple[str, str], str]
) -> None:
    address = ws_servers[framework, "twilio"]
    # Unsigned, signed with another token, signed for http:// instead of ws://: refused.
    _refused(await handshake(address, "/hook/ws", {}))
    wrong_token = sign(f"ws://{address}/hook/ws", secret="another-token-0000000000000000000")
    _refused(await handshake(address, "/hook/ws", {"X-Twilio-Signature": wrong_token}))
    http_scheme = sign(f"http://{address}/hook/ws")
    _refused(await handshake(address, "/hook/ws", {"X-Twilio-Signature": http_scheme}))
    other_path = sign(f"ws://{address}/hook/other")
    _refused(await handshake(address, "/hook/ws", {"X-Twilio-Signature": other_path}))
    # Signed as Twilio signs a handshake: the websocket URL, no parameters.
    signed = sign(f"ws://{address}/hook/ws")
    accepted = await handshake(address, "/hook/ws", {"X-Twilio-Signature": signed})
    assert (accepted.status, accepted.message) == (101, "hello")
    # Unguarded paths are not checked.
    assert (await handshake(address, "/open/ws", {})).message == "hello"


async def test_twilio_websocket_signed_for_the_public_wss_url(
    framework: str, ws_servers: dict[tuple[str, str], str]
) -> None:
    address = ws_servers[framework, "twilio-public"]
    for url in (
        "wss://voice.example.com/base/hook/ws",
        "wss://voice.example.com:443/base/hook/ws",
    ):
        accepted = await handshake(address, "/hook/ws", {"X-Twilio-Signature": sign(url)})
        assert (url, accepted.status, accepted.message) == (url, 101, "hello")
    for url in ("https://voice.example.com/base/hook/ws", "ws://voice.example.com/base/hook/ws"):
        _refused(await handshake(address, "/hook/ws", {"X-Twilio-Signature": sign(url)}))


async def test_vapi_websocket_needs_a_header_credential(
    framework: str, ws_servers: dict[tuple[str, str], str]
) -> None:
    address = ws_servers[framework, "vapi"]
    _refused(await handshake(address, "/hook/ws", {}))
    _refused(await handshake(address, "/hook/ws", {"Authorization": "Bearer nope"}))
    for headers in ({"Authorization": f"Bearer {VAPI_BEARER}"}, {"X-Vapi-Secret": VAPI_SECRET}):
        accepted = await handshake(address, "/hook/ws", headers)
        assert (accepted.status, accepted.message) == (101, "hello")
    # HMAC signs a body; a handshake has none and Vapi documents no handshake signature.
    hmac_only = ws_servers[framework, "vapi-hmac-only"]
    headers = {"x-signature": "0" * 64, "x-timestamp": "1800000000"}
    _refused(await handshake(hmac_only, "/hook/ws", headers))
    assert (await handshake(hmac_only, "/open/ws", {})).message == "hello"


@pytest.mark.parametrize(
    "middleware",
    [
        lambda app: TwilioSignatureMiddleware(app, TOKEN),
        lambda app: VapiWebhookMiddleware(app, secret=VAPI_SECRET),
    ],
)
async def test_websocket_refused_with_close_without_the_denial_extension(middleware: Any) -> None:
    called: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope)

    sent: list[Any] = []
    messages = [{"type": "websocket.connect"}]

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "scheme": "ws",
        "path": "/stream",
        "raw_path": b"/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"example.com")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    await middleware(app)(scope, receive, send)
    assert called == []
    assert sent == [{"type": "websocket.close", "code": 1008}]


# Refusals: JSON in the rate limiter's shape, under a fresh correlation id.


@pytest.fixture(scope="module")
def http_servers() -> Iterator[dict[tuple[str, str], str]]:
    with ExitStack() as stack:

        class Lazy(dict[tuple[str, str], str]):
            def __missing__(self, key: tuple[str, str]) -> str:
                framework, guard = key
                if guard == "twilio":
                    app = build(
                        framework, TwilioSignatureMiddleware, auth_token=TOKEN, paths=["/hook/*"]
                    )
                else:
                    app = build(
                        framework,
                        VapiWebhookMiddleware,
                        secret=VAPI_SECRET,
                        paths=["/hook/*"],
                        max_body=64 * 1024,
                    )
                self[key] = stack.enter_context(serve_sync(app))
                return self[key]

        yield Lazy()


@pytest.mark.parametrize("guard", ["twilio", "vapi"])
async def test_refusals_are_json_with_a_fresh_correlation_id(
    framework: str, guard: str, http_servers: dict[tuple[str, str], str]
) -> None:
    url = http_servers[framework, guard]
    offered = {"x-correlation-id": "chosen-by-the-forger", **FORM}
    async with http_client() as client:
        forbidden = await client.post(url + "/hook/raw", content=b"a=1", headers=offered)
        big = {**offered, "x-twilio-signature": "A" * 27 + "=", "x-vapi-secret": VAPI_SECRET}
        too_large = await client.post(url + "/hook/raw", content=b"x" * 70_000, headers=big)
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "application/json"
    assert forbidden.json() == FORBIDDEN
    assert too_large.status_code == 413
    assert too_large.json() == {"error": "payload_too_large", "max_bytes": 64 * 1024}
    for response in (forbidden, too_large):
        cid = response.headers["x-correlation-id"]
        assert HEX_ID.fullmatch(cid)
        assert cid != "chosen-by-the-forger"
    assert forbidden.headers["x-correlation-id"] != too_large.headers["x-correlation-id"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str | None, Any, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        offered = getattr(record, "offered_correlation_id", "absent")
        self.seen.append((get_correlation_id(), offered, record.getMessage()))


@contextmanager
def captured() -> Iterator[_Capture]:
    handler = _Capture()
    logger = logging.getLogger("resilient_voice.asgi")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _call(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _scope(headers: list[tuple[bytes, bytes]], path: str = "/hook/raw") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_a_forged_webhook_is_logged_under_a_fresh_id_with_the_offered_one_apart() -> None:
    stack = CorrelationIdMiddleware(TwilioSignatureMiddleware(_ok, TOKEN))
    with captured() as log:
        sent = await _call(stack, _scope([(b"x-correlation-id", b"forger-picked")]))
    (fresh, offered, message) = log.seen[0]
    assert offered == "forger-picked"
    assert fresh is not None
    assert HEX_ID.fullmatch(fresh)
    assert "rejected Twilio webhook" in message
    # The outer middleware echoes the id the refusal was logged under, once.
    headers = [(k, v) for k, v in sent[0]["headers"] if k == b"x-correlation-id"]
    assert headers == [(b"x-correlation-id", fresh.encode())]
    assert get_correlation_id() is None

    # Without an outer CorrelationIdMiddleware the raw header is offered, sanitised.
    guard = VapiWebhookMiddleware(_ok, secret=VAPI_SECRET)
    hostile = b"evil\x1b[31m<script>" + b"x" * 300
    with captured() as log:
        sent = await _call(guard, _scope([(b"x-correlation-id", hostile)]))
    (fresh, offered, _) = log.seen[0]
    assert offered == "evil??31m?script?" + "x" * 111
    assert dict(sent[0]["headers"])[b"x-correlation-id"] == fresh.encode()  # type: ignore[union-attr]


def test_sanitized_id() -> None:
    assert sanitized_id(None) is None
    assert sanitized_id("abc-1.2:3_x") == "abc-1.2:3_x"
    assert sanitized_id(b"a\r\nb") == "a??b"
    assert sanitized_id("é" * 200) == "?" * 128


async def test_recommended_stack_refuses_in_one_json_shape_with_the_id_header() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _ok(scope, receive, send)

    clock = ManualClock()
    stack = CorrelationIdMiddleware(
        RateLimitMiddleware(
            TwilioSignatureMiddleware(app, TOKEN, paths=["/hook/*"], max_body=100),
            rate=1,
            burst=2,
            clock=clock,
        )
    )
    forbidden = await _call(stack, _scope([]))
    too_large = await _call(
        stack,
        _scope([(b"x-twilio-signature", b"A" * 27 + b"="), (b"content-length", b"200")]),
        b"x" * 200,
    )
    limited = await _call(stack, _scope([]))
    bodies = [json.loads(sent[1]["body"]) for sent in (forbidden, too_large, limited)]
    assert bodies == [
        {"error": "forbidden"},
        {"error": "payload_too_large", "max_bytes": 100},
        {"error": "rate_limited", "retry_after": 1},
    ]
    for sent in (forbidden, too_large, limited):
        headers = dict(sent[0]["headers"])
        assert headers[b"content-type"] == b"application/json"
        assert HEX_ID.fullmatch(headers[b"x-correlation-id"].decode())


# Pre-authentication work.


@pytest.mark.parametrize(
    "signature",
    [b"A" * 28, b"A" * 44, b"abc=", b"A" * 27 + b"==", b"A" * 26 + b"*=", b"A" * 8000],
)
async def test_malformed_signature_is_refused_before_the_body_is_read(signature: bytes) -> None:
    reads: list[Any] = []

    async def receive() -> Any:
        reads.append(1)
        return {"type": "http.request", "body": b"a=1", "more_body": False}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    guard = TwilioSignatureMiddleware(_ok, TOKEN)
    await guard(_scope([(b"x-twilio-signature", signature), *FORM_HEADER]), receive, send)
    assert (sent[0]["status"], reads) == (403, [])


FORM_HEADER = [(b"content-type", b"application/x-www-form-urlencoded")]
URL = "http://127.0.0.1:8000/hook/raw"


def _signed(pairs: list[tuple[str, str]], url: str = URL) -> list[tuple[bytes, bytes]]:
    return [(b"x-twilio-signature", sign(url, pairs).encode()), *FORM_HEADER]


async def _status(guard: Any, pairs: list[tuple[str, str]], body: bytes | None = None) -> int:
    raw = urlencode(pairs).encode() if body is None else body
    sent = await _call(guard, _scope(_signed(pairs)), raw)
    return int(sent[0]["status"])


async def test_form_field_count_is_capped() -> None:
    guard = TwilioSignatureMiddleware(_ok, TOKEN)
    at_cap = [(f"F{i}", "v") for i in range(100)]
    assert await _status(guard, at_cap) == 200
    assert await _status(guard, [*at_cap, ("F100", "v")]) == 403
    small = TwilioSignatureMiddleware(_ok, TOKEN, max_fields=3)
    assert await _status(small, [("a", "1"), ("b", "2"), ("c", "3")]) == 200
    assert await _status(small, [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]) == 403


async def test_the_parameter_string_is_built_once_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, Any]] = []
    original = RequestValidator.compute_signature

    def counting(self: Any, uri: str, params: Any, algorithm: Any = None) -> Any:
        calls.append((uri, params))
        return original(self, uri, params, algorithm)

    built: list[int] = []
    signed_params = twilio_guard._signed_params

    def counting_join(pairs: Any) -> str:
        built.append(1)
        return signed_params(pairs)

    pairs = [(f"F{i}", "v" * 10) for i in range(50)]
    scope = _scope(_signed(pairs))
    monkeypatch.setattr(RequestValidator, "compute_signature", counting)
    monkeypatch.setattr(twilio_guard, "_signed_params", counting_join)
    guard = TwilioSignatureMiddleware(_ok, ["another-token-0", "another-token-1"])
    sent = await _call(guard, scope, urlencode(pairs).encode())
    assert sent[0]["status"] == 403
    # Two tokens times two port variants, each one HMAC over a string built once.
    assert len(calls) == 4
    assert built == [1]
    assert all(params is None for _, params in calls)
    joined = "".join(name + value for name, value in sorted(pairs))
    assert all(uri.endswith(joined) for uri, _ in calls)


async def test_default_max_body_is_64_kib() -> None:
    guard = TwilioSignatureMiddleware(_ok, TOKEN)
    fits = [("Body", "x" * (64 * 1024 - 10))]
    assert await _status(guard, fits) == 200
    over = [("Body", "x" * (64 * 1024))]
    sent = await _call(guard, _scope(_signed(over)), urlencode(over).encode())
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"error": "payload_too_large", "max_bytes": 65536}
    roomy = TwilioSignatureMiddleware(_ok, TOKEN, max_body=128 * 1024)
    assert await _status(roomy, over) == 200


# Strict mode.

GENUINE = {
    "quote_plus": urlencode(PAIRS).encode(),
    "percent-20": urlencode(PAIRS, quote_via=quote).encode(),
    "lower-hex": urlencode(PAIRS).replace("%2B", "%2b").replace("%C3%AB", "%c3%ab").encode(),
    "unreserved-kept": b"CallSid=CA1234&From=%2B15550100&Note=it's*(ok)!~",
}

ALTERED = {
    "repeated pair": urlencode([*PAIRS, ("Digits", "1")]).encode(),
    "empty segment": b"a=1&&b=2",
    "trailing separator": b"a=1&b=2&",
    "segment without '='": b"a=1&b",
    "second '='": b"a=1&b=2=3",
    "semicolon": b"a=1;b=2",
    "bad escape": b"a=%zz",
    "empty name": b"=1&a=2",
}


@pytest.mark.parametrize("name", sorted(GENUINE))
async def test_strict_mode_accepts_genuine_encodings(name: str) -> None:
    body = GENUINE[name]
    pairs = parse_qsl(body.decode(), keep_blank_values=True)
    strict = TwilioSignatureMiddleware(_ok, TOKEN, strict=True)
    assert await _status(strict, pairs, body) == 200


@pytest.mark.parametrize("name", sorted(ALTERED))
async def test_strict_mode_refuses_bodies_the_signature_cannot_tell_apart(name: str) -> None:
    body = ALTERED[name]
    # What a captured signature covers: the parameters as parsed (repeats de-duplicated).
    pairs = parse_qsl(body.decode(), keep_blank_values=True)
    lenient = TwilioSignatureMiddleware(_ok, TOKEN)
    strict = TwilioSignatureMiddleware(_ok, TOKEN, strict=True)
    assert await _status(lenient, pairs, body) == 200  # what strict mode is for
    assert await _status(strict, pairs, body) == 403


async def _http_only(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await _ok(scope, receive, send)


async def test_strict_mode_accepts_fake_telephony_callbacks() -> None:
    account = "AC" + "1" * 32
    fake = FakeTelephony(
        twilio_accounts={account: TOKEN}, calls_per_second=1000.0, call_duration=0.05
    )
    async with serve(fake) as fake_url:
        guard = TwilioSignatureMiddleware(_http_only, TOKEN, strict=True, paths=["/status"])
        async with serve(guard) as hook_url, http_client(base_url=fake_url) as client:
            created = await client.post(
                f"/2010-04-01/Accounts/{account}/Calls.json",
                data={
                    "To": "+14155550100",
                    "From": "+14155550199",
                    "Url": "https://example.com/twiml",
                    "StatusCallback": f"{hook_url}/status?rv_cid=cid-1",
                    "StatusCallbackEvent": ["initiated", "answered", "completed"],
                },
                auth=(account, TOKEN),
            )
            assert created.status_code == 201
            with anyio.fail_after(10):
                while len(fake.callbacks("status-callback")) < 3:
                    await anyio.sleep(0.02)
    assert [c.response_status for c in fake.callbacks("status-callback")] == [200] * 3


# Configuration.


def test_an_unset_auth_token_is_named() -> None:
    with pytest.raises(TypeError, match="auth_token is None"):
        TwilioSignatureMiddleware(_ok, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="auth_token must be a str"):
        TwilioSignatureMiddleware(_ok, [TOKEN, None])  # type: ignore[list-item]
    for options in ({"max_fields": 0}, {"max_fields": True}):
        with pytest.raises(ValueError, match="max_fields"):
            TwilioSignatureMiddleware(_ok, TOKEN, **options)


def test_unset_vapi_credentials_are_named() -> None:
    with pytest.raises(ValueError, match="all None"):
        VapiWebhookMiddleware(_ok, secret=None, bearer_token=None, hmac_secret=None)


async def test_a_429_names_its_correlation_id_without_the_correlation_middleware() -> None:
    limited = RateLimitMiddleware(_ok, rate=1, burst=1, clock=ManualClock())
    assert (await _call(limited, _scope([])))[0]["status"] == 200
    refused = await _call(limited, _scope([]))
    headers = dict(refused[0]["headers"])
    assert refused[0]["status"] == 429
    assert HEX_ID.fullmatch(headers[b"x-correlation-id"].decode())
    stacked = CorrelationIdMiddleware(limited)
    refused = await _call(stacked, _scope([(b"x-correlation-id", b"client-1")]))
    ids = [v for k, v in refused[0]["headers"] if k == b"x-correlation-id"]
    assert ids == [b"client-1"]
