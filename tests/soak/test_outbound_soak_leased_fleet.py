"""The leased soak from three processes sharing one lease set in Redis, under faults.

Three OS processes (two on asyncio, one on trio; tests/soak/_leased_fleet_worker.py) create
calls on one Twilio account through ``TwilioClient(..., leases=CallLeases(..., store=redis))``,
paced together through the same Redis, against the fake served here with faults throughout
(500 3 %, 429 5 %, drop after 2 %, drop before 2 %, lost 2xx body 2 %) and its webhooks lost,
duplicated and reordered as in the single-process leased soak. The receiver served here (the
signature guard outside ``LeaseReleaseMiddleware``) holds the same lease set, built in the
server's own loop. Each worker runs ``reconcile_leases()`` periodically and settles its own
unknown outcomes at the end; the parent reconciles once more, then checks the fake's records
and every process's lease events together: never more calls in progress than the capacity,
every lease released exactly once across the four processes, none left.

Real time, bounded: the workers start together 4 s after launch (imports, connections), and
each must finish within 300 s; calls end within 0.32 s of their create.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from _leased import (
    CALLBACK_DELAY,
    CALLBACK_FAULTS,
    RING,
    SETTLE,
    TALK,
    LeaseLedger,
    receiver,
)
from _soak import (
    CPS_TOLERANCE,
    TOKEN,
    BreakerLog,
    Job,
    Lane,
    judge,
    most_in_window,
    reconcile,
    since,
    upstream_ids,
    write_figures,
)

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix
from resilient_voice import CallLeases
from resilient_voice.events import Event, LeaseReleased
from resilient_voice.redis import RedisBackend
from resilient_voice.testing import FakeTelephony, Fault, serve
from resilient_voice.twilio import TwilioClient

pytestmark = [COREDIS_CANCEL_LEAK, pytest.mark.slow]
__all__ = ["collect_coredis_garbage"]

HERE = Path(__file__).parent
SID = "AC" + "f" * 32
CAPACITY = 4  # for the whole fleet
TTL = 60.0
NAME = "fleet-leased"


@pytest.fixture
def figures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("RV_SOAK_DIR")
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("soak")


class Receiver:
    """The webhook app; its lease set (on Redis) is built in the server's own event loop."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._app: Any = None
        self.ledger = LeaseLedger()
        self.releases: list[list[str]] = []

    def _heard(self, event: Event) -> None:
        self.ledger(event)
        if isinstance(event, LeaseReleased):
            self.releases.append([event.lease_id, event.reason])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self._app(scope, receive, send)
            return
        await receive()
        async with RedisBackend.from_url(REDIS_URL, prefix=self._prefix, timeout=1.0) as backend:
            leases = CallLeases(NAME, CAPACITY, ttl=TTL, store=backend, listeners=[self._heard])
            self._app = receiver(leases)
            await send({"type": "lifespan.startup.complete"})
            await receive()
        await send({"type": "lifespan.shutdown.complete"})


def _worker(options: dict[str, Any]) -> list[str]:
    return [sys.executable, str(HERE / "_leased_fleet_worker.py"), json.dumps(options)]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the parent only serves; workers vary
