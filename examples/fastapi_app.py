"""A FastAPI voice backend: place calls through one shared TwilioClient, take Twilio's callbacks.

This is the shape of the service resilient_voice came from:

- ``create_app(settings)`` builds the app; the ``TwilioClient`` (its breaker, pacing and
  connection pool) is built once in the lifespan and shared by every request;
- the middleware stack, outermost first: metrics, correlation id, an inbound rate limit (the
  Twilio and Vapi webhook paths exempted: a 429 there loses the event), Vapi and Twilio webhook
  verification;
- ``POST /calls`` places a call: 201 when placed; 503 (breaker open) or 429 (pacing) with
  ``Retry-After`` when refused locally; 202 with the attempt id when the outcome is unknown,
  never retried (the call may be ringing);
- ``POST /twilio/status``: Twilio's status callbacks, verified by signature; each carries the
  ``rv_cid`` and ``rv_attempt`` the client put on its URL, so the callback runs under the
  correlation id of the request that placed the call, and ``GET /attempts/{attempt_id}`` can
  tell whether an unknown outcome did create a call;
- ``POST /twilio/voice`` (TwiML), ``POST /vapi/events`` (Vapi server messages), ``GET /metrics``.

Run: ``python examples/fastapi_app.py [--port 8000]``. It starts a fake Twilio
(``FakeTelephony``) in-process on loopback, so no account or network is needed; the fake loses
one response in ten after creating the call, to show the 202. Then, in another terminal::

    curl -si -X POST localhost:8000/calls -H 'content-type: application/json' \\
        -d '{"to": "+15550100001"}'
    curl -s localhost:8000/attempts/<attempt_id>
    curl -s localhost:8000/metrics | grep resilient_voice_breaker
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY, CollectorRegistry
from pydantic import BaseModel
from starlette.routing import Route

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_voice import (
    CircuitBreaker,
    CircuitOpenError,
    InvalidRequestError,
    OutcomeUnknownError,
    Policy,
    RateLimitedError,
    RetryPolicy,
    TokenBucket,
    get_correlation_id,
)
from resilient_voice.asgi import (
    CorrelationIdMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
    make_metrics_app,
)
from resilient_voice.correlation import CorrelationIdFilter
from resilient_voice.metrics import PrometheusMetrics
from resilient_voice.twilio import TwilioAPIError, TwilioClient

log = logging.getLogger("voice_app")


@dataclass(frozen=True, slots=True)
class Settings:
    """Configuration, read once at startup (from the environment in a real deployment)."""

    twilio_account_sid: str
    twilio_auth_token: str = field(repr=False)
    public_base_url: str  # where Twilio reaches this app: callback URLs and signature checks
    caller_id: str  # a Twilio number of the account
    vapi_webhook_secret: str = field(repr=False)
    twilio_base_url: str = "https://api.twilio.com"  # or a regional edge, or a fake in tests
    calls_per_second: float = 1.0  # the account's CPS
    call_budget: float = 15.0  # seconds POST /calls may take, pacing included; then 429
    inbound_rate: float = 5.0  # per client, per second, on the non-webhook routes
    inbound_burst: int = 20


class CallRequest(BaseModel):
    to: str


class CallEvents:
    """What Twilio's status callbacks said: the last status of each call, and the call of each
    attempt id (``rv_attempt``). One instance per app, in memory: a real service keeps this in
    its database."""

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


def retry_after(seconds: float | None) -> dict[str, str]:
    """A ``Retry-After`` header in whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds or 0.0)))}


async def circuit_open(request: Request, exc: CircuitOpenError) -> Response:
    body = {"error": "upstream_unavailable", "breaker": exc.breaker}
    return JSONResponse(body, status_code=503, headers=retry_after(exc.retry_after))


async def rate_limited(request: Request, exc: RateLimitedError) -> Response:
    return JSONResponse({"error": "paced"}, status_code=429, headers=retry_after(exc.retry_after))


async def twilio_error(request: Request, exc: TwilioAPIError) -> Response:
    return JSONResponse({"error": "twilio", "code": exc.code}, status_code=502)


async def invalid(request: Request, exc: InvalidRequestError) -> Response:
    return JSONResponse({"error": "invalid", "field": exc.field}, status_code=422)


def twilio_client(request: Request) -> TwilioClient:
    client: TwilioClient = request.state.twilio
    return client


def call_events(request: Request) -> CallEvents:
    events: CallEvents = request.state.events
    return events


Twilio = Annotated[TwilioClient, Depends(twilio_client)]
Events = Annotated[CallEvents, Depends(call_events)]


