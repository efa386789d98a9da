"""RateLimitMiddleware in Starlette, FastAPI and Litestar on loopback; direct ASGI calls."""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Hashable, Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _apps import FRAMEWORKS, STREAM_GATE, build, http_client, serve_sync
from resilient_voice.asgi import RateLimitMiddleware, VapiWebhookMiddleware
from resilient_voice.asgi._ratelimit import RouteMatcher
from resilient_voice.events import BucketEvicted, Event, TokensGranted, TokensRejected
from resilient_voice.limiter import KeyedLimiter
from resilient_voice.testing import ManualClock

SECRET = "vapi-secret"
ADDRESSES = (f"203.0.113.{i}" for i in itertools.count(1))  # a fresh client per use


def recommended_stack(app: Any, **options: Any) -> Any:
    """The documented setup: Vapi webhooks exempt from the limit, authenticated instead."""
    guarded = VapiWebhookMiddleware(app, secret=SECRET, paths=["/hook/*"])
    return RateLimitMiddleware(guarded, exempt=["/hook/*"], **options)


class Served:
    def __init__(self, url: str, clock: ManualClock) -> None:
        self.url = url
        self.clock = clock


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Served]]:
    with ExitStack() as stack:

        class Lazy(dict[str, Served]):
            def __missing__(self, framework: str) -> Served:
                clock = ManualClock(1000.0)
                app = build(
                    framework,
                    recommended_stack,
                    rate=1,
                    burst=3,
                    trusted_proxies=["127.0.0.1"],
                    routes={"/items/{item_id}": (0.5, 1)},
                    clock=clock,
                )
                self[framework] = Served(stack.enter_context(serve_sync(app)), clock)
                return self[framework]

        yield Lazy()


@pytest.fixture(params=FRAMEWORKS)
def served(request: pytest.FixtureRequest, servers: dict[str, Served]) -> Served:
    return servers[request.param]


def client_headers(address: str | None = None) -> dict[str, str]:
    """Requests come from 127.0.0.1, a trusted proxy; X-Forwarded-For names the client."""
    return {"x-forwarded-for": address or next(ADDRESSES)}


async def test_quota_headers_on_allowed_responses_then_429(served: Served) -> None:
    headers = client_headers()
    async with http_client(base_url=served.url) as client:
        allowed = [await client.get("/cid", headers=headers) for _ in range(3)]
        rejected = await client.get("/cid", headers=headers)
        for response, remaining in zip(allowed, (2, 1, 0), strict=True):
            assert response.status_code == 200
            assert response.headers.get_list("ratelimit-policy") == ['"default";q=3;w=3']
            assert response.headers.get_list("ratelimit") == [f'"default";r={remaining};t=1']
            assert "retry-after" not in response.headers
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == "1"
        assert rejected.headers.get_list("ratelimit-policy") == ['"default";q=3;w=3']
        assert rejected.headers.get_list("ratelimit") == ['"default";r=0;t=1']
        assert rejected.headers["content-type"] == "application/json"
        assert rejected.content == b'{"error":"rate_limited","retry_after":1}'
        assert rejected.json() == {"error": "rate_limited", "retry_after": 1}
        # Another client is not affected.
        assert (await client.get("/cid", headers=client_headers())).status_code == 200
        served.clock.advance(1.0)  # one token back
        again = await client.get("/cid", headers=headers)
        assert again.status_code == 200
        assert again.headers["ratelimit"] == '"default";r=0;t=1'


async def test_per_route_limit_has_its_own_buckets(served: Served) -> None:
    headers = client_headers()
    async with http_client(base_url=served.url) as client:
        first = await client.get("/items/1", headers=headers)
        second = await client.get("/items/2", headers=headers)  # same template, same bucket
        other = await client.get("/hook/get", headers=headers)  # exempt (and unauthenticated)
        default = await client.get("/cid", headers=headers)  # the default limit, untouched
    assert first.status_code == 200
    assert first.headers["ratelimit-policy"] == '"default";q=1;w=2'
    assert first.headers["ratelimit"] == '"default";r=0;t=2'
    assert second.status_code == 429
    assert second.headers["retry-after"] == "2"
    assert (other.status_code, "ratelimit" in other.headers) == (403, False)
    assert default.headers["ratelimit"] == '"default";r=2;t=1'


