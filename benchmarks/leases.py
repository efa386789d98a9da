"""Benchmark CallLeases: acquire + release, in memory against an anyio semaphore, and on Redis.

Run: ``python benchmarks/leases.py [--repeat N] [--calls N] [--redis URL]``. Prints markdown
tables:

1. One uncontended acquire + release in memory, in ns and as a ratio to ``anyio.Semaphore``'s
   ``acquire()`` + ``release()`` (the bulkhead every library ships: in-process, released when
   the function returns) and to a bare ``await`` of an empty coroutine; best of ``--repeat``
   runs, on asyncio and trio. A lease does more (an id, a generation, TTL bookkeeping, a
   frozen record), so the ratio is the price of those, not a like-for-like race.
2. Acquire + bind + release by call id (the webhook's path), in memory.
3. Contended hand-off: ``capacity`` slots, four times as many tasks cycling through them; grants
   per second, in memory, against the same loop on ``anyio.Semaphore``.
4. On Redis (``--redis``, default ``redis://127.0.0.1:6379/0``): one uncontended acquire +
   release (two script round trips) against a bare ``PING`` round trip, and the wake-up latency
   of a waiter in another replica (release to grant, via Pub/Sub), median and worst of 20.
5. Contended on Redis: two replicas (two backends) with busy tasks cycling through a few
   slots, served in the fleet's order; script calls on the acquire side (asks and waiters
   leaving) per grant, and the tickets' keep-alive calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

from resilient_voice import CallLeases


async def _noop() -> None:
    return None


async def _best(run: Callable[[], Awaitable[float]], repeat: int) -> float:
    return min([await run() for _ in range(repeat)])


def _loop(step: Callable[[], Awaitable[object]], calls: int) -> Callable[[], Awaitable[float]]:
    async def run() -> float:
        start = time.perf_counter_ns()
        for _ in range(calls):
            await step()
        return (time.perf_counter_ns() - start) / calls

    return run


def _lease_cycle() -> Callable[[], Awaitable[object]]:
    leases = CallLeases("bench", 1000, ttl=3600.0)

    async def step() -> None:
        lease = await leases.acquire()
        await leases.release(lease)

    return step


def _webhook_cycle() -> Callable[[], Awaitable[object]]:
    leases = CallLeases("bench", 1000, ttl=3600.0)
    counter = iter(range(10**9))

    async def step() -> None:
        lease = await leases.acquire()
        call_id = f"CA{next(counter)}"
        await leases.bind(lease, call_id)
        await leases.release(call_id, generation=lease.generation)

    return step


def _semaphore_cycle() -> Callable[[], Awaitable[object]]:
    semaphore = anyio.Semaphore(1000)

    async def step() -> None:
        await semaphore.acquire()
        semaphore.release()

    return step


async def _contended(kind: str, capacity: int, seconds: float) -> float:
    grants = 0
    stop = time.perf_counter() + seconds
    if kind == "leases":
        leases = CallLeases("bench", capacity, ttl=3600.0)

        async def task() -> None:
            nonlocal grants
            while time.perf_counter() < stop:
                lease = await leases.acquire()
                grants += 1
                await anyio.sleep(0)
                await lease.release()

    else:
        semaphore = anyio.Semaphore(capacity)

        async def task() -> None:
            nonlocal grants
            while time.perf_counter() < stop:
                async with semaphore:
                    grants += 1
                    await anyio.sleep(0)

    async with anyio.create_task_group() as tasks:
        for _ in range(capacity * 4):
            tasks.start_soon(task)
    return grants / seconds


async def in_memory(repeat: int, calls: int) -> list[tuple[str, float]]:
    rows = []
    for name, factory in (
        ("await of an empty coroutine", lambda: _noop),
        ("anyio.Semaphore acquire + release", _semaphore_cycle),
        ("CallLeases acquire + release", _lease_cycle),
        ("CallLeases acquire + bind + release(call_id)", _webhook_cycle),
    ):
        rows.append((name, await _best(_loop(factory(), calls), repeat)))
    return rows


async def on_redis(url: str, calls: int) -> dict[str, float]:
    from resilient_voice.redis import RedisBackend

    prefix = f"rvbench-{uuid.uuid4().hex[:8]}"
    async with (
        RedisBackend.from_url(url, prefix=prefix, timeout=1.0) as one,
        RedisBackend.from_url(url, prefix=prefix, timeout=1.0) as two,
    ):
        leases = CallLeases("bench", 1000, ttl=3600.0, store=one)
        step = _loop(lambda: _cycle(leases), calls)
        cycle = min([await step() for _ in range(3)])
        ping = min([await _loop(one.client.ping, calls)() for _ in range(3)])
        here = CallLeases("wake", 1, ttl=3600.0, store=one)
        there = CallLeases("wake", 1, ttl=3600.0, store=two)
        delays = []
        for _ in range(20):
            held = await there.acquire()
            granted: list[float] = []

            async def wait() -> None:
                lease = await here.acquire(timeout=10.0)
                granted.append(time.perf_counter())  # noqa: B023
                await lease.release()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                await anyio.sleep(0.05)
                released = time.perf_counter()
                await held.release()
            delays.append(granted[0] - released)
    return {
        "cycle": cycle,
        "ping": ping,
        "wake_median": statistics.median(delays),
        "wake_worst": max(delays),
    }


async def contended_on_redis(url: str, capacity: int, tasks: int, rounds: int) -> dict[str, float]:
    """Two replicas, ``tasks`` busy tasks each, ``capacity`` slots: script calls per grant."""
    from resilient_voice.redis import RedisBackend

    calls: dict[str, int] = {}

    class Counting(RedisBackend):
        async def _lease_at(self, name: str, op: str, args: list[str]) -> Any:
            calls[op] = calls.get(op, 0) + 1
            return await super()._lease_at(name, op, args)

    prefix = f"rvbench-{uuid.uuid4().hex[:8]}"
    grants = 0
    async with (
        Counting.from_url(url, prefix=prefix, timeout=1.0) as one,
        Counting.from_url(url, prefix=prefix, timeout=1.0) as two,
    ):
        sets = [CallLeases("order", capacity, ttl=3600.0, store=b) for b in (one, two)]

        async def task(leases: CallLeases) -> None:
            nonlocal grants
            for _ in range(rounds):
                lease = await leases.acquire(timeout=60.0)
                grants += 1
                await anyio.sleep(0.005)
                await lease.release()

        async with anyio.create_task_group() as group:
            for i in range(2 * tasks):
                group.start_soon(task, sets[i % 2])
    acquire_side = calls.get("q", 0) + calls.get("a", 0) + calls.get("x", 0)
    return {"per_grant": acquire_side / grants, "keep_alive": calls.get("k", 0)}


async def _cycle(leases: CallLeases) -> None:
    lease = await leases.acquire()
    await leases.release(lease)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    print("## Uncontended, in memory (ns per cycle; ratio to anyio.Semaphore)\n")
    print("| | asyncio | trio | ratio (asyncio) |")
    print("|---|---:|---:|---:|")
    results = {
        backend: anyio.run(in_memory, args.repeat, args.calls, backend=backend)
        for backend in ("asyncio", "trio")
    }
    semaphore = results["asyncio"][1][1]
    for (name, ns_asyncio), (_, ns_trio) in zip(results["asyncio"], results["trio"], strict=True):
        print(f"| {name} | {ns_asyncio:,.0f} | {ns_trio:,.0f} | {ns_asyncio / semaphore:.2f} |")
    print("\n## Contended hand-off, in memory (grants/s; 8 slots, 32 tasks, 2 s)\n")
    print("| | asyncio | trio |")
    print("|---|---:|---:|")
    for kind in ("semaphore", "leases"):
        rates = [anyio.run(_contended, kind, 8, 2.0, backend=b) for b in ("asyncio", "trio")]
        print(f"| {kind} | {rates[0]:,.0f} | {rates[1]:,.0f} |")
    if not args.no_redis:
        figures = anyio.run(on_redis, args.redis, min(args.calls, 2000))
        print("\n## On Redis (asyncio, coredis)\n")
        print("| | value |")
        print("|---|---:|")
        print(f"| PING round trip | {figures['ping'] / 1000:,.0f} µs |")
        print(f"| acquire + release (2 scripts) | {figures['cycle'] / 1000:,.0f} µs |")
        print(f"| ratio to 2 PINGs | {figures['cycle'] / (2 * figures['ping']):.2f} |")
        print(f"| wake-up across replicas, median | {figures['wake_median'] * 1000:.1f} ms |")
        print(f"| wake-up across replicas, worst of 20 | {figures['wake_worst'] * 1000:.1f} ms |")
        print("\n## Contended on Redis (2 replicas, 5 ms holds; acquire-side calls per grant)\n")
        print("| slots | tasks per replica | calls per grant | keep-alive calls |")
        print("|---:|---:|---:|---:|")
        for capacity, tasks in ((1, 1), (1, 5), (4, 10)):
            got = anyio.run(contended_on_redis, args.redis, capacity, tasks, 10)
            print(f"| {capacity} | {tasks} | {got['per_grant']:.2f} | {got['keep_alive']:.0f} |")


if __name__ == "__main__":
    main()
