"""A Litestar voice backend: one shared TwilioClient, the middleware stack, verified callbacks.

The Litestar take on ``examples/fastapi_app.py``, with the same HTTP surface:

- ``create_app(settings)`` builds a ``Litestar`` app whose lifespan builds the ``TwilioClient``
  once and stores it on ``app.state``; handlers receive it by dependency injection;
- the middleware: correlation id, an inbound rate limit (the Twilio webhooks exempted) and
  Twilio signature verification as ``DefineMiddleware`` (Litestar runs these after routing);
  ``MetricsMiddleware`` wraps the whole application so that 404s are measured too, which makes
  ``create_app`` return that wrapper (serve it, not the inner ``Litestar``);
- ``POST /calls``: 201 placed, 202 with the attempt id when the outcome is unknown (never
  retried), 503/429 with ``Retry-After`` when refused locally (an app-wide exception handler);
- ``POST /twilio/status`` records Twilio's signed status callbacks, ``GET /attempts/{id}`` reads
  them back, ``POST /twilio/voice`` serves the call's TwiML, ``GET /metrics``.

Run: ``python examples/litestar_app.py [--port 8000]`` (a fake Twilio runs in-process; no
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
from litestar import Litestar, Request, Response, asgi, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.middleware import DefineMiddleware
from litestar.params import FromPath, JSONBody
from litestar.types import Receive, Scope, Send
from prometheus_client import REGISTRY, CollectorRegistry

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


@dataclass
class CallRequest:
    to: str


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


@post("/calls", status_code=201)
async def place_call(
    data: JSONBody[CallRequest],
    twilio: NamedDependency[TwilioClient],
    settings: NamedDependency[Settings],
) -> Response[dict[str, Any]]:
    base = settings.public_base_url.rstrip("/")
    try:
        call = await twilio.create_call(
            to=data.to,
            from_=settings.caller_id,
            url=f"{base}/twilio/voice",
            status_callback=f"{base}/twilio/status",
            status_callback_event=["initiated", "ringing", "answered", "completed"],
        )
    except OutcomeUnknownError as exc:
        # Maybe ringing: never place it again from here; its callback names the attempt.
        return Response(
            {"status": "outcome_unknown", "attempt_id": exc.attempt_id}, status_code=202
        )
    except InvalidRequestError as exc:
        return Response({"error": "invalid", "field": exc.field}, status_code=422)
    return Response({"sid": call.sid, "status": str(call.status), "attempt_id": call.attempt_id})


def refused_locally(request: Request[Any, Any, Any], exc: RejectedError) -> Response[Any]:
    """CircuitOpenError: 503; RateLimitedError: 429; both with ``Retry-After``."""
    status = 503 if isinstance(exc, CircuitOpenError) else 429
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after or 0.0)))}
    return Response({"error": "refused_locally"}, status_code=status, headers=headers)


@get("/attempts/{attempt_id:str}")
async def attempt(
    attempt_id: FromPath[str], events: NamedDependency[CallEvents]
) -> dict[str, str | None]:
    sid = events.attempts.get(attempt_id, "")
    return {
        "attempt_id": attempt_id,
        "sid": sid or None,
        "status": events.status.get(sid),
        "correlation_id": events.correlation.get(sid),
    }


@post("/twilio/status", status_code=204)
async def twilio_status(
    request: Request[Any, Any, Any], events: NamedDependency[CallEvents]
) -> None:
    events.record(await request.form(), request.query_params.get("rv_attempt"))


@post("/twilio/voice", media_type="application/xml", status_code=200)
async def twilio_voice() -> str:
    return "<Response><Say>This is a reminder from resilient voice.</Say></Response>"


def create_app(settings: Settings, *, registry: CollectorRegistry = REGISTRY) -> MetricsMiddleware:
    """Build the app (the Litestar application wrapped in ``MetricsMiddleware``)."""
    metrics = PrometheusMetrics(registry)
    metrics_app = make_metrics_app(registry)

    @asgi("/metrics", is_mount=True, copy_scope=True)
    async def metrics_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        await metrics_app(scope, receive, send)

    @asynccontextmanager
    async def twilio_client(app: Litestar) -> AsyncIterator[None]:
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
            app.state.twilio = twilio
            yield

    def from_state(name: str) -> Provide:
        def provide(state: State) -> Any:
            return state[name]

        return Provide(provide, sync_to_thread=False)

    app = Litestar(
        [place_call, attempt, twilio_status, twilio_voice, metrics_endpoint],
        lifespan=[twilio_client],
        state=State({"settings": settings, "events": CallEvents()}),
        dependencies={
            "twilio": from_state("twilio"),
            "settings": from_state("settings"),
            "events": from_state("events"),
        },
        # Litestar types ASGI scopes as TypedDicts, our middleware as plain mappings: the same
        # objects at run time, hence the type: ignore comments on DefineMiddleware.
        middleware=[  # the first is the outermost
            DefineMiddleware(CorrelationIdMiddleware),  # type: ignore[arg-type]
            DefineMiddleware(
                RateLimitMiddleware,  # type: ignore[arg-type]
                rate=settings.inbound_rate,
                burst=settings.inbound_burst,
                exempt=["/twilio/*", "/metrics"],
                listeners=[metrics],
            ),
            DefineMiddleware(
                TwilioSignatureMiddleware,  # type: ignore[arg-type]
                auth_token=settings.twilio_auth_token,
                paths=["/twilio/*"],
                public_base_url=settings.public_base_url,
            ),
        ],
        exception_handlers={RejectedError: refused_locally},
    )
    return MetricsMiddleware(app, registry=registry)


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
