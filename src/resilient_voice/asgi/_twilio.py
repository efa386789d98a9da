"""Verify ``X-Twilio-Signature`` on incoming Twilio webhooks: Twilio's verifier for the guard.

The guard (:mod:`._guard`) owns paths, bodies and refusals; this module holds Twilio's rules
only.

Over 400 lines: the middleware's docstring is its user guide (about 90 lines: the signing
variants, how the URL is rebuilt, what strict mode refuses), and the URL rebuilding belongs next
to the signature rules that depend on it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Mapping
from importlib import import_module
from typing import Any, cast
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

from resilient_voice import _validate
from resilient_voice._urls import redact_url
from resilient_voice.asgi._common import get_header
from resilient_voice.asgi._guard import WebhookGuard
from resilient_voice.asgi._proxies import TrustedProxies
from resilient_voice.asgi._types import ASGIApp, Scope
from resilient_voice.errors import WebhookVerificationError

__all__ = ["TwilioSignatureMiddleware"]

_log = logging.getLogger("resilient_voice.asgi")

_HOST = re.compile(
    rb"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)
# Base64 of an HMAC-SHA1 (20 bytes) or HMAC-SHA256 (32 bytes) digest; nothing else can match.
_SIGNATURE = re.compile(rb"[A-Za-z0-9+/]{27}=|[A-Za-z0-9+/]{43}=")
# One name=value segment that every form parser splits and decodes alike: printable ASCII
# without the separators (& ;), without a second '=', and '%' only in a valid escape.
_STRICT_SEGMENT = re.compile(r"(?:[!-$'-:<>-~]|%[0-9A-Fa-f]{2})+=(?:[!-$'-:<>-~]|%[0-9A-Fa-f]{2})*")
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_DOCS = "see docs/deployment.md"
_FORM = b"application/x-www-form-urlencoded"
# What the header check hands the body check: the URL, the signature, validators, algorithm.
_Pending = tuple[str, bytes, tuple[Any, ...], str]
DEFAULT_MAX_BODY = 64 * 1024
"""Default ``max_body``: a Twilio form webhook is a few KiB (an SMS with ten media URLs < 8 KiB)."""
DEFAULT_MAX_FIELDS = 100
"""Default ``max_fields``: Twilio's richest webhooks carry about 50 parameters."""


def _import_twilio() -> Any:
    try:
        return import_module("twilio.request_validator")
    except ImportError as exc:
        raise ImportError(
            "TwilioSignatureMiddleware needs the twilio package: "
            "pip install 'resilient-voice[twilio]'"
        ) from exc


