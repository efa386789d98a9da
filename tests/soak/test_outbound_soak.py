"""Outbound chaos soak: creates through the typed clients and the official SDKs, faults injected.

FakeTelephony runs under a real uvicorn on loopback (drops, lost bodies and stalls need real
sockets). Each create carries its own destination number, so the fake's record of the calls it
really created (the truth) can be compared with what every caller was told. Any duplicate, any
silent loss (told "placed" but absent, told "failed" but created), any wrong reconciliation and
any exception other than the library's typed errors (and the SDKs' own API errors) fails the
test. The figures are written as JSON (``RV_SOAK_DIR``, else a pytest tmp dir) and printed
(``pytest -s``); docs/reliability.md publishes the ``--soak-size full`` run.

Real time, bounded. Tolerances: the fake forgives ``CPS_TOLERANCE`` (0.25 s) of earliness before
counting a CPS violation; a breaker's open period is checked against ``recovery_timeout`` minus
5 ms (the listener's clock reading), and closing after an outage against ``recovery_timeout`` +
1.5 s of scheduling slack on a loaded machine.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from _lanes import fake_telephony, lanes
from _soak import (
    CPS_TOLERANCE,
    FROM,
    RECOVERY,
    SID,
    TIMEOUT,
    TOKEN,
    TWIML,
    VAPI_KEY,
    Job,
    dump_jobs,
    judge,
    latency_figures,
    most_in_window,
    number_of,
    phases,
    run_phases,
    upstream_ids,
    write_figures,
)

from resilient_voice.testing import FakeTelephony, Fault, serve
from resilient_voice.twilio import TwilioClient
from resilient_voice.vapi import VapiClient

HERE = Path(__file__).parent
# After an outage ends, a breaker under traffic closes within its recovery timeout (the next
# probe) plus this much slack for a loaded machine's scheduling.
CLOSE_BOUND = RECOVERY + 1.5


class Size:
    def __init__(self, soak_size: str) -> None:
        full = soak_size == "full"
        self.name = soak_size
        self.twilio = 10_000 if full else 300  # split evenly between the typed client and the SDK
        self.vapi = 2_000 if full else 100
        self.latency_samples = 1_000 if full else 100
        self.twilio_cps = 60.0 if full else 50.0  # per Twilio account (two accounts)
        self.workers = 8
        self.fleet_per_process = 1_000 if full else 60
        self.fleet_cps = 60.0 if full else 40.0
        # The Vapi lane of the same run: one org, paced apart from the Twilio account, side by
        # side with it, so it adds about nothing to the wall time.
        # The parent reconciles the Vapi unknowns after the run (reconcile_call reads back
        # through the listing pages until it finds the attempt; docs/reliability.md).
        self.fleet_vapi_per_process = 300 if full else 30
        self.fleet_vapi_cps = 30.0 if full else 20.0


@pytest.fixture
def figures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("RV_SOAK_DIR")
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("soak")


async def measure_latency(url: str, samples: int) -> dict[str, Any]:
    """Creates with no faults: straight httpx against the same endpoint, then the typed client
    (pacing at an unreachable rate, so no wait is measured), interleaved to share any drift."""
    sid = SID["latency"]
    path = f"{url}/2010-04-01/Accounts/{sid}/Calls.json"
    direct: list[float] = []
    library: list[float] = []
    async with (
        httpx.AsyncClient(auth=(sid, TOKEN)) as raw,
        TwilioClient(sid, TOKEN, base_url=url, calls_per_second=1e6, timeout=5.0) as client,
    ):
        for index in range(samples + 20):  # the first 10 of each warm the connections up
            form = {"To": number_of("latency", 2 * index), "From": FROM, "Url": TWIML}
            start = time.perf_counter()
            response = await raw.post(path, data=form)
            took = time.perf_counter() - start
            assert response.status_code == 201
            start = time.perf_counter()
            await client.create_call(to=number_of("latency", 2 * index + 1), from_=FROM, url=TWIML)
            took_library = time.perf_counter() - start
            if index >= 20:
                direct.append(took)
                library.append(took_library)
    return latency_figures(direct, library)


def check(figures: dict[str, Any]) -> None:
    """The soak's guarantees, over every lane."""
    for name, lane in figures["lanes"].items():
        assert lane["duplicates"] == 0, (name, lane)
        assert lane["silent_losses"] == 0, (name, lane)
        assert lane["wrong_reconciliations"] == 0, (name, lane)
        assert lane["unexpected_exceptions"] == 0, (name, lane)
        assert lane["reconciled"] == lane["unknown"], (name, lane)  # every unknown resolved
        assert lane["placed"] + lane["failed"] + lane["unknown"] == lane["creates"], name
        assert lane["breaker_open_s_min"] is None or lane["breaker_open_s_min"] >= RECOVERY - 0.005
    assert figures["unexpected_upstream_calls"] == 0
    assert figures["cps_violations"] == 0, figures["cps_violations"]


