"""Per-request overhead of ResilientTransport over the raw httpx transport.

Run ``python benchmarks/transport.py`` (``--quick`` for a short run). Two inner transports:

- ``canned``: an in-process transport that returns a ready 200 response, so the figure is the
  transport's own cost (routing, the policy, correlation header, bookkeeping) with no I/O;
- ``loopback``: ``httpx.AsyncHTTPTransport`` against a local uvicorn server (``serve()``),
  which shows how that cost compares with a real (if tiny) HTTP round trip.

Each is measured through one ``httpx.AsyncClient`` for: the bare inner transport, a
ResilientTransport with ``Policy()`` (no primitives), and one with the default kind of policy
(breaker + retry). Rounds are interleaved and the best round kept, because a shared machine only
adds noise. Prints a markdown table on asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_voice.breaker import CircuitBreaker
from resilient_voice.http import ResilientTransport
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy
from resilient_voice.testing import serve


class Canned(httpx.AsyncBaseTransport):
    """Answers every request with the same small 200, without I/O."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"ok":true}', request=request)


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def variants(inner: Callable[[], httpx.AsyncBaseTransport]) -> dict[str, httpx.AsyncBaseTransport]:
    return {
        "raw": inner(),
        "Policy()": ResilientTransport(Policy(), transport=inner()),
        "breaker + retry": ResilientTransport(
            Policy(breaker=CircuitBreaker("bench"), retry=RetryPolicy(max_attempts=3)),
            transport=inner(),
        ),
    }


async def per_request(client: httpx.AsyncClient, url: str, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await client.get(url)
    return (time.perf_counter() - start) / n


async def measure(
    inner: Callable[[], httpx.AsyncBaseTransport], url: str, n: int, rounds: int
) -> dict[str, float]:
    clients = {
        name: httpx.AsyncClient(transport=transport) for name, transport in variants(inner).items()
    }
    best = dict.fromkeys(clients, float("inf"))
    try:
        for client in clients.values():
            await per_request(client, url, max(10, n // 10))  # warm up (and connect)
        for _ in range(rounds):
            for name, client in clients.items():
                best[name] = min(best[name], await per_request(client, url, n))
    finally:
        for client in clients.values():
            await client.aclose()
    return best


async def direct(n: int, rounds: int) -> dict[str, float]:
    """The transport's own cost: ``handle_async_request`` called directly, no client."""
    transports = variants(Canned)
    request = httpx.Request("GET", "http://bench/x")
    best = dict.fromkeys(transports, float("inf"))
    for _ in range(rounds):
        for name, transport in transports.items():
            handle = transport.handle_async_request
            start = time.perf_counter()
            for _ in range(n):
                await handle(request)
            best[name] = min(best[name], (time.perf_counter() - start) / n)
    return best


async def main(quick: bool) -> None:
    rounds = 3 if quick else 9
    isolated = await direct(2000 if quick else 20000, rounds)
    rows: list[tuple[str, dict[str, float]]] = []
    rows.append(
        (
            "canned (in process)",
            await measure(Canned, "http://bench/x", 500 if quick else 3000, rounds),
        )
    )
    async with serve(ok_app) as url:  # type: ignore[arg-type]
        rows.append(
            (
                "loopback uvicorn",
                await measure(httpx.AsyncHTTPTransport, f"{url}/x", 100 if quick else 500, rounds),
            )
        )
    print(f"Python {sys.version.split()[0]}, httpx {httpx.__version__}, asyncio, best of {rounds}")
    print()
    raw = isolated["raw"]
    print("Transport alone (``handle_async_request`` on a prebuilt request, canned inner):")
    print()
    print("| transport | µs/request | overhead over raw |")
    print("| --- | ---: | ---: |")
    for name, value in isolated.items():
        print(f"| {name} | {value * 1e6:.2f} | {(value - raw) * 1e6:+.2f} |")
    print()
    print("Through ``httpx.AsyncClient``:")
    print()
    print(
        "| inner transport | raw (µs/request) | Policy() | overhead | breaker + retry | overhead |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, best in rows:
        raw, bare, full = best["raw"], best["Policy()"], best["breaker + retry"]
        print(
            f"| {label} | {raw * 1e6:.1f} | {bare * 1e6:.1f} | {(bare - raw) * 1e6:+.1f} | "
            f"{full * 1e6:.1f} | {(full - raw) * 1e6:+.1f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    asyncio.run(main(parser.parse_args().quick))
