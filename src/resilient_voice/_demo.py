"""`resilient-voice demo`: an outbound campaign against a misbehaving fake provider.

The demo starts :class:`~resilient_voice.testing.FakeTelephony` on loopback with a scripted fault
profile, places ``calls`` outbound calls through the typed client at ``cps`` calls per second,
reconciles every call whose outcome was unknown by listing the upstream's calls, and checks the
two promises of the library against the upstream's own records: nobody was called twice, and no
call was lost (created upstream but reported as a definite failure, or reported placed but
absent upstream).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

import anyio

from resilient_voice._demo_view import LiveView, render_summary
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.errors import OutcomeUnknownError, RejectedError
from resilient_voice.events import BreakerState, Event, RetryScheduled, StateChanged
from resilient_voice.limiter import TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy

__all__ = ["FAULT_PROFILES", "DemoOptions", "DemoReport", "render_summary", "run_demo"]

ACCOUNT_SID = "AC" + "de30" * 8
AUTH_TOKEN = "demo-auth-token"  # noqa: S105  (a fake account on loopback)
VAPI_KEY = "demo-vapi-key"
CALLER_ID = "+15005550006"
FAULT_PROFILES = ("none", "flaky", "outage", "storm")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``resilient-voice demo`` was asked to do."""

    calls: int = 200
    cps: float = 20.0
    faults: str = "storm"
    seed: int = 7
    metrics_port: int = 0
    live: bool = True
    json: bool = False
    provider: str = "twilio"
    recovery_timeout: float = 1.0


@dataclass(slots=True)
class DemoReport:
    """The outcome of a demo run; ``ok`` is False on any duplicate or lost call."""

    provider: str
    faults: str
    calls: int
    cps: float
    seconds: float = 0.0
    placed: int = 0
    failed: int = 0
    failed_fast: int = 0
    retried: int = 0
    outcome_unknown: int = 0
    reconciled_placed: int = 0
    reconciled_not_placed: int = 0
    upstream_created: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    metrics_url: str = ""
    cps_violations: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.duplicates and not self.lost

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2, sort_keys=True)


def fault_script(profile: str, duration: float) -> list[Any]:
    """The fault rules of a profile, timed against the run's expected ``duration``."""
    from resilient_voice.testing import Fault

    create = "*.calls.create"
    if profile == "none":
        return []
    rules = [
        Fault.error_rate(0.04, status=500, endpoints=create),
        Fault.drop_after(0.03, endpoints=create),
        Fault.drop_before(0.02, endpoints=create),
        Fault.latency(0.02, probability=0.3, endpoints=create),
    ]
    if profile in ("outage", "storm"):
        start = 0.3 * duration
        rules.insert(0, Fault.outage(start, start + max(1.0, 0.15 * duration), endpoints=create))
    if profile == "storm":
        start = 0.12 * duration
        rules.insert(
            0,
            Fault.rate_limited(
                1.0, retry_after=0.25, start=start, end=start + 0.4, endpoints=create
            ),
        )
    return rules


