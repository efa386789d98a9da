"""The app of the inbound load soak: the full middleware stack, configured from the environment.

Served by ``uvicorn --workers 3`` (tests/soak/test_inbound_load.py). Each worker imports this
module after it started, so each builds its own Redis backend and pool. The stack is the one
docs/asgi.md recommends, outermost first: MetricsMiddleware, CorrelationIdMiddleware,
RateLimitMiddleware (keyed by ``X-Api-Key``, requests without one exempt, buckets shared in
Redis), TwilioSignatureMiddleware on ``/twilio/*``, then a Starlette app whose endpoints echo the
correlation id they saw in the ContextVar, so the load generator can tell whether a request ever
ran under another request's id.

Environment: ``RV_REDIS_URL``, ``RV_PREFIX`` (the Redis key prefix), ``RV_TOKEN`` (the Auth
Token), ``RV_BASE_URL`` (the public URL Twilio signs), ``RV_RATE`` and ``RV_BURST`` (per key);
optional: ``RV_REDIS_TIMEOUT`` (2 s) and ``RV_MIN_REPLICAS`` (the backend's ``min_replicas``, 1).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from resilient_voice.asgi import (
    CorrelationIdMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    TwilioSignatureMiddleware,
)
from resilient_voice.correlation import get_correlation_id
from resilient_voice.redis import RedisBackend

backend = RedisBackend.from_url(
    os.environ["RV_REDIS_URL"],
    prefix=os.environ["RV_PREFIX"],
    timeout=float(os.environ.get("RV_REDIS_TIMEOUT", "2.0")),
    min_replicas=int(os.environ.get("RV_MIN_REPLICAS", "1")),
)
_PID = str(os.getpid())


async def _echo(request: Request) -> Response:
    """The body is the id this request runs under: ``<pid> <id>``."""
    await request.body()
    return PlainTextResponse(f"{_PID} {get_correlation_id()}")


async def _twilio_status(request: Request) -> Response:
    form = await request.form()
    if form.get("CallStatus") != "completed":  # the replayed body reached the app intact
        return PlainTextResponse("bad form", status_code=500)
    return PlainTextResponse(f"{_PID} {get_correlation_id()}")


def _api_key(scope: Any) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return str(value.decode("latin-1"))
    return None  # no key: exempt (the unlimited part of the load)


async def _lifespan(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    async with backend:
        await send({"type": "lifespan.startup.complete"})
        await receive()
    await send({"type": "lifespan.shutdown.complete"})


_inner = Starlette(
    routes=[
        Route("/echo", _echo, methods=["GET", "POST"]),
        Route("/twilio/status", _twilio_status, methods=["POST"]),
    ]
)
_stack = MetricsMiddleware(
    CorrelationIdMiddleware(
        RateLimitMiddleware(
            TwilioSignatureMiddleware(
                _inner,
                os.environ["RV_TOKEN"],
                paths=["/twilio/*"],
                public_base_url=os.environ["RV_BASE_URL"],
            ),
            rate=float(os.environ["RV_RATE"]),
            burst=float(os.environ["RV_BURST"]),
            key=_api_key,
            store=backend,
            name="inbound-soak",
        )
    ),
    registry=CollectorRegistry(),
)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(scope, receive, send)
        return
    await _stack(scope, receive, send)