def create_app(settings: Settings, *, registry: CollectorRegistry = REGISTRY) -> FastAPI:
    """Build the app. Nothing talks to Twilio until the lifespan starts."""
    metrics = PrometheusMetrics(registry)
    base = settings.public_base_url.rstrip("/")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # One client for the app's lifetime: one breaker per account, one pacing, one pool.
        sid = settings.twilio_account_sid
        breaker = CircuitBreaker(f"twilio:{sid}", listeners=[metrics])
        create_call = Policy(
            breaker=breaker,
            limiter=TokenBucket(
                settings.calls_per_second, 1, name="twilio:calls", listeners=[metrics]
            ),
            retry=RetryPolicy(max_attempts=3, name="create_call", listeners=[metrics]),
            timeout=10.0,
            # Bounds the whole operation; the limiter refuses at once (RateLimitedError) a
            # pacing slot beyond it, instead of holding the HTTP request open.
            total_timeout=settings.call_budget,
        )
        async with TwilioClient(
            sid,
            settings.twilio_auth_token,
            base_url=settings.twilio_base_url,
            breaker=breaker,  # shared by the other operations' default policies
            policies={"create_call": create_call},
            listeners=[metrics],
        ) as twilio:
            yield {"twilio": twilio, "events": CallEvents()}

    app = FastAPI(
        lifespan=lifespan,
        exception_handlers={
            CircuitOpenError: circuit_open,
            RateLimitedError: rate_limited,
            TwilioAPIError: twilio_error,
            InvalidRequestError: invalid,
        },
    )

    @app.post("/calls", status_code=201)
    async def place_call(body: CallRequest, twilio: Twilio) -> Response:
        try:
            call = await twilio.create_call(
                to=body.to,
                from_=settings.caller_id,
                url=f"{base}/twilio/voice",
                status_callback=f"{base}/twilio/status",
                status_callback_event=["initiated", "ringing", "answered", "completed"],
            )
        except OutcomeUnknownError as exc:
            # The call may be ringing: never place it again from here. Its status callback,
            # if it comes, names this attempt id (GET /attempts/{id}).
            log.warning("outcome unknown for attempt %s", exc.attempt_id)
            unknown = {"status": "outcome_unknown", "attempt_id": exc.attempt_id}
            return JSONResponse(unknown, status_code=202)
        payload = {"sid": call.sid, "status": str(call.status), "attempt_id": call.attempt_id}
        return JSONResponse(payload, status_code=201)

    @app.get("/attempts/{attempt_id}")
    async def attempt(attempt_id: str, events: Events) -> dict[str, str | None]:
        sid = events.attempts.get(attempt_id, "")
        return {
            "attempt_id": attempt_id,
            "sid": sid or None,  # None: no callback names this attempt (yet)
            "status": events.status.get(sid),
            "correlation_id": events.correlation.get(sid),
        }

    @app.post("/twilio/status", status_code=204)
    async def twilio_status(request: Request, events: Events) -> Response:
        form = await request.form()
        events.record(form, request.query_params.get("rv_attempt"))
        log.info("call %s is %s", form.get("CallSid"), form.get("CallStatus"))
        return Response(status_code=204)

    @app.post("/twilio/voice")
    async def twilio_voice() -> Response:
        twiml = "<Response><Say>This is a reminder from resilient voice.</Say></Response>"
        return Response(twiml, media_type="application/xml")

    @app.post("/vapi/events")
    async def vapi_events(request: Request) -> dict[str, str]:
        message = (await request.json()).get("message", {})
        log.info("vapi %s", message.get("type"))
        return {}

    # A Route given an ASGI app object (not a function) passes it the raw scope.
    app.routes.append(Route("/metrics", make_metrics_app(registry)))
    # add_middleware: the last one added is the outermost.
    app.add_middleware(
        TwilioSignatureMiddleware,
        auth_token=settings.twilio_auth_token,
        paths=["/twilio/*"],
        public_base_url=settings.public_base_url,
    )
    app.add_middleware(
        VapiWebhookMiddleware, secret=settings.vapi_webhook_secret, paths=["/vapi/*"]
    )
    app.add_middleware(
        RateLimitMiddleware,
        rate=settings.inbound_rate,
        burst=settings.inbound_burst,
        exempt=["/twilio/*", "/vapi/*", "/metrics"],
        listeners=[metrics],
    )
    app.add_middleware(CorrelationIdMiddleware)
    app.add_middleware(
        MetricsMiddleware,
        registry=registry,
        route_template=lambda scope: "/metrics" if scope["path"] == "/metrics" else None,
    )
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

    from resilient_voice.testing import FakeTelephony, Fault, serve

    sid, token = "AC" + "0" * 32, "example-auth-token"
    fake = FakeTelephony(
        twilio_accounts={sid: token},
        calls_per_second=1.0,
        call_duration=3.0,
        ring_duration=1.0,
        faults=[Fault.drop_after(0.1, endpoints="twilio.calls.create")],
    )
    async with serve(fake) as fake_url:
        settings = Settings(
            twilio_account_sid=sid,
            twilio_auth_token=token,
            public_base_url=f"http://127.0.0.1:{port}",
            caller_id="+15005550006",
            vapi_webhook_secret="example-vapi-secret",
            twilio_base_url=fake_url,
        )
        print(f"fake Twilio at {fake_url}; the app at {settings.public_base_url}")
        print(requests_to_try(settings.public_base_url), flush=True)
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port)
        await uvicorn.Server(config).serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter())  # every line of a call's life shares its id
    handler.setFormatter(logging.Formatter("%(levelname)s [%(correlation_id)s] %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)
    anyio.run(main, parser.parse_args().port)
