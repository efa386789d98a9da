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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400, got {text}")
    return value


def _workers(text: str) -> int:
    value = _positive_int(text)
    if value > 32:
        raise argparse.ArgumentTypeError(f"must be between 1 and 32, got {value}")
    return value


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(f"expected a redis:// URL, got {text!r}")
    return text


_EPILOG = """\
fault profiles (--faults):
{profiles}

Every number is called exactly once: a call refused by the open breaker or the limiter, one
that failed without being created (429, 5xx) and one whose outcome was unknown and that
reconciling showed was not placed go back on the queue with the retry policy's backoff, until
placed or until --deadline. The fault each (number, attempt) meets is fixed by --seed; what the
breaker lets through depends on timing. Exit status 0 when every number was placed once, none
twice, none lost and the calls-per-second limit held (ok true in --json), else 1.
"""


def build_parser() -> argparse.ArgumentParser:
    from resilient_voice._demo_faults import FAULT_PROFILES, PROFILE_HELP

    parser = argparse.ArgumentParser(
        prog="resilient-voice", description="Resilience for telephony APIs (Twilio, Vapi)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    profiles = "\n".join(f"  {name:<7} {PROFILE_HELP[name]}" for name in FAULT_PROFILES)
    demo = commands.add_parser(
        "demo",
        help="call every number once through a misbehaving fake provider",
        description=(
            "Start a fake Twilio/Vapi upstream on loopback that injects faults, call every "
            "number through the typed client, reconcile unknown outcomes, and check against "
            "the upstream's records that every number was called exactly once, no call was "
            "lost and the calls-per-second limit held."
        ),
        epilog=_EPILOG.format(profiles=profiles),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--calls", type=_positive_int, default=200, help="numbers to call (200)")
    demo.add_argument("--cps", type=_cps, default=20.0, help="the account's calls per second (20)")
    demo.add_argument(
        "--faults", choices=FAULT_PROFILES, default="storm", help="fault profile (storm; below)"
    )
    demo.add_argument("--provider", choices=("twilio", "vapi"), default="twilio")
    demo.add_argument(
        "--seed", type=_seed, default=7, help="fixes the fault of each (number, attempt) (7)"
    )
    demo.add_argument(
        "--deadline",
        type=_seconds,
        default=120.0,
        help="seconds after which nothing more is dialled; the rest is reported unplaced (120)",
    )
    demo.add_argument(
        "--metrics-port", type=_port, default=0, help="port for /metrics (0: any free port)"
    )
    demo.add_argument("--no-live", action="store_true", help="plain lines, no live view")
    demo.add_argument(
        "--json", action="store_true", help="print a JSON report on stdout (progress on stderr)"
    )
    demo.add_argument(
        "--export-svg", metavar="FILE", help="save the final view and the summary as SVG"
    )
    demo.add_argument(
        "--log-file",
        metavar="FILE",
        help="where log records go (default: a new file in the temporary directory)",
    )
    demo.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="run the campaign from N processes sharing one CPS budget (needs --redis)",
    )
    demo.add_argument(
        "--redis",
        type=_redis_url,
        metavar="URL",
        help="Redis holding the fleet's shared CPS budget (redis://127.0.0.1:6379/0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers > 1 and args.redis is None:
        parser.error("--workers needs --redis URL: the workers share their CPS budget there")
    try:
        import rich  # noqa: F401
        import uvicorn  # noqa: F401

        if args.redis is not None:
            import coredis  # noqa: F401
    except ImportError as exc:
        extra = "demo,redis" if args.redis is not None else "demo"
        print(
            f"resilient-voice demo needs the {extra} extra: "
            f"pip install 'resilient-voice[{extra}]' ({exc})",
            file=sys.stderr,
        )
        return 2
    import anyio

    from resilient_voice._demo import DemoOptions, log_to_file, render_summary, run_demo

    live = not args.no_live and not args.json and sys.stdout.isatty()
    log_file = log_to_file(args.log_file)
    options = DemoOptions(
        calls=args.calls,
        cps=args.cps,
        faults=args.faults,
        seed=args.seed,
        metrics_port=args.metrics_port,
        live=live,
        json=args.json,
        provider=args.provider,
        deadline=args.deadline,
        workers=args.workers,
        redis_url=args.redis,
        log_file=log_file,
        export_svg=args.export_svg,
    )
    out = sys.stderr if args.json else sys.stdout
    try:
        report = anyio.run(run_demo, options, out)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(report.to_json())
        print(f"log: {log_file}", file=sys.stderr)
    else:
        render_summary(report, sys.stdout, live=live)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
