"""TrustedProxies and URL reconstruction, on scopes shaped like the ones real servers build.

The deployment matrix under a real uvicorn is in test_asgi_deployments.py; here each rule is
checked on its own, including scope shapes from servers not run in-process (hypercorn leaves
``root_path`` out of ``path``/``raw_path``; uvicorn puts it in).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from resilient_voice.asgi import (
    RateLimitMiddleware,
    TrustedProxies,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.testing import ManualClock

TOKEN = "12345678901234567890123456789012"


def sign(url: str) -> bytes:
    return str(RequestValidator(TOKEN).compute_signature(url, {})).encode()


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def call(middleware: Any, **overrides: Any) -> int:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/hook/status",
        "raw_path": b"/hook/status",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("10.0.0.2", 40000),
        "server": ("10.0.0.9", 8000),
    }
    scope.update(overrides)
    status = 0

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await middleware(scope, receive, send)
    return status


def twilio(**options: Any) -> TwilioSignatureMiddleware:
    # Every path guarded: path matching under a root path is tested with the path matchers.
    return TwilioSignatureMiddleware(ok_app, TOKEN, **options)


def signed(url: str, *headers: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"10.0.0.9:8000"), *headers, (b"x-twilio-signature", sign(url))]


# Configuration: one rule, refused the same way by every middleware.

REFUSED = [["*"], "*", ["0.0.0.0/0"], ["::/0"], ["10.0.0.1/8"], ["2001:db8::1/64"], ["nope"]]


@pytest.mark.parametrize("networks", REFUSED, ids=str)
def test_trust_everyone_and_host_bits_are_refused_everywhere(networks: Any) -> None:
    builders = (
        lambda: twilio(trusted_proxies=networks),
        lambda: VapiWebhookMiddleware(ok_app, secret="s", trusted_proxies=networks),
        lambda: RateLimitMiddleware(ok_app, rate=1, trusted_proxies=networks),
    )
    for build in builders:
        with pytest.raises(ValueError, match="trusted"):
            build()


def test_refusals_explain_themselves() -> None:
    with pytest.raises(ValueError, match=r"host bits set: write the network address \(10.0.0.0/8"):
        TrustedProxies(["10.0.0.1/8"])
    with pytest.raises(ValueError, match="contains every address"):
        TrustedProxies(["0.0.0.0/0"])
    with pytest.raises(ValueError, match="server_applied=True"):
        TrustedProxies(["*"])
    with pytest.raises(ValueError, match="forwarded-allow-ips"):
        TrustedProxies(["10.0.0.0/8"], server_applied=True)
    with pytest.raises(TypeError):
        TrustedProxies("10.0.0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TrustedProxies([10])  # type: ignore[list-item]


def test_the_object_and_its_shorthand_agree() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "::1"])
    assert proxies.networks == ("10.0.0.0/8", "192.0.2.7", "::1")
    expected = "TrustedProxies(['10.0.0.0/8', '192.0.2.7', '::1'], server_applied=False)"
    assert repr(proxies) == expected
    assert proxies == TrustedProxies(["192.0.2.7", "10.0.0.0/8", "::1"])
    assert hash(TrustedProxies(["10.0.0.0/8", "192.168.0.0/16"])) == hash(
        TrustedProxies(["192.168.0.0/16", "10.0.0.0/8"])
    )
    assert TrustedProxies(server_applied=True).server_applied
    assert TrustedProxies(server_applied=True) != TrustedProxies()
    assert TrustedProxies.__module__ == "resilient_voice.asgi"


# Issue 12, problem 1: the server rewrote scope["client"] before the middleware ran.


async def test_a_client_rewritten_by_the_server_on_loopback_still_counts_as_the_local_proxy() -> (
    None
):
    # What uvicorn (proxy_headers on by default, 127.0.0.1 trusted) hands the app when nginx on
    # the same host forwards a Twilio webhook: the client is already Twilio's address.
    public = "https://voice.example.com/hook/status"
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"x-forwarded-for", b"54.172.60.1"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"voice.example.com"),
        (b"x-twilio-signature", sign(public)),
    ]
    rewritten = {"client": ("54.172.60.1", 0), "server": ("127.0.0.1", 8000), "scheme": "https"}
    assert await call(twilio(trusted_proxies=["127.0.0.1"]), headers=headers, **rewritten) == 200
    # Trusting another network does not make a local peer trusted.
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=headers, **rewritten) == 403
    # A rewritten client that names a trusted network is not the peer either.
    spoofed = rewritten | {"client": ("10.0.0.2", 0)}
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=headers, **spoofed) == 403


async def test_server_applied_reads_no_forwarded_header() -> None:
    middleware = twilio(trusted_proxies=TrustedProxies(server_applied=True))
    public = "https://10.0.0.9:8000/hook/status"
    # The server set the scheme from X-Forwarded-Proto; the host comes from Host.
    assert await call(middleware, scheme="https", headers=signed(public)) == 200
    forged = signed(
        "https://evil.example.com/hook/status",
        (b"x-forwarded-host", b"evil.example.com"),
        (b"forwarded", b"host=evil.example.com"),
    )
    assert await call(middleware, scheme="https", headers=forged) == 403


# Issue 20, item 8: the value the trusted proxy appended, never the client's own line.

LAST_HOP = {
    "x-forwarded-host lines": [
        (b"x-forwarded-host", b"evil.example.com"),
        (b"x-forwarded-host", b"voice.example.com"),
    ],
    "x-forwarded-host list": [(b"x-forwarded-host", b"evil.example.com, voice.example.com")],
    "x-forwarded-proto lines": [
        (b"x-forwarded-host", b"voice.example.com"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-proto", b"https"),
    ],
    "x-forwarded-port lines": [
        (b"x-forwarded-host", b"voice.example.com"),
        (b"x-forwarded-port", b"8443"),
        (b"x-forwarded-port", b"443"),
    ],
    "forwarded elements": [(b"forwarded", b'host=evil.example.com, host="voice.example.com"')],
    "forwarded lines": [
        (b"forwarded", b"host=evil.example.com;proto=http"),
        (b"forwarded", b'for="[2001:db8::7]:4711";proto=https;host=voice.example.com'),
    ],
}


@pytest.mark.parametrize("forwarded", LAST_HOP.values(), ids=LAST_HOP.keys())
async def test_the_trusted_proxys_value_wins_over_the_clients(
    forwarded: list[tuple[bytes, bytes]],
) -> None:
    public = "https://voice.example.com/hook/status"
    has_proto = any(n == b"x-forwarded-proto" or b"proto=" in v for n, v in forwarded)
    extra = [] if has_proto else [(b"x-forwarded-proto", b"https")]
    headers = signed(public, *forwarded, *extra)
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=headers) == 200
    # The client's own value, signed, is refused.
    evil = signed(public.replace("voice", "evil"), *forwarded, *extra)
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=evil) == 403


@pytest.mark.parametrize(
    "value",
    [
        b'host="voice.example.com";proto=https',
        b'For="[2001:db8:cafe::17]:4711";Proto=HTTPS;Host=voice.example.com',
        b"for=192.0.2.60;proto=http, for=10.0.0.5;proto=https;host=voice.example.com",
        b'for=unknown, for="_hidden";host=voice.example.com;proto=https',
    ],
)
async def test_forwarded_header_rfc_7239(value: bytes) -> None:
    public = "https://voice.example.com/hook/status"
    headers = signed(public, (b"forwarded", value))
    if b"proto" not in value.lower():
        headers.append((b"x-forwarded-proto", b"https"))
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=headers) == 200
    # The same header from an untrusted peer is ignored.
    untrusted = {"client": ("192.0.2.1", 1)}
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=headers, **untrusted) == 403


@pytest.mark.parametrize(
    "value",
    [
        b'host="voice.example.com',  # unterminated quote
        b"host=voice.example.com;host=evil.example.com",  # a parameter twice
        b"host voice.example.com",
        b"host=a b",
    ],
)
async def test_malformed_forwarded_fails_closed(value: bytes) -> None:
    public = "https://voice.example.com/hook/status"
    headers = signed(public, (b"forwarded", value), (b"x-forwarded-proto", b"https"))
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=headers) == 403


async def test_forwarded_and_x_forwarded_disagreeing_fail_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    public = "https://voice.example.com/hook/status"
    agreeing = signed(
        public,
        (b"x-forwarded-host", b"voice.example.com"),
        (b"forwarded", b"host=VOICE.example.com;proto=https"),
    )
    assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=agreeing) == 200
    # The proxy wrote X-Forwarded-Host; the client added Forwarded: nothing says which is which.
    disagreeing = signed(
        "https://evil.example.com/hook/status",
        (b"x-forwarded-host", b"voice.example.com"),
        (b"x-forwarded-proto", b"https"),
        (b"forwarded", b"host=evil.example.com"),
    )
    with caplog.at_level(logging.DEBUG, logger="resilient_voice.asgi"):
        assert await call(twilio(trusted_proxies=["10.0.0.0/8"]), headers=disagreeing) == 403
    assert any("disagrees" in r.getMessage() for r in caplog.records)


# Issue 12, problem 2: root_path counted once, whichever way the server fills raw_path.

ROOTED = {
    # uvicorn >= 0.26 (0.54 checked): path and raw_path start with root_path.
    "uvicorn": {"path": "/hooks/hook/status", "raw_path": b"/hooks/hook/status"},
    # hypercorn 0.18: path and raw_path leave root_path out.
    "hypercorn": {"path": "/hook/status", "raw_path": b"/hook/status"},
    # no raw_path at all (optional in the ASGI spec)
    "no raw_path": {"path": "/hooks/hook/status", "raw_path": None},
}


@pytest.mark.parametrize("shape", ROOTED.values(), ids=ROOTED.keys())
@pytest.mark.parametrize(
    "options",
    [
        {"public_base_url": "https://example.com/hooks"},
        {"public_base_url": "https://example.com/hooks/"},
        {"public_base_url": "https://example.com"},
        {"trusted_proxies": ["10.0.0.0/8"]},
    ],
    ids=["base with prefix", "base with prefix and slash", "base without prefix", "forwarded"],
)
async def test_root_path_is_counted_once(shape: dict[str, Any], options: dict[str, Any]) -> None:
    public = "https://example.com/hooks/hook/status?a=1&a=2"
    headers = signed(
        public, (b"x-forwarded-host", b"example.com"), (b"x-forwarded-proto", b"https")
    )
    scope = {"root_path": "/hooks", "query_string": b"a=1&a=2", "headers": headers, **shape}
    assert await call(twilio(**options), **scope) == 200
    doubled = signed(public.replace("/hooks/", "/hooks/hooks/"))
    assert await call(twilio(**options), **(scope | {"headers": doubled})) == 403


async def test_base_with_an_outer_prefix_gets_the_root_path_appended() -> None:
    public = "https://example.com/api/hooks/hook/status"
    scope = {"root_path": "/hooks", "path": "/hooks/hook/status", "raw_path": b"/hooks/hook/status"}
    middleware = twilio(public_base_url="https://example.com/api")
    assert await call(middleware, headers=signed(public), **scope) == 200


async def test_a_stripped_prefix_without_root_path_comes_from_the_base() -> None:
    public = "https://example.com/hooks/hook/status"
    middleware = twilio(public_base_url="https://example.com/hooks")
    assert await call(middleware, headers=signed(public)) == 200


async def test_mismatch_logs_the_url_checked_at_debug_and_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signature = sign("https://other.example.com/hook/status")
    headers = [(b"host", b"10.0.0.9:8000"), (b"x-twilio-signature", signature)]
    with caplog.at_level(logging.DEBUG, logger="resilient_voice.asgi"):
        assert await call(twilio(), headers=headers, query_string=b"x=1") == 403
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 1
    assert "http://10.0.0.9:8000/hook/status?x=1" in debug[0]
    assert "docs/deployment.md" in debug[0]
    text = caplog.text
    assert TOKEN not in text
    assert signature.decode() not in text


# Issue 20, item 6: IPv6 clients keyed by network; IPv4-mapped addresses are IPv4.


async def test_one_ipv6_host_cannot_rotate_addresses_past_a_burst_of_one() -> None:
    middleware = RateLimitMiddleware(ok_app, rate=1, burst=1, clock=ManualClock())
    statuses = [
        await call(middleware, client=(f"2001:db8:1:2:{i >> 16:x}:{i & 0xFFFF:x}::9", 1))
        for i in range(1000)
    ]
    assert statuses.count(200) == 1
    assert statuses.count(429) == 999
    # The next /64 is another client.
    assert await call(middleware, client=("2001:db8:1:3::1", 1)) == 200
    limiter = middleware.limiters["*"]
    assert len(limiter) == 2
    assert limiter.bucket("2001:db8:1:2::/64") is not None
    assert limiter.bucket("2001:db8:1:3::/64") is not None


async def test_rotation_through_a_trusted_proxy_is_keyed_the_same() -> None:
    middleware = RateLimitMiddleware(
        ok_app, rate=1, burst=1, clock=ManualClock(), trusted_proxies=["10.0.0.0/8"]
    )
    statuses = []
    for i in range(1000):
        forwarded = [(b"x-forwarded-for", f"2001:db8:1:2::{i:x}".encode())]
        statuses.append(await call(middleware, headers=forwarded))
    assert statuses.count(200) == 1


async def test_ipv4_mapped_addresses_share_the_ipv4_bucket() -> None:
    middleware = RateLimitMiddleware(ok_app, rate=1, burst=1, clock=ManualClock())
    assert await call(middleware, client=("192.0.2.7", 1)) == 200
    assert await call(middleware, client=("::ffff:192.0.2.7", 1)) == 429
    assert await call(middleware, client=("::ffff:c000:208", 1)) == 200  # 192.0.2.8


async def test_ipv6_prefix_is_configurable() -> None:
    per_address = RateLimitMiddleware(ok_app, rate=1, burst=1, clock=ManualClock(), ipv6_prefix=128)
    assert await call(per_address, client=("2001:db8::1", 1)) == 200
    assert await call(per_address, client=("2001:db8::2", 1)) == 200
    wide = RateLimitMiddleware(ok_app, rate=1, burst=1, clock=ManualClock(), ipv6_prefix=48)
    assert await call(wide, client=("2001:db8:0:1::1", 1)) == 200
    assert await call(wide, client=("2001:db8:0:2::1", 1)) == 429
    for bad, error in ((0, ValueError), (129, ValueError), (64.0, TypeError), (True, TypeError)):
        with pytest.raises(error):
            RateLimitMiddleware(ok_app, rate=1, ipv6_prefix=bad)


# The rate limiter's client behind proxies.


async def test_limiter_key_is_the_real_client_never_a_forged_address() -> None:
    middleware = RateLimitMiddleware(
        ok_app, rate=1, burst=1, clock=ManualClock(), trusted_proxies=["127.0.0.1"]
    )
    limiter = middleware.limiters["*"]
    # uvicorn rewrote the client from X-Forwarded-For; the peer was the local proxy.
    local = {"server": ("127.0.0.1", 8000), "client": ("198.51.100.7", 0)}
    xff = [(b"x-forwarded-for", b"6.6.6.6, 198.51.100.7")]
    assert await call(middleware, headers=xff, **local) == 200
    assert limiter.bucket("198.51.100.7") is not None
    # Forwarded for= works too, IPv6 in brackets with a port.
    rfc = [(b"forwarded", b'for=6.6.6.6, for="[2001:db8::5]:999"')]
    assert await call(middleware, headers=rfc, **local) == 200
    assert limiter.bucket("2001:db8::/64") is not None
    # A direct client's forged headers are ignored.
    direct = {"client": ("203.0.113.5", 1)}
    assert await call(middleware, headers=xff + rfc, **direct) == 200
    assert limiter.bucket("203.0.113.5") is not None
    # Both headers from a trusted peer disagreeing on the nearest hop: keyed by the peer.
    both = [(b"x-forwarded-for", b"198.51.100.9"), (b"forwarded", b"for=192.0.2.99")]
    peer = {"client": ("127.0.0.1", 5), "server": ("127.0.0.1", 1)}
    assert await call(middleware, headers=both, **peer) == 200
    assert limiter.bucket("127.0.0.1") is not None
    assert limiter.bucket("192.0.2.99") is None


async def test_limiter_with_server_applied_keys_by_the_scope_client() -> None:
    middleware = RateLimitMiddleware(
        ok_app,
        rate=1,
        burst=1,
        clock=ManualClock(),
        trusted_proxies=TrustedProxies(server_applied=True),
    )
    xff = [(b"x-forwarded-for", b"6.6.6.6")]
    assert await call(middleware, headers=xff, client=("198.51.100.7", 0)) == 200
    assert middleware.limiters["*"].bucket("198.51.100.7") is not None
    assert middleware.limiters["*"].bucket("6.6.6.6") is None


async def test_ipv6_loopback_server_and_ipv6_server_address() -> None:
    public = "https://voice.example.com/hook/status"
    headers = [
        (b"host", b"[::1]:8000"),
        (b"x-forwarded-for", b"2001:db8::7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"voice.example.com"),
        (b"x-twilio-signature", sign(public)),
    ]
    rewritten = {"client": ("2001:db8::7", 0), "server": ("::1", 8000)}
    assert await call(twilio(trusted_proxies=["::1"]), headers=headers, **rewritten) == 200
    assert await call(twilio(trusted_proxies=["127.0.0.1"]), headers=headers, **rewritten) == 403
    # No Host header: the server's IPv6 address, in brackets.
    bare = [(b"x-twilio-signature", sign("http://[::1]:8000/hook/status"))]
    assert await call(twilio(), headers=bare, server=("::1", 8000)) == 200
