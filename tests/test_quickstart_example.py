"""The README's demo command runs examples/quickstart.py: it must work and show the cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_trips_and_recovers() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    assert "closed -> open" in out
    assert "rejected locally" in out
    assert "upstream saw 3 requests for 5 calls" in out
    assert "half_open -> closed" in out
    assert "state=closed trips=1" in out
