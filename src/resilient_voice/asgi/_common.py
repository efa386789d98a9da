"""Small pieces shared by the ASGI middleware: path matching, body buffering, replies."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from resilient_voice.asgi._types import Message, Receive, Scope, Send
from resilient_voice.correlation import correlation_scope, get_correlation_id, new_correlation_id

__all__ = [
    "CORRELATION_HEADER",
    "FORBIDDEN",
    "BodyTooLargeError",
    "DisconnectedError",
    "PathMatcher",
    "get_header",
    "header_name",
    "normalise_path",
    "payload_too_large",
    "read_body",
    "refuse",
    "replay",
    "respond",
    "respond_json",
    "route_paths",
    "sanitized_id",
    "set_headers",
]


_SLASHES = re.compile(r"//+")


def normalise_path(path: str) -> str:
    """Return ``path`` in the one spelling matchers compare: ``/a/b``.

    Repeated slashes collapse, a trailing slash goes, and a missing leading slash is added:
    Litestar routes ``//a//b/`` and ``a/b`` to the handler of ``/a/b`` (it normalises the same
    way before routing), so a path filter that compared spellings could be walked around.
    Dot segments and case are left alone: no framework routes ``/x/../a`` or ``/A`` to ``/a``.
    Servers have already percent-decoded ``scope["path"]`` (``%2F`` is a ``/`` here), which is
    also what the routers see.
    """
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if not path.startswith("/"):
        path = "/" + path
    if len(path) > 1 and path.endswith("/"):
        return path[:-1]
    return path


def route_paths(scope: Scope) -> tuple[str, ...]:
    """Return the normalised path(s) the application may route this request on.

    ``scope["path"]`` is not that path when a root path is set: uvicorn includes
    ``root_path`` in ``path`` (``--root-path /hooks`` gives ``/hooks/twilio/status``), hypercorn
    does not, and a Starlette ``Mount`` adds its prefix to ``root_path`` while leaving the full
    path in ``path``. Starlette (>= 0.35, ``get_route_path``) routes on ``path`` minus
    ``root_path`` when ``path`` starts with it at a segment boundary, else on ``path`` itself;
    Litestar on whatever follows the first occurrence of ``root_path`` anywhere in ``path``.
    Usually both readings agree and one path is returned; when they differ (a ``root_path``
    inside the path, or not followed by ``/``) both are returned, so that a filter can treat
    the request as aimed at either. After Litestar's router ran (middleware given as
    ``DefineMiddleware``), ``path`` is already the routed path and is taken as it is.

    Returns:
        One or two normalised paths (see :func:`normalise_path`), or ``()`` when the scope has
        no usable ``path`` or ``root_path``: the caller cannot tell where the request goes.
    """
    path = scope.get("path")
    root = scope.get("root_path", "")
    if not isinstance(path, str) or not isinstance(root, str):
        return ()
    if not root or "route_handler" in scope:
        return (normalise_path(path),)
    at = path.find(root)
    if at < 0:
        return (normalise_path(path),)
    rest = path[at + len(root) :]
    if at == 0 and (not rest or rest[0] == "/"):
        return (normalise_path(rest),)
    whole, litestar = normalise_path(path), normalise_path(rest)
    return (whole,) if whole == litestar else (whole, litestar)


class PathMatcher:
    """Decides whether a request is on a path a middleware guards.

    ``None`` guards every path. Otherwise each entry is an exact path, or a prefix when it ends
    with ``*`` (``"/twilio/*"`` guards ``/twilio``, ``/twilio/`` and ``/twilio/voice``). Entries
    and request paths are compared normalised (see :func:`normalise_path`), on the path the
    application routes on (see :func:`route_paths`).
    """

    __slots__ = ("_all", "_exact", "_prefixes")

    def __init__(self, paths: Iterable[str] | None) -> None:
        self._all = paths is None
        exact: set[str] = set()
        prefixes: list[str] = []
        if paths is not None:
            if isinstance(paths, str) or not isinstance(paths, Iterable):
                raise TypeError(f"paths must be a collection of paths, got {paths!r}")
            for path in paths:
                if not isinstance(path, str) or not path.startswith("/"):
                    raise ValueError(f"paths entries must start with '/': {path!r}")
                if path.endswith("*"):
                    prefix = _SLASHES.sub("/", path[:-1])
                    prefixes.append(prefix)
                    if prefix.endswith("/") and len(prefix) > 1:
                        exact.add(prefix[:-1])  # "/twilio/" and "/twilio" are one path
                else:
                    exact.add(normalise_path(path))
            if not exact and not prefixes:
                raise ValueError("paths is empty: pass None to guard every path")
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)

    def __call__(self, path: str) -> bool:
        """Whether the normalised ``path`` is guarded."""
        if self._all or path in self._exact:
            return True
        return bool(self._prefixes) and path.startswith(self._prefixes)

    def guards(self, scope: Scope) -> bool:
        """Whether the request of ``scope`` must be verified; ``True`` when it cannot be told.

        Every reading of the path counts (see :func:`route_paths`), and so does ``path`` as
        the server gave it, for frameworks that ignore ``root_path``: a guard verifies a
        request that any of them would route to a guarded path. Fail closed: a scope without
        a usable path is verified.
        """
        if self._all:
            return True
        paths = route_paths(scope)
        if not paths:
            return True
        for path in paths:
            if self(path):
                return True
        if scope.get("root_path"):
            return self(normalise_path(scope["path"]))
        return False


def get_header(scope: Scope, name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lowercase bytes), or ``None``."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def header_name(name: str, value: str) -> bytes:
    """Validate an HTTP header name option; return it lowercased, as ASGI bytes.

    Raises:
        ValueError: ``value`` is not an HTTP token.
    """
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(f"{name} must be an HTTP header name, got {value!r}")
    return value.lower().encode("ascii")


class BodyTooLargeError(Exception):
    """The request body exceeds the configured limit."""


class DisconnectedError(Exception):
    """The client went away before sending the whole body."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Buffer the request body, refusing more than ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before anything is read.

    Raises:
        BodyTooLargeError: the body (declared or received) is larger than ``limit``.
        DisconnectedError: the client disconnected first.
    """
    declared = get_header(scope, b"content-length")
    # Unparseable framing is not worth a second opinion; the length check keeps int() away from
    # Python's digit limit on hostile values.
    if declared is not None and (
        not declared.isdigit() or len(declared) > 18 or int(declared) > limit
    ):
        raise BodyTooLargeError
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise DisconnectedError
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """Return a ``receive`` that yields ``body`` once, then defers to the real ``receive``.

    The app downstream reads the verified body exactly as the client sent it; later calls
    (waiting for ``http.disconnect``) reach the server.
    """
    pending = True

    async def receive_replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_replayed


async def respond(send: Send, status: int, text: bytes, extra: Iterable[Any] = ()) -> None:
    """Send a short plain-text response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(text)).encode("ascii")),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": text})


