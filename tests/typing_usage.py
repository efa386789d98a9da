"""Uses the public API as an application would; checked by ``mypy --strict`` in CI.

Not collected by pytest (no ``test_`` prefix); it is a type-checking fixture.
"""

from __future__ import annotations

from typing import Any

import resilient_voice
from resilient_voice import FailureKind, RateLimitedError, RejectedError
from resilient_voice.testing import ManualClock


def classify(exc: BaseException) -> FailureKind | None:
    if isinstance(exc, RejectedError):
        return exc.failure_kind
    return None


clock = ManualClock(0.0, autojump=True)
now: float = clock.now()
error = RateLimitedError("twilio-cps", 0.5)
wait: float | None = error.retry_after
version: str = resilient_voice.__version__


retry = resilient_voice.RetryPolicy(max_attempts=4, total_timeout=20.0, name="twilio")


@retry
async def create_call(to: str, *, timeout: float = 5.0) -> int:
    return len(to)


async def use_retry() -> int:
    with resilient_voice.correlation_scope() as cid:
        assert isinstance(cid, str)
        return await create_call("+15550100", timeout=2.0) + await retry.call(create_call, "x")


breaker = resilient_voice.CircuitBreaker(
    "twilio", failure_threshold=3, recovery_timeout=30.0, clock=clock
)


@breaker
async def dial(to: str, *, from_: str) -> dict[str, str]:
    return {"to": to, "from": from_}


async def use_breaker() -> None:
    call: dict[str, str] = await dial("+15551234567", from_="+15557654321")
    same: dict[str, str] = await breaker.call(dial, "+1555", from_="+1666")
    async with breaker:
        pass
    permit = await breaker.acquire()
    permit.mark_started()
    permit.settle()
    queued = await breaker.acquire(started=False)
    queued.mark_started()
    queued.release()
    state: resilient_voice.BreakerState = breaker.state
    # Return types are importable from their package for annotations (not in ``__all__``).
    from resilient_voice.breaker import BreakerPermit, CircuitBreakerStatistics
    from resilient_voice.limiter import TokenBucketStatistics
    from resilient_voice.retry import AttemptInfo

    held: BreakerPermit = await breaker.acquire()
    held.release()
    stats: CircuitBreakerStatistics = breaker.statistics()
    pacing: TokenBucketStatistics = bucket.statistics()
    attempt: AttemptInfo | None = resilient_voice.retry.current_attempt()
    del call, same, state, stats, pacing, attempt


bucket = resilient_voice.TokenBucket(10, burst=2, clock=clock, name="twilio-cps")
keyed = resilient_voice.KeyedLimiter(1, burst=3, max_keys=1000, on_full="evict")


@bucket
async def send(to: str, *, body: str) -> int:
    return len(body)


policy = resilient_voice.Policy(
    breaker=breaker, limiter=bucket, retry=retry, timeout=5.0, total_timeout=20.0
)


@policy
async def place(to: str) -> str:
    return to


async def use_policy() -> str:
    sent: int = await send("+15550100", body="hi")
    del sent
    return await place("+15550100") + await policy.call(place, "+15550101")


async def use_clients() -> None:
    from resilient_voice.asgi import (
        CorrelationIdMiddleware,
        MetricsMiddleware,
        RateLimitMiddleware,
        TrustedProxies,
        TwilioSignatureMiddleware,
        make_metrics_app,
    )
    from resilient_voice.metrics import PrometheusMetrics
    from resilient_voice.otel import OpenTelemetryListener
    from resilient_voice.testing import FakeTelephony, Fault, serve
    from resilient_voice.twilio import Call, TwilioClient
    from resilient_voice.vapi import VapiCall, VapiClient, VapiCustomer

    sid = "AC" + "0" * 32
    fake = FakeTelephony(twilio_accounts={sid: "token"}, faults=[Fault.drop_after(0.1)])
    metrics = PrometheusMetrics()
    async with serve(fake) as url, TwilioClient(sid, "token", base_url=url) as twilio:
        twilio.transport.add_listener(metrics)
        twilio.breaker.add_listener(metrics)  # as docs/metrics.md shows it
        twilio.breaker.add_listener(OpenTelemetryListener())  # and docs/opentelemetry.md
        call: Call = await twilio.create_call(
            to="+15550100001", from_="+15005550006", url="https://example.com/twiml"
        )
        calls: list[Call] = await twilio.reconcile_call(to=call.to or "")
        del calls
    async with VapiClient("key", base_url="http://127.0.0.1:1") as vapi:
        vapi.breaker.add_listener(metrics)
        vapi.transport.add_listener(metrics)
        found: VapiCall | None = await vapi.reconcile_call("attempt-1")
        placed: VapiCall = await vapi.create_call(
            assistant_id="a1",
            phone_number_id="p1",
            customer=VapiCustomer(number="+14155550100", name="Ada", extension="12"),
        )
        by_id: VapiCall = await vapi.create_call(
            assistant_id="a1", phone_number_id="p1", customer_id="cust-1"
        )
        del placed, by_id
        del found

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    stack = MetricsMiddleware(
        CorrelationIdMiddleware(RateLimitMiddleware(app, rate=10.0, burst=20))
    )
    metrics_app = make_metrics_app()
    proxies = TrustedProxies(["10.0.0.0/16", "::1"])
    behind = TwilioSignatureMiddleware(
        RateLimitMiddleware(app, rate=10.0, trusted_proxies=proxies, ipv6_prefix=56),
        "token",
        trusted_proxies=["127.0.0.1"],
    )
    server_applied = TrustedProxies(server_applied=True)
    applied = RateLimitMiddleware(app, rate=1.0, trusted_proxies=server_applied)
    del stack, metrics_app, behind, applied


