"""The httpx layer: :class:`ResilientTransport`, the exception/status -> FailureKind table and
``Retry-After`` parsing.

- ``_transport``: the transport, its routes and the exception/status -> FailureKind table;
- ``_body``: reading a response body within the attempt's time and size bounds;
- ``_request_body``: the request body handed to the inner transport (replayable, no generator);
- ``_retry_after``: ``Retry-After`` / ``retry-after-ms`` parsing, pure functions.

Importing this package imports httpx; ``import resilient_voice`` does not.
"""

from __future__ import annotations

from resilient_voice._exports import publish
from resilient_voice.http._body import ResponseTooLargeError
from resilient_voice.http._transport import (
    ATTEMPT_ID_EXTENSION,
    IDEMPOTENT_EXTENSION,
    LIMITER_KEY_EXTENSION,
    ResilientTransport,
    Route,
    UpstreamStatusError,
)

__all__ = [
    "ATTEMPT_ID_EXTENSION",
    "IDEMPOTENT_EXTENSION",
    "LIMITER_KEY_EXTENSION",
    "ResilientTransport",
    "ResponseTooLargeError",
    "Route",
    "UpstreamStatusError",
]

publish(globals(), __all__)
