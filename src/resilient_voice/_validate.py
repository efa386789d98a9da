"""The number and type checks every constructor shares.

Invalid configuration is refused at construction with a message that names the option and shows
the value, so a typo fails at startup instead of on the first call. ``bool`` is refused wherever a
number is expected: ``True`` is an ``int`` to Python, never a rate or a count to a user.
"""

from __future__ import annotations

import math

__all__ = ["fraction", "number", "optional_number", "optional_whole", "whole"]


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
