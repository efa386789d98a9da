"""Where a call's lease travels, and which webhooks end a call or report a capacity refusal.

The clients plant a lease's id and generation next to their attempt id (Twilio: in the query of
the callback URLs; Vapi: in ``assistantOverrides.metadata``), and
:class:`~resilient_voice.asgi.LeaseReleaseMiddleware` reads them back from the webhook: both
sides take the names and the rules from here, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "GENERATION_KEY",
    "LEASE_KEY",
    "TWILIO_CAPACITY_CODES",
    "TWILIO_FINAL_STATUSES",
    "VAPI_CONCURRENCY_REASON",
    "parse_generation",
]

LEASE_KEY: Final = "rv_lease"
"""The query parameter (Twilio) or metadata key (Vapi) that carries the lease id."""

GENERATION_KEY: Final = "rv_lease_gen"
"""The query parameter or metadata key that carries the lease's generation."""

TWILIO_FINAL_STATUSES: Final = frozenset(("completed", "busy", "no-answer", "failed", "canceled"))
"""``CallStatus`` values after which a Twilio call holds no slot."""

TWILIO_CAPACITY_CODES: Final = frozenset(("10004", "86008", "64109"))
"""``ErrorCode`` values of a failed Twilio call that mean "over the call concurrency".

10004 is documented as "Call concurrency limit exceeded"; 86008 and 64109 are reported as
concurrency errors too (unconfirmed), so they count as signals if seen.
"""

VAPI_CONCURRENCY_REASON: Final = "call.start.error-subscription-concurrency-limit-reached"
"""The ``endedReason`` of a Vapi call that ended because the org had no free call slot."""

_MAX_DIGITS = 18


def parse_generation(value: object) -> int | None:
    """A planted generation read back (a decimal string or an int), or None if it is not one.

    Webhooks are input: anything but a plain non-negative number of sane length is ignored
    rather than trusted (and ``int()`` never sees a hostile 5000-digit string).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_DIGITS:
        return None
    return int(value) if value.isascii() and value.isdigit() else None
