"""Verify ``X-Twilio-Signature`` on incoming Twilio webhooks."""

from __future__ import annotations

import hashlib
import hmac
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
from resilient_voice.asgi._proxies import TrustedProxies, as_trusted_proxies

__all__ = ["TwilioSignatureMiddleware"]

_log = logging.getLogger("resilient_voice.asgi")

_HOST = re.compile(
    rb"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_DOCS = "see docs/deployment.md"
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
    public path prefix) or else the ASGI scheme and the ``Host`` header, then ``root_path`` (a
    prefix the proxy stripped, or a mount) unless the base already ends with it, then the raw
    path and query string exactly as received. Forwarded headers (``X-Forwarded-Proto`` /
    ``-Host`` / ``-Port`` and RFC 7239 ``Forwarded``) count only as ``trusted_proxies`` allows
    (see :class:`~resilient_voice.asgi.TrustedProxies`), and then only the value the trusted
    proxy appended. As the SDK does, the URL is tried with and without the default port. When
    the signature does not match, one DEBUG line on ``resilient_voice.asgi`` names the URL that
    was checked (never the token or the signature): docs/deployment.md explains each setup.

    Missing, malformed or wrong signatures get 403, bodies over ``max_body`` get 413, both
    without calling the app; digests are compared with :func:`hmac.compare_digest`. Requests to
    other paths and non-HTTP scopes pass through without their body being read.

    Args:
        app: The ASGI app to wrap.
        auth_token: The account's primary Auth Token, or several (during a rotation).
        paths: Paths to guard: exact paths, or prefixes ending in ``*``; ``None`` (default)
            guards every HTTP request.
        public_base_url: ``https://host[:port][/prefix]`` as configured in Twilio.
        trusted_proxies: A :class:`~resilient_voice.asgi.TrustedProxies`, or a list of the
            addresses and networks of your proxies as shorthand. Not consulted when
            ``public_base_url`` is set.
        shared_keys: SharedKey id to secret, for Webhooks Rules signed with a SharedKey.
        max_body: Largest body accepted, in bytes.

    Raises:
        ImportError: the twilio package is not installed.
        ValueError: an invalid option, such as ``"*"`` or ``0.0.0.0/0`` in ``trusted_proxies``.
    """

    def __init__(
        self,
        app: ASGIApp,
        auth_token: str | Iterable[str],
        *,
        paths: Iterable[str] | None = None,
        public_base_url: str | None = None,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
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
        self._base_path = ""
        if public_base_url is not None:
            parts = urlsplit(public_base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    f"public_base_url must be http(s)://host..., not {public_base_url!r}"
                )
            if parts.query or parts.fragment:
                raise ValueError("public_base_url must not have a query or fragment")
            self._base = f"{parts.scheme}://{parts.netloc}"
            self._base_path = parts.path.rstrip("/")
        self._proxies = as_trusted_proxies(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._match(scope["path"]):
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
            _log.debug("Twilio signature does not match the URL checked, %s (%s)", url, _DOCS)
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
        """The URL Twilio requested, or ``None`` (logged at DEBUG) when it cannot be told safely.

        The path is the one the client asked for: ``root_path`` (the prefix a proxy stripped,
        or a mount) followed by the path below it. Servers disagree on whether ``raw_path`` and
        ``path`` already start with ``root_path`` (uvicorn's do, hypercorn's do not), so the
        prefix is removed when present and added back once. ``public_base_url`` supplies the
        scheme and host, and its path is the public prefix: ``root_path`` is added to it unless
        it already ends with it, so both ``https://example.com/hooks`` and
        ``https://example.com`` work with ``--root-path /hooks``.
        """
        raw_path = scope.get("raw_path")
        if raw_path:
            # Some servers and test transports (httpx's ASGITransport) include the query here.
            path: str = bytes(raw_path).split(b"?", 1)[0].decode("latin-1")
        else:
            path = quote(scope["path"], safe=_PATH_SAFE)
        root = scope.get("root_path", "")
        if root:
            root = quote(root.rstrip("/"), safe=_PATH_SAFE)
            if path == root or path.startswith(root + "/"):
                path = path[len(root) :]
        query = bytes(scope.get("query_string", b""))
        tail = path + "?" + query.decode("latin-1") if query else path
        if self._base is not None:
            prefix = self._base_path
            if root and prefix != root and not prefix.endswith(root):
                prefix += root
            return self._base + prefix + tail
        tail = root + tail
        scheme = str(scope.get("scheme", "http"))
        host = get_header(scope, b"host")
        forwarded = self._proxies._forwarded(scope)
        if forwarded is not None:
            if forwarded.conflict:
                _log.debug(
                    "Twilio webhook: Forwarded is malformed or disagrees with X-Forwarded-*, "
                    "so the URL cannot be told; set or strip both at the proxy (%s)",
                    _DOCS,
                )
                return None
            if forwarded.proto is not None:
                scheme = forwarded.proto.decode("latin-1").lower()
            if forwarded.host is not None:
                host = forwarded.host
            port = forwarded.port
            if host is not None and port is not None and b":" not in host.rsplit(b"]", 1)[-1]:
                if not port.isdigit() or len(port) > 5:
                    _log.debug("Twilio webhook: bad X-Forwarded-Port (%s)", _DOCS)
                    return None
                host += b":" + port
        if scheme not in ("http", "https"):
            _log.debug("Twilio webhook: scheme %r is not http(s) (%s)", scheme[:16], _DOCS)
            return None
        if host is None:
            server = scope.get("server")
            if not server or server[1] is None:
                _log.debug("Twilio webhook: no Host header and no server address (%s)", _DOCS)
                return None
            name = f"[{server[0]}]" if ":" in str(server[0]) else str(server[0])
            host = f"{name}:{server[1]}".encode("latin-1")
        if not _HOST.fullmatch(host):
            _log.debug("Twilio webhook: the Host is not a valid host[:port] (%s)", _DOCS)
            return None
        return f"{scheme}://{host.decode('ascii')}{tail}"

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
