"""Per-request overhead of our ASGI middleware against the usual third-party stack.

Run: ``python benchmarks/asgi.py [--requests N] [--repeat R]``. Prints a markdown table.

Everything runs in-process on asyncio: each app is called directly with a prebuilt scope (copied
per request, since frameworks write into it), a ``receive`` that returns an empty body and a
``send`` that drops the messages. No server and no socket, so the figures are the middleware's
own cost. Each configuration is timed ``R`` times, interleaved with the others so that noise from
other processes hits them all alike; the best time is kept. Overheads are relative to the bare
Starlette app, whose own time is in the first row.

Compared (each alone, then stacked):

- ours: ``CorrelationIdMiddleware``, ``RateLimitMiddleware`` (a limit never reached),
  ``MetricsMiddleware`` (on a private registry);
- the Twilio webhook guard against hostile forms: what one forged 256 KiB form costs the event
  loop before its refusal (``--only guards`` runs this part alone);
- theirs: asgi-correlation-id, slowapi (its pure ASGI ``SlowAPIASGIMiddleware``, with a default
  limit never reached; the older ``SlowAPIMiddleware`` is built on ``BaseHTTPMiddleware`` and
  costs about ten times more), starlette-exporter's ``PrometheusMiddleware``, and
  prometheus-fastapi-instrumentator.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from resilient_voice.asgi import CorrelationIdMiddleware, MetricsMiddleware

try:
    from resilient_voice.asgi import RateLimitMiddleware
except ImportError:  # the limiter is not merged yet
    RateLimitMiddleware = None

App = Callable[..., Any]

# The package each competitor needs, by the name the rows use. A configuration whose package is
# not installed is skipped with a note, never a crash: ``pip install -e '.[bench]'`` brings them
# all.
COMPETITORS = {
    "asgi-correlation-id": "asgi_correlation_id",
    "slowapi": "slowapi",
    "starlette-exporter": "starlette_exporter",
    "instrumentator": "prometheus_fastapi_instrumentator",
    "twilio": "twilio",
}
SKIPPED: set[str] = set()


def installed(part: str) -> bool:
    """Whether a configuration part can run; records a missing competitor for the final note."""
    module = COMPETITORS.get(part)
    if module is None or importlib.util.find_spec(module) is not None:
        return True
    SKIPPED.add(module)
    return False


def print_skipped() -> None:
    if SKIPPED:
        print(
            f"Skipped, not installed: {', '.join(sorted(SKIPPED))} "
            "(pip install -e '.[bench]' installs every competitor).\n"
        )
        SKIPPED.clear()


VALID_ID = b"0123456789abcdef0123456789abcdef"


async def endpoint(request: Request) -> Response:
    return PlainTextResponse("ok")


def starlette(middleware: list[Middleware]) -> Starlette:
    return Starlette(routes=[Route("/items/{item_id}", endpoint)], middleware=middleware)


def ours_correlation() -> list[Middleware]:
    return [Middleware(CorrelationIdMiddleware)]


def ours_ratelimit() -> list[Middleware]:
    return [Middleware(RateLimitMiddleware, rate=1e9, burst=1e9)]


def ours_metrics() -> list[Middleware]:
    return [Middleware(MetricsMiddleware, registry=CollectorRegistry())]


def theirs_correlation() -> list[Middleware]:
    from asgi_correlation_id import CorrelationIdMiddleware as Theirs

    return [Middleware(Theirs)]


def theirs_slowapi(app: Starlette) -> list[Middleware]:
    from slowapi import Limiter
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address

    app.state.limiter = Limiter(key_func=get_remote_address, default_limits=["1000000000/second"])
    return [Middleware(SlowAPIASGIMiddleware)]


def theirs_exporter() -> list[Middleware]:
    from starlette_exporter import PrometheusMiddleware

    return [Middleware(PrometheusMiddleware, prefix="bench_exporter")]


def instrumented(app: Starlette) -> Starlette:
    from prometheus_fastapi_instrumentator import Instrumentator

    Instrumentator(registry=CollectorRegistry()).instrument(app)
    return app


def build(parts: list[str]) -> Starlette:
    """A Starlette app with the named middleware, outermost first."""
    app = starlette([])
    middleware: list[Middleware] = []
    for part in parts:
        if part == "ours:correlation":
            middleware += ours_correlation()
        elif part == "ours:ratelimit":
            middleware += ours_ratelimit()
        elif part == "ours:metrics":
            middleware += ours_metrics()
        elif part == "asgi-correlation-id":
            middleware += theirs_correlation()
        elif part == "slowapi":
            middleware += theirs_slowapi(app)
        elif part == "starlette-exporter":
            middleware += theirs_exporter()
        elif part != "instrumentator":
            raise ValueError(part)
    app.user_middleware = middleware
    if "instrumentator" in parts:
        instrumented(app)
    return app


def scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/items/42",
        "raw_path": b"/items/42",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"user-agent", b"bench"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    return None


async def timed(app: App, base: dict[str, Any], requests: int) -> float:
    gc.collect()
    gc.disable()  # a collection landing in one configuration's window is noise
    try:
        start = time.perf_counter()
        for _ in range(requests):
            await app({**base, "headers": list(base["headers"]), "state": {}}, receive, send)
        return (time.perf_counter() - start) / requests
    finally:
        gc.enable()


async def minimal_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
    await send({"type": "http.response.body", "body": b"ok"})


class SendWrapper:
    """The floor: a pure ASGI middleware that wraps ``send`` and sets a ContextVar, nothing else."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def wrapped(message: Any) -> None:
            await send(message)

        token = _FLOOR.set("x")
        try:
            await self.app(scope, receive, wrapped)
        finally:
            _FLOOR.reset(token)


