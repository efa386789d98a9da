"""Give every request a correlation id: accept a valid one, else recover or generate one."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from resilient_voice import _validate
from resilient_voice._correlation_id import CORRELATION_ID, is_valid_default
from resilient_voice.asgi._common import (
    header_name,
    set_headers,
)
from resilient_voice.asgi._types import ASGIApp, Message, Receive, Scope, Send
from resilient_voice.correlation import CorrelationIdValidator, new_correlation_id

__all__ = ["CorrelationIdMiddleware", "parse_traceparent"]

_TRACEPARENT = b"traceparent"
_HEX_AND_DASH = b"0123456789abcdef-"
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16
_MAX_TRACEPARENT = 512
_DASH = 0x2D
_AMPERSAND = 0x26
_HANDLED = frozenset({"http", "websocket"})
_get_id = CORRELATION_ID.get
# The default validator's alphabet, to check header bytes before decoding them: bytes.isalnum
# is ASCII-only, and deleting the alphabet leaves nothing only when nothing else was there.
_ID_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


def parse_traceparent(value: bytes) -> str | None:
    """Return the trace-id of a W3C ``traceparent`` header value, or ``None`` when invalid.

    The format is ``version "-" trace-id "-" parent-id "-" trace-flags``: 2, 32, 16 and 2
    lowercase hex digits (W3C Trace Context, level 1 and 2). Version ``ff``, an all-zero
    trace-id or parent-id, uppercase hex and any other deviation are refused. Version ``00``
    must be exactly 55 characters; a later version may append ``-`` and more fields, which are
    ignored, as the specification asks of a version-00 parser.

    Args:
        value: The raw header value.

    Returns:
        The trace-id, 32 lowercase hex characters.
    """
    size = len(value)
    if size < 55 or size > _MAX_TRACEPARENT:
        return None
    if size > 55 and (value[:2] == b"00" or value[55] != _DASH):
        return None
    head = value[:55]
    if head[2] != _DASH or head[35] != _DASH or head[52] != _DASH:
        return None
    if head.translate(None, _HEX_AND_DASH) or head.count(b"-") != 3 or head[:2] == b"ff":
        return None
    trace_id = head[3:35]
    if trace_id == _ZERO_TRACE or head[36:52] == _ZERO_PARENT:
        return None
    return trace_id.decode("ascii")


def _query_value(query: bytes, key: bytes) -> bytes | None:
    """Return the raw value of the first ``key`` (``b"name="``) parameter of a query string."""
    start = query.find(key)
    while start > 0 and query[start - 1] != _AMPERSAND:
        start = query.find(key, start + 1)
    if start < 0:
        return None
    start += len(key)
    end = query.find(b"&", start)
    return query[start:] if end < 0 else query[start:end]


def _encoded(current: str, fallback: bytes) -> bytes:
    """The header bytes of an id set by an inner scope (validated there, but maybe not Latin-1)."""
    try:
        return current.encode("latin-1")
    except UnicodeEncodeError:
        return fallback


class CorrelationIdMiddleware:
    """Pure ASGI middleware that runs every request inside a correlation scope.

    For each HTTP request and websocket connection the id is chosen in this order; the first
    valid candidate wins:

    1. the ``header`` of the request (``X-Correlation-ID`` by default);
    2. the ``query_param`` of the URL (``rv_cid``): the typed Twilio client plants it in the
       status-callback and webhook URLs it gives Twilio, so Twilio's webhooks carry the id of
       the call that caused them, and no body has to be read to find it;
    3. with ``trust_traceparent=True``, the trace-id of a valid W3C ``traceparent`` header;
    4. a fresh id from ``generate``.

    Candidates are checked by ``validator`` (the default accepts 1..128 characters of
    ``[A-Za-z0-9._:-]``). An invalid one (CR/LF, a 10 kB string, non-ASCII) is skipped, never
    logged or echoed. The id is set with the correlation ContextVar for the whole call of the app,
    so log records (with :class:`~resilient_voice.correlation.CorrelationIdFilter`) and outgoing
    requests made by the handler carry it, and the token is reset when the app returns or raises.

    The id in use when the response starts is echoed in ``header``, exactly once: any header of
    the same name the app set is replaced. (When an inner component such as
    :class:`VapiWebhookMiddleware` opened a nested scope with the call's id, that id is echoed.)
    Websocket connections get it on ``websocket.accept``. Bodies pass straight through and are
    never buffered; lifespan scopes pass through untouched.

    Args:
        app: The ASGI app to wrap.
        header: The request header read, and the response header written.
        validator: The rules for incoming ids; the default validator when omitted.
        generate: Makes a new id (default: 32 hex characters from ``os.urandom``). It must
            return ids ``validator`` accepts; one sample is checked here.
        trust_traceparent: Use the trace-id of an incoming W3C ``traceparent`` header when no
            better source exists. Off by default: turn it on when your edge sets trace context,
            so that logs and traces share an id.
        query_param: The query parameter to recover the id from, or ``None`` to ignore URLs.
        echo: Whether to add the response header.

    Raises:
        TypeError: ``validator`` is not a :class:`CorrelationIdValidator`, or ``generate`` is
            not callable.
        ValueError: ``header`` is not a header name, ``query_param`` is empty or not URL-safe,
            or ``generate`` returned a non-ASCII id or one ``validator`` refuses.
    """

    def __init__(
        self,
        app: ASGIApp,
        header: str = "X-Correlation-ID",
        *,
        validator: CorrelationIdValidator | None = None,
        generate: Callable[[], str] = new_correlation_id,
        trust_traceparent: bool = False,
        query_param: str | None = "rv_cid",
        echo: bool = True,
    ) -> None:
        if validator is not None and not isinstance(validator, CorrelationIdValidator):
            raise TypeError(f"validator must be a CorrelationIdValidator, got {validator!r}")
        if not callable(generate):
            raise TypeError("generate must be a callable returning a new id")
        self.app = _validate.function("app", app)
        self._header = header_name("header", header)
        self._is_valid: Callable[[object], bool] = (
            is_valid_default if validator is None else validator.is_valid
        )
        self._max_length = 128 if validator is None else validator.max_length
        self._default = validator is None
        sample = generate()
        if not isinstance(sample, str) or not sample.isascii() or not self._is_valid(sample):
            raise ValueError(f"generate() returned an id the validator refuses: {sample!r}")
        self._generate = generate
        self._traceparent = _validate.flag("trust_traceparent", trust_traceparent)
        if query_param is None:
            self._query_key: bytes | None = None
        else:
            if (
                not isinstance(query_param, str)
                or not query_param
                or not query_param.isascii()
                or not query_param.replace("_", "").replace("-", "").replace(".", "").isalnum()
            ):
                raise ValueError(f"query_param must be a URL-safe name, got {query_param!r}")
            self._query_key = query_param.encode("ascii") + b"="
        self._echo = _validate.flag("echo", echo)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _HANDLED:
            await self.app(scope, receive, send)
            return
        name = self._header
        cid: str | None = None
        echoed = b""
        for key, value in scope["headers"]:
            if key == name:
                # The default rules inlined (a call costs as much as the check); ids are ASCII.
                if self._default:
                    if 0 < len(value) <= 128 and (
                        value.isalnum() or not value.translate(None, _ID_ALPHABET)
                    ):
                        echoed = value
                        cid = value.decode("ascii")
                else:
                    cid = self._valid_custom(value)
                    if cid is not None:
                        echoed = value
                break
        if cid is None:
            cid = self._recover(scope)
            echoed = cid.encode("latin-1")
        if not self._echo:
            token = CORRELATION_ID.set(cid)
            try:
                await self.app(scope, receive, send)
            finally:
                CORRELATION_ID.reset(token)
            return
        size = len(name)

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.accept":  # noqa: PLR1714
                current = _get_id()
                value = echoed if current is cid or current is None else _encoded(current, echoed)
                headers = message.get("headers", ())
                for key, _ in headers:
                    if len(key) == size and key.lower() == name:
                        message["headers"] = set_headers(headers, ((name, value),))
                        break
                else:
                    # A new list: an app may send the same header list with every response.
                    message["headers"] = [*headers, (name, value)]
            await send(message)

        token = CORRELATION_ID.set(cid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            CORRELATION_ID.reset(token)

    def _valid_custom(self, value: bytes) -> str | None:
        """The id as text when a custom validator accepts it (decoded once, as latin-1)."""
        if len(value) > self._max_length:
            return None
        text = value.decode("latin-1")
        return text if self._is_valid(text) else None

    def _recover(self, scope: Scope) -> str:
        """The id when the header brought none: query parameter, traceparent, or a new one."""
        key = self._query_key
        if key is not None:
            query = scope.get("query_string")
            if query:
                raw = _query_value(query, key)
                if raw is not None and len(raw) <= 3 * self._max_length:
                    if b"%" in raw:
                        raw = unquote_to_bytes(raw)
                    text = raw.decode("latin-1")
                    if self._is_valid(text):
                        return text
        if self._traceparent:
            found = None
            for header, value in scope["headers"]:
                if header == _TRACEPARENT:
                    if found is not None:  # more than one traceparent: trust neither
                        found = None
                        break
                    found = value
            if found is not None:
                trace_id = parse_traceparent(found)
                if trace_id is not None and self._is_valid(trace_id):
                    return trace_id
        return self._generate()

    def __repr__(self) -> str:
        return f"CorrelationIdMiddleware(app={self.app!r}, header={self._header.decode()!r})"
