"""The fleet breaker across real OS processes, on real Redis, in real time.

Every process records wall-clock times (``time.time()``, the one clock all processes on this
host share); bounds are checked on those, with the tolerance stated next to each assertion.
Each test runs a few seconds and is marked ``slow``. Redis killed and restarted is tested in
one process against its own ``redis-server`` (the killed process is the server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import pytest

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix, own_redis
from resilient_voice import CircuitBreaker, CircuitOpenError
from resilient_voice.events import BreakerState, Event, StoreAvailabilityChanged
from resilient_voice.redis import RedisBackend

pytestmark = [COREDIS_CANCEL_LEAK, pytest.mark.slow]
__all__ = ["collect_coredis_garbage"]

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
# (seconds from A's trip to B or C opening, to its first rejection); read with ``-s``.
FIGURES: list[tuple[float, float]] = []


def _run_replicas(replicas: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    prefix = fresh_prefix()
    start = time.time() + 2.0  # every interpreter is up and connected by then
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    processes = []
    for given in replicas:
        options = {**given, "url": REDIS_URL, "prefix": prefix}
        options.update(start=start, stop=start + seconds)
        if "recover_in" in options:
            options["recover"] = start + options.pop("recover_in")
        processes.append(
            subprocess.Popen(
                [sys.executable, str(TESTS / "_breaker_fleet_worker.py"), json.dumps(options)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 30)
        assert process.returncode == 0
        results.append(json.loads(out))
    return results


def _first(result: dict[str, Any], outcome: str) -> float | None:
    return next((t for t, o in result["outcomes"] if o == outcome), None)


def test_an_outage_seen_by_a_busy_replica_stops_the_quiet_ones_within_two_seconds() -> None:
    a, b, c = _run_replicas(
        [
            {"rate": 50, "fail": True},
            {"rate": 2, "fail": True},
            {"rate": 2, "fail": True, "backend": "trio"},
        ],
        6.0,
    )
    tripped = next(t for t, how, new in a["transitions"] if new == "open")
    assert not any(how.startswith("fleet") for _, how, _ in a["transitions"])
    for quiet in (b, c):
        opened = next(t for t, how, new in quiet["transitions"] if how == "fleet:rate")
        rejected = _first(quiet, "rejected")
        assert rejected is not None
        # The bound: 2 s from A's trip to B and C rejecting (one 1 s tick to publish
        # and read, then the next call at 2/s).
        assert opened - tripped < 2.0
        assert rejected - tripped < 2.0
        FIGURES.append((opened - tripped, rejected - tripped))


def test_figures() -> None:
    """Print the measured delays of the outage test (run with ``-s``)."""
    for opened, rejected in FIGURES:
        sys.stdout.write(f"\nA's trip -> open {opened:.2f} s, -> first rejection {rejected:.2f} s")


def test_the_fleet_recovers_on_exactly_its_probes() -> None:
    recover = {"recover_in": 1.5, "recovery_timeout": 2.0, "fail": True}
    results = _run_replicas(
        [{"rate": 50, **recover}, {"rate": 2, **recover}, {"rate": 2, **recover}], 6.5
    )
    probes = [o for r in results for _, o in r["outcomes"] if o.endswith("probe")]
    # The upstream is back before any open period (2 s +-15 %) runs out: one successful probe,
    # by A (the replica that opened on its own window); B and C follow it closed.
    assert probes == ["probe"]
    assert [o for _, o in results[0]["outcomes"]].count("probe") == 1
    assert [r["state"] for r in results] == ["closed"] * 3


def test_one_bad_path_opens_nobody_else() -> None:
    a, b, c = _run_replicas(
        [{"rate": 50, "fail": True}, {"rate": 50, "fail": False}, {"rate": 50, "fail": False}],
        4.0,
    )
    assert any(new == "open" for _, _, new in a["transitions"])
    for healthy in (b, c):
        assert {o for _, o in healthy["outcomes"]} == {"ok"}
        assert healthy["transitions"] == []


async def test_redis_killed_and_restarted_no_exception_escapes() -> None:
    events: list[Event] = []
    with own_redis() as server:
        async with RedisBackend.from_url(server.url, prefix=fresh_prefix(), timeout=0.1) as b:
            breaker = CircuitBreaker(
                "upstream", failure_threshold=3, recovery_timeout=0.5, store=b,
                listeners=[events.append],
            )  # fmt: skip
            fail = False

            async def upstream() -> None:
                if fail:
                    raise ConnectionError("down")

            async def run(seconds: float) -> set[str]:
                seen = set()
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    try:
                        await breaker.call(upstream)
                        seen.add("ok")
                    except CircuitOpenError:
                        seen.add("rejected")
                    except ConnectionError:
                        seen.add("failed")
                    await anyio.sleep(0.01)
                return seen

            assert await run(1.5) == {"ok"}
            assert breaker.statistics().fleet is not None
            server.stop()
            assert await run(1.5) == {"ok"}  # the local breaker carries on, nothing escapes
            fail = True
            assert await run(0.5) == {"failed", "rejected"}  # and still trips on its own
            fleet = breaker.statistics().fleet
            assert fleet is not None
            assert not fleet.available
            fail = False
            server.start()
            # Back within the 1 s tick plus a reconnect: 3 s is the bound.
            with anyio.fail_after(3.0):
                while not (fleet := breaker.statistics().fleet) or not fleet.available:
                    await run(0.1)
            await run(1.0)
            assert breaker.state is BreakerState.CLOSED
    changes = [e.available for e in events if isinstance(e, StoreAvailabilityChanged)]
    assert changes == [False, True]  # one record per transition


async def test_a_killed_replica_stops_counting_when_its_heartbeat_expires() -> None:
    prefix = fresh_prefix()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    options = {"url": REDIS_URL, "prefix": prefix, "rate": 2, "fail": False}
    options.update(start=time.time(), stop=time.time() + 60)
    worker = subprocess.Popen(
        [sys.executable, str(TESTS / "_breaker_fleet_worker.py"), json.dumps(options)],
        stdout=subprocess.DEVNULL,
        env=env,
    )
    try:
        async with RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=0.5) as backend:
            breaker = CircuitBreaker("upstream", window_duration=5.0, store=backend)
            with anyio.fail_after(10.0):  # the interpreter starts and publishes
                while (fleet := breaker.statistics().fleet) is None or fleet.live < 2:
                    await anyio.sleep(0.1)
            worker.kill()  # SIGKILL: no goodbye, only the heartbeat's expiry
            killed = time.monotonic()
            # Heartbeats live 3 s, then one tick (1 s) to read it: 4.5 s is the bound.
            with anyio.fail_after(4.5):
                while (fleet := breaker.statistics().fleet) is None or fleet.live != 1:
                    await anyio.sleep(0.1)
            # It counted until its heartbeat expired: its last summary was at most a tick (1 s)
            # old when it was killed, so at least 2 s (0.5 s of tolerance for the clocks).
            assert time.monotonic() - killed > 1.5
    finally:
        worker.kill()
        worker.wait(5)