class Tally:
    """Counts retries and records breaker transitions for the live view and the summary.

    ``count_retries`` listens to the retry policy; the tally itself listens to the breaker.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.retries = 0
        self.state = BreakerState.CLOSED
        self.transitions: list[dict[str, Any]] = []

    def count_retries(self, event: Event) -> None:
        """The retry policy's listener: counts scheduled retries."""
        if isinstance(event, RetryScheduled):
            self.retries += 1

    def __call__(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self.state = event.new
            self.transitions.append(
                {
                    "at_s": round(time.monotonic() - self.started, 3),
                    "from": event.old.value,
                    "to": event.new.value,
                }
            )


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return round(ordered[index] * 1000.0, 1)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


async def run_demo(options: DemoOptions, out: TextIO | None = None) -> DemoReport:
    """Run the demo campaign and return its report (printing progress to ``out``)."""
    from prometheus_client import CollectorRegistry

    from resilient_voice.asgi import make_metrics_app
    from resilient_voice.metrics import PrometheusMetrics
    from resilient_voice.testing import FakeTelephony, serve

    out = out if out is not None else sys.stdout
    duration = options.calls / options.cps
    fake = FakeTelephony(
        seed=options.seed,
        twilio_accounts={ACCOUNT_SID: AUTH_TOKEN},
        vapi_api_keys=[VAPI_KEY],
        calls_per_second=options.cps,
        call_duration=0.05,
        status_callbacks=False,
        faults=fault_script(options.faults, duration),
    )
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    started = time.monotonic()
    tally = Tally(started)
    breaker = CircuitBreaker(
        f"{options.provider}-demo",
        failure_threshold=3,
        recovery_timeout=options.recovery_timeout,
        listeners=[tally, metrics],
    )
    retry = RetryPolicy(
        max_attempts=3,
        base_delay=0.05,
        max_delay=0.5,
        name="create_call",
        listeners=[tally.count_retries, metrics],
    )
    create = Policy(
        breaker=breaker,
        limiter=TokenBucket(options.cps, burst=1, name="cps", listeners=[metrics]),
        retry=retry,
        timeout=5.0,
    )
    read = Policy(
        retry=RetryPolicy(max_attempts=5, base_delay=0.05, max_delay=0.5, name="read"),
        timeout=5.0,
    )
    report = DemoReport(options.provider, options.faults, options.calls, options.cps)
    outcomes: dict[str, str] = {}
    latencies: list[float] = []
    numbers = [f"+1555{index:07d}" for index in range(options.calls)]

    async with (
        serve(fake) as upstream,
        serve(make_metrics_app(registry), port=options.metrics_port) as metrics_url,
    ):
        report.metrics_url = f"{metrics_url}/metrics"
        place, reconcile, close = await _provider(options.provider, upstream, create, read, metrics)
        try:
            print(f"fake {options.provider} upstream: {upstream}", file=out)
            print(f"metrics: {report.metrics_url}", file=out)

            unknown: dict[str, str] = {}
            errors = report.errors

            async def one(number: str) -> None:
                begun = time.monotonic()
                try:
                    await place(number)
                except OutcomeUnknownError as exc:
                    outcomes[number] = "unknown"
                    unknown[number] = exc.attempt_id
                except RejectedError:
                    outcomes[number] = "failed_fast"
                except Exception as exc:  # noqa: BLE001  (any other error is a definite failure)
                    outcomes[number] = "failed"
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                else:
                    outcomes[number] = "placed"
                    latencies.append(time.monotonic() - begun)

            view = LiveView(options, out, outcomes, tally)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(view.run)
                async with anyio.create_task_group() as campaign:
                    for index, number in enumerate(numbers):
                        # Dispatch at the paced rate; the client's limiter is the real guard.
                        delay = started + index / options.cps - time.monotonic()
                        if delay > 0:
                            await anyio.sleep(delay)
                        campaign.start_soon(one, number)
                tasks.cancel_scope.cancel()
            view.finish()

            for number, attempt_id in unknown.items():
                found = await reconcile(number, attempt_id)
                outcomes[number] = "reconciled_placed" if found else "reconciled_not_placed"
        finally:
            await close()

    report.seconds = round(time.monotonic() - started, 2)
    counts = dict.fromkeys(("placed", "failed", "failed_fast"), 0)
    for outcome in outcomes.values():
        if outcome in counts:
            counts[outcome] += 1
    report.placed = counts["placed"]
    report.failed = counts["failed"]
    report.failed_fast = counts["failed_fast"]
    report.reconciled_placed = sum(1 for o in outcomes.values() if o == "reconciled_placed")
    report.reconciled_not_placed = sum(1 for o in outcomes.values() if o == "reconciled_not_placed")
    report.outcome_unknown = report.reconciled_placed + report.reconciled_not_placed
    report.retried = tally.retries
    report.transitions = tally.transitions
    report.latency_ms = _percentiles(latencies)
    created = fake.calls(options.provider)  # type: ignore[arg-type]
    report.upstream_created = len(created)
    provider: Literal["twilio", "vapi"] = "vapi" if options.provider == "vapi" else "twilio"
    report.duplicates = dict(fake.duplicate_destinations(provider))
    report.cps_violations = fake.cps_violations() if provider == "twilio" else 0
    created_numbers = {call.to for call in created}
    said_placed = {n for n, o in outcomes.items() if o in ("placed", "reconciled_placed")}
    # Reconciled "not placed" is a claim like any failure: the upstream must not have the call.
    said_failed = {
        n for n, o in outcomes.items() if o in ("failed", "failed_fast", "reconciled_not_placed")
    }
    report.lost = sorted((said_failed & created_numbers) | (said_placed - created_numbers))
    return report


async def _provider(
    provider: str, upstream: str, create: Policy, read: Policy, metrics: Any
) -> tuple[
    Callable[[str], Awaitable[None]],
    Callable[[str, str], Awaitable[bool]],
    Callable[[], Awaitable[None]],
]:
    """Return (place, reconcile, close) for the chosen provider's typed client."""
    if provider == "twilio":
        from resilient_voice.twilio import TwilioClient

        twilio = TwilioClient(
            ACCOUNT_SID,
            AUTH_TOKEN,
            base_url=upstream,
            policies={"create_call": create, "read": read},
        )
        twilio.transport.add_listener(metrics)

        async def place_twilio(number: str) -> None:
            await twilio.create_call(
                to=number, from_=CALLER_ID, url="https://example.com/twiml/outbound"
            )

        async def reconcile_twilio(number: str, attempt_id: str) -> bool:
            return bool(await twilio.reconcile_call(to=number))

        return place_twilio, reconcile_twilio, twilio.aclose

    from resilient_voice.vapi import VapiClient

    vapi = VapiClient(VAPI_KEY, base_url=upstream, policies={"create_call": create, "read": read})
    vapi.add_listener(metrics)

    # The fake's assistant and phone number, looked up once before the campaign.
    assistant_id = (await vapi.list_assistants())[0].id
    phone_number_id = (await vapi.list_phone_numbers())[0].id

    async def place_vapi(number: str) -> None:
        await vapi.create_call(
            assistant_id=assistant_id, phone_number_id=phone_number_id, customer_number=number
        )

    async def reconcile_vapi(number: str, attempt_id: str) -> bool:
        return await vapi.reconcile_call(attempt_id, limit=1000) is not None

    return place_vapi, reconcile_vapi, vapi.aclose
