"""The default policies of the Vapi client and the transport routes that apply them.

Shared by :class:`~resilient_voice.vapi.VapiClient` and the official-SDK recipe, so that both
treat ``POST /call`` the same way: never idempotent, no idempotency key honoured, and a 429 on
it ``MAYBE_PROCESSED`` unless the caller accepts the risk (Vapi does not document that a 429
there was not acted on).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, cast

from resilient_voice import _provider as provider
from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice.breaker import BreakerStore, CircuitBreaker
from resilient_voice.http import Route
from resilient_voice.limiter import BucketStore, TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy

__all__ = ["OPERATIONS", "default_policies", "resolve_policies", "vapi_routes"]

OPERATIONS: Final = ("create_call", "read", "update_assistant")
"""The operation names ``policies=`` accepts."""


def default_policies(
    *,
    breaker: CircuitBreaker | None = None,
    clock: Clock | None = None,
    calls_per_second: float | None = None,
    store: BucketStore | None = None,
    name: str = "vapi",
) -> dict[str, Policy]:
    """Build the documented default policy of each operation, sharing one breaker.

    - ``create_call``: the breaker and a :class:`RetryPolicy` of 3 attempts (0.5 s base
      delay, 10 s cap, 30 s in total), non-idempotent: only failures that provably sent
      nothing are retried; anything that may have placed the call raises
      :class:`~resilient_voice.OutcomeUnknownError`. No rate limiter: Vapi does not publish its
      API rate limit; add a ``TokenBucket`` through ``policies=`` when you know yours.
    - ``read`` (every GET): the breaker and 4 attempts (0.2 s base, 10 s cap, 30 s in total),
      idempotent; 429 and 5xx are retried, honouring ``Retry-After`` / ``retry-after-ms``.
    - ``update_assistant`` (PATCH): the breaker and 3 attempts (0.5 s base, 10 s cap, 30 s in
      total), idempotent: a PATCH sets fields to the values in its body, so sending the same
      body twice leaves the assistant as sending it once would.

    Args:
        breaker: The breaker to share; a new ``CircuitBreaker("vapi")`` (5 consecutive
            failures open it for 30 s) when omitted.
        clock: The clock of the breaker and retry policies built here.
        calls_per_second: Pace ``create_call`` with a ``TokenBucket`` named
            ``<name>:calls`` (burst 1); ``None`` (default) paces nothing.
        store: A shared :class:`~resilient_voice.limiter.BucketStore` for that bucket, so
            that every replica paces the org together. A ``RedisBackend`` (also a
            :class:`~resilient_voice.breaker.BreakerStore`) shares the default breaker too:
            it is then named ``name``, judges a 30 s window (``minimum_calls=10``) and joins
            the fleet view.
        name: The prefix of the bucket's name (``VapiClient`` passes ``vapi:<key digest>``).

    Returns:
        A new dict ``{"create_call": ..., "read": ..., "update_assistant": ...}``.
    """
    _validate.label("name", name)
    _validate.optional_number("calls_per_second", calls_per_second)
    shares_breaker = isinstance(store, BreakerStore)
    if breaker is None:
        if shares_breaker:
            # A fleet member, named per org (the fleet view is keyed by the breaker's name),
            # on a 30 s window so that the fleet's combined rate has windows to add up.
            breaker = CircuitBreaker(
                name,
                window_duration=30.0,
                minimum_calls=10,
                recovery_timeout=30.0,
                clock=clock,
                store=cast("BreakerStore", store),
            )
        else:
            breaker = CircuitBreaker(
                "vapi", failure_threshold=5, recovery_timeout=30.0, clock=clock
            )
    calls = None
    if calls_per_second is not None:
        calls = TokenBucket(calls_per_second, 1, clock=clock, name=f"{name}:calls", store=store)
    elif store is not None and not shares_breaker:
        raise ValueError("store= shares the create_call pacing: give calls_per_second= too")
    return {
        "create_call": Policy(
            limiter=calls,
            breaker=breaker,
            retry=RetryPolicy(
                max_attempts=3,
                base_delay=0.5,
                max_delay=10.0,
                total_timeout=30.0,
                clock=clock,
                name="vapi.create_call",
            ),
            clock=clock,
        ),
        "read": Policy(
            breaker=breaker,
            retry=RetryPolicy(
                max_attempts=4,
                base_delay=0.2,
                max_delay=10.0,
                total_timeout=30.0,
                clock=clock,
                name="vapi.read",
            ),
            idempotent=True,
            clock=clock,
        ),
        "update_assistant": Policy(
            breaker=breaker,
            retry=RetryPolicy(
                max_attempts=3,
                base_delay=0.5,
                max_delay=10.0,
                total_timeout=30.0,
                clock=clock,
                name="vapi.update_assistant",
            ),
            idempotent=True,
            clock=clock,
        ),
    }


def resolve_policies(
    policy: Policy | None,
    policies: Mapping[str, Policy] | None,
    clock: Clock | None,
    *,
    calls_per_second: float | None = None,
    store: BucketStore | None = None,
    name: str = "vapi",
) -> dict[str, Policy]:
    """Apply ``policy=`` (replaces all) and ``policies=`` (one by one, after it) to the defaults.

    Raises:
        TypeError: A value is not a :class:`Policy`.
        ValueError: An unknown operation name.
    """
    if policy is not None and (calls_per_second is not None or store is not None):
        raise ValueError(
            "calls_per_second= and store= configure the default policies; with policy= they "
            "would be ignored"
        )
    return provider.resolve_policies(
        policy,
        policies,
        lambda: default_policies(
            clock=clock, calls_per_second=calls_per_second, store=store, name=name
        ),
        OPERATIONS,
        layered=True,
    )


def vapi_routes(
    host: str,
    prefix: str,
    policies: Mapping[str, Policy],
    *,
    unprocessed_429: bool = False,
) -> list[Route]:
    """The transport routes for one Vapi host.

    Args:
        host: The API host (``api.vapi.ai``).
        prefix: A path prefix before Vapi's paths (``""`` normally).
        policies: One policy per name in :data:`OPERATIONS`.
        unprocessed_429: Treat a 429 on ``POST /call`` as not processed, so it is retried.
            Vapi does not document this; enable it only if you accept a possible duplicate.
    """
    base = re.escape(prefix)
    read = policies["read"]
    get = frozenset({"GET"})
    return [
        Route(
            name="vapi.calls.create",
            path=f"{base}/call/?",
            methods=frozenset({"POST"}),
            host=host,
            policy=policies["create_call"],
            unprocessed_statuses=frozenset({429}) if unprocessed_429 else frozenset(),
            honours_idempotency_key=False,
            idempotent=False,
        ),
        Route(
            name="vapi.assistants.update",
            path=f"{base}/assistant/[^/]+",
            methods=frozenset({"PATCH"}),
            host=host,
            policy=policies["update_assistant"],
            idempotent=True,
        ),
        Route(name="vapi.calls.list", path=f"{base}/call/?", methods=get, host=host, policy=read),
        Route(
            name="vapi.calls.get", path=f"{base}/call/[^/]+", methods=get, host=host, policy=read
        ),
        Route(
            name="vapi.assistants.list",
            path=f"{base}/assistant/?",
            methods=get,
            host=host,
            policy=read,
        ),
        Route(
            name="vapi.assistants.get",
            path=f"{base}/assistant/[^/]+",
            methods=get,
            host=host,
            policy=read,
        ),
        Route(
            name="vapi.phone_numbers.list",
            path=f"{base}/phone-number/?",
            methods=get,
            host=host,
            policy=read,
        ),
    ]
