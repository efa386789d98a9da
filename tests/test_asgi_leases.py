"""LeaseReleaseMiddleware on its own: what it reads, what it never breaks, where it acts.

Behind TwilioSignatureMiddleware in front of the Starlette, FastAPI and Litestar apps of
``_apps`` (the framework parses the very body the middleware read), and bare for malformed,
oversized and interrupted requests. In-process; both backends.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from twilio.request_validator import RequestValidator

from _apps import FRAMEWORKS, build
from resilient_voice import CallLeases
from resilient_voice.asgi import LeaseReleaseMiddleware, TwilioSignatureMiddleware
from resilient_voice.testing import ManualClock

TOKEN = "asgi-lease-token"
CALL = "CA" + "5" * 32


def make_leases(capacity: int = 2) -> CallLeases:
    return CallLeases("hooks", capacity, ttl=600.0, clock=ManualClock())


async def bound(leases: CallLeases, call_id: str = CALL) -> int:
    lease = await leases.acquire(timeout=0)
    await leases.bind(lease, call_id)
    return lease.generation


def status_form(generation: int, status: str = "completed", **extra: str) -> dict[str, str]:
    return {"CallSid": CALL, "CallStatus": status, "rv_lease": "l", **extra} | {
        "rv_lease_gen": str(generation)
    }


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_behind_the_signature_check_in_front_of_a_framework(framework: str) -> None:
    leases = make_leases()
    generation = await bound(leases)
    inner = build(
        framework, LeaseReleaseMiddleware, leases=leases, paths=["/hook/form"], verified=True
    )
    app = TwilioSignatureMiddleware(inner, TOKEN, paths=["/hook/*"])
    url = f"http://testserver/hook/form?{urlencode({'rv_lease': 'l', 'rv_lease_gen': generation})}"
    form = {"CallSid": CALL, "CallStatus": "completed", "Note": "a b&c=d"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        forged = await client.post(url, data=form, headers={"X-Twilio-Signature": "AAAA"})
        assert forged.status_code == 403
        assert leases.statistics().in_use == 1  # never acted on an unverified request
        signature = RequestValidator(TOKEN).compute_signature(url, form)
        answer = await client.post(url, data=form, headers={"X-Twilio-Signature": signature})
    assert answer.status_code == 200
    assert sorted(map(tuple, answer.json())) == sorted(form.items())  # the body, intact
    assert leases.statistics().in_use == 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_other_routes_pass_through_unread(framework: str) -> None:
    leases = make_leases()
    generation = await bound(leases)
    app = build(
        framework, LeaseReleaseMiddleware, leases=leases, paths=["/hook/form"], verified=True
    )
    body = urlencode(status_form(generation))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        echoed = await client.post(
            "/hook/raw", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
        )
    assert echoed.content == body.encode()
    assert leases.statistics().in_use == 1


class Recorder:
    """An app that reads the whole body, message by message, and answers 200."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            self.messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages)


def scope(path: str = "/status", content_type: bytes = b"application/x-www-form-urlencoded"):  # type: ignore[no-untyped-def]
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", content_type)],
    }


async def drive(app: Any, scope_: dict[str, Any], chunks: list[dict[str, Any]]) -> list[Any]:
    pending = list(chunks)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope_, receive, send)
    return sent


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"application/json", b'{"message": {"type": "end-of-call-report", "call": '),
        (b"application/json", b"[" * 100_000),
        (b"application/json", b"\xff\xfe not utf-8"),
        (b"application/json", b'{"message": "end-of-call-report"}'),
        (b"application/json", b'{"message": {"type": "end-of-call-report", "call": []}}'),
        (b"application/x-www-form-urlencoded", b"%%%&&&===" * 10),
        (b"application/x-www-form-urlencoded", b"a=1&" * 1000),
        (
            b"application/x-www-form-urlencoded",
            b"CallStatus=completed&rv_lease_gen=99999999999999999999999",
        ),
        (b"text/plain", b"\x00\x01\x02"),
    ],
)
async def test_malformed_bodies_reach_the_app_intact(content_type: bytes, body: bytes) -> None:
    leases = make_leases()
    await bound(leases)
    app = Recorder()
    middleware = LeaseReleaseMiddleware(app, leases=leases, paths=["/status"], verified=True)
    half = len(body) // 2
    sent = await drive(
        middleware,
        scope(content_type=content_type),
        [
            {"type": "http.request", "body": body[:half], "more_body": True},
            {"type": "http.request", "body": body[half:], "more_body": False},
        ],
    )
    assert app.body == body
    assert sent[0]["status"] == 200
    assert leases.statistics().in_use == 1


async def test_a_body_over_max_body_is_passed_on_unread() -> None:
    leases = make_leases()
    generation = await bound(leases)
    app = Recorder()
    middleware = LeaseReleaseMiddleware(
        app, leases=leases, paths=["/status"], verified=True, max_body=10
    )
    body = urlencode(status_form(generation)).encode()
    chunks = [
        {"type": "http.request", "body": body[i : i + 7], "more_body": i + 7 < len(body)}
        for i in range(0, len(body), 7)
    ]
    await drive(middleware, scope(), chunks)
    assert app.body == body
    assert leases.statistics().in_use == 1


async def test_a_client_that_leaves_mid_body_frees_nothing_and_the_app_sees_it_leave() -> None:
    leases = make_leases()
    generation = await bound(leases)
    app = Recorder()
    middleware = LeaseReleaseMiddleware(app, leases=leases, paths=["/status"], verified=True)
    body = urlencode(status_form(generation)).encode()
    await drive(middleware, scope(), [{"type": "http.request", "body": body, "more_body": True}])
    assert app.messages[-1]["type"] == "http.disconnect"
    assert app.body == body
    assert leases.statistics().in_use == 1


