"""The outbound chaos soak's engine: jobs, lanes, phases, reconciliation and the figures.

A *job* is one logical create with its own destination number (the marker that lets the
provider's records be counted). A *lane* is one way of creating: the typed ``TwilioClient``, the
official twilio SDK through ``ResilientTwilioHttpClient``, the typed ``VapiClient``, the official
Vapi SDK through ``sdk_http_client``. Every lane has its own breaker and pacing. Lanes run side by
side through a sequence of *phases*, each installing its own fault script on the fake.

What the caller is told decides what the job's outcome is:

- ``placed``: the create returned an id.
- ``failed``: a definite refusal (the provider's 4xx, or a 429 that the retries did not get
  through); nothing may exist upstream.
- ``unknown``: :class:`~resilient_voice.OutcomeUnknownError`; the lane's reconciliation decides
  (``created`` or ``absent``) once the phase is over.

A :class:`~resilient_voice.RejectedError` (breaker open, limiter) and an unprocessed refusal
(Twilio's 429 after the retries) say that nothing was sent, so the worker tries the same job
again after the ``retry_after`` it was given: that is what an application may do with them.
The provider's records are the truth the figures are computed from (:func:`judge`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from resilient_voice import (
    CircuitBreaker,
    OutcomeUnknownError,
    Policy,
    ProviderError,
    RejectedError,
    ResilientVoiceError,
    RetryPolicy,
    TokenBucket,
)
from resilient_voice.events import Event, StateChanged
from resilient_voice.failure import FailureKind
from resilient_voice.testing import FakeTelephony, Fault

TOKEN = "soak-auth-token"
VAPI_KEY = "soak-vapi-private-key"
FROM = "+15005550006"
TWIML = "https://example.com/twiml"
CREATES = "*.calls.create"
SID = {
    "twilio-typed": "AC" + "a" * 32,
    "twilio-sdk": "AC" + "b" * 32,
    "latency": "AC" + "c" * 32,
    "fleet": "AC" + "d" * 32,
}
LANE_DIGIT = {
    "twilio-typed": 1,
    "twilio-sdk": 2,
    "vapi-typed": 3,
    "vapi-sdk": 4,
    "twilio-leased": 5,
    "vapi-leased": 6,
    "fleet-vapi": 7,
    "latency": 9,
}

# The breaker every lane uses: 5 consecutive failures open it for RECOVERY seconds.
RECOVERY = 0.5
FAILURE_THRESHOLD = 5
# A stalled 2xx holds a worker this long before the client's read timeout calls it unknown.
TIMEOUT = 1.0
# The fake forgives this much earliness before it counts a CPS violation: scheduler and loopback
# jitter on a loaded 2-core machine (a request that reaches the server thread late, then one on
# time, look like a burst). An unpaced burst of more than 1 + CPS_TOLERANCE * cps calls is caught.
CPS_TOLERANCE = 0.25
# A job refused locally (nothing sent) is tried again at most this often.
MAX_REJECTIONS = 200


def number_of(lane: str, index: int, worker: int = 0) -> str:
    """The unique destination of a job: lane digit, worker digit, six digits of index."""
    return f"+1555{LANE_DIGIT.get(lane, 8)}{worker}{index:06d}"


@dataclass
class Job:
    """One logical create and what its caller was told."""

    lane: str
    index: int
    number: str
    phase: str = ""
    outcome: str = ""  # placed | failed | unknown
    reported_id: str | None = None
    attempt_id: str | None = None
    started: float = 0.0  # time.time(), for reconciliation windows
    rejections: int = 0
    resubmits: int = 0
    reconciled: str | None = None  # created | absent | None (unresolved)
    reconciled_id: str | None = None
    error: str | None = None


@dataclass
class BreakerLog:
    """A breaker's transitions on the monotonic clock, from a listener."""

    name: str
    transitions: list[tuple[float, str, str]] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self.transitions.append((time.monotonic(), event.old.name, event.new.name))

    def open_durations(self) -> list[float]:
        """Seconds from each OPEN to the HALF_OPEN that followed it."""
        out: list[float] = []
        opened: float | None = None
        for at, _old, new in self.transitions:
            if new == "OPEN":
                opened = at
            elif new == "HALF_OPEN" and opened is not None:
                out.append(at - opened)
                opened = None
        return out

    def closed_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first CLOSED at or after it (None if none)."""
        for at, _old, new in self.transitions:
            if new == "CLOSED" and at >= moment:
                return at - moment
        return None

    def open_at(self, moment: float) -> bool:
        """Whether the breaker was OPEN or HALF_OPEN at ``moment``."""
        state = "CLOSED"
        for at, _old, new in self.transitions:
            if at > moment:
                break
            state = new
        return state != "CLOSED"

    def trips(self) -> int:
        return sum(1 for _, _, new in self.transitions if new == "OPEN")


def breaker(name: str, log: BreakerLog, **options: Any) -> CircuitBreaker:
    options.setdefault("failure_threshold", FAILURE_THRESHOLD)
    return CircuitBreaker(name, recovery_timeout=RECOVERY, listeners=[log], **options)


def retry(name: str) -> RetryPolicy:
    # Short delays keep the soak fast; Retry-After (0.05 s here) is honoured up to max_delay.
    return RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.5, name=name)


def vapi_policies(name: str, log: BreakerLog, cps: float) -> dict[str, Policy]:
    shared = breaker(name, log)
    return {
        "create_call": Policy(
            breaker=shared,
            retry=retry(name),
            limiter=TokenBucket(cps, 1, name=f"{name}:calls"),
            timeout=TIMEOUT,
        ),
        "read": Policy(breaker=shared, retry=retry(name), idempotent=True, timeout=5.0),
    }


@dataclass(frozen=True)
class Phase:
    """A named fault script; ``faults(now)`` builds it with windows relative to ``now``."""

    name: str
    faults: Callable[[float], list[Fault]]
    min_seconds: float = 0.0  # keep the phase running at least this long (outages)


OUTAGE = 1.0


def phases() -> list[Phase]:
    """Every fault alone, then all at once. Faults hit the creates; reconciliation reads are
    made after each phase, with the script cleared, as an operator would after an incident."""
    return [
        Phase("baseline", lambda now: []),
        Phase(
            "errors",
            lambda now: [
                Fault.error_rate(0.06, status=500, endpoints=CREATES),
                Fault.error_rate(0.04, status=502, endpoints=CREATES),
                Fault.error_rate(0.04, status=503, endpoints=CREATES),
            ],
        ),
        Phase(
            "outage",
            lambda now: [Fault.outage(now, now + OUTAGE, endpoints=CREATES)],
            min_seconds=OUTAGE + 2 * RECOVERY,
        ),
        Phase(
            "429-storm",
            lambda now: [Fault.rate_limited(0.4, retry_after=0.05, endpoints=CREATES)],
        ),
        Phase("latency", lambda now: [Fault.latency(0.05, endpoints=CREATES)]),
        Phase(
            "drop-before",
            lambda now: [
                Fault.drop_before(0.06, endpoints=CREATES),
                Fault.drop_before(0.04, reset=True, endpoints=CREATES),
            ],
        ),
        Phase(
            "drop-after",
            lambda now: [
                Fault.drop_after(0.06, endpoints=CREATES),
                Fault.drop_after(0.04, reset=True, endpoints=CREATES),
            ],
        ),
        Phase(
            "lost-2xx-body",
            lambda now: [
                Fault.drop_mid_body(0.08, endpoints=CREATES),
                Fault.drop_mid_body(0.02, stall=True, endpoints=CREATES),
            ],
        ),
        Phase("chaos", chaos),
    ]


def chaos(now: float) -> list[Fault]:
    """Every fault at once: a short outage inside a mix of everything else."""
    return [
        Fault.latency(0.02, endpoints=CREATES),
        Fault.outage(now + 0.5, now + 0.5 + OUTAGE / 2, endpoints=CREATES),
        Fault.error_rate(0.02, status=500, endpoints=CREATES),
        Fault.error_rate(0.02, status=503, endpoints=CREATES),
        Fault.rate_limited(0.05, retry_after=0.05, endpoints=CREATES),
        Fault.drop_before(0.02, endpoints=CREATES),
        Fault.drop_after(0.02, endpoints=CREATES),
        Fault.drop_after(0.01, reset=True, endpoints=CREATES),
        Fault.drop_mid_body(0.02, endpoints=CREATES),
        Fault.drop_mid_body(0.005, stall=True, endpoints=CREATES),
    ]


Create = Callable[[Job], Awaitable[tuple[str, str | None]]]
"""Creates a job's call; returns ``(outcome, id)``, sets ``attempt_id`` on unknown outcomes."""
Reconcile = Callable[[Job], Awaitable[str | None]]
"""Looks an unknown job up; returns the call's id, or None when there is none."""


