"""The soak marker and size option the reliability campaign relies on."""

from __future__ import annotations

import pytest


def test_tests_here_are_marked_soak(request: pytest.FixtureRequest, soak_size: str) -> None:
    assert request.node.get_closest_marker("soak") is not None
    assert soak_size in {"short", "full"}
