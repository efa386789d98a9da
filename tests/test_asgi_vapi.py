"""VapiWebhookMiddleware in Starlette, FastAPI and Litestar: secret, bearer and HMAC modes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from _apps import FRAMEWORKS, build, http_client, serve_sync
from resilient_voice.asgi import CorrelationIdMiddleware, VapiWebhookMiddleware
from resilient_voice.asgi._vapi import planted_correlation_id
from resilient_voice.correlation import get_correlation_id

SECRET = "vapi-shared-secret"
BEARER = "vapi-bearer-token"
HMAC_KEY = "vapi-hmac-key"
NOW = 1_800_000_000.0
FORBIDDEN_JSON = '{"error":"forbidden"}'
BODY = json.dumps(
    {"message": {"type": "tool-calls", "call": {"id": "call-1"}, "toolCallList": []}}
).encode()


def hmac_headers(
    body: bytes, timestamp: str, *, key: str = HMAC_KEY, algorithm: str = "sha256"
) -> dict[str, str]:
    digest = hmac.new(key.encode(), timestamp.encode() + b"." + body, algorithm).hexdigest()
    return {"x-signature": digest, "x-timestamp": timestamp}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    with ExitStack() as stack:

        class Lazy(dict[str, str]):
            def __missing__(self, framework: str) -> str:
                app = build(
                    framework,
                    VapiWebhookMiddleware,
                    secret=SECRET,
                    bearer_token=BEARER,
                    hmac_secret=HMAC_KEY,
                    paths=["/hook/*"],
                    max_body=4096,
                    clock=lambda: NOW,
                )
                self[framework] = stack.enter_context(serve_sync(app))
                return self[framework]

        yield Lazy()


@pytest.fixture(params=FRAMEWORKS)
def url(request: pytest.FixtureRequest, servers: dict[str, str]) -> str:
    return servers[request.param]


async def post(url: str, body: bytes, headers: dict[str, str], path: str = "/hook/raw") -> Any:
    async with http_client() as client:
        return await client.post(url + path, content=body, headers=headers)


async def test_each_credential_mode_is_accepted_and_body_replayed(url: str) -> None:
    ts = str(int(NOW))
    for headers in (
        {"x-vapi-secret": SECRET},
        {"authorization": f"Bearer {BEARER}"},
        {"authorization": f"bearer {BEARER}"},
        hmac_headers(BODY, ts),
        hmac_headers(BODY, str(int(NOW * 1000))),  # milliseconds
        {"x-signature": "sha256=" + hmac_headers(BODY, ts)["x-signature"], "x-timestamp": ts},
    ):
        response = await post(url, BODY, {"content-type": "application/json", **headers})
        assert (headers, response.status_code) == (headers, 200)
        assert response.content == BODY


async def test_forged_missing_and_stale_credentials_are_403(url: str) -> None:
    ts = str(int(NOW))
    cases = {
        "none": {},
        "wrong secret": {"x-vapi-secret": SECRET + "x"},
        "secret prefix": {"x-vapi-secret": SECRET[:-1]},
        "bearer without scheme": {"authorization": BEARER},
        "wrong bearer": {"authorization": "Bearer nope"},
        "secret in bearer header": {"authorization": f"Bearer {SECRET}"},
        "hmac wrong key": hmac_headers(BODY, ts, key="other"),
        "hmac other body": hmac_headers(BODY + b" ", ts),
        "hmac no timestamp": {"x-signature": hmac_headers(BODY, ts)["x-signature"]},
        "hmac stale": hmac_headers(BODY, str(int(NOW - 301))),
        "hmac future": hmac_headers(BODY, str(int(NOW + 301))),
        "hmac stale ms": hmac_headers(BODY, str(int((NOW - 301) * 1000))),
        "hmac bad timestamp": hmac_headers(BODY, "1e9"),
        "hmac negative": hmac_headers(BODY, "-1"),
        "hmac sha512": hmac_headers(BODY, ts, algorithm="sha512"),
        "huge header": {"x-vapi-secret": "A" * 8000},
    }
    for name, headers in cases.items():
        response = await post(url, BODY, {"content-type": "application/json", **headers})
        assert (name, response.status_code, response.text) == (name, 403, FORBIDDEN_JSON)


async def test_timestamp_within_tolerance_is_accepted(url: str) -> None:
    for ts in (str(int(NOW - 299)), str(int(NOW + 299)), f"{NOW - 10:.3f}"):
        response = await post(url, BODY, hmac_headers(BODY, ts))
        assert (ts, response.status_code) == (ts, 200)


async def test_body_over_limit_is_413(url: str) -> None:
    big = b"x" * 5000
    assert (await post(url, big, {"x-vapi-secret": SECRET})).status_code == 413

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    async with http_client() as client:
        response = await client.post(
            url + "/hook/raw", content=chunked(), headers={"x-vapi-secret": SECRET}
        )
    assert response.status_code == 413


async def test_unguarded_paths_pass_through(url: str) -> None:
    response = await post(url, b"hello", {}, path="/open")
    assert (response.status_code, response.content) == (200, b"hello")


def call_message(metadata: Any) -> bytes:
    """A tool-calls message whose call carries ``metadata`` in its assistantOverrides."""
    call = {"id": "call-1", "assistantOverrides": {"metadata": metadata}}
    return json.dumps({"message": {"type": "tool-calls", "call": call}}).encode()


async def test_planted_correlation_id_is_recovered(url: str) -> None:
    body = call_message({"rv_cid": "cid-from-client", "rv_attempt_id": "a" * 32})
    response = await post(url, body, {"x-vapi-secret": SECRET}, path="/hook/cid")
    assert response.status_code == 200
    assert response.text == "cid-from-client"


@pytest.mark.parametrize(
    "body",
    [
        call_message({"rv_cid": "bad id\r\n"}),
        call_message({"rv_cid": "x" * 129}),
        call_message({"rv_cid": 42}),
        call_message({"other": "rv_cid"}),
        call_message(["rv_cid"]),
        json.dumps({"message": {"call": {"assistantOverrides": "rv_cid"}}}).encode(),
        json.dumps({"message": ["rv_cid"]}).encode(),
        json.dumps(["rv_cid"]).encode(),
        b'{"rv_cid": not json',
        b'\xff\xfe"rv_cid"',
        BODY,
    ],
)
async def test_missing_or_malformed_planted_id_passes_through_unscoped(
    url: str, body: bytes
) -> None:
    response = await post(url, body, {"x-vapi-secret": SECRET}, path="/hook/cid")
    assert response.status_code == 200  # the app decides what a malformed body means
    assert response.text == "-"


def test_planted_correlation_id_tolerates_anything() -> None:
    assert planted_correlation_id(b"[" * 100_000 + b'"rv_cid"') is None  # RecursionError
    assert planted_correlation_id(b"{}" * 10) is None
    assert planted_correlation_id(call_message({"rv_cid": "ok-1"})) == "ok-1"


async def test_planted_id_beats_the_outer_correlation_id() -> None:
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(get_correlation_id())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[Any] = []
    body = call_message({"rv_cid": "call-scope"})

    async def receive() -> Any:
        return {"type": "http.request", "body": body}

    async def send(message: Any) -> None:
        sent.append(message)

    stack = CorrelationIdMiddleware(VapiWebhookMiddleware(app, secret=SECRET))
    headers = [(b"x-vapi-secret", SECRET.encode()), (b"x-correlation-id", b"outer")]
    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}
    await stack(scope, receive, send)
    assert seen == ["call-scope"]
    assert sent[0]["headers"] == [(b"x-correlation-id", b"call-scope")]
    assert get_correlation_id() is None


# Direct ASGI calls.


async def _run(middleware: VapiWebhookMiddleware, headers: list[tuple[bytes, bytes]]) -> Any:
    events: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        events.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware.app = app
    parts = [b'{"a":', b"1}"]
    status = 0

    async def receive() -> Any:
        events.append("receive")
        chunk = parts.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "method": "POST", "path": "/hook", "headers": headers}
    await middleware(scope, receive, send)
    return status, events


async def _unused(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("replaced in _run")


async def test_chunked_body_is_reassembled_and_replayed_once() -> None:
    middleware = VapiWebhookMiddleware(_unused, secret=SECRET)
    status, events = await _run(middleware, [(b"x-vapi-secret", SECRET.encode())])
    assert status == 200
    assert events == [
        "receive",
        "receive",
        {"type": "http.request", "body": b'{"a":1}', "more_body": False},
    ]


async def test_missing_credential_is_rejected_before_reading_the_body() -> None:
    middleware = VapiWebhookMiddleware(_unused, secret=SECRET)
    assert await _run(middleware, []) == (403, [])


async def test_custom_headers_base64_and_no_bearer_prefix() -> None:
    body = b'{"a":1}'
    ts = b"1800000000"
    digest = hmac.new(b"k", ts + b"." + body, hashlib.sha512).digest()
    middleware = VapiWebhookMiddleware(
        _unused,
        bearer_token=BEARER,
        bearer_header="X-Api-Key",
        bearer_prefix=False,
        hmac_secret=b"k",
        signature_header="X-Vapi-Signature",
        timestamp_header="X-Vapi-Timestamp",
        algorithm="sha512",
        signature_encoding="base64",
        clock=lambda: NOW,
    )
    assert (await _run(middleware, [(b"x-api-key", BEARER.encode())]))[0] == 200
    signed = [(b"x-vapi-signature", base64.b64encode(digest)), (b"x-vapi-timestamp", ts)]
    assert (await _run(middleware, signed))[0] == 200
    hexed = [(b"x-vapi-signature", digest.hex().encode()), (b"x-vapi-timestamp", ts)]
    assert (await _run(middleware, hexed))[0] == 403


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, ValueError),
        ({"secret": ""}, ValueError),
        ({"secret": SECRET, "algorithm": "md5"}, ValueError),
        ({"secret": SECRET, "signature_encoding": "hexa"}, ValueError),
        ({"secret": SECRET, "tolerance": 0}, ValueError),
        ({"secret": SECRET, "tolerance": float("inf")}, ValueError),
        ({"secret": SECRET, "tolerance": "300"}, TypeError),
        ({"secret": SECRET, "max_body": 0}, ValueError),
        ({"secret": SECRET, "secret_header": "X Bad"}, ValueError),
        ({"secret": SECRET, "bearer_header": "X-\r\nBad"}, ValueError),
        ({"secret": SECRET, "clock": 5}, TypeError),
        ({"secret": SECRET, "paths": ["nope"]}, ValueError),
    ],
)
def test_configuration_is_validated(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        VapiWebhookMiddleware(_unused, **options)


def test_repr_hides_secrets() -> None:
    text = repr(VapiWebhookMiddleware(_unused, secret=SECRET, bearer_token=BEARER))
    assert SECRET not in text
    assert BEARER not in text


def test_correlation_key_matches_the_vapi_client() -> None:
    from resilient_voice.asgi._vapi import CORRELATION_KEY
    from resilient_voice.vapi._models import CORRELATION_ID_KEY

    assert CORRELATION_KEY == CORRELATION_ID_KEY
    from resilient_voice.vapi._validation import plant_metadata

    overrides = plant_metadata({"metadata": {"mine": 1}}, "a" * 32, "cid-from-vapi-client")
    message = {"type": "end-of-call-report", "call": {"id": "c", "assistantOverrides": overrides}}
    assert planted_correlation_id(json.dumps({"message": message}).encode()) == (
        "cid-from-vapi-client"
    )
