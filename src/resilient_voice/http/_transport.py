"""ResilientTransport: any httpx-based client gains breaker, limiter, safe retries, correlation.

``httpx.AsyncClient(transport=ResilientTransport(policy))`` is the whole integration; official
SDKs that accept an httpx client (Vapi's) or an HTTP client class built on httpx (our Twilio
adapter) get the same protection.

How a result maps onto :class:`~resilient_voice.FailureKind` (the table is tested row by row):

=====================================================  =================
httpx exception or response                            kind
=====================================================  =================
``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``  NOT_SENT
``ProxyError``, ``LocalProtocolError``                 NOT_SENT
``UnsupportedProtocol``, ``TooManyRedirects``          PERMANENT
``ReadTimeout``, ``WriteTimeout``, ``ReadError``       MAYBE_PROCESSED
``WriteError``, ``CloseError``, ``RemoteProtocolError``  MAYBE_PROCESSED
``DecodingError``, any other ``TransportError``        MAYBE_PROCESSED
1xx, 2xx, 3xx                                          success
a status in the route's ``unprocessed_statuses``       UNPROCESSED
429 elsewhere, 408, 5xx                                MAYBE_PROCESSED
other 4xx                                              PERMANENT
=====================================================  =================

httpx's exceptions reach the client unchanged (the SDKs above the transport catch httpx types),
so the table is never written onto them: the transport hands it to :meth:`Policy.run` as its
``classify=`` function, and the retry policy and the breaker read the kind from there.

A write error is ``MAYBE_PROCESSED`` because part of the request may have been delivered and the
client cannot tell how much; only failures that provably happen before the first byte leaves
(connecting, waiting for a pooled connection) are ``NOT_SENT``. 429 is ``UNPROCESSED`` only where
the provider documents it (Twilio's REST API); elsewhere the safe assumption is that it may have
been processed.

The body of an answer is part of the attempt too:

=====================================================  =================
while reading the body                                 kind
=====================================================  =================
success answer to a non-idempotent request: cut off,   MAYBE_PROCESSED
stalled, undecodable, or over ``max_response_bytes``
success answer to an idempotent request: over          PERMANENT
``max_response_bytes``
error answer over ``max_response_bytes``               the status's kind
=====================================================  =================

A ``201 Created`` whose body never arrives means the call was created and the answer lost, so
the transport reads the whole body of a success answer to a non-idempotent request inside the
attempt, under the per-attempt timeout: a failure there reaches the breaker, the retry policy
and the caller as :class:`~resilient_voice.OutcomeUnknownError` with the attempt id, never as a
bare httpx error that invites a second create. Answers to idempotent requests stay streamed;
their body read is bounded by the same per-attempt timeout (``httpx.ReadTimeout`` when it runs
out): the deadline is checked as each chunk arrives, and httpx's read timeout for the body is
lowered to the time left, so a normal body costs one clock reading per chunk and no timer.

``max_response_bytes`` caps the decoded size of every body (10 MiB by default, see
:class:`ResilientTransport`). To measure decoded bytes the transport decodes ``gzip`` and
``deflate`` itself, with a bounded decompressor, and hands the body on without
``Content-Encoding``; other encodings are left to httpx and capped on their encoded size.

For the circuit breaker, 5xx answers and transport errors are failures; 429 is back-pressure,
not sickness, and never trips it; other 4xx are the caller's errors and are ignored.

Over 400 lines: the tables above are the transport's contract and stay next to the one method
that applies them; the body reading and ``Retry-After`` parsing live in ``_body`` and
``_retry_after``, the request body handed to the inner transport in ``_request_body``.

Listeners get bounded labels: ``host`` is the matched route's ``host``, or ``other`` (a route for
any host, or no route); ``status_class`` is ``1xx`` ... ``5xx``, a :class:`FailureKind` value
when no response came back, or ``cancelled``. Answers with HTTP 429 are also counted on their
own (``backpressure`` of :class:`~resilient_voice.events.RequestFinished`), retried ones
included: the provider asking to slow down is not the caller's mistake like other 4xx.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from resilient_voice import _validate
from resilient_voice._loops import current_loop, loop_closed
from resilient_voice._pickling import reduce_exception
from resilient_voice.correlation import (
    DEFAULT_CORRELATION_ID_VALIDATOR,
    get_correlation_id,
    new_attempt_id,
)
from resilient_voice.errors import OutcomeUnknownError, ProviderError
from resilient_voice.events import (
    Listener,
    RequestFinished,
    check_listener,
    check_listeners,
    dispatch,
)
from resilient_voice.failure import FailureKind, NotSentError, failure_kind_of
from resilient_voice.http._body import SUCCESS_OVERFLOW, ResponseTooLargeError, bounded, buffered
from resilient_voice.http._request_body import RequestBody
from resilient_voice.http._retry_after import retry_after_from_headers
from resilient_voice.policy import Policy

_METHOD = re.compile(r"[A-Za-z]{1,20}")

__all__ = [
    "ATTEMPT_ID_EXTENSION",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "IDEMPOTENT_EXTENSION",
    "IDEMPOTENT_METHODS",
    "LIMITER_KEY_EXTENSION",
    "ResilientTransport",
    "Route",
    "UpstreamStatusError",
    "classify_exception",
    "classify_status",
]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
"""Methods that RFC 9110 defines as idempotent: repeating them has no further effect."""

IDEMPOTENT_EXTENSION = "resilient_voice.idempotent"
"""``request.extensions`` key: set it to True to declare one request safe to repeat."""

ATTEMPT_ID_EXTENSION = "resilient_voice.attempt_id"
"""``request.extensions`` key: the operation's attempt id (shared by its retries).

