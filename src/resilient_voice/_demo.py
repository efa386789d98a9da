"""`resilient-voice demo`: an outbound campaign against a misbehaving fake provider.

The demo serves :class:`~resilient_voice.testing.FakeTelephony` on loopback behind the fault
plan of a profile (:mod:`resilient_voice._demo_faults`), calls every one of ``calls`` numbers
through the typed client at ``cps`` calls per second, re-queueing what did not go through
(:mod:`resilient_voice._demo_campaign`), and checks the library's promises against the
upstream's own records: every number was called exactly once (placed, none twice), no call was
lost (created upstream but reported not placed, or reported placed but absent), and the calls
per second stayed within the account's limit. With ``workers`` > 1 the campaign runs from that
many processes sharing one CPS budget in Redis (:mod:`resilient_voice._demo_fleet`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

import anyio

from resilient_voice._demo_campaign import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    VAPI_KEY,
    Campaign,
    Counts,
    Tally,
    create_policies,
    open_client,
)
from resilient_voice._demo_faults import FAULT_PROFILES, FaultPlan, PlannedFaults
from resilient_voice._demo_view import LiveView, Snapshot, export_svg, render_summary

__all__ = [
    "CPS_TOLERANCE",
    "FAULT_PROFILES",
    "DemoOptions",
    "DemoReport",
    "busiest_second",
    "export_svg",
    "log_to_file",
    "numbers_for",
    "percentiles",
    "render_summary",
    "run_demo",
]

# Seconds of earliness the fake forgives before a call counts as a CPS violation. A request that
# reaches the fake late shifts its schedule, and every call after it in the same busy stretch then
# looks early by that delay: the tolerance has to cover the worst transit delay of a whole run on
# a loaded machine (the client and the fake share one process and its GIL). At 20 calls per
# second an unpaced burst of more than 1 + 0.25 * 20 = 6 calls is still always caught.
CPS_TOLERANCE = 0.25
SETTLED = frozenset(("placed", "reconciled"))


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
    deadline: float = 120.0
    workers: int = 1
    redis_url: str | None = None
    log_file: str = ""
    export_svg: str | None = None


@dataclass(slots=True)
class DemoReport:
    """The outcome of a demo run; see :attr:`ok`."""

    provider: str
    faults: str
    seed: int
    calls: int
    cps: float
    workers: int = 1
    deadline: float = 120.0
    seconds: float = 0.0
    placed: int = 0
    unplaced: list[str] = field(default_factory=list)
    failed: int = 0
    attempts: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    failed_fast: int = 0
    refused_limiter: int = 0
    retried: int = 0
    outcome_unknown: int = 0
    reconciled_placed: int = 0
    reconciled_not_placed: int = 0
    requeued: int = 0
    upstream_created: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    metrics_url: str = ""
    cps_violations: int = 0
    upstream_busiest_second: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    log_file: str = ""

    @property
    def ok(self) -> bool:
        """Every number called exactly once, nothing lost, and the CPS limit held."""
        return (
            not self.duplicates and not self.lost and not self.unplaced and not self.cps_violations
        )

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2, sort_keys=True)


def log_to_file(path: str | None) -> str:
    """Send every log record of this process to a file, never over the view; return its path.

    Warnings (the library's own, uvicorn's, a worker's) are records too. Appending keeps the
    lines of a fleet's worker processes in the same file.
    """
    import logging
    import os
    import tempfile

    if not path:
        fd, path = tempfile.mkstemp(prefix="resilient-voice-demo-", suffix=".log")
        os.close(fd)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    logging.captureWarnings(True)
    return path


def numbers_for(calls: int) -> list[str]:
    """The campaign's numbers, in dialling order."""
    return [f"+1555{index:07d}" for index in range(calls)]


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``samples`` (seconds), in milliseconds (nearest rank)."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return round(ordered[index] * 1000.0, 1)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def busiest_second(times: Sequence[float]) -> int:
    """The most calls created within any one second (a sliding window over ``times``)."""
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def add_counts(report: DemoReport, counts: Counts) -> None:
    """Add one campaign's counts to the report (one per worker in a fleet)."""
    report.attempts += counts.attempts
    report.failed_fast += counts.refused_breaker
    report.refused_limiter += counts.refused_limiter
    report.outcome_unknown += counts.outcome_unknown
    report.reconciled_placed += counts.reconciled_placed
    report.reconciled_not_placed += counts.reconciled_not_placed
    report.requeued += counts.requeued
    for name, count in counts.errors.items():
        report.errors[name] = report.errors.get(name, 0) + count


def check_upstream(
    report: DemoReport, fake: Any, outcomes: dict[str, str], provider: Literal["twilio", "vapi"]
) -> None:
    """Fill the verdict's fields from the campaign's outcomes and the upstream's records."""
    settled = SETTLED
    report.placed = sum(1 for o in outcomes.values() if o in settled)
    report.failed = sum(1 for o in outcomes.values() if o == "failed")
    report.unplaced = sorted(n for n, o in outcomes.items() if o not in settled)
    created = fake.calls(provider)
    report.upstream_created = len(created)
    report.duplicates = dict(fake.duplicate_destinations(provider))
    report.cps_violations = fake.cps_violations() if provider == "twilio" else 0
    report.upstream_busiest_second = busiest_second([call.time for call in created])
    created_numbers = {call.to for call in created}
    said_placed = {n for n, o in outcomes.items() if o in settled}
    # Not placed is a claim like any failure: the upstream must not have the call.
    said_not_placed = {n for n, o in outcomes.items() if o not in settled and o != "unknown"}
    report.lost = sorted((said_not_placed & created_numbers) | (said_placed - created_numbers))


async def run_demo(options: DemoOptions, out: TextIO | None = None) -> DemoReport:
    """Run the demo campaign and return its report (drawing progress on ``out``)."""
    from prometheus_client import CollectorRegistry

    from resilient_voice.asgi import make_metrics_app
    from resilient_voice.metrics import PrometheusMetrics
    from resilient_voice.testing import FakeTelephony, serve

    out = out if out is not None else sys.stdout
    provider: Literal["twilio", "vapi"] = "vapi" if options.provider == "vapi" else "twilio"
    numbers = numbers_for(options.calls)
    plan = FaultPlan(options.faults, options.seed, numbers)
    fake = FakeTelephony(
        seed=options.seed,
        twilio_accounts={ACCOUNT_SID: AUTH_TOKEN},
        vapi_api_keys=[VAPI_KEY],
        calls_per_second=options.cps,
        cps_tolerance=CPS_TOLERANCE,
        call_duration=0.05,
        status_callbacks=False,
    )
    upstream_app = PlannedFaults(fake, plan)
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    report = DemoReport(
        options.provider,
        options.faults,
        options.seed,
        options.calls,
        options.cps,
        workers=options.workers,
        deadline=options.deadline,
        log_file=options.log_file,
    )

    async with (
        serve(upstream_app) as upstream,
        serve(make_metrics_app(registry), port=options.metrics_port) as metrics_url,
    ):
        report.metrics_url = f"{metrics_url}/metrics"
        # Above the live view, which redraws below them: where to look while it runs.
        print(f"fake {options.provider} upstream: {upstream}", file=out)
        print(f"metrics: {report.metrics_url}", file=out, flush=True)
        started = time.monotonic()
        deadline = started + options.deadline
        if options.workers > 1 or options.redis_url:
            from resilient_voice._demo_fleet import run_fleet

            outcomes, last = await run_fleet(options, upstream, upstream_app, report, out)
        else:
            outcomes, last = await _run_here(
                options, upstream, upstream_app, report, metrics, started, deadline, out
            )
        report.seconds = round(time.monotonic() - started, 2)
    report.injected = upstream_app.injected()
    check_upstream(report, fake, outcomes, provider)
    if options.export_svg:
        export_svg(report, last, options.export_svg)
    return report


async def _run_here(
    options: DemoOptions,
    upstream: str,
    upstream_app: PlannedFaults,
    report: DemoReport,
    metrics: Any,
    started: float,
    deadline: float,
    out: TextIO,
) -> tuple[dict[str, str], Snapshot | None]:
    """The campaign from this process; returns each number's outcome and the last view."""
    tally = Tally(started)
    create, read, retry = create_policies(
        options.cps, options.recovery_timeout, tally, listeners=[metrics]
    )
    numbers = numbers_for(options.calls)
    async with open_client(
        options.provider, upstream, create, read, tally.latencies, listeners=[metrics]
    ) as (place, reconcile):
        campaign = Campaign(
            numbers,
            place,
            reconcile,
            cps=options.cps,
            deadline=deadline,
            backoff=retry.backoff,
        )

        def snapshot() -> Snapshot:
            outcomes = list(campaign.outcomes.values())
            counts = campaign.counts
            return Snapshot(
                elapsed=time.monotonic() - started,
                calls=options.calls,
                placed=sum(1 for o in outcomes if o in ("placed", "reconciled")),
                queued=outcomes.count("queued"),
                in_flight=outcomes.count("in flight"),
                failed=outcomes.count("failed"),
                attempts=counts.attempts,
                refused_fast=counts.refused_breaker + counts.refused_limiter,
                unknown=counts.outcome_unknown,
                retries=tally.retries,
                breaker=tally.state.value,
                phase="done" if campaign.finished else upstream_app.phase(),
                injected=upstream_app.injected(),
            )

        view = LiveView(out, live=options.live, snapshot=snapshot)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(view.run)
            try:
                await campaign.run()
            finally:
                view.stop()
    add_counts(report, campaign.counts)
    report.retried = tally.retries
    report.transitions = tally.transitions
    report.latency_ms = percentiles(tally.latencies)
    return campaign.outcomes, view.last