async def test_vapi_webhook_path_is_never_answered_429(served: Served) -> None:
    headers = client_headers()
    body = json.dumps({"message": {"type": "tool-calls", "call": {"id": "c"}}}).encode()
    async with http_client(base_url=served.url) as client:
        for _ in range(4):  # exhaust this client's default bucket
            await client.get("/cid", headers=headers)
        assert (await client.get("/cid", headers=headers)).status_code == 429
        for message_type in ("assistant-request", "tool-calls", "status-update"):
            content = body.replace(b"tool-calls", message_type.encode())
            for _ in range(10):
                hook = await client.post(
                    "/hook/cid", content=content, headers={**headers, "x-vapi-secret": SECRET}
                )
                assert hook.status_code == 200
                assert "ratelimit" not in hook.headers
        forged = await client.post("/hook/cid", content=body, headers=headers)
        assert forged.status_code == 403  # authenticated, not limited
        # Spellings Litestar routes to the same handler (the stack wraps the whole app there).
        for spelling in ("//hook/cid", "/hook//cid", "/hook/cid/"):
            forged = await client.post(served.url + spelling, content=body, headers=headers)
            assert (spelling, forged.status_code) == (spelling, 403)


async def test_streaming_still_streams_with_quota_headers(served: Served) -> None:
    STREAM_GATE.clear()
    async with (
        http_client(base_url=served.url) as client,
        client.stream("GET", "/stream", headers=client_headers()) as response,
    ):
        assert response.headers["ratelimit"] == '"default";r=2;t=1'
        chunks = response.aiter_raw()
        with anyio.fail_after(2.0):
            assert await chunks.__anext__() == b"first\n"
        STREAM_GATE.set()
        assert b"".join([chunk async for chunk in chunks]) == b"second\n"


async def test_hostile_forwarded_for_over_the_network(served: Served) -> None:
    address = next(ADDRESSES)
    junk = ", ".join(["not-an-ip", "999.1.1.1", "\x7f" * 3, "1.2.3.4"] * 500)
    async with http_client(base_url=served.url) as client:
        # Thousands of forged hops on the left; the right-most hop is what the proxy saw.
        spoofed = {"x-forwarded-for": f"{junk}, {address}"}
        statuses = [(await client.get("/cid", headers=spoofed)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        # Varying the forged part does not give a fresh bucket.
        varied = {"x-forwarded-for": f"8.8.8.8, {address}"}
        assert (await client.get("/cid", headers=varied)).status_code == 429


# Direct ASGI calls.


def scope(
    path: str = "/",
    client: tuple[str, int] | None = ("192.0.2.1", 4000),
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": headers or [],
        "client": client,
    }


async def run(
    middleware: RateLimitMiddleware, request: dict[str, Any]
) -> tuple[int, dict[Any, Any]]:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await middleware(request, None, send)  # type: ignore[arg-type]
    return sent[0]["status"], dict(sent[0]["headers"])


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": SHARED_HEADERS})
    await send({"type": "http.response.body", "body": b""})


SHARED_HEADERS = [(b"content-type", b"text/plain")]


async def test_default_key_is_the_client_address_and_forwarded_for_is_ignored() -> None:
    limiter = RateLimitMiddleware(ok_app, rate=1, burst=1, clock=ManualClock())
    spoof = [(b"x-forwarded-for", b"198.51.100.7")]
    assert (await run(limiter, scope(headers=spoof)))[0] == 200
    assert (await run(limiter, scope(headers=[(b"x-forwarded-for", b"1.1.1.1")])))[0] == 429
    assert (await run(limiter, scope(client=("192.0.2.2", 1))))[0] == 200
    # No client address at all: one shared bucket, not an exemption.
    assert (await run(limiter, scope(client=None)))[0] == 200
    assert (await run(limiter, scope(client=None)))[0] == 429
    assert SHARED_HEADERS == [(b"content-type", b"text/plain")]  # copied, never extended


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ([b"198.51.100.7"], "198.51.100.7"),
        ([b"198.51.100.7, 10.0.0.2, 10.0.0.3"], "198.51.100.7"),  # trusted hops skipped
        ([b"6.6.6.6, 198.51.100.7, 10.0.0.2"], "198.51.100.7"),  # forged left part ignored
        ([b"6.6.6.6", b"198.51.100.7"], "198.51.100.7"),  # repeated headers are one list
        ([b"10.0.0.9, 10.0.0.2"], "10.0.0.9"),  # all trusted: the left-most
        ([b"2001:DB8::1"], "2001:db8::/64"),  # normalised, keyed by its /64
        ([b"198.51.100.7, junk"], "10.0.0.1"),  # junk where the proxy wrote: the peer
        ([b"198.51.100.7, 1.2.3.4:80"], "10.0.0.1"),
        ([b"198.51.100.7, "], "10.0.0.1"),
        ([b"198.51.100.7, 999.1.1.1"], "10.0.0.1"),
        ([b"x" * 100], "10.0.0.1"),
        ([], "10.0.0.1"),
        ([b", ".join([b"10.0.0.2"] * 40)], "10.0.0.2"),  # more trusted hops than examined
    ],
)
async def test_forwarded_for_walk(forwarded: list[bytes], expected: str) -> None:
    middleware = RateLimitMiddleware(
        ok_app, rate=100, burst=100, trusted_proxies=["10.0.0.1", "10.0.0.0/24"]
    )
    limiter = middleware.limiters["*"]
    headers = [(b"x-forwarded-for", value) for value in forwarded]
    await run(middleware, scope(client=("10.0.0.1", 1), headers=headers))
    assert (len(limiter), limiter.bucket(expected) is not None) == (1, True)
    # An untrusted peer's X-Forwarded-For is never read.
    await run(middleware, scope(client=("192.0.2.9", 1), headers=headers))
    assert limiter.bucket("192.0.2.9") is not None
    assert len(limiter) == 2


