"""CorrelationIdMiddleware in Starlette, FastAPI and Litestar on loopback; direct ASGI calls."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _apps import FRAMEWORKS, LOG, STREAM_GATE, build, http_client, serve_sync
from resilient_voice.asgi import CorrelationIdMiddleware
from resilient_voice.asgi._correlation import parse_traceparent
from resilient_voice.correlation import (
    CorrelationIdFilter,
    CorrelationIdValidator,
    correlation_scope,
    get_correlation_id,
    is_valid_correlation_id,
)

HEADER = "x-correlation-id"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
VARIANTS: dict[str, dict[str, Any]] = {"plain": {}, "traceparent": {"trust_traceparent": True}}


def is_generated(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the X-Correlation-ID it received (the 'upstream' of an outgoing call)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    seen = dict(scope["headers"]).get(b"x-correlation-id", b"-")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": seen})


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[tuple[str, str], str]]:
    with ExitStack() as stack:

        class Lazy(dict[tuple[str, str], str]):
            def __missing__(self, key: tuple[str, str]) -> str:
                framework, variant = key
                if framework == "echo":
                    app = echo_app
                else:
                    app = build(framework, CorrelationIdMiddleware, **VARIANTS[variant])
                self[key] = stack.enter_context(serve_sync(app))
                return self[key]

        yield Lazy()


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(
    framework: str, servers: dict[tuple[str, str], str]
) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(base_url=servers[framework, "plain"]) as client:
        yield client


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    handler = Capture()
    handler.addFilter(CorrelationIdFilter())
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        LOG.removeHandler(handler)


async def test_valid_incoming_id_is_used_and_echoed_once(client: httpx.AsyncClient) -> None:
    for cid in ("req-42", "a.b:c_d-e", "x" * 128):
        response = await client.get("/cid", headers={HEADER: cid})
        assert response.text == cid
        assert response.headers.get_list(HEADER) == [cid]


@pytest.mark.parametrize(
    "bad", ["has space", "slash/no", "x" * 129, "x" * 10_000, "é", 'quote"d', "semi;colon"]
)
async def test_invalid_incoming_id_is_replaced_and_never_echoed(
    client: httpx.AsyncClient, bad: str
) -> None:
    response = await client.get("/cid", headers={HEADER: bad.encode("utf-8")})
    assert is_generated(response.text)
    assert response.headers.get_list(HEADER) == [response.text]
    assert bad not in response.text


async def test_missing_id_is_generated_per_request(client: httpx.AsyncClient) -> None:
    first = await client.get("/cid")
    second = await client.get("/cid")
    assert is_generated(first.text)
    assert is_generated(second.text)
    assert first.text != second.text
    assert first.headers.get_list(HEADER) == [first.text]


async def test_header_set_by_the_app_is_replaced_not_duplicated(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/dup", headers={HEADER: "mine"})
    assert response.headers.get_list(HEADER) == ["mine"]
    response = await client.get("/dup")
    (only,) = response.headers.get_list(HEADER)
    assert is_generated(only)


async def test_unmatched_and_failing_requests(framework: str, client: httpx.AsyncClient) -> None:
    lost = await client.get("/nowhere", headers={HEADER: "lost"})
    assert lost.headers.get_list(HEADER) == ["lost"]
    boom = await client.get("/boom", headers={HEADER: "boom-1"})
    assert boom.status_code == 500
    # Starlette's ServerErrorMiddleware sits outside user middleware and sends the 500 after
    # the app raised, so no id there; Litestar is wrapped at the ASGI level and handles its
    # errors inside. (Wrap a Starlette app at the ASGI level to echo the id on 500s too.)
    expected = ["boom-1"] if framework == "litestar" else []
    assert boom.headers.get_list(HEADER) == expected


async def test_rv_cid_query_parameter_is_recovered(client: httpx.AsyncClient) -> None:
    assert (await client.post("/hook/cid?rv_cid=call-7", content=b"x=1")).text == "call-7"
    assert (await client.get("/cid?a=1&rv_cid=call-8&b=2")).text == "call-8"
    assert (await client.get("/cid?rv_cid=call%3A9")).text == "call:9"  # percent-decoded
    response = await client.get("/cid?xrv_cid=nope&rv_cid=yes")
    assert response.text == "yes"
    assert response.headers.get_list(HEADER) == ["yes"]
    # Precedence: a valid header beats the query parameter.
    assert (await client.get("/cid?rv_cid=query", headers={HEADER: "header"})).text == "header"
    # An invalid header falls back to the query parameter.
    assert (await client.get("/cid?rv_cid=query", headers={HEADER: "bad id"})).text == "query"
    for bad in ("/cid?rv_cid=", "/cid?rv_cid=a%0D%0Ab", "/cid?rv_cid=" + "y" * 200):
        assert is_generated((await client.get(bad)).text)


async def test_traceparent_is_a_source_only_when_trusted(
    framework: str, servers: dict[tuple[str, str], str]
) -> None:
    async with http_client(base_url=servers[framework, "traceparent"]) as trusting:
        assert (await trusting.get("/cid", headers={"traceparent": TRACEPARENT})).text == TRACE_ID
        # Precedence: header, then rv_cid, then traceparent.
        both = {"traceparent": TRACEPARENT, HEADER: "hdr"}
        assert (await trusting.get("/cid", headers=both)).text == "hdr"
        query = await trusting.get("/cid?rv_cid=q", headers={"traceparent": TRACEPARENT})
        assert query.text == "q"
        upper = TRACEPARENT.upper()
        assert is_generated(
            text := (await trusting.get("/cid", headers={"traceparent": upper})).text
        )
        assert text != TRACE_ID.upper()
    async with http_client(base_url=servers[framework, "plain"]) as plain:
        ignored = (await plain.get("/cid", headers={"traceparent": TRACEPARENT})).text
        assert is_generated(ignored)
        assert ignored != TRACE_ID


async def test_streaming_response_still_streams(client: httpx.AsyncClient) -> None:
    STREAM_GATE.clear()
    async with client.stream("GET", "/stream", headers={HEADER: "streamed"}) as response:
        assert response.headers.get_list(HEADER) == ["streamed"]
        chunks = response.aiter_raw()
        with anyio.fail_after(2.0):
            first = await chunks.__anext__()
        assert first == b"first\n"  # arrived while the handler still waits on the gate
        STREAM_GATE.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"second\n"


async def test_id_reaches_log_records_and_outgoing_calls(
    client: httpx.AsyncClient,
    servers: dict[tuple[str, str], str],
    records: list[logging.LogRecord],
) -> None:
    response = await client.get("/cid", headers={HEADER: "logged-1"})
    assert response.text == "logged-1"
    assert "logged-1" in [getattr(r, "correlation_id", None) for r in records]
    echo = servers["echo", "plain"]
    outgoing = await client.get("/outgoing", params={"to": echo}, headers={HEADER: "out-1"})
    assert outgoing.text == "out-1"  # what the second server received
    generated = await client.get("/outgoing", params={"to": echo})
    assert is_generated(generated.text)
    assert generated.headers.get_list(HEADER) == [generated.text]


async def test_concurrent_requests_keep_their_own_ids(client: httpx.AsyncClient) -> None:
    seen: dict[str, str] = {}

    async def one(i: int) -> None:
        seen[f"c-{i}"] = (await client.get("/cid", headers={HEADER: f"c-{i}"})).text

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    assert seen == {f"c-{i}": f"c-{i}" for i in range(20)}


# Direct ASGI calls: values a real client library refuses to send, and websocket scopes.


def http_scope(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/",
        "raw_path": b"/",
        "query_string": query,
        "headers": headers,
    }


async def call(
    middleware: Any, scope: dict[str, Any], app_headers: list[Any] | None = None
) -> tuple[list[Any], str | None]:
    """Run ``middleware`` around an app that records the id; return sent headers and the id."""
    seen: list[str | None] = []
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(get_correlation_id())
        await send({"type": "http.response.start", "status": 200, "headers": app_headers or []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await middleware(app)(scope, receive, send)
    return list(sent[0]["headers"]), seen[0]


@pytest.mark.parametrize(
    "bad",
    [
        b"evil\r\nSet-Cookie: a=b",
        b"evil\nx",
        b"a\x00b",
        b"\xff\xfe",
        "é".encode(),
        b"",
        b"x" * 10_240,
    ],
)
async def test_hostile_ids_are_never_echoed_or_set(bad: bytes) -> None:
    headers, cid = await call(CorrelationIdMiddleware, http_scope([(b"x-correlation-id", bad)]))
    assert cid is not None
    assert is_generated(cid)
    assert headers == [(b"x-correlation-id", cid.encode())]
    assert get_correlation_id() is None  # reset after the request


async def test_app_headers_of_any_case_are_replaced_and_app_list_untouched() -> None:
    shared = [(b"X-Correlation-Id", b"app"), (b"content-type", b"text/plain")]
    headers, _ = await call(
        CorrelationIdMiddleware, http_scope([(b"x-correlation-id", b"ours")]), shared
    )
    assert headers == [(b"content-type", b"text/plain"), (b"x-correlation-id", b"ours")]
    assert shared == [(b"X-Correlation-Id", b"app"), (b"content-type", b"text/plain")]


async def test_custom_header_validator_and_generator() -> None:
    counter = iter(range(1000))
    uuid_like = CorrelationIdValidator(r"id-[0-9]+", max_length=12)

    def middleware(app: Any) -> CorrelationIdMiddleware:
        return CorrelationIdMiddleware(
            app, "X-Request-ID", validator=uuid_like, generate=lambda: f"id-{next(counter)}"
        )

    headers, cid = await call(middleware, http_scope([(b"x-request-id", b"id-42")]))
    assert (headers, cid) == ([(b"x-request-id", b"id-42")], "id-42")
    headers, cid = await call(middleware, http_scope([(b"x-request-id", b"req-42")]))
    assert cid is not None
    assert cid.startswith("id-")
    assert headers == [(b"x-request-id", cid.encode())]
    _, cid = await call(middleware, http_scope([(b"x-request-id", b"id-" + b"1" * 20)]))
    assert cid != "id-" + "1" * 20


async def test_a_custom_validator_accepting_latin1_bytes_never_crashes() -> None:
    lenient = CorrelationIdValidator(r"[^\x00-\x1f]{1,64}")

    def middleware(app: Any) -> CorrelationIdMiddleware:
        return CorrelationIdMiddleware(app, validator=lenient)

    headers, cid = await call(middleware, http_scope([(b"x-correlation-id", b"caf\xe9")]))
    assert cid == "caf\xe9"
    assert headers == [(b"x-correlation-id", b"caf\xe9")]


async def test_inner_scope_id_is_the_one_echoed() -> None:
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with correlation_scope("call-id-from-body"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        sent.append(message)

    await CorrelationIdMiddleware(app)(http_scope([(b"x-correlation-id", b"outer")]), None, send)  # type: ignore[arg-type]
    assert sent[0]["headers"] == [(b"x-correlation-id", b"call-id-from-body")]


async def test_echo_off_and_query_param_off() -> None:
    def quiet(app: Any) -> CorrelationIdMiddleware:
        return CorrelationIdMiddleware(app, echo=False, query_param=None)

    headers, cid = await call(quiet, http_scope([], b"rv_cid=abc"))
    assert headers == []
    assert cid is not None
    assert is_generated(cid)


async def test_context_is_reset_when_the_app_raises() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert get_correlation_id() == "raising"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await CorrelationIdMiddleware(app)(
            http_scope([(b"x-correlation-id", b"raising")]), None, None
        )  # type: ignore[arg-type]
    assert get_correlation_id() is None


async def test_websocket_sets_context_and_echoes_on_accept() -> None:
    sent: list[Any] = []
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(get_correlation_id())
        await send({"type": "websocket.accept", "subprotocol": None})
        await send({"type": "websocket.send", "text": "hi"})

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {**http_scope([(b"x-correlation-id", b"ws-1")]), "type": "websocket"}
    await CorrelationIdMiddleware(app)(scope, None, send)  # type: ignore[arg-type]
    assert seen == ["ws-1"]
    assert sent[0]["headers"] == [(b"x-correlation-id", b"ws-1")]
    assert "headers" not in sent[1]


async def test_lifespan_passes_through_without_an_id() -> None:
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(get_correlation_id())

    await CorrelationIdMiddleware(app)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == [None]


async def test_repeated_traceparent_headers_are_not_trusted() -> None:
    def trusting(app: Any) -> CorrelationIdMiddleware:
        return CorrelationIdMiddleware(app, trust_traceparent=True)

    tp = TRACEPARENT.encode()
    _, cid = await call(trusting, http_scope([(b"traceparent", tp)]))
    assert cid == TRACE_ID
    _, cid = await call(trusting, http_scope([(b"traceparent", tp), (b"traceparent", tp)]))
    assert cid != TRACE_ID


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TRACEPARENT, TRACE_ID),
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01-future-fields", TRACE_ID),
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01", TRACE_ID),
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra", None),  # version 00 is exactly 55 chars
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01x", None),
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (TRACEPARENT.upper(), None),
        (f"00-{TRACE_ID[:-1]}g-00f067aa0ba902b7-01", None),
        (f"00_{TRACE_ID}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID}-00f067aa0ba902b7-0-1", None),
        (f"0-0{TRACE_ID}-00f067aa0ba902b7-01", None),
        (TRACEPARENT[:-1], None),
        ("", None),
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01-" + "x" * 600, None),
    ],
)
def test_parse_traceparent(value: str, expected: str | None) -> None:
    assert parse_traceparent(value.encode()) == expected


@settings(max_examples=200, deadline=None)
@given(
    value=st.binary(max_size=140)
    | st.text(alphabet="abcXYZ019._:-/ \r\n\x00", max_size=140).map(str.encode)
)
async def test_header_check_agrees_with_the_default_validator(value: bytes) -> None:
    headers, cid = await call(CorrelationIdMiddleware, http_scope([(b"x-correlation-id", value)]))
    text = value.decode("latin-1")
    assert (cid == text) == is_valid_correlation_id(text)
    assert headers == [(b"x-correlation-id", str(cid).encode())]


def test_configuration_errors() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="app must be callable"):
        CorrelationIdMiddleware(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="header"):
        CorrelationIdMiddleware(app, "bad header")
    with pytest.raises(TypeError, match="validator"):
        CorrelationIdMiddleware(app, validator="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generate"):
        CorrelationIdMiddleware(app, generate="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generate"):
        CorrelationIdMiddleware(app, generate=lambda: "not valid")
    with pytest.raises(ValueError, match="generate"):
        CorrelationIdMiddleware(app, generate=lambda: "é")
    with pytest.raises(ValueError, match="query_param"):
        CorrelationIdMiddleware(app, query_param="a&b")
    with pytest.raises(ValueError, match="query_param"):
        CorrelationIdMiddleware(app, query_param="")
    assert "X-Correlation-ID".lower() in repr(CorrelationIdMiddleware(app))
