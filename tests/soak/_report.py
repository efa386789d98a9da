"""Render the soak's JSON figures as the Markdown tables of docs/reliability.md.

Run as ``python tests/soak/_report.py <directory>`` after
``RV_SOAK_DIR=<directory> pytest -m soak --soak-size full tests/soak -s``; prints one table per
JSON file found (the outbound soak, its 3-process run, the Redis loss run).
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


def lanes_table(lanes: dict[str, dict[str, Any]]) -> str:
    names = list(lanes)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in ROWS:
        cells = ["-" if lanes[n].get(key) is None else str(lanes[n][key]) for n in names]
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