class TwilioSignatureMiddleware(WebhookGuard["_Pending"]):
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

    **WebSocket handshakes** on guarded paths (Media Streams, ConversationRelay) are verified
    too: Twilio signs them like a GET webhook, over the ``wss://`` URL it connected to (the URL
    rebuilt as above with ``ws``/``wss`` for the scheme) and no parameters. A handshake that
    fails is refused before it is accepted: a 403 denial response where the server supports the
    ``websocket.http.response`` extension (uvicorn, hypercorn), else ``websocket.close``.

    **Limits, checked before any work that an unsigned request could make expensive.** The
    signature header must be well-formed (the base64 of a SHA-1 or SHA-256 HMAC) before the
    body is read; bodies over ``max_body`` get 413, forms with more than ``max_fields``
    parameters 403 (the separators are counted before anything is parsed). The parameter
    string is sorted and joined once per request; only the HMAC runs per URL variant and per
    secret.

    **Refusals** are JSON, like the rate limiter's 429: 403 ``{"error":"forbidden"}`` and 413
    ``{"error":"payload_too_large","max_bytes":N}``, each with a fresh ``X-Correlation-ID``
    under which the refusal is logged (the id the request offered is logged only as the
    sanitised ``offered_correlation_id`` field: a forged webhook cannot choose the id its
    refusal is filed under). Digests are compared with :func:`hmac.compare_digest`. Requests to
    other paths and other scopes pass through without their body being read.

    **What the signature cannot prove.** It does not expire (a captured webhook can be replayed)
    and it covers the sorted ``name + value`` concatenation without separators, with repeated
    values de-duplicated, so some altered bodies still verify. ``strict=True`` refuses the
    ones that can be told from a genuine body: a repeated ``name=value`` pair, and a form that
    does not re-encode to itself (empty segments, a segment without ``=`` or with a second
    one, a ``;`` that some parsers split on, a ``%`` outside a valid escape, non-printable
    bytes). It is off by default because the check reads the raw encoding, which Twilio does
    not document: genuine Twilio and FakeTelephony bodies pass it (``+`` or ``%20`` for a
    space, either hex case, any unreserved character escaped or not), but a proxy that
    re-encodes forms, or a webhook that repeats a pair on purpose, would be refused. Even in
    strict mode a body can move characters between adjacent names and values, and no mode
    can detect a field that was left out: handlers de-duplicate on (``CallSid`` or
    ``MessageSid``, status) and never read meaning into a field's absence.

    Args:
        app: The ASGI app to wrap.
        auth_token: The account's primary Auth Token, or several (during a rotation).
        paths: Paths to guard: exact paths, or prefixes ending in ``*``; ``None`` (default)
            guards every HTTP request and websocket handshake.
        public_base_url: ``https://host[:port][/prefix]`` as configured in Twilio.
        trusted_proxies: A :class:`~resilient_voice.asgi.TrustedProxies`, or a list of the
            addresses and networks of your proxies as shorthand. Not consulted when
            ``public_base_url`` is set.
        shared_keys: SharedKey id to secret, for Webhooks Rules signed with a SharedKey.
        max_body: Largest body accepted, in bytes (default 64 KiB).
        max_fields: Most form parameters accepted (default 100).
        strict: Refuse repeated pairs and forms that do not re-encode to themselves (above).

    Raises:
        ImportError: the twilio package is not installed.
        TypeError: ``auth_token`` is ``None`` (an unset environment variable) or not a string.
        ValueError: an empty token or another invalid option, such as ``"*"`` or
            ``0.0.0.0/0`` in ``trusted_proxies``.
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
        max_body: int = DEFAULT_MAX_BODY,
        max_fields: int = DEFAULT_MAX_FIELDS,
        strict: bool = False,
    ) -> None:
        super().__init__(
            app,
            _TwilioVerifier(auth_token, public_base_url, shared_keys, max_fields, strict),
            paths=paths,
            max_body=max_body,
            trusted_proxies=trusted_proxies,
        )

    def __repr__(self) -> str:
        return f"TwilioSignatureMiddleware(app={self.app!r})"


