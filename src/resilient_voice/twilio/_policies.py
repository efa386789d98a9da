"""The default policy of every Twilio operation, and the transport routes that apply them.

One policy per operation, built once per client. They share one circuit breaker per account
(an outage of ``api.twilio.com`` is one outage, whatever the operation) and one retry policy;
``create_call`` is paced at the account's calls per second, ``send_message`` per sender.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from resilient_voice import _provider as provider
from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice.breaker import BreakerStore, CircuitBreaker
from resilient_voice.http import Route
from resilient_voice.limiter import BucketStore, KeyedLimiter, TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy

__all__ = ["OPERATIONS", "default_policies", "resolve_policies", "twilio_routes"]


OPERATIONS = ("create_call", "send_message", "read", "update_call")
"""The keys of ``policies=``: one policy per kind of Twilio request."""

_ACCOUNT_PATH = r"/2010-04-01/Accounts/[^/]+"
# Twilio documents 429 (20429) as "never processed, always safe to retry", for every request of
# the account; no Twilio REST endpoint honours an idempotency key.
_UNPROCESSED = frozenset({429})


def _no_key(*args: Any, **kwargs: Any) -> Hashable:
    raise TypeError(
        "the send_message policy is keyed by sender: TwilioClient passes the key itself; "
        "call it through the client, not as a decorator"
    )


def default_policies(
    account: str,
    *,
    calls_per_second: float = 1.0,
    messages_per_second: float = 1.0,
    timeout: float | None = 10.0,
    breaker: CircuitBreaker | None = None,
    retry: RetryPolicy | None = None,
    clock: Clock | None = None,
    store: BucketStore | None = None,
) -> dict[str, Policy]:
    """Build the default policy of every operation (see the table in ``docs/twilio.md``).

    Args:
        account: Names the shared breaker (``twilio:<account>``) and the limiters.
        calls_per_second: Pace of ``create_call`` (Twilio's default CPS is 1).
        messages_per_second: Pace of ``send_message`` per sender (``From`` or
            ``MessagingServiceSid``).
        timeout: Seconds allowed for each attempt.
        breaker: The breaker shared by every operation; ``CircuitBreaker("twilio:<account>")``
            (3 consecutive failures, 30 s open) when omitted. With a ``store=`` that is also a
            :class:`~resilient_voice.breaker.BreakerStore` (a ``RedisBackend``) the default
            breaker joins the fleet view there, and judges a 30 s window (``minimum_calls=10``,
            failure rate 0.5) so that the fleet's combined rate has windows to add up.
        retry: The retry policy shared by every operation; 3 attempts when omitted.
        clock: The clock of everything built here.
        store: A shared :class:`~resilient_voice.limiter.BucketStore` (a ``RedisBackend``) for
            the limiters, so that every replica paces the account together; their names
            (``twilio:<account>:calls``, ``twilio:<account>:messages``) are their keys there.
            A ``RedisBackend`` also shares the default breaker (see ``breaker``).

    Returns:
        A dict with the keys of :data:`OPERATIONS`.
    """
    _validate.label("account", account)
    _validate.number("calls_per_second", calls_per_second)
    _validate.number("messages_per_second", messages_per_second)
    name = f"twilio:{account}"
    shared_breaker = breaker if breaker is not None else _default_breaker(name, clock, store)
    shared_retry = (
        retry if retry is not None else RetryPolicy(max_attempts=3, clock=clock, name=name)
    )
    calls = TokenBucket(calls_per_second, 1, clock=clock, name=f"{name}:calls", store=store)
    senders = KeyedLimiter(
        messages_per_second, 1, clock=clock, name=f"{name}:messages", store=store
    )
    common: dict[str, Any] = {
        "breaker": shared_breaker,
        "retry": shared_retry,
        "timeout": timeout,
        "clock": clock,
    }
    return {
        "create_call": Policy(limiter=calls, **common),
        "send_message": Policy(limiter=senders, key=_no_key, **common),
        "read": Policy(idempotent=True, **common),
        "update_call": Policy(**common),
    }


def resolve_policies(
    policy: Policy | None,
    policies: Mapping[str, Policy] | None,
    account: str,
    *,
    calls_per_second: float,
    messages_per_second: float,
    timeout: float,
    breaker: CircuitBreaker | None,
    retry: RetryPolicy | None,
    clock: Clock | None,
    store: BucketStore | None = None,
) -> dict[str, Policy]:
    """Apply ``policy=`` (every operation) or ``policies=`` (one by one) over the defaults.

    The defaults are :func:`default_policies` of the other arguments, built only when used.
    ``breaker=`` and ``retry=`` shape the default policies only, so they are refused next to
    ``policy=``; the rest is the kit's rule.
    """
    if policy is not None and (breaker is not None or retry is not None or store is not None):
        raise ValueError(
            "breaker=, retry= and store= configure the default policies; with policy= they "
            "would be ignored"
        )
    return provider.resolve_policies(
        policy,
        policies,
        lambda: default_policies(
            account,
            calls_per_second=calls_per_second,
            messages_per_second=messages_per_second,
            timeout=timeout,
            breaker=breaker,
            retry=retry,
            clock=clock,
            store=store,
        ),
        OPERATIONS,
        layered=False,
    )


def twilio_routes(policies: Mapping[str, Policy]) -> list[Route]:
    """The transport routes of Twilio's 2010-04-01 API, one policy per operation.

    Paths only (any host), so that a ``base_url`` pointing at a regional edge, a proxy or a
    fake applies the same rules.
    """
    return [
        Route(
            name="twilio.calls.create",
            path=rf"{_ACCOUNT_PATH}/Calls\.json",
            methods=frozenset({"POST"}),
            policy=policies["create_call"],
            unprocessed_statuses=_UNPROCESSED,
        ),
        Route(
            name="twilio.messages.create",
            path=rf"{_ACCOUNT_PATH}/Messages\.json",
            methods=frozenset({"POST"}),
            policy=policies["send_message"],
            unprocessed_statuses=_UNPROCESSED,
        ),
        Route(
            name="twilio.calls.update",
            path=rf"{_ACCOUNT_PATH}/Calls/[^/]+\.json",
            methods=frozenset({"POST"}),
            policy=policies["update_call"],
            unprocessed_statuses=_UNPROCESSED,
        ),
        Route(
            name="twilio.read",
            path=rf"{_ACCOUNT_PATH}(/.*)?",
            methods=frozenset({"GET"}),
            policy=policies["read"],
            unprocessed_statuses=_UNPROCESSED,
        ),
    ]


def _default_breaker(name: str, clock: Clock | None, store: object) -> CircuitBreaker:
    """The default breaker: consecutive failures alone, or a fleet member on a shared store.

    On a store it judges a 30 s window: the fleet's combined-rate rule adds up the replicas'
    window summaries, and a consecutive breaker keeps no window to summarise.
    """
    if isinstance(store, BreakerStore):
        return CircuitBreaker(
            name, clock=clock, window_duration=30.0, minimum_calls=10, store=store
        )
    return CircuitBreaker(name, clock=clock)
