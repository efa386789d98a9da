"""What `resilient-voice demo` shows: the live progress view and the end-of-run summary.

The campaign (:mod:`resilient_voice._demo_campaign`) places and reconciles calls; the demo
(:mod:`resilient_voice._demo`) hands this module a :class:`Snapshot` of it whenever it draws and
a :class:`~resilient_voice._demo.DemoReport` at the end. With rich on a terminal the view is
redrawn in place and its last frame is drawn after the campaign settled, so what stays on the
screen is the final state; without a terminal it prints one plain line a second and a last one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import anyio

if TYPE_CHECKING:
    from resilient_voice._demo import DemoReport

__all__ = ["LiveView", "Snapshot", "export_svg", "render_summary"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The campaign at one moment, as the view draws it."""

    elapsed: float
    calls: int
    placed: int
    queued: int
    in_flight: int
    failed: int
    attempts: int
    refused_fast: int
    unknown: int
    retries: int
    breaker: str
    phase: str
    injected: Mapping[str, int] = field(default_factory=dict)


def _injected(injected: Mapping[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in injected.items() if count) or "none"


def _parts(s: Snapshot) -> tuple[str, str, str]:
    progress = (
        f"{s.elapsed:5.1f}s  placed {s.placed} of {s.calls}  phase: {s.phase}  breaker: {s.breaker}"
    )
    counts = (
        f"attempts={s.attempts} in_flight={s.in_flight} queued={s.queued} "
        f"refused_fast={s.refused_fast} unknown={s.unknown} retries={s.retries} "
        f"failed={s.failed}"
    )
    return progress, counts, f"faults injected: {_injected(s.injected)}"


def snapshot_line(s: Snapshot) -> str:
    """One plain line for a log or a pipe."""
    return "  ".join(_parts(s))


def snapshot_renderable(s: Snapshot) -> Any:
    """The live view as a rich renderable."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_row(ProgressBar(total=s.calls, completed=s.placed, width=50))
    for part in _parts(s):
        table.add_row(part)
    return table


class LiveView:
    """The live terminal view (rich) or, without a terminal, one plain line a second."""

    def __init__(self, out: TextIO, *, live: bool, snapshot: Callable[[], Snapshot]) -> None:
        self._out = out
        self._live = live
        self._snapshot = snapshot
        self._stopped = anyio.Event()
        self.last: Snapshot | None = None

    def stop(self) -> None:
        """End the view: it draws the final state once more and returns from :meth:`run`."""
        self._stopped.set()

    def _take(self) -> Snapshot:
        self.last = self._snapshot()
        return self.last

    async def run(self) -> None:
        if self._live:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self._out)
            with Live(
                snapshot_renderable(self._take()), console=console, auto_refresh=False
            ) as live:
                while not self._stopped.is_set():
                    with anyio.move_on_after(0.125):
                        await self._stopped.wait()
                    live.update(snapshot_renderable(self._take()), refresh=True)
        else:
            while not self._stopped.is_set():
                with anyio.move_on_after(1.0):
                    await self._stopped.wait()
                print(snapshot_line(self._take()), file=self._out, flush=True)


def _rows(report: DemoReport) -> list[tuple[str, str]]:
    latency = " / ".join(str(report.latency_ms.get(k, "-")) for k in ("p50", "p95", "p99"))
    return [
        ("provider / faults / seed", f"{report.provider} / {report.faults} / {report.seed}"),
        ("workers", str(report.workers)),
        ("placed", f"{report.placed} of {report.calls}"),
        ("  of which reconciled (answer lost, call found)", str(report.reconciled_placed)),
        ("unplaced at the deadline", str(len(report.unplaced))),
        ("failed for good (permanent error)", str(report.failed)),
        ("attempts", str(report.attempts)),
        ("refused fast by the open breaker (re-queued)", str(report.failed_fast)),
        ("refused by the limiter (re-queued)", str(report.refused_limiter)),
        ("retries within an attempt", str(report.retried)),
        ("outcome unknown, reconciled", str(report.outcome_unknown)),
        ("  not placed (re-queued)", str(report.reconciled_not_placed)),
        ("faults injected", _injected(report.injected)),
        ("calls created upstream", str(report.upstream_created)),
        ("duplicate calls seen upstream", str(sum(report.duplicates.values()))),
        ("lost calls", str(len(report.lost))),
        ("CPS violations seen upstream", str(report.cps_violations)),
        (
            "busiest second upstream (calls; limit)",
            f"{report.upstream_busiest_second}; {report.cps:g}/s",
        ),
        ("latency per request p50 / p95 / p99 (ms)", latency),
        ("run time (s)", str(report.seconds)),
    ]


def verdict(report: DemoReport) -> str:
    """The last line: what the run proves, or what went wrong."""
    placed = f"placed {report.placed} of {report.calls}"
    if report.ok:
        return (
            f"OK: {placed}; nobody was called twice, no call was lost, "
            "the calls-per-second limit held"
        )
    reasons = []
    if report.unplaced:
        reasons.append(f"{len(report.unplaced)} not placed by the deadline")
    if report.duplicates:
        reasons.append(f"{len(report.duplicates)} numbers called more than once")
    if report.lost:
        reasons.append(f"{len(report.lost)} calls lost")
    if report.cps_violations:
        reasons.append(f"{report.cps_violations} CPS violations")
    return f"FAILED: {placed}; " + ", ".join(reasons)


def _table(report: DemoReport) -> Any:
    from rich.table import Table

    table = Table(title="resilient_voice demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in _rows(report):
        table.add_row(name, value)
    return table


def _transitions(report: DemoReport) -> str:
    text = ", ".join(f"{t['at_s']}s {t['from']}->{t['to']}" for t in report.transitions)
    return f"breaker transitions: {text or 'none'}"


def render_summary(report: DemoReport, out: TextIO, *, live: bool) -> None:
    """Print the end-of-run summary table, the verdict and where the log went."""
    if live:
        from rich.console import Console

        console = Console(file=out)
        console.print(_table(report))
        console.print(_transitions(report), highlight=False)
    else:
        rows = _rows(report)
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}", file=out)
        print(_transitions(report), file=out)
    print(verdict(report), file=out)
    if report.log_file:
        print(f"log: {report.log_file}", file=out)


def export_svg(report: DemoReport, last: Snapshot | None, path: str) -> None:
    """Save the final view and the summary as an SVG (rich's recording console)."""
    import io

    from rich.console import Console

    console = Console(record=True, file=io.StringIO(), width=100)
    if last is not None:
        console.print(snapshot_renderable(last))
        console.print()
    console.print(_table(report))
    console.print(_transitions(report), highlight=False)
    console.print(verdict(report), highlight=False)
    console.save_svg(path, title="resilient-voice demo")