A typed client that plants the id in the request body (for later reconciliation) sets it here
too, so an :class:`~resilient_voice.OutcomeUnknownError` carries the same id.
"""

LIMITER_KEY_EXTENSION = "resilient_voice.limiter_key"
"""``request.extensions`` key: the bucket key when the route's policy has a KeyedLimiter."""

DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024
"""The default cap on a decoded response body: 10 MiB.

Twilio's and Vapi's answers are JSON of a few KiB; the largest legitimate ones (a page of 1,000
Twilio calls, a Vapi call with a long transcript) stay around 1-2 MB. Ten MiB leaves room for
those several times over while a compressed bomb (200 KiB of gzip that decodes to 200 MB) is
refused before it fills memory. Downloads of media (recordings) need a transport of their own
with a larger cap, or ``max_response_bytes=None``.
"""

_NOT_SENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.LocalProtocolError,
)
_PERMANENT_ERRORS: tuple[type[Exception], ...] = (httpx.UnsupportedProtocol, httpx.TooManyRedirects)


def classify_exception(exc: BaseException) -> FailureKind:
    """Map an httpx exception onto a :class:`FailureKind` (see the module table)."""
    if isinstance(exc, _NOT_SENT_ERRORS):
        return FailureKind.NOT_SENT
    if isinstance(exc, _PERMANENT_ERRORS):
        return FailureKind.PERMANENT
    return FailureKind.MAYBE_PROCESSED


def _classify(exc: BaseException) -> FailureKind | None:
    """The transport's explicit classification, passed to :meth:`Policy.run` as ``classify``.

    httpx's exceptions travel unchanged (the SDKs above the transport catch httpx types), so
    their kind is stated here instead of on the instance: a transport error by the module's
    table, a decoding error (only raised while a body is read) as ``MAYBE_PROCESSED``.
    """
    if isinstance(exc, httpx.TransportError):
        return classify_exception(exc)
    if isinstance(exc, httpx.RequestError):
        return FailureKind.MAYBE_PROCESSED
    return None


def classify_status(status: int, unprocessed: frozenset[int] = frozenset()) -> FailureKind | None:
    """Map an HTTP status onto a :class:`FailureKind`; ``None`` means success."""
    if status < 400:
        return None
    if status in unprocessed:
        return FailureKind.UNPROCESSED
    if status >= 500 or status in (408, 429):
        return FailureKind.MAYBE_PROCESSED
    return FailureKind.PERMANENT


