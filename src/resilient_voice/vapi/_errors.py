"""Vapi's error answers mapped onto the library's exceptions.

Vapi does not document an error schema. What it sends in practice is NestJS's shape,
``{"message": ..., "error": "Bad Request", "statusCode": 400}``, where ``message`` is a string
or a list of validation messages. The parser accepts that, any other JSON, or plain text (an
edge proxy's HTML page), and never fails: a garbled error body must still become an error the
caller can read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from resilient_voice.errors import ProviderError
from resilient_voice.failure import FailureKind
from resilient_voice.http._retry_after import retry_after_from_headers

__all__ = [
    "VapiAPIError",
    "VapiAuthenticationError",
    "VapiConcurrencyLimitError",
    "error_from_response",
    "is_concurrency_answer",
]

_MAX_TEXT = 500


class VapiAPIError(ProviderError):
    """Vapi answered with an error; ``body`` is the parsed error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: FailureKind,
        *,
        body: object = None,
        code: int | str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, kind, retry_after=retry_after)
        self.body = body


class VapiAuthenticationError(VapiAPIError):
    """Vapi rejected the API key (401 or 403)."""


class VapiConcurrencyLimitError(VapiAPIError):
    """Vapi refused because the org's concurrent call slots are all taken.

    Vapi does not document this answer's shape; the client recognises an error whose message
    mentions concurrency, or whose body carries ``subscriptionLimits.concurrencyBlocked``. The
    kind is still the one the status maps to (a 4xx is ``PERMANENT``: do not retry at once;
    try again once a call has ended). The type is the signal: catch this class (no flag to read).
    """


def _message_of(body: object) -> tuple[str | None, str | int | None]:
    if not isinstance(body, Mapping):
        return None, None
    raw = body.get("message")
    if isinstance(raw, list):
        message: str | None = "; ".join(str(item) for item in raw) or None
    elif isinstance(raw, str) and raw:
        message = raw
    else:
        message = None
    error = body.get("error")
    if message is None and isinstance(error, str) and error:
        message = error
    code = body.get("code")
    if isinstance(code, bool) or not isinstance(code, str | int):
        code = None
    return message, code


def is_concurrency_answer(body: object) -> bool:
    """Whether a parsed error body says the org is over its call concurrency."""
    if not isinstance(body, Mapping):
        return False
    limits = body.get("subscriptionLimits")
    if isinstance(limits, Mapping) and limits.get("concurrencyBlocked") is True:
        return True
    for key in ("message", "error", "endedReason"):
        value = body.get(key)
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "concurrency" in text.lower() for text in texts):
            return True
    return False


def _parse_body(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return content[:_MAX_TEXT].decode("utf-8", "replace")


def error_from_response(response: httpx.Response, kind: FailureKind) -> VapiAPIError:
    """Build the exception for an error ``response`` (already read) of kind ``kind``."""
    status = response.status_code
    body = _parse_body(response.content)
    message, code = _message_of(body)
    if message is None:
        message = body.strip() if isinstance(body, str) and body.strip() else None
    if message is None:
        message = response.reason_phrase or f"HTTP {status}"
    retry_after = retry_after_from_headers(response.headers)
    cls: type[VapiAPIError]
    if status in (401, 403):
        cls = VapiAuthenticationError
    elif is_concurrency_answer(body):
        cls = VapiConcurrencyLimitError
    else:
        cls = VapiAPIError
    return cls(status, message, kind, body=body, code=code, retry_after=retry_after)