class _TwilioVerifier:
    """Twilio's signature rules for :class:`~resilient_voice.asgi._guard.WebhookGuard`.

    The state handed from the header check to the body check is the URL rebuilt, the
    signature, and the validators and algorithm it names.
    """

    provider = "Twilio"

    def __init__(
        self,
        auth_token: str | Iterable[str],
        public_base_url: str | None,
        shared_keys: Mapping[str, str] | None,
        max_fields: int,
        strict: bool,
    ) -> None:
        rv = _import_twilio()
        # Typed str, but an unset environment variable gives None.
        if cast("object", auth_token) is None:
            raise TypeError(
                "auth_token is None: pass the account's Auth Token "
                "(is the environment variable that holds it set?)"
            )
        if not isinstance(cast("object", auth_token), str | Iterable):
            kind = type(auth_token).__name__
            raise TypeError(f"auth_token must be a str (or several), got {kind}")
        tokens: tuple[object, ...] = (
            (auth_token,) if isinstance(auth_token, str) else tuple(auth_token)
        )
        for token in tokens:
            if not isinstance(token, str):
                kind = type(token).__name__
                raise TypeError(f"auth_token must be a str (or several), got {kind}")
        if not tokens or not all(token.strip() for token in tokens):  # type: ignore[attr-defined]
            raise ValueError("auth_token must be a non-empty string (or several)")
        if isinstance(max_fields, bool) or not isinstance(max_fields, int) or max_fields < 1:
            raise ValueError(f"max_fields must be a positive int, got {max_fields!r}")
        self._max_fields = max_fields
        self._strict = _validate.flag("strict", strict)
        self._validators = tuple(rv.RequestValidator(t) for t in tokens)
        self._shared = {}
        if shared_keys is not None and not isinstance(shared_keys, Mapping):
            raise TypeError(
                f"shared_keys must be a mapping of key id to secret, got {shared_keys!r}"
            )
        for key_id, secret in (shared_keys or {}).items():
            if (
                not isinstance(key_id, str)
                or not key_id.strip()
                or not isinstance(secret, str)
                or not secret.strip()
            ):
                raise ValueError("shared_keys must map key ids to non-empty secret strings")
            self._shared[key_id] = rv.RequestValidator(secret)
        self._algorithms = frozenset((rv.HMAC_SHA1, rv.HMAC_SHA256))
        self._sha1 = rv.HMAC_SHA1
        self._add_port = rv.add_port
        self._remove_port = rv.remove_port
        self._base: str | None = None
        self._base_path = ""
        if public_base_url is not None:
            if not isinstance(cast("object", public_base_url), str):
                kind = type(public_base_url).__name__
                raise TypeError(f"public_base_url must be a str, got {kind}")
            if not public_base_url.isprintable():
                raise ValueError("public_base_url must not hold control characters")
            parts = urlsplit(public_base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    "public_base_url must be http(s)://host..., "
                    f"not {redact_url(public_base_url)!r}"
                )
            if parts.query or parts.fragment:
                raise ValueError("public_base_url must not have a query or fragment")
            self._base = f"{parts.scheme}://{parts.netloc}"
            self._base_path = parts.path.rstrip("/")

    def check_headers(self, scope: Scope, proxies: TrustedProxies) -> _Pending:
        """Everything that needs no body: a request that cannot verify costs no read."""
        signature, settings = _single_headers(scope)
        if signature is None or not _SIGNATURE.fullmatch(signature):
            raise WebhookVerificationError("missing or malformed X-Twilio-Signature")
        validators, algorithm = self._validators, self._sha1
        if settings is not None:
            selected = self._shared_key(settings)
            if selected is None:
                raise WebhookVerificationError("unknown SharedKey or algorithm")
            validators, algorithm = selected
        websocket = scope["type"] == "websocket"
        url = self._socket_url(scope, proxies) if websocket else self._url(scope, proxies)
        if url is None:
            raise WebhookVerificationError("cannot rebuild the request URL (bad Host)")
        # A handshake is signed like a GET webhook: the wss:// URL, no parameters.
        if websocket and not self._matches(url, "", signature, validators, algorithm):
            raise WebhookVerificationError("websocket handshake signature mismatch")
        return url, signature, validators, algorithm

    def check_body(self, scope: Scope, body: bytes, state: _Pending) -> None:
        url, signature, validators, algorithm = state
        reason = self._verify(scope, url, body, signature, validators, algorithm)
        if reason is not None:
            _log.debug(
                "Twilio signature does not match the URL checked, %s (%s)", redact_url(url), _DOCS
            )
            raise WebhookVerificationError(reason)

    def _socket_url(self, scope: Scope, proxies: TrustedProxies) -> str | None:
        """The ``ws(s)://`` URL of a handshake: rebuilt as for HTTP, then given its own scheme.

        Twilio signs the ``wss://`` URL it connected to; the default port of ``wss`` is 443,
        of ``ws`` 80, as for https and http, so the port variants carry over.
        """
        secure = scope.get("scheme") == "wss"
        view = dict(scope)
        view["scheme"] = "https" if secure else "http"
        url = self._url(view, proxies)
        if url is None:
            return None
        if url.startswith("https://"):
            return "wss://" + url[8:]
        return "ws://" + url[7:]

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

    def _url(self, scope: Scope, proxies: TrustedProxies) -> str | None:
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
        elif isinstance(scope.get("path"), str):
            path = quote(scope["path"], safe=_PATH_SAFE)
        else:
            return None
        root = scope.get("root_path") or ""
        if not isinstance(root, str):
            return None  # a scope this guard cannot place: refused, never passed through
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
        forwarded = proxies._forwarded(scope)
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
            # Replaced, not raised on: a name outside Latin-1 then fails the host check below.
            host = f"{name}:{server[1]}".encode("latin-1", "replace")
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
    ) -> str | None:
        """Check a request's body and signature; return why it fails, or ``None``."""
        signed_params = ""
        query = urlsplit(url).query
        body_hash = parse_qs(query).get("bodySHA256") if "bodySHA256" in query else None
        if body_hash:
            digest = hashlib.sha256(body).hexdigest().encode("ascii")
            if not hmac.compare_digest(digest, body_hash[0].encode("utf-8", "replace")):
                return "bodySHA256 does not match the body"
        elif body:
            content_type = get_header(scope, b"content-type") or b""
            if content_type.split(b";", 1)[0].strip().lower() != _FORM:
                return "a body that is neither a form nor covered by bodySHA256"
            try:
                text = body.decode("ascii")
                # max_num_fields counts separators before anything is parsed.
                pairs = parse_qsl(
                    text,
                    keep_blank_values=True,
                    encoding="utf-8",
                    errors="strict",
                    max_num_fields=self._max_fields,
                )
            except (UnicodeDecodeError, ValueError):
                return "a form that is not ASCII, not UTF-8, or over max_fields"
            if self._strict:
                problem = _strict_problem(text, pairs)
                if problem is not None:
                    return problem
            signed_params = _signed_params(pairs)
        if not self._matches(url, signed_params, signature, validators, algorithm):
            return "signature mismatch"
        return None

    def _matches(
        self,
        url: str,
        signed_params: str,
        signature: bytes,
        validators: tuple[Any, ...],
        algorithm: str,
    ) -> bool:
        """Whether ``signature`` signs ``url`` (with or without its default port) + params.

        ``signed_params`` is the sorted name+value concatenation, built once per request;
        only the HMAC runs per URL variant and per secret. It goes to the twilio package's
        ``compute_signature`` as part of the URI, with no parameters, which signs exactly
        ``url + signed_params``.
        """
        scheme, _, rest = url.partition("://")
        # The SDK's port helpers know http and https; a websocket URL borrows them.
        secure = scheme in ("https", "wss")
        parsed = urlsplit(("https://" if secure else "http://") + rest)
        try:
            candidates = {self._remove_port(parsed), self._add_port(parsed)}
        except ValueError:  # a port out of range
            return False
        prefix = "https://" if secure else "http://"
        for validator in validators:
            for candidate in candidates:
                signed = scheme + "://" + candidate[len(prefix) :] + signed_params
                expected = validator.compute_signature(signed, None, algorithm)
                if hmac.compare_digest(expected.encode("ascii"), signature):
                    return True
        return False


