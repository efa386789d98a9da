"""The deployment matrix of docs/deployment.md, under a real uvicorn on loopback.

Each row is one way a voice backend is deployed: the server's flags, the middleware's settings,
and the exact headers the proxy in front adds. The test client plays the proxy: it connects from
127.0.0.1 (the trusted proxy of every row that trusts one) and sends the row's headers; an
untrusted peer connects from 127.0.0.2, which neither uvicorn's default ``forwarded_allow_ips``
nor any row trusts. In every row a genuine Twilio signature (computed by the twilio package over
the public URL Twilio called) is accepted, a tampered request is refused, and a request whose
forwarded headers name another host is refused; from the untrusted peer, forwarded headers
claiming the public URL are refused too.

Every path is guarded (``paths=None``): matching guarded paths under a root path is the path
matchers' business and is tested there.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from _apps import http_client, serve_sync
from resilient_voice.asgi import (
    RateLimitMiddleware,
    TrustedProxies,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.testing import ManualClock

TOKEN = "12345678901234567890123456789012"
PAIRS = [("CallSid", "CA1234"), ("CallStatus", "completed"), ("Digits", "1"), ("Digits", "2")]
FORM = {"content-type": "application/x-www-form-urlencoded"}
TWILIO_ADDRESS = "54.172.60.1"
LOOPBACK = ["127.0.0.1", "::1"]
UNTRUSTED_PEER = "127.0.0.2"


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


# Linux routes all of 127.0.0.0/8 to loopback; macOS only 127.0.0.1 unless aliased.
pytestmark = pytest.mark.skipif(
    not _can_bind(UNTRUSTED_PEER), reason=f"needs {UNTRUSTED_PEER} on the loopback interface"
)


class Multi(dict[str, list[str]]):
    def getall(self, name: str) -> list[str]:
        return self[name]


def sign(url: str, pairs: list[tuple[str, str]] = PAIRS) -> str:
    params = Multi()
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return str(RequestValidator(TOKEN).compute_signature(url, params))


@dataclass(frozen=True)
class Row:
    """One deployment: server flags, middleware settings, the proxy's headers, Twilio's URL."""

    server: dict[str, Any]
    middleware: dict[str, Any]
    headers: dict[str, str]
    public_url: str
    path: str = "/twilio/status"
    fixed_url: bool = False  # public_base_url: no header can move the URL
    notes: str = field(default="", compare=False)


XFF = {"x-forwarded-for": TWILIO_ADDRESS}
HTTPS = {"x-forwarded-proto": "https"}
PUBLIC = "https://voice.example.com/twilio/status"
UVICORN_DEFAULT = {"proxy_headers": True}  # uvicorn's own default: --proxy-headers, 127.0.0.1
NO_PROXY_HEADERS = {"proxy_headers": False}

ROWS: dict[str, Row] = {
    "proxy keeps Host": Row(
        UVICORN_DEFAULT,
        {},
        {"host": "voice.example.com", **XFF, **HTTPS},
        PUBLIC,
        notes="uvicorn applies X-Forwarded-Proto from 127.0.0.1; Host is already public",
    ),
    "proxy keeps Host, --no-proxy-headers": Row(
        NO_PROXY_HEADERS,
        {"trusted_proxies": LOOPBACK},
        {"host": "voice.example.com", **XFF, **HTTPS},
        PUBLIC,
    ),
    "proxy rewrites Host, X-Forwarded-Host, uvicorn defaults": Row(
        UVICORN_DEFAULT,
        {"trusted_proxies": LOOPBACK},
        {"x-forwarded-host": "voice.example.com", **XFF, **HTTPS},
        PUBLIC,
        notes="issue 12 problem 1: uvicorn rewrote scope['client'] before the middleware ran",
    ),
    "proxy rewrites Host, X-Forwarded-Host, --no-proxy-headers": Row(
        NO_PROXY_HEADERS,
        {"trusted_proxies": LOOPBACK},
        {"x-forwarded-host": "voice.example.com", **XFF, **HTTPS},
        PUBLIC,
    ),
    "proxy rewrites Host, public_base_url": Row(
        UVICORN_DEFAULT,
        {"public_base_url": "https://voice.example.com"},
        {"x-forwarded-host": "voice.example.com", **XFF, **HTTPS},
        PUBLIC,
        fixed_url=True,
    ),
    "cloud load balancer, default port": Row(
        NO_PROXY_HEADERS,
        {"trusted_proxies": ["127.0.0.1"]},
        {"host": "voice.example.com", **XFF, **HTTPS, "x-forwarded-port": "443"},
        PUBLIC,
    ),
    "cloud load balancer, port 8443": Row(
        NO_PROXY_HEADERS,
        {"trusted_proxies": ["127.0.0.1"]},
        {"host": "voice.example.com", **XFF, **HTTPS, "x-forwarded-port": "8443"},
        "https://voice.example.com:8443/twilio/status",
    ),
    "ngrok, --host-header=rewrite": Row(
        UVICORN_DEFAULT,
        {"trusted_proxies": LOOPBACK},
        {"x-forwarded-host": "abcd-1234.ngrok-free.app", **XFF, **HTTPS},
        "https://abcd-1234.ngrok-free.app/twilio/status",
    ),
    "ngrok, Host kept": Row(
        UVICORN_DEFAULT,
        {"trusted_proxies": LOOPBACK},
        {"host": "abcd-1234.ngrok-free.app", "x-forwarded-host": "abcd-1234.ngrok-free.app"}
        | XFF
        | HTTPS,
        "https://abcd-1234.ngrok-free.app/twilio/status",
    ),
    "cloudflare tunnel": Row(
        UVICORN_DEFAULT,
        {"trusted_proxies": LOOPBACK},
        {
            "host": "voice.example.com",
            "cf-connecting-ip": TWILIO_ADDRESS,
            "cf-visitor": '{"scheme":"https"}',
            "cf-ray": "8c0ffee0000000-IAD",
            **XFF,
            **HTTPS,
        },
        PUBLIC,
    ),
    "Forwarded (RFC 7239)": Row(
        UVICORN_DEFAULT,
        {"trusted_proxies": LOOPBACK},
        {"forwarded": f'for="{TWILIO_ADDRESS}:4711";proto=https;host=voice.example.com'},
        PUBLIC,
    ),
    "prefix stripped, no --root-path": Row(
        UVICORN_DEFAULT,
        {"public_base_url": "https://voice.example.com/hooks"},
        {**XFF, **HTTPS},
        "https://voice.example.com/hooks/twilio/status",
        fixed_url=True,
    ),
    "prefix stripped, --root-path, base with prefix": Row(
        {"proxy_headers": True, "root_path": "/hooks"},
        {"public_base_url": "https://voice.example.com/hooks"},
        {**XFF, **HTTPS},
        "https://voice.example.com/hooks/twilio/status",
        fixed_url=True,
        notes="issue 12 problem 2: the prefix was counted twice",
    ),
    "prefix stripped, --root-path, base without prefix": Row(
        {"proxy_headers": True, "root_path": "/hooks"},
        {"public_base_url": "https://voice.example.com"},
        {**XFF, **HTTPS},
        "https://voice.example.com/hooks/twilio/status",
        fixed_url=True,
    ),
    "prefix stripped, --root-path, X-Forwarded-Host": Row(
        {"proxy_headers": True, "root_path": "/hooks"},
        {"trusted_proxies": LOOPBACK},
        {"x-forwarded-host": "voice.example.com", **XFF, **HTTPS},
        "https://voice.example.com/hooks/twilio/status",
    ),
    "server_applied=True": Row(
        {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"},
        {"trusted_proxies": TrustedProxies(server_applied=True)},
        {"host": "voice.example.com", **XFF, **HTTPS},
        PUBLIC,
    ),
}


async def ok(request: Request) -> Response:
    return PlainTextResponse((await request.body()).decode() or "ok")


def twilio_app(row: Row) -> Any:
    app = Starlette(routes=[Route("/twilio/status", ok, methods=["POST"])])
    return TwilioSignatureMiddleware(app, TOKEN, **row.middleware)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[tuple[str, str], str]]:
    with ExitStack() as stack:

        class Lazy(dict[tuple[str, str], str]):
            def __missing__(self, key: tuple[str, str]) -> str:
                kind, name = key
                row = ROWS[name]
                app = twilio_app(row) if kind == "twilio" else vapi_app(row)
                self[key] = stack.enter_context(serve_sync(app, **row.server))
                return self[key]

        yield Lazy()


async def post(
    base: str,
    row: Row,
    headers: dict[str, str] | list[tuple[str, str]],
    body: bytes,
    *,
    peer: str = "127.0.0.1",
) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=peer)
    async with http_client(transport=transport) as client:
        return await client.post(base + row.path, content=body, headers=headers)


@pytest.mark.parametrize("name", ROWS)
async def test_twilio_signatures_in_every_deployment(
    name: str, servers: dict[tuple[str, str], str]
) -> None:
    row = ROWS[name]
    base = servers["twilio", name]
    body = urlencode(PAIRS).encode()
    genuine = {**FORM, **row.headers, "x-twilio-signature": sign(row.public_url)}
    assert (await post(base, row, genuine, body)).status_code == 200, name

    tampered = urlencode([*PAIRS[:-1], ("Digits", "9")]).encode()
    assert (await post(base, row, genuine, tampered)).status_code == 403, name

    # Forwarded headers naming another host, signed by Twilio for that host: from an untrusted
    # peer they are ignored; through the trusted proxy, the client's own lines come first and
    # the proxy's appended value wins (a proxy that sends no X-Forwarded-Host or Forwarded of
    # its own must strip the client's: docs/deployment.md).
    other = row.public_url.replace("voice.example.com", "evil.example.com").replace(
        "abcd-1234.ngrok-free.app", "evil.example.com"
    )
    evil = [
        ("x-forwarded-host", "evil.example.com"),
        ("forwarded", "host=evil.example.com;proto=https"),
    ]
    signature = ("x-twilio-signature", sign(other))
    direct = [*FORM.items(), *evil, signature]
    response = await post(base, row, direct, body, peer=UNTRUSTED_PEER)
    assert (name, response.status_code) == (name, 403)
    proxy_lines = [(n, v) for n, v in evil if n in row.headers]
    if proxy_lines:
        prepended = [*FORM.items(), *proxy_lines, *row.headers.items(), signature]
        assert (await post(base, row, prepended, body)).status_code == 403, name

    if not row.fixed_url:
        # An untrusted peer claiming the public URL through forwarded headers.
        public_host = row.public_url.split("/")[2]
        claims = {
            "x-forwarded-host": public_host,
            "x-forwarded-proto": "https",
            "forwarded": f"host={public_host};proto=https",
        }
        forged = {**FORM, **claims, "x-twilio-signature": sign(row.public_url)}
        response = await post(base, row, forged, body, peer=UNTRUSTED_PEER)
        assert (name, response.status_code) == (name, 403)


async def test_an_unverifiable_setup_fails_closed_with_one_debug_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The proxy rewrites Host and the middleware was told nothing: the URL it rebuilds is the
    # upstream's own, so the genuine webhook is refused, and the DEBUG line says which URL.
    row = Row(UVICORN_DEFAULT, {}, {"x-forwarded-host": "voice.example.com", **XFF, **HTTPS}, "")
    body = urlencode(PAIRS).encode()
    signature = sign(PUBLIC)
    with (
        serve_sync(twilio_app(row), **row.server) as base,
        caplog.at_level(logging.DEBUG, logger="resilient_voice.asgi"),
    ):
        headers = {**FORM, **row.headers, "x-twilio-signature": signature}
        assert (await post(base, row, headers, body)).status_code == 403
    port = base.rsplit(":", 1)[1]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    lines = [line for line in lines if "Twilio" in line]
    assert len(lines) == 1
    # uvicorn applied X-Forwarded-Proto (https); the host is uvicorn's own address.
    assert f"https://127.0.0.1:{port}/twilio/status" in lines[0]
    assert "docs/deployment.md" in lines[0]
    assert TOKEN not in caplog.text
    assert signature not in caplog.text


# VapiWebhookMiddleware: its credentials never cover the URL, the scheme or the client.

VAPI_SECRET = "vapi-hmac-secret"
VAPI_NOW = 1_800_000_000
VAPI_ROWS = [
    "proxy rewrites Host, X-Forwarded-Host, uvicorn defaults",
    "Forwarded (RFC 7239)",
    "prefix stripped, --root-path, base with prefix",
    "server_applied=True",
]


def vapi_app(row: Row) -> Any:
    app = Starlette(routes=[Route("/twilio/status", ok, methods=["POST"])])
    proxies = row.middleware.get("trusted_proxies", ())
    return VapiWebhookMiddleware(
        app, hmac_secret=VAPI_SECRET, trusted_proxies=proxies, clock=lambda: VAPI_NOW
    )


@pytest.mark.parametrize("name", VAPI_ROWS)
async def test_vapi_credentials_verify_in_every_deployment(
    name: str, servers: dict[tuple[str, str], str]
) -> None:
    import hashlib
    import hmac

    row = ROWS[name]
    base = servers["vapi", name]
    body = b'{"message":{"type":"status-update"}}'
    stamp = str(VAPI_NOW)
    digest = hmac.new(VAPI_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
    genuine = {**row.headers, "x-timestamp": stamp, "x-signature": digest.hexdigest()}
    assert (await post(base, row, genuine, body)).status_code == 200
    assert (await post(base, row, genuine, body + b" ")).status_code == 403
    forged = {**genuine, "x-forwarded-host": "evil.example.com", "x-signature": "0" * 64}
    assert (await post(base, row, forged, body, peer=UNTRUSTED_PEER)).status_code == 403


# RateLimitMiddleware: the key is the real client behind a trusted proxy, never a forged one.

LIMITER_ROWS: dict[str, tuple[dict[str, Any], Any, dict[str, str], str]] = {
    "uvicorn defaults, X-Forwarded-For": (
        UVICORN_DEFAULT,
        LOOPBACK,
        {"x-forwarded-for": "6.6.6.6, 198.51.100.7"},
        "198.51.100.7",
    ),
    "--no-proxy-headers, X-Forwarded-For": (
        NO_PROXY_HEADERS,
        LOOPBACK,
        {"x-forwarded-for": "6.6.6.6, 198.51.100.7"},
        "198.51.100.7",
    ),
    "Forwarded": (
        NO_PROXY_HEADERS,
        LOOPBACK,
        {"forwarded": 'for=6.6.6.6, for="[2001:db8:1:2::7]:999"'},
        "2001:db8:1:2::/64",
    ),
    "server_applied=True": (
        {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"},
        TrustedProxies(server_applied=True),
        {"x-forwarded-for": "6.6.6.6, 198.51.100.7"},
        "198.51.100.7",
    ),
}


@pytest.mark.parametrize("name", LIMITER_ROWS)
async def test_rate_limit_key_in_every_deployment(name: str) -> None:
    server, proxies, headers, expected = LIMITER_ROWS[name]
    app = Starlette(routes=[Route("/twilio/status", ok, methods=["POST"])])
    limiter = RateLimitMiddleware(
        app, rate=1, burst=1, clock=ManualClock(), trusted_proxies=proxies
    )
    row = Row(server, {}, {}, "")
    with serve_sync(limiter, **server) as base:
        assert (await post(base, row, headers, b"")).status_code == 200
        assert (await post(base, row, headers, b"")).status_code == 429
        # The untrusted peer's forged headers are ignored: it is keyed by its own address.
        assert (await post(base, row, headers, b"", peer=UNTRUSTED_PEER)).status_code == 200
    buckets = limiter.limiters["*"]
    assert buckets.bucket(expected) is not None
    assert buckets.bucket(UNTRUSTED_PEER) is not None
    assert buckets.bucket("6.6.6.6") is None
    assert len(buckets) == 2


# Servers in a subprocess: uvicorn --workers 2, and hypercorn (whose scope leaves root_path out
# of path and raw_path). Real time, bounded: 20 s to start, 5 s per request.

SUBPROCESS_ROWS = {
    "uvicorn --workers 2, rewritten Host": (
        "uvicorn",
        "proxy rewrites Host, X-Forwarded-Host, uvicorn defaults",
        [],
    ),
    "uvicorn --workers 2, --root-path": (
        "uvicorn",
        "prefix stripped, --root-path, base with prefix",
        ["--root-path", "/hooks"],
    ),
    "hypercorn --workers 2, --root-path": (
        "hypercorn",
        "prefix stripped, --root-path, base with prefix",
        ["--root-path", "/hooks"],
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_ROWS)
def test_twilio_rows_in_a_server_subprocess(case: str, tmp_path: Path) -> None:
    server, name, flags = SUBPROCESS_ROWS[case]
    row = ROWS[name]
    port = _free_port()
    env = {
        **os.environ,
        "RV_DEPLOY_TOKEN": TOKEN,
        "RV_DEPLOY_OPTIONS": repr(row.middleware),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), str(Path(__file__).parents[1] / "src")]
        ),
    }
    if server == "uvicorn":
        bind = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    else:
        bind = ["--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
    command = [sys.executable, "-m", server, "_deploy_app:app", "--workers", "2", *bind, *flags]
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20.0
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                try:
                    client.get(base + "/ready")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        pytest.fail(
                            f"uvicorn did not start: {(tmp_path / 'uvicorn.log').read_text()}"
                        )
                    time.sleep(0.05)
            body = urlencode(PAIRS).encode()
            genuine = {**FORM, **row.headers, "x-twilio-signature": sign(row.public_url)}
            tampered = urlencode([*PAIRS[:-1], ("Digits", "9")]).encode()
            forged = {
                **FORM,
                "x-forwarded-host": "evil.example.com",
                "x-twilio-signature": sign("https://evil.example.com/twilio/status"),
            }
            # Fresh connections, spread over the workers by the kernel (which one is not asserted).
            for _ in range(6):
                with httpx.Client(timeout=5.0, trust_env=False) as fresh:
                    url = base + row.path
                    assert fresh.post(url, content=body, headers=genuine).status_code == 200
                    assert fresh.post(url, content=tampered, headers=genuine).status_code == 403
                    assert fresh.post(url, content=body, headers=forged).status_code == 403
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
