"""VapiClient: typed Vapi calls, assistants and phone numbers over httpx + ResilientTransport.

Vapi's operations only: the plumbing every client shares is in :mod:`.._provider`, the input
rules and request bodies in :mod:`._validation`, the error bodies in :mod:`._errors`.

Over 400 lines: each operation's docstring is its user documentation (Vapi's fields and
filters, outcomes, reconciliation), and one class is easier to read whole than spread out.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar, cast

import anyio
import httpx
from pydantic import BaseModel

from resilient_voice import _validate
from resilient_voice._clock import Clock
from resilient_voice._lease_params import GENERATION_KEY, LEASE_KEY
from resilient_voice._provider import (
    SETTLE_AFTER,
    UNREADABLE,
    ProviderClient,
    build_transport,
    check_base_url,
    check_leases,
    check_settle_after,
    check_timeout,
    create_leased,
    settled,
)
from resilient_voice.correlation import get_correlation_id, new_attempt_id
from resilient_voice.errors import InvalidRequestError, OutcomeUnknownError
from resilient_voice.events import (
    ConcurrencyBlocked,
    Listener,
    check_listener,
    check_listeners,
    dispatch,
)
from resilient_voice.failure import FailureKind
from resilient_voice.http import ATTEMPT_ID_EXTENSION, ResilientTransport
from resilient_voice.http._transport import classify_status
from resilient_voice.leases import CallLeases, Lease
from resilient_voice.limiter import BucketStore
from resilient_voice.policy import Policy
from resilient_voice.vapi._errors import (
    VapiAPIError,
    VapiConcurrencyLimitError,
    error_from_response,
)
from resilient_voice.vapi._models import VapiAssistant, VapiCall, VapiCustomer, VapiPhoneNumber
from resilient_voice.vapi._policies import resolve_policies, vapi_routes
from resilient_voice.vapi._validation import (
    check_id,
    check_limit,
    create_call_body,
    format_datetime,
    plant_metadata,
    update_assistant_body,
)

__all__ = ["ATTEMPT_ID_EXTENSION", "DEFAULT_BASE_URL", "VapiClient"]

DEFAULT_BASE_URL: Final = "https://api.vapi.ai"

_log = logging.getLogger("resilient_voice.vapi")

M = TypeVar("M", bound=BaseModel)

_MAYBE = FailureKind.MAYBE_PROCESSED
_NO_STATUSES: frozenset[int] = frozenset()
_LIST_MAX = 1000
# Calls older than the leases' TTL hold no lease (it was reclaimed): not worth listing.
_LIST_MARGIN = timedelta(minutes=5)


class _BearerAuth(httpx.Auth):
    """Adds ``Authorization: Bearer <key>``; keeps the key out of the client's default headers."""

    def __init__(self, api_key: str) -> None:
        self._header = f"Bearer {api_key}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:
        return "_BearerAuth(<redacted>)"


def _check_api_key(api_key: object) -> str:
    if not isinstance(api_key, str) or not api_key:
        raise ValueError("api_key must be a non-empty string (your Vapi private key)")
    if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        # Not echoed: the value is a secret.
        raise ValueError("api_key contains whitespace or non-printable characters")
    return api_key


def _check_base_url(base_url: object, allow_insecure_http: bool) -> tuple[str, str, str]:
    """The API root without a trailing ``/``, its host, and its path (see :mod:`.._provider`)."""
    parts = check_base_url(
        base_url, allow_insecure_http=allow_insecure_http, credentials="pass the key as api_key="
    )
    if parts.query or parts.fragment:
        raise ValueError("base_url must not carry a query or a fragment")
    root = cast("str", base_url)  # a str: check_base_url refused anything else
    return root.rstrip("/"), parts.hostname or "", parts.path.rstrip("/")


