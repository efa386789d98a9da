"""ResilientTwilioHttpClient: the official ``twilio`` SDK, sent through our policies.

The SDK's own async client (aiohttp) ignores its timeout and, with ``max_retries``, re-sends
POSTs on every 5xx: a create-call that Twilio processed but answered 500 rings the customer
twice. This adapter implements the SDK's ``twilio.http.AsyncHttpClient`` interface on httpx and
a :class:`~resilient_voice.http.ResilientTransport` configured like
:class:`~resilient_voice.twilio.TwilioClient`: the same policy per operation, the same routes,
no retries of its own::

    from twilio.rest import Client
    from resilient_voice.twilio import ResilientTwilioHttpClient

    http_client = ResilientTwilioHttpClient(calls_per_second=5)
    client = Client(account_sid, auth_token, http_client=http_client)
    call = await client.calls.create_async(to=..., from_=..., url=...)
    await http_client.close()

Needs the ``twilio`` extra: ``pip install 'resilient-voice[twilio]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice._provider import build_transport, check_base_url, check_timeout
from resilient_voice._urls import check_request_security
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.events import Listener
from resilient_voice.http import LIMITER_KEY_EXTENSION, ResilientTransport
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy
from resilient_voice.twilio._policies import (
    resolve_policies,
    twilio_routes,
)

try:
    from twilio.http import AsyncHttpClient
    from twilio.http.request import Request as TwilioRequest
    from twilio.http.response import Response as TwilioResponse
except ImportError as exc:  # pragma: no cover  # the test environment has the extra
    raise ImportError(
        "ResilientTwilioHttpClient needs the twilio package: pip install 'resilient-voice[twilio]'"
    ) from exc

__all__ = ["ResilientTwilioHttpClient"]

_logger = logging.getLogger("resilient_voice.twilio.sdk")


class ResilientTwilioHttpClient(AsyncHttpClient):  # type: ignore[misc]  # twilio is untyped
    """A ``twilio.http.AsyncHttpClient`` on httpx, with a policy per Twilio operation.

    Pass it as ``http_client=`` to ``twilio.rest.Client`` and use the SDK's ``*_async``
    methods. It never retries by itself: the policies decide, and a create that may have been
    processed raises :class:`~resilient_voice.OutcomeUnknownError` out of ``create_async``
    instead of being re-sent.

    Args:
        policy: One policy for every request (replaces all the defaults).
        policies: Policies by operation (``create_call``, ``send_message``, ``read``,
            ``update_call``); requests to other Twilio products use ``read``'s.
        base_url: Send every request to this scheme and host instead of the one the SDK
            built (``api.twilio.com``, ``api.{edge}.{region}.twilio.com``): for a proxy, or
            FakeTelephony in tests. The path and query are kept.
        transport: The httpx transport that really sends (default
            ``httpx.AsyncHTTPTransport()``).
        calls_per_second: As for :func:`~resilient_voice.twilio.default_policies`.
        messages_per_second: As for :func:`~resilient_voice.twilio.default_policies`.
        breaker: As for :func:`~resilient_voice.twilio.default_policies`.
        retry: As for :func:`~resilient_voice.twilio.default_policies`.
        clock: As for :func:`~resilient_voice.twilio.default_policies`.
        timeout: Seconds for each attempt; a ``timeout`` passed by the SDK per request wins
            for httpx.
        account_label: Names the default breaker and limiters (``twilio:<label>``); the
            adapter does not know the account until the first request.
        name: Label of the transport in listener events and metrics.
        listeners: Callables taking an event record
            (:class:`~resilient_voice.events.RequestFinished`).
        logger: Where the SDK's request log goes (``Authorization`` is never logged).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        policies: Mapping[str, Policy] | None = None,
        base_url: str | None = None,
        allow_insecure_http: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        calls_per_second: float = 1.0,
        messages_per_second: float = 1.0,
        breaker: CircuitBreaker | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        clock: Clock | None = None,
        account_label: str = "sdk",
        name: str = "twilio-sdk",
        listeners: Iterable[Listener] = (),
        logger: logging.Logger = _logger,
    ) -> None:
        # Checked here: the SDK's own check raises ValueError(timeout), naming nothing.
        timeout = check_timeout(timeout)
        _validate.label("account_label", account_label)
        _validate.number("calls_per_second", calls_per_second)
        _validate.number("messages_per_second", messages_per_second)
        if not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger, got {logger!r}")
        super().__init__(logger, True, timeout)
        if base_url is not None:
            parts = check_base_url(
                base_url,
                allow_insecure_http=allow_insecure_http,
                credentials="the SDK passes them to request()",
            )
            self._origin: tuple[str, str] | None = (parts.scheme, parts.netloc)
        else:
            if not isinstance(allow_insecure_http, bool):
                raise TypeError("allow_insecure_http must be a bool")
            self._origin = None
        self._allow_insecure_http = allow_insecure_http
        self._policies = resolve_policies(
            policy,
            policies,
            account_label,
            calls_per_second=calls_per_second,
            messages_per_second=messages_per_second,
            timeout=timeout,
            breaker=breaker,
            retry=retry,
            clock=clock,
        )
        self._transport = build_transport(
            self._policies,
            twilio_routes(self._policies),
            transport=transport,
            name=name,
            listeners=listeners,
        )
        self._http = httpx.AsyncClient(
            transport=self._transport, timeout=httpx.Timeout(timeout), follow_redirects=False
        )

    @property
    def policies(self) -> Mapping[str, Policy]:
        """The policy of each operation."""
        return dict(self._policies)

    @property
    def transport(self) -> ResilientTransport:
        """The transport: attach listeners here."""
        return self._transport

    @property
    def last_request(self) -> Any:
        """The last request, as a ``twilio.http.request.Request`` (password redacted)."""
        return self._test_only_last_request

    @property
    def last_response(self) -> Any:
        """The last response, as a ``twilio.http.response.Response``."""
        return self._test_only_last_response

    def __repr__(self) -> str:
        origin = (
            "" if self._origin is None else f", base_url='{self._origin[0]}://{self._origin[1]}'"
        )
        return f"ResilientTwilioHttpClient(operations={sorted(self._policies)}{origin})"

    async def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  # the SDK's interface
        allow_redirects: bool = False,
    ) -> Any:
        """Send one SDK request through the policies; returns ``twilio.http.response.Response``.

        Raises:
            ValueError: The SDK's URL is plain ``http://`` to a non-loopback host and the
                adapter was built without ``allow_insecure_http=True``; nothing was sent.
            OutcomeUnknownError: A create that may have been processed; never re-sent.
            CircuitOpenError, RateLimitedError: Refused locally; nothing was sent.
            httpx.HTTPError: A transport failure that was not retried further.
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(timeout)
        method = method.upper()
        url = self._rewrite(uri)
        if self._origin is None and not self._allow_insecure_http:
            # The SDK built the URL (its own base_url), so only the request can be checked.
            parts = urlsplit(url)
            check_request_security(parts.scheme, parts.hostname or "", url)
        self.log_request({"method": method, "url": url, "params": params, "headers": headers or {}})
        self._test_only_last_response = None
        self._test_only_last_request = TwilioRequest(
            method=method,
            url=url,
            auth=None if auth is None else (auth[0], "<redacted>"),
            params=params,
            data=data,
            # Credentials stay out of what the adapter keeps (a credential provider's bearer).
            headers=None
            if headers is None
            else {k: v for k, v in headers.items() if k.lower() != "authorization"},
        )
        is_json = any(
            k.lower() == "content-type" and "json" in v.lower() for k, v in (headers or {}).items()
        )
        request = self._http.build_request(
            method,
            url,
            params=params,  # type: ignore[arg-type]
            data=None if is_json else data,
            json=data if is_json else None,
            headers=headers,
            timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        key = _sender(data) if method == "POST" else None
        if key is not None:
            request.extensions[LIMITER_KEY_EXTENSION] = key
        response = await self._http.send(
            request,
            auth=httpx.BasicAuth(*auth) if auth is not None else httpx.USE_CLIENT_DEFAULT,
            follow_redirects=allow_redirects,
        )
        self.log_response(response.status_code, response)
        result = TwilioResponse(response.status_code, response.text, dict(response.headers))
        self._test_only_last_response = result
        return result

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _rewrite(self, uri: str) -> str:
        if self._origin is None:
            return uri
        parts = urlsplit(uri)
        return urlunsplit((*self._origin, parts.path, parts.query, parts.fragment))


def _sender(data: Mapping[str, object] | None) -> str | None:
    """The pacing key of a message: its ``From``, else its Messaging Service."""
    if not data:
        return None
    value = data.get("From") or data.get("MessagingServiceSid")
    return value if isinstance(value, str) else None