_SIGNATURE_HEADER = b"x-twilio-signature"
_SETTINGS_HEADER = b"x-twilio-webhooks-signature-settings"


def _single_headers(scope: Scope) -> tuple[bytes | None, bytes | None]:
    """The signature and signature-settings headers, refusing any header that must be single.

    Twilio sends each of ``X-Twilio-Signature``, ``X-Twilio-Webhooks-Signature-Settings`` and
    ``Host`` once. A second copy can only have been added on the way, and components disagree
    on which copy counts (this guard reads the first, a proxy or framework may read the last):
    a request whose genuine signature sits next to a forged one, or that names two hosts, is
    refused rather than judged on one reading of it.

    Raises:
        WebhookVerificationError: one of these headers appears more than once.
    """
    signature = settings = None
    hosts = 0
    for key, value in scope["headers"]:
        if key == _SIGNATURE_HEADER:
            if signature is not None:
                raise WebhookVerificationError("more than one X-Twilio-Signature")
            signature = bytes(value)
        elif key == _SETTINGS_HEADER:
            if settings is not None:
                raise WebhookVerificationError("more than one X-Twilio-Webhooks-Signature-Settings")
            settings = bytes(value)
        elif key == b"host":
            hosts += 1
            if hosts > 1:
                raise WebhookVerificationError("more than one Host header")
    return signature, settings


def _signed_params(pairs: list[tuple[str, str]]) -> str:
    """Twilio's parameter string: names sorted, each name's distinct values sorted, no separators.

    The same string ``RequestValidator.compute_signature`` appends, built once.
    """
    grouped: dict[str, set[str]] = {}
    for name, value in pairs:
        grouped.setdefault(name, set()).add(value)
    return "".join(name + value for name in sorted(grouped) for value in sorted(grouped[name]))


def _strict_problem(text: str, pairs: list[tuple[str, str]]) -> str | None:
    """Why a form fails strict mode, or ``None``.

    The body must be exactly ``name=value`` segments joined by ``&`` that every form parser
    reads the same way, and no (name, value) pair may repeat: the signature cannot tell a
    repeated pair from a single one.
    """
    segments = text.split("&")
    if len(segments) != len(pairs):
        return "strict: empty segments in the form"
    for segment in segments:
        if not _STRICT_SEGMENT.fullmatch(segment):
            return "strict: a form segment that does not re-encode to itself"
    if len(set(pairs)) != len(pairs):
        return "strict: a repeated name=value pair"
    return None