async def test_leased_soak_from_three_processes_sharing_redis(
    soak_size: str, figures_dir: Path, anyio_backend: str
) -> None:
    per_process = 400 if soak_size == "full" else 30
    cps = 40.0
    prefix = fresh_prefix()
    started = time.monotonic()
    hooks = Receiver(prefix)
    fake = FakeTelephony(
        seed=29,
        twilio_accounts={SID: TOKEN},
        calls_per_second={SID: cps},
        cps_tolerance=CPS_TOLERANCE,
        call_duration=TALK,
        ring_duration=RING,
        callback_delay=CALLBACK_DELAY,
        callback_faults=CALLBACK_FAULTS,
    )
    async with serve(hooks) as hook_url, serve(fake) as url:
        fake.faults = [
            Fault.error_rate(0.03, status=500, endpoints="*.calls.create"),
            Fault.rate_limited(0.05, retry_after=0.05, endpoints="*.calls.create"),
            Fault.drop_after(0.02, endpoints="*.calls.create"),
            Fault.drop_before(0.02, endpoints="*.calls.create"),
            Fault.drop_mid_body(0.02, endpoints="*.calls.create"),
        ]
        start_at = time.time() + 4.0
        commands = [
            _worker(
                {
                    "url": url,
                    "hook": hook_url,
                    "redis": REDIS_URL,
                    "prefix": prefix,
                    "sid": SID,
                    "token": TOKEN,
                    "worker": index,
                    "count": per_process,
                    "cps": cps,
                    "capacity": CAPACITY,
                    "ttl": TTL,
                    "tasks": 4,
                    "period": 0.5,
                    "start_at": start_at,
                    "backend": "trio" if index == 2 else "asyncio",
                }
            )
            for index in range(3)
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
        processes = [
            subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            for c in commands
        ]
        outputs = []
        for process in processes:
            out, err = await anyio.to_thread.run_sync(lambda p=process: p.communicate(timeout=300))
            assert process.returncode == 0, err.decode()[-3000:]
            outputs.append(json.loads(out))
        fake.faults = []
        await anyio.sleep(SETTLE)
        final = LeaseLedger()
        final_releases: list[list[str]] = []

        def heard(event: Event) -> None:
            final(event)
            if isinstance(event, LeaseReleased):
                final_releases.append([event.lease_id, event.reason])

        async with RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as backend:
            leases = CallLeases(NAME, CAPACITY, ttl=TTL, store=backend, listeners=[heard])
            async with TwilioClient(SID, TOKEN, base_url=url, leases=leases) as reader:
                # Frees what the workers' last reconciliations could not yet see as ended.
                await reader.reconcile_leases()
                left_unknown = len(await leases.unknown())
                in_use = leases.statistics().in_use
                jobs = [Job(**row) for output in outputs for row in output["jobs"]]

                async def find(job: Job) -> str | None:
                    found = await reader.reconcile_call(to=job.number, since=since(job))
                    return found[0].sid if found else None

                lane = Lane("fleet-leased", "twilio", None, find, BreakerLog("x"), 1)  # type: ignore[arg-type]
                lane.jobs = jobs
                for output in outputs:
                    lane.unexpected.extend(output["unexpected"])
                await reconcile(lane, jobs)
        await anyio.sleep(0.2)
    ids = upstream_ids(fake)
    result = judge(fake, lane, ids)
    acquired = [lease for output in outputs for lease in output["acquired"]]
    releases = [
        *(r for output in outputs for r in output["releases"]),
        *hooks.releases,
        *final_releases,
    ]
    per_lease = Counter(lease_id for lease_id, _ in releases)
    reasons = Counter(reason for _, reason in releases)
    creates = [r.time for r in fake.requests("twilio.calls.create") if r.auth_user == SID]
    callbacks = fake.callbacks()
    figures = {
        "command": (
            f"pytest -m soak --soak-size {soak_size} tests/soak/test_outbound_soak_leased_fleet.py"
            " -s"
        ),
        "size": soak_size,
        "processes": 3,
        "wall_seconds": round(time.monotonic() - started, 1),
        "capacity": CAPACITY,
        "shared_cps": cps,
        "fleet": result,
        "peak_calls_in_progress": fake.peak_calls_in_progress("twilio", account=SID),
        "leases": {
            "acquired": len(acquired),
            "released_by_webhook": reasons["webhook"],
            "released_by_lease_release": reasons["lease"],
            "reclaimed_by_reconcile": reasons["reconcile"],
            "reclaimed_by_ttl": reasons["ttl"],
            "released_in_all": sum(reasons.values()),
            "released_twice": sum(1 for n in per_lease.values() if n > 1),
            "never_released": len(set(acquired) - set(per_lease)),
            "released_but_never_acquired": len(set(per_lease) - set(acquired)),
            "in_use_at_end": in_use,
            "unknown_at_end": left_unknown,
            "unsettled_per_worker": [o["unsettled"] for o in outputs],
            "most_held_at_once_per_worker": [o["most_in_use"] for o in outputs],
            "reconcile_failures_per_worker": [o["reconcile_failures"] for o in outputs],
        },
        "webhooks_delivered": sum(1 for c in callbacks if not c.lost),
        "webhooks_lost_on_purpose": sum(1 for c in callbacks if c.lost),
        # A delivery can time out on a loaded machine: counted; any answer must be 2xx.
        "webhook_transport_errors": sum(1 for c in callbacks if c.error is not None),
        "webhooks_refused": sum(
            1
            for c in callbacks
            if c.response_status is not None and not 200 <= c.response_status < 300
        ),
        "cps_violations": fake.cps_violations(SID),
        "most_create_attempts_in_1s": most_in_window(creates),
        "per_process_creates": [len(o["jobs"]) for o in outputs],
    }
    write_figures(figures_dir, f"outbound-soak-leased-3-processes-{soak_size}", figures)
    assert len(jobs) == 3 * per_process
    assert result["duplicates"] == 0, result
    assert result["silent_losses"] == 0, result
    assert result["wrong_reconciliations"] == 0, result
    assert result["unexpected_exceptions"] == 0, result
    assert result["reconciled"] == result["unknown"], result
    assert figures["peak_calls_in_progress"] <= CAPACITY, figures
    leased = figures["leases"]
    assert isinstance(leased, dict)
    assert leased["released_in_all"] == leased["acquired"], leased
    assert leased["released_twice"] == leased["never_released"] == 0, leased
    assert leased["released_but_never_acquired"] == 0, leased
    assert leased["in_use_at_end"] == leased["unknown_at_end"] == 0, leased
    assert leased["unsettled_per_worker"] == [0, 0, 0], leased
    assert leased["reclaimed_by_ttl"] == 0, leased
    assert figures["webhooks_refused"] == 0, figures
    assert figures["cps_violations"] == 0, figures
    assert figures["most_create_attempts_in_1s"] <= cps * 1.25 + 1, figures
