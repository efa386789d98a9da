"""The official Vapi SDK (``vapi-server-sdk``) made resilient: a recipe, not a wrapper.

``AsyncVapi(token=..., httpx_client=...)`` accepts an httpx client, so handing it one whose
transport is a :class:`~resilient_voice.http.ResilientTransport` gives every SDK method the
breaker, the limiter, the safe retries and the correlation header::

    from vapi import AsyncVapi
    from resilient_voice.vapi import no_sdk_retries, sdk_http_client

    vapi = AsyncVapi(token=api_key, httpx_client=sdk_http_client())
    call = await vapi.calls.create(
        assistant_id=..., phone_number_id=..., customer={"number": "+14155550100"},
        request_options=no_sdk_retries(),
    )

The SDK also retries by itself: 408, 409, 429, every 5xx, ``ConnectError`` and
``RemoteProtocolError``, on every method, ``POST /call`` included, twice by default, and its
constructor cannot turn that off. A re-sent ``POST /call`` can ring a customer twice, so pass
``request_options=no_sdk_retries()`` on every call and let the transport, which knows what is
safe, decide. (The SDK's retry sleeps also call ``asyncio.sleep``, which fails under trio.)

This module does not import the SDK.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

import httpx

from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice._provider import build_transport, check_timeout
from resilient_voice._urls import check_request_security
from resilient_voice.correlation import get_correlation_id, new_attempt_id
from resilient_voice.events import Listener
from resilient_voice.policy import Policy
from resilient_voice.vapi._client import DEFAULT_BASE_URL, _check_base_url
from resilient_voice.vapi._policies import resolve_policies, vapi_routes
from resilient_voice.vapi._validation import check_id, plant_metadata

__all__ = ["SdkRequestOptions", "attempt_overrides", "no_sdk_retries", "sdk_http_client"]


class SdkRequestOptions(TypedDict, total=False):
    """The SDK's ``RequestOptions`` (``vapi.core.request_options``), mirrored key for key."""

    timeout_in_seconds: int
    max_retries: int
    additional_headers: typing.Dict[str, typing.Any]  # noqa: UP006  (as the SDK spells it)
    additional_query_parameters: typing.Dict[str, typing.Any]  # noqa: UP006
    additional_body_parameters: typing.Dict[str, typing.Any]  # noqa: UP006
    chunk_size: int


def no_sdk_retries(
    *,
    timeout_in_seconds: int | None = None,
    additional_headers: Mapping[str, Any] | None = None,
) -> SdkRequestOptions:
    """Return ``request_options`` that switch the SDK's own retries off (``max_retries=0``).

    Pass the result on every SDK call: ``await vapi.calls.create(..., request_options=
    no_sdk_retries())``. A new dict is returned each time, so changing it is harmless.

    Args:
        timeout_in_seconds: The SDK's per-request timeout (it overrides the httpx client's).
        additional_headers: Extra headers for this request.
    """
    options: SdkRequestOptions = {"max_retries": 0}
    if timeout_in_seconds is not None:
        options["timeout_in_seconds"] = _validate.whole("timeout_in_seconds", timeout_in_seconds)
    if additional_headers is not None:
        if not isinstance(additional_headers, Mapping):
            raise TypeError(f"additional_headers must be a mapping, got {additional_headers!r}")
        for header, value in additional_headers.items():
            _validate.header("additional_headers", header)
            if not isinstance(value, str) or not value.isprintable():
                raise ValueError(f"additional_headers[{header!r}] must be a printable str")
        options["additional_headers"] = dict(additional_headers)
    return options


def sdk_http_client(
    *,
    policy: Policy | None = None,
    policies: Mapping[str, Policy] | None = None,
    base_url: str = DEFAULT_BASE_URL,
    allow_insecure_http: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout: float = 10.0,
    unprocessed_429: bool = False,
    clock: Clock | None = None,
    name: str = "vapi-sdk",
    listeners: Iterable[Listener] = (),
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for ``AsyncVapi(httpx_client=...)`` with Vapi's routes.

    Its :class:`~resilient_voice.http.ResilientTransport` applies the same per-operation
    policies as :class:`~resilient_voice.vapi.VapiClient` (``policy=``/``policies=`` work the
    same way; every other request, such as ``POST /assistant``, gets the ``read`` policy and is
    retried only if its method is idempotent). A ``POST /call`` that may have been processed
    raises :class:`~resilient_voice.OutcomeUnknownError` out of the SDK call, unwrapped.

    Give the SDK the same ``base_url``. Plain ``http://`` is refused for a non-loopback host
    unless ``allow_insecure_http=True`` (the SDK's key would cross the network unencrypted):
    here at once, and in every request, since the SDK's own ``base_url`` decides where they go
    (a request to such a URL raises ``ValueError`` and nothing is sent).
    Close the client yourself (``await client.aclose()``); the SDK does not.

    Raises:
        TypeError, ValueError: Invalid configuration.
    """
    _, host, prefix = _check_base_url(base_url, allow_insecure_http)
    seconds = check_timeout(timeout)
    _validate.flag("unprocessed_429", unprocessed_429)
    resolved = resolve_policies(policy, policies, clock)
    resilient = build_transport(
        resolved,
        vapi_routes(host, prefix, resolved, unprocessed_429=unprocessed_429),
        transport=transport,
        name=name,
        listeners=listeners,
    )
    hooks = {} if allow_insecure_http else {"request": [_refuse_plaintext]}
    return httpx.AsyncClient(transport=resilient, timeout=httpx.Timeout(seconds), event_hooks=hooks)


async def _refuse_plaintext(request: httpx.Request) -> None:
    """The SDK's own ``base_url`` decides where requests go; refuse it if it is plaintext."""
    check_request_security(request.url.scheme, request.url.host, str(request.url))


def attempt_overrides(
    assistant_overrides: Mapping[str, Any] | None = None,
    *,
    attempt_id: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Plant an attempt id and the current correlation id in ``assistantOverrides.metadata``.

    For SDK users: the SDK builds its own body, so pass the returned overrides to
    ``calls.create(assistant_overrides=...)`` and keep the attempt id; after an
    :class:`~resilient_voice.OutcomeUnknownError`, ``VapiClient.reconcile_call(attempt_id)``
    finds the call. (The error's own ``attempt_id`` is the transport's, not this one.)

    Returns:
        ``(attempt_id, overrides)``; ``attempt_id`` is generated when omitted. The input is
        not mutated and its other metadata keys are kept.
    """
    attempt = new_attempt_id() if attempt_id is None else check_id("attempt_id", attempt_id)
    return attempt, plant_metadata(assistant_overrides, attempt, get_correlation_id())