async def test_outbound_chaos_soak(soak_size: str, figures_dir: Path, anyio_backend: str) -> None:
    size = Size(soak_size)
    if anyio_backend == "trio" and size.name == "short":
        # Both backends run every phase; CI affords the short size once, so split it.
        size.twilio, size.vapi, size.latency_samples = 150, 50, 50
    fake = fake_telephony(size.twilio_cps)
    started = time.monotonic()
    async with serve(fake) as url:
        latency = await measure_latency(url, size.latency_samples)
        vapi_cps = size.twilio_cps * size.vapi / size.twilio
        async with lanes(
            fake, url, twilio_cps=size.twilio_cps, vapi_cps=vapi_cps, workers=size.workers
        ) as built:
            counts = {
                "twilio-typed": size.twilio // 2,
                "twilio-sdk": size.twilio - size.twilio // 2,
                "vapi-typed": size.vapi // 2,
                "vapi-sdk": size.vapi - size.vapi // 2,
            }
            for name, lane in built.items():
                lane.jobs = [Job(name, i, number_of(name, i)) for i in range(counts[name])]
            plan = phases()
            timings = await run_phases(fake, list(built.values()), plan)
            await anyio.sleep(0.2)  # let the server thread finish anything still in flight
            ids = upstream_ids(fake)
            lane_figures = {name: judge(fake, lane, ids) for name, lane in built.items()}
            # How long after an outage's end each breaker that was open closed again. Checked
            # for a lane still sending when the first probe after the outage was due: an idle
            # lane's breaker stays OPEN until its next call (the transition is lazy), which is
            # not a late close.
            closes: dict[str, float | None] = {}
            must_close: list[str] = []
            for timing in timings:
                end = timing.outage_end
                if end is None:
                    continue
                for name, lane in built.items():
                    if not lane.breaker_log.open_at(end):
                        continue
                    closed = lane.breaker_log.closed_after(end)
                    where = f"{name}@{timing.name}"
                    closes[where] = None if closed is None else round(closed, 3)
                    if timing.finished.get(name, 0.0) > end + RECOVERY:
                        must_close.append(where)
            known = {job.number for lane in built.values() for job in lane.jobs}
            jobs = [job for lane in built.values() for job in lane.jobs]
    gc.collect()  # what the faults left unfinished is finalized here, under this test's filter
    # The latency lane's calls are expected too.
    known |= {call.to for call in fake.calls() if call.account == SID["latency"]}
    creates = [r for r in fake.requests("twilio.calls.create") if r.auth_user in SID.values()]
    per_account = {
        name: [r.time for r in creates if r.auth_user == SID[name]]
        for name in ("twilio-typed", "twilio-sdk")
    }
    figures: dict[str, Any] = {
        "command": f"pytest -m soak --soak-size {size.name} tests/soak/test_outbound_soak.py -s",
        "backend": anyio_backend,
        "size": size.name,
        "wall_seconds": round(time.monotonic() - started, 1),
        "twilio_cps_per_account": size.twilio_cps,
        "cps_tolerance_s": 0.25,
        "breaker": {"failure_threshold": 5, "recovery_timeout_s": RECOVERY, "timeout_s": TIMEOUT},
        "phases": [{"name": t.name, "seconds": round(t.seconds, 2)} for t in timings],
        "lanes": lane_figures,
        "totals": {
            key: sum(lane[key] for lane in lane_figures.values())
            for key in (
                "creates",
                "placed",
                "failed",
                "unknown",
                "reconciled",
                "duplicates",
                "silent_losses",
                "local_rejections",
                "unexpected_exceptions",
            )
        },
        "requests_upstream": len(fake.requests()),
        "cps_violations": fake.cps_violations(SID["twilio-typed"])
        + fake.cps_violations(SID["twilio-sdk"]),
        "most_create_attempts_in_1s": {k: most_in_window(v) for k, v in per_account.items()},
        "breaker_closed_s_after_outage_end": closes,
        "breaker_close_checked": must_close,
        "latency_no_faults": latency,
        "unexpected_upstream_calls": sum(1 for c in fake.calls() if c.to not in known),
    }
    name = f"outbound-soak-{size.name}-{anyio_backend}"
    write_figures(figures_dir, name, figures)
    (figures_dir / f"{name}-jobs.json").write_text(json.dumps(dump_jobs(jobs)), encoding="utf-8")
    check(figures)
    for where in must_close:
        closed = closes[where]
        assert closed is not None, where
        assert closed <= CLOSE_BOUND, (where, closed)
    for attempts in figures["most_create_attempts_in_1s"].values():
        # Every attempt (retries too) pays a token: at most rate + burst in any second, plus
        # what the fake's tolerance lets through after a late wake-up.
        assert attempts <= size.twilio_cps * (1 + 0.25) + 1, figures["most_create_attempts_in_1s"]


