"""Benchmark limiters sharing Redis: grants/s, latency per acquire, round trips per grant.

Run: ``python benchmarks/redis.py [--url redis://127.0.0.1:6379/0] [--seconds 2]``. Needs a Redis
(loopback) and the ``bench`` extra. Prints one markdown table.

Every contender runs in 1 and in 4 OS processes with 100 concurrent tasks each, acquiring in a
loop for ``--seconds`` with a limit that never binds (10^6/s), so the figures are the cost of
sharing state, not of waiting:

- resilient_voice ``TokenBucket(store=RedisBackend)``: GCRA reservations in one Lua script on
  Redis' clock; the front of the local queue reserves for every ready local waiter at once.
- limits 5.x async moving window and sliding window counter (``limits.aio``; its coredis
  implementation does not run on coredis 6, which needs its pool entered, so redis-py's asyncio
  client is used).
- pyrate-limiter 4.x ``RedisBucket`` with redis-py's asyncio client.

Then the inbound middleware: microseconds per request through a Starlette app, one request at a
time, bare, behind ours with ``store=RedisBackend`` and behind slowapi's ASGI middleware with its
Redis storage (a synchronous redis-py call on the event loop).

Round trips per grant are counted for ours (calls to the script); the others make one Lua call
per hit by construction (limits, pyrate-limiter's ``put``) and more when blocked.
Each run uses its own key prefix and leaves only keys that expire.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# This file is named redis.py: its directory must not shadow the redis package (redis-py).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "src"))

import anyio  # noqa: E402  (after the path fix above)

TASKS = 100
RATE = 10**6
KINDS = (
    "resilient_voice",
    "resilient_voice (redis-py)",
    "limits-moving",
    "limits-sliding",
    "pyrate-limiter",
)


async def _ours(
    url: str, prefix: str, redispy: bool = False
) -> tuple[Callable[[], Awaitable[object]], Any, Any]:
    from resilient_voice import TokenBucket
    from resilient_voice.redis import RedisBackend

    class Counting(RedisBackend):
        __slots__ = ("calls",)

        async def _run(self, key: str, args: list[str]) -> list[bytes]:
            self.calls += 1
            return await super()._run(key, args)

    if redispy:
        from redis.asyncio import Redis

        backend = Counting(Redis.from_url(url), prefix=prefix, timeout=1.0)
    else:
        backend = Counting.from_url(url, prefix=prefix, timeout=1.0)
    backend.calls = 0
    await backend.__aenter__()
    bucket = TokenBucket(RATE, 100, name="bench", store=backend)
    return bucket.acquire, backend, lambda: backend.calls


async def _limits(url: str, prefix: str, moving: bool) -> tuple[Any, Any, Any]:
    from limits import RateLimitItemPerSecond
    from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
    from limits.storage import storage_from_string

    storage = storage_from_string(
        url.replace("redis://", "async+redis://"), key_prefix=prefix, implementation="redispy"
    )
    strategy = MovingWindowRateLimiter if moving else SlidingWindowCounterRateLimiter
    limiter = strategy(storage)
    item = RateLimitItemPerSecond(RATE)

    async def hit() -> bool:
        return await limiter.hit(item, "bench")

    return hit, None, None


async def _pyrate(url: str, prefix: str) -> tuple[Any, Any, Any]:
    from pyrate_limiter import Duration, Limiter, Rate, RedisBucket
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    bucket = await RedisBucket.init([Rate(RATE, Duration.SECOND)], redis, f"{prefix}:bench")
    limiter = Limiter(bucket)

    async def acquire() -> bool:
        return await limiter.try_acquire_async("bench")

    return acquire, None, None


async def worker(options: dict[str, Any]) -> dict[str, Any]:
    kind, url, prefix = options["kind"], options["url"], options["prefix"]
    if kind.startswith("resilient_voice"):
        acquire, backend, calls = await _ours(url, prefix, redispy="redis-py" in kind)
    elif kind == "pyrate-limiter":
        acquire, backend, calls = await _pyrate(url, prefix)
    else:
        acquire, backend, calls = await _limits(url, prefix, moving=kind == "limits-moving")
    await acquire()  # connect and load scripts outside the measurement
    await anyio.sleep(max(0.0, options["start_at"] - time.time()))
    latencies: list[float] = []
    end = time.perf_counter() + options["seconds"]
    before = calls() if calls else 0

    async def task() -> None:
        while time.perf_counter() < end:
            started = time.perf_counter()
            await acquire()
            latencies.append(time.perf_counter() - started)

    async with anyio.create_task_group() as tg:
        for _ in range(TASKS):
            tg.start_soon(task)
    trips = (calls() - before) if calls else None
    if backend is not None:
        await backend.__aexit__(None, None, None)
    latencies.sort()
    return {"grants": len(latencies), "latencies": latencies[:: max(1, len(latencies) // 2000)],
            "trips": trips}  # fmt: skip


def run(kind: str, processes: int, url: str, seconds: float) -> dict[str, Any]:
    options = {
        "kind": kind,
        "url": url,
        "prefix": f"rvbench-{uuid.uuid4().hex[:8]}",
        "seconds": seconds,
        "start_at": time.time() + 3.0,
    }
    spawned = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(options)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in spawned]
    grants = sum(r["grants"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    trips = [r["trips"] for r in results]
    return {
        "grants_s": grants / seconds,
        "per_process": grants / seconds / processes,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "trips_per_grant": None if None in trips else sum(trips) / grants,
    }


async def inbound(url: str, requests: int) -> list[tuple[str, float]]:
    """Microseconds per request through a Starlette app: bare, ours with Redis, slowapi's."""
    from slowapi import Limiter
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from resilient_voice.asgi import RateLimitMiddleware
    from resilient_voice.redis import RedisBackend

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    def starlette() -> Any:
        return Starlette(routes=[Route("/", home)])

    bare = starlette()
    slow = starlette()
    slow.state.limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[f"{RATE}/second"],
        storage_uri=url,
        key_prefix=f"rvbench-{uuid.uuid4().hex[:8]}",
    )
    slow.add_middleware(SlowAPIASGIMiddleware)
    from redis.asyncio import Redis

    backend = RedisBackend.from_url(url, prefix=f"rvbench-{uuid.uuid4().hex[:8]}", timeout=1.0)
    fast = RedisBackend(Redis.from_url(url), prefix=f"rvbench-{uuid.uuid4().hex[:8]}", timeout=1)
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    async def timed(app: Any) -> float:
        scope = {
            "type": "http", "method": "GET", "path": "/", "raw_path": b"/", "query_string": b"",
            "headers": [], "client": ("192.0.2.1", 1234), "server": ("test", 80),
            "scheme": "http", "http_version": "1.1", "root_path": "",
        }  # fmt: skip
        await app(dict(scope), receive, send)  # warm up: connect, load scripts
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(requests):
                await app(dict(scope), receive, send)
            best = min(best, (time.perf_counter() - started) / requests)
        return best * 1e6

    async def concurrent(app: Any) -> float:
        """Requests per second with 100 requests in flight at a time."""
        scope = {
            "type": "http", "method": "GET", "path": "/", "raw_path": b"/", "query_string": b"",
            "headers": [], "client": ("192.0.2.1", 1234), "server": ("test", 80),
            "scheme": "http", "http_version": "1.1", "root_path": "",
        }  # fmt: skip

        async def client() -> None:
            for _ in range(requests // TASKS):
                await app(dict(scope), receive, send)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(TASKS):
                tg.start_soon(client)
        return (requests // TASKS) * TASKS / (time.perf_counter() - started)

    async with backend:
        ours = RateLimitMiddleware(bare, rate=RATE, burst=100, store=backend, name="bench")
        ours_redispy = RateLimitMiddleware(bare, rate=RATE, burst=100, store=fast, name="bench")
        rows = [
            ("Starlette app, no limiter (baseline)", await timed(bare), await concurrent(bare)),
            (
                "+ resilient_voice RateLimitMiddleware(store=RedisBackend)",
                await timed(ours),
                await concurrent(ours),
            ),
            (
                "+ resilient_voice RateLimitMiddleware(store=RedisBackend(redis.asyncio))",
                await timed(ours_redispy),
                await concurrent(ours_redispy),
            ),
            (
                "+ slowapi SlowAPIASGIMiddleware (Redis, sync client)",
                await timed(slow),
                await concurrent(slow),
            ),
        ]
    assert statuses == {200}, statuses
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--worker")
    parser.add_argument("--skip-inbound", action="store_true")
    args = parser.parse_args()
    if args.worker:
        result = anyio.run(worker, json.loads(args.worker))
        sys.stdout.write(json.dumps(result))
        return
    print(f"Python {platform.python_version()}, {os.cpu_count()} cores, {TASKS} tasks/process\n")
    if not args.skip_inbound:
        rows = anyio.run(inbound, args.url, 2000)
        print("| inbound middleware | us per request, one at a time | overhead us | "
              "requests/s, 100 in flight |")  # fmt: skip
        print("|---|---:|---:|---:|")
        for label, micros, per_second in rows:
            print(f"| {label} | {micros:.1f} | {micros - rows[0][1]:.1f} | {per_second:,.0f} |")
        print()
    print("| limiter | processes | grants/s | grants/s per process | p50 ms | p99 ms | "
          "round trips/grant |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind in KINDS:
        for processes in (1, 4):
            r = run(kind, processes, args.url, args.seconds)
            trips = "1 (one Lua call per hit)" if r["trips_per_grant"] is None else (
                f"{r['trips_per_grant']:.3f}")  # fmt: skip
            print(
                f"| {kind} | {processes} | {r['grants_s']:,.0f} | {r['per_process']:,.0f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {trips} |"
            )


if __name__ == "__main__":
    main()
