"""The outbound chaos soak with call leases: the same phases, creates that hold leases.

Two lanes (``TwilioClient`` and ``VapiClient``, each with ``leases=CallLeases(...)`` of a small
capacity) run through the soak's nine fault phases (tests/soak/_soak.py) against a FakeTelephony
served on loopback whose calls live a fraction of a second. Its signed status callbacks and
end-of-call reports, lost (5 %), duplicated (10 %) and reordered (20 %), go to a receiver served
on loopback too: the signature guard outside ``LeaseReleaseMiddleware`` (see tests/soak/_leased.py
for how it reaches the lease sets in the test's loop). ``reconcile_leases()`` runs every
``RECONCILE_PERIOD`` seconds, as an operator's job would, and after each phase until every lease
is free; an unknown outcome with no call is released only once its lease is ``SETTLE_AFTER`` old
(tests/soak/_leased.py says why that bounds how late the fake can still create its call).

What fails the test, besides the soak's own guarantees (no duplicate, no silent loss, every
unknown outcome resolved, no CPS violation): more calls in progress upstream than a lane's
capacity (the fake's own count), a lease released twice or never, releases that do not add up
to the leases acquired, a lease left in use or unknown after a phase's reconciliation, a lease
reclaimed by its TTL (reconciliation runs long before the TTL), a webhook the receiver refused
or failed on (a delivery that timed out on a loaded machine is counted, not failed). Real time,
bounded: calls end within 0.32 s of their create, phases settle within ``SETTLE_BOUND`` seconds;
the fake forgives ``CPS_TOLERANCE`` of earliness as in the main soak.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from _leased import (
    SETTLE_AFTER,
    SID,
    Bridge,
    LeasedLane,
    LeaseLedger,
    Received,
    lease_figures,
    leased_fake,
    leased_lanes,
    receiver,
    reconcile_every,
    settler,
)
from _soak import (
    RECOVERY,
    BreakerLog,
    Job,
    Lane,
    dump_jobs,
    judge,
    most_in_window,
    number_of,
    phases,
    run_phases,
    upstream_ids,
    write_figures,
)

from resilient_voice import CallLeases
from resilient_voice.events import LeaseAcquired, LeaseReleased
from resilient_voice.testing import serve

CAPACITY = 4
TTL = 60.0  # far longer than any call here: a TTL reclaim would mean reconciliation missed one
RECONCILE_PERIOD = 0.5
# An unknown outcome with no call is released SETTLE_AFTER after its mark, then 10 s of slack.
SETTLE_BOUND = SETTLE_AFTER + 10.0


class Size:
    def __init__(self, soak_size: str, backend: str) -> None:
        full = soak_size == "full"
        self.name = soak_size
        self.twilio = 3_000 if full else 90
        self.vapi = 1_500 if full else 45
        if backend == "trio" and not full:
            # Both backends run every phase; CI affords the short size once, so split it.
            self.twilio, self.vapi = 45, 24
        self.twilio_cps = 60.0 if full else 50.0
        self.vapi_cps = 20.0
        self.workers = 2 * CAPACITY  # so that creates queue for leases


@pytest.fixture
def figures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("RV_SOAK_DIR")
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("soak")


def check_lanes(figures: dict[str, Any]) -> None:
    """The soak's guarantees, then the leases', over both lanes."""
    for name, lane in figures["lanes"].items():
        assert lane["duplicates"] == 0, (name, lane)
        assert lane["silent_losses"] == 0, (name, lane)
        assert lane["wrong_reconciliations"] == 0, (name, lane)
        assert lane["unexpected_exceptions"] == 0, (name, lane)
        assert lane["reconciled"] == lane["unknown"], (name, lane)
        assert lane["placed"] + lane["failed"] + lane["unknown"] == lane["creates"], name
        assert lane["breaker_open_s_min"] is None or lane["breaker_open_s_min"] >= RECOVERY - 0.005
        leases = lane["leases"]
        assert lane["peak_calls_in_progress"] <= leases["capacity"], (name, lane)
        assert leases["most_held_at_once"] <= leases["capacity"], (name, leases)
        assert leases["released_in_all"] == leases["acquired"], (name, leases)
        assert leases["leases_released_twice"] == 0, (name, leases)
        assert leases["leases_never_released"] == 0, (name, leases)
        assert leases["in_use_at_end"] == 0, (name, leases)
        assert leases["reclaimed_by_ttl"] == 0, (name, leases)
        # One lease per try of a create (a refusal that sent nothing released its lease).
        assert leases["acquired"] == leases["create_tries"], (name, leases)
        # What lease.release() freed beyond the tries that created nothing for certain were
        # unknown outcomes that reconciliation found without a live call; it bound the rest.
        assert 0 <= leases["unknown_released_by_reconcile_leases"] <= lane["unknown"], leases
        # Nothing in this run signals a capacity problem: the fake refuses no call.
        assert leases["capacity_signals"] == 0, (name, leases)
        assert leases["effective_capacity_at_end"] == leases["capacity"], (name, leases)
    for row in figures["after_each_phase"]:
        assert not any(row["in_use"].values()), row
        assert not any(row["unknown"].values()), row  # every unknown outcome settled
    assert figures["unexpected_upstream_calls"] == 0
    assert figures["cps_violations"] == 0, figures["cps_violations"]
    webhooks = figures["webhooks"]
    assert webhooks["receiver_errors"] == [], webhooks
    assert set(webhooks["receiver_statuses"]) == {"204"}, webhooks
    assert webhooks["refused"] == 0, webhooks


@pytest.mark.filterwarnings(
    # As in test_outbound_soak.py: httpcore's abandoned request-body iterator on trio.
    "ignore:Exception ignored in.*ByteStream.__aiter__:pytest.PytestUnraisableExceptionWarning"
)
async def test_outbound_chaos_soak_with_call_leases(
    soak_size: str, figures_dir: Path, anyio_backend: str
) -> None:
    size = Size(soak_size, anyio_backend)
    started = time.monotonic()
    received = Received()
    after: list[dict[str, Any]] = []
    # The receiver needs the lease sets, which the lanes build: a late-bound app.
    app: dict[str, Any] = {}

    async def late(scope: Any, receive: Any, send: Any) -> None:
        await app["receiver"](scope, receive, send)

    async with serve(Bridge(late, received)) as hook_url:
        fake = leased_fake(hook_url, size.twilio_cps)
        async with (
            serve(fake) as url,
            leased_lanes(
                url,
                hook_url,
                fake,
                capacity=CAPACITY,
                ttl=TTL,
                twilio_cps=size.twilio_cps,
                vapi_cps=size.vapi_cps,
                workers=size.workers,
            ) as built,
        ):
            app["receiver"] = receiver(built[0].leases, built[1].leases, received)
            counts = {"twilio-leased": size.twilio, "vapi-leased": size.vapi}
            for leased in built:
                name = leased.lane.name
                leased.lane.jobs = [Job(name, i, number_of(name, i)) for i in range(counts[name])]
            with anyio.fail_after(3600 if size.name == "full" else 300):
                async with anyio.create_task_group() as group:
                    group.start_soon(reconcile_every, built, RECONCILE_PERIOD)
                    timings = await run_phases(
                        fake,
                        [leased.lane for leased in built],
                        phases(),
                        settler(built, SETTLE_BOUND, after),
                    )
                    group.cancel_scope.cancel()
            ids = upstream_ids(fake)
            lane_figures: dict[str, Any] = {}
            for leased in built:
                lane = leased.lane
                figures = judge(fake, lane, ids)
                figures["leases"] = lease_figures(leased, figures)
                figures["peak_calls_in_progress"] = (
                    fake.peak_calls_in_progress("twilio", account=SID)
                    if lane.provider == "twilio"
                    else fake.peak_calls_in_progress("vapi")
                )
                lane_figures[lane.name] = figures
            jobs = [job for leased in built for job in leased.lane.jobs]
            known = {job.number for job in jobs}
    gc.collect()  # what the faults left unfinished is finalized here, under this test's filter
    callbacks = fake.callbacks()
    delivered = [c for c in callbacks if not c.lost]
    creates = [r.time for r in fake.requests("twilio.calls.create") if r.auth_user == SID]
    figures = {
        "command": (
            f"pytest -m soak --soak-size {size.name} tests/soak/test_outbound_soak_leased.py -s"
        ),
        "backend": anyio_backend,
        "size": size.name,
        "wall_seconds": round(time.monotonic() - started, 1),
        "capacity_per_lane": CAPACITY,
        "ttl_s": TTL,
        "reconcile_period_s": RECONCILE_PERIOD,
        "twilio_cps": size.twilio_cps,
        "phases": [{"name": t.name, "seconds": round(t.seconds, 2)} for t in timings],
        "after_each_phase": after,
        "lanes": lane_figures,
        "webhooks": {
            "sent_by_the_fake": len(delivered),
            "lost_on_purpose": len(callbacks) - len(delivered),
            "duplicated_on_purpose": sum(1 for c in delivered if c.duplicate),
            # A delivery can time out (2 s) on a loaded machine: counted, the lease then
            # comes back by reconciliation. An answer other than 2xx would be a refusal.
            "transport_errors": sum(1 for c in delivered if c.error is not None),
            "refused": sum(
                1
                for c in delivered
                if c.response_status is not None and not 200 <= c.response_status < 300
            ),
            "receiver_statuses": {str(k): v for k, v in sorted(received.statuses.items())},
            "receiver_paths": dict(received.paths),
            "receiver_errors": received.errors[:5],
        },
        "cps_violations": fake.cps_violations(SID),
        "most_create_attempts_in_1s": most_in_window(creates),
        "unexpected_upstream_calls": sum(1 for c in fake.calls() if c.to not in known),
    }
    name = f"outbound-soak-leased-{size.name}-{anyio_backend}"
    write_figures(figures_dir, name, figures)
    (figures_dir / f"{name}-jobs.json").write_text(json.dumps(dump_jobs(jobs)), encoding="utf-8")
    check_lanes(figures)
    assert figures["most_create_attempts_in_1s"] <= size.twilio_cps * 1.25 + 1, figures


async def test_the_ledger_counts_what_the_leased_soak_checks() -> None:
    """The lease accounting itself: a release, a duplicate, a lease never released."""
    ledger = LeaseLedger()
    leases = CallLeases("ledger", 3, ttl=60.0, listeners=[ledger])
    first = await leases.acquire()
    second = await leases.acquire()
    third = await leases.acquire()
    await leases.bind(first, "CA1")
    assert await leases.release("CA1") is True
    assert await leases.release("CA1") is False  # a duplicate webhook frees nothing
    await leases.mark_unknown(third, "attempt-3")
    await third.release()  # as reconcile_leases() does when no call is live, settle_after on
    lane = Lane("x", "twilio", None, None, BreakerLog("x"), 1)  # type: ignore[arg-type]
    judged = {"creates": 3, "failed": 0, "local_rejections": 0, "resubmitted_unprocessed": 0}
    leased = LeasedLane(lane, None, leases, ledger)  # type: ignore[arg-type]
    figures = lease_figures(leased, {**judged, "unknown": 1})
    assert figures["acquired"] == figures["create_tries"] == 3
    assert figures["released_by_webhook"] == 1
    assert figures["released_by_lease_release"] == 1
    assert figures["unknown_released_by_reconcile_leases"] == 1
    assert figures["unknown_bound_by_reconcile_leases"] == 0
    assert figures["released_in_all"] == 2
    assert figures["leases_never_released"] == 1
    assert figures["most_held_at_once"] == 3
    assert second.id in ledger.acquired - set(ledger.releases)
    ledger(
        LeaseReleased(source="ledger", lease_id=first.id, call_id="CA1", reason="webhook", in_use=0)
    )
    assert lease_figures(leased, {**judged, "unknown": 1})["leases_released_twice"] == 1
    ledger(LeaseAcquired(source="ledger", lease_id="z", generation=9, waited=0.5, in_use=1))
    assert ledger.most_waited == 0.5


def test_the_report_renders_the_lease_rows() -> None:
    """tests/soak/_report.py adds the lease rows for the leased lanes only."""
    from _report import lanes_table

    plain = {"x": {"creates": 3}}
    leased = {"x": {"creates": 3, "peak_calls_in_progress": 2, "leases": {"acquired": 3}}}
    assert "leases acquired" not in lanes_table(plain)
    table = lanes_table(leased)
    assert "| leases acquired (one per try of a create) | 3 |" in table
    assert "| **most calls in progress upstream at once** | 2 |" in table
    assert "| ... reclaimed by TTL | - |" in table