@dataclass
class Lane:
    name: str
    provider: str
    create: Create
    reconcile: Reconcile
    breaker_log: BreakerLog
    workers: int
    definite: tuple[type[BaseException], ...] = ()  # the SDK's own API error types
    jobs: list[Job] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _unprocessed(exc: BaseException) -> bool:
    if isinstance(exc, ProviderError):
        return exc.kind in (FailureKind.UNPROCESSED, FailureKind.NOT_SENT)
    status = getattr(exc, "status", None)  # the twilio SDK's TwilioRestException
    return status == 429


async def run_job(lane: Lane, job: Job) -> None:
    """Create ``job`` once; try again only on refusals that prove nothing was sent."""
    job.started = time.time()
    while True:
        try:
            job.outcome, job.reported_id = await lane.create(job)
            return
        except OutcomeUnknownError as exc:
            job.outcome = "unknown"
            job.attempt_id = job.attempt_id or exc.attempt_id
            job.error = type(exc.__cause__).__name__ if exc.__cause__ else "OutcomeUnknownError"
            return
        except RejectedError as exc:
            job.rejections += 1
            if job.rejections >= MAX_REJECTIONS:
                job.outcome, job.error = "failed", type(exc).__name__
                return
            await anyio.sleep(min(max(exc.retry_after or 0.0, 0.005), 1.0))
        except (ResilientVoiceError, *lane.definite) as exc:
            if _unprocessed(exc) and job.resubmits < 20:
                job.resubmits += 1
                await anyio.sleep(0.05)
                continue
            job.outcome, job.error = "failed", type(exc).__name__
            return
        except Exception as exc:  # the figure the soak exists to catch
            lane.unexpected.append(f"{type(exc).__name__}: {exc}")
            job.outcome, job.error = "failed", type(exc).__name__
            return