_FLOOR: ContextVar[str] = ContextVar("floor")


async def direct(requests: int, repeat: int) -> None:
    """Middleware alone around a minimal ASGI app: the figures the targets refer to."""
    with_id = scope([(b"x-correlation-id", VALID_ID), (b"x-request-id", VALID_ID)])
    without_id = scope([])
    rows: list[tuple[str, App, dict[str, Any]]] = [
        ("minimal ASGI app", minimal_app, with_id),
        ("floor: wraps send, sets a ContextVar", SendWrapper(minimal_app), with_id),
        (
            "ours: CorrelationIdMiddleware, valid incoming id",
            CorrelationIdMiddleware(minimal_app),
            with_id,
        ),
        (
            "ours: CorrelationIdMiddleware, generating",
            CorrelationIdMiddleware(minimal_app),
            without_id,
        ),
    ]
    if installed("asgi-correlation-id"):
        from asgi_correlation_id import CorrelationIdMiddleware as Theirs

        rows += [
            ("asgi-correlation-id, valid incoming id", Theirs(minimal_app), with_id),
            ("asgi-correlation-id, generating", Theirs(minimal_app), without_id),
        ]
    if RateLimitMiddleware is not None:
        limited = RateLimitMiddleware(minimal_app, rate=1e9, burst=1e9)
        rows.append(("ours: RateLimitMiddleware", limited, with_id))
    best = [float("inf")] * len(rows)
    for _ in range(repeat):
        for i, (_, app, base) in enumerate(rows):
            best[i] = min(best[i], await timed(app, base, requests))
    bare = best[0]
    print("Middleware alone, around a minimal ASGI app:\n")
    print("| Configuration | µs per request | Overhead (µs) |")
    print("|---|---:|---:|")
    for (label, _, _), seconds in zip(rows, best, strict=True):
        extra = "-" if seconds is bare else f"{(seconds - bare) * 1e6:.2f}"
        print(f"| {label} | {seconds * 1e6:.2f} | {extra} |")
    print()


def _form(fields: int, value_size: int) -> bytes:
    return "&".join(f"F{i}={'v' * value_size}" for i in range(fields)).encode()


async def webhook_guard(repeat: int) -> None:
    """CPU spent on forged Twilio forms before the 403/413: the work an attacker can buy."""
    if not installed("twilio"):  # the guard checks signatures with the twilio package
        print_skipped()
        return
    from resilient_voice.asgi import TwilioSignatureMiddleware

    token = "12345678901234567890123456789012"
    forged = (b"x-twilio-signature", b"A" * 27 + b"=")  # well-formed, wrong
    big = _form(26_000, 1)
    big = big + b"&P=" + b"v" * (256 * 1024 - len(big) - 3)  # 256 KiB, ~26 000 fields
    near_cap = _form(100, 640)  # 100 fields, about 64 KiB
    genuine_size = _form(15, 20)  # the size of a real status callback

    def request(body: bytes) -> tuple[dict[str, Any], Any]:
        base = scope(
            [
                forged,
                (b"content-type", b"application/x-www-form-urlencoded"),
                (b"content-length", str(len(body)).encode()),
                (b"host", b"voice.example.com"),
            ]
        )
        base["method"] = "POST"

        async def receive_body() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        return base, receive_body

    roomy = TwilioSignatureMiddleware(minimal_app, token, max_body=256 * 1024)
    default = TwilioSignatureMiddleware(minimal_app, token)
    rows = [
        ("forged 256 KiB form, max_body=256 KiB", roomy, *request(big)),
        ("forged 256 KiB form, defaults", default, *request(big)),
        ("forged 64 KiB form of 100 fields, defaults", default, *request(near_cap)),
        ("forged 15-field form (a real callback's size)", default, *request(genuine_size)),
    ]
    best = [float("inf")] * len(rows)
    for _ in range(repeat):
        for i, (_, app, base, receive_body) in enumerate(rows):
            gc.collect()
            start = time.perf_counter()
            for _ in range(5):
                await app({**base, "headers": list(base["headers"])}, receive_body, send)
            best[i] = min(best[i], (time.perf_counter() - start) / 5)
    print("TwilioSignatureMiddleware, event-loop time per forged request before its refusal:\n")
    print("| Request | ms per request |")
    print("|---|---:|")
    for (label, *_), seconds in zip(rows, best, strict=True):
        print(f"| {label} | {seconds * 1e3:.3f} |")
    print()


