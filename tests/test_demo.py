"""The main job: `resilient-voice demo` places calls through faults without duplicates or losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resilient_voice.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resilient_voice", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["twilio", "vapi"])
def test_demo_survives_the_storm_without_duplicates_or_lost_calls(provider: str) -> None:
    result = run_cli(
        "demo", "--provider", provider, "--calls", "60", "--cps", "60", "--json", "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["duplicates"] == {}
    assert report["lost"] == []
    accounted = (
        report["placed"] + report["failed"] + report["failed_fast"] + report["outcome_unknown"]
    )
    assert accounted == 60
    # Every call created upstream is one the client reported placed, or found by reconciling.
    assert report["upstream_created"] == report["placed"] + report["reconciled_placed"]
    assert report["metrics_url"].startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_demo_plain_output_has_a_summary() -> None:
    result = run_cli("demo", "--calls", "20", "--cps", "100", "--faults", "none", "--no-live")
    assert result.returncode == 0, result.stderr
    assert "duplicate calls seen upstream" in result.stdout
    assert "OK: nobody was called twice" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--calls", "0"],
        ["demo", "--calls", "many"],
        ["demo", "--cps", "nan"],
        ["demo", "--cps", "-1"],
        ["demo", "--faults", "apocalypse"],
        ["demo", "--metrics-port", "70000"],
        ["launch"],
        [],
    ],
)
def test_bad_options_exit_2_with_a_message_and_no_traceback(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert "Traceback" not in err
