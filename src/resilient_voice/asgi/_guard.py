"""The one webhook guard: what every provider's webhook middleware does, given a verifier.

A provider's webhook middleware differs from another's only in how a request proves it came
from the provider (Twilio signs the URL and form, Vapi sends a secret, a bearer token or an
HMAC). Everything around that proof is the same and lives here once:

- which scopes are checked: HTTP requests and websocket handshakes on guarded ``paths``
  (:class:`~resilient_voice.asgi._common.PathMatcher`), everything else passes through unread;
- the body: buffered up to ``max_body`` (413 beyond it, before anything is read when the
  declared length is already too large), then replayed to the app unchanged;
- refusals: JSON 403/413 under a fresh correlation id, logged, the app never called; a
  websocket handshake refused before it is accepted (see
  :func:`~resilient_voice.asgi._common.refuse`);
- the ``trusted_proxies`` setting, validated once and handed to the verifier.

A verifier (:class:`WebhookVerifier`) checks in two steps so that a request that cannot verify
costs no body read: :meth:`~WebhookVerifier.check_headers` sees the scope only and returns what
the body check needs (a websocket handshake has no body, so for one it must decide there);
:meth:`~WebhookVerifier.check_body` sees the buffered body. Either raises
:class:`~resilient_voice.errors.WebhookVerificationError` with the reason to log; the guard
turns it into the 403. ``check_body`` may return a correlation id that the verified body
carries (Vapi's planted ``rv_cid``): the app then runs inside ``correlation_scope`` of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from resilient_voice import _validate
from resilient_voice.asgi._common import (
    FORBIDDEN,
    BodyTooLargeError,
    DisconnectedError,
    PathMatcher,
    payload_too_large,
    read_body,
    refuse,
    replay,
)
from resilient_voice.asgi._proxies import TrustedProxies, as_trusted_proxies
from resilient_voice.asgi._types import ASGIApp, Receive, Scope, Send
from resilient_voice.correlation import correlation_scope
from resilient_voice.errors import WebhookVerificationError

__all__ = ["WebhookGuard", "WebhookVerifier"]

_log = logging.getLogger("resilient_voice.asgi")
_GUARDED = frozenset({"http", "websocket"})

State = TypeVar("State")


class WebhookVerifier(Protocol[State]):
    """How one provider's webhooks prove where they come from.

    Attributes:
        provider: The provider's name in log lines (``"Twilio"``: "rejected Twilio webhook").
    """

    provider: str

    def check_headers(self, scope: Scope, proxies: TrustedProxies) -> State:
        """Verify what the scope alone can tell; return what :meth:`check_body` needs.

        For a websocket handshake (``scope["type"] == "websocket"``) this is the whole check.

        Raises:
            WebhookVerificationError: The request cannot verify.
        """
        ...

    def check_body(self, scope: Scope, body: bytes, state: State) -> str | None:
        """Verify the body of an HTTP request; return a correlation id it carries, if any.

        Raises:
            WebhookVerificationError: The request does not verify.
        """
        ...


class WebhookGuard(Generic[State]):
    """Pure ASGI middleware that calls the app only for requests ``verifier`` accepts.

    Args:
        app: The ASGI app to wrap.
        verifier: The provider's :class:`WebhookVerifier`.
        paths: Paths to guard: exact paths, or prefixes ending in ``*``; ``None`` guards every
            HTTP request and websocket handshake.
        max_body: Largest body accepted, in bytes; larger ones get 413.
        trusted_proxies: A :class:`~resilient_voice.asgi.TrustedProxies` or a list of networks.

    Raises:
        TypeError, ValueError: An invalid option.
    """

    def __init__(
        self,
        app: ASGIApp,
        verifier: WebhookVerifier[State],
        *,
        paths: Iterable[str] | None = None,
        max_body: int,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
    ) -> None:
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ValueError(f"max_body must be a positive int, got {max_body!r}")
        self.app = _validate.function("app", app)
        self._verifier = verifier
        self._match = PathMatcher(paths)
        self._max_body = max_body
        self._too_large = payload_too_large(max_body)
        self._too_large_reason = f"body over max_body ({max_body} bytes)"
        self._proxies = as_trusted_proxies(trusted_proxies)
        self._log_message = f"rejected {verifier.provider} webhook: %s"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _GUARDED or not self._match.guards(scope):
            await self.app(scope, receive, send)
            return
        verifier = self._verifier
        try:
            state = verifier.check_headers(scope, self._proxies)
        except WebhookVerificationError as exc:
            await self._refuse(scope, receive, send, 403, FORBIDDEN, exc.reason)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self._max_body)
        except BodyTooLargeError:
            await self._refuse(scope, receive, send, 413, self._too_large, self._too_large_reason)
            return
        except DisconnectedError:
            return
        try:
            cid = verifier.check_body(scope, body, state)
        except WebhookVerificationError as exc:
            await self._refuse(scope, receive, send, 403, FORBIDDEN, exc.reason)
            return
        if cid is None:
            await self.app(scope, replay(body, receive), send)
            return
        with correlation_scope(cid):
            await self.app(scope, replay(body, receive), send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, body: bytes, reason: str
    ) -> None:
        await refuse(
            scope,
            receive,
            send,
            status,
            body,
            log=_log,
            message=self._log_message,
            reason=reason,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(app={self.app!r})"
