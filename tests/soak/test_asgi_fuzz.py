"""Fuzzing at the ASGI boundary: generated raw scopes and client messages into each middleware.

No server: each middleware is called as the ASGI callable it is, with a scope and a client
that hypothesis makes up (headers of any bytes, empty names, huge values, duplicates, every
HTTP method and made-up ones, odd paths, root paths, query strings, schemes and clients,
Content-Length huge, negative or not a number, bodies cut short by a disconnect, bodies of
several MB delivered lazily, non-UTF-8 forms, JSON bombs, websocket and lifespan scopes and
scope types nobody defined), around an app that misbehaves on purpose too (raises a marker
exception before or after it started a response, never reads the body, answers nothing, sends
odd headers). What must hold for every example:

- no exception escapes but the app's own marker, unchanged (the very instance it raised);
- what reaches the server is well-formed: ``http.response.start`` exactly once, before any
  body, status an int in 100..599, headers a list of (bytes, bytes); nothing after the last
  body; a complete response whenever nobody raised, the client stayed and the app answered;
  a websocket accepted, closed or denied (``websocket.http.response``, only when the server
  offers it) in an order the ASGI spec allows; lifespan messages passed through;
- the body the app reads is the body the client sent, byte for byte;
- the correlation ContextVar is back to what it was after every call;
- memory: the tracemalloc peak of one example stays under ``PEAK_BOUND`` for the middleware
  (bodies are generated chunk by chunk, so a middleware that buffered a body it should stream,
  or beyond its ``max_body``, would exceed it).

Examples per middleware and backend: ``EXAMPLES[soak_size]``; CI (short) derandomizes, so a
run is reproducible; ``--soak-size full`` explores fresh inputs each run.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import sys
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from resilient_voice.asgi import (
    CorrelationIdMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.correlation import get_correlation_id
from resilient_voice.testing import ManualClock

EXAMPLES = {"short": 120, "full": 1000}
BACKENDS = ("asyncio", "trio")
TOKEN = "fuzz-auth-token"
BASE_URL = "https://voice.example.test"
VAPI_SECRET = b"vapi-secret"
VAPI_BEARER = b"vapi-bearer"
VAPI_HMAC = b"vapi-hmac-key"
NOW = 1_800_000_000.0
GUARD_MAX_BODY = 4096
VAPI_MAX_BODY = 256 * 1024
BIG_CHUNK = 64 * 1024
# The most one example may allocate (tracemalloc peak, the middleware's call only), by
# middleware. A streamed body passes 64 KiB at a time, so a middleware that kept a 5 MiB body
# it should stream, or read past its max_body (4 KiB for the Twilio guards), would exceed
# 512 KiB; the Vapi guard parses up to its max_body (256 KiB) of JSON once verified.
STREAMING = ("correlation", "correlation_traceparent", "ratelimit", "ratelimit_proxies", "metrics")
PEAK_BOUND = dict.fromkeys((*STREAMING, "twilio", "twilio_strict"), 512 * 1024) | {"vapi": 2 << 20}


class Marker(Exception):
    """What the fuzzed app raises on purpose; it must reach the server unchanged."""


# --- generated inputs ------------------------------------------------------------------------

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
HEADER_NAMES = (
    b"host", b"content-length", b"content-type", b"transfer-encoding", b"x-correlation-id",
    b"traceparent", b"x-api-key", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-port", b"forwarded", b"x-twilio-signature",
    b"x-twilio-webhooks-signature-settings", b"x-vapi-secret", b"authorization", b"x-signature",
    b"x-timestamp", b"X-Correlation-ID", b"Content-Length", b"", b" ", b"\xff", b"x" * 300,
)  # fmt: skip
HEADER_VALUES = (
    b"", b"0", b"-1", b"10", b"+5", b" 5", b"5 ", b"1e3", b"0x10", b"abc",
    b"99999999999999999999999999999", b"1" * 5000, b"\xff\xfe\x00", "é€😀".encode(),
    "é".encode("latin-1"), b"\r\nx-injected: 1", b"x" * 100_000,
    b"application/x-www-form-urlencoded", b"application/json", b"multipart/form-data; boundary=x",
    b"chunked", b"voice.example.test", b"127.0.0.1:8000", b"[::1]:80", b"h" * 300,
    b"abc-123", b"a" * 128, b"a" * 129, b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", b"1.2.3.4", b"1.2.3.4, ::1",
    b"unknown, 127.0.0.1", b"for=1.2.3.4;proto=https", b'for="[::1]:80";host=x',
    b"1.2.3.4, " * 5000,
    b"https", b"wss", b"A" * 27 + b"=", b"+" * 43 + b"=", b"key=k1,algorithm=HMAC_SHA256",
    VAPI_SECRET, b"Bearer " + VAPI_BEARER, b"bearer " + VAPI_BEARER, b"sha256=00",
    str(int(NOW)).encode(), str(int(NOW * 1000)).encode(), b"1" * 17, b"1.5.5",
)  # fmt: skip
BODIES = (
    b"",
    b"CallSid=CA123&CallStatus=completed",
    b"CallSid=\xff\xfe&CallStatus=%ff%fe&%E9=%",
    b"a=" + "é".encode("latin-1") + b"&b=%C3%A9",
    b"&&&===;;;%%%",
    b"a=1&" * 300,
    b"a=1&a=1&a=2",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"rv_cid":' + b"[" * 50_000,
    b'{"message":{"call":{"assistantOverrides":{"metadata":{"rv_cid":' + b"1" * 100_000 + b"}}}}}",
    b'{"message":{"call":{"assistantOverrides":{"metadata":{"rv_cid":"cid-1"}}}}}',
    b'{"message":{"call":{"assistantOverrides":{"metadata":{"rv_cid":"\\ud800"}}}}}',
    b'{"message":' * 20_000 + b'"rv_cid"',
    b'{"rv_cid": 1e999999, "x": -1e999999, "y": NaN}',
    b'{"rv_cid": "\xff\xfe"}',
    b"\xef\xbb\xbf" + b'{"rv_cid":"a"}',
)


# Strategies are built once, here: building them inside a draw costs more than the example.
HEADER_LISTS = st.lists(
    st.tuples(
        st.sampled_from(HEADER_NAMES) | st.binary(max_size=24),
        st.sampled_from(HEADER_VALUES) | st.binary(max_size=64),
    ),
    max_size=10,
)


CLIENT_HOSTS = st.sampled_from(
    ("127.0.0.1", "::1", "1.2.3.4", "::ffff:1.2.3.4", "fe80::1%eth0", "2001:db8::1", "", "x",
     "999.1.1.1", "1.2.3.4:80", "[::1]")
) | st.text(max_size=40)  # fmt: skip
PATHS = st.sampled_from(
    ("/", "", "/twilio/status", "//twilio//status/", "/twilio", "twilio/status", "/vapi/hook",
     "/hooks/twilio/status", "/echo", "/calls/1/transfer", "/m/x", "/%2F", "/twilio/../x",
     "/twilio/\x00", "/" + "a/" * 500)
) | st.text(max_size=60)  # fmt: skip
ROOT_PATHS = st.sampled_from(("", "/hooks", "/", "/twilio", "hooks", "/hooks/", "/twilio/status"))
SPEC_VERSIONS = st.sampled_from(("2.0", "2.3", "2.4"))
QUERY_STRINGS = st.sampled_from(
    (b"", b"rv_cid=abc", b"rv_cid=%ff%00", b"rv_cid=" + b"a" * 500, b"a=1&rv_cid=x&&",
     b"bodySHA256=abc", b"%%%", b"rv_cid=%61%62")
) | st.binary(max_size=80)  # fmt: skip
HTTP_METHODS = st.sampled_from(METHODS) | st.text(max_size=12)
HTTP_VERSIONS = st.sampled_from(("1.0", "1.1", "2", "3"))
SUBPROTOCOLS = st.lists(st.text(max_size=8), max_size=2)
OPTIONAL_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "scheme": st.sampled_from(("http", "https", "ws", "wss", "", "HTTP", "ftp"))
    | st.text(max_size=8),
    "root_path": ROOT_PATHS | st.text(max_size=20),
    "raw_path": st.none() | st.binary(max_size=60),
    "client": st.none() | st.tuples(CLIENT_HOSTS, st.integers(-1, 70_000)),
    "server": st.none()
    | st.tuples(CLIENT_HOSTS, st.integers(0, 70_000))
    | st.just(("/run/app.sock", None)),
    "extensions": st.sampled_from(({}, {"websocket.http.response": {}}, {"x": {}})),
    "state": st.just({}),
}


@st.composite
def http_scopes(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": draw(SPEC_VERSIONS)},
        "path": draw(PATHS),
        "query_string": draw(QUERY_STRINGS),
        "headers": draw(HEADER_LISTS),
    }
    if kind == "http":
        scope["method"] = draw(HTTP_METHODS)
        scope["http_version"] = draw(HTTP_VERSIONS)
    else:
        scope["subprotocols"] = draw(SUBPROTOCOLS)
    for key, strategy in OPTIONAL_KEYS.items():
        if draw(st.booleans()):
            scope[key] = draw(strategy)
    return scope


@dataclass
class Big:
    """A lazily generated body chunk: ``size`` bytes of ``byte``, made when received."""

    size: int
    byte: int


@dataclass
class Case:
    scope: dict[str, Any]
    incoming: list[dict[str, Any] | Big]  # then the client disconnects
    behaviour: str
    status: int
    app_headers: Any
    sign: bool
    body: bytes | None = None  # the whole body when it is known up front (for signing)


HTTP_BEHAVIOURS = (
    "echo", "echo", "echo", "noread", "raise_before", "raise_after_read", "raise_after_start",
    "silent", "read_twice",
)  # fmt: skip
WEBSOCKET_BEHAVIOURS = ("accept_close", "close", "raise", "deny_http", "accept_send_close")
APP_HEADERS = st.sampled_from(
    (
        [],
        (),
        None,  # no "headers" key at all
        [(b"x-correlation-id", b"app-set")],
        [(b"X-Correlation-ID", b"app"), (b"x-correlation-id", b"app2")],
        [(b"ratelimit", b"x"), (b"RateLimit-Policy", b"y"), (b"content-type", b"text/plain")],
        [(b"content-length", b"5")],
        ((b"set-cookie", b"a"), (b"set-cookie", b"b")),
    )
)


SCOPE_KINDS = st.sampled_from(("http",) * 6 + ("websocket",) * 2 + ("lifespan", "other"))
LIFESPAN_BEHAVIOURS = st.sampled_from(("lifespan", "raise"))
OTHER_TYPES = st.sampled_from(("webtransport", "", "HTTP", "http.request"))
OTHER_BEHAVIOURS = st.sampled_from(("silent", "raise"))
WEBSOCKET_TEXT = st.text(max_size=20)
SHAPES = st.sampled_from(("known", "known", "chunks", "big", "empty", "disconnect"))
KNOWN_BODIES = st.sampled_from(BODIES) | st.binary(max_size=300)
CUTS = st.lists(st.integers(0, 1 << 20), max_size=4)
BYTES = st.integers(0, 255)
STATUSES = st.sampled_from((200, 204, 403, 404, 413, 429, 500)) | st.integers(100, 599)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(SCOPE_KINDS)
    if kind == "lifespan":
        scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        incoming: list[dict[str, Any] | Big] = [{"type": "lifespan.startup"}]
        behaviour = draw(LIFESPAN_BEHAVIOURS)
        return Case(scope, incoming, behaviour, 200, [], sign=False)
    if kind == "other":
        scope = {"type": draw(OTHER_TYPES)}
        return Case(scope, [], draw(OTHER_BEHAVIOURS), 200, [], sign=False)
    scope = draw(http_scopes(kind))
    if kind == "websocket":
        incoming = []
        if draw(st.booleans()):
            incoming.append({"type": "websocket.connect"})
            for _ in range(draw(st.integers(0, 2))):
                incoming.append({"type": "websocket.receive", "text": draw(WEBSOCKET_TEXT)})
        return Case(
            scope,
            incoming,
            draw(st.sampled_from(WEBSOCKET_BEHAVIOURS)),
            200,
            draw(APP_HEADERS),
            sign=draw(st.booleans()),
        )
    body: bytes | None
    incoming = []
    shape = draw(SHAPES)
    if shape in ("known", "chunks"):
        body = draw(KNOWN_BODIES)
        cuts = sorted(min(cut, len(body)) for cut in draw(CUTS))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for piece in pieces[:-1]:
            incoming.append({"type": "http.request", "body": piece, "more_body": True})
        last: dict[str, Any] = {"type": "http.request", "body": pieces[-1]}
        if draw(st.booleans()):
            last["more_body"] = False  # optional: absent means False
        incoming.append(last)
        if shape == "chunks" and draw(st.booleans()):
            incoming[-1]["more_body"] = True  # cut short: the client disconnects instead
            body = None
    elif shape == "big":
        body = None
        chunks = draw(st.integers(1, 80))  # up to 5 MiB, 64 KiB at a time
        incoming.extend(Big(BIG_CHUNK, draw(BYTES)) for _ in range(chunks))
        if draw(st.booleans()):
            incoming.append({"type": "http.request"})  # no body key, no more_body: the end
    elif shape == "empty":
        body = b""
        incoming.append({"type": "http.request"})
    else:
        body = None  # the client is gone before sending anything
    return Case(
        scope,
        incoming,
        draw(st.sampled_from(HTTP_BEHAVIOURS)),
        draw(STATUSES),
        draw(APP_HEADERS),
        sign=draw(st.booleans()),
        body=body,
    )


# Always run, whatever hypothesis draws: a 5 MiB body streamed in 64 KiB chunks to an app
# that reads it all (the bound on what a middleware may keep of a body), and a signed JSON
# bomb under the Vapi guard's max_body (parsed after the check passes).
BIG_STREAM = Case(
    {"type": "http", "method": "POST", "path": "/twilio/status", "query_string": b"",
     "headers": [(b"host", b"voice.example.test")], "client": ("127.0.0.1", 5000)},
    [*(Big(BIG_CHUNK, n % 256) for n in range(80)), {"type": "http.request"}],
    "echo", 200, [], sign=True,
)  # fmt: skip
SIGNED_BOMB = Case(
    {"type": "http", "method": "POST", "path": "/twilio/status", "query_string": b"",
     "headers": [(b"content-type", b"application/json")]},
    [{"type": "http.request", "body": BODIES[7]}],
    "echo", 200, [], sign=True, body=BODIES[7],
)  # fmt: skip


# --- the middlewares under test ---------------------------------------------------------------

AppFactory = Callable[[Any], Any]


def _router_app(app: Any) -> Any:
    """The fuzzed app with a Starlette router attached, for MetricsMiddleware's route lookup."""
    from starlette.routing import Mount, Route, Router

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:  # never called
        raise AssertionError

    class Routed:
        def __init__(self) -> None:
            self.router = Router(
                routes=[
                    Route("/twilio/status", endpoint, methods=["POST"]),
                    Route("/calls/{call_id}/transfer", endpoint),
                    Mount("/m/{tenant}", routes=[Route("/x", endpoint)]),
                ]
            )

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await app(scope, receive, send)

    return Routed()