FORBIDDEN = b'{"error":"forbidden"}'
"""The body of every 403 the webhook guards send, in the shape of the rate limiter's 429."""
CORRELATION_HEADER = b"x-correlation-id"
"""The header a refusal carries its correlation id in (CorrelationIdMiddleware's default)."""
_JSON = (b"content-type", b"application/json")
_WEBSOCKET_POLICY_VIOLATION = 1008
_OFFERED_KEEP = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
_OFFERED_MAX = 128


def payload_too_large(limit: int) -> bytes:
    """The body of a 413 for ``limit`` bytes (built once, in a middleware's constructor)."""
    return b'{"error":"payload_too_large","max_bytes":%d}' % limit


async def respond_json(
    send: Send, status: int, body: bytes, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a short JSON response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", b"%d" % len(body)), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


def sanitized_id(value: str | bytes | None) -> str | None:
    """A correlation id offered by a client, made safe to log as a separate field.

    At most 128 characters; anything outside the default id alphabet becomes ``?``, so CR/LF,
    control characters and markup never reach a log line.
    """
    if value is None:
        return None
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else bytes(value)
    raw = raw[:_OFFERED_MAX]
    return "".join(chr(b) if b in _OFFERED_KEEP else "?" for b in raw)


async def refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    body: bytes,
    *,
    log: logging.Logger,
    message: str,
    reason: str,
) -> None:
    """Refuse a request or websocket handshake without calling the app, under a fresh id.

    A refused request must not choose the correlation id its refusal is logged and answered
    under (a forged webhook could otherwise plant its log lines among a real call's): the log
    record and the response get a fresh id, and the id the request offered (the current id,
    as an outer :class:`CorrelationIdMiddleware` chose it, else its ``X-Correlation-ID``) is
    logged only as the sanitised ``offered_correlation_id`` field. An outer
    CorrelationIdMiddleware echoes the fresh id, because it echoes the id current when the
    response starts.

    HTTP gets a JSON response with the id in ``X-Correlation-ID``. A websocket handshake is
    refused before it is accepted: with a 403 denial response when the server supports the
    ``websocket.http.response`` extension, else ``websocket.close`` (code 1008), which servers
    answer with a 403 of their own.
    """
    offered = get_correlation_id()
    if offered is None:
        offered = sanitized_id(get_header(scope, CORRELATION_HEADER))
    else:
        offered = sanitized_id(offered)
    fresh = new_correlation_id()
    headers = ((CORRELATION_HEADER, fresh.encode("ascii")),)
    with correlation_scope(fresh):
        log.info(message, reason, extra={"offered_correlation_id": offered})
        if scope["type"] == "http":
            await respond_json(send, status, body, headers)
            return
        first = await receive()
        if first["type"] != "websocket.connect":
            return  # the client left first
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [_JSON, (b"content-length", b"%d" % len(body)), *headers],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": _WEBSOCKET_POLICY_VIOLATION})


def set_headers(headers: Iterable[Any], pairs: Sequence[tuple[bytes, bytes]]) -> list[Any]:
    """Copy ``headers`` without any of the names in ``pairs`` (in any case), then append them.

    A header a middleware sets appears exactly once even when the app (or another instance of
    the middleware) set it too. A copy, because an app may send the same header list object
    with every response. Names in ``pairs`` must be lower-case.
    """
    names = {name for name, _ in pairs}
    kept = [h for h in headers if h[0].lower() not in names]
    kept.extend(pairs)
    return kept
