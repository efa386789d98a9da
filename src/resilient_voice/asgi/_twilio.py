"""Verify ``X-Twilio-Signature`` on incoming Twilio webhooks."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

from resilient_voice.asgi._common import (
    ASGIApp,
    BodyTooLargeError,
    DisconnectedError,
    PathMatcher,
    Receive,
    Scope,
    Send,
    get_header,
    read_body,
    replay,
    respond,
)

__all__ = ["TwilioSignatureMiddleware"]

_log = logging.getLogger("resilient_voice.asgi")

_HOST = re.compile(
    rb"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)
_MAX_SIGNATURE = 128  # base64 of a SHA-256 HMAC is 44 characters
_FORM = b"application/x-www-form-urlencoded"
_FORBIDDEN = b"Forbidden\n"
_TOO_LARGE = b"Request body too large\n"


class _FormParams(dict[str, list[str]]):
    """The multi-dict shape twilio's validator reads repeated keys from (``getall``)."""

    def getall(self, name: str) -> list[str]:
        return self[name]


def _import_twilio() -> Any:
    try:
        return import_module("twilio.request_validator")
    except ImportError as exc:
        raise ImportError(
            "TwilioSignatureMiddleware needs the twilio package: "
            "pip install 'resilient-voice[twilio]'"
        ) from exc