async def test_a_get_status_callback_is_read_from_the_query() -> None:
    leases = make_leases()
    generation = await bound(leases)
    app = Recorder()
    middleware = LeaseReleaseMiddleware(app, leases=leases, paths=["/status"], verified=True)
    get = scope() | {
        "method": "GET",
        "headers": [],
        "query_string": urlencode(status_form(generation, "no-answer")).encode(),
    }
    await drive(middleware, get, [{"type": "http.request", "body": b""}])
    assert leases.statistics().in_use == 0


@pytest.mark.parametrize("status", ["queued", "initiated", "ringing", "in-progress", "answered"])
async def test_progress_callbacks_free_nothing(status: str) -> None:
    leases = make_leases()
    generation = await bound(leases)
    middleware = LeaseReleaseMiddleware(Recorder(), leases=leases, paths=["/s"], verified=True)
    body = urlencode(status_form(generation, status)).encode()
    await drive(middleware, scope("/s"), [{"type": "http.request", "body": body}])
    assert leases.statistics().in_use == 1


async def test_a_webhook_without_a_planted_lease_frees_nothing() -> None:
    leases = make_leases()
    await bound(leases)
    middleware = LeaseReleaseMiddleware(Recorder(), leases=leases, paths=["/s"], verified=True)
    body = urlencode({"CallSid": CALL, "CallStatus": "completed"}).encode()
    await drive(middleware, scope("/s"), [{"type": "http.request", "body": body}])
    vapi = json.dumps({"message": {"type": "end-of-call-report", "call": {"id": CALL}}})
    await drive(
        middleware,
        scope("/s", b"application/json"),
        [{"type": "http.request", "body": vapi.encode()}],
    )
    assert leases.statistics().in_use == 1


async def test_vapi_end_messages_release_by_call_id_and_generation() -> None:
    leases = make_leases()
    generation = await bound(leases, "call-9")
    middleware = LeaseReleaseMiddleware(Recorder(), leases=leases, paths=["/v"], verified=True)

    def message(kind: str, **extra: Any) -> dict[str, Any]:
        metadata = {"rv_lease": "l", "rv_lease_gen": generation}
        call = {"id": "call-9", "assistantOverrides": {"metadata": metadata}}
        body = json.dumps({"message": {"type": kind, "call": call, **extra}}).encode()
        return {"type": "http.request", "body": body}

    json_scope = scope("/v", b"application/json; charset=utf-8")
    await drive(middleware, json_scope, [message("status-update", status="in-progress")])
    await drive(middleware, json_scope, [message("transcript")])
    assert leases.statistics().in_use == 1
    await drive(middleware, json_scope, [message("status-update", status="ended")])
    assert leases.statistics().in_use == 0


async def test_a_failing_lease_store_is_logged_and_the_app_still_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(CallLeases):
        async def release(self, *args: Any, **kwargs: Any) -> bool:
            raise ConnectionError("store down")

    leases = Broken("broken", 1, ttl=60.0, clock=ManualClock())
    app = Recorder()
    middleware = LeaseReleaseMiddleware(app, leases=leases, paths=["/s"], verified=True)
    body = urlencode(status_form(1)).encode()
    sent = await drive(middleware, scope("/s"), [{"type": "http.request", "body": body}])
    assert sent[0]["status"] == 200
    assert app.body == body
    assert "lease release from a webhook failed" in caplog.text


async def test_root_path_is_read_as_the_webhook_guards_read_it() -> None:
    leases = make_leases()
    generation = await bound(leases)
    middleware = LeaseReleaseMiddleware(
        Recorder(), leases=leases, paths=["/twilio/status"], verified=True
    )
    mounted = scope("/hooks/twilio/status") | {"root_path": "/hooks"}
    body = urlencode(status_form(generation)).encode()
    await drive(middleware, mounted, [{"type": "http.request", "body": body}])
    assert leases.statistics().in_use == 0


async def test_lifespan_and_websocket_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope_: Any, receive: Any, send: Any) -> None:
        seen.append(scope_["type"])

    middleware = LeaseReleaseMiddleware(app, leases=make_leases(), paths=["/s"], verified=True)
    await middleware({"type": "lifespan"}, None, None)
    await middleware({"type": "websocket", "path": "/s"}, None, None)
    assert seen == ["lifespan", "websocket"]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"verified": False}, ValueError, "inside TwilioSignatureMiddleware"),
        ({"leases": object()}, TypeError, "leases must be a CallLeases"),
        ({"paths": None}, ValueError, "paths"),
        ({"paths": "/s"}, TypeError, "paths"),
        ({"paths": []}, ValueError, "paths"),
        ({"max_body": 0}, ValueError, "max_body"),
    ],
)
def test_bad_construction_is_refused(options: dict[str, Any], error: type, match: str) -> None:
    arguments: dict[str, Any] = {"leases": make_leases(), "paths": ["/s"], "verified": True}
    arguments.update(options)
    with pytest.raises(error, match=match):
        LeaseReleaseMiddleware(Recorder(), **arguments)


def test_verified_is_required() -> None:
    with pytest.raises(TypeError, match="verified"):
        LeaseReleaseMiddleware(Recorder(), leases=make_leases(), paths=["/s"])  # type: ignore[call-arg]
