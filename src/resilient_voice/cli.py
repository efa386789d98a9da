"""The ``resilient-voice`` command; ``python -m resilient_voice`` runs it too."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100000, got {value}")
    return value


def _cps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or not 0.1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 1000, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from resilient_voice._demo import FAULT_PROFILES

    parser = argparse.ArgumentParser(
        prog="resilient-voice", description="Resilience for telephony APIs (Twilio, Vapi)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="place calls through a misbehaving fake provider and show what survives",
        description=(
            "Start a fake Twilio/Vapi upstream on loopback with scripted faults, place calls "
            "through the typed client, reconcile unknown outcomes, and check that nobody was "
            "called twice and no call was lost. Exits 1 if either happened."
        ),
    )
    demo.add_argument("--calls", type=_positive_int, default=200, help="calls to place (200)")
    demo.add_argument("--cps", type=_cps, default=20.0, help="calls per second (20)")
    demo.add_argument(
        "--faults", choices=FAULT_PROFILES, default="storm", help="fault profile (storm)"
    )
    demo.add_argument("--provider", choices=("twilio", "vapi"), default="twilio")
    demo.add_argument("--seed", type=_seed, default=7, help="seed of the fake's randomness")
    demo.add_argument(
        "--metrics-port", type=_port, default=0, help="port for /metrics (0: any free port)"
    )
    demo.add_argument("--no-live", action="store_true", help="plain log lines, no live view")
    demo.add_argument("--json", action="store_true", help="print a JSON report at the end")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import rich  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(
            "resilient-voice demo needs the demo extra: "
            f"pip install 'resilient-voice[demo]' ({exc})",
            file=sys.stderr,
        )
        return 2
    import anyio

    from resilient_voice._demo import DemoOptions, render_summary, run_demo

    live = not args.no_live and not args.json and sys.stdout.isatty()
    options = DemoOptions(
        calls=args.calls,
        cps=args.cps,
        faults=args.faults,
        seed=args.seed,
        metrics_port=args.metrics_port,
        live=live,
        json=args.json,
        provider=args.provider,
    )
    out = sys.stderr if args.json else sys.stdout
    try:
        report = anyio.run(run_demo, options, out)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(report.to_json())
    else:
        render_summary(report, sys.stdout, live=live)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
