"""A worker that places a call list at a calls-per-second cap, through a faulty upstream.

What a campaign worker needs, in one small script:

- one ``TwilioClient`` for the account, whose ``calls_per_second`` paces every ``create_call``
  (Twilio queues calls over the account's CPS rather than refusing them, so pacing is on you);
- a bounded number of concurrent tasks pulling numbers from the list: concurrency hides latency,
  the client's token bucket keeps the pace;
- a circuit breaker: while it is open, calls fail fast without being sent, so the worker waits
  ``retry_after`` and tries the same number again (safe: nothing was sent);
- unknown outcomes (a response lost after Twilio may have created the call) are never retried
  blindly: after the run, ``reconcile_call`` asks Twilio whether each one exists; those it does
  not have are safe to place in a later pass;
- a summary, checked against the upstream's own records: nobody called twice, no CPS overrun.

Against a fake Twilio (``FakeTelephony`` on loopback) with a scripted mix of 5xx answers, 429s,
lost responses and a short outage. Run: ``python examples/paced_worker.py [--calls 60]
[--cps 10] [--concurrency 4]`` (about six seconds with the defaults).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_voice import CircuitBreaker, CircuitOpenError, OutcomeUnknownError
from resilient_voice.testing import FakeTelephony, Fault, serve
from resilient_voice.twilio import TwilioAPIError, TwilioClient

SID, TOKEN = "AC" + "0" * 32, "example-auth-token"
CALLER, TWIML = "+15005550006", "https://example.com/twiml/reminder"


@dataclass(slots=True)
class Summary:
    """What happened to the call list, and what the upstream saw."""

    calls: int
    seconds: float = 0.0
    placed: int = 0
    failed: list[str] = field(default_factory=list)  # definite failures: nothing was placed
    waited_for_breaker: int = 0
    unknown: list[str] = field(default_factory=list)
    reconciled_placed: int = 0
    to_retry: list[str] = field(default_factory=list)  # unknown, and Twilio has no such call
    upstream_calls: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    cps_violations: int = 0

    def __str__(self) -> str:
        return "\n".join(
            [
                f"{self.calls} numbers in {self.seconds:.1f}s ({self.calls / self.seconds:.1f}/s)",
                f"  placed:                  {self.placed}",
                f"  definite failures:       {len(self.failed)}",
                f"  waits for the breaker:   {self.waited_for_breaker}",
                f"  outcome unknown:         {len(self.unknown)}",
                f"    reconciled as placed:  {self.reconciled_placed}",
                f"    not placed, to retry:  {len(self.to_retry)}",
                f"upstream: {self.upstream_calls} calls created",
                f"  duplicates:              {self.duplicates or 'none'}",
                f"  CPS violations:          {self.cps_violations}",
            ]
        )


async def place_all(
    twilio: TwilioClient, numbers: list[str], summary: Summary, *, concurrency: int
) -> None:
    """Place every number with ``concurrency`` tasks; the client paces them."""
    pending: Iterator[str] = iter(numbers)  # shared: each task takes the next number

    async def place(number: str) -> None:
        while True:
            try:
                await twilio.create_call(to=number, from_=CALLER, url=TWIML)
            except CircuitOpenError as exc:
                # Refused before sending: safe to try the same number once the breaker probes.
                summary.waited_for_breaker += 1
                await anyio.sleep(exc.retry_after or 0.0)
                continue
            except OutcomeUnknownError:
                summary.unknown.append(number)  # may be ringing: reconcile, never redial
            except (TwilioAPIError, httpx.HTTPError):
                summary.failed.append(number)
            else:
                summary.placed += 1
            return

    async def worker() -> None:
        for number in pending:
            await place(number)

    async with anyio.create_task_group() as tasks:
        for _ in range(concurrency):
            tasks.start_soon(worker)


async def reconcile(twilio: TwilioClient, summary: Summary, since: datetime) -> None:
    """Ask Twilio about every unknown outcome: placed, or safe to place again."""
    for number in summary.unknown:
        if await twilio.reconcile_call(to=number, from_=CALLER, since=since):
            summary.reconciled_placed += 1
        else:
            summary.to_retry.append(number)


async def main(
    *, calls: int = 60, cps: float = 10.0, concurrency: int = 4, seed: int = 3
) -> Summary:
    duration = calls / cps
    create = "twilio.calls.create"
    fake = FakeTelephony(
        seed=seed,
        twilio_accounts={SID: TOKEN},
        calls_per_second=cps,
        status_callbacks=False,
        faults=[
            Fault.outage(0.4 * duration, 0.4 * duration + 0.2 * duration, endpoints=create),
            Fault.rate_limited(0.05, retry_after=0.1, endpoints=create),
            Fault.error_rate(0.03, status=500, endpoints=create),
            Fault.drop_after(0.05, endpoints=create),
            Fault.drop_before(0.03, endpoints=create),
        ],
    )
    numbers = [f"+1555020{n:04d}" for n in range(calls)]
    summary = Summary(calls)
    async with serve(fake) as url:
        # Once per account; the short recovery lets this run show the breaker closing again.
        breaker = CircuitBreaker(f"twilio:{SID}", recovery_timeout=0.1 * duration)
        async with TwilioClient(
            SID, TOKEN, base_url=url, calls_per_second=cps, breaker=breaker
        ) as twilio:
            since = datetime.now(UTC) - timedelta(seconds=5)  # Twilio's clock is not ours
            started = time.monotonic()
            await place_all(twilio, numbers, summary, concurrency=concurrency)
            summary.seconds = time.monotonic() - started
            await reconcile(twilio, summary, since)
    summary.upstream_calls = len(fake.calls("twilio"))
    summary.duplicates = fake.duplicate_destinations("twilio")
    summary.cps_violations = fake.cps_violations()
    print(summary)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--cps", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    options = parser.parse_args()
    anyio.run(lambda: main(calls=options.calls, cps=options.cps, concurrency=options.concurrency))
