"""Cost of correlation id generation and validation, and of an uneventful RetryPolicy.run.

Run: ``python benchmarks/correlation.py`` (best of N repetitions; the machine is shared,
so compare numbers from one run only).
"""

from __future__ import annotations

import os
import secrets
import sys
import timeit
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

from resilient_voice.correlation import (
    correlation_scope,
    get_correlation_id,
    new_correlation_id,
    validate_correlation_id,
)
from resilient_voice.retry import RetryPolicy

REPEAT = 9


def best(stmt: str, number: int = 200_000, **names: object) -> float:
    timer = timeit.Timer(stmt, globals=names)
    return min(timer.repeat(repeat=REPEAT, number=number)) / number * 1e9


def main() -> None:
    rows = [
        ("uuid.uuid4().hex", best("uuid4().hex", uuid4=uuid.uuid4)),
        ("secrets.token_hex(16)", best("token_hex(16)", token_hex=secrets.token_hex)),
        ("os.urandom(16).hex()", best("urandom(16).hex()", urandom=os.urandom)),
        ("new_correlation_id()", best("f()", f=new_correlation_id)),
        (
            "validate_correlation_id(32 hex)",
            best("f(v)", f=validate_correlation_id, v=new_correlation_id()),
        ),
        (
            "validate_correlation_id(uuid form)",
            best("f(v)", f=validate_correlation_id, v=str(uuid.uuid4())),
        ),
        ("validate_correlation_id(10 kB)", best("f(v)", f=validate_correlation_id, v="x" * 10240)),
        (
            "with correlation_scope(valid id)",
            best("with s(v): pass", s=correlation_scope, v=new_correlation_id()),
        ),
        ("get_correlation_id()", best("f()", f=get_correlation_id)),
    ]

    policy = RetryPolicy()

    async def ok() -> int:
        return 1

    async def run_many(n: int) -> float:
        import time

        start = time.perf_counter()
        for _ in range(n):
            await policy.run(ok, idempotent=False)
        return time.perf_counter() - start

    n = 50_000
    per_call = min(anyio.run(run_many, n) for _ in range(5)) / n * 1e9
    direct = min(anyio.run(_direct, ok, n) for _ in range(5)) / n * 1e9
    rows.append(("RetryPolicy.run, first attempt succeeds", per_call))
    rows.append(("  (await ok() alone)", direct))
    width = max(len(name) for name, _ in rows)
    for name, ns in rows:
        print(f"{name:<{width}}  {ns:8.0f} ns")


async def _direct(fn: object, n: int) -> float:
    import time

    start = time.perf_counter()
    for _ in range(n):
        await fn()  # type: ignore[operator]
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
