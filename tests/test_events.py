from __future__ import annotations

import logging

import pytest

from resilient_voice.events import BreakerListener, emit


class Recording(BreakerListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    def on_rejected(self, breaker: str, retry_after: float) -> None:
        self.seen.append((breaker, retry_after))


class Broken(BreakerListener):
    def on_rejected(self, breaker: str, retry_after: float) -> None:
        raise RuntimeError("listener bug")


def test_emit_calls_every_listener_and_swallows_listener_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, last = Recording(), Recording()
    with caplog.at_level(logging.ERROR, logger="resilient_voice.events"):
        emit((first, Broken(), last), "on_rejected", "twilio", 1.5)
    assert first.seen == last.seen == [("twilio", 1.5)]
    assert "listener bug" in caplog.text


def test_base_listener_callbacks_are_no_ops() -> None:
    emit((BreakerListener(),), "on_success", "twilio", 0.1)
