"""Where the current correlation id is kept, and the default rule for accepting one.

:mod:`resilient_voice.correlation` is the public way to read, set and validate the id. The ASGI
correlation middleware sets and resets the ContextVar and applies the default rule itself, on the
hot path of every request, without the wrappers; both import the two from here, so neither
reaches into the other's private names.
"""

from __future__ import annotations

import re
from contextvars import ContextVar

__all__ = ["CORRELATION_ID", "DEFAULT_ID_PATTERN", "is_valid_default"]

CORRELATION_ID: ContextVar[str | None] = ContextVar("resilient_voice.correlation_id", default=None)

DEFAULT_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]+")
_fullmatch_default = DEFAULT_ID_PATTERN.fullmatch


def is_valid_default(value: object) -> bool:
    """Whether ``value`` is an id the default validator accepts: 1..128 of ``[A-Za-z0-9._:-]``."""
    # Length first (a 10 kB header costs nothing), then the pure-alphanumeric fast path that
    # generated ids take; isascii() keeps non-ASCII letters and digits out of it.
    return (
        isinstance(value, str)
        and 0 < len(value) <= 128
        and value.isascii()
        and (value.isalnum() or _fullmatch_default(value) is not None)
    )
