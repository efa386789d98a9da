"""The fleet breaker across real OS processes, on real Redis, in real time.

Every process records wall-clock times (``time.time()``, the one clock all processes on this
host share); bounds are checked on those, with the tolerance stated next to each assertion.
Each test runs a few seconds and is marked ``slow``. Redis killed and restarted is tested in
one process against its own ``redis-server`` (the killed process is the server).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import pytest

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix, own_redis
from _together import Together, run_together
from resilient_voice import CircuitBreaker, CircuitOpenError
from resilient_voice.events import BreakerState, Event, StoreAvailabilityChanged
from resilient_voice.redis import RedisBackend

pytestmark = [COREDIS_CANCEL_LEAK, pytest.mark.slow]
__all__ = ["collect_coredis_garbage"]

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
# (seconds from A's trip to B or C opening, to its first rejection); read with ``-s``.
FIGURES: list[tuple[float, float]] = []


def _command(options: dict[str, Any]) -> list[str]:
    return [sys.executable, str(TESTS / "_breaker_fleet_worker.py"), json.dumps(options)]


def _run_replicas(replicas: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    """Run the replicas together: released at once when every one is in the fleet view."""
    prefix = fresh_prefix()
    commands = [
        _command({**given, "url": REDIS_URL, "prefix": prefix, "seconds": seconds})
        for given in replicas
    ]
    return run_together(commands, env=ENV, timeout=seconds + 30)


def _first(result: dict[str, Any], outcome: str) -> float | None:
    return next((t for t, o in result["outcomes"] if o == outcome), None)


def _first_open(result: dict[str, Any]) -> tuple[float, str]:
    """When and how a replica first opened: ``"own"`` (its window) or ``"fleet:<rule>"``.

    The worker records each StateChanged, and a fleet transition's FleetStateChanged right
    after it (the breaker dispatches the two back to back).
    """
    transitions = result["transitions"]
    for index, (t, how, new) in enumerate(transitions):
        if how == "state" and new == "open":
            after = transitions[index + 1 : index + 2]
            if after and after[0][1].startswith("fleet:") and after[0][2] == "open":
                return t, after[0][1]
            return t, "own"
    raise AssertionError(f"never opened: {transitions}")


def test_an_outage_seen_by_a_busy_replica_stops_the_quiet_ones_within_two_seconds() -> None:
    a, b, c = _run_replicas(
        [
            {"rate": 50, "fail": True},
            {"rate": 2, "fail": True},
            {"rate": 2, "fail": True, "backend": "trio"},
        ],
        6.0,
    )
    # A opens first; usually on its own window (10 calls at 50/s, 0.2 s in), but it may open
    # by the combined-rate rule instead: B's and C's published failures can reach A (a tick or
    # a Pub/Sub announcement) before its own window holds minimum_calls, and then A's failures
    # plus theirs legitimately pass the fleet's threshold first. Either way A leads.
    tripped, _ = _first_open(a)
    for quiet in (b, c):
        opened, how = _first_open(quiet)
        assert tripped <= opened  # A is the first replica to open
        # B and C follow the fleet: at 2/s their own windows cannot reach minimum_calls in 2 s.
        assert how.startswith("fleet:"), quiet["transitions"]
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
    # B and C call first 0.5 s in, when A (10 calls at 50/s: 0.2 s in) has opened on its own
    # window: had their failures reached A before that, A could open by the combined-rate rule
    # instead, and a fleet that only followed would close when its windows empty, unprobed.
    quiet = {"rate": 2, "delay": 0.5, **recover}
    results = _run_replicas([{"rate": 50, **recover}, quiet, quiet], 6.5)
    assert _first_open(results[0])[1] == "own"
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
    options = {"url": REDIS_URL, "prefix": prefix, "rate": 2, "fail": False, "seconds": 60}
    with Together([_command(options)], env=ENV) as worker:
        await anyio.to_thread.run_sync(worker.release)  # it is in the fleet view by then
        async with RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=0.5) as backend:
            breaker = CircuitBreaker("upstream", window_duration=5.0, store=backend)
            with anyio.fail_after(10.0):  # this replica publishes and reads the other
                while (fleet := breaker.statistics().fleet) is None or fleet.live < 2:
                    await anyio.sleep(0.1)
            worker.processes[0].kill()  # SIGKILL: no goodbye, only the heartbeat's expiry
            killed = time.monotonic()
            # Heartbeats live 3 s, then one tick (1 s) to read it: 4.5 s is the bound.
            with anyio.fail_after(4.5):
                while (fleet := breaker.statistics().fleet) is None or fleet.live != 1:
                    await anyio.sleep(0.1)
            # It counted until its heartbeat expired: its last summary was at most a tick (1 s)
            # old when it was killed, so at least 2 s (0.5 s of tolerance for the clocks).
            assert time.monotonic() - killed > 1.5
