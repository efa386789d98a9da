"""ResilientTransport against a real loopback upstream (FakeTelephony served by uvicorn)."""

from __future__ import annotations

import gc
import gzip
import inspect
import json
import pickle
import socket
import warnings
import zlib
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from _raw_upstream import Mode, raw_upstream
from resilient_voice import (
    BreakerState,
    CircuitBreaker,
    FailureKind,
    OutcomeUnknownError,
    RetryPolicy,
    correlation_scope,
)
from resilient_voice.events import Event, RequestFinished
from resilient_voice.http import (
    ATTEMPT_ID_EXTENSION,
    IDEMPOTENT_EXTENSION,
    ResilientTransport,
    Route,
    UpstreamStatusError,
)
from resilient_voice.http._transport import classify_exception, classify_status
from resilient_voice.policy import Policy
from resilient_voice.testing import FakeTelephony, Fault, serve

SID = "AC" + "1" * 32
TOKEN = "secret-token-value"
CALLS = f"/2010-04-01/Accounts/{SID}/Calls.json"
TWILIO_CALLS_ROUTE = Route(
    name="twilio.calls.create",
    methods=frozenset({"POST"}),
    path=r"/2010-04-01/Accounts/[^/]+/Calls\.json",
    unprocessed_statuses=frozenset({429}),
)
CALL_FORM = {"To": "+15550100001", "From": "+15005550006", "Url": "https://example.com/twiml"}


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectError("refused"), FailureKind.NOT_SENT),
        (httpx.ConnectTimeout("slow connect"), FailureKind.NOT_SENT),
        (httpx.PoolTimeout("pool"), FailureKind.NOT_SENT),
        (httpx.ProxyError("proxy"), FailureKind.NOT_SENT),
        (httpx.LocalProtocolError("bad request"), FailureKind.NOT_SENT),
        (httpx.UnsupportedProtocol("ftp"), FailureKind.PERMANENT),
        (httpx.TooManyRedirects("loop"), FailureKind.PERMANENT),
        (httpx.ReadTimeout("read"), FailureKind.MAYBE_PROCESSED),
        (httpx.WriteTimeout("write"), FailureKind.MAYBE_PROCESSED),
        (httpx.ReadError("reset"), FailureKind.MAYBE_PROCESSED),
        (httpx.WriteError("broken pipe"), FailureKind.MAYBE_PROCESSED),
        (httpx.CloseError("close"), FailureKind.MAYBE_PROCESSED),
        (httpx.RemoteProtocolError("disconnected"), FailureKind.MAYBE_PROCESSED),
        (httpx.DecodingError("gzip"), FailureKind.MAYBE_PROCESSED),
    ],
)
def test_exception_table(exc: Exception, kind: FailureKind) -> None:
    assert classify_exception(exc) is kind


@pytest.mark.parametrize(
    ("status", "unprocessed", "kind"),
    [
        (200, frozenset(), None),
        (201, frozenset(), None),
        (302, frozenset(), None),
        (400, frozenset(), FailureKind.PERMANENT),
        (401, frozenset(), FailureKind.PERMANENT),
        (404, frozenset(), FailureKind.PERMANENT),
        (408, frozenset(), FailureKind.MAYBE_PROCESSED),
        (429, frozenset(), FailureKind.MAYBE_PROCESSED),
        (429, frozenset({429}), FailureKind.UNPROCESSED),
        (500, frozenset(), FailureKind.MAYBE_PROCESSED),
        (503, frozenset(), FailureKind.MAYBE_PROCESSED),
        (504, frozenset(), FailureKind.MAYBE_PROCESSED),
    ],
)
def test_status_table(status: int, unprocessed: frozenset[int], kind: FailureKind | None) -> None:
    assert classify_status(status, unprocessed) is kind


def test_route_validation() -> None:
    with pytest.raises(ValueError, match="name"):
        Route(name="")
    with pytest.raises(ValueError, match="pattern"):
        Route(name="bad", path="([")
    with pytest.raises(ValueError, match="unprocessed"):
        Route(name="bad", unprocessed_statuses=frozenset({200}))
    with pytest.raises(TypeError, match="Policy"):
        ResilientTransport("nope")  # type: ignore[arg-type]


def fast_retry(**options: object) -> RetryPolicy:
    return RetryPolicy(base_delay=0.001, max_delay=0.01, **options)  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTelephony, str]]:
    app = FakeTelephony(
        twilio_accounts={SID: TOKEN}, calls_per_second=1000.0, status_callbacks=False
    )
    async with serve(app) as url:
        yield app, url


