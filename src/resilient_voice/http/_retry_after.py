"""``Retry-After`` parsing: how long the upstream asked us to wait.

Pure functions of header values (no clock, no I/O): the transport reads the headers, the provider
errors carry the result as ``retry_after``, and the retry policy only sees the number.
"""

from __future__ import annotations

import math
import time
from datetime import UTC
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

__all__ = ["parse_retry_after", "parse_retry_after_ms", "retry_after_from_headers"]


def parse_retry_after(value: str | None, *, now_wall: float | None = None) -> float | None:
    """Parse an HTTP ``Retry-After`` header value into seconds from now.

    Accepts delay-seconds (``"120"``; a decimal such as ``"1.5"`` is tolerated) and an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``; a date in the past gives ``0.0``). Anything else, an
    over-long value, non-ASCII text, a negative or non-finite number, gives ``None``: a garbled
    header must never make the client wait forever or crash.

    Args:
        value: The header value; ``None`` (header absent) gives ``None``.
        now_wall: The current wall-clock time (``time.time()``) for HTTP-dates; read when
            omitted. HTTP-dates are the one place wall time is needed.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > 64 or not value.isascii():
        return None
    seconds = _parse_decimal(value)
    if seconds is not None:
        return seconds
    # Imported here: email.utils is slow to import and HTTP-dates are rare.
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=UTC)
    try:
        target = when.timestamp()
    except (OverflowError, OSError, ValueError):  # pragma: no cover  (platform limits)
        return None
    now = time.time() if now_wall is None else now_wall
    return max(0.0, target - now)


def parse_retry_after_ms(value: str | None) -> float | None:
    """Parse a ``retry-after-ms`` header value (milliseconds, as Vapi's SDK reads it) to seconds.

    Returns ``None`` for anything but a non-negative decimal number.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > 64 or not value.isascii():
        return None
    millis = _parse_decimal(value)
    return None if millis is None else millis / 1000.0


def _parse_decimal(value: str) -> float | None:
    # float() alone would accept "nan", "inf", "1e400", "1_000" and signs.
    whole, dot, fraction = value.partition(".")
    if not whole.isdigit() or (dot and not fraction.isdigit()):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def retry_after_from_headers(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (Vapi) or ``Retry-After`` (seconds or a date)."""
    value = headers.get("retry-after-ms")
    if value is not None:
        parsed = parse_retry_after_ms(value)
        if parsed is not None:
            return parsed
    value = headers.get("retry-after")
    if value is None:
        return None
    parsed = parse_retry_after(value)
    return parsed if parsed is not None and math.isfinite(parsed) else None
