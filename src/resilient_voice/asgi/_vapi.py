"""Verify the credentials Vapi sends with its server-URL webhooks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from resilient_voice import _validate
from resilient_voice.asgi._common import get_header, header_name
from resilient_voice.asgi._guard import WebhookGuard
from resilient_voice.asgi._proxies import TrustedProxies
from resilient_voice.asgi._types import ASGIApp, Scope
from resilient_voice.correlation import validate_correlation_id
from resilient_voice.errors import WebhookVerificationError

__all__ = ["CORRELATION_KEY", "VapiWebhookMiddleware", "planted_correlation_id"]

CORRELATION_KEY = "rv_cid"
"""The ``assistantOverrides.metadata`` key under which the Vapi client plants the correlation id."""
_CORRELATION_NEEDLE = b'"' + CORRELATION_KEY.encode("ascii") + b'"'


def planted_correlation_id(body: bytes) -> str | None:
    """Return the valid correlation id planted in a Vapi server message, or ``None``.

    The id sits at ``message.call.assistantOverrides.metadata.rv_cid``. A body without the key
    is not parsed at all; anything unexpected (not JSON, other shapes, an invalid id) yields
    ``None`` and never raises.
    """
    if _CORRELATION_NEEDLE not in body:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    for key in ("message", "call", "assistantOverrides", "metadata"):
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    if not isinstance(document, dict):
        return None
    return validate_correlation_id(document.get(CORRELATION_KEY))


_ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
_TIMESTAMP = re.compile(rb"[0-9]{1,16}(?:\.[0-9]{1,9})?")
_MILLISECONDS_ABOVE = 1e11  # 1e11 s is the year 5138; 1e11 ms is 1973
_MAX_CREDENTIAL = 4096
# What the header check hands the body check: nothing (verified), or signature and timestamp.
_Pending = tuple[bytes, bytes] | None


def _secret_bytes(name: str, value: str | bytes | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes) or not value.strip():
        raise ValueError(f"{name} must be a non-empty str or bytes")
    return value


class VapiWebhookMiddleware(WebhookGuard["_Pending"]):
    """Pure ASGI middleware that rejects Vapi webhooks without a valid credential.

    Vapi authenticates server-URL requests with one of its credential types; configure the one(s)
    your assistant or org uses. A request is accepted when any configured credential checks out:

    - ``secret``: the legacy shared secret, sent verbatim in ``X-Vapi-Secret`` (``secret_header``;
      some 2025 docs named it ``X-Vapi-Signature``).
    - ``bearer_token``: Vapi's Bearer Token credential, ``Authorization: Bearer <token>`` by
      default; with a custom ``bearer_header`` Vapi usually turns the prefix off, so set
      ``bearer_prefix=False`` to expect the bare token.
    - ``hmac_secret``: Vapi's HMAC credential. The signature header holds the digest of
      ``{timestamp}.{raw body}`` (``algorithm`` sha256, sha512 or sha1), hex by default
      (``signature_encoding="base64"`` for the other setting), optionally prefixed by
      ``<algorithm>=``. The timestamp header must be within ``tolerance`` seconds of the wall
      clock, which bounds replays. Vapi does not document the timestamp unit, so values above
      1e11 are read as milliseconds and smaller ones as seconds: either way the signed string
      denotes one instant, so the ambiguity cannot widen the window.

    The body of guarded requests is buffered (up to ``max_body``, else 413) and replayed to the
    app unchanged. Missing, forged or stale credentials get 403 without calling the app; every
    comparison is constant-time. Refusals are JSON, like the rate limiter's 429 (403
    ``{"error":"forbidden"}``, 413 ``{"error":"payload_too_large","max_bytes":N}``), logged and
    answered under a fresh ``X-Correlation-ID`` (the offered id is logged only as the sanitised
    ``offered_correlation_id`` field). Vapi does not retry failed deliveries by default, so a
    403 here is final: check configuration before deploying. Unguarded paths and scopes other
    than HTTP and websocket pass through unread.

    **WebSockets.** Vapi opens websockets to servers you host (a custom transcriber, a custom
    voice) with the server's credential in the handshake headers: ``secret`` and
    ``bearer_token`` are checked there as for HTTP. The HMAC credential signs a body, which a
    handshake does not have, and Vapi documents no handshake signature: with only
    ``hmac_secret`` configured, every websocket on a guarded path is refused. A refused
    handshake gets a 403 denial response where the server supports it, else
    ``websocket.close``; the app is never called.

    Args:
        app: The ASGI app to wrap.
        secret: Shared secret expected in ``secret_header``.
        secret_header: Header carrying ``secret``.
        bearer_token: Token expected in ``bearer_header``.
        bearer_header: Header carrying the bearer token.
        bearer_prefix: Whether the header value is ``Bearer <token>`` (case-insensitive scheme).
        hmac_secret: Key of the HMAC credential (the raw secret; decode a base64 one yourself).
        signature_header: Header carrying the HMAC.
        timestamp_header: Header carrying the signed timestamp.
        algorithm: ``"sha256"`` (default), ``"sha512"`` or ``"sha1"``.
        signature_encoding: ``"hex"`` (default) or ``"base64"``.
        tolerance: Largest accepted distance between the timestamp and now, in seconds.
        max_body: Largest body accepted, in bytes (end-of-call reports with transcripts are big).
        paths: Paths to guard: exact paths, or prefixes ending in ``*``; ``None`` guards every
            HTTP request and websocket handshake.
        clock: Wall clock returning UNIX seconds (default :func:`time.time`); tests inject one.
        trusted_proxies: A :class:`~resilient_voice.asgi.TrustedProxies` or a list of networks,
            accepted so that one proxy setting serves every middleware. Vapi's credentials
            (secret, bearer token, HMAC over ``{timestamp}.{body}``) do not cover the URL, the
            scheme or the client address, so no proxy setup changes what verifies here; the
            value is validated like everywhere else (``"*"`` and ``0.0.0.0/0`` are refused).

    Raises:
        ValueError: no credential configured (every one ``None``, as an unset environment
            variable gives), an empty one, or an invalid option.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        secret: str | bytes | None = None,
        secret_header: str = "X-Vapi-Secret",  # noqa: S107  (a header name)
        bearer_token: str | bytes | None = None,
        bearer_header: str = "Authorization",
        bearer_prefix: bool = True,
        hmac_secret: str | bytes | None = None,
        signature_header: str = "x-signature",
        timestamp_header: str = "x-timestamp",
        algorithm: str = "sha256",
        signature_encoding: str = "hex",
        tolerance: float = 300.0,
        max_body: int = 2 * 1024 * 1024,
        paths: Iterable[str] | None = None,
        clock: Callable[[], float] | None = None,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
    ) -> None:
        verifier = _VapiVerifier(
            secret=secret,
            secret_header=secret_header,
            bearer_token=bearer_token,
            bearer_header=bearer_header,
            bearer_prefix=bearer_prefix,
            hmac_secret=hmac_secret,
            signature_header=signature_header,
            timestamp_header=timestamp_header,
            algorithm=algorithm,
            signature_encoding=signature_encoding,
            tolerance=tolerance,
            clock=clock,
        )
        super().__init__(
            app, verifier, paths=paths, max_body=max_body, trusted_proxies=trusted_proxies
        )

    def __repr__(self) -> str:
        return f"VapiWebhookMiddleware(app={self.app!r})"


