"""Twilio's exceptions, and turning its error answers into them."""

from __future__ import annotations

import json
from typing import Any

import httpx

from resilient_voice.errors import ProviderError
from resilient_voice.failure import FailureKind
from resilient_voice.http._retry_after import retry_after_from_headers
from resilient_voice.http._transport import classify_status

__all__ = ["TwilioAPIError", "TwilioAuthenticationError", "api_error"]

_UNPROCESSED = frozenset({429})
_PROBLEM_KEYS = ("type", "title", "status")


class TwilioAPIError(ProviderError):
    """Twilio answered with an error.

    Attributes:
        more_info: The link to Twilio's page for ``code``.
        details: The ``details`` object of Twilio's error body, when it sent one (the
            official SDK's ``TwilioRestException.details``); ``None`` otherwise.
    """

    def __init__(
        self,
        status: int,
        code: int | str | None,
        message: str,
        kind: FailureKind,
        *,
        more_info: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, kind, retry_after=retry_after)
        self.more_info = more_info
        self.details = details


class TwilioAuthenticationError(TwilioAPIError):
    """Twilio rejected the credentials (401, or 403 for a permission problem)."""


def _code(value: object, default: int) -> int | str:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value:
        return int(value) if value.isdigit() else value
    return default


def api_error(response: httpx.Response, kind: FailureKind | None = None) -> TwilioAPIError:
    """Build the error for a 4xx/5xx answer from Twilio's REST API.

    Reads the legacy body (``{"code", "message", "more_info", "status"}``, and ``details``
    when Twilio adds it, as the SDK's ``TwilioRestException`` does) and RFC 9457
    problem details (``{"type", "title", "status", "code", "detail"}``); a body that is not JSON
    (an edge proxy's HTML page) gives ``code = status``. 401 and 403 raise
    :class:`TwilioAuthenticationError`. The kind follows the transport's
    table with Twilio's documented rule that a 429 (20429) was never processed, unless the
    caller passes the transport's own verdict as ``kind``.
    """
    status = response.status_code
    code: int | str = status
    message = response.reason_phrase or f"HTTP {status}"
    more_info: str | None = None
    details: dict[str, Any] | None = None
    try:
        payload = json.loads(response.content) if response.content else None
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        payload = None
    if isinstance(payload, dict):
        code = _code(payload.get("code"), status)
        if all(key in payload for key in _PROBLEM_KEYS):
            text = payload.get("detail") or payload.get("title")
            link = payload.get("type")
        else:
            text = payload.get("message")
            link = payload.get("more_info")
        if isinstance(text, str) and text:
            message = text
        if isinstance(link, str) and link:
            more_info = link
        extra = payload.get("details")
        if isinstance(extra, dict):
            details = extra
    if kind is None:
        kind = classify_status(status, _UNPROCESSED) or FailureKind.PERMANENT
    error_type = TwilioAuthenticationError if status in (401, 403) else TwilioAPIError
    return error_type(
        status,
        code,
        message,
        kind,
        more_info=more_info,
        details=details,
        retry_after=retry_after_from_headers(response.headers),
    )
