"""Release call leases from the provider's webhooks: a call's slot ends with the call.

:class:`LeaseReleaseMiddleware` reads a verified Twilio status callback or Vapi server message,
releases the lease the client planted in it when the call has ended, feeds the capacity signals
it carries to the :class:`~resilient_voice.CallLeases`, and always hands the request on to the
app with its body intact.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import anyio

from resilient_voice import _validate
from resilient_voice._lease_params import (
    GENERATION_KEY,
    LEASE_KEY,
    TWILIO_CAPACITY_CODES,
    TWILIO_FINAL_STATUSES,
    VAPI_CONCURRENCY_REASON,
    parse_generation,
)
from resilient_voice.asgi._common import PathMatcher, get_header
from resilient_voice.asgi._types import ASGIApp, Message, Receive, Scope, Send
from resilient_voice.leases import CallLeases

__all__ = ["LeaseReleaseMiddleware"]

_log = logging.getLogger("resilient_voice.asgi")
_MAX_FIELDS = 256  # a Twilio status callback has about 30
_DEFAULT_MAX_BODY = 4 * 1024 * 1024  # above VapiWebhookMiddleware's 2 MiB default


class LeaseReleaseMiddleware:
    """Pure ASGI middleware: a final status callback or end-of-call report frees the call's lease.

    Place it **inside** the signature check (``TwilioSignatureMiddleware`` or
    ``VapiWebhookMiddleware``), whose guarded paths must cover ``paths``: it trusts what it
    reads, so an unverified request could free a slot (or halve the capacity) at will. It
    refuses to be built without ``verified=True``, your statement that it sits there::

        app = TwilioSignatureMiddleware(
            LeaseReleaseMiddleware(app, leases=leases, paths=["/twilio/status"], verified=True),
            auth_token=token, paths=["/twilio/*"],
        )

    On the requests of ``paths`` it buffers the body (up to ``max_body``) and then:

    - Twilio (a form, or a GET's query): a ``CallStatus`` of ``completed``, ``busy``,
      ``no-answer``, ``failed`` or ``canceled`` releases the lease bound to ``CallSid`` with the
      generation the client planted in the callback URL (``rv_lease``, ``rv_lease_gen``); a
      ``failed`` call with ``ErrorCode`` 10004 (86008 and 64109 too, unconfirmed) is a capacity
      signal, for any call of the account.
    - Vapi (JSON): an ``end-of-call-report``, or a ``status-update`` with status ``ended``,
      releases the lease bound to ``message.call.id`` with the planted generation
      (``assistantOverrides.metadata``). An end-of-call report with ``endedReason``
      ``call.start.error-subscription-concurrency-limit-reached`` is a capacity signal when
      the call carries no lease: a leased call's client already signalled on its
      ``concurrencyBlocked`` create, and one event must not halve the capacity twice.

    Requests without a planted lease free nothing (calls made without ``leases=``). Releases
    are idempotent and fenced by generation, so duplicated, delayed and reordered webhooks are
    harmless; one that arrives before the create's answer is remembered and frees the lease
    when the client binds it. Whatever happens here (a malformed body, a body over
    ``max_body``, a lease store that fails), the request reaches the app with the body the
    client sent; failures are logged, never answered.

    Args:
        app: The ASGI app to wrap.
        leases: The :class:`~resilient_voice.CallLeases` the clients take leases from.
        paths: The webhook paths: exact paths, or prefixes ending in ``*`` (compared as the
            webhook guards compare them, ``root_path`` included).
        verified: Must be ``True``: the requests reaching this middleware were verified.
        max_body: Bodies larger than this (bytes) are passed on without being read for leases.

    Raises:
        ValueError: ``verified`` not True, ``paths`` empty or malformed, ``max_body`` < 1.
        TypeError: ``leases`` not a CallLeases, ``paths`` a single string.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        leases: CallLeases,
        paths: Iterable[str],
        verified: bool,
        max_body: int = _DEFAULT_MAX_BODY,
    ) -> None:
        if _validate.flag("verified", verified) is not True:
            raise ValueError(
                "LeaseReleaseMiddleware acts on webhooks as they claim: place it inside "
                "TwilioSignatureMiddleware or VapiWebhookMiddleware (guarding these paths) and "
                "pass verified=True to say so"
            )
        if not isinstance(leases, CallLeases):
            raise TypeError(f"leases must be a CallLeases, got {type(leases).__name__}")
        if paths is None:
            raise ValueError("paths must name the webhook paths (the status callback URLs)")
        self.app = _validate.function("app", app)
        self._leases = leases
        self._match = PathMatcher(paths)
        self._max_body = _validate.whole("max_body", max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._match.guards(scope):
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        body = bytearray()
        complete = False
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break  # the client left: nothing to act on, the app sees the disconnect
            body += message.get("body", b"")
            if len(body) > self._max_body:
                break
            if not message.get("more_body", False):
                complete = True
                break
        if complete:
            with anyio.CancelScope(shield=True):
                await self._act(scope, bytes(body))
        await self.app(scope, _replay(received, receive), send)

    async def _act(self, scope: Scope, body: bytes) -> None:
        content_type = (get_header(scope, b"content-type") or b"").lower()
        try:
            if content_type.startswith(b"application/json"):
                await self._vapi(body)
            else:
                await self._twilio(scope, body, content_type)
        except Exception:  # noqa: BLE001  # a lease store failing must not fail the webhook
            _log.warning("lease release from a webhook failed", exc_info=True)

    async def _twilio(self, scope: Scope, body: bytes, content_type: bytes) -> None:
        params = _form(scope.get("query_string", b""))
        if body and content_type.startswith(b"application/x-www-form-urlencoded"):
            params = {**params, **_form(body)}  # the URL's parameters, then the form's
        status = params.get("CallStatus")
        if status not in TWILIO_FINAL_STATUSES:
            return
        error = params.get("ErrorCode")
        if status == "failed" and error in TWILIO_CAPACITY_CODES:
            await self._leases.signal_capacity(f"twilio:{error}")
        await self._release(params.get("CallSid"), params.get(LEASE_KEY), params)

    async def _vapi(self, body: bytes) -> None:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return
        message = _mapping(document, "message")
        kind = message.get("type")
        ended = kind == "end-of-call-report" or (
            kind == "status-update" and message.get("status") == "ended"
        )
        if not ended:
            return
        call = _mapping(message, "call")
        metadata = _mapping(_mapping(call, "assistantOverrides"), "metadata")
        lease = metadata.get(LEASE_KEY)
        reason = message.get("endedReason", call.get("endedReason"))
        if kind == "end-of-call-report" and reason == VAPI_CONCURRENCY_REASON and lease is None:
            await self._leases.signal_capacity("vapi:concurrency-limit-reached")
        await self._release(call.get("id"), lease, metadata)

    async def _release(self, call_id: object, lease: object, carrier: Mapping[str, Any]) -> None:
        generation = parse_generation(carrier.get(GENERATION_KEY))
        if not isinstance(call_id, str) or not call_id or not isinstance(lease, str):
            return
        if generation is None:
            return
        await self._leases.release(call_id, generation=generation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(app={self.app!r}, leases={self._leases!r})"


def _form(raw: bytes) -> dict[str, str]:
    """The first value of each field of a urlencoded string; empty when it is not one."""
    try:
        pairs = parse_qsl(
            raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=_MAX_FIELDS
        )
    except ValueError:  # more fields than any status callback has
        return {}
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def _mapping(document: object, key: str) -> Mapping[str, Any]:
    value = document.get(key) if isinstance(document, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _replay(received: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the app the messages read here, in order, then the server's."""
    pending = list(received)

    async def receive_replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return receive_replayed
