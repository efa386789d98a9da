"""Per-client rate limiting for inbound HTTP, with the IETF RateLimit header fields."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice.asgi._client_keys import ClientKeys, check_ipv6_prefix
from resilient_voice.asgi._common import (
    CORRELATION_HEADER,
    route_paths,
    set_headers,
)
from resilient_voice.asgi._proxies import TrustedProxies, as_trusted_proxies, parse_address
from resilient_voice.asgi._routes import RouteMatcher
from resilient_voice.asgi._types import ASGIApp, Message, Receive, Scope, Send
from resilient_voice.correlation import get_correlation_id, new_correlation_id
from resilient_voice.events import Listener, check_listeners
from resilient_voice.limiter import BucketStore, KeyedLimiter
from resilient_voice.limiter._fallback import OnBackendError

__all__ = ["RateLimitMiddleware", "RouteMatcher"]

_POLICY = b"ratelimit-policy"
_RATELIMIT = b"ratelimit"
_JSON = (b"content-type", b"application/json")
# Characters of a bare IPv4 or IPv6 address as proxies write them into X-Forwarded-For.
_ADDRESS_CHARACTERS = b"0123456789abcdefABCDEF.:"
_MAX_ADDRESS = 45  # the longest textual IPv6 address (with an embedded IPv4 part)
_HEADER_CACHE = 4096
_POLICY_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class _Policy:
    """One limit: its keyed limiter and the header values that do not change per request."""

    __slots__ = ("_cache", "burst", "interval", "label", "limiter", "policy_header", "rate")

    def __init__(
        self,
        rate: float,
        burst: float,
        label: bytes,
        *,
        name: str,
        max_keys: int,
        clock: Clock | None,
        listeners: tuple[Listener, ...],
        store: BucketStore | None,
        on_backend_error: OnBackendError,
    ) -> None:
        self.limiter = KeyedLimiter(
            rate,
            burst,
            max_keys=max_keys,
            clock=clock,
            name=name,
            listeners=listeners,
            store=store,
            on_backend_error=on_backend_error,
        )
        self.rate = float(rate)
        self.interval = 1.0 / self.rate
        self.burst = float(burst)
        self.label = label
        quota = int(burst)
        # A token bucket has no fixed window; advertise the time to refill the whole quota, so
        # that q / w never overstates the sustained rate.
        window = max(1, math.ceil(quota / self.rate))
        self.policy_header = (_POLICY, b"%s;q=%d;w=%d" % (label, quota, window))
        self._cache: dict[tuple[int, int], tuple[tuple[bytes, bytes], ...]] = {}

    def headers(self, remaining: int, wait: int) -> tuple[tuple[bytes, bytes], ...]:
        """The two header fields of an allowed response (cached: few distinct values occur)."""
        cache_key = (remaining, wait)
        found = self._cache.get(cache_key)
        if found is None:
            found = (
                self.policy_header,
                (_RATELIMIT, b"%s;r=%d;t=%d" % (self.label, remaining, wait)),
            )
            if len(self._cache) < _HEADER_CACHE:
                self._cache[cache_key] = found
        return found


def _rule(pattern: str, limit: Any) -> tuple[str, float, float]:
    if isinstance(limit, int | float) and not isinstance(limit, bool):
        return pattern, _validate.number("rate", limit), 1.0
    if isinstance(limit, tuple | list) and len(limit) == 2:
        return pattern, limit[0], limit[1]
    raise TypeError(f"route {pattern!r}: the limit must be rate or (rate, burst), got {limit!r}")


def _rules(routes: object) -> list[tuple[str, float, float]]:
    """The ``routes=`` option as (pattern, rate, burst) rules."""
    if routes is None:
        return []
    if isinstance(routes, Mapping):
        return [_rule(pattern, limit) for pattern, limit in routes.items()]
    if isinstance(routes, str) or not isinstance(routes, Iterable):
        raise TypeError(f"a mapping or a list of (pattern, rate, burst), got {routes!r}")
    rules: list[tuple[str, float, float]] = []
    for rule in routes:
        if not isinstance(rule, tuple | list) or len(rule) != 3:
            raise TypeError(f"route rules are (pattern, rate, burst), got {rule!r}")
        rules.append((rule[0], rule[1], rule[2]))
    return rules


@contextmanager
def _naming(option: str) -> Iterator[None]:
    """Put the option's name in front of a configuration error raised inside."""
    try:
        yield
    except TypeError as exc:
        raise TypeError(f"{option}: {exc}") from None
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{option}: {exc}") from None


