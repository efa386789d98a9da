"""The number and type checks every constructor shares.

Invalid configuration is refused at construction with a message that names the option and shows
the value, so a typo fails at startup instead of on the first call. ``bool`` is refused wherever a
number is expected: ``True`` is an ``int`` to Python, never a rate or a count to a user.
"""

from __future__ import annotations

import math

from resilient_voice._clock import SYSTEM_CLOCK, Clock

__all__ = ["clock", "number", "optional_number", "whole"]


def number(name: str, value: object, *, minimum: float = 0.0, inclusive: bool = False) -> float:
    """Return ``value`` as a finite float above ``minimum`` (or equal to it when ``inclusive``).

    Raises:
        TypeError: ``value`` is not an int or a float (a bool is refused).
        ValueError: ``value`` is not finite, or is below the bound.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result) or result < minimum or (result == minimum and not inclusive):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {relation} {minimum:g}, got {value!r}")
    return result


def optional_number(
    name: str, value: object, *, minimum: float = 0.0, inclusive: bool = False
) -> float | None:
    """:func:`number`, with ``None`` passed through (an option that is off)."""
    return None if value is None else number(name, value, minimum=minimum, inclusive=inclusive)


def whole(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int of at least ``minimum``.

    Raises:
        TypeError: ``value`` is not an int (a bool is refused).
        ValueError: ``value`` is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def clock(value: object) -> Clock:
    """Return ``value`` as a :class:`~resilient_voice._clock.Clock`; ``None`` is the system clock.

    A primitive keeps the clock it was built with for life: compositions check that their parts
    agree on one and never swap it (see :class:`~resilient_voice.Policy`).

    Raises:
        TypeError: ``value`` does not implement the clock protocol.
    """
    if value is None:
        return SYSTEM_CLOCK
    if not isinstance(value, Clock):
        raise TypeError(f"clock must implement resilient_voice Clock, got {value!r}")
    return value