FACTORIES: dict[str, AppFactory] = {
    "correlation": CorrelationIdMiddleware,
    "correlation_traceparent": lambda app: CorrelationIdMiddleware(
        app, trust_traceparent=True, query_param="rv_cid"
    ),
    "ratelimit": lambda app: RateLimitMiddleware(
        app, rate=5, burst=3, clock=ManualClock(), max_keys=16, ipv6_prefix=56
    ),
    "ratelimit_proxies": lambda app: RateLimitMiddleware(
        app,
        rate=5,
        burst=3,
        clock=ManualClock(),
        trusted_proxies=["127.0.0.0/8", "::1"],
        routes={"/calls/{call_id}/transfer": (1, 1), "/twilio/*": 100},
        exempt=["/vapi/*"],
        max_keys=16,
    ),
    "metrics": lambda app: MetricsMiddleware(
        _router_app(app), registry=CollectorRegistry(), max_routes=8
    ),
    "twilio": lambda app: TwilioSignatureMiddleware(
        app, TOKEN, paths=["/twilio/*"], trusted_proxies=["127.0.0.1"], max_body=GUARD_MAX_BODY
    ),
    "twilio_strict": lambda app: TwilioSignatureMiddleware(
        app,
        TOKEN,
        public_base_url=BASE_URL + "/hooks",
        shared_keys={"k1": "shared-secret"},
        strict=True,
        max_body=GUARD_MAX_BODY,
        max_fields=20,
    ),
    "vapi": lambda app: VapiWebhookMiddleware(
        app,
        secret=VAPI_SECRET,
        bearer_token=VAPI_BEARER,
        hmac_secret=VAPI_HMAC,
        clock=lambda: NOW,
        max_body=VAPI_MAX_BODY,
    ),
}


