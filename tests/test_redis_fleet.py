"""``store=`` makes a primitive fleet-wide: real Redis, real OS processes, real time.

Across processes there is no shared fake clock: every process records the wall-clock time of its
grants (``time.time()``, one clock for all processes on this host) and the bounds are checked on
those, with the tolerances stated next to each assertion. Each test is bounded in time and
count; the multi-process ones are marked ``slow`` (they run in CI too).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import httpx
import pytest

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix
from _together import run_together
from resilient_voice.asgi import RateLimitMiddleware
from resilient_voice.redis import RedisBackend
from resilient_voice.testing import FakeTelephony, serve
from resilient_voice.twilio import TwilioClient
from resilient_voice.vapi import VapiClient

pytestmark = COREDIS_CANCEL_LEAK
__all__ = ["collect_coredis_garbage"]  # an autouse fixture, used by being here

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
ACCOUNT = "AC" + "0" * 32


@pytest.fixture
async def backend() -> AsyncIterator[RedisBackend]:
    async with RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix(), timeout=1.0) as b:
        yield b


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_two_middleware_workers_sharing_a_store_give_a_client_one_limit(
    backend: RedisBackend,
) -> None:
    workers = [RateLimitMiddleware(_ok, rate=0.01, burst=3, store=backend) for _ in range(2)]
    statuses = []
    for i in range(8):
        app = workers[i % 2]
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            response = await client.get("/")
            statuses.append(response.status_code)
            assert "ratelimit" in response.headers
    assert statuses == [200, 200, 200, 429, 429, 429, 429, 429]


def test_twilio_client_shares_its_default_pacing_through_the_store() -> None:
    store = RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix())
    client = TwilioClient(ACCOUNT, "token", calls_per_second=5, store=store)
    calls = client.policies["create_call"].limiter
    assert calls is not None
    assert calls.name == f"twilio:{ACCOUNT}:calls"
    assert calls._store.inner is store  # type: ignore[union-attr]
    senders = client.policies["send_message"].limiter
    assert senders is not None
    assert senders._template._store.inner is store  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="store="):
        TwilioClient(ACCOUNT, "token", policy=client.policies["read"], store=store)


def test_vapi_client_shares_its_pacing_under_a_digest_of_the_key() -> None:
    store = RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix())
    client = VapiClient("secret-key-1", calls_per_second=2, store=store)
    calls = client.policies["create_call"].limiter
    assert calls is not None
    assert calls.name.startswith("vapi:")
    assert calls.name.endswith(":calls")
    assert "secret-key-1" not in calls.name
    other = VapiClient("secret-key-2", calls_per_second=2, store=store)
    assert other.policies["create_call"].limiter.name != calls.name  # type: ignore[union-attr]
    # A RedisBackend also shares the default breaker, so store= alone is not refused.
    alone = VapiClient("secret-key-1", store=store)
    breaker = alone.policies["create_call"].breaker
    assert breaker is not None
    assert breaker.name == calls.name.removesuffix(":calls")
    assert (breaker.config.window_duration, breaker.config.minimum_calls) == (30.0, 10)
    assert breaker._store is store


def test_twilio_client_shares_its_default_breaker() -> None:
    store = RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix())
    client = TwilioClient(ACCOUNT, "token", store=store)
    breaker = client.policies["create_call"].breaker
    assert breaker is not None
    assert breaker.name == f"twilio:{ACCOUNT}"
    assert breaker._store is store
    assert (breaker.config.window_duration, breaker.config.minimum_calls) == (30.0, 10)
    plain = TwilioClient(ACCOUNT, "token").policies["create_call"].breaker
    assert plain is not None
    assert plain.config.window_duration is None


def _run_together(replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the replicas together: released at once when every one is connected."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    commands = [
        [sys.executable, str(TESTS / "_redis_worker.py"), json.dumps(options)]
        for options in replicas
    ]
    return run_together(commands, env=env, timeout=60)


def _most_in_one_second(times: list[float]) -> int:
    """The most grants in any half-open 1 s window (windows start at a grant)."""
    times = sorted(times)
    most = 0
    j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        most = max(most, j - i)
    return most


@pytest.mark.slow
@pytest.mark.parametrize("skews", [(0.0, 0.0, 0.0), (0.0, 7.0, 0.0)], ids=["same", "skewed"])
def test_three_processes_share_one_bucket(skews: tuple[float, float, float]) -> None:
    rate, burst, seconds = 20, 1, 3.0
    prefix = fresh_prefix()
    results = _run_together(
        [
            {
                "url": REDIS_URL,
                "prefix": prefix,
                "name": "fleet",
                "rate": rate,
                "burst": burst,
                "seconds": seconds,
                "tasks": 10,
                "skew": skew,
                "backend": "trio" if i == 2 else "asyncio",
            }
            for i, skew in enumerate(skews)
        ]
    )
    grants = [t for result in results for t in result["grants"]]
    allowed = burst + rate * seconds
    # At most rate + burst per 1 s window, plus 1 for the timing of a wake-up at a window edge.
    assert _most_in_one_second(grants) <= rate + burst + 1
    # Together at least 95 % of what the bucket allows in the run.
    assert len(grants) >= 0.95 * allowed, (len(grants), allowed)
    assert all(result["grants"] for result in results)  # every replica was served


@pytest.mark.slow
def test_pause_in_one_process_delays_the_others() -> None:
    prefix = fresh_prefix()
    common = {
        "url": REDIS_URL,
        "prefix": prefix,
        "name": "fleet",
        "rate": 20,
        "burst": 1,
        "seconds": 3.0,
        "tasks": 1,
    }
    first, *rest = _run_together([{**common, "pause_at": 1.0, "pause": 1.0}, common, common])
    (paused,) = first["paused"]
    for result in rest:
        # Slots reserved before the pause stand: with one task per process, at most three
        # slots of 50 ms, so nothing after 0.25 s (0.1 s of slack for round trips and late
        # wake-ups), and nothing until 0.1 s before the pause ends.
        during = [t for t in result["grants"] if paused + 0.25 < t < paused + 0.9]
        assert during == []
        assert any(t > paused + 1.0 for t in result["grants"])  # and they resume


@pytest.mark.slow
async def test_uvicorn_workers_sharing_the_middleware_store_give_one_limit() -> None:
    from _redis import free_port

    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}",
        "RV_REDIS_URL": REDIS_URL,
        "RV_PREFIX": fresh_prefix(),
    }
    command = [sys.executable, "-m", "uvicorn", "_redis_inbound_app:app", "--workers", "3"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--no-access-log", "--log-level", "warning"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        # Wait for the workers without spending the client's tokens: a health check would.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await anyio.sleep(0.1)
        await anyio.sleep(1.0)  # the other workers finish starting
        statuses: list[int] = []
        pids: set[str] = set()
        # A fresh connection per request, so the kernel spreads them over the workers.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=5) as client:
            started = time.monotonic()
            while time.monotonic() - started < 2.0:
                async with anyio.create_task_group() as tg:
                    for _ in range(6):

                        async def one() -> None:
                            response = await client.get(url)
                            statuses.append(response.status_code)
                            pids.add(response.headers["x-pid"])

                        tg.start_soon(one)
                await anyio.sleep(0.05)
            elapsed = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(20)
    admitted = statuses.count(200)
    # One client, one limit in total (burst 5, 2/s): at most burst + rate * T + 1.
    assert 5 <= admitted <= 5 + 2 * elapsed + 1, (admitted, elapsed)
    assert statuses.count(429) > 0
    assert len(pids) >= 2  # several workers answered


@pytest.mark.slow
async def test_twilio_clients_in_two_processes_hold_the_account_cps() -> None:
    fake = FakeTelephony(
        twilio_accounts={ACCOUNT: "token"}, calls_per_second=5, status_callbacks=False
    )
    async with serve(fake) as base_url:
        options = {
            "mode": "twilio",
            "url": REDIS_URL,
            "prefix": fresh_prefix(),
            "account": ACCOUNT,
            "base_url": base_url,
            "rate": 5,
            "seconds": 2.0,
            "tasks": 3,
        }
        replicas = [options, {**options, "backend": "trio"}]
        results = await anyio.to_thread.run_sync(_run_together, replicas)
    created = [t for result in results for t in result["grants"]]
    # The account's 5 CPS across both processes: no violation at the fake (its 50 ms
    # tolerance absorbs loopback jitter); without the shared store there would be twice as many.
    assert fake.cps_violations(ACCOUNT) == 0
    assert 0.9 * (1 + 5 * 2.0) <= len(created) <= 1 + 5 * 2.0 + 1
    assert all(result["grants"] for result in results)
