"""Benchmark the token bucket against aiolimiter, limits and pyrate-limiter.

Run: ``python benchmarks/limiter.py [--repeat N] [--calls N]``. Prints two markdown tables:

1. Overhead of one uncontended acquire (tokens always available), in ns and as a ratio to a
   bare ``await`` of an empty coroutine, best of ``--repeat`` runs, on asyncio (the only loop
   every library supports); ours on trio too.
2. Accuracy on the real clock: 200 tasks ask at once at 100/s with room for one call at a time.
   Reported: the most admitted in any 1 s window (the bound is burst + rate * 1 s = 101), bound
   violations over every interval between two admissions (against the documented bound
   ``burst + rate * (T + lateness)``), total duration, and out-of-order admissions (callers
   admitted while someone who asked earlier was still waiting).
3. Wake-up lateness (the ``lateness`` of the bound, measured): how much later than asked the
   system clock's ``sleep_until`` returns, for sleeps of 1 to 3 ms.
4. Achieved rate with ``burst=1`` at 1 to 1000 grants/s: four workers that acquire and record in a
   loop (so the bucket always has a queue), the long-run rate as
   a share of the configured one, grants earlier than their slot on the schedule (must be 0),
   the latest grant relative to its slot, and violations of FakeTelephony's CPS check (a GCRA
   with 50 ms of tolerance, as the fake applies it to Twilio calls).

Run it from a checkout of an older commit (copy this file there) to compare before and after.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import anyio.lowlevel

from resilient_voice import limiter as limiter_module
from resilient_voice._clock import SYSTEM_CLOCK
from resilient_voice.limiter import TokenBucket

RATE = 100.0
WAITERS = 200
RATES = (1.0, 10.0, 100.0, 200.0, 500.0, 1000.0)
RATE_WORKERS = 4
CPS_TOLERANCE = 0.05
# The lateness term of the documented bound (0 before it existed).
LATENESS = float(getattr(limiter_module, "_LATENESS_KEPT", 0.0))


async def _noop() -> None:
    return None


def _timer(
    factory: Callable[[], Callable[[], Awaitable[object]]], calls: int
) -> Callable[[], Awaitable[float]]:
    async def run() -> float:
        call = factory()
        start = time.perf_counter_ns()
        for _ in range(calls):
            await call()
        return (time.perf_counter_ns() - start) / calls

    return run


def _ours() -> Callable[[], Awaitable[None]]:
    return TokenBucket(1e9, burst=1e6).acquire


def _ours_store() -> Callable[[], Awaitable[None]]:
    # The shared-store path (one reserve() per acquire when uncontended), on the in-memory
    # reference store: what a remote store adds beyond its round trip. Absent before the seam.
    store_class = getattr(limiter_module, "InMemoryBucketStore", None)
    if store_class is None or not hasattr(store_class, "reserve"):
        return _noop
    return TokenBucket(1e9, burst=1e6, name="bench", store=store_class()).acquire


def _aiolimiter() -> Callable[[], Awaitable[None]]:
    from aiolimiter import AsyncLimiter

    return AsyncLimiter(1e9, 1).acquire


def _limits() -> Callable[[], Awaitable[bool]]:
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import MemoryStorage
    from limits.aio.strategies import MovingWindowRateLimiter

    limiter = MovingWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerSecond(10**9)

    async def hit() -> bool:
        return await limiter.hit(item, "bench")

    return hit


def _pyrate() -> Callable[[], Awaitable[bool]]:
    from pyrate_limiter import Duration, Limiter, Rate

    limiter = Limiter(Rate(10**9, Duration.SECOND))

    async def acquire() -> bool:
        return await limiter.try_acquire_async("bench", blocking=False)

    return acquire


def _checkpoint_if_cancelled() -> Callable[[], Awaitable[None]]:
    return anyio.lowlevel.checkpoint_if_cancelled


# The package each competitor's rows need, by the first word of the row's label. A row whose
# package (or event loop) is not installed is skipped with a note, never a crash:
# ``pip install -e '.[bench]'`` brings them all.
COMPETITORS = {"aiolimiter": "aiolimiter", "limits": "limits", "pyrate-limiter": "pyrate_limiter"}
SKIPPED: set[str] = set()


def _runnable(label: str, backend: str) -> bool:
    needed = [COMPETITORS.get(label.partition(" ")[0].partition(".")[0])]
    if backend != "asyncio":
        needed.append(backend)
    missing = [name for name in needed if name and importlib.util.find_spec(name) is None]
    SKIPPED.update(missing)
    return not missing


def _best(backend: str, runner: Callable[[], Awaitable[float]], repeat: int) -> float:
    return min(anyio.run(runner, backend=backend) for _ in range(repeat))


def overhead(repeat: int, calls: int) -> list[tuple[str, str, float]]:
    rows = [
        ("bare `await` of an empty coroutine (baseline)", "asyncio", lambda: _noop),
        ("anyio `checkpoint_if_cancelled()` (for reference)", "asyncio", _checkpoint_if_cancelled),
        ("resilient_voice TokenBucket.acquire", "asyncio", _ours),
        ("resilient_voice TokenBucket.acquire, InMemoryBucketStore", "asyncio", _ours_store),
        ("aiolimiter AsyncLimiter.acquire", "asyncio", _aiolimiter),
        ("limits.aio MovingWindowRateLimiter.hit (memory)", "asyncio", _limits),
        ("pyrate-limiter try_acquire_async (in-memory)", "asyncio", _pyrate),
        ("bare `await` of an empty coroutine (baseline)", "trio", lambda: _noop),
        ("resilient_voice TokenBucket.acquire", "trio", _ours),
    ]
    results = []
    for label, backend, factory in rows:
        if not _runnable(label, backend):
            continue
        # limits and pyrate keep one entry per hit: fewer calls keep their memory in check.
        n = calls if "limits" not in label and "pyrate" not in label else max(calls // 10, 1000)
        results.append((label, backend, _best(backend, _timer(factory, n), repeat)))
    return results


async def _accuracy_run(make: Callable[[], Callable[[], Awaitable[object]]]) -> dict[str, float]:
    acquire = make()
    admitted: list[tuple[float, int]] = []
    arrivals = 0

    async def caller() -> None:
        nonlocal arrivals
        index = arrivals
        arrivals += 1
        await acquire()
        admitted.append((time.monotonic(), index))

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(WAITERS):
            tg.start_soon(caller)
    duration = time.monotonic() - start
    times = [t for t, _ in admitted]
    most = 0
    left = 0
    for right, t in enumerate(times):
        while t - times[left] > 1.0:
            left += 1
        most = max(most, right - left + 1)
    burst = 1
    violations = 0
    for i, t0 in enumerate(times):
        for j in range(i, len(times)):
            if j - i + 1 > burst + RATE * (times[j] - t0 + LATENESS) + 1e-9:
                violations += 1
                break
    out_of_order = 0
    highest = -1
    for _, index in admitted:
        if index < highest:
            out_of_order += 1
        highest = max(highest, index)
    return {
        "most_in_1s": most,
        "violations": violations,
        "duration": duration,
        "out_of_order": out_of_order,
    }


def _ours_paced() -> Callable[[], Awaitable[None]]:
    return TokenBucket(RATE, burst=1).acquire


def _aiolimiter_paced() -> Callable[[], Awaitable[None]]:
    from aiolimiter import AsyncLimiter

    return AsyncLimiter(1, 1 / RATE).acquire


def _pyrate_paced() -> Callable[[], Awaitable[bool]]:
    from pyrate_limiter import Limiter, Rate

    limiter = Limiter(Rate(1, int(1000 / RATE)))  # the interval is in milliseconds

    async def acquire() -> bool:
        return await limiter.try_acquire_async("bench")

    return acquire


def accuracy() -> list[tuple[str, str, dict[str, float]]]:
    rows = [
        ("resilient_voice TokenBucket(100, burst=1)", "asyncio", _ours_paced),
        ("resilient_voice TokenBucket(100, burst=1)", "trio", _ours_paced),
        ("aiolimiter AsyncLimiter(1, 0.01)", "asyncio", _aiolimiter_paced),
        ("pyrate-limiter Rate(1, 10 ms), blocking", "asyncio", _pyrate_paced),
    ]
    return [
        (label, backend, anyio.run(_accuracy_run, make, backend=backend))
        for label, backend, make in rows
        if _runnable(label, backend)
    ]


async def _lateness_run(samples: int) -> list[float]:
    late = []
    for i in range(samples):
        target = time.monotonic() + 0.001 + (i % 5) * 0.0005
        await SYSTEM_CLOCK.sleep_until(target)
        late.append(time.monotonic() - target)
    return sorted(late)


def lateness(samples: int) -> list[tuple[str, list[float]]]:
    return [
        (backend, anyio.run(_lateness_run, samples, backend=backend))
        for backend in ("asyncio", "trio")
        if _runnable("resilient_voice", backend)
    ]


async def _rate_run(rate: float, seconds: float) -> dict[str, float]:
    bucket = TokenBucket(rate, burst=1)
    calls = max(4, round(rate * seconds)) + 1
    times: list[float] = []

    async def worker() -> None:
        while len(times) < calls:
            await bucket.acquire()
            if len(times) < calls:
                times.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(RATE_WORKERS):
            tg.start_soon(worker)
    interval = 1.0 / rate
    # The first caller is granted without waiting; the schedule of the queue behind it follows
    # from that grant. The 10 us slack covers reading the clock after acquire() returned.
    start = times[0]
    offsets = [t - (start + i * interval) for i, t in enumerate(times)]
    early = sum(1 for offset in offsets if offset < -10e-6)
    violations = 0
    tat = -math.inf
    for t in times:
        if t < tat - CPS_TOLERANCE:
            violations += 1
        else:
            tat = max(t, tat) + interval
    return {
        "share": (calls - 1) / (times[-1] - start) / rate,
        "calls": calls,
        "early": early,
        "latest": max(offsets),
        "cps_violations": violations,
    }


def rates(seconds: float) -> list[tuple[float, str, dict[str, float]]]:
    return [
        (rate, backend, anyio.run(_rate_run, rate, seconds if rate > 1 else 3.0, backend=backend))
        for backend in ("asyncio", "trio")
        if _runnable("resilient_voice", backend)
        for rate in RATES
    ]


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    try:
        _main()
    finally:
        if SKIPPED:
            print()
            print(
                f"Skipped, not installed: {', '.join(sorted(SKIPPED))} "
                "(pip install -e '.[bench]' installs every competitor)."
            )


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-rates", action="store_true")
    parser.add_argument("--rate-seconds", type=float, default=2.0)
    args = parser.parse_args()

    print(
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}; ", end=""
    )
    packages = ["anyio", "trio", "aiolimiter", "limits", "pyrate-limiter"]
    print(", ".join(f"{name} {_version(name)}" for name in packages))
    print()
    results = overhead(args.repeat, args.calls)
    baseline = {backend: ns for label, backend, ns in results if "baseline" in label}
    print(f"Uncontended acquire, best of {args.repeat} runs of {args.calls} calls:")
    print()
    print("| limiter | loop | ns per call | x bare await |")
    print("|---|---|---:|---:|")
    for label, backend, ns in results:
        print(f"| {label} | {backend} | {ns:.0f} | {ns / baseline[backend]:.2f} |")
    if not args.skip_rates:
        _print_rates(args.rate_seconds)
    if args.skip_accuracy:
        return
    print()
    print(f"Accuracy on the real clock: {WAITERS} concurrent callers, {RATE:.0f}/s, burst 1:")
    print()
    print("| limiter | loop | most in any 1 s | bound violations | duration s | out of order |")
    print("|---|---|---:|---:|---:|---:|")
    for label, backend, r in accuracy():
        print(
            f"| {label} | {backend} | {r['most_in_1s']:.0f} | {r['violations']:.0f} | "
            f"{r['duration']:.3f} | {r['out_of_order']:.0f} |"
        )


def _print_rates(seconds: float) -> None:
    print()
    print("Wake-up lateness of the system clock's sleep_until (1-3 ms sleeps, 300 samples):")
    print()
    print("| loop | median ms | p90 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for backend, late in lateness(300):
        n = len(late)
        print(
            f"| {backend} | {late[n // 2] * 1e3:.3f} | {late[int(n * 0.9)] * 1e3:.3f} | "
            f"{late[int(n * 0.99)] * 1e3:.3f} | {late[-1] * 1e3:.3f} |"
        )
    print()
    print(
        f"Achieved rate, burst 1, {RATE_WORKERS} workers for about {seconds:g} s per rate "
        f"(documented lateness term {LATENESS * 1e3:g} ms):"
    )
    print()
    print(
        "| rate /s | loop | grants | achieved | early grants | latest vs slot ms | CPS violations |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rate, backend, r in rates(seconds):
        print(
            f"| {rate:g} | {backend} | {r['calls']:.0f} | {r['share'] * 100:.1f} % | "
            f"{r['early']:.0f} | {r['latest'] * 1e3:.1f} | {r['cps_violations']:.0f} |"
        )


if __name__ == "__main__":
    main()