class VapiClient(ProviderClient):
    """A typed, resilient client for Vapi's calls, assistants and phone numbers.

    Build one per Vapi org at startup and share it; it holds a connection pool, a circuit
    breaker and the operation policies::

        async with VapiClient(api_key) as vapi:
            call = await vapi.create_call(
                assistant_id="...", phone_number_id="...", customer_number="+14155550100"
            )

    Every request goes through a :class:`~resilient_voice.http.ResilientTransport` whose routes
    give each operation its policy (see :func:`~resilient_voice.vapi.default_policies`):
    ``create_call`` is never idempotent, so a failure that may have placed the call raises
    :class:`~resilient_voice.OutcomeUnknownError` instead of dialling twice; reads and
    ``update_assistant`` are retried. The client plants its attempt id and the current
    correlation id in the created call's ``assistantOverrides.metadata`` so that
    :meth:`reconcile_call` can find a call whose outcome was unknown, and so that
    ``VapiWebhookMiddleware`` can restore the correlation id when Vapi's webhooks arrive.

    Args:
        api_key: The org's private API key. Never shown in reprs or logs.
        base_url: The API root (``https://api.vapi.ai``; ``https://api.eu.vapi.ai`` for EU orgs).
            Plain ``http://`` is accepted for loopback hosts only (``localhost``, 127.0.0.0/8,
            ``::1``): anywhere else it would send the API key unencrypted.
        allow_insecure_http: Accept an ``http://`` ``base_url`` to a non-loopback host (a
            TLS-terminating sidecar, a test network). Off by default.
        policy: One policy for every operation, replacing the defaults.
        policies: Policies by operation name (``"create_call"``, ``"read"``,
            ``"update_assistant"``), replacing the defaults one by one (after ``policy``).
        http_client: Send through this ``httpx.AsyncClient`` instead of building one. The client
            is used as is (its transport decides what resilience applies) and is not closed by
            :meth:`aclose`; ``policy``, ``policies`` and ``transport`` must then be omitted.
        transport: The httpx transport that really sends (default
            ``httpx.AsyncHTTPTransport()``); for proxies, TLS settings or tests.
        timeout: Seconds for httpx's connect, read, write and pool timeouts of each attempt.
        unprocessed_429: Treat a 429 on ``POST /call`` as "not processed" and retry it. Vapi
            does not document that; leave it False unless you accept a possible duplicate call.
        clock: The clock of the default policies (tests inject a ``ManualClock``).
        name: A bounded label for listeners and metrics.
        listeners: Callables taking an event record (:class:`~resilient_voice.events.Listener`).
            They hear the client's :class:`~resilient_voice.events.ConcurrencyBlocked` records
            and, unless ``http_client=`` is given (its transport is yours), the transport's.
        calls_per_second: Pace ``create_call`` (burst 1) in the default policies; Vapi does
            not publish its limit, so nothing is paced by default.
        store: A shared :class:`~resilient_voice.limiter.BucketStore` (a
            ``resilient_voice.redis.RedisBackend``) for that pacing, so that every replica
            paces the org together. The bucket is named ``vapi:<digest of the API key>:calls``:
            unique per org, without the key. With a ``RedisBackend`` the default breaker also
            joins the fleet view (a 30 s window, ``minimum_calls=10``).
        leases: The org's :class:`~resilient_voice.CallLeases`: every ``create_call`` then
            holds a call slot from before the request until the call's end-of-call report
            (``LeaseReleaseMiddleware`` releases it). See ``docs/leases.md``.
        lease_timeout: Seconds ``create_call`` waits for a slot before it raises
            :class:`~resilient_voice.CapacityExhaustedError`; ``None`` (default) waits until
            one frees, ``0`` takes one only if free now.
        server_url_configured: With ``leases=``, say that the saved assistant, the phone
            number or the org sends end-of-call reports to a URL behind
            ``LeaseReleaseMiddleware``. Without it a create must carry the server URL itself
            (``assistant={"server": {"url": ...}}`` or ``assistant_overrides=``), else it is
            refused: its lease would only come back by TTL.

    Raises:
        TypeError, ValueError: Invalid configuration.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        allow_insecure_http: bool = False,
        policy: Policy | None = None,
        policies: Mapping[str, Policy] | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        unprocessed_429: bool = False,
        clock: Clock | None = None,
        name: str = "vapi",
        listeners: Iterable[Listener] = (),
        calls_per_second: float | None = None,
        store: BucketStore | None = None,
        leases: CallLeases | None = None,
        lease_timeout: float | None = None,
        server_url_configured: bool = False,
    ) -> None:
        self._leases, self._lease_timeout = check_leases(leases, lease_timeout)
        self._server_url_configured = _validate.flag("server_url_configured", server_url_configured)
        self._auth = _BearerAuth(_check_api_key(api_key))
        self._base_url, host, prefix = _check_base_url(base_url, allow_insecure_http)
        seconds = check_timeout(timeout)
        if not isinstance(unprocessed_429, bool):
            raise TypeError("unprocessed_429 must be a bool")
        self._name = _validate.label("name", name)
        self._listeners: tuple[Listener, ...] = check_listeners(listeners)
        self._create_unprocessed = frozenset({429}) if unprocessed_429 else _NO_STATUSES
        self._transport: ResilientTransport | None
        if http_client is not None:
            if not isinstance(http_client, httpx.AsyncClient):
                raise TypeError("http_client must be an httpx.AsyncClient")
            if (
                policy is not None
                or policies is not None
                or transport is not None
                or store is not None
            ):
                raise ValueError(
                    "with http_client=, install the resilience in that client's transport; "
                    "policy=, policies= and transport= do not apply"
                )
            self._own(http_client, {}, None, owns_http=False)
        else:
            api_key_digest = hashlib.blake2b(api_key.encode(), digest_size=8).hexdigest()
            resolved = resolve_policies(
                policy,
                policies,
                clock,
                calls_per_second=calls_per_second,
                store=store,
                name=f"vapi:{api_key_digest}",
            )
            resilient = build_transport(
                resolved,
                vapi_routes(host, prefix, resolved, unprocessed_429=unprocessed_429),
                transport=transport,
                name=name,
                listeners=self._listeners,
            )
            http = httpx.AsyncClient(transport=resilient, timeout=httpx.Timeout(seconds))
            self._own(http, resolved, resilient)

    @property
    def name(self) -> str:
        return self._name

    @property
    def base_url(self) -> str:
        return self._base_url

    def add_listener(self, listener: Listener) -> None:
        """Attach a listener to the client and, when it owns it, to its transport."""
        self._listeners = (*self._listeners, check_listener(listener))
        if self._transport is not None:
            self._transport.add_listener(listener)

    def __repr__(self) -> str:
        return f"VapiClient(base_url={self._base_url!r}, name={self._name!r})"

    async def create_call(
        self,
        *,
        assistant_id: str | None = None,
        assistant: Mapping[str, Any] | BaseModel | None = None,
        phone_number_id: str | None = None,
        customer_number: str | None = None,
        customer: VapiCustomer | Mapping[str, Any] | None = None,
        customer_id: str | None = None,
        assistant_overrides: Mapping[str, Any] | BaseModel | None = None,
        name: str | None = None,
        **more: Any,
    ) -> VapiCall:
        """Place an outbound call (``POST /call``); never sent twice.

        The body is built once, with a fresh attempt id and the current correlation id merged
        into ``assistantOverrides.metadata`` (``rv_attempt_id``, ``rv_cid``; your own metadata
        keys are kept). Every retry sends the same body.

        A 201 whose ``subscriptionLimits.concurrencyBlocked`` is true is a created call: it is
        returned (check :attr:`VapiCall.concurrency_blocked`), logged and reported to
        listeners, never raised.

        With ``leases=`` the call holds a lease: taken before anything is sent (waiting up to
        ``lease_timeout``), its id and generation planted next to ``rv_attempt_id`` in the
        metadata (``rv_lease``, ``rv_lease_gen``), bound to the new call's id. A definite
        failure releases it; an unknown outcome keeps it for :meth:`reconcile_leases`. A
        ``concurrencyBlocked`` call keeps its lease until its end-of-call report and is a
        capacity signal (the effective capacity halves); otherwise the
        ``subscriptionLimits`` of the created call set the leases' effective capacity.

        Args:
            assistant_id: A saved assistant; or give ``assistant``.
            assistant: A transient assistant (mapping or pydantic model).
            phone_number_id: The Vapi phone number to call from.
            customer_number: The destination, E.164 (``+14155550100``): the short form of
                ``customer={"number": ...}``. Give exactly one of ``customer_number``,
                ``customer`` and ``customer_id``.
            customer: The customer as Vapi's ``CreateCustomerDTO`` (a mapping with snake_case
                or camelCase keys, or a :class:`VapiCustomer`): exactly one of ``number``
                (E.164 unless ``numberE164CheckEnabled`` is False) and ``sipUri``
                (``sip:``/``sips:``), plus optional ``extension`` (1..10 digits, dialled after
                the answer), ``name``, ``email``, ``externalId`` (1..40 characters each).
                Unknown fields are refused, not forwarded.
            customer_id: A customer saved in Vapi.
            assistant_overrides: Overrides for this call (``variableValues``, ``metadata``...).
            name: Your label for the call (at most 40 characters; left untouched).
            **more: Other ``CreateCallDTO`` fields, snake_case or camelCase
                (``schedule_plan=...``, ``squadId=...``).

        Returns:
            The created call.

        Raises:
            InvalidRequestError: Bad arguments (with ``leases=``: no server URL known for the
                end-of-call report); nothing was sent.
            CapacityExhaustedError: With ``leases=``, no call slot freed in time; nothing was
                sent.
            OutcomeUnknownError: The request may have created the call (dropped connection,
                timeout, 5xx, 429); its ``attempt_id`` is the ``rv_attempt_id`` planted in the
                call, for :meth:`reconcile_call`.
            VapiAPIError: Vapi refused (400, 404...); ``VapiConcurrencyLimitError`` when it
                said the org is over its call concurrency; ``VapiAuthenticationError`` on
                401/403.
            CircuitOpenError, RateLimitedError: Refused locally; nothing was sent.
        """
        body = create_call_body(
            assistant_id=assistant_id,
            assistant=assistant,
            phone_number_id=phone_number_id,
            customer_number=customer_number,
            customer=customer,
            customer_id=customer_id,
            assistant_overrides=assistant_overrides,
            name=name,
            more=more,
        )
        attempt_id = new_attempt_id()
        body["assistantOverrides"] = plant_metadata(
            body.get("assistantOverrides"), attempt_id, get_correlation_id()
        )
        leases = self._leases
        if leases is None:
            return await self._create(body, attempt_id)
        if not self._server_url_configured and not _carries_server_url(body):
            raise InvalidRequestError(
                "assistant_overrides",
                "a create with leases= needs a server URL for its end-of-call report: give "
                "assistant_overrides={'server': {'url': ...}} (or the transient assistant's "
                "server.url), or VapiClient(server_url_configured=True) when the assistant, "
                "phone number or org already has one; otherwise the slot would only come back "
                "by TTL",
            )
        call, _ = await create_leased(
            leases,
            self._lease_timeout,
            attempt_id,
            lambda lease: self._create(_with_lease(body, lease), attempt_id),
            lambda created: created.id,
        )
        with anyio.CancelScope(shield=True):
            limits = call.subscription_limits
            if call.concurrency_blocked:
                # The lease stays bound: the call exists until its end-of-call report says not.
                await leases.signal_capacity("vapi:concurrency-blocked")
            elif limits is not None:
                await leases.observe_provider_limits(
                    limits.concurrency_limit, limits.remaining_concurrent_calls
                )
        return call

    async def _create(self, body: dict[str, Any], attempt_id: str) -> VapiCall:
        request = self._http.build_request(
            "POST", self._url("/call"), json=body, extensions={ATTEMPT_ID_EXTENSION: attempt_id}
        )
        try:
            response = await self._exchange(request, auth=self._auth)
            call = self._created(VapiCall, response, attempt_id)
        except OutcomeUnknownError as exc:
            self._log_unknown(attempt_id, exc.__cause__)
            raise
        if call.concurrency_blocked:
            self._concurrency("blocked", call, None)
        return call

    async def reconcile_call(
        self,
        attempt_id: str,
        *,
        created_after: datetime | None = None,
        limit: int = 100,
        assistant_id: str | None = None,
    ) -> VapiCall | None:
        """Find the call that a ``create_call`` with this attempt id created, if any.

        Lists calls newest first, ``limit`` per page, and matches the ``rv_attempt_id`` planted
        in ``assistantOverrides.metadata``. Use it after an
        :class:`~resilient_voice.OutcomeUnknownError`: ``None`` means no call created after
        ``created_after`` carries that id. A full page without the id is never taken for "not
        created": older pages are read (back through ``createdAt``) until the id is found or
        the calls run out, because a wrong ``None`` is what makes a caller create, and ring the
        customer, twice. Pass ``created_after`` to bound how far back that goes.

        Args:
            attempt_id: ``OutcomeUnknownError.attempt_id``.
            created_after: Only calls created after this (timezone-aware) time; note the time
                just before ``create_call`` (minus some clock skew) and pass it.
            limit: How many calls to list per page, 1..1000.
            assistant_id: Narrow the listing to calls of this assistant.
        """
        check_id("attempt_id", attempt_id)
        found: list[VapiCall | None] = [None]

        def match(page: list[VapiCall]) -> bool:
            found[0] = _find_attempt(page, attempt_id)
            return found[0] is not None

        await self._calls_after(created_after, assistant_id=assistant_id, size=limit, until=match)
        return found[0]

    async def reconcile_leases(self, *, settle_after: float = SETTLE_AFTER) -> int:
        """Settle the org's leases against the calls Vapi lists as not ended.

        Run it periodically (every minute or so): it is what reclaims a slot whose end-of-call
        report was lost before its TTL would. It takes the leases whose create had an unknown
        outcome, notes the time on the leases' clock, then lists the calls created within the
        leases' TTL (every page, newest first). An unknown-outcome lease whose attempt id a
        listed call carries (as :meth:`reconcile_call` matches it) is bound to that call at
        once if it has not ended, released if it has; one whose attempt no listed call carries
        is released when the lease was marked unknown at least ``settle_after`` seconds ago, and
        otherwise left held for the next run. Every lease of the set is settled, whichever
        replica marked it: the attempt id it carries is all the match needs. Then
        :meth:`CallLeases.reconcile <resilient_voice.CallLeases.reconcile>` frees every lease
        bound before that time whose call has ended or is not listed.

        Why wait: a create the client gave up on (a timeout, a dropped connection) may still
        be in flight and be processed by Vapi after this listing; releasing its lease then
        would let that call run without a slot, over the org's concurrency limit. Holding it a
        while costs a slot during an incident; the TTL frees it in any case.

        Args:
            settle_after: Seconds from the lease's unknown mark (when the client gave up on the
                create; on the leases' clock, compared with the time noted before the listing)
                after which an attempt no listed call carries is taken to have created nothing.
                It must cover how long Vapi may still hold, or not yet list, a request the
                client gave up on; the create's own attempts, backoff and rate-limit waits came
                before the mark and need no margin. The default, 120 s, is ample for that.
                ``0`` releases at once (only safe when nothing can still be in flight).

        Returns:
            How many bound leases were freed because their call is no longer live.

        Raises:
            TypeError: ``settle_after`` not a number.
            ValueError: ``settle_after`` negative or not finite.
            RuntimeError: The client has no ``leases=``.
            VapiAPIError, CircuitOpenError, ...: Listing the calls failed; nothing changed.
        """
        settle = check_settle_after(settle_after)
        leases = self._require_leases()
        unknown = await leases.unknown()
        as_of = leases.clock.now()
        calls = await self._recent_calls(datetime.now(UTC) - timedelta(seconds=leases.ttl))
        live = [call for call in calls if call.status != "ended"]
        for lease in unknown:
            found = _find_attempt(calls, lease.attempt_id or "")
            if found is None and not settled(lease, as_of, settle):
                continue  # its create may still be processed: held, looked at again next run
            with anyio.CancelScope(shield=True):
                if found is not None and found.status != "ended":
                    await leases.bind(lease, found.id)
                else:
                    await lease.release()
        return await leases.reconcile([call.id for call in live], as_of=as_of)

    async def _recent_calls(self, since: datetime) -> list[VapiCall]:
        """Every call created after ``since`` (less a margin for clock skew)."""
        return await self._calls_after(since - _LIST_MARGIN)

    async def _calls_after(
        self,
        floor: datetime | None,
        *,
        assistant_id: str | None = None,
        size: int = _LIST_MAX,
        until: Callable[[list[VapiCall]], bool] | None = None,
    ) -> list[VapiCall]:
        """Every call created after ``floor``, paging back through ``createdAt`` (``size`` per
        page), or up to the first page for which ``until`` is true."""
        seen: dict[str, VapiCall] = {}
        before: datetime | None = None
        while True:
            page = await self.list_calls(
                assistant_id=assistant_id, created_at_gt=floor, created_at_le=before, limit=size
            )
            fresh = [call for call in page if call.id not in seen]
            seen.update((call.id, call) for call in fresh)
            if until is not None and until(fresh):
                return list(seen.values())
            dated = [call.created_at for call in page if call.created_at is not None]
            if len(page) < size or not fresh or not dated:
                return list(seen.values())
            before = min(dated)  # inclusive: calls sharing that millisecond are not skipped

    async def get_call(self, call_id: str) -> VapiCall:
        """Fetch one call (``GET /call/{id}``)."""
        path = "/call/" + check_id("call_id", call_id)
        return self._read(VapiCall, await self._get(path, None))

    async def list_calls(
        self,
        *,
        assistant_id: str | None = None,
        phone_number_id: str | None = None,
        id: str | None = None,  # noqa: A002  (Vapi's filter name)
        created_at_gt: datetime | None = None,
        created_at_lt: datetime | None = None,
        created_at_ge: datetime | None = None,
        created_at_le: datetime | None = None,
        updated_at_gt: datetime | None = None,
        updated_at_lt: datetime | None = None,
        updated_at_ge: datetime | None = None,
        updated_at_le: datetime | None = None,
        limit: int | None = None,
    ) -> list[VapiCall]:
        """List calls (``GET /call``), newest first, with Vapi's filters.

        Datetimes must be timezone-aware; ``limit`` is 1..1000 (Vapi's default is 100).
        """
        params: dict[str, str] = {}
        for key, value in (
            ("assistantId", assistant_id),
            ("phoneNumberId", phone_number_id),
            ("id", id),
        ):
            if value is not None:
                params[key] = check_id(key, value)
        for key, moment in (
            ("createdAtGt", created_at_gt),
            ("createdAtLt", created_at_lt),
            ("createdAtGe", created_at_ge),
            ("createdAtLe", created_at_le),
            ("updatedAtGt", updated_at_gt),
            ("updatedAtLt", updated_at_lt),
            ("updatedAtGe", updated_at_ge),
            ("updatedAtLe", updated_at_le),
        ):
            if moment is not None:
                params[key] = format_datetime(key, moment)
        checked = check_limit(limit)
        if checked is not None:
            params["limit"] = str(checked)
        return self._read_list(VapiCall, await self._get("/call", params))

    async def get_assistant(self, assistant_id: str) -> VapiAssistant:
        """Fetch one assistant (``GET /assistant/{id}``)."""
        path = "/assistant/" + check_id("assistant_id", assistant_id)
        return self._read(VapiAssistant, await self._get(path, None))

    async def list_assistants(self, *, limit: int | None = None) -> list[VapiAssistant]:
        """List assistants (``GET /assistant``)."""
        checked = check_limit(limit)
        params = {"limit": str(checked)} if checked is not None else None
        return self._read_list(VapiAssistant, await self._get("/assistant", params))

    async def update_assistant(self, assistant_id: str, **changes: Any) -> VapiAssistant:
        """Change an assistant's settings (``PATCH /assistant/{id}``) and return it.

        Keys may be snake_case (``first_message=``) or camelCase. Retried like a read: sending
        the same PATCH body twice leaves the assistant as sending it once would. (A concurrent
        writer's change made between two attempts can be overwritten, as with any PATCH.)
        """
        path = "/assistant/" + check_id("assistant_id", assistant_id)
        body = update_assistant_body(changes)
        request = self._http.build_request("PATCH", self._url(path), json=body)
        return self._read(VapiAssistant, await self._exchange(request, auth=self._auth))

    async def list_phone_numbers(self) -> list[VapiPhoneNumber]:
        """List the org's phone numbers (``GET /phone-number``)."""
        return self._read_list(VapiPhoneNumber, await self._get("/phone-number", None))

    def _url(self, path: str) -> str:
        return self._base_url + path

    async def _get(self, path: str, params: Mapping[str, str] | None) -> httpx.Response:
        request = self._http.build_request("GET", self._url(path), params=params)
        return await self._exchange(request, auth=self._auth)

    def _read_list(self, model: type[M], response: httpx.Response) -> list[M]:
        """A list answer (bare, or paginated as ``{"results": [...]}``) as ``model`` items."""
        data = self._json(self._checked(response))
        if isinstance(data, Mapping) and isinstance(data.get("results"), list):
            data = data["results"]
        if not isinstance(data, list):
            raise self._unreadable_error(
                response,
                f"the {response.status_code} answer did not match the list[{model.__name__}] "
                "model; this library's model may be out of date",
                FailureKind.PERMANENT,
            )
        return [self._model(model, item, response) for item in data]

    def _api_error(self, response: httpx.Response, kind: FailureKind | None = None) -> VapiAPIError:
        """Vapi's error for an answer; listeners hear of a refusal over concurrency.

        With ``kind`` given the answer is the cause of an unknown outcome (the call may exist),
        which is not a refusal.
        """
        if kind is not None:
            return error_from_response(response, kind)
        # A create's 429 is "not processed" only when the caller said so (unprocessed_429).
        request = response.request
        create = request.method == "POST" and request.url.path.endswith("/call")
        unprocessed = self._create_unprocessed if create else _NO_STATUSES
        kind = classify_status(response.status_code, unprocessed) or FailureKind.PERMANENT
        error = error_from_response(response, kind)
        if isinstance(error, VapiConcurrencyLimitError):
            self._concurrency("refused", None, error)
        return error

    def _unreadable_error(
        self, response: httpx.Response, message: str, kind: FailureKind
    ) -> VapiAPIError:
        return VapiAPIError(
            response.status_code, message, kind, body=response.text[:500], code=UNREADABLE
        )

    @staticmethod
    def _log_unknown(attempt_id: str, cause: BaseException | None) -> None:
        _log.warning(
            "vapi create_call outcome unknown (attempt %s, %s): reconcile before retrying",
            attempt_id,
            type(cause).__name__,
        )

    def _concurrency(
        self,
        outcome: Literal["blocked", "refused"],
        call: VapiCall | None,
        error: VapiAPIError | None,
    ) -> None:
        if call is not None:
            limits = call.subscription_limits
            _log.warning(
                "vapi call %s created while concurrency-blocked (limit %s, remaining %s)",
                call.id,
                limits.concurrency_limit if limits is not None else None,
                limits.remaining_concurrent_calls if limits is not None else None,
            )
        else:
            _log.warning(
                "vapi refused: org over its call concurrency (HTTP %s)",
                error.status if error is not None else None,
            )
        if self._listeners:
            dispatch(self._listeners, ConcurrencyBlocked(self._name, outcome))


def _find_attempt(calls: Sequence[VapiCall], attempt_id: str) -> VapiCall | None:
    """The call whose planted attempt id is ``attempt_id``, if listed."""
    for call in calls:
        if call.attempt_id == attempt_id:
            return call
    return None


def _carries_server_url(body: Mapping[str, Any]) -> bool:
    """Whether the create names where Vapi sends this call's server messages."""
    for source in (body.get("assistantOverrides"), body.get("assistant")):
        if not isinstance(source, Mapping):
            continue
        server = source.get("server")
        if isinstance(server, Mapping) and isinstance(server.get("url"), str):
            return True
        if isinstance(source.get("serverUrl"), str):  # the older spelling
            return True
    return False


def _with_lease(body: Mapping[str, Any], lease: Lease) -> dict[str, Any]:
    """A copy of ``body`` with the lease's id and generation in the planted metadata."""
    overrides = dict(body["assistantOverrides"])
    overrides["metadata"] = {
        **overrides["metadata"],
        LEASE_KEY: lease.id,
        GENERATION_KEY: lease.generation,
    }
    return {**body, "assistantOverrides": overrides}
