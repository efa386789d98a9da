"""Cost per event of the metrics listeners: OpenTelemetry against Prometheus.

Each row hands one prebuilt event record to a listener, the way a primitive does when someone
listens, and reports nanoseconds per event (best of N repetitions):

- ``no-op``: a listener that does nothing (the call itself; the ratio subtracts it);
- ``prometheus``: :class:`~resilient_voice.metrics.PrometheusMetrics` on its own registry;
- ``otel sdk``: :class:`~resilient_voice.otel.OpenTelemetryListener` on an SDK
  ``MeterProvider`` with an in-memory reader (what an application with an exporter pays per
  event; the export itself happens at collection, off the call path);
- ``otel api``: the same listener with no SDK installed as the global provider (the API's
  no-op meter: what a library user pays who attached it and configured nothing).

The span rows time ``RetryScheduled`` inside a recording SDK span (the span event is added) and
outside any span. A last table times one collection of the in-memory reader after the events of
a few hundred series, the cost the SDK pays per export interval for the observable instruments.

Run: ``python benchmarks/listeners.py`` (the machine is shared: compare numbers from one run).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prometheus_client import CollectorRegistry

from resilient_voice.events import (
    BreakerState,
    CallFailed,
    CallRejected,
    CallSucceeded,
    Event,
    FleetViewUpdated,
    RequestFinished,
    RetryAttemptStarted,
    RetryScheduled,
    StateChanged,
    TokensGranted,
    TokensRejected,
)
from resilient_voice.failure import FailureKind
from resilient_voice.metrics import PrometheusMetrics

REPEAT = 7

EVENTS: list[tuple[str, Event]] = [
    ("CallSucceeded", CallSucceeded("twilio", 0.012)),
    ("CallFailed", CallFailed("twilio", RuntimeError("boom"), 0.012)),
    ("CallRejected", CallRejected("twilio", 4.5)),
    ("StateChanged", StateChanged("twilio", BreakerState.CLOSED, BreakerState.OPEN)),
    ("TokensGranted", TokensGranted("twilio-cps", None, 1.0, 0.0)),
    ("TokensRejected", TokensRejected("twilio-cps", None, 1.0, 0.5)),
    ("RetryAttemptStarted", RetryAttemptStarted("calls", 1, "op-1")),
    (
        "RetryScheduled",
        RetryScheduled("calls", 1, 0.2, FailureKind.UNPROCESSED, RuntimeError("429")),
    ),
    (
        "RequestFinished",
        RequestFinished("twilio", "api.twilio.com", "POST", "twilio.calls.create", "2xx", 0.1, 1),
    ),
    (
        "RequestFinished 429",  # one 429 retried, then created: the backpressure counter too
        RequestFinished(
            "twilio", "api.twilio.com", "POST", "twilio.calls.create", "2xx", 0.2, 2, backpressure=1
        ),
    ),
    ("FleetViewUpdated", FleetViewUpdated("twilio", 3, 1, 40, 0.25)),
]


def per_event(listener: Callable[[Event], None], event: Event, number: int) -> float:
    timer = timeit.Timer("listener(event)", globals={"listener": listener, "event": event})
    return min(timer.repeat(repeat=REPEAT, number=number)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=100_000, help="events per repetition")
    args = parser.parse_args()
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

        from resilient_voice.otel import OpenTelemetryListener
    except ImportError as exc:
        print(f"skipped: the OpenTelemetry SDK is not installed ({exc}); pip install '.[bench]'")
        return
    print(
        f"Python {sys.version.split()[0]}, "
        f"opentelemetry-sdk {metadata.version('opentelemetry-sdk')}, "
        f"prometheus-client {metadata.version('prometheus-client')}"
    )

    reader = InMemoryMetricReader()
    tracer_provider = TracerProvider()
    listeners: dict[str, Callable[[Event], None]] = {
        "no-op": lambda event: None,
        "prometheus": PrometheusMetrics(CollectorRegistry()),
        "otel sdk": OpenTelemetryListener(MeterProvider(metric_readers=[reader]), tracer_provider),
        "otel api": OpenTelemetryListener(),
    }
    names = list(listeners)
    rows: list[tuple[str, list[float]]] = []
    for label, event in EVENTS:
        rows.append((label, [per_event(listeners[name], event, args.number) for name in names]))
    retry = dict(EVENTS)["RetryScheduled"]
    with tracer_provider.get_tracer("bench").start_as_current_span("call"):
        # Fewer: every one adds an event to the span, which keeps them (up to its limit).
        in_span = [per_event(listeners[name], retry, 1000) for name in names]
    rows.append(("RetryScheduled in a recording span", in_span))

    header = ["event", *(f"{name} ns" for name in names), "otel sdk / prometheus (net)"]
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    for label, values in rows:
        ratio = (values[2] - values[0]) / (values[1] - values[0])
        cells = [f"{value:.0f}" for value in values]
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} |")

    # One collection after 300 series (100 breakers, 100 limiters, 100 request series).
    otel = listeners["otel sdk"]
    for i in range(100):
        otel(CallSucceeded(f"b{i}", 0.01))
        otel(TokensGranted(f"l{i}", None, 1.0, 0.0))
        otel(RequestFinished("t", "h", "GET", f"r{i}", "2xx", 0.01, 1))
    timer = timeit.Timer(reader.get_metrics_data)
    collect = min(timer.repeat(repeat=REPEAT, number=20)) / 20 * 1e6
    print(f"\nOne in-memory collection with about 300 series: {collect:.0f} µs")


if __name__ == "__main__":
    main()