def _twilio_signature(url: str, body: bytes) -> bytes | None:
    """Twilio's documented signature of a form post to ``url`` (None: not a form we can sign)."""
    from urllib.parse import parse_qsl

    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    grouped: dict[str, set[str]] = {}
    for name, value in pairs:
        grouped.setdefault(name, set()).add(value)
    text = url + "".join(n + v for n in sorted(grouped) for v in sorted(grouped[n]))
    digest = hmac.new(TOKEN.encode(), text.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest)


def _sign(name: str, middleware: Any, case: Case) -> None:
    """Give the request credentials that get its body read: genuine ones when it can be signed.

    A body known up front is signed (Vapi's HMAC; Twilio's signature over the URL the guard
    rebuilds, for forms), so that the check passes and the app runs. A body generated on the
    fly gets what makes the guard read it: Vapi's secret header, or a well-formed but wrong
    Twilio signature (refused only after the body was read, or at max_body).
    """
    headers = case.scope["headers"]
    # First: a header the request repeats counts by its first occurrence.
    if name == "vapi":
        if case.body is None:
            headers.insert(0, (b"x-vapi-secret", VAPI_SECRET))
            return
        timestamp = str(int(NOW)).encode()
        digest = hmac.new(VAPI_HMAC, timestamp + b"." + case.body, hashlib.sha256).hexdigest()
        headers[:0] = [(b"x-timestamp", timestamp), (b"x-signature", digest.encode())]
    elif name.startswith("twilio") and case.scope["type"] == "http":
        signature = b"A" * 27 + b"="
        if case.body is not None:
            # The URL as the guard rebuilds it: under test here is what follows the check.
            url = middleware._verifier._url(case.scope, middleware._proxies)
            signature = (url and _twilio_signature(url, case.body)) or signature
        headers[:0] = [
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"x-twilio-signature", signature),
        ]


