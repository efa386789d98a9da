"""The test helper _together: workers that get ready at different times still start together,
and a worker that dies or hangs before it is ready fails the test with a message that says so.

Real processes, bounded: each test runs in a few seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from _together import Together, run_together

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}{os.pathsep}{TESTS}"}

# A worker that sets up for ``late`` seconds, then reports when it was released.
WORKER = """
import json, sys, time, anyio
from _together import released

async def main(late):
    time.sleep(late)  # a slow import or connection
    start = await released()
    return {"start": start, "running": time.time()}

print(json.dumps(anyio.run(main, float(sys.argv[1]))))
"""


def test_workers_ready_at_different_times_start_together() -> None:
    results = run_together(
        [[sys.executable, "-c", WORKER, str(late)] for late in (0.0, 1.5, 0.5)],
        env=ENV,
        timeout=30,
    )
    assert len({r["start"] for r in results}) == 1  # one start time for all
    running = [r["running"] for r in results]
    # Each wakes at the start (no earlier) after a 0.3 s lead; 0.25 s for a loaded machine.
    assert all(results[0]["start"] <= t < results[0]["start"] + 0.25 for t in running)


def test_a_worker_that_dies_before_it_is_ready_fails_with_its_stderr() -> None:
    dying = [sys.executable, "-c", "import sys; sys.exit('no connection')"]
    with pytest.raises(AssertionError, match=r"(?s)exited before it was ready.*no connection"):
        run_together([[sys.executable, "-c", WORKER, "0"], dying], env=ENV, timeout=30)


def test_a_worker_that_never_gets_ready_fails_within_the_bound() -> None:
    hung = [sys.executable, "-c", "import time; time.sleep(60)"]
    with Together([hung], env=ENV) as together:
        with pytest.raises(AssertionError, match="was not ready within 1 s"):
            together.release(ready_timeout=1.0)
        process = together.processes[0]
    assert process.returncode is not None  # killed on the way out
