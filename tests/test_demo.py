"""The main job: `resilient-voice demo` calls every number exactly once through the faults.

The demo's verdict is checked against the fake upstream's own records. In-process tests run a
small campaign at the default rate (20 calls per second) on real time over loopback: a few
seconds each. The subprocess tests (marked slow) run the command as a user does, the fleet of
two workers against the Redis on 127.0.0.1:6379 among them.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _redis import REDIS_URL
from resilient_voice._demo import DemoOptions, busiest_second, numbers_for, run_demo
from resilient_voice._demo_faults import FAULT_KINDS, FAULT_PROFILES, PROFILE_HELP, FaultPlan
from resilient_voice.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
NUMBERS = numbers_for(200)


def run_cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resilient_voice", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        check=False,
    )


@settings(max_examples=200, deadline=None)
@given(
    profile=st.sampled_from(FAULT_PROFILES),
    seed=st.integers(min_value=-(2**63), max_value=2**63),
    queries=st.lists(
        st.tuples(st.sampled_from(NUMBERS), st.integers(min_value=0, max_value=20)),
        min_size=1,
        max_size=30,
    ),
    shuffle=st.randoms(use_true_random=False),
)
def test_the_fault_of_a_number_and_attempt_is_a_pure_function_of_the_seed(
    profile: str, seed: int, queries: list[tuple[str, int]], shuffle: object
) -> None:
    """Same seed, number and attempt, same fault: whatever was drawn before, in any order."""
    first = FaultPlan(profile, seed, NUMBERS)
    answers = {query: first.draw(*query) for query in queries}
    second = FaultPlan(profile, seed, NUMBERS)
    reordered = list(reversed(queries))
    shuffle.shuffle(reordered)  # type: ignore[attr-defined]
    for query in reordered:
        second.draw("+15550000000", 0)  # an unrelated draw in between changes nothing
        assert second.draw(*query) == answers[query]
        assert first.draw(*query) == answers[query]
    assert all(kind is None or kind in FAULT_KINDS for kind in answers.values())


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(), number=st.sampled_from(NUMBERS), attempt=st.integers(1, 50))
def test_phases_hit_a_number_on_its_first_attempt_only(
    seed: int, number: str, attempt: int
) -> None:
    """A retried number meets the background faults only, so every campaign can complete."""
    storm = FaultPlan("storm", seed, NUMBERS).draw(number, attempt)
    flaky = FaultPlan("flaky", seed, NUMBERS).draw(number, attempt)
    assert storm == flaky
    assert FaultPlan("none", seed, NUMBERS).draw(number, 0) is None


def test_seeds_differ_and_phases_follow_the_campaign() -> None:
    one = [FaultPlan("storm", 1, NUMBERS).draw(n, 0) for n in NUMBERS]
    two = [FaultPlan("storm", 2, NUMBERS).draw(n, 0) for n in NUMBERS]
    assert one != two
    plan = FaultPlan("storm", 1, NUMBERS)
    phases = [plan.phase(n) for n in NUMBERS]
    assert phases[0] == "flaky"
    assert phases[25] == "429 storm"
    assert phases[75] == "outage"
    assert phases[130] == "lost answers"
    assert all(
        plan.draw(n, 0) == "http_503" for n, p in zip(NUMBERS, phases, strict=True) if p == "outage"
    )
    with pytest.raises(ValueError, match="profile"):
        FaultPlan("apocalypse", 1, NUMBERS)


def test_busiest_second_slides_over_the_creation_times() -> None:
    assert busiest_second([]) == 0
    assert busiest_second([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert busiest_second([2.0, 0.0, 0.1, 0.2]) == 3


async def test_the_storm_at_the_default_rate_places_every_number_once(tmp_path: Path) -> None:
    svg = tmp_path / "demo.svg"
    out = io.StringIO()
    options = DemoOptions(calls=24, live=False, seed=3, deadline=60.0, export_svg=str(svg))
    report = await run_demo(options, out)
    assert report.cps == 20.0
    assert (report.placed, report.unplaced, report.ok) == (24, [], True), out.getvalue()
    assert report.duplicates == {}
    assert report.lost == []
    assert report.cps_violations == 0
    assert report.upstream_created == 24
    # The storm happened: the phases' faults were injected and answered.
    assert report.injected.get("http_429", 0) >= 1
    assert report.injected.get("http_503", 0) >= 1
    assert report.injected.get("lost_answer", 0) >= 1
    assert report.reconciled_placed >= 1
    assert report.attempts > 24
    assert set(report.latency_ms) == {"p50", "p95", "p99"}
    text = svg.read_text()
    assert text.startswith("<svg")
    assert "placed&#160;24&#160;of&#160;24" in text or "placed 24 of 24" in text


async def test_a_deadline_that_leaves_numbers_unplaced_is_not_ok() -> None:
    options = DemoOptions(calls=30, live=False, faults="none", deadline=0.3)
    report = await run_demo(options, io.StringIO())
    assert report.unplaced, "a 0.3 s deadline at 20 calls per second leaves numbers unplaced"
    assert report.placed + len(report.unplaced) == 30
    assert report.duplicates == {}
    assert report.lost == []
    assert report.ok is False
    assert json.loads(report.to_json())["ok"] is False


def test_help_explains_each_fault_profile(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for profile in FAULT_PROFILES:
        assert " ".join(PROFILE_HELP[profile].split()) in text
    for flag in ("--deadline", "--export-svg", "--workers", "--redis", "--seed"):
        assert flag in text


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["twilio", "vapi"])
def test_demo_survives_the_storm_through_the_cli(provider: str, tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    result = run_cli(
        "demo", "--provider", provider, "--calls", "40", "--json", "--log-file", str(log)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert (report["placed"], report["calls"], report["unplaced"]) == (40, 40, [])
    assert report["duplicates"] == {}
    assert report["lost"] == []
    assert report["cps_violations"] == 0
    assert report["upstream_created"] == 40
    assert report["attempts"] >= 40
    assert sum(report["injected"].values()) > 0
    assert report["metrics_url"].startswith("http://127.0.0.1:")
    # Log records go to the file, never to the screen; its path is printed at the end.
    assert f"log: {log}" in result.stderr
    assert "outcome unknown" not in result.stderr
    assert log.exists()


@pytest.mark.slow
def test_demo_plain_output_says_placed_n_of_n() -> None:
    result = run_cli("demo", "--calls", "20", "--cps", "100", "--faults", "none", "--no-live")
    assert result.returncode == 0, result.stderr
    assert "duplicate calls seen upstream" in result.stdout
    assert "OK: placed 20 of 20; nobody was called twice" in result.stdout
    assert "log: " in result.stdout


@pytest.mark.slow
def test_unplaced_numbers_exit_1() -> None:
    result = run_cli("demo", "--calls", "40", "--faults", "none", "--deadline", "0.3", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["unplaced"]


@pytest.mark.slow
def test_a_fleet_of_two_workers_shares_one_cps_budget() -> None:
    result = run_cli(
        "demo", "--calls", "40", "--workers", "2", "--redis", REDIS_URL, "--json", "--seed", "5"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["workers"] == 2
    assert report["ok"] is True
    assert (report["placed"], report["unplaced"], report["duplicates"]) == (40, [], {})
    # Measured by the upstream on its own clock, across both processes: no call earlier than
    # the shared schedule allows (0.25 s tolerance), so at most 20 + 1 + 5 in any one second.
    assert report["cps_violations"] == 0
    assert 0 < report["upstream_busiest_second"] <= 26
    assert report["upstream_created"] == 40


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--calls", "0"],
        ["demo", "--calls", "many"],
        ["demo", "--cps", "nan"],
        ["demo", "--cps", "-1"],
        ["demo", "--faults", "apocalypse"],
        ["demo", "--metrics-port", "70000"],
        ["demo", "--deadline", "0"],
        ["demo", "--deadline", "soon"],
        ["demo", "--workers", "2"],
        ["demo", "--workers", "99", "--redis", "redis://127.0.0.1:6379/0"],
        ["demo", "--workers", "2", "--redis", "http://127.0.0.1:6379"],
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
