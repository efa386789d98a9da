"""Uses the public API as an application would; checked by ``mypy --strict`` in CI.

Not collected by pytest (no ``test_`` prefix); it is a type-checking fixture.
"""

from __future__ import annotations

import resilient_voice
from resilient_voice import FailureKind, RateLimitedError, RejectedError
from resilient_voice.testing import ManualClock


def classify(exc: BaseException) -> FailureKind | None:
    if isinstance(exc, RejectedError):
        return exc.failure_kind
    return None


clock = ManualClock(0.0, autojump=True)
now: float = clock.now()
error = RateLimitedError("twilio-cps", 0.5)
wait: float | None = error.retry_after
version: str = resilient_voice.__version__
