"""`resilient-voice demo --workers N --redis URL`: the campaign from N processes, one CPS budget.

The parent (:func:`run_fleet`) serves the fake upstream, as for one process, and starts N
worker processes (``python -m resilient_voice._demo_fleet SPEC``). Worker ``k`` calls the numbers
at positions ``k, k + N, ...``: the numbers are partitioned, so no two workers ever dial the same
one. Each builds its own client and breaker, with the pacing bucket in Redis
(``TokenBucket(store=RedisBackend)``, one name for the whole fleet): the account's calls per
second hold across the fleet, which the upstream checks on its own clock (``cps_violations``).
A worker reports each change of a number's state as one JSON line on its stdout, its counts four
times a second, and its totals at the end; its log records go to the demo's log file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from resilient_voice._demo_campaign import Campaign, Counts, Tally, create_policies, open_client
from resilient_voice._demo_view import LiveView, Snapshot

if TYPE_CHECKING:
    from resilient_voice._demo import DemoOptions, DemoReport
    from resilient_voice._demo_faults import PlannedFaults

__all__ = ["run_fleet"]

_STATS_EVERY = 0.25


async def run_fleet(
    options: DemoOptions,
    upstream: str,
    upstream_app: PlannedFaults,
    report: DemoReport,
    out: TextIO,
) -> tuple[dict[str, str], Snapshot | None]:
    """Run the campaign from ``options.workers`` processes; return outcomes and the last view."""
    from resilient_voice._demo import add_counts, numbers_for, percentiles

    run_id = uuid.uuid4().hex[:12]
    numbers = numbers_for(options.calls)
    outcomes = dict.fromkeys(numbers, "queued")
    stats: dict[int, dict[str, Any]] = {}
    totals: dict[int, dict[str, Any]] = {}
    started = time.monotonic()

    def snapshot() -> Snapshot:
        values = list(outcomes.values())
        states = sorted({s.get("breaker", "closed") for s in stats.values()}) or ["closed"]
        done = len(totals) == options.workers
        return Snapshot(
            elapsed=time.monotonic() - started,
            calls=options.calls,
            placed=sum(1 for o in values if o in ("placed", "reconciled")),
            queued=values.count("queued"),
            in_flight=values.count("in flight"),
            failed=values.count("failed"),
            attempts=sum(s.get("attempts", 0) for s in stats.values()),
            refused_fast=sum(s.get("refused", 0) for s in stats.values()),
            unknown=sum(s.get("unknown", 0) for s in stats.values()),
            retries=sum(s.get("retries", 0) for s in stats.values()),
            breaker="/".join(states),
            phase="done" if done else upstream_app.phase(),
            injected=upstream_app.injected(),
        )

    async def worker(index: int) -> None:
        spec = {
            "index": index,
            "workers": options.workers,
            "upstream": upstream,
            "provider": options.provider,
            "calls": options.calls,
            "cps": options.cps,
            "recovery_timeout": options.recovery_timeout,
            "deadline": max(0.0, options.deadline - (time.monotonic() - started)),
            "redis_url": options.redis_url,
            "prefix": f"rv-demo-{run_id}",
            "bucket": f"demo-cps-{run_id}",
            "log_file": options.log_file,
        }
        command = [sys.executable, "-m", "resilient_voice._demo_fleet", json.dumps(spec)]
        with open(options.log_file or "/dev/null", "ab") as log:  # noqa: ASYNC230
            async with await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
            ) as process:
                assert process.stdout is not None  # noqa: S101  (stdout=PIPE)
                buffer = b""
                async for chunk in process.stdout:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        _take(json.loads(line), index)
                await process.wait()
        if index not in totals:
            raise RuntimeError(f"demo worker {index} exited {process.returncode} without a report")

    def _take(message: dict[str, Any], index: int) -> None:
        if "n" in message:
            outcomes[message["n"]] = message["o"]
        elif "stats" in message:
            stats[index] = message["stats"]
        elif "report" in message:
            totals[index] = message["report"]

    view = LiveView(out, live=options.live, snapshot=snapshot)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(view.run)
        try:
            async with anyio.create_task_group() as fleet:
                for index in range(options.workers):
                    fleet.start_soon(worker, index)
        finally:
            view.stop()

    latencies: list[float] = []
    for index, total in sorted(totals.items()):
        add_counts(report, Counts(**total["counts"]))
        report.retried += total["retries"]
        report.transitions.extend({**t, "worker": index} for t in total["transitions"])
        latencies.extend(total["latencies"])
    report.transitions.sort(key=lambda t: t["at_s"])
    report.latency_ms = percentiles(latencies)
    return outcomes, view.last


async def _work(spec: dict[str, Any]) -> None:
    """One worker: its share of the numbers, paced by the fleet's bucket in Redis."""
    from resilient_voice._demo import log_to_file, numbers_for
    from resilient_voice.redis import RedisBackend

    log_to_file(spec["log_file"] or None)
    started = time.monotonic()
    tally = Tally(started)

    def emit(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async with RedisBackend.from_url(spec["redis_url"], prefix=spec["prefix"]) as backend:
        create, read, retry = create_policies(
            spec["cps"], spec["recovery_timeout"], tally, store=backend, bucket=spec["bucket"]
        )
        numbers = numbers_for(spec["calls"])[spec["index"] :: spec["workers"]]
        client = open_client(spec["provider"], spec["upstream"], create, read, tally.latencies)
        async with client as (place, reconcile):
            campaign = Campaign(
                numbers,
                place,
                reconcile,
                cps=spec["cps"] / spec["workers"],
                deadline=started + spec["deadline"],
                backoff=retry.backoff,
                on_outcome=lambda number, outcome: emit({"n": number, "o": outcome}),
            )

            async def report_stats() -> None:
                while True:
                    emit({"stats": _stats(campaign, tally)})
                    await anyio.sleep(_STATS_EVERY)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(report_stats)
                await campaign.run()
                tasks.cancel_scope.cancel()
    emit({"stats": _stats(campaign, tally)})
    emit(
        {
            "report": {
                "counts": asdict(campaign.counts),
                "retries": tally.retries,
                "transitions": tally.transitions,
                "latencies": tally.latencies,
            }
        }
    )


def _stats(campaign: Campaign, tally: Tally) -> dict[str, Any]:
    counts = campaign.counts
    return {
        "attempts": counts.attempts,
        "refused": counts.refused_breaker + counts.refused_limiter,
        "unknown": counts.outcome_unknown,
        "retries": tally.retries,
        "breaker": tally.state.value,
    }


if __name__ == "__main__":
    anyio.run(_work, json.loads(sys.argv[1]))
