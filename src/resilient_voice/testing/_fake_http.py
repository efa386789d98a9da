"""The HTTP side of FakeTelephony: its route table, reading and parsing requests, cut-short answers.

These are the parts of the fake that know ASGI messages and URL paths but nothing of calls,
accounts or faults: :class:`~resilient_voice.testing._fake.FakeTelephony` decides what to answer,
and uses these to read the request and to name and send the answer.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs

import anyio

from resilient_voice.asgi._types import Receive, Scope, Send
from resilient_voice.testing._fake_common import Request, Response
from resilient_voice.testing._serve import DropConnectionError

__all__ = [
    "DISCONNECTED",
    "ENDPOINTS",
    "NOT_ALLOWED",
    "NOT_FOUND",
    "parse_request",
    "read_body",
    "retry_after_value",
    "route",
    "send_part",
]

_ACCOUNT = r"(?P<account>[^/]+)"
_ROUTES: tuple[tuple[re.Pattern[str], dict[str, str]], ...] = (
    (
        re.compile(rf"/2010-04-01/Accounts/{_ACCOUNT}/Calls\.json"),
        {"POST": "twilio.calls.create", "GET": "twilio.calls.list"},
    ),
    (
        re.compile(rf"/2010-04-01/Accounts/{_ACCOUNT}/Calls/(?P<sid>[^/]+)\.json"),
        {"GET": "twilio.calls.fetch", "POST": "twilio.calls.update"},
    ),
    (
        re.compile(rf"/2010-04-01/Accounts/{_ACCOUNT}/Messages\.json"),
        {"POST": "twilio.messages.create"},
    ),
    (
        re.compile(rf"/2010-04-01/Accounts/{_ACCOUNT}/Messages/(?P<sid>[^/]+)\.json"),
        {"GET": "twilio.messages.fetch"},
    ),
    (re.compile(r"/call"), {"POST": "vapi.calls.create", "GET": "vapi.calls.list"}),
    (re.compile(r"/call/(?P<id>[^/]+)"), {"GET": "vapi.calls.get"}),
    (re.compile(r"/assistant"), {"GET": "vapi.assistants.list"}),
    (
        re.compile(r"/assistant/(?P<id>[^/]+)"),
        {"GET": "vapi.assistants.get", "PATCH": "vapi.assistants.update"},
    ),
    (re.compile(r"/phone-number"), {"GET": "vapi.phone_numbers.list"}),
)

ENDPOINTS: tuple[str, ...] = tuple(name for _, names in _ROUTES for name in names.values())
"""Every endpoint name the fake answers; fault rules match these with glob patterns."""

NOT_FOUND = "not_found"
NOT_ALLOWED = "not_allowed"
_MAX_BODY = 1 << 20
_STALL_LIMIT = 30.0  # a stalled answer gives up eventually, so no test can hang on it


def route(method: str, path: str, request: Request) -> str:
    """The endpoint name of ``method path`` (or ``NOT_FOUND``, ``NOT_ALLOWED``); sets its params."""
    for pattern, names in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        request.params = match.groupdict()
        return names.get(method, NOT_ALLOWED)
    return NOT_FOUND


def retry_after_value(seconds: float | None) -> str | None:
    """``seconds`` as a ``Retry-After`` value: ``2``, ``0.5``, or None for no header."""
    if seconds is None:
        return None
    if float(seconds).is_integer():
        return str(int(seconds))
    return format(seconds, "f").rstrip("0").rstrip(".")


async def send_part(response: Response, receive: Receive, send: Send, *, stall: bool) -> None:
    """Send the status, headers and half the body of ``response``, then drop the connection.

    ``Content-Length`` announces the whole body, so the client knows it is cut short. With
    ``stall``, wait (bounded) for the client to leave first. Raises
    :class:`DropConnectionError`, which :func:`serve` turns into a closed socket.
    """
    body = response.body
    headers = [
        *(pair for pair in response.headers if pair[0].lower() != b"content-length"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
    if stall:
        with anyio.move_on_after(_STALL_LIMIT):
            while (await receive())["type"] != "http.disconnect":
                pass
    raise DropConnectionError


DISCONNECTED = b"\x00disconnected"  # compared by identity only


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it exceeds the limit (the rest is drained).

    Returns ``DISCONNECTED`` when the client went away before the body was complete. Not the
    middlewares' ``asgi._common.read_body``, which refuses early on ``Content-Length`` and stops
    reading: an upstream reads the whole body before answering 413, and the fake behaves as one.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return DISCONNECTED
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= _MAX_BODY:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks) if size <= _MAX_BODY else None


def parse_request(scope: Scope, body: bytes) -> Request:
    """The request of ``scope`` and ``body``: headers joined by name, query, form or JSON."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    content_type = headers.get("content-type", "")
    form: dict[str, list[str]] = {}
    payload: Any = None
    if content_type.startswith("application/x-www-form-urlencoded"):
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    elif body and "json" in content_type:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
    return Request(
        method=scope["method"],
        path=scope["path"],
        query=query,
        form=form,
        json=payload,
        body=body,
        headers=headers,
    )
