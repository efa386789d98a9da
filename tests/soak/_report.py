"""Render the soak's JSON figures as the Markdown tables of docs/reliability.md.

Run as ``python tests/soak/_report.py <directory>`` after
``RV_SOAK_DIR=<directory> pytest -m soak --soak-size full tests/soak -s``; prints one table per
JSON file found (the outbound soak, its 3-process run, its leased run, the Redis loss run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROWS = (
    ("creates", "creates"),
    ("placed", "placed (id returned, present upstream)"),
    ("failed", "definite failures"),
    ("unknown", "unknown outcomes (`OutcomeUnknownError`)"),
    ("reconciled", "unknown outcomes resolved by reconciliation"),
    ("reconciled_created", "... found created"),
    ("reconciled_absent", "... found absent"),
    ("duplicates", "**duplicates**"),
    ("silent_losses", "**silent losses**"),
    ("wrong_reconciliations", "wrong reconciliations"),
    ("unexpected_exceptions", "exceptions other than the typed ones"),
    ("local_rejections", "local rejections (breaker open; nothing sent, tried again)"),
    ("resubmitted_unprocessed", "429s the retries did not absorb (nothing processed, resent)"),
    ("breaker_trips", "breaker trips"),
    ("breaker_open_s_min", "shortest open period, s"),
)

# The leased soak's lanes also carry a "leases" object (tests/soak/_leased.py).
LEASE_ROWS = (
    ("peak_calls_in_progress", "**most calls in progress upstream at once**"),
    ("leases.capacity", "capacity (leases)"),
    ("leases.most_held_at_once", "most leases held at once"),
    ("leases.longest_wait_for_a_lease_s", "longest wait for a lease, s"),
    ("leases.acquired", "leases acquired (one per try of a create)"),
    ("leases.released_by_webhook", "... released by a webhook"),
    ("leases.released_by_lease_release", "... released by `lease.release()`"),
    ("leases.reclaimed_by_reconcile", "... reclaimed by reconciliation"),
    ("leases.reclaimed_by_ttl", "... reclaimed by TTL"),
    ("leases.leases_released_twice", "leases released twice"),
    ("leases.leases_never_released", "leases never released"),
    ("leases.in_use_at_end", "leases held at the end"),
    ("leases.unknown_released_by_reconcile_leases", "unknown outcomes released (no live call)"),
    ("leases.unknown_bound_by_reconcile_leases", "unknown outcomes bound to the live call"),
    ("leases.capacity_signals", "capacity signals"),
    ("leases.reconcile_leases_runs", "`reconcile_leases()` runs"),
)


def _cell(lane: dict[str, Any], key: str) -> str:
    value: Any = lane
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "-" if value is None else str(value)


def lanes_table(lanes: dict[str, dict[str, Any]]) -> str:
    names = list(lanes)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    rows = ROWS + (LEASE_ROWS if any("leases" in lanes[n] for n in names) else ())
    for key, label in rows:
        cells = [_cell(lanes[n], key) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(directory: str) -> None:
    for path in sorted(Path(directory).glob("*.json")):
        if path.name.endswith("-jobs.json"):
            continue
        figures = json.loads(path.read_text(encoding="utf-8"))
        print(f"## {path.stem}\n")  # noqa: T201
        print(f"`{figures.get('command')}`; machine: {figures.get('machine')}\n")  # noqa: T201
        lanes = figures.get("lanes") or {"fleet": figures.get("fleet", {})}
        print(lanes_table(lanes), "\n")  # noqa: T201
        rest = {k: v for k, v in figures.items() if k not in ("lanes", "fleet", "machine")}
        print("```json\n" + json.dumps(rest, indent=1) + "\n```\n")  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1])
