"""A Starlette voice backend: one shared TwilioClient, the middleware stack, verified callbacks.

The Starlette take on ``examples/fastapi_app.py``, with the same HTTP surface:

- ``create_app(settings)`` returns a ``Starlette`` app whose lifespan builds the
  ``TwilioClient`` once and hands it to the requests through the lifespan state;
- ``middleware=[...]``, outermost first: metrics, correlation id, an inbound rate limit (the
  Twilio webhooks exempted), Twilio signature verification on ``/twilio/*``;
- ``POST /calls``: 201 placed, 202 with the attempt id when the outcome is unknown (never
  retried), 503/429 with ``Retry-After`` when refused locally (an app-wide exception handler);
- ``POST /twilio/status`` records Twilio's signed status callbacks, ``GET /attempts/{id}`` reads
  them back, ``POST /twilio/voice`` serves the call's TwiML, ``GET /metrics``.

Run: ``python examples/starlette_app.py [--port 8000]`` (a fake Twilio runs in-process; no
account or network needed), then::

    curl -si -X POST localhost:8000/calls -H 'content-type: application/json' \\
        -d '{"to": "+15550100001"}'
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import REGISTRY, CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_voice import (
    CircuitBreaker,
    CircuitOpenError,
    InvalidRequestError,
    OutcomeUnknownError,
    Policy,
    RejectedError,
    RetryPolicy,
    TokenBucket,
    get_correlation_id,
)
from resilient_voice.asgi import (
    CorrelationIdMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    TwilioSignatureMiddleware,
    make_metrics_app,
)
from resilient_voice.metrics import PrometheusMetrics
from resilient_voice.twilio import TwilioClient


@dataclass(frozen=True, slots=True)
class Settings:
    """Configuration, read once at startup."""

    twilio_account_sid: str
    twilio_auth_token: str = field(repr=False)
    public_base_url: str  # where Twilio reaches this app: callback URLs and signature checks
    caller_id: str
    twilio_base_url: str = "https://api.twilio.com"
    calls_per_second: float = 1.0
    call_budget: float = 15.0  # seconds POST /calls may take, pacing included; then 429
    inbound_rate: float = 5.0
    inbound_burst: int = 20


class CallEvents:
    """The last status of each call and the call of each attempt id, from the callbacks."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.attempts: dict[str, str] = {}
        self.correlation: dict[str, str | None] = {}

    def record(self, form: Mapping[str, Any], attempt_id: str | None) -> None:
        sid, status = str(form.get("CallSid", "")), str(form.get("CallStatus", ""))
        self.status[sid] = status
        self.correlation[sid] = get_correlation_id()
        if attempt_id:
            self.attempts[attempt_id] = sid


async def place_call(request: Request) -> Response:
    twilio: TwilioClient = request.state.twilio
    settings: Settings = request.app.state.settings
    base = settings.public_base_url.rstrip("/")
    body = await request.json()
    try:
        call = await twilio.create_call(
            to=str(body.get("to", "")),
            from_=settings.caller_id,
            url=f"{base}/twilio/voice",
            status_callback=f"{base}/twilio/status",
            status_callback_event=["initiated", "ringing", "answered", "completed"],
        )
    except OutcomeUnknownError as exc:
        # Maybe ringing: never place it again from here; its callback names the attempt.
        return JSONResponse(
            {"status": "outcome_unknown", "attempt_id": exc.attempt_id}, status_code=202
        )
    except InvalidRequestError as exc:
        return JSONResponse({"error": "invalid", "field": exc.field}, status_code=422)
    payload = {"sid": call.sid, "status": str(call.status), "attempt_id": call.attempt_id}
    return JSONResponse(payload, status_code=201)


async def refused_locally(request: Request, exc: Exception) -> Response:
    """CircuitOpenError: 503; RateLimitedError: 429; both with ``Retry-After``."""
    seconds = exc.retry_after if isinstance(exc, RejectedError) else None
    status = 503 if isinstance(exc, CircuitOpenError) else 429
    headers = {"Retry-After": str(max(1, math.ceil(seconds or 0.0)))}
    return JSONResponse({"error": "refused_locally"}, status_code=status, headers=headers)