async def run_lane_jobs(lane: Lane, jobs: Sequence[Job]) -> None:
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:  # one event loop: iterators are not shared across threads
            await run_job(lane, job)

    async with anyio.create_task_group() as tg:
        for _ in range(lane.workers):
            tg.start_soon(worker)


async def reconcile(lane: Lane, jobs: Iterable[Job]) -> None:
    """Resolve the lane's unknown outcomes through its client's reconciliation."""
    for job in jobs:
        if job.outcome != "unknown" or job.reconciled is not None:
            continue
        for _ in range(MAX_REJECTIONS):
            try:
                found = await lane.reconcile(job)
            except RejectedError as exc:
                await anyio.sleep(min(max(exc.retry_after or 0.0, 0.005), 1.0))
                continue
            except ResilientVoiceError:
                await anyio.sleep(0.1)
                continue
            job.reconciled = "absent" if found is None else "created"
            job.reconciled_id = found
            break


@dataclass
class PhaseTiming:
    name: str
    seconds: float
    outage_end: float | None = None  # monotonic, if the phase had an outage window
    finished: dict[str, float] = field(default_factory=dict)  # lane -> monotonic, last job done


async def run_phases(
    fake: FakeTelephony,
    lanes: Sequence[Lane],
    plan: Sequence[Phase],
    after_phase: Callable[[Phase], Awaitable[None]] | None = None,
) -> list[PhaseTiming]:
    """Run every lane's jobs through the phases; reconcile after each phase.

    ``after_phase`` runs last, once the phase's unknown outcomes are resolved and the fault
    script is cleared: the leased soak settles its call leases there.
    """
    timings: list[PhaseTiming] = []
    for number, phase in enumerate(plan):
        slices = []
        for lane in lanes:
            size = len(lane.jobs)
            part = lane.jobs[size * number // len(plan) : size * (number + 1) // len(plan)]
            for job in part:
                job.phase = phase.name
            slices.append((lane, part))
        start = time.monotonic()
        now = fake.elapsed()
        script = phase.faults(now)
        fake.faults = script
        outages = [f.end for f in script if f.kind == "error" and f.end != math.inf]
        finished: dict[str, float] = {}

        async def run_slice(
            lane: Lane, part: Sequence[Job], finished: dict[str, float] = finished
        ) -> None:
            await run_lane_jobs(lane, part)
            finished[lane.name] = time.monotonic()

        async with anyio.create_task_group() as tg:
            for lane, part in slices:
                tg.start_soon(run_slice, lane, part)
        rest = phase.min_seconds - (time.monotonic() - start)
        if rest > 0:
            await anyio.sleep(rest)
        fake.faults = []
        timings.append(
            PhaseTiming(
                phase.name,
                time.monotonic() - start,
                start + max(outages) - now if outages else None,
                finished,
            )
        )
        for lane, part in slices:
            await reconcile(lane, part)
        if after_phase is not None:
            await after_phase(phase)
    return timings


def judge(fake: FakeTelephony, lane: Lane, ids: dict[str, list[str]]) -> dict[str, Any]:
    """The lane's figures, against the provider's records (``ids``: number -> created ids)."""
    jobs = lane.jobs
    outcomes = Counter(j.outcome for j in jobs)
    duplicates = 0
    silent: list[str] = []
    wrong_reconciliation: list[str] = []
    for job in jobs:
        created = ids.get(job.number, [])
        duplicates += max(len(created) - 1, 0)
        if job.outcome == "placed" and job.reported_id not in created:
            silent.append(f"{job.number}: reported placed as {job.reported_id}, absent upstream")
        if job.outcome == "failed" and created:
            silent.append(f"{job.number}: reported failed ({job.error}), created upstream")
        if (
            job.outcome == "unknown"
            and job.reconciled is not None
            and (
                (job.reconciled == "created") != bool(created)
                or (job.reconciled_id is not None and job.reconciled_id not in created)
            )
        ):
            wrong_reconciliation.append(f"{job.number}: reconciled {job.reconciled}")
    unknown = [j for j in jobs if j.outcome == "unknown"]
    log = lane.breaker_log
    opens = log.open_durations()
    return {
        "creates": len(jobs),
        "placed": outcomes["placed"],
        "failed": outcomes["failed"],
        "unknown": len(unknown),
        "unknown_by_cause": dict(Counter(j.error for j in unknown)),
        "reconciled": sum(1 for j in unknown if j.reconciled is not None),
        "reconciled_created": sum(1 for j in unknown if j.reconciled == "created"),
        "reconciled_absent": sum(1 for j in unknown if j.reconciled == "absent"),
        "created_upstream": sum(1 for j in jobs if ids.get(j.number)),
        "duplicates": duplicates,
        "silent_losses": len(silent),
        "silent_loss_examples": silent[:5],
        "wrong_reconciliations": len(wrong_reconciliation),
        "wrong_reconciliation_examples": wrong_reconciliation[:5],
        "local_rejections": sum(j.rejections for j in jobs),
        "resubmitted_unprocessed": sum(j.resubmits for j in jobs),
        "unexpected_exceptions": len(lane.unexpected),
        "unexpected_examples": lane.unexpected[:5],
        "breaker_trips": log.trips(),
        "breaker_open_s_min": round(min(opens), 4) if opens else None,
        "breaker_open_s_max": round(max(opens), 4) if opens else None,
    }


def upstream_ids(fake: FakeTelephony) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for call in fake.calls():
        ids.setdefault(call.to, []).append(call.id)
    return ids


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def latency_figures(direct: Sequence[float], library: Sequence[float]) -> dict[str, Any]:
    def ms(x: float) -> float:
        return round(x * 1000, 3)

    return {
        "samples": len(direct),
        "direct_p50_ms": ms(percentile(direct, 0.5)),
        "direct_p99_ms": ms(percentile(direct, 0.99)),
        "library_p50_ms": ms(percentile(library, 0.5)),
        "library_p99_ms": ms(percentile(library, 0.99)),
        "added_p50_ms": ms(percentile(library, 0.5) - percentile(direct, 0.5)),
        "added_p99_ms": ms(percentile(library, 0.99) - percentile(direct, 0.99)),
        "added_mean_ms": ms(statistics.fmean(library) - statistics.fmean(direct)),
    }


def most_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most events inside any ``window`` seconds."""
    ordered = sorted(times)
    most = j = 0
    for i, start in enumerate(ordered):
        while j < len(ordered) and ordered[j] < start + window:
            j += 1
        most = max(most, j - i)
    return most


def since(job: Job, skew: float = 5.0) -> datetime:
    """The reconciliation window's start: the job's start, minus clock skew and 1 s rounding."""
    return datetime.fromtimestamp(job.started, UTC) - timedelta(seconds=skew)


def machine() -> dict[str, Any]:
    import os
    import platform

    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_figures(directory: Any, name: str, figures: dict[str, Any]) -> str:
    """Write ``figures`` as JSON under ``directory``; print a summary (``pytest -s``)."""
    figures = {"machine": machine(), **figures}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\n=== {name}: figures in {path}")  # noqa: T201  # the soak's report
    print(json.dumps(figures, indent=2, default=str))  # noqa: T201
    return str(path)


def dump_jobs(jobs: Iterable[Job]) -> list[dict[str, Any]]:
    return [asdict(j) for j in jobs]
