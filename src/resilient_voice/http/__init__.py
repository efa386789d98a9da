"""The httpx layer: :class:`ResilientTransport`, the exception/status -> FailureKind table and
``Retry-After`` parsing.

- ``_transport``: the transport, its routes and the exception/status -> FailureKind table;
- ``_body``: reading a response body within the attempt's time and size bounds;
- ``_retry_after``: ``Retry-After`` / ``retry-after-ms`` parsing, pure functions.

Importing this package imports httpx; ``import resilient_voice`` does not.
"""

from __future__ import annotations

from resilient_voice.http._body import ResponseTooLargeError
from resilient_voice.http._retry_after import (
    parse_retry_after,
    parse_retry_after_ms,
    retry_after_from_headers,
)
from resilient_voice.http._transport import (
    ATTEMPT_ID_EXTENSION,
    DEFAULT_MAX_RESPONSE_BYTES,
    IDEMPOTENT_EXTENSION,
    IDEMPOTENT_METHODS,
    LIMITER_KEY_EXTENSION,
    ResilientTransport,
    Route,
    UpstreamStatusError,
    classify_exception,
    classify_status,
)

__all__ = [
    "ATTEMPT_ID_EXTENSION",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "IDEMPOTENT_EXTENSION",
    "IDEMPOTENT_METHODS",
    "LIMITER_KEY_EXTENSION",
    "ResilientTransport",
    "ResponseTooLargeError",
    "Route",
    "UpstreamStatusError",
    "classify_exception",
    "classify_status",
    "parse_retry_after",
    "parse_retry_after_ms",
    "retry_after_from_headers",
]

# Objects show the module users import them from (as httpx does).
for _obj in (
    ResilientTransport,
    ResponseTooLargeError,
    Route,
    UpstreamStatusError,
    classify_exception,
    classify_status,
    parse_retry_after,
    parse_retry_after_ms,
    retry_after_from_headers,
):
    _obj.__module__ = __name__
del _obj