async def main(requests: int, repeat: int) -> None:
    print(f"Python {sys.version.split()[0]}, best of {repeat} x {requests} requests\n")
    await direct(requests * 5, repeat)
    with_id = scope([(b"x-correlation-id", VALID_ID), (b"x-request-id", VALID_ID)])
    without_id = scope([])
    rate_limit = ["ours:ratelimit"] if RateLimitMiddleware is not None else []
    ours_stack = ["ours:metrics", "ours:correlation", *rate_limit]
    theirs_stack = ["starlette-exporter", "asgi-correlation-id", "slowapi"]
    rows: list[tuple[str, list[str], dict[str, Any]]] = [
        ("bare Starlette", [], with_id),
        ("ours: CorrelationIdMiddleware, valid incoming id", ["ours:correlation"], with_id),
        ("ours: CorrelationIdMiddleware, generating", ["ours:correlation"], without_id),
    ]
    if rate_limit:
        rows.append(("ours: RateLimitMiddleware", rate_limit, with_id))
    rows += [
        ("ours: MetricsMiddleware", ["ours:metrics"], with_id),
        ("ours: stack (" + " + ".join(p[5:] for p in ours_stack) + ")", ours_stack, with_id),
        ("asgi-correlation-id, valid incoming id", ["asgi-correlation-id"], with_id),
        ("asgi-correlation-id, generating", ["asgi-correlation-id"], without_id),
        ("slowapi", ["slowapi"], with_id),
        ("starlette-exporter", ["starlette-exporter"], with_id),
        ("prometheus-fastapi-instrumentator", ["instrumentator"], with_id),
        ("theirs: stack (" + " + ".join(theirs_stack) + ")", theirs_stack, with_id),
        (
            "theirs: stack + prometheus-fastapi-instrumentator",
            [*theirs_stack, "instrumentator"],
            with_id,
        ),
    ]
    # A configuration runs only when every part is installed (a stack missing one of its parts
    # would not be the stack it claims to be).
    rows = [row for row in rows if all(installed(part) for part in row[1])]
    apps = [build(parts) for _, parts, _ in rows]
    for app, (_, _, base) in zip(apps, rows, strict=True):
        await timed(app, base, 200)  # build the middleware stack, warm caches
    best = [float("inf")] * len(rows)
    for _ in range(repeat):
        for i, (app, (_, _, base)) in enumerate(zip(apps, rows, strict=True)):
            best[i] = min(best[i], await timed(app, base, requests))
    bare = best[0]
    ours_total = theirs_total = 0.0
    print("In a Starlette app (one route), alone and stacked; ratios to the bare app:\n")
    print("| Configuration | µs per request | Overhead over bare (µs) | Ratio to bare |")
    print("|---|---:|---:|---:|")
    for (label, parts, _), seconds in zip(rows, best, strict=True):
        overhead = (seconds - bare) * 1e6
        if parts == ours_stack:
            ours_total = overhead
        if parts == theirs_stack:
            theirs_total = overhead
        extra = "-" if not parts else f"{overhead:.2f}"
        print(f"| {label} | {seconds * 1e6:.2f} | {extra} | {seconds / bare:.2f} |")
    print()
    if theirs_total:
        print(
            f"Our stack adds {ours_total:.2f} µs, theirs {theirs_total:.2f} µs: "
            f"{ours_total / theirs_total:.3f} of theirs (target: at most 0.2)."
        )
    print_skipped()
    if not rate_limit:
        print("RateLimitMiddleware is not available yet: not benchmarked.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=31)
    parser.add_argument("--only", choices=["guards"], default=None)
    arguments = parser.parse_args()
    if arguments.only == "guards":
        asyncio.run(webhook_guard(arguments.repeat))
    else:
        asyncio.run(main(arguments.requests, arguments.repeat))
        asyncio.run(webhook_guard(arguments.repeat))
