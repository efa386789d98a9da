"""Checks of request arguments that every provider client shares; imports nothing heavy.

The one phone-number rule (also the fake upstream's) and the one count rule (page sizes,
limits). Kept apart from ``_provider`` because ``resilient_voice.testing`` uses the number rule
and must import without httpx or pydantic.
"""

from __future__ import annotations

import re

from resilient_voice.errors import InvalidRequestError

__all__ = ["E164", "E164_RULE", "check_count", "is_e164"]

E164 = re.compile(r"\+[1-9][0-9]{6,14}")
"""A phone number in E.164: ``+``, then 7 to 15 digits, the first not 0.

E.164 itself allows up to 15 digits after the ``+`` and a country code that never starts with 0.
The shortest numbers in service are 7 digits with their country code (Niue, Tokelau: a 3-digit
code and 4 digits), so anything shorter is a typo that Twilio would answer with a 400 (21211)
after a round trip and a calls-per-second token: refusing it locally is the safe side. Twilio's
published pattern (``^\\+[1-9]\\d{1,14}$``) and Vapi's default check accept no real number this
one refuses; a Vapi caller with an unusual number turns Vapi's check off
(``numberE164CheckEnabled=False``), which also turns this one off.
"""

E164_RULE = "an E.164 number (+ and 7-15 digits, the first not 0)"
"""How :data:`E164` reads in an error message."""


def is_e164(value: object) -> bool:
    """Whether ``value`` is a str holding one E.164 number (see :data:`E164`)."""
    return isinstance(value, str) and E164.fullmatch(value) is not None


def check_count(field: str, value: object, low: int, high: int | None = None) -> int:
    """An int in ``low..high`` (no upper bound when ``high`` is None); a bool is not one.

    Raises:
        InvalidRequestError: Anything else; nothing is sent.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequestError(field, f"must be an int {span}, got {value!r}")
    return value