# --- running one case -----------------------------------------------------------------------


@dataclass
class Outcome:
    sent: list[dict[str, Any]] = field(default_factory=list)
    app_called: bool = False
    app_answered: bool = False  # the app completed a response (or lifespan) on its own
    app_read: Any = None  # the sha256 of what the app read, when it read to the end
    app_cid: str | None = None  # the correlation id current when the app started a response
    disconnect_seen: bool = False
    raised: BaseException | None = None
    marker: Marker | None = None


def _app(case: Case, outcome: Outcome) -> Callable[[Any, Any, Any], Awaitable[None]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        outcome.app_called = True
        behaviour = case.behaviour

        def marker() -> Marker:
            outcome.marker = Marker(behaviour)
            return outcome.marker

        if scope["type"] == "lifespan":
            if behaviour == "raise":
                raise marker()
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            outcome.app_answered = True
            return
        if behaviour == "raise" or behaviour == "raise_before":
            raise marker()
        if behaviour == "silent":
            return
        if scope["type"] == "websocket":
            first = await receive()
            if first["type"] != "websocket.connect":
                return
            if behaviour == "deny_http":
                if "websocket.http.response" not in (scope.get("extensions") or {}):
                    await send({"type": "websocket.close"})
                    outcome.app_answered = True
                    return
                await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
                await send({"type": "websocket.http.response.body", "body": b"no"})
            elif behaviour == "close":
                await send({"type": "websocket.close", "code": 1000})
            else:
                accept: dict[str, Any] = {"type": "websocket.accept"}
                if case.app_headers is not None:
                    accept["headers"] = case.app_headers
                await send(accept)
                if behaviour == "accept_send_close":
                    await send({"type": "websocket.send", "text": "hi"})
                await send({"type": "websocket.close", "code": 1000})
            outcome.app_answered = True
            return
        if behaviour in ("echo", "raise_after_read", "read_twice"):
            digest = hashlib.sha256()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    outcome.disconnect_seen = True
                    return
                assert message["type"] == "http.request", message
                digest.update(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            outcome.app_read = digest.hexdigest()
            if behaviour == "raise_after_read":
                raise marker()
            if behaviour == "read_twice":
                await receive()  # waits for the disconnect, as a streaming app may
        outcome.app_cid = get_correlation_id()
        start: dict[str, Any] = {"type": "http.response.start", "status": case.status}
        if case.app_headers is not None:
            start["headers"] = case.app_headers
        await send(start)
        if behaviour == "raise_after_start":
            raise marker()
        await send({"type": "http.response.body", "body": b"he", "more_body": True})
        await send({"type": "http.response.body", "body": b"llo"})
        outcome.app_answered = True

    return app


def _receive(case: Case, outcome: Outcome) -> Callable[[], Awaitable[dict[str, Any]]]:
    pending = list(case.incoming)
    gone = {"http": "http.disconnect", "websocket": "websocket.disconnect"}.get(
        case.scope["type"], "lifespan.shutdown"
    )

    async def receive() -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        if pending:
            item = pending.pop(0)
            if isinstance(item, Big):
                # Made here, so only what the middleware keeps of it stays allocated.
                return {"type": "http.request", "body": bytes([item.byte]) * item.size,
                        "more_body": True}  # fmt: skip
            return dict(item)
        outcome.disconnect_seen = True
        if gone == "websocket.disconnect":
            return {"type": gone, "code": 1006}
        return {"type": gone}

    return receive


def _client_digest(case: Case) -> str | None:
    """The sha256 of the whole body the client sends, or None when it never finishes one."""
    digest = hashlib.sha256()
    for item in case.incoming:
        if isinstance(item, Big):
            digest.update(bytes([item.byte]) * item.size)
            continue
        digest.update(item.get("body", b""))
        if not item.get("more_body", False):
            return digest.hexdigest()
    return None


def _headers_ok(headers: Any) -> bool:
    return isinstance(headers, list | tuple) and all(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and isinstance(pair[0], bytes)
        and isinstance(pair[1], bytes)
        for pair in headers
    )


def _status_ok(status: Any) -> bool:
    return type(status) is int and 100 <= status <= 599


def check_http(sent: list[dict[str, Any]]) -> tuple[bool, str | None]:
    """Whether the messages form a valid (possibly unfinished) response: (complete, problem)."""
    started = finished = False
    for message in sent:
        kind = message.get("type")
        if finished:
            return True, f"{kind} after the response ended"
        if kind == "http.response.start":
            if started:
                return False, "a second http.response.start"
            started = True
            if not _status_ok(message.get("status")):
                return False, f"status {message.get('status')!r}"
            if not _headers_ok(message.get("headers", [])):
                return False, f"headers {message.get('headers')!r:.200}"
        elif kind == "http.response.body":
            if not started:
                return False, "a body before http.response.start"
            if not isinstance(message.get("body", b""), bytes):
                return False, "a body that is not bytes"
            finished = not message.get("more_body", False)
        else:
            return False, f"unexpected {kind!r} in an HTTP response"
    return finished, None


def check_websocket(sent: list[dict[str, Any]], scope: dict[str, Any]) -> str | None:
    state = "new"
    denial = "websocket.http.response" in (scope.get("extensions") or {})
    for message in sent:
        kind = message.get("type")
        if state == "new" and kind == "websocket.accept":
            if not _headers_ok(message.get("headers", [])):
                return f"accept headers {message.get('headers')!r:.200}"
            state = "open"
        elif state in ("new", "open") and kind == "websocket.close":
            state = "closed"
        elif state == "open" and kind == "websocket.send":
            pass
        elif state == "new" and kind == "websocket.http.response.start" and denial:
            if not _status_ok(message.get("status")) or not _headers_ok(message.get("headers", [])):
                return f"bad denial start {message!r:.200}"
            state = "denying"
        elif state == "denying" and kind == "websocket.http.response.body":
            if not message.get("more_body", False):
                state = "closed"
        else:
            return f"{kind!r} in state {state}"
    return None


def prepare(
    name: str, middleware_for: Callable[[Any], Any], case: Case
) -> tuple[Any, Case, Outcome]:
    """The middleware around the fuzzed app, and a copy of the request, signed if it says so."""
    case = dataclasses.replace(
        case, scope={**case.scope, "headers": list(case.scope.get("headers", ()))}
    )
    outcome = Outcome()
    middleware = middleware_for(_app(case, outcome))
    if case.sign:
        _sign(name, middleware, case)
    return middleware, case, outcome


async def run_case(middleware: Any, case: Case, outcome: Outcome) -> Outcome:
    """One request through ``middleware``; tracemalloc runs around this call only."""

    async def send(message: dict[str, Any]) -> None:
        await anyio.lowlevel.checkpoint()
        outcome.sent.append(message)

    before = get_correlation_id()
    try:
        await middleware(case.scope, _receive(case, outcome), send)
    except Exception as exc:  # judged below: only the app's marker may escape
        outcome.raised = exc
    assert get_correlation_id() == before, "the correlation ContextVar was not reset"
    return outcome


def _values(message: dict[str, Any], name: bytes) -> list[bytes]:
    return [v for k, v in message.get("headers", ()) if k.lower() == name]


def check_headers(name: str, case: Case, outcome: Outcome) -> None:
    """What each middleware promises about the headers of the responses it passes or sends."""
    start = next((m for m in outcome.sent if m["type"] == "http.response.start"), None)
    if start is None:
        return
    cids = _values(start, b"x-correlation-id")
    if name.startswith("correlation"):
        # Echoed exactly once, the id the app ran under (replacing any the app set).
        assert len(cids) == 1, cids
        if outcome.app_cid is not None:
            assert cids == [outcome.app_cid.encode("latin-1")], (cids, outcome.app_cid)
    elif not outcome.app_called:
        # A refusal (429, 403, 413) names the id it is logged under, once.
        assert len(cids) == 1, cids
        assert start["status"] in (403, 413, 429), start["status"]
    if name.startswith("ratelimit") and outcome.app_called:
        for field_name in (b"ratelimit", b"ratelimit-policy"):
            assert len(_values(start, field_name)) <= 1, start["headers"]


def judge(name: str, case: Case, outcome: Outcome) -> None:
    if outcome.raised is not None:
        if outcome.raised is not outcome.marker:
            raise AssertionError(f"an exception escaped: {outcome.raised!r}") from outcome.raised
        return  # the app's own: what was sent before it is the app's business
    kind = case.scope["type"]
    if kind == "http":
        complete, problem = check_http(outcome.sent)
        assert problem is None, problem
        if not outcome.disconnect_seen and (outcome.app_answered or not outcome.app_called):
            assert complete, "no complete response although nobody raised or left"
        if outcome.app_read is not None:
            assert outcome.app_read == _client_digest(case), "the app read another body"
        check_headers(name, case, outcome)
    elif kind == "websocket":
        problem = check_websocket(outcome.sent, case.scope)
        assert problem is None, problem
    elif kind == "lifespan":
        assert outcome.app_called, "a lifespan scope did not reach the app"
        assert outcome.sent == [{"type": "lifespan.startup.complete"}]
    else:
        assert outcome.app_called, "an unknown scope type did not reach the app"


def _summary(case: Case, outcome: Outcome) -> str:
    """What one example exercised, to show the generated inputs reach every path."""
    if outcome.raised is not None:
        return "marker"
    first = outcome.sent[0] if outcome.sent else {}
    shown = first.get("status", first.get("type", "nothing"))
    return f"{case.scope['type']} {'app' if outcome.app_called else 'refused'} {shown}"


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fuzzed_scopes_and_bodies(name: str, backend: str, soak_size: str) -> None:
    factory = FACTORIES[name]
    factory(_app(Case({}, [], "silent", 200, [], sign=False), Outcome()))  # imports, untraced
    peaks: list[int] = []
    seen: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES[soak_size],
        deadline=None,
        derandomize=soak_size == "short",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases())
    @example(case=BIG_STREAM)
    @example(case=SIGNED_BOMB)
    def fuzz(case: Case) -> None:
        middleware, case, outcome = prepare(name, factory, case)

        async def traced() -> Outcome:
            tracemalloc.start()
            try:
                return await run_case(middleware, case, outcome)
            finally:
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()

        anyio.run(traced, backend=backend)
        judge(name, case, outcome)
        seen[_summary(case, outcome)] += 1
        assert peaks[-1] < PEAK_BOUND[name], f"peak {peaks[-1]} bytes"

    fuzz()
    sys.stdout.write(
        f"\nfuzz {name} [{backend}]: {len(peaks)} examples, peak {max(peaks) / 1024:.0f} KiB, "
        f"outcomes {dict(seen.most_common())}\n"
    )