class TwilioSignatureMiddleware:
    """Pure ASGI middleware that rejects webhooks not signed by Twilio.

    It buffers the body of guarded requests (up to ``max_body``), checks the signature with the
    twilio package's own ``RequestValidator`` (the ``twilio`` extra), and replays the body to the
    app unchanged, so the app parses the form itself. Three signing variants are accepted:

    - form posts: the URL plus every form parameter, repeated keys included, HMAC-SHA1 with the
      Auth Token;
    - JSON bodies: Twilio adds ``bodySHA256=<hex>`` to the query string; the body's SHA-256 must
      match and the URL is signed without parameters. A body that is neither a form nor covered
      by ``bodySHA256`` is refused: it would be unauthenticated;
    - SharedKey: when ``X-Twilio-Webhooks-Signature-Settings: key=<id>,algorithm=HMAC_SHA256``
      is present, the secret is the SharedKey named ``<id>`` in ``shared_keys`` and the algorithm
      the one announced (HMAC_SHA1 or HMAC_SHA256). An unknown key id is refused.

    The URL is rebuilt as Twilio requested it: ``public_base_url`` (scheme, host, port and any
    path prefix a proxy strips) followed by the raw path and query string exactly as received.
    Without ``public_base_url`` it uses the ASGI scheme and the ``Host`` header; the
    ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` / ``X-Forwarded-Port`` headers are used only
    when the immediate peer is in ``trusted_proxies`` (the right-most value, the one that proxy
    wrote). As the SDK does, the URL is tried with and without the default port.

    Missing, malformed or wrong signatures get 403, bodies over ``max_body`` get 413, both
    without calling the app; digests are compared with :func:`hmac.compare_digest`. Requests to
    other paths and non-HTTP scopes pass through without their body being read.

    Args:
        app: The ASGI app to wrap.
        auth_token: The account's primary Auth Token, or several (during a rotation).
        paths: Paths to guard: exact paths, or prefixes ending in ``*``; ``None`` (default)
            guards every HTTP request.
        public_base_url: ``https://host[:port][/prefix]`` as configured in Twilio.
        trusted_proxies: IP addresses or networks of proxies whose forwarded headers are
            trusted, or ``["*"]`` for any peer. Ignored when ``public_base_url`` is set.
        shared_keys: SharedKey id to secret, for Webhooks Rules signed with a SharedKey.
        max_body: Largest body accepted, in bytes.

    Raises:
        ImportError: the twilio package is not installed.
    """

    def __init__(
        self,
        app: ASGIApp,
        auth_token: str | Iterable[str],
        *,
        paths: Iterable[str] | None = None,
        public_base_url: str | None = None,
        trusted_proxies: Iterable[str] = (),
        shared_keys: Mapping[str, str] | None = None,
        max_body: int = 256 * 1024,
    ) -> None:
        rv = _import_twilio()
        tokens = (auth_token,) if isinstance(auth_token, str) else tuple(auth_token)
        if not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("auth_token must be a non-empty string (or several)")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ValueError(f"max_body must be a positive int, got {max_body!r}")
        self.app = app
        self._match = PathMatcher(paths)
        self._max_body = max_body
        self._validators = tuple(rv.RequestValidator(t) for t in tokens)
        self._shared = {}
        for key_id, secret in (shared_keys or {}).items():
            if not isinstance(key_id, str) or not isinstance(secret, str) or not secret:
                raise ValueError("shared_keys must map key ids to non-empty secret strings")
            self._shared[key_id] = rv.RequestValidator(secret)
        self._algorithms = frozenset((rv.HMAC_SHA1, rv.HMAC_SHA256))
        self._sha1 = rv.HMAC_SHA1
        self._add_port = rv.add_port
        self._remove_port = rv.remove_port
        self._base: str | None = None
        if public_base_url is not None:
            parts = urlsplit(public_base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    f"public_base_url must be http(s)://host..., not {public_base_url!r}"
                )
            if parts.query or parts.fragment:
                raise ValueError("public_base_url must not have a query or fragment")
            self._base = public_base_url.rstrip("/")
        proxies = [trusted_proxies] if isinstance(trusted_proxies, str) else list(trusted_proxies)
        self._trust_any = "*" in proxies
        self._proxies = tuple(ipaddress.ip_network(p, strict=False) for p in proxies if p != "*")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._match.guards(scope):
            await self.app(scope, receive, send)
            return
        signature = get_header(scope, b"x-twilio-signature")
        if signature is None or not signature or len(signature) > _MAX_SIGNATURE:
            await self._reject(send, "missing or oversized X-Twilio-Signature")
            return
        validators, algorithm = self._validators, self._sha1
        settings = get_header(scope, b"x-twilio-webhooks-signature-settings")
        if settings is not None:
            selected = self._shared_key(settings)
            if selected is None:
                await self._reject(send, "unknown SharedKey or algorithm")
                return
            validators, algorithm = selected
        url = self._url(scope)
        if url is None:
            await self._reject(send, "cannot rebuild the request URL (bad Host)")
            return
        try:
            body = await read_body(scope, receive, self._max_body)
        except BodyTooLargeError:
            await respond(send, 413, _TOO_LARGE)
            return
        except DisconnectedError:
            return
        if not self._verify(scope, url, body, signature, validators, algorithm):
            await self._reject(send, "signature mismatch")
            return
        await self.app(scope, replay(body, receive), send)

    def _shared_key(self, settings: bytes) -> tuple[tuple[Any, ...], str] | None:
        key_id = algorithm = ""
        for part in settings.decode("latin-1").split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name == "key":
                key_id = value.strip()
            elif name == "algorithm":
                algorithm = value.strip().upper()
        validator = self._shared.get(key_id)
        if validator is None or (algorithm or self._sha1) not in self._algorithms:
            return None
        return (validator,), algorithm or self._sha1

    def _url(self, scope: Scope) -> str | None:
        raw_path = scope.get("raw_path")
        if raw_path:
            # Some servers and test transports (httpx's ASGITransport) include the query here.
            path: str = bytes(raw_path).split(b"?", 1)[0].decode("latin-1")
        else:
            path = quote(scope.get("root_path", "") + scope["path"], safe="/%:@!$&'()*+,;=~")
        query = bytes(scope.get("query_string", b""))
        tail = path + "?" + query.decode("latin-1") if query else path
        if self._base is not None:
            return self._base + tail
        scheme = str(scope.get("scheme", "http"))
        host = get_header(scope, b"host")
        if self._trusted(scope):
            proto = _last(get_header(scope, b"x-forwarded-proto"))
            if proto is not None:
                scheme = proto.decode("latin-1").lower()
            forwarded_host = _last(get_header(scope, b"x-forwarded-host"))
            if forwarded_host is not None:
                host = forwarded_host
            port = _last(get_header(scope, b"x-forwarded-port"))
            if host is not None and port is not None and b":" not in host.rsplit(b"]", 1)[-1]:
                if not port.isdigit() or len(port) > 5:
                    return None
                host += b":" + port
        if scheme not in ("http", "https"):
            return None
        if host is None:
            server = scope.get("server")
            if not server or server[1] is None:
                return None
            host = f"{server[0]}:{server[1]}".encode("latin-1")
        if not _HOST.fullmatch(host):
            return None
        return f"{scheme}://{host.decode('ascii')}{tail}"

    def _trusted(self, scope: Scope) -> bool:
        if self._trust_any:
            return True
        if not self._proxies:
            return False
        client = scope.get("client")
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def _verify(
        self,
        scope: Scope,
        url: str,
        body: bytes,
        signature: bytes,
        validators: tuple[Any, ...],
        algorithm: str,
    ) -> bool:
        params: _FormParams | None = None
        query = urlsplit(url).query
        body_hash = parse_qs(query).get("bodySHA256") if "bodySHA256" in query else None
        if body_hash:
            digest = hashlib.sha256(body).hexdigest().encode("ascii")
            if not hmac.compare_digest(digest, body_hash[0].encode("utf-8", "replace")):
                return False
        elif body:
            content_type = get_header(scope, b"content-type") or b""
            if content_type.split(b";", 1)[0].strip().lower() != _FORM:
                return False  # a body nothing signs
            try:
                pairs = parse_qsl(
                    body.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict"
                )
            except (UnicodeDecodeError, ValueError):
                return False
            params = _FormParams()
            for name, value in pairs:
                params.setdefault(name, []).append(value)
        parsed = urlsplit(url)
        try:
            candidates = (self._remove_port(parsed), self._add_port(parsed))
        except ValueError:  # a port out of range
            return False
        for validator in validators:
            for candidate in candidates:
                expected = validator.compute_signature(candidate, params, algorithm)
                if hmac.compare_digest(expected.encode("ascii"), signature):
                    return True
        return False

    async def _reject(self, send: Send, reason: str) -> None:
        _log.info("rejected Twilio webhook: %s", reason)
        await respond(send, 403, _FORBIDDEN)

    def __repr__(self) -> str:
        return f"TwilioSignatureMiddleware(app={self.app!r})"


def _last(value: bytes | None) -> bytes | None:
    """The right-most item of a comma-separated header value (the nearest proxy's), stripped."""
    if value is None:
        return None
    item = value.rsplit(b",", 1)[-1].strip()
    return item or None