class RateLimitMiddleware:
    """Pure ASGI middleware that limits how fast each client may call the app.

    Each client (by default its address) gets a token bucket of ``burst`` tokens refilled at
    ``rate`` per second (a :class:`~resilient_voice.limiter.KeyedLimiter`, so memory is bounded by
    ``max_keys``). A request takes one token; a request that finds none is answered at once with
    429, a ``Retry-After`` in whole seconds (rounded up), a small JSON body
    ``{"error":"rate_limited","retry_after":N}``, and the IETF ``RateLimit-Policy`` and
    ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers-10 and -11)::

        RateLimit-Policy: "default";q=<burst>;w=<seconds to refill the burst>
        RateLimit: "default";r=<tokens left>;t=<seconds until the next token>

    Allowed responses carry the same two fields (added to ``http.response.start``), never a
    ``Retry-After``. Nothing is buffered: bodies pass through untouched. Non-HTTP scopes pass
    through, unlimited.

    **Keys.** By default the client address from the ASGI scope (``scope["client"]``; requests
    without one share the key ``""``). IPv6 clients are keyed by their ``ipv6_prefix`` network
    (a /64 by default: one host usually holds a whole /64) and IPv4-mapped addresses as IPv4.
    Forwarded addresses (``X-Forwarded-For``, or ``for=`` of RFC 7239 ``Forwarded``) are read
    only when the connecting peer is trusted by ``trusted_proxies`` (see
    :class:`~resilient_voice.asgi.TrustedProxies`): walked from the right, skipping addresses of
    trusted proxies, the first other address is the client. At most ``forwarded_hops`` entries
    are examined, whatever the header's size; a malformed entry (anything that is not an IP
    address), or the two headers disagreeing on the nearest address, means the peer address is
    used. Or pass ``key=callable(scope)`` returning the key (an API key, an account id) or
    ``None`` to exempt the request.

    **Exemptions.** ``exempt`` is a list of route patterns (see :class:`RouteMatcher`) or a
    callable ``(scope) -> bool``; matching requests are never limited. Vapi's
    ``assistant-request`` and ``tool-calls`` webhooks must never get a 429 (Vapi waits 7.5 s and
    never retries), and their type is in the body, which this middleware does not read: exempt
    the whole Vapi webhook path, which ``VapiWebhookMiddleware`` authenticates.

    **Per-route limits.** ``routes`` maps patterns to ``rate`` or ``(rate, burst)``, or is a list
    of ``(pattern, rate, burst)``; the first matching rule applies instead of the default limit,
    with its own buckets. ``rate=None`` leaves paths outside ``routes`` unlimited.

    Args:
        app: The ASGI app to wrap.
        rate: Requests per second per client, or ``None`` for no default limit.
        burst: Requests a client may make at once (the bucket size).
        key: ``callable(scope) -> str | None`` choosing the client key; ``None`` exempts.
        exempt: Route patterns, or ``callable(scope) -> bool``, never limited.
        trusted_proxies: A :class:`~resilient_voice.asgi.TrustedProxies`, or a list of your
            proxies' addresses and networks as shorthand (only with the default key).
        routes: Per-route limits, see above.
        max_keys: Buckets retained per limit (see ``KeyedLimiter``).
        clock: Clock of the limiters; inject a ``ManualClock`` in tests.
        listeners: Event callables for every limit (metrics, logs), see ``resilient_voice.events``.
        policy_name: The policy name in the RateLimit fields.
        forwarded_hops: The most ``X-Forwarded-For`` entries examined.
        name: Name of the limiters (route limits add ``:<pattern>``); used in listeners.
        ipv6_prefix: Prefix length by which IPv6 clients are keyed (1..128; 128 is per address).
        store: A shared :class:`~resilient_voice.limiter.BucketStore` (a
            ``resilient_voice.redis.RedisBackend``): every worker and replica then shares each
            client's limit, at one async round trip per limited request. ``name`` keys the
            limits in the store: give every application its own.
        on_backend_error: While the store is unavailable: ``"local"`` (this worker's share
            of each limit), ``"allow"`` or ``"deny"`` (answer 429).

    Raises:
        ValueError: an invalid rate, burst, pattern, proxy or name; ``key`` together with
            ``trusted_proxies``; no limit at all.
        TypeError: a value of the wrong type.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rate: float | None,
        burst: float = 1,
        key: Callable[[Scope], str | None] | None = None,
        exempt: Iterable[str] | Callable[[Scope], bool] | None = None,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
        routes: Mapping[str, Any] | Iterable[tuple[str, float, float]] | None = None,
        max_keys: int = 10_000,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        policy_name: str = "default",
        forwarded_hops: int = 16,
        name: str = "http_server",
        ipv6_prefix: int = 64,
        store: BucketStore | None = None,
        on_backend_error: OnBackendError = "local",
    ) -> None:
        self.app = _validate.function("app", app)
        _validate.label("name", name)
        if key is not None and not callable(key):
            raise TypeError("key must be a callable(scope) -> str | None")
        if not isinstance(policy_name, str) or not _POLICY_NAME.fullmatch(policy_name):
            raise ValueError(f"policy_name must be 1..64 of [A-Za-z0-9_.:-], got {policy_name!r}")
        if isinstance(forwarded_hops, bool) or not isinstance(forwarded_hops, int):
            raise TypeError(f"forwarded_hops must be an int, got {forwarded_hops!r}")
        if not 1 <= forwarded_hops <= 64:
            raise ValueError(f"forwarded_hops must be in 1..64, got {forwarded_hops!r}")
        self._proxies = as_trusted_proxies(trusted_proxies)
        self._use_forwarded = self._proxies._reads_headers
        if key is not None and (self._use_forwarded or self._proxies.server_applied):
            raise ValueError("trusted_proxies applies to the default key only; not with key=")
        self._client = ClientKeys(check_ipv6_prefix(ipv6_prefix))
        self._key = key
        self._hops = forwarded_hops
        label = b'"' + policy_name.encode("ascii") + b'"'
        listener_tuple = check_listeners(listeners)

        def policy(rate: float, burst: float, limiter_name: str) -> _Policy:
            return _Policy(
                rate,
                burst,
                label,
                name=limiter_name,
                max_keys=max_keys,
                clock=clock,
                listeners=listener_tuple,
                store=store,
                on_backend_error=on_backend_error,
            )

        self._default = None if rate is None else policy(rate, burst, name)
        with _naming("routes"):
            self._routes: tuple[tuple[RouteMatcher, _Policy], ...] = tuple(
                (RouteMatcher(pattern), policy(r, b, f"{name}:{pattern}"))
                for pattern, r, b in _rules(routes)
            )
        # The common configuration takes a shorter path per request (IPv4 keys need no parsing).
        self._plain_key = key is None and not self._use_forwarded
        self._plain = not self._routes and exempt is None and self._default is not None
        if self._default is None and not self._routes:
            raise ValueError("rate=None needs routes: there would be nothing to limit")
        self._exempt_call: Callable[[Scope], bool] | None = None
        self._exempt_routes: tuple[RouteMatcher, ...] = ()
        if callable(exempt):
            self._exempt_call = exempt
        elif exempt is not None:
            if isinstance(exempt, str) or not isinstance(exempt, Iterable):
                raise TypeError(f"exempt must be a list of patterns or a callable, got {exempt!r}")
            with _naming("exempt"):
                self._exempt_routes = tuple(RouteMatcher(pattern) for pattern in exempt)

    @property
    def limiters(self) -> dict[str, KeyedLimiter]:
        """The limiters by pattern (``"*"`` for the default limit), for statistics and tests."""
        found = {pattern.pattern: policy.limiter for pattern, policy in self._routes}
        if self._default is not None:
            found["*"] = self._default.limiter
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self._default if self._plain else self._policy(scope)
        if policy is None:
            await self.app(scope, receive, send)
            return
        if self._plain_key:
            client = scope.get("client")
            peer = client[0] if client else ""
            # IPv4 (no ':') is its own key; only IPv6 text pays for the prefix keying.
            key: str | None = self._client(peer) if type(peer) is str and ":" in peer else peer
        else:
            key = self._client_key(scope)
            if key is None:
                await self.app(scope, receive, send)
                return
        limiter = policy.limiter
        allowed = await limiter.try_acquire(key)
        bucket = limiter.bucket(key)
        available = 0.0 if bucket is None else bucket.tokens_available()
        if not allowed:
            await self._reject(send, policy, available)
            return
        remaining = int(available)
        wait = math.ceil((remaining + 1 - available) * policy.interval)
        headers = policy.headers(remaining, wait if wait > 1 else 1)

        async def send_with_quota(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = set_headers(message.get("headers", ()), headers)
            await send(message)

        await self.app(scope, receive, send_with_quota)

    def _exempt(self, path: str) -> bool:
        return any(matcher.matches(path) for matcher in self._exempt_routes)

    def _policy(self, scope: Scope) -> _Policy | None:
        # Usually one path; two when frameworks would route the request differently (see
        # route_paths): exempt only if exempt either way, limited by the first rule either
        # way matches. No usable path at all: not exempt, the default limit.
        paths = route_paths(scope)
        if paths and self._exempt_routes and all(self._exempt(path) for path in paths):
            return None
        if self._exempt_call is not None and self._exempt_call(scope):
            return None
        for matcher, policy in self._routes:
            for path in paths:
                if matcher.matches(path):
                    return policy
        return self._default

    def _client_key(self, scope: Scope) -> str | None:
        if self._key is not None:
            return self._key(scope)
        client = scope.get("client")
        if not client:
            return ""
        peer: str = client[0]
        if self._proxies._peer_is_trusted(scope):
            return self._client(self._forwarded_client(scope, peer))
        return self._client(peer)

    def _forwarded_client(self, scope: Scope, peer: str) -> str:
        """The nearest address the trusted proxies recorded that is not a trusted proxy.

        ``X-Forwarded-For`` (or RFC 7239 ``Forwarded`` ``for=``) is walked from the right,
        where the proxy that connected to us appended the address it saw; everything further
        left was written by hosts further away, the client included. A malformed entry, or the
        two headers disagreeing on the nearest address, stops the walk at the peer.
        """
        hops = self._proxies._forwarded_for(scope, self._hops)
        if not hops:
            return peer
        candidate = peer
        for hop in hops:
            if not hop or len(hop) > _MAX_ADDRESS or hop.translate(None, _ADDRESS_CHARACTERS):
                return peer  # junk where a trusted proxy should have written an address
            address = parse_address(hop.decode("ascii"))
            if address is None:
                return peer
            candidate = str(address)
            if not self._proxies._contains(address):
                return candidate
        return candidate

    async def _reject(self, send: Send, policy: _Policy, available: float) -> None:
        retry_after = max(1, math.ceil((1.0 - available) / policy.rate))
        body = b'{"error":"rate_limited","retry_after":%d}' % retry_after
        # Like the webhook guards' refusals, the 429 names the id it belongs to, also when no
        # CorrelationIdMiddleware is installed (one outside replaces it with the same id).
        cid = (get_correlation_id() or new_correlation_id()).encode("latin-1", "replace")
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    _JSON,
                    (b"content-length", b"%d" % len(body)),
                    (b"retry-after", b"%d" % retry_after),
                    policy.policy_header,
                    (_RATELIMIT, b"%s;r=0;t=%d" % (policy.label, retry_after)),
                    (CORRELATION_HEADER, cid),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def __repr__(self) -> str:
        rate = None if self._default is None else self._default.rate
        return f"RateLimitMiddleware(app={self.app!r}, rate={rate!r}, routes={len(self._routes)})"
