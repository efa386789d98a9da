"""The webhook guard's seam: a third provider's verifier plugged in, nothing else written.

The verifier below is all a new provider (Telnyx, Plivo) would add: the guard supplies path
matching, body buffering with its 413, JSON refusals under fresh correlation ids, websocket
handshake refusals, and running the app under the id a verified body carries.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from resilient_voice.asgi import TrustedProxies
from resilient_voice.asgi._common import get_header
from resilient_voice.asgi._guard import WebhookGuard
from resilient_voice.asgi._types import Receive, Scope, Send
from resilient_voice.correlation import get_correlation_id
from resilient_voice.errors import WebhookVerificationError
from resilient_voice.testing import serve

KEY = b"demo-key"


class DemoVerifier:
    """A provider that sends a key header and signs nothing else; the body names the call."""

    provider = "Demo"

    def __init__(self) -> None:
        self.header_checks = 0
        self.body_checks = 0
        self.proxies: TrustedProxies | None = None

    def check_headers(self, scope: Scope, proxies: TrustedProxies) -> bytes:
        self.header_checks += 1
        self.proxies = proxies
        key = get_header(scope, b"x-demo-key")
        if key != KEY:
            raise WebhookVerificationError("no demo key")
        return key

    def check_body(self, scope: Scope, body: bytes, state: bytes) -> str | None:
        self.body_checks += 1
        assert state == KEY
        if not body.startswith(b"{"):
            raise WebhookVerificationError("demo bodies are JSON objects")
        cid = json.loads(body).get("cid")
        return cid if isinstance(cid, str) else None


seen: list[dict[str, Any]] = []


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen.append({"path": scope["path"], "body": body, "cid": get_correlation_id()})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def guard(verifier: DemoVerifier) -> WebhookGuard[bytes]:
    return WebhookGuard(
        echo, verifier, paths=["/demo/*"], max_body=64, trusted_proxies=["10.0.0.0/8"]
    )


async def test_a_third_verifier_gets_every_guard_behaviour() -> None:
    seen.clear()
    verifier = DemoVerifier()
    async with serve(guard(verifier)) as url, httpx.AsyncClient(base_url=url) as client:
        # Unguarded paths pass through unread and unverified.
        assert (await client.post("/other", content=b"x")).status_code == 200
        assert verifier.header_checks == 0

        # No credential: 403 JSON under a fresh id, the body never read, the app never called.
        refused = await client.post(
            "/demo/hook", content=b"{}", headers={"x-correlation-id": "offered-id"}
        )
        assert (refused.status_code, refused.json()) == (403, {"error": "forbidden"})
        assert refused.headers["x-correlation-id"] not in ("", "offered-id")
        assert verifier.body_checks == 0

        # Verified: the body is replayed unchanged and the app runs under the body's id.
        body = b'{"cid": "call-123"}'
        ok = await client.post("/demo/hook", content=body, headers={"x-demo-key": "demo-key"})
        assert ok.status_code == 200
        assert seen[-1] == {"path": "/demo/hook", "body": body, "cid": "call-123"}

        # The body check refuses: 403, the app not called.
        count = len(seen)
        bad = await client.post("/demo/hook", content=b"[]", headers={"x-demo-key": "demo-key"})
        assert bad.status_code == 403
        assert len(seen) == count

        # Over max_body: 413 with the limit, before the verifier sees the body.
        checks = verifier.body_checks
        big = await client.post(
            "/demo/hook", content=b"{" + b" " * 100 + b"}", headers={"x-demo-key": "demo-key"}
        )
        assert (big.status_code, big.json()) == (
            413,
            {"error": "payload_too_large", "max_bytes": 64},
        )
        assert verifier.body_checks == checks
    assert isinstance(verifier.proxies, TrustedProxies)  # validated once by the guard


async def test_a_refused_handshake_is_closed_before_it_is_accepted() -> None:
    verifier = DemoVerifier()
    sent: list[dict[str, Any]] = []
    called: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/demo/ws", "headers": [], "root_path": ""}
    await WebhookGuard(app, verifier, max_body=64)(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert called == []
    # A verified handshake reaches the app; there is no body to check.
    scope["headers"] = [(b"x-demo-key", KEY)]
    await WebhookGuard(app, verifier, max_body=64)(scope, receive, send)
    assert called == [scope]
    assert verifier.body_checks == 0


@pytest.mark.parametrize("max_body", [0, -1, True, 1.5])
def test_max_body_is_checked_once_for_every_provider(max_body: Any) -> None:
    with pytest.raises(ValueError, match="max_body"):
        WebhookGuard(echo, DemoVerifier(), max_body=max_body)
