"""The number and type checks every constructor shares.

Invalid configuration is refused at construction with a message that names the option and shows
the value, so a typo fails at startup instead of on the first call. ``bool`` is refused wherever a
number is expected: ``True`` is an ``int`` to Python, never a rate or a count to a user.
"""

from __future__ import annotations

import math

from resilient_voice._clock import SYSTEM_CLOCK, Clock

__all__ = [
    "choice",
    "clock",
    "fraction",
    "integer",
    "non_negative",
    "number",
    "optional_number",
    "optional_whole",
    "whole",
]


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


def optional_whole(name: str, value: object, *, minimum: int = 1) -> int | None:
    """:func:`whole`, with ``None`` passed through (an option that is off or left to default)."""
    return None if value is None else whole(name, value, minimum=minimum)


def fraction(name: str, value: object) -> float:
    """Return ``value`` as a float in (0, 1]: a rate or a share, where 0 would mean "never".

    Raises:
        TypeError: ``value`` is not an int or a float (a bool is refused).
        ValueError: ``value`` is not in (0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float >= 0 where infinity means "no limit" (a timeout, a pause).

    Raises:
        TypeError: ``value`` is not an int or a float (a bool is refused).
        ValueError: ``value`` is negative or NaN.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    result = float(value)
    if not result >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return result


def integer(name: str, value: object) -> int:
    """Return ``value`` as a plain int of any sign; an ``int`` subclass (``IntEnum``) is accepted.

    Raises:
        TypeError: ``value`` is not an int (a bool is refused).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``options`` (a ``Literal`` option checked at runtime).

    Raises:
        ValueError: ``value`` is not one of ``options``.
    """
    if not isinstance(value, str) or value not in options:
        allowed = " or ".join(repr(option) for option in options)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
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