async def attempt(request: Request) -> Response:
    events: CallEvents = request.state.events
    attempt_id = request.path_params["attempt_id"]
    sid = events.attempts.get(attempt_id, "")
    return JSONResponse(
        {
            "attempt_id": attempt_id,
            "sid": sid or None,
            "status": events.status.get(sid),
            "correlation_id": events.correlation.get(sid),
        }
    )


async def twilio_status(request: Request) -> Response:
    events: CallEvents = request.state.events
    events.record(await request.form(), request.query_params.get("rv_attempt"))
    return Response(status_code=204)


async def twilio_voice(request: Request) -> Response:
    twiml = "<Response><Say>This is a reminder from resilient voice.</Say></Response>"
    return Response(twiml, media_type="application/xml")


def create_app(settings: Settings, *, registry: CollectorRegistry = REGISTRY) -> Starlette:
    """Build the app. Nothing talks to Twilio until the lifespan starts."""
    metrics = PrometheusMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # One client for the app's lifetime: one breaker per account, one pacing, one pool.
        breaker = CircuitBreaker(f"twilio:{settings.twilio_account_sid}", listeners=[metrics])
        create_call = Policy(
            breaker=breaker,
            limiter=TokenBucket(settings.calls_per_second, 1, name="twilio:calls"),
            retry=RetryPolicy(max_attempts=3, name="create_call"),
            timeout=10.0,
            total_timeout=settings.call_budget,  # a pacing slot beyond it: 429 at once
        )
        async with TwilioClient(
            settings.twilio_account_sid,
            settings.twilio_auth_token,
            base_url=settings.twilio_base_url,
            breaker=breaker,
            policies={"create_call": create_call},
            listeners=[metrics],
        ) as twilio:
            yield {"twilio": twilio, "events": CallEvents()}

    app = Starlette(
        routes=[
            Route("/calls", place_call, methods=["POST"]),
            Route("/attempts/{attempt_id}", attempt),
            Route("/twilio/status", twilio_status, methods=["POST"]),
            Route("/twilio/voice", twilio_voice, methods=["POST"]),
            Route("/metrics", make_metrics_app(registry)),
        ],
        middleware=[  # the first is the outermost
            Middleware(MetricsMiddleware, registry=registry),
            Middleware(CorrelationIdMiddleware),
            Middleware(
                RateLimitMiddleware,
                rate=settings.inbound_rate,
                burst=settings.inbound_burst,
                exempt=["/twilio/*", "/metrics"],
                listeners=[metrics],
            ),
            Middleware(
                TwilioSignatureMiddleware,
                auth_token=settings.twilio_auth_token,
                paths=["/twilio/*"],
                public_base_url=settings.public_base_url,
            ),
        ],
        exception_handlers={RejectedError: refused_locally},
        lifespan=lifespan,
    )
    app.state.settings = settings
    return app


def requests_to_try(base: str) -> str:
    """The curl lines printed at startup: what to send the running app."""
    return (
        "Try, from another terminal:\n"
        f"  curl -si -X POST {base}/calls -H 'content-type: application/json' "
        """-d '{"to": "+15550100001"}'\n"""
        f"  curl -s {base}/attempts/<attempt_id from the answer>\n"
        f"  curl -s {base}/metrics | grep resilient_voice_breaker"
    )


async def main(port: int) -> None:
    import uvicorn

    from resilient_voice.testing import FakeTelephony, serve

    sid, token = "AC" + "0" * 32, "example-auth-token"
    fake = FakeTelephony(twilio_accounts={sid: token}, call_duration=3.0, ring_duration=1.0)
    async with serve(fake) as fake_url:
        settings = Settings(
            twilio_account_sid=sid,
            twilio_auth_token=token,
            public_base_url=f"http://127.0.0.1:{port}",
            caller_id="+15005550006",
            twilio_base_url=fake_url,
        )
        print(f"fake Twilio at {fake_url}; the app at {settings.public_base_url}")
        print(requests_to_try(settings.public_base_url), flush=True)
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port)
        await uvicorn.Server(config).serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    anyio.run(main, parser.parse_args().port)