async def test_huge_forwarded_for_parses_a_bounded_number_of_hops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ipaddress

    parsed: list[object] = []
    real = ipaddress.ip_address

    def counting(address: object) -> object:
        parsed.append(address)
        return real(address)  # type: ignore[arg-type]

    monkeypatch.setattr(ipaddress, "ip_address", counting)
    middleware = RateLimitMiddleware(ok_app, rate=1e6, burst=1e6, trusted_proxies=["10.0.0.1"])
    hops = b", ".join([b"10.0.0.1"] * 20_000)  # ~200 kB, every hop "trusted"
    request = scope(client=("10.0.0.1", 1), headers=[(b"x-forwarded-for", hops)])
    assert (await run(middleware, request))[0] == 200
    assert 1 <= len(parsed) <= 16 + 2  # forwarded_hops, plus the peer: not 20 000 address parses


async def test_retry_after_is_rounded_up_and_policy_window_covers_the_quota() -> None:
    clock = ManualClock()
    middleware = RateLimitMiddleware(ok_app, rate=0.4, burst=1, clock=clock)
    status, headers = await run(middleware, scope())
    assert (status, headers[b"ratelimit-policy"]) == (200, b'"default";q=1;w=3')
    assert headers[b"ratelimit"] == b'"default";r=0;t=3'
    clock.advance(1.0)
    status, headers = await run(middleware, scope())
    assert status == 429
    assert headers[b"retry-after"] == b"2"  # 1.5 s left, rounded up
    assert headers[b"ratelimit"] == b'"default";r=0;t=2'
    clock.advance(1.5)
    assert (await run(middleware, scope()))[0] == 200


async def test_key_callable_and_exemptions() -> None:
    def api_key(scope: Any) -> str | None:
        return dict(scope["headers"]).get(b"x-api-key", b"").decode() or None

    middleware = RateLimitMiddleware(
        ok_app,
        rate=1,
        burst=1,
        key=api_key,
        exempt=lambda scope: scope["path"] == "/health",
        clock=ManualClock(),
    )
    keyed = scope(headers=[(b"x-api-key", b"k1")])
    assert [(await run(middleware, keyed))[0] for _ in range(2)] == [200, 429]
    assert (await run(middleware, scope(headers=[(b"x-api-key", b"k2")])))[0] == 200
    # No key: exempt, and no quota headers.
    assert await run(middleware, scope()) == (200, {b"content-type": b"text/plain"})
    health = scope("/health", headers=[(b"x-api-key", b"k1")])
    assert (await run(middleware, health))[0] == 200