def _fleet_worker_command(options: dict[str, Any]) -> list[str]:
    return [sys.executable, str(HERE / "_fleet_worker.py"), json.dumps(options)]


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the parent only serves; workers vary
async def test_outbound_soak_from_three_processes_sharing_redis(
    soak_size: str, figures_dir: Path, anyio_backend: str
) -> None:
    """Three OS processes (two on asyncio, one on trio) create on one Twilio account and one Vapi
    org, each paced together through the Redis store; the fake served here counts duplicates and
    Twilio CPS violations, and the Vapi creations are checked against the org's pace here."""
    from _redis import REDIS_URL, fresh_prefix
    from _together import run_together

    size = Size(soak_size)
    fake = fake_telephony(size.fleet_cps)
    prefix = fresh_prefix()
    started = time.monotonic()
    async with serve(fake) as url:
        fake.faults = [
            Fault.error_rate(0.03, status=500, endpoints="*.calls.create"),
            Fault.rate_limited(0.05, retry_after=0.05, endpoints="*.calls.create"),
            Fault.drop_after(0.02, endpoints="*.calls.create"),
            Fault.drop_before(0.02, endpoints="*.calls.create"),
            Fault.drop_mid_body(0.02, endpoints="*.calls.create"),
        ]
        commands = [
            _fleet_worker_command(
                {
                    "url": url,
                    "redis": REDIS_URL,
                    "prefix": prefix,
                    "sid": SID["fleet"],
                    "token": TOKEN,
                    "worker": index,
                    "count": size.fleet_per_process,
                    "cps": size.fleet_cps,
                    "tasks": 4,
                    "backend": "trio" if index == 2 else "asyncio",
                    "vapi_key": VAPI_KEY,
                    "vapi_count": size.fleet_vapi_per_process,
                    "vapi_cps": size.fleet_vapi_cps,
                    "assistant": fake.vapi_assistants()[0]["id"],
                    "phone": fake.vapi_phone_numbers()[0]["id"],
                }
            )
            for index in range(3)
        ]
        path = [str(HERE), str(HERE.parent), *sys.path]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        # The processes import and connect, then are released together (_together).
        outputs = await anyio.to_thread.run_sync(
            lambda: run_together(commands, env=env, timeout=600)
        )
        fake.faults = []
        jobs = [Job(**row) for output in outputs for row in output["jobs"]]
        vapi_jobs = [Job(**row) for output in outputs for row in output["vapi_jobs"]]
        async with (
            TwilioClient(SID["fleet"], TOKEN, base_url=url) as reader,
            VapiClient(VAPI_KEY, base_url=url) as vapi_reader,
        ):
            from _soak import BreakerLog, Lane, reconcile, since

            async def find(job: Job) -> str | None:
                found = await reader.reconcile_call(to=job.number, since=since(job))
                return found[0].sid if found else None

            async def vapi_find(job: Job) -> str | None:
                # As the single-process soak: the attempt id planted in the call's metadata.
                assert job.attempt_id is not None
                found = await vapi_reader.reconcile_call(
                    job.attempt_id, created_after=since(job), limit=1000
                )
                return None if found is None else found.id

            lane = Lane("fleet", "twilio", None, find, BreakerLog("fleet"), 1)  # type: ignore[arg-type]
            lane.jobs = jobs
            vapi_lane = Lane("fleet-vapi", "vapi", None, vapi_find, BreakerLog("fleet-vapi"), 1)  # type: ignore[arg-type]
            vapi_lane.jobs = vapi_jobs
            for output in outputs:
                lane.unexpected.extend(output["unexpected"])
                vapi_lane.unexpected.extend(output["vapi_unexpected"])
            await reconcile(lane, jobs)
            await reconcile(vapi_lane, vapi_jobs)
        await anyio.sleep(0.2)
    ids = upstream_ids(fake)
    result = judge(fake, lane, ids)
    vapi_result = judge(fake, vapi_lane, ids)
    times = [r.time for r in fake.requests("twilio.calls.create") if r.auth_user == SID["fleet"]]
    vapi_requests = fake.requests("vapi.calls.create")
    vapi_times = [r.time for r in vapi_requests]
    figures = {
        "command": f"pytest -m soak --soak-size {size.name} tests/soak/test_outbound_soak.py -s",
        "size": size.name,
        "processes": 3,
        "wall_seconds": round(time.monotonic() - started, 1),
        "shared_cps": size.fleet_cps,
        "fleet": result,
        "cps_violations": fake.cps_violations(SID["fleet"]),
        "most_create_attempts_in_1s": most_in_window(times),
        "per_process_creates": [len(o["jobs"]) for o in outputs],
        "vapi_shared_cps": size.fleet_vapi_cps,
        "fleet_vapi": vapi_result,
        # The fake counts CPS violations for Twilio only: the same GCRA, on the Vapi creations.
        "vapi_cps_violations": gcra_violations(
            [r.time for r in vapi_requests if r.created is not None], size.fleet_vapi_cps
        ),
        "vapi_most_create_attempts_in_1s": most_in_window(vapi_times),
        "vapi_per_process_creates": [len(o["vapi_jobs"]) for o in outputs],
    }
    write_figures(figures_dir, f"outbound-soak-3-processes-{size.name}", figures)
    assert len(jobs) == 3 * size.fleet_per_process
    assert result["duplicates"] == 0, result
    assert result["silent_losses"] == 0, result
    assert result["wrong_reconciliations"] == 0, result
    assert result["unexpected_exceptions"] == 0, result
    assert result["reconciled"] == result["unknown"], result
    assert figures["cps_violations"] == 0, figures
    assert figures["most_create_attempts_in_1s"] <= size.fleet_cps * 1.25 + 1, figures
    assert sum(1 for c in fake.calls() if c.account == SID["fleet"]) == result["created_upstream"]
    assert len(vapi_jobs) == 3 * size.fleet_vapi_per_process
    assert vapi_result["duplicates"] == 0, vapi_result
    assert vapi_result["silent_losses"] == 0, vapi_result
    assert vapi_result["wrong_reconciliations"] == 0, vapi_result
    assert vapi_result["unexpected_exceptions"] == 0, vapi_result
    assert vapi_result["reconciled"] == vapi_result["unknown"], vapi_result
    assert figures["vapi_cps_violations"] == 0, figures
    assert figures["vapi_most_create_attempts_in_1s"] <= size.fleet_vapi_cps * 1.25 + 1, figures
    assert len(fake.calls("vapi")) == vapi_result["created_upstream"]