class UpstreamStatusError(ProviderError):
    """An error status seen by the transport; carries the (fully read) response.

    Raised between attempts so the retry policy can judge it. When the operation is not retried
    further, the transport returns ``response`` to the client unchanged, except for a
    non-idempotent request that may have been processed: then the client gets
    :class:`~resilient_voice.OutcomeUnknownError` chained to this error.
    """

    def __init__(self, response: httpx.Response, kind: FailureKind, retry_after: float | None):
        request = response.request
        super().__init__(
            response.status_code,
            None,
            f"{request.method} {request.url.host}{request.url.path} answered "
            f"{response.status_code} {response.reason_phrase}",
            kind,
            retry_after=retry_after,
        )
        self.response = response

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with a copy of ``response`` whose request keeps its method and URL only.

        The request's headers carry the credentials (``Authorization``), and a pickled error
        lands in task queues and their brokers; the response itself (status, headers, body
        if it was read) is kept. The URL loses any userinfo.
        """
        response = copy.copy(self.response)  # httpx's own pickling state: no stream
        request = self.response.request
        response.request = httpx.Request(request.method, request.url.copy_with(userinfo=b""))
        rebuild, args, state = reduce_exception(self)
        state["response"] = response
        return (rebuild, args, state)


@dataclass(frozen=True, slots=True)
class Route:
    """Settings for the requests that match a host, method and path pattern.

    Args:
        name: A short, bounded label used in metrics and logs (never the raw path).
        path: A regular expression matched (``fullmatch``) against the URL path, or ``None``
            for any path.
        methods: Upper-case methods this route applies to; empty for any.
        host: Exact host name, or ``None`` for any.
        policy: The policy for these requests; ``None`` uses the transport's default.
        unprocessed_statuses: Statuses the provider documents as "not processed" on this
            route (Twilio's 429), so that even non-idempotent requests retry them.
        honours_idempotency_key: Whether the upstream deduplicates requests that carry the
            transport's idempotency-key header on this route. Twilio's Calls/Messages and
            Vapi's ``POST /call`` do not: a key header there changes nothing.
        idempotent: Force the idempotency decision for this route (``None``: decide from the
            method, the key header and the request extension).
    """

    name: str
    path: str | None = None
    methods: frozenset[str] = frozenset()
    host: str | None = None
    policy: Policy | None = None
    unprocessed_statuses: frozenset[int] = frozenset()
    honours_idempotency_key: bool = False
    idempotent: bool | None = None
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate.label("name", self.name)
        _validate.optional_label("path", self.path)
        _validate.optional_label("host", self.host)
        methods: object = self.methods
        if isinstance(methods, str) or not isinstance(methods, Iterable):
            raise TypeError(f"methods must be a collection of method names, got {methods!r}")
        for method in methods:
            if not isinstance(method, str) or not _METHOD.fullmatch(method):
                raise ValueError(f"methods must be HTTP method names, got {method!r}")
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        if not isinstance(self.unprocessed_statuses, Iterable):
            raise TypeError(
                f"unprocessed_statuses must be a collection, got {self.unprocessed_statuses!r}"
            )
        object.__setattr__(self, "unprocessed_statuses", frozenset(self.unprocessed_statuses))
        for status in self.unprocessed_statuses:
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise ValueError(
                    f"unprocessed_statuses must hold HTTP error statuses, got {status!r}"
                )
        if self.policy is not None and not isinstance(self.policy, Policy):
            raise TypeError(f"policy must be a Policy or None, got {self.policy!r}")
        _validate.flag("honours_idempotency_key", self.honours_idempotency_key)
        if self.idempotent is not None:
            _validate.flag("idempotent", self.idempotent)
        if self.path is not None:
            try:
                object.__setattr__(self, "_pattern", re.compile(self.path))
            except re.error as exc:
                raise ValueError(f"route {self.name!r}: invalid path pattern: {exc}") from exc

    def matches(self, method: str, host: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.host is not None and host != self.host:
            return False
        return self._pattern is None or self._pattern.fullmatch(path) is not None


class ResilientTransport(httpx.AsyncBaseTransport):
    """An httpx transport that applies a :class:`Policy` to every request.

    Args:
        policy: The default policy for requests no route claims.
        transport: The transport that really sends (default ``httpx.AsyncHTTPTransport()``).
        routes: Per (host, method, path) settings, first match wins.
        name: A label for listeners and metrics.
        idempotency_key_header: The header that makes a request idempotent on routes that
            honour it.
        correlation_header: Header set from the current correlation id when absent; ``None``
            to disable.
        listeners: Callables taking an event record; the transport's record is
            :class:`~resilient_voice.events.RequestFinished`, one per logical request.
        max_response_bytes: The most bytes a decoded response body may hold
            (:data:`DEFAULT_MAX_RESPONSE_BYTES`, 10 MiB); ``None`` for no cap. A larger body
            raises :class:`ResponseTooLargeError` (see the module's table for its kind).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        routes: Iterable[Route] = (),
        name: str = "http",
        idempotency_key_header: str = "Idempotency-Key",
        correlation_header: str | None = "X-Correlation-ID",
        listeners: Iterable[Listener] = (),
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, got {type(policy).__name__}")
        self._policy = policy
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(f"transport must be an httpx.AsyncBaseTransport, got {transport!r}")
        _validate.label("name", name)
        _validate.header("idempotency_key_header", idempotency_key_header)
        _validate.optional_header("correlation_header", correlation_header)
        if isinstance(routes, Route | str) or not isinstance(routes, Iterable):
            raise TypeError(f"routes must be a collection of Route, got {routes!r}")
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._routes: tuple[Route, ...] = tuple(routes)
        for route in self._routes:
            if not isinstance(route, Route):
                raise TypeError(f"routes must be Route instances, got {type(route).__name__}")
        self._default_route = Route(name="default")
        # The event loop this transport's connections belong to (see _check_loop).
        self._loop: object = None
        self._name = name
        self._key_header = idempotency_key_header.lower()
        self._correlation_header = correlation_header
        self._listeners: tuple[Listener, ...] = check_listeners(listeners)
        if max_response_bytes is not None and (
            isinstance(max_response_bytes, bool)
            or not isinstance(max_response_bytes, int)
            or max_response_bytes < 1
        ):
            raise ValueError(
                f"max_response_bytes must be None or an int >= 1, got {max_response_bytes!r}"
            )
        self._max_bytes = max_response_bytes

    @property
    def max_response_bytes(self) -> int | None:
        """The cap on a decoded response body, in bytes (``None``: no cap)."""
        return self._max_bytes

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def routes(self) -> Sequence[Route]:
        return self._routes

    def add_listener(self, listener: Listener) -> None:
        """Attach a callable taking an event record.

        Raises:
            TypeError: ``listener`` is not callable.
        """
        self._listeners = (*self._listeners, check_listener(listener))

    def route_for(self, request: httpx.Request) -> Route:
        """The first route matching ``request``, or the default route."""
        routes = self._routes
        if routes:
            url = request.url
            method, host, path = request.method, url.host, url.path  # httpx decodes per read
            for route in routes:
                if route.matches(method, host, path):
                    return route
        return self._default_route

    def _is_idempotent(self, request: httpx.Request, route: Route) -> bool:
        flag = request.extensions.get(IDEMPOTENT_EXTENSION)
        if isinstance(flag, bool):
            return flag
        if route.idempotent is not None:
            return route.idempotent
        if request.method in IDEMPOTENT_METHODS:
            return True
        return route.honours_idempotency_key and self._key_header in request.headers

    def _check_loop(self) -> None:
        """Refuse, before anything is sent, a request on a loop other than a closed one's.

        Pooled connections belong to the event loop that opened them. Once that loop has closed,
        a request handed to them can still be written to the socket before the closed loop is
        noticed (``RuntimeError: Event loop is closed``), so the request may have reached the
        upstream though the caller sees an error: it is refused here instead, as ``NOT_SENT``.
        """
        loop = current_loop()
        if loop is self._loop:
            return
        if self._loop is not None and loop_closed(self._loop):
            raise NotSentError(
                f"transport {self._name!r}: this client belongs to an event loop that has "
                "closed; build one per loop"
            )
        self._loop = loop

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._check_loop()
        route = self.route_for(request)
        policy = route.policy if route.policy is not None else self._policy
        idempotent = self._is_idempotent(request, route)
        header = self._correlation_header
        if header is not None:
            # The context variable first: it is cheaper than httpx's header lookup.
            cid = get_correlation_id()
            if cid is not None and header not in request.headers:
                request.headers[header] = cid
        stream = request.stream
        if not isinstance(stream, RequestBody):
            # In memory, so a retry can send it again; and iterated without an async
            # generator, so a send cut off mid-way leaves nothing to finalize (_request_body).
            if isinstance(stream, httpx.ByteStream):
                body = b"".join(stream)
            else:
                body = await request.aread()
            request.stream = RequestBody(body)
        unprocessed = route.unprocessed_statuses
        inner = self._transport
        limit = self._max_bytes
        timeout = policy.timeout
        clock = policy.clock
        attempts = 0
        # Answers with HTTP 429 (Twilio's 20429, Vapi's rate limit): counted apart from other
        # 4xx for the listeners; ``last_429`` says whether the latest answer was one.
        pushed = 0
        last_429 = False

        async def attempt() -> httpx.Response:
            nonlocal attempts, pushed, last_429
            attempts += 1
            last_429 = False
            # The attempt's own deadline: the policy's timeout scope ends with this function,
            # so a body streamed to the caller later must carry the bound with it.
            deadline = clock.now() + timeout if timeout is not None else None
            response = await inner.handle_async_request(request)
            status = response.status_code
            kind = classify_status(status, unprocessed)
            if kind is None:
                if response.is_stream_consumed:
                    # An inner transport that already read (and decoded) it: in memory.
                    if limit is not None and len(response.content) > limit:
                        raise ResponseTooLargeError(status, limit, SUCCESS_OVERFLOW[idempotent])
                    return response
                if idempotent:
                    return bounded(response, request, limit, clock, deadline, timeout)
                # A non-idempotent success: read it here, inside the attempt and its timeout,
                # so that a body that never arrives is this attempt's failure (an unknown
                # outcome), not a bare httpx error after the transport returned. Its httpx
                # errors (cut off, stalled, undecodable) are MAYBE_PROCESSED by _classify.
                return await buffered(response, request, limit, FailureKind.MAYBE_PROCESSED)
            if status == 429:
                pushed += 1
                last_429 = True
            if response.is_stream_consumed:
                failed = response  # an inner transport that already read (and decoded) it
                failed.request = request
            else:
                failed = await buffered(response, request, limit, kind)
            raise UpstreamStatusError(failed, kind, retry_after_from_headers(failed.headers))

        listeners = self._listeners
        started = time.perf_counter() if listeners else 0.0
        status_class = "error"
        attempt_id = request.extensions.get(ATTEMPT_ID_EXTENSION)
        if attempt_id is not None and not (
            isinstance(attempt_id, str) and DEFAULT_CORRELATION_ID_VALIDATOR.is_valid(attempt_id)
        ):
            raise ValueError(
                f"request.extensions[{ATTEMPT_ID_EXTENSION!r}] must be 1..128 characters of "
                "[A-Za-z0-9._:-]"
            )
        try:
            response = await policy.run(
                attempt,
                idempotent=idempotent,
                attempt_id=attempt_id,
                key=request.extensions.get(LIMITER_KEY_EXTENSION),
                classify=_classify,
            )
        except UpstreamStatusError as exc:
            status_class = f"{exc.status // 100}xx"
            if idempotent or exc.kind is not FailureKind.MAYBE_PROCESSED:
                # Not retried further and safe to hand back: the client sees the real answer.
                return exc.response
            # Only reachable without a retry policy (which raises this itself): a 5xx to a
            # non-idempotent request must not reach an SDK that would re-send it.
            raise OutcomeUnknownError(attempt_id or new_attempt_id(), attempts=attempts) from exc
        except Exception as exc:
            kind = failure_kind_of(exc, _classify)
            if kind is None:
                # Unclassified: nothing was sent if no attempt started, else it may have been
                # processed (as the retry policy assumes). Never the class name: labels stay
                # bounded.
                kind = FailureKind.MAYBE_PROCESSED if attempts else FailureKind.NOT_SENT
            status_class = kind.value
            # attempts == 0: refused before anything reached the inner transport.
            if (
                attempts
                and not idempotent
                and kind is FailureKind.MAYBE_PROCESSED
                and not isinstance(exc, OutcomeUnknownError)
            ):
                raise OutcomeUnknownError(
                    attempt_id or new_attempt_id(), attempts=attempts
                ) from exc
            raise
        except BaseException:
            status_class = "cancelled"
            raise
        else:
            if listeners:  # a label for the record below; nothing is built without listeners
                status_class = f"{response.status_code // 100}xx"
            return response
        finally:
            if listeners:
                dispatch(
                    listeners,
                    RequestFinished(
                        self._name,
                        route.host if route.host is not None else "other",
                        request.method,
                        route.name,
                        status_class,
                        time.perf_counter() - started,
                        attempts,
                        pushed,
                        last_429,
                    ),
                )

    async def aclose(self) -> None:
        await self._transport.aclose()

    def __repr__(self) -> str:
        return f"ResilientTransport(name={self._name!r}, routes={len(self._routes)})"