async def test_routes_only_and_list_rules() -> None:
    middleware = RateLimitMiddleware(
        ok_app,
        rate=None,
        routes=[("/calls/{sid}/status", 1, 1), ("/api/*", 1, 2)],
        clock=ManualClock(),
    )
    assert [(await run(middleware, scope("/calls/CA1/status")))[0] for _ in range(2)] == [200, 429]
    assert [(await run(middleware, scope("/api/x")))[0] for _ in range(3)] == [200, 200, 429]
    assert await run(middleware, scope("/free")) == (200, {b"content-type": b"text/plain"})
    assert set(middleware.limiters) == {"/calls/{sid}/status", "/api/*"}


async def test_all_buckets_busy_fails_closed_with_retry_after() -> None:
    middleware = RateLimitMiddleware(ok_app, rate=1, burst=1, max_keys=1, clock=ManualClock())
    assert (await run(middleware, scope(client=("192.0.2.1", 1))))[0] == 200
    status, headers = await run(middleware, scope(client=("192.0.2.2", 1)))
    assert (status, headers[b"retry-after"]) == (429, b"1")


async def test_listeners_see_grants_and_rejections() -> None:
    events: list[tuple[str, Hashable]] = []

    def listener(event: Event) -> None:
        match event:
            case TokensGranted(key=key):
                events.append(("granted", key))
            case TokensRejected(key=key):
                events.append(("rejected", key))
            case BucketEvicted(key=key):
                events.append(("evicted", key))

    middleware = RateLimitMiddleware(
        ok_app,
        rate=1,
        burst=1,
        clock=ManualClock(),
        listeners=[listener],
    )
    await run(middleware, scope())
    await run(middleware, scope())
    assert events == [("granted", "192.0.2.1"), ("rejected", "192.0.2.1")]


async def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = RateLimitMiddleware(app, rate=1, burst=1)
    for kind in ("lifespan", "websocket", "websocket"):
        await middleware({"type": kind, "path": "/", "client": ("1.1.1.1", 1)}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket", "websocket"]


async def test_tokens_available_follows_a_reference_bucket() -> None:
    clock = ManualClock()
    limiter = KeyedLimiter(3.0, 5.0, clock=clock)
    expected = 5.0
    for step in range(40):
        if await limiter.try_acquire("k"):
            expected -= 1.0
        else:
            assert expected < 1.0
        dt = (step % 7) * 0.05
        clock.advance(dt)
        expected = min(5.0, expected + 3.0 * dt)
        bucket = limiter.bucket("k")
        assert bucket is not None
        assert bucket.tokens_available() == pytest.approx(expected, abs=1e-6)
        assert bucket.statistics().tokens_available == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/a", "/a", True),
        ("/a", "/a/", True),  # one path, however spelled
        ("/a", "//a", True),
        ("/a/b", "/a//b/", True),
        ("/vapi/*", "/vapi", True),
        ("/vapi/*", "/vapi/", True),
        ("/vapi/*", "/vapi/tool-calls", True),
        ("/vapi/*", "/vapix", False),
        ("/calls/{sid}/status", "/calls/CA1/status", True),
        ("/calls/{sid}/status", "/calls/CA1/x/status", False),
        ("/calls/{sid}/status", "/calls//status", False),
        ("/items/{id:int}", "/items/3", True),
        ("/files/{rest:path}", "/files/a/b/c", True),
        ("/a.b/{x}", "/aXb/1", False),  # literal parts are escaped
    ],
)
def test_route_matcher(pattern: str, path: str, matches: bool) -> None:
    assert RouteMatcher(pattern)(path) is matches


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"rate": 0}, ValueError),
        ({"rate": "1"}, TypeError),
        ({"rate": 1, "burst": 0.5}, ValueError),
        ({"rate": None}, ValueError),
        ({"rate": 1, "key": "ip"}, TypeError),
        ({"rate": 1, "trusted_proxies": ["*"]}, ValueError),
        ({"rate": 1, "trusted_proxies": ["not-an-ip"]}, ValueError),
        ({"rate": 1, "trusted_proxies": ["10.0.0.1"], "key": lambda s: "x"}, ValueError),
        ({"rate": 1, "routes": {"nope": 1}}, ValueError),
        ({"rate": 1, "routes": {"/a/{b": 1}}, ValueError),
        ({"rate": 1, "routes": {"/a": "fast"}}, TypeError),
        ({"rate": 1, "routes": [("/a", 1)]}, TypeError),
        ({"rate": 1, "exempt": "/vapi/*"}, TypeError),
        ({"rate": 1, "policy_name": 'a"b'}, ValueError),
        ({"rate": 1, "forwarded_hops": 0}, ValueError),
        ({"rate": 1, "forwarded_hops": 1.5}, TypeError),
        ({"rate": 1, "max_keys": 0}, ValueError),
    ],
)
def test_configuration_is_validated(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RateLimitMiddleware(ok_app, **options)


def test_repr_and_route_shorthand() -> None:
    middleware = RateLimitMiddleware(ok_app, rate=2, routes={"/x": 5}, policy_name="per-ip")
    assert "rate=2.0" in repr(middleware)
    assert middleware.limiters["/x"] is not middleware.limiters["*"]


async def test_custom_policy_name_in_both_fields() -> None:
    middleware = RateLimitMiddleware(ok_app, rate=2, burst=4, policy_name="per-ip")
    _, headers = await run(middleware, scope())
    assert headers[b"ratelimit-policy"] == b'"per-ip";q=4;w=2'
    assert headers[b"ratelimit"] == b'"per-ip";r=3;t=1'


def test_recommended_stack_builds_on_every_framework() -> None:
    for framework in FRAMEWORKS:
        assert build(framework, recommended_stack, rate=1) is not None


_HOP = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["10.0.0.1", "10.0.0.7", "unknown", "", " ", "1.2.3.4:80", "[::1]"]),
    st.text(alphabet="0123456789abcdef.:, \t-x", max_size=50),
)


