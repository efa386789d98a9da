"""Measure what three uvicorn workers admit while their limiter is on its local share.

A bounded variant of the inbound soak (docs/reliability.md, "The fallback's divisor"): the same
app (tests/_fallback_share_app.py wraps tests/_inbound_load_app.py) under ``uvicorn --workers 3``
on the Redis at ``REDIS_URL``, the same load generator, with a store ``timeout`` short enough
that the workers' round trips go over it and they fall back to ``rate / replicas``. Prints one
JSON line: fallbacks and returns, per key what was admitted against the soak's bound
``burst + rate * (run + slowest answer)``, and per worker the counts it divided by.

Run: ``python tests/soak/fallback_share.py [--old-rule] [--timeout 0.02] [--warm-up 0]
[--min-replicas 3]``. Not a test: the figures depend on the machine (docs/reliability.md has one
set of them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).parent.parent
sys.path[:0] = [str(TESTS), str(TESTS / "soak")]

import test_inbound_load as soak  # noqa: E402

from _redis import REDIS_URL, free_port, fresh_prefix  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-rule", action="store_true", help="divide by the last count")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--keyed", type=int, default=100, help="keyed connections (3 keys)")
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--burst", type=float, default=5.0)
    parser.add_argument("--timeout", default="0.02", help="the store's timeout, s")
    parser.add_argument("--warm-up", type=float, default=0.0, help="s of light traffic first")
    parser.add_argument("--min-replicas", type=int, default=1, help="RedisBackend(min_replicas=)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rv-fallback-share-"))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
        "RV_REDIS_URL": REDIS_URL,
        "RV_PREFIX": fresh_prefix(),
        "RV_TOKEN": soak.TOKEN,
        "RV_BASE_URL": soak.BASE_URL,
        "RV_RATE": str(args.rate),
        "RV_BURST": str(args.burst),
        "RV_REDIS_TIMEOUT": args.timeout,
        "RV_OLD_RULE": "1" if args.old_rule else "0",
        "RV_MIN_REPLICAS": str(args.min_replicas),
        "RV_DUMP": str(work),
    }
    with (work / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "_fallback_share_app:app",
                "--workers", "3", "--port", str(port), "--backlog", "4096",
                "--no-access-log", "--log-level", "warning",
            ],
            env=env,
            cwd=TESTS,
            stderr=log,
        )  # fmt: skip
    try:
        pids = soak._worker_pids(port, 3, timeout=30)  # one heartbeat from each, in turn
        if len(pids) != 3:
            raise SystemExit(f"only workers {pids} answered")
        end = time.monotonic() + args.warm_up
        while time.monotonic() < end:
            soak._get(port, "/echo", f"warm-up-{time.monotonic_ns()}")
            time.sleep(0.02)
        options = {
            "port": port,
            "connections": args.connections,
            "duration": args.seconds,
            "keys": 3,
            "keyed_connections": args.keyed,
            "token": soak.TOKEN,
            "base_url": soak.BASE_URL,
        }
        client = TESTS / "_inbound_load_client.py"
        result_path = work / "load.json"
        subprocess.run(
            [sys.executable, str(client), json.dumps(options), str(result_path)],
            env=env,
            check=True,
        )
    finally:
        server.terminate()
        server.wait(30)
    result = json.loads(result_path.read_text())
    log_text = (work / "server.log").read_text(errors="replace")
    elapsed = result["elapsed"]
    admitted = {}
    for key, admissions in sorted(result["admitted"].items()):
        slowest = max((answered - sent for sent, answered in admissions), default=0.0)
        bound = args.burst + args.rate * (elapsed + slowest)
        admitted[key] = {"admitted": len(admissions), "bound": round(bound, 1)}
        admitted[key]["ratio"] = round(len(admissions) / bound, 2)
    workers = {path.stem: json.loads(path.read_text()) for path in work.glob("[0-9]*.json")}
    report = {
        "rule": "last count" if args.old_rule else "peak",
        "min_replicas": args.min_replicas,
        "elapsed_s": round(elapsed, 1),
        "requests": result["requests"],
        "fallbacks": log_text.count("shared store unavailable"),
        "returns": log_text.count("shared store available"),
        "per_key": admitted,
        "workers": workers,
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