async def use_redis() -> None:
    from resilient_voice.asgi import RateLimitMiddleware
    from resilient_voice.events import Event, StoreAvailabilityChanged
    from resilient_voice.redis import RedisBackend
    from resilient_voice.twilio import TwilioClient

    def on_event(event: Event) -> None:
        match event:
            case StoreAvailabilityChanged(source=name, available=up, fallback=mode):
                del name, up, mode
            case _:
                pass

    async with RedisBackend.from_url("redis://127.0.0.1:6379/0", prefix="app") as backend:
        shared = resilient_voice.TokenBucket(
            5, name="twilio:AC1:calls", store=backend, on_backend_error="deny", listeners=[on_event]
        )
        await shared.acquire(timeout=1.0)
        await shared.pause(2.0)
        per_client = resilient_voice.KeyedLimiter(1, name="per-client", store=backend)
        await per_client.acquire("+15551234567")
        twilio = TwilioClient("AC" + "0" * 32, "token", calls_per_second=5, store=backend)

        async def app(scope: object, receive: object, send: object) -> None:
            return None

        inbound = RateLimitMiddleware(app, rate=2.0, burst=5, store=backend, name="api")
        del twilio, inbound


async def use_leases() -> None:
    from resilient_voice.events import CapacityChanged, Event, LeaseReleased
    from resilient_voice.leases import LeaseStatistics
    from resilient_voice.redis import RedisBackend

    def on_event(event: Event) -> None:
        match event:
            case LeaseReleased(source=name, reason=reason, in_use=in_use):
                del name, reason, in_use
            case CapacityChanged(old=old, new=new, cause=cause):
                del old, new, cause
            case _:
                pass

    leases = resilient_voice.CallLeases("twilio:AC1", 10, ttl=3600.0, listeners=[on_event])
    lease: resilient_voice.Lease = await leases.acquire(timeout=30.0, priority=1)
    bound = await leases.bind(lease, "CA1")
    freed: bool = await leases.release("CA1", generation=bound.generation)
    unknown = await leases.mark_unknown(await leases.acquire(), "att-1")
    pending: tuple[resilient_voice.Lease, ...] = await leases.unknown()
    marked = await leases.mark_unknown(await leases.acquire(), "att-2", context='{"to":"+1"}')
    marked_at: float | None = marked.marked_at
    context: str | None = marked.context
    reconciled: int = await leases.reconcile(["CA2"], as_of=leases.clock.now())
    await leases.signal_capacity("twilio:10004")
    await leases.observe_provider_limits(concurrency_limit=5, remaining=2)
    stats: LeaseStatistics = leases.statistics()
    await unknown.release()
    try:
        await leases.acquire(timeout=0)
    except resilient_voice.CapacityExhaustedError as exc:
        wait: float | None = exc.retry_after
        del wait
    async with RedisBackend.from_url("redis://127.0.0.1:6379/0", prefix="app") as backend:
        shared = resilient_voice.CallLeases("vapi:org", 5, ttl=1800.0, store=backend)
        await (await shared.acquire()).release()
    del freed, pending, reconciled, stats, marked_at, context


async def use_leased_clients(app: Any) -> Any:
    from resilient_voice.asgi import LeaseReleaseMiddleware, TwilioSignatureMiddleware
    from resilient_voice.twilio import TwilioClient
    from resilient_voice.vapi import VapiClient

    leases = resilient_voice.CallLeases("twilio:AC1", 5, ttl=3600.0)
    twilio = TwilioClient("AC" + "0" * 32, "token", leases=leases, lease_timeout=60.0)
    vapi = VapiClient("key", leases=leases, lease_timeout=None, server_url_configured=True)
    freed: int = await twilio.reconcile_leases() + await vapi.reconcile_leases(settle_after=90)
    del freed
    return TwilioSignatureMiddleware(
        LeaseReleaseMiddleware(app, leases=leases, paths=["/twilio/status"], verified=True),
        "token",
        paths=["/twilio/*"],
    )
