"""What `resilient-voice demo` shows: the live progress view and the end-of-run summary.

The campaign (:mod:`resilient_voice._demo`) places and reconciles calls and fills a
:class:`~resilient_voice._demo.DemoReport`; this module only draws: with rich on a terminal, as
plain lines otherwise. Kept apart so that the campaign reads as the sequence of what it does, and
what the terminal shows can change without touching it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TextIO

import anyio

if TYPE_CHECKING:
    from resilient_voice._demo import DemoOptions, DemoReport, Tally

__all__ = ["LiveView", "render_summary"]


class LiveView:
    """The live terminal view (rich) or, without a terminal, one plain line a second."""

    def __init__(
        self, options: DemoOptions, out: TextIO, outcomes: dict[str, str], tally: Tally
    ) -> None:
        self._options = options
        self._out = out
        self._outcomes = outcomes
        self._tally = tally
        self._live: Any = None

    def _counts(self) -> dict[str, int]:
        done = self._outcomes.values()
        return {
            "done": len(self._outcomes),
            "placed": sum(1 for o in done if o == "placed"),
            "failed_fast": sum(1 for o in done if o == "failed_fast"),
            "failed": sum(1 for o in done if o == "failed"),
            "unknown": sum(1 for o in done if o == "unknown"),
        }

    def _parts(self) -> tuple[str, str]:
        c = self._counts()
        elapsed = max(1e-9, time.monotonic() - self._tally.started)
        progress = (
            f"{elapsed:5.1f}s  {c['done']}/{self._options.calls} done  "
            f"{c['done'] / elapsed:5.1f} calls/s  breaker={self._tally.state.value}"
        )
        counts = (
            f"placed={c['placed']} retries={self._tally.retries} "
            f"failed_fast={c['failed_fast']} failed={c['failed']} unknown={c['unknown']}"
        )
        return progress, counts

    def _line(self) -> str:
        return "  ".join(self._parts())

    def _renderable(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        c = self._counts()
        table = Table.grid(padding=(0, 2))
        table.add_row(ProgressBar(total=self._options.calls, completed=c["done"], width=50))
        for part in self._parts():
            table.add_row(part)
        return table

    async def run(self) -> None:
        if self._options.live:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self._out)
            with Live(self._renderable(), console=console, refresh_per_second=8) as live:
                self._live = live
                while True:
                    live.update(self._renderable())
                    await anyio.sleep(0.125)
        else:
            while True:
                await anyio.sleep(1.0)
                print(self._line(), file=self._out, flush=True)

    def finish(self) -> None:
        print(self._line(), file=self._out, flush=True)


def render_summary(report: DemoReport, out: TextIO, *, live: bool) -> None:
    """Print the end-of-run summary table."""
    rows = [
        ("provider / faults", f"{report.provider} / {report.faults}"),
        ("calls requested", str(report.calls)),
        ("placed", str(report.placed)),
        ("failed (definite, nothing created)", str(report.failed)),
        ("failed fast while the breaker was open", str(report.failed_fast)),
        ("retries", str(report.retried)),
        ("outcome unknown", str(report.outcome_unknown)),
        ("  reconciled: placed upstream", str(report.reconciled_placed)),
        ("  reconciled: not placed", str(report.reconciled_not_placed)),
        ("calls created upstream", str(report.upstream_created)),
        ("duplicate calls seen upstream", str(sum(report.duplicates.values()))),
        ("lost calls", str(len(report.lost))),
        ("CPS violations seen upstream", str(report.cps_violations)),
        (
            "latency p50 / p95 / p99 (ms)",
            " / ".join(str(report.latency_ms.get(k, "-")) for k in ("p50", "p95", "p99")),
        ),
        ("run time (s)", str(report.seconds)),
    ]
    transitions = (
        ", ".join(f"{t['at_s']}s {t['from']}->{t['to']}" for t in report.transitions) or "none"
    )
    if live:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="resilient_voice demo")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for name, value in rows:
            table.add_row(name, value)
        console = Console(file=out)
        console.print(table)
        console.print(f"breaker transitions: {transitions}")
    else:
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}", file=out)
        print(f"breaker transitions: {transitions}", file=out)
    verdict = "OK: nobody was called twice and no call was lost" if report.ok else "FAILED"
    print(verdict, file=out)