class _VapiVerifier:
    """Vapi's credentials for :class:`~resilient_voice.asgi._guard.WebhookGuard`.

    The header check hands the body check ``None`` when a secret or bearer token already
    verified the request, else the HMAC signature and timestamp to check against the body.
    The body check returns the correlation id the Vapi client planted in the call (see
    :func:`planted_correlation_id`), so every webhook of one call shares the id of the request
    that placed it; a body without one (or not JSON) leaves the context alone: deciding what a
    malformed body means is the app's job.
    """

    provider = "Vapi"

    def __init__(
        self,
        *,
        secret: str | bytes | None,
        secret_header: str,
        bearer_token: str | bytes | None,
        bearer_header: str,
        bearer_prefix: bool,
        hmac_secret: str | bytes | None,
        signature_header: str,
        timestamp_header: str,
        algorithm: str,
        signature_encoding: str,
        tolerance: float,
        clock: Callable[[], float] | None,
    ) -> None:
        self._secret = _secret_bytes("secret", secret)
        self._bearer = _secret_bytes("bearer_token", bearer_token)
        key = _secret_bytes("hmac_secret", hmac_secret)
        if self._secret is None and self._bearer is None and key is None:
            raise ValueError(
                "no Vapi credential configured: secret, bearer_token and hmac_secret are all "
                "None (is the environment variable that holds yours set?)"
            )
        self._secret_header = header_name("secret_header", secret_header)
        self._bearer_header = header_name("bearer_header", bearer_header)
        self._bearer_prefix = _validate.flag("bearer_prefix", bearer_prefix)
        self._signature_header = header_name("signature_header", signature_header)
        self._timestamp_header = header_name("timestamp_header", timestamp_header)
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(_ALGORITHMS)}, got {algorithm!r}")
        if signature_encoding not in ("hex", "base64"):
            raise ValueError(
                f"signature_encoding must be 'hex' or 'base64', not {signature_encoding!r}"
            )
        self._hex = signature_encoding == "hex"
        self._algorithm_prefix = algorithm.encode("ascii") + b"="
        # A keyed HMAC prepared once; each request copies it.
        self._mac: Any = None if key is None else hmac.new(key, digestmod=_ALGORITHMS[algorithm])
        self._tolerance = _validate.number("tolerance", tolerance)
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning UNIX seconds")
        self._clock = clock or time.time

    def check_headers(self, scope: Scope, proxies: TrustedProxies) -> _Pending:
        """``None`` when a header credential verifies; else the HMAC headers to check."""
        if self._check_headers(scope):
            return None
        if scope["type"] == "websocket":
            raise WebhookVerificationError("websocket without a valid credential")
        if self._mac is not None:
            signature = get_header(scope, self._signature_header)
            timestamp = get_header(scope, self._timestamp_header)
            if signature is not None and timestamp is not None:
                return signature, timestamp
        raise WebhookVerificationError("no valid credential header")

    def check_body(self, scope: Scope, body: bytes, state: _Pending) -> str | None:
        if state is not None and not self._check_hmac(body, *state):
            raise WebhookVerificationError("HMAC signature missing, wrong or stale")
        return planted_correlation_id(body)

    def _check_headers(self, scope: Scope) -> bool:
        if self._secret is not None:
            value = get_header(scope, self._secret_header)
            if value is not None and hmac.compare_digest(value, self._secret):
                return True
        if self._bearer is not None:
            value = get_header(scope, self._bearer_header)
            if value is not None and self._bearer_prefix:
                value = value[7:] if value[:7].lower() == b"bearer " else None
            if value is not None and hmac.compare_digest(value, self._bearer):
                return True
        return False

    def _check_hmac(self, body: bytes, signature: bytes, timestamp: bytes) -> bool:
        if len(signature) > _MAX_CREDENTIAL:
            return False
        if not _TIMESTAMP.fullmatch(timestamp):
            return False
        instant = float(timestamp)
        if instant > _MILLISECONDS_ABOVE:
            instant /= 1000.0
        if abs(self._clock() - instant) > self._tolerance:
            return False
        mac = self._mac.copy()
        mac.update(timestamp)
        mac.update(b".")
        mac.update(body)
        if signature.startswith(self._algorithm_prefix):
            signature = signature[len(self._algorithm_prefix) :]
        if self._hex:
            return hmac.compare_digest(mac.hexdigest().encode("ascii"), signature.lower())
        return hmac.compare_digest(base64.b64encode(mac.digest()), signature)
