"""What every provider client shares: configuration checks, policies, lifecycle, reads.

TwilioClient and VapiClient (and the next provider's client) differ in their operations, their
models, their error bodies and their verifiers; everything else lives here once:

- the request argument checks, in ``_request_checks`` (the fake upstream imports its number
  rule without loading httpx or pydantic): :func:`~resilient_voice._request_checks.is_e164`
  and :func:`~resilient_voice._request_checks.check_count`;
- :func:`check_base_url` and :func:`check_timeout`, the configuration checks;
- :func:`resolve_policies`, ``policy=`` (every operation) over ``policies=`` (some), and
  :func:`build_transport`, the one transport of a client or SDK adapter;
- :class:`ProviderClient`, the base that owns the transport and connection pool (``async with``,
  :meth:`~ProviderClient.aclose`, the ``breaker``/``transport``/``policies`` properties) and the
  one error-mapping contract of answers: :meth:`~ProviderClient._read` turns an error status
  into the provider's API error and a 2xx it cannot read into that error too, with the
  ``unreadable_answer`` code and kind ``PERMANENT``. The lost-body rule for creates is the
  transport's and the clients' ``OutcomeUnknownError``: :meth:`~ProviderClient._created` only
  wraps an unreadable create answer in it, since the call or message was most likely made;
- :func:`check_leases` and :func:`create_leased`, the one way a create holds a call lease
  (:class:`~resilient_voice.CallLeases`): taken before anything is paid, bound to the call id,
  released on a definite failure, kept for reconciliation on an unknown outcome.

Over 400 lines: it is the one kit every provider client is built from (configuration checks,
policies, the transport's lifecycle, reading answers, holding a call lease); splitting it would
make each client import from several places what it always needs together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import SplitResult

import anyio
import httpx
from pydantic import BaseModel, ValidationError

from resilient_voice import _validate
from resilient_voice._urls import check_transport_security, redact_url
from resilient_voice._urls import split as split_url
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.errors import OutcomeUnknownError, ProviderError
from resilient_voice.events import Listener
from resilient_voice.failure import FailureKind
from resilient_voice.http import ResilientTransport, Route, UpstreamStatusError
from resilient_voice.leases import CallLeases, Lease
from resilient_voice.policy import Policy

__all__ = [
    "SETTLE_AFTER",
    "UNREADABLE",
    "ProviderClient",
    "build_transport",
    "check_base_url",
    "check_leases",
    "check_settle_after",
    "check_timeout",
    "create_leased",
    "resolve_policies",
    "settled",
]

UNREADABLE = "unreadable_answer"
"""The ``code`` of a provider error for a 2xx answer the client could not read."""


def check_timeout(value: object, name: str = "timeout") -> float:
    """A finite number of seconds > 0, as a float.

    Raises:
        TypeError: Not a number (a bool is not one).
        ValueError: Not finite, or not > 0.
    """
    return _validate.number(name, value)


def check_base_url(
    base_url: object,
    *,
    allow_insecure_http: bool,
    credentials: str,
) -> SplitResult:
    """Check a ``base_url``; messages never echo its credentials (see :mod:`._urls`).

    What every client and adapter refuses; what may follow the host (a path, a query) is the
    caller's rule, checked on the parts returned.

    Args:
        base_url: The value given.
        allow_insecure_http: The caller's opt-in to ``http://`` to a remote host.
        credentials: Where credentials go instead (``"pass the key as api_key="``), for the
            message.

    Raises:
        TypeError: Not a str, or ``allow_insecure_http`` not a bool.
        ValueError: Not an http(s) URL with a host, userinfo in it, or plain http to a remote
            host without the opt-in.
    """
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, got {type(base_url).__name__}")
    parts = split_url(base_url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be an http(s) URL, got {redact_url(base_url)!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"base_url must not carry credentials (got {redact_url(base_url)!r}): {credentials}"
        )
    check_transport_security(parts, base_url, allow_insecure_http=allow_insecure_http)
    return parts


def resolve_policies(
    policy: Policy | None,
    policies: Mapping[str, Policy] | None,
    defaults: Callable[[], dict[str, Policy]],
    operations: Sequence[str],
    *,
    layered: bool,
) -> dict[str, Policy]:
    """Apply ``policy=`` (every operation) and ``policies=`` (one by one) to the defaults.

    ``defaults`` is called only when ``policy`` is not given, so no breaker or limiter is built
    for nothing. With ``layered`` (Vapi's documented rule) ``policies=`` then replaces some of
    ``policy=``; without it (Twilio's, pinned by its tests) giving both is an error.

    Raises:
        TypeError: A value is not a :class:`Policy`, or ``policies`` is not a mapping.
        ValueError: An unknown operation name, or both given where they do not layer.
    """
    if policy is not None and policies is not None and not layered:
        raise ValueError("give policy= (every operation) or policies= (some), not both")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy, got {type(policy).__name__}")
    resolved = dict.fromkeys(operations, policy) if policy is not None else defaults()
    if policies is None:
        return resolved
    if not isinstance(policies, Mapping):
        raise TypeError("policies must be a mapping of operation name to Policy")
    unknown = sorted(set(policies) - set(operations))
    if unknown:
        raise ValueError(f"unknown operation(s) in policies: {unknown}; known: {list(operations)}")
    for name, value in policies.items():
        if not isinstance(value, Policy):
            raise TypeError(f"policies[{name!r}] must be a Policy, got {type(value).__name__}")
        resolved[name] = value
    return resolved


def build_transport(
    policies: Mapping[str, Policy],
    routes: list[Route],
    *,
    transport: httpx.AsyncBaseTransport | None,
    name: str,
    listeners: Iterable[Listener],
) -> ResilientTransport:
    """A provider's transport: each route runs its operation's policy, anything else reads'.

    Requests no route claims (another product of the provider, a new endpoint) are treated
    as reads: retried only where the transport's rules call them safe.
    """
    return ResilientTransport(
        policies["read"], transport=transport, routes=routes, name=name, listeners=listeners
    )


def check_leases(leases: object, lease_timeout: object) -> tuple[CallLeases | None, float | None]:
    """``leases=`` and ``lease_timeout=`` of a client, checked.

    Raises:
        TypeError: ``leases`` not a CallLeases; ``lease_timeout`` not a number.
        ValueError: ``lease_timeout`` negative or not finite.
    """
    if leases is not None and not isinstance(leases, CallLeases):
        raise TypeError(f"leases must be a CallLeases, got {type(leases).__name__}")
    if lease_timeout is None:
        return leases, None
    return leases, _validate.number("lease_timeout", lease_timeout, inclusive=True)


SETTLE_AFTER = 120.0
"""``reconcile_leases(settle_after=)``'s default: how long after its unknown mark (when the
client gave up on the create) a lease must be before "no call listed" is taken to mean "no call
was created".

The create the lease was taken for may still be in flight when the client gives up on it; the
provider can process it after a listing that did not show it, and a slot released then would
let a call run without a lease. Counted from the mark, the client's own attempts, backoff and
rate-limit waits are behind it: two minutes is for a request the provider accepted and still
holds, or lists late."""


def check_settle_after(value: object) -> float:
    """``reconcile_leases(settle_after=)``, checked: a finite number of seconds, >= 0.

    Raises:
        TypeError: Not an int or a float (a bool is refused).
        ValueError: Negative, NaN or infinite.
    """
    return _validate.number("settle_after", value, inclusive=True)


def settled(lease: Lease, as_of: float, settle_after: float) -> bool:
    """Whether ``lease``'s create is old enough at ``as_of`` (before the listing) that a call
    the provider did not list was never created, rather than not created yet.

    Counted from the unknown mark (when the client gave up on the create), not the acquire:
    rate-limit waits and retries before it do not eat into the margin. A lease marked without
    a time (never, from this library's stores) counts from its acquire.
    """
    since = lease.acquired_at if lease.marked_at is None else lease.marked_at
    return as_of - since >= settle_after


_Created = TypeVar("_Created")


async def create_leased(
    leases: CallLeases,
    lease_timeout: float | None,
    attempt_id: str,
    create: Callable[[Lease], Awaitable[_Created]],
    call_id: Callable[[_Created], str],
    context: str | None = None,
) -> tuple[_Created, Lease]:
    """Run one create while holding a call lease; return what it created and the bound lease.

    The lease is taken first, outside the policy (so outside its retries and before a breaker
    permit or a token is paid): it spans the whole phone call, not one attempt. ``create``
    gets it to plant its id and generation in the request. Then:

    - created: the lease is bound to ``call_id(result)``;
    - :class:`~resilient_voice.OutcomeUnknownError`: the call may exist, so the lease stays
      held, marked with the attempt id and ``context`` (what any replica's reconciliation
      needs to find the call), until reconciliation settles it;
    - any other error (refused locally, nothing sent, the provider refused): nothing was
      created, so the lease is released;
    - cancelled while the create was under way: the call may exist, so as for an unknown
      outcome, under ``attempt_id``.

    The lease bookkeeping after the create is shielded from cancellation: a slot must not
    leak because the caller went away just as the answer arrived.

    Raises:
        CapacityExhaustedError: No slot freed within ``lease_timeout``; nothing was sent.
        Whatever ``create`` raises.
    """
    lease = await leases.acquire(timeout=lease_timeout)
    try:
        result = await create(lease)
    except OutcomeUnknownError as exc:
        with anyio.CancelScope(shield=True):
            await leases.mark_unknown(lease, exc.attempt_id, context=context)
        raise
    except Exception:
        with anyio.CancelScope(shield=True):
            await lease.release()
        raise
    except BaseException:
        with anyio.CancelScope(shield=True):
            await leases.mark_unknown(lease, attempt_id, context=context)
        raise
    with anyio.CancelScope(shield=True):
        bound = await leases.bind(lease, call_id(result))
    return result, bound


_PERMANENT = FailureKind.PERMANENT
_Model = TypeVar("_Model", bound=BaseModel)


class ProviderClient:
    """The base of a provider's client: transport lifecycle, properties, reading answers.

    A subclass builds its policies and its :class:`httpx.AsyncClient` (with the transport
    :meth:`_transport_for` gives, or a caller's own client) and calls :meth:`_own`; it then
    writes operations that send requests and hand the answer to :meth:`_read` or
    :meth:`_created`. It implements :meth:`_api_error` (the provider's error body) and
    :meth:`_unreadable_error` (its exception class for an answer it cannot read).
    """

    _policies: dict[str, Policy]
    _transport: ResilientTransport | None
    _http: httpx.AsyncClient
    _owns_http: bool
    _leases: CallLeases | None

    def _require_leases(self) -> CallLeases:
        """The client's ``leases=``, for the operations that only make sense with them."""
        if self._leases is None:
            raise RuntimeError(f"this {type(self).__name__} has no leases=")
        return self._leases

    def _own(
        self,
        http: httpx.AsyncClient,
        policies: dict[str, Policy],
        transport: ResilientTransport | None,
        *,
        owns_http: bool = True,
    ) -> None:
        """Take the connection pool this client sends through (closed by :meth:`aclose`)."""
        self._http = http
        self._policies = policies
        self._transport = transport
        self._owns_http = owns_http

    @property
    def policies(self) -> Mapping[str, Policy]:
        """The policy of each operation (a copy; keys as for ``policies=``)."""
        return dict(self._policies)

    @property
    def breaker(self) -> CircuitBreaker:
        """The breaker of ``create_call`` (the one shared by the default policies).

        Typed without ``None`` so that ``client.breaker.add_listener(...)`` type-checks.

        Raises:
            AttributeError: There is none: the ``create_call`` policy has no breaker, or the
                client sends through a caller's ``http_client=`` (``getattr(client,
                "breaker", None)`` gives ``None`` then).
        """
        policy = self._policies.get("create_call")
        if policy is None or policy.breaker is None:
            why = "http_client= was given" if policy is None else "its create_call policy has none"
            raise AttributeError(
                f"this {type(self).__name__} has no circuit breaker ({why}); "
                "attach listeners to the primitives of the policy you passed"
            )
        return policy.breaker

    @property
    def transport(self) -> ResilientTransport:
        """The resilient transport: attach transport listeners here.

        Raises:
            AttributeError: The client sends through a caller's ``http_client=``, whose
                transport is the caller's (``getattr(client, "transport", None)`` is ``None``).
        """
        if self._transport is None:
            raise AttributeError(
                f"this {type(self).__name__} sends through the http_client= you gave; "
                "its transport is yours"
            )
        return self._transport

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (never a caller's ``http_client=``); final."""
        if self._owns_http:
            await self._http.aclose()

    def _api_error(
        self, response: httpx.Response, kind: FailureKind | None = None
    ) -> ProviderError:
        """The provider's exception for an error answer (status >= 400, body already read).

        ``kind`` is the transport's verdict when it gave one (an unknown outcome's cause);
        otherwise the provider's own table decides.
        """
        raise NotImplementedError

    def _unreadable_error(
        self, response: httpx.Response, message: str, kind: FailureKind
    ) -> ProviderError:
        """The provider's exception for a 2xx it cannot read, with ``code`` :data:`UNREADABLE`.

        ``kind`` is ``PERMANENT``: the same answer will not read better on a retry.
        """
        raise NotImplementedError

    def _checked(self, response: httpx.Response) -> httpx.Response:
        """``response`` if it is not an error answer; else raise the provider's error."""
        if response.status_code >= 400:
            raise self._api_error(response)
        return response

    def _json(self, response: httpx.Response) -> Any:
        """The JSON of a 2xx answer, or the provider's error saying it is not JSON.

        Hostile nesting (deeper than Python's parser goes) counts as not JSON: a bare
        ``RecursionError`` would read as a bug, or invite a retry.
        """
        try:
            return response.json()
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise self._unreadable_error(
                response, f"the {response.status_code} answer is not JSON", _PERMANENT
            ) from exc

    def _model(self, model: type[_Model], data: Any, response: httpx.Response) -> _Model:
        """``data`` as ``model``, or the provider's error saying the answer did not match.

        The answer was a valid 2xx and the request did what was asked: a mismatch says this
        library's model and the provider's answer disagree (a field it changed, a model too
        strict), so the message names the model and does not blame the upstream.
        """
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise self._unreadable_error(
                response,
                f"the {response.status_code} answer did not match the {model.__name__} model "
                f"({exc.error_count()} error(s)); this library's model may be out of date",
                _PERMANENT,
            ) from exc

    async def _exchange(self, request: httpx.Request, **options: Any) -> httpx.Response:
        """Send ``request``: a non-error answer, or the provider's error, or an unknown outcome.

        Whether a failed create may have been processed is the transport's rule (a 5xx, a
        dropped connection, a lost 2xx body raise :class:`~resilient_voice.OutcomeUnknownError`
        there, under the request's attempt id); this only chains the provider's own error in
        place of the transport's status error, so a caller reads the same cause from every
        client. ``options`` go to :meth:`httpx.AsyncClient.send` (``auth=``).
        """
        try:
            response = await self._http.send(request, **options)
        except OutcomeUnknownError as exc:
            cause = exc.__cause__
            if not isinstance(cause, UpstreamStatusError):
                raise
            await cause.response.aread()  # in memory already: the transport buffered it
            error = self._api_error(cause.response, cause.kind)
            unknown = OutcomeUnknownError(exc.attempt_id, attempts=exc.attempts)
            unknown.__notes__ = list(getattr(exc, "__notes__", ()))
            raise unknown from error
        return self._checked(response)

    def _read(self, model: type[_Model], response: httpx.Response) -> _Model:
        """An answer as ``model``: every read's one path from response to result or error."""
        return self._model(model, self._json(self._checked(response)), response)

    def _created(self, model: type[_Model], response: httpx.Response, attempt_id: str) -> _Model:
        """A create's 2xx answer as ``model``; unreadable, it is an unknown outcome.

        The provider most likely made the call or message: an ordinary error would read as a
        definite failure and invite a second create, so the caller gets
        :class:`~resilient_voice.OutcomeUnknownError` with the unreadable-answer error as its
        cause.
        """
        try:
            return self._model(model, self._json(response), response)
        except ProviderError as error:
            raise OutcomeUnknownError(attempt_id, attempts=1) from error