def client(url: str, transport: ResilientTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, transport=transport, auth=(SID, TOKEN))


async def test_get_is_retried_after_5xx_and_returns_the_answer(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    app.faults = [Fault.burst(2, status=503, endpoints="twilio.calls.list")]
    transport = ResilientTransport(Policy(retry=fast_retry(max_attempts=3)))
    async with client(url, transport) as http:
        response = await http.get(CALLS)
    assert response.status_code == 200
    assert len(app.requests("twilio.calls.list")) == 3


async def test_idempotent_request_that_exhausts_retries_returns_the_last_response(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    app.faults = [Fault.error_rate(1.0, status=503, endpoints="twilio.calls.list")]
    transport = ResilientTransport(Policy(retry=fast_retry(max_attempts=2)))
    async with client(url, transport) as http:
        response = await http.get(CALLS)
    assert response.status_code == 503
    assert response.json()["code"] == 20503
    assert len(app.requests("twilio.calls.list")) == 2


async def test_post_5xx_is_not_resent_and_raises_outcome_unknown(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    app.faults = [Fault.burst(1, status=500, endpoints="twilio.calls.create")]
    transport = ResilientTransport(Policy(retry=fast_retry(max_attempts=3)))
    async with client(url, transport) as http:
        with pytest.raises(OutcomeUnknownError) as info:
            await http.post(CALLS, data=CALL_FORM)
    assert isinstance(info.value.__cause__, UpstreamStatusError)
    assert info.value.__cause__.status == 500
    assert len(app.requests("twilio.calls.create")) == 1


async def test_processed_then_dropped_create_is_never_resent(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    app.faults = [Fault.drop_after(1.0, count=1, endpoints="twilio.calls.create")]
    transport = ResilientTransport(
        Policy(retry=fast_retry(max_attempts=5)), routes=[TWILIO_CALLS_ROUTE]
    )
    async with client(url, transport) as http:
        with pytest.raises(OutcomeUnknownError) as info:
            await http.post(CALLS, data=CALL_FORM)
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert len(app.calls("twilio")) == 1
    assert app.duplicate_destinations() == {}


async def test_documented_unprocessed_429_is_retried_even_for_create(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    app.faults = [
        Fault.rate_limited(1.0, retry_after=0.01, count=2, endpoints="twilio.calls.create")
    ]
    breaker = CircuitBreaker("twilio", failure_threshold=1)
    transport = ResilientTransport(
        Policy(breaker=breaker, retry=fast_retry(max_attempts=3)), routes=[TWILIO_CALLS_ROUTE]
    )
    async with client(url, transport) as http:
        response = await http.post(CALLS, data=CALL_FORM)
    assert response.status_code == 201
    assert len(app.requests("twilio.calls.create")) == 3  # two 429s, then the call
    assert len(app.calls("twilio")) == 1
    assert breaker.state is BreakerState.CLOSED  # 429 is back-pressure, not sickness


async def test_undocumented_429_on_a_post_is_an_unknown_outcome(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    app.faults = [
        Fault.rate_limited(1.0, retry_after=0.01, count=1, endpoints="twilio.calls.create")
    ]
    transport = ResilientTransport(Policy(retry=fast_retry(max_attempts=3)))  # no route for it
    async with client(url, transport) as http:
        with pytest.raises(OutcomeUnknownError):
            await http.post(CALLS, data=CALL_FORM)
    assert len(app.requests("twilio.calls.create")) == 1


async def test_client_errors_are_returned_unchanged_and_not_retried(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    breaker = CircuitBreaker("twilio", failure_threshold=1)
    transport = ResilientTransport(Policy(breaker=breaker, retry=fast_retry(max_attempts=3)))
    async with client(url, transport) as http:
        response = await http.post(CALLS, data={"To": "not-a-number", "From": "+1", "Url": "x"})
    assert response.status_code == 400
    assert len(app.requests("twilio.calls.create")) == 1
    assert breaker.state is BreakerState.CLOSED


async def test_connection_refused_is_not_sent_and_retried_then_raised() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    transport = ResilientTransport(Policy(retry=fast_retry(max_attempts=3)))
    attempts: list[int] = []

    def count(event: Event) -> None:
        if isinstance(event, RequestFinished):
            attempts.append(event.attempts)

    transport.add_listener(count)
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(httpx.ConnectError) as info:
            await http.post(f"http://127.0.0.1:{port}/call", json={})
    assert any("3 attempt" in note for note in info.value.__notes__)
    assert attempts == [3]
    # Classified by the transport's table, never by an attribute set on httpx's exception.
    assert "failure_kind" not in vars(info.value)


async def test_breaker_opens_on_5xx_and_then_fails_fast(fake: tuple[FakeTelephony, str]) -> None:
    app, url = fake
    app.faults = [Fault.error_rate(1.0, status=503, endpoints="twilio.calls.list")]
    breaker = CircuitBreaker("twilio", failure_threshold=2, recovery_timeout=60.0)
    transport = ResilientTransport(Policy(breaker=breaker))
    async with client(url, transport) as http:
        for _ in range(2):
            assert (await http.get(CALLS)).status_code == 503
        assert breaker.state is BreakerState.OPEN
        from resilient_voice import CircuitOpenError

        with pytest.raises(CircuitOpenError):
            await http.get(CALLS)
    assert len(app.requests("twilio.calls.list")) == 2


async def test_extension_flag_and_honoured_key_make_a_post_retryable(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    app.faults = [Fault.burst(1, status=503, endpoints="twilio.messages.create")]
    transport = ResilientTransport(Policy(retry=fast_retry(max_attempts=3)))
    path = f"/2010-04-01/Accounts/{SID}/Messages.json"
    form = {"To": "+15550100002", "From": "+15005550006", "Body": "hi"}
    async with client(url, transport) as http:
        request = http.build_request("POST", path, data=form)
        request.extensions[IDEMPOTENT_EXTENSION] = True
        response = await http.send(request)
    assert response.status_code == 201
    assert len(app.requests("twilio.messages.create")) == 2

    keyed = ResilientTransport(
        Policy(retry=fast_retry(max_attempts=3)),
        routes=[Route(name="messages", path=r".*/Messages\.json", honours_idempotency_key=True)],
    )
    assert keyed._is_idempotent(
        httpx.Request("POST", url + path, headers={"Idempotency-Key": "k1"}), keyed.routes[0]
    )
    assert not keyed._is_idempotent(httpx.Request("POST", url + path), keyed.routes[0])
    assert not transport._is_idempotent(
        httpx.Request("POST", url + path, headers={"Idempotency-Key": "k1"}),
        Route(name="calls"),
    )


async def test_correlation_header_is_added_from_the_context(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    transport = ResilientTransport(Policy())
    async with client(url, transport) as http:
        with correlation_scope("call-abc.123"):
            await http.get(CALLS)
        await http.get(CALLS, headers={"X-Correlation-ID": "explicit"})
    seen = [r.headers.get("x-correlation-id") for r in app.requests("twilio.calls.list")]
    assert seen == ["call-abc.123", "explicit"]


async def test_listener_gets_route_and_status_class(fake: tuple[FakeTelephony, str]) -> None:
    _app, url = fake
    events: list[tuple[object, ...]] = []

    def record(event: Event) -> None:
        match event:
            case RequestFinished(source, host, method, route, status_class, duration, attempts):
                events.append((source, host, method, route, status_class, duration, attempts))

    transport = ResilientTransport(
        Policy(), routes=[TWILIO_CALLS_ROUTE], name="twilio", listeners=[record]
    )
    async with client(url, transport) as http:
        await http.post(CALLS, data=CALL_FORM)
    (name, host, method, route, status_class, duration, attempts) = events[0]
    assert (name, host, method, route, status_class, attempts) == (
        "twilio",
        "other",  # the route matches any host: the raw host would be an unbounded label
        "POST",
        "twilio.calls.create",
        "2xx",
        1,
    )
    assert isinstance(duration, float)
    assert duration >= 0


async def test_attempt_id_and_limiter_key_come_from_request_extensions(
    fake: tuple[FakeTelephony, str],
) -> None:
    from resilient_voice.http import ATTEMPT_ID_EXTENSION, LIMITER_KEY_EXTENSION
    from resilient_voice.limiter import KeyedLimiter

    app, url = fake
    app.faults = [Fault.drop_after(1.0, count=1, endpoints="twilio.messages.create")]
    limiter = KeyedLimiter(rate=1000.0, burst=1)
    policy = Policy(limiter=limiter, retry=fast_retry(max_attempts=3))
    transport = ResilientTransport(policy)
    path = f"/2010-04-01/Accounts/{SID}/Messages.json"
    form = {"To": "+15550100003", "From": "+15005550006", "Body": "hi"}
    async with client(url, transport) as http:
        request = http.build_request("POST", path, data=form)
        request.extensions[ATTEMPT_ID_EXTENSION] = "attempt-42"
        request.extensions[LIMITER_KEY_EXTENSION] = "+15005550006"
        with pytest.raises(OutcomeUnknownError) as info:
            await http.send(request)
    assert info.value.attempt_id == "attempt-42"
    assert limiter.statistics().keys == 1
    assert limiter.bucket("+15005550006") is not None


async def test_without_retry_policy_a_maybe_processed_post_still_raises_outcome_unknown(
    fake: tuple[FakeTelephony, str],
) -> None:
    app, url = fake
    transport = ResilientTransport(Policy())  # no retry policy at all
    async with client(url, transport) as http:
        app.faults = [Fault.burst(1, status=502, endpoints="twilio.calls.create")]
        with pytest.raises(OutcomeUnknownError) as info:
            await http.post(CALLS, data=CALL_FORM)
        assert isinstance(info.value.__cause__, UpstreamStatusError)
        app.faults = [Fault.drop_after(1.0, count=1, endpoints="twilio.calls.create")]
        with pytest.raises(OutcomeUnknownError) as info:
            await http.post(CALLS, data=CALL_FORM)
        assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
        # Idempotent requests keep the real answer.
        app.faults = [Fault.burst(1, status=502, endpoints="twilio.calls.list")]
        assert (await http.get(CALLS)).status_code == 502
    assert len(app.requests("twilio.calls.create")) == 2


async def test_a_local_refusal_before_sending_is_not_an_unknown_outcome(
    fake: tuple[FakeTelephony, str],
) -> None:
    from resilient_voice.http import ATTEMPT_ID_EXTENSION
    from resilient_voice.limiter import KeyedLimiter

    app, url = fake
    keyed = ResilientTransport(Policy(limiter=KeyedLimiter(rate=10.0)))  # no key given
    async with client(url, keyed) as http:
        with pytest.raises(ValueError, match="key"):
            await http.post(CALLS, data=CALL_FORM)
    plain = ResilientTransport(Policy(retry=fast_retry()))
    async with client(url, plain) as http:
        request = http.build_request("POST", CALLS, data=CALL_FORM)
        request.extensions[ATTEMPT_ID_EXTENSION] = "not valid!"
        with pytest.raises(ValueError, match="attempt_id"):
            await http.send(request)
    assert app.requests("twilio.calls.create") == []


async def test_an_error_answer_already_read_by_the_inner_transport_still_decodes() -> None:
    import gzip

    def answer(request: httpx.Request) -> httpx.Response:
        body = gzip.compress(b'{"code": 20404, "message": "not found"}')
        return httpx.Response(404, headers={"content-encoding": "gzip"}, content=body)

    transport = ResilientTransport(Policy(), transport=httpx.MockTransport(answer))
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.get("http://upstream.test/x")
    assert response.status_code == 404
    assert response.json()["code"] == 20404


# The body is part of the attempt


CALL_JSON = json.dumps({"sid": "CA" + "0" * 32, "status": "queued", "to": "+15550100001"}).encode()


@pytest.mark.parametrize("stall", [False, True])
async def test_a_create_whose_body_never_arrives_is_an_unknown_outcome_and_a_breaker_failure(
    fake: tuple[FakeTelephony, str], stall: bool
) -> None:
    """201 Created, full headers, then the connection drops (or stalls) mid-body: the call
    exists, so the caller gets OutcomeUnknownError with its attempt id, never a bare httpx
    error, and the retry policy does not send it again."""
    app, url = fake
    breaker = CircuitBreaker("mid-body", failure_threshold=5)
    transport = ResilientTransport(Policy(breaker=breaker, retry=fast_retry(), timeout=5.0))
    app.faults = [Fault.drop_mid_body(stall=stall, count=1, endpoints="twilio.calls.create")]
    async with httpx.AsyncClient(
        base_url=url, transport=transport, auth=(SID, TOKEN), timeout=0.3
    ) as http:
        request = http.build_request("POST", CALLS, data=CALL_FORM)
        request.extensions[ATTEMPT_ID_EXTENSION] = "planted-attempt-1"
        with pytest.raises(OutcomeUnknownError) as info:
            await http.send(request)
    assert info.value.attempt_id == "planted-attempt-1"
    expected = httpx.ReadTimeout if stall else httpx.RemoteProtocolError
    assert isinstance(info.value.__cause__, expected)
    ((record,),) = (app.requests("twilio.calls.create"),)
    assert (record.status, record.fault) == (201, "drop_mid_body")
    assert len(app.calls()) == 1
    assert breaker.statistics().consecutive_failures == 1


@pytest.mark.parametrize("mode", ["drop", "stall"])
async def test_a_raw_201_cut_mid_body_is_an_unknown_outcome_within_the_attempt_timeout(
    mode: Mode,
) -> None:
    """Against a plain socket server: the per-attempt timeout bounds the body read too (the
    httpx read timeout is set far longer here, so only the policy's timeout can end it)."""
    async with raw_upstream(CALL_JSON, mode=mode) as upstream:
        transport = ResilientTransport(Policy(retry=fast_retry(), timeout=0.3))
        async with httpx.AsyncClient(base_url=upstream.url, transport=transport, timeout=30) as h:
            with pytest.raises(OutcomeUnknownError) as info:
                await h.post(CALLS, data=CALL_FORM)
    assert [r.method for r in upstream.requests] == ["POST"]
    cause = info.value.__cause__
    assert isinstance(cause, TimeoutError if mode == "stall" else httpx.RemoteProtocolError)


async def test_a_request_body_cut_mid_send_leaves_no_unfinished_generator() -> None:
    """The upstream resets the connection after 64 KiB of a 32 MiB body: the send fails
    mid-way (more than the loopback buffers hold), and httpcore's ``async for`` over the body
    is left by the exception. The body it iterates must not be an async generator: trio warns
    (ResourceWarning, raised as an error by this suite's filters) when one is collected
    unfinished. ``gc.collect()`` inside the run finds it if it exists."""
    body = b"x" * (32 * 1024 * 1024)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        async with raw_upstream(CALL_JSON, mode="reset") as upstream:
            transport = ResilientTransport(Policy())
            async with httpx.AsyncClient(base_url=upstream.url, transport=transport) as h:
                for _ in range(2):  # a second request: the body can be sent again
                    with pytest.raises(OutcomeUnknownError):
                        await h.post(CALLS, content=body)
        gc.collect()
    assert [r.method for r in upstream.requests] == ["POST", "POST"]
    assert all(0 < len(r.body) < len(body) for r in upstream.requests)
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []


async def test_streamed_and_in_memory_request_bodies_are_sent_whole_on_every_attempt() -> None:
    """A body from an async generator is read once and sent again on the retry; each attempt
    iterates the body the inner transport is given without an async generator."""
    sent: list[bytes] = []
    iterators: list[object] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.ByteStream)
        chunks = request.stream.__aiter__()
        iterators.append(chunks)
        sent.append(b"".join([chunk async for chunk in chunks]))
        return httpx.Response(503 if len(sent) % 2 else 200)

    async def parts() -> AsyncIterator[bytes]:
        yield b"first,"
        yield b"second"

    transport = ResilientTransport(
        Policy(retry=fast_retry()), transport=httpx.MockTransport(upstream)
    )
    async with httpx.AsyncClient(base_url="http://upstream.test", transport=transport) as h:
        assert (await h.put("/a", content=parts())).status_code == 200
        assert (await h.put("/b", content=b"in memory")).status_code == 200
        assert (await h.put("/c")).status_code == 200
    assert sent == [b"first,second"] * 2 + [b"in memory"] * 2 + [b""] * 2
    assert not any(inspect.isasyncgen(chunks) for chunks in iterators)


async def test_idempotent_answers_stay_streamed_and_their_body_read_is_bounded_by_the_timeout() -> (
    None
):
    """A GET whose body drips one byte at a time: the response comes back at once (streamed),
    and reading the body ends at the attempt's timeout, not when the upstream finishes."""
    body = json.dumps({"calls": ["x" * 400]}).encode()
    async with raw_upstream(body, mode="drip", status=200) as upstream:
        transport = ResilientTransport(Policy(retry=fast_retry(), timeout=0.3))
        async with (
            httpx.AsyncClient(base_url=upstream.url, transport=transport, timeout=30) as h,
            h.stream("GET", CALLS) as response,
        ):
            assert response.status_code == 200
            assert not response.is_stream_consumed
            with pytest.raises(httpx.ReadTimeout, match="attempt's timeout"):
                await response.aread()
    assert len(upstream.requests) == 1


async def test_an_idempotent_body_that_stalls_outright_ends_at_the_attempt_timeout() -> None:
    """Headers, half the body, then silence: httpx's read timeout (30 s here) would wait; the
    body read ends at the attempt's timeout instead, and the request's own timeout settings
    are left as they were."""
    async with raw_upstream(CALL_JSON, mode="stall", status=200) as upstream:
        transport = ResilientTransport(Policy(timeout=0.3))
        async with httpx.AsyncClient(base_url=upstream.url, transport=transport, timeout=30) as h:
            request = h.build_request("GET", CALLS)
            with pytest.raises(httpx.ReadTimeout):
                await h.send(request)
    assert request.extensions["timeout"]["read"] == 30


async def test_idempotent_bodies_read_normally_with_and_without_a_timeout(
    fake: tuple[FakeTelephony, str],
) -> None:
    _app, url = fake
    for policy in (Policy(), Policy(timeout=5.0)):
        async with client(url, ResilientTransport(policy)) as http:
            response = await http.get(CALLS)
            assert response.status_code == 200
            assert response.json()["calls"] == []


def gzip_bomb(size: int) -> bytes:
    return gzip.compress(b"\0" * size, compresslevel=9)


async def test_a_compressed_bomb_is_refused_at_the_cap_on_reads_and_creates() -> None:
    from resilient_voice.http import ResponseTooLargeError

    cap = 256 * 1024
    bomb = gzip_bomb(8 * 1024 * 1024)
    assert len(bomb) < cap
    async with raw_upstream(
        bomb, mode="whole", status=200, headers={"content-encoding": "gzip"}
    ) as upstream:
        transport = ResilientTransport(Policy(retry=fast_retry()), max_response_bytes=cap)
        async with httpx.AsyncClient(base_url=upstream.url, transport=transport) as http:
            with pytest.raises(ResponseTooLargeError) as read_info:
                await http.get(CALLS)
            with pytest.raises(OutcomeUnknownError) as create_info:
                await http.post(CALLS, data=CALL_FORM)
    assert read_info.value.kind is FailureKind.PERMANENT
    assert read_info.value.limit == cap
    overflow = create_info.value.__cause__
    assert isinstance(overflow, ResponseTooLargeError)
    assert overflow.kind is FailureKind.MAYBE_PROCESSED
    assert [r.method for r in upstream.requests] == ["GET", "POST"]  # neither retried


async def test_plain_bodies_over_the_cap_are_refused_too() -> None:
    from resilient_voice.http import ResponseTooLargeError

    async with raw_upstream(b"x" * 5000, mode="whole", status=200) as upstream:
        transport = ResilientTransport(Policy(), max_response_bytes=4096)
        async with httpx.AsyncClient(base_url=upstream.url, transport=transport) as http:
            with pytest.raises(ResponseTooLargeError):
                await http.get(CALLS)
            with pytest.raises(OutcomeUnknownError):
                await http.post(CALLS, data=CALL_FORM)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_answers_are_decoded_by_the_transport(encoding: str) -> None:
    payload = json.dumps({"calls": [{"sid": "CA1"}] * 100}).encode()
    body = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
    async with raw_upstream(
        body, mode="whole", status=200, headers={"content-encoding": encoding}
    ) as upstream:
        transport = ResilientTransport(Policy(timeout=5.0))
        async with httpx.AsyncClient(base_url=upstream.url, transport=transport) as http:
            read = await http.get(CALLS)
            created = await http.post(CALLS, data=CALL_FORM)
    for response in (read, created):
        assert response.content == payload
        assert "content-encoding" not in response.headers
    assert created.headers["content-length"] == str(len(payload))


def test_max_response_bytes_is_checked_and_documented() -> None:
    from resilient_voice.http import ResponseTooLargeError
    from resilient_voice.http._transport import DEFAULT_MAX_RESPONSE_BYTES

    assert DEFAULT_MAX_RESPONSE_BYTES == 10 * 1024 * 1024
    assert ResilientTransport(Policy()).max_response_bytes == DEFAULT_MAX_RESPONSE_BYTES
    assert ResilientTransport(Policy(), max_response_bytes=None).max_response_bytes is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_response_bytes"):
            ResilientTransport(Policy(), max_response_bytes=bad)  # type: ignore[arg-type]
    error = ResponseTooLargeError(200, 10, FailureKind.PERMANENT)
    assert pickle.loads(pickle.dumps(error)).limit == 10  # noqa: S301  # our own bytes


async def test_a_head_answer_keeps_its_content_encoding_and_length() -> None:
    """HEAD has no body: its Content-Length describes the resource, so nothing is decoded."""

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"content-encoding": "gzip", "content-length": "1234"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b""))

    transport = ResilientTransport(Policy(timeout=5.0), transport=httpx.MockTransport(answer))
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.head("http://upstream.test/x")
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == "1234"


@pytest.mark.parametrize(
    ("first", "second"), [("asyncio", "asyncio"), ("trio", "trio"), ("asyncio", "trio")]
)
def test_a_client_used_after_its_event_loop_closed_refuses_before_sending(
    first: str, second: str
) -> None:
    app = FakeTelephony(twilio_accounts={SID: TOKEN}, status_callbacks=False)

    async def main() -> None:
        async with serve(app) as url:
            transport = ResilientTransport(Policy(), routes=[TWILIO_CALLS_ROUTE], name="twilio")
            # Connection: close keeps no socket of the closed loop alive for the test to leak;
            # with a pooled one the old code even wrote the request before failing.
            http = httpx.AsyncClient(
                base_url=url,
                transport=transport,
                auth=(SID, TOKEN),
                headers={"Connection": "close"},
            )

            async def place() -> int:
                return (await http.post(CALLS, data=CALL_FORM)).status_code

            def run_on(backend: str) -> int:
                return anyio.run(place, backend=backend)

            assert await anyio.to_thread.run_sync(run_on, first) == 201
            with pytest.raises(RuntimeError, match="has closed; build one per loop") as info:
                await anyio.to_thread.run_sync(run_on, second)
            assert not isinstance(info.value, OutcomeUnknownError)
            assert getattr(info.value, "failure_kind", None) is FailureKind.NOT_SENT

    anyio.run(main)
    assert len(app.requests("twilio.calls.create")) == 1


def test_transport_listeners_must_be_callables() -> None:
    with pytest.raises(TypeError, match="listener"):
        ResilientTransport(Policy(), listeners=[object()])  # type: ignore[list-item]
    transport = ResilientTransport(Policy())
    with pytest.raises(TypeError, match="listener"):
        transport.add_listener("on_request")  # type: ignore[arg-type]


def test_a_paused_loop_has_finished_running_but_is_not_closed() -> None:
    import asyncio
    import threading

    from resilient_voice._loops import loop_closed, loop_finished

    loop = asyncio.new_event_loop()
    try:
        # The breaker's question (may another loop take over?) and the transport's (are this
        # loop's connections gone?) differ for a loop between runs.
        assert loop_finished(loop, threading.get_ident())
        assert not loop_closed(loop)
    finally:
        loop.close()
    assert loop_closed(loop)


@pytest.mark.parametrize(
    ("answers", "status", "backpressure", "ended"),
    [
        ([429, 201], 201, 1, False),  # pushed back once, then created
        ([429, 429, 429], 429, 3, True),  # the caller gets the last 429
        ([429, "drop", 201], 201, 1, False),
        ([503, 201], 201, 0, False),  # a 5xx is not back-pressure
        ([400], 400, 0, False),  # nor is another 4xx
    ],
)
async def test_the_listener_counts_429_answers_apart_from_other_client_errors(
    answers: list[int | str], status: int, backpressure: int, ended: bool
) -> None:
    """Twilio's 20429 comes as HTTP 429: the status alone says the provider pushed back."""
    pending = list(answers)

    def answer(request: httpx.Request) -> httpx.Response:
        now = pending.pop(0)
        if now == "drop":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(int(now), json={})

    events: list[Event] = []
    transport = ResilientTransport(
        Policy(retry=fast_retry(max_attempts=3)),
        transport=httpx.MockTransport(answer),
        routes=[Route("create", unprocessed_statuses=frozenset({429, 503}))],
        listeners=[events.append],
    )
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.post("https://api.example.com/calls")
    assert response.status_code == status
    (finished,) = [e for e in events if isinstance(e, RequestFinished)]
    assert (finished.backpressure, finished.ended_in_backpressure) == (backpressure, ended)
    assert finished.status_class == f"{status // 100}xx"
