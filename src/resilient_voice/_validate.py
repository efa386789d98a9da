"""The number and type checks every constructor shares.

Invalid configuration is refused at construction with a message that names the option and shows
the value, so a typo fails at startup instead of on the first call. ``bool`` is refused wherever a
number is expected: ``True`` is an ``int`` to Python, never a rate or a count to a user.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from typing import Any

from resilient_voice._clock import SYSTEM_CLOCK, Clock

__all__ = [
    "buckets",
    "choice",
    "clock",
    "flag",
    "fraction",
    "function",
    "header",
    "integer",
    "label",
    "non_negative",
    "number",
    "optional_header",
    "optional_label",
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
    result = _float(name, value)
    if not math.isfinite(result) or result < minimum or (result == minimum and not inclusive):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {relation} {minimum:g}, got {value!r}")
    return result


def _float(name: str, value: object) -> float:
    """``value`` as a float; an int too large for one is refused, not an ``OverflowError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        bits = value.bit_length() if isinstance(value, int) else 0
        raise ValueError(f"{name} must be a finite number, got an int of {bits} bits") from None


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
    result = _float(name, value)
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


def flag(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool.

    A switch is not coerced with ``bool()``: ``"false"`` (from a config file or an environment
    variable) is truthy, and ``allow_insecure_http="false"`` must not turn the check off.

    Raises:
        TypeError: ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def label(name: str, value: object) -> str:
    """Return ``value`` if it is a non-blank str of printable characters (a name, an id).

    Names end up in log lines, metric labels and headers: a newline there forges a log line or a
    header, and an empty name makes two instances indistinguishable.

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: ``value`` is blank or holds a control character.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip() or not value.isprintable():
        raise ValueError(f"{name} must be a non-blank str of printable characters, got {value!r}")
    return value


def optional_label(name: str, value: object) -> str | None:
    """:func:`label`, with ``None`` passed through."""
    return None if value is None else label(name, value)


def function(name: str, value: object, *, optional: bool = False) -> Any:
    """Return ``value`` if it is callable (or ``None`` when ``optional``).

    Raises:
        TypeError: ``value`` is not callable.
    """
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")
    return value


_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def header(name: str, value: object) -> str:
    """Return ``value`` if it is an HTTP header name (an RFC 9110 token).

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: ``value`` is not a token (empty, spaces, ``:``, control characters).
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a header name (str), got {type(value).__name__}")
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{name} must be an HTTP header name, got {value!r}")
    return value


def optional_header(name: str, value: object) -> str | None:
    """:func:`header`, with ``None`` passed through (the header is off)."""
    return None if value is None else header(name, value)


def buckets(name: str, value: object) -> tuple[float, ...]:
    """Return histogram bucket bounds: a non-empty, strictly increasing sequence of numbers >= 0.

    prometheus-client would refuse an unsorted list only when the histogram is first created,
    and accept a NaN bound that no observation can ever fall under.

    Raises:
        TypeError: ``value`` is not a collection of numbers.
        ValueError: empty, a negative or NaN bound, or not strictly increasing.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {value!r}")
    bounds = tuple(non_negative(name, bound) for bound in value)
    if not bounds:
        raise ValueError(f"{name} must not be empty")
    if any(low >= high for low, high in itertools.pairwise(bounds)):
        raise ValueError(f"{name} must be strictly increasing, got {bounds!r}")
    return bounds