def gcra_violations(times: list[float], cps: float, tolerance: float = CPS_TOLERANCE) -> int:
    """Creations earlier than a burst-1 bucket at ``cps`` allows, less ``tolerance`` seconds:
    the definition FakeTelephony applies to Twilio accounts (its class docstring)."""
    tat = -math.inf
    violations = 0
    for t in sorted(times):
        if t < tat - tolerance:
            violations += 1  # an early creation does not move the schedule
        else:
            tat = max(tat, t) + 1 / cps
    return violations


def test_gcra_violations_counts_an_unpaced_burst() -> None:
    assert gcra_violations([0.0, 0.1, 0.2, 0.3], cps=10.0) == 0
    assert gcra_violations([0.0] * 5, cps=10.0, tolerance=0.25) == 2


def test_fake_counts_what_the_soak_counts() -> None:
    """The judge itself: a duplicate and both kinds of silent loss are seen."""
    from _soak import BreakerLog, Lane

    fake = FakeTelephony()
    lane = Lane("x", "twilio", None, None, BreakerLog("x"), 1)  # type: ignore[arg-type]
    lane.jobs = [
        Job("x", 0, "+1", outcome="placed", reported_id="CA1"),
        Job("x", 1, "+2", outcome="failed"),
        Job("x", 2, "+3", outcome="placed", reported_id="CA3"),
        Job("x", 3, "+4", outcome="unknown", reconciled="absent"),
    ]
    ids = {"+1": ["CA1", "CA9"], "+2": ["CA2"], "+4": ["CA4"]}
    result = judge(fake, lane, ids)
    assert result["duplicates"] == 1
    assert result["silent_losses"] == 2  # +2 failed but created, +3 placed but absent
    assert result["wrong_reconciliations"] == 1