@settings(max_examples=150, deadline=None)
@given(hops=st.lists(_HOP, max_size=40), repeated=st.booleans())
async def test_any_forwarded_for_yields_the_peer_or_an_address_from_the_header(
    hops: list[str], repeated: bool
) -> None:
    middleware = RateLimitMiddleware(
        ok_app, rate=1000, burst=1000, trusted_proxies=["10.0.0.1", "10.0.0.0/24"]
    )
    values = [hop.encode() for hop in hops] if repeated else [", ".join(hops).encode()]
    headers = [(b"x-forwarded-for", value) for value in values]
    status, _ = await run(middleware, scope(client=("10.0.0.1", 1), headers=headers))
    assert status == 200
    limiter = middleware.limiters["*"]
    entries = [part for value in values for part in value.decode().split(",")]
    assert len(limiter) == 1
    assert any(limiter.bucket(key) is not None for key in {"10.0.0.1", *map(_norm, entries)})
    if entries and _is_untrusted_address(_norm(entries[-1])):
        assert limiter.bucket(_norm(entries[-1])) is not None  # what the trusted proxy saw


def _is_untrusted_address(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.split("/", maxsplit=1)[0])
    except ValueError:
        return False
    return address not in ipaddress.ip_network("10.0.0.0/24")


def _norm(text: str) -> str:
    """The bucket key of an address: IPv4 as is, IPv4-mapped as IPv4, other IPv6 by /64."""
    try:
        address = ipaddress.ip_address(text.strip(" \t"))
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


async def test_quota_headers_replace_any_the_app_set_and_appear_once() -> None:
    async def app_sets_its_own(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"RateLimit", b"app"), (b"x-kept", b"1")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    inner = RateLimitMiddleware(app_sets_its_own, rate=10.0, burst=10)
    outer = RateLimitMiddleware(inner, rate=5.0, burst=5)  # a global and a per-route limit
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await outer(scope(client=("192.0.2.1", 1)), receive, send)
    names = [name.lower() for name, _ in sent[0]["headers"]]
    assert names.count(b"ratelimit") == 1
    assert names.count(b"ratelimit-policy") == 1
    assert b"x-kept" in names
    assert dict(sent[0]["headers"])[b"ratelimit"].startswith(b'"default";r=4;')
