"""TwilioClient: the typed, resilient client of Twilio's Calls and Messages API.

Twilio's operations only: the plumbing every client shares is in :mod:`.._provider`, the input
rules in :mod:`._validation`, the error bodies in :mod:`._errors`.

Over 400 lines: each operation's docstring is its user documentation (arguments, outcomes, what
to do after an unknown outcome), and one class is easier to read whole than spread over modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import httpx
from pydantic import BaseModel

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
from resilient_voice._request_checks import check_count
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.correlation import (
    correlation_scope,
    get_correlation_id,
    new_attempt_id,
    new_correlation_id,
)
from resilient_voice.errors import InvalidRequestError, OutcomeUnknownError
from resilient_voice.events import Listener
from resilient_voice.failure import FailureKind
from resilient_voice.http import (
    ATTEMPT_ID_EXTENSION,
    IDEMPOTENT_EXTENSION,
    LIMITER_KEY_EXTENSION,
)
from resilient_voice.leases import CallLeases, Lease
from resilient_voice.limiter import BucketStore
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy
from resilient_voice.twilio import _validation as check
from resilient_voice.twilio._errors import TwilioAPIError, api_error
from resilient_voice.twilio._models import Call, Message
from resilient_voice.twilio._policies import (
    resolve_policies,
    twilio_routes,
)

__all__ = ["TwilioClient"]

API = "/2010-04-01/Accounts"
_CALL_PARAMS = (
    "To",
    "From",
    "Url",
    "Twiml",
    "ApplicationSid",
    "Method",
    "StatusCallback",
    "StatusCallbackEvent",
    "StatusCallbackMethod",
)
_UPDATE_PARAMS = ("Status", "Url", "Twiml", "Method", "StatusCallback")
_MESSAGE_PARAMS = (
    "To",
    "From",
    "MessagingServiceSid",
    "Body",
    "MediaUrl",
    "ContentSid",
    "StatusCallback",
)
_RECONCILE_NOTE = (
    "resilient_voice: the request may have reached Twilio. Before trying again, reconcile: "
    "await client.reconcile_call(to=..., from_=..., since=...) lists recent calls to that "
    "number."
)
_CALLBACK_NOTE = " Status callbacks carrying {param}={attempt_id} belong to this attempt."
_LIVE_STATUSES = ("queued", "ringing", "in-progress")
_SKEW = timedelta(seconds=5)
_CONTEXT_MAX = 1024  # CallLeases.mark_unknown(context=)'s bound
_MESSAGE_NOTE = (
    "resilient_voice: the message may have been accepted by Twilio. Before sending again, "
    "check recent messages to that number (Messages list, or your status callbacks)."
)


def _query_param(option: str, name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name or quote(name, safe="_-.") != name:
        raise ValueError(f"{option} must be a plain URL-safe word, got {name!r}")
    return name


class TwilioClient(ProviderClient):
    """A typed client of Twilio's Calls and Messages API, resilient by default.

    Build one per account at startup and share it: it owns the connection pool, the account's
    circuit breaker and its pacing. Every operation runs under its own policy (see
    ``docs/twilio.md`` for the defaults); bad input raises
    :class:`~resilient_voice.InvalidRequestError` before anything is sent::

        async with TwilioClient(account_sid, auth_token, calls_per_second=5) as twilio:
            call = await twilio.create_call(
                to="+15551234567", from_="+15557654321", url="https://example.com/twiml",
                status_callback="https://example.com/status",
            )

    Args:
        account_sid: The account (``AC`` + 32 hex digits); always in the URL path.
        auth_token: The account's auth token, or ``None`` with ``api_key``/``api_secret``.
        api_key: An API key SID (``SK...``), used with ``api_secret`` instead of the token.
        api_secret: The API key's secret.
        base_url: Twilio's API host (a regional edge such as
            ``https://api.sydney.au1.twilio.com``, a proxy, or a fake in tests). Plain
            ``http://`` is accepted for loopback hosts only (``localhost``, 127.0.0.0/8,
            ``::1``): anywhere else it would send the credentials unencrypted.
        allow_insecure_http: Accept an ``http://`` ``base_url`` to a non-loopback host (a
            TLS-terminating sidecar, a test network). Off by default.
        policy: One policy for every operation (replaces all the defaults).
        policies: Policies by operation (``create_call``, ``send_message``, ``read``,
            ``update_call``), each replacing its default.
        breaker: The breaker the default policies share (default
            ``CircuitBreaker("twilio:<account_sid>")``).
        retry: The retry policy the default policies share (default 3 attempts).
        transport: The httpx transport that really sends (default
            ``httpx.AsyncHTTPTransport()``); the client wraps it in a
            :class:`~resilient_voice.http.ResilientTransport`.
        calls_per_second: The account's calls per second, paced by ``create_call``.
        messages_per_second: Messages per second per sender, paced by ``send_message``.
        timeout: Seconds for each attempt (the policies' and httpx's timeout).
        clock: Clock of the default primitives.
        correlation_param: Query parameter that carries the correlation id on the ``Url`` and
            ``StatusCallback`` sent to Twilio; ``None`` to leave the URLs alone.
        attempt_param: Query parameter that carries the attempt id there; ``None`` to disable.
        name: Label of the transport in listener events and metrics.
        listeners: Callables taking an event record
            (:class:`~resilient_voice.events.RequestFinished`).
        store: A shared :class:`~resilient_voice.limiter.BucketStore` (a
            ``resilient_voice.redis.RedisBackend``): the default policies' pacing
            (``calls_per_second``, ``messages_per_second``) then holds across every replica
            using this account; with a ``RedisBackend`` the default breaker also joins the
            fleet view (a 30 s window, ``minimum_calls=10``).
        leases: The account's :class:`~resilient_voice.CallLeases`: every ``create_call``
            then holds a call slot from before the request until the call's final status
            callback (``LeaseReleaseMiddleware`` releases it), and needs ``status_callback=``.
            See ``docs/leases.md``.
        lease_timeout: Seconds ``create_call`` waits for a slot before it raises
            :class:`~resilient_voice.CapacityExhaustedError`; ``None`` (default) waits until
            one frees, ``0`` takes one only if free now.

    Raises:
        TypeError, ValueError: Invalid configuration, at construction.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str | None = None,
        *,
        api_key: str | None = None,
        api_secret: str | None = None,
        base_url: str = "https://api.twilio.com",
        allow_insecure_http: bool = False,
        policy: Policy | None = None,
        policies: Mapping[str, Policy] | None = None,
        breaker: CircuitBreaker | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        calls_per_second: float = 1.0,
        messages_per_second: float = 1.0,
        timeout: float = 10.0,
        clock: Clock | None = None,
        correlation_param: str | None = "rv_cid",
        attempt_param: str | None = "rv_attempt",
        name: str = "twilio",
        listeners: Iterable[Listener] = (),
        store: BucketStore | None = None,
        leases: CallLeases | None = None,
        lease_timeout: float | None = None,
    ) -> None:
        self._leases, self._lease_timeout = check_leases(leases, lease_timeout)
        try:
            account = check.sid("account_sid", account_sid, "AC")
        except InvalidRequestError as exc:
            raise ValueError(str(exc)) from None
        if auth_token is not None:
            if api_key is not None or api_secret is not None:
                raise ValueError("authenticate with auth_token or with api_key + api_secret")
            if not isinstance(auth_token, str) or not auth_token.strip():
                raise ValueError("auth_token must be a non-empty str")
            user, secret = account, auth_token
        else:
            if api_key is None or api_secret is None:
                raise ValueError("give auth_token, or api_key and api_secret")
            try:
                user = check.sid("api_key", api_key, "SK")
            except InvalidRequestError as exc:
                raise ValueError(str(exc)) from None
            if not isinstance(api_secret, str) or not api_secret.strip():
                raise ValueError("api_secret must be a non-empty str")
            secret = api_secret
        parts = check_base_url(
            base_url,
            allow_insecure_http=allow_insecure_http,
            credentials="pass them as auth_token= or api_key=/api_secret=",
        )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("base_url is the scheme and host only (no path, query or fragment)")
        cps = check_timeout(calls_per_second, "calls_per_second")
        mps = check_timeout(messages_per_second, "messages_per_second")
        seconds = check_timeout(timeout)
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        policies_ = resolve_policies(
            policy,
            policies,
            account,
            calls_per_second=cps,
            messages_per_second=mps,
            timeout=seconds,
            breaker=breaker,
            retry=retry,
            clock=clock,
            store=store,
        )
        self._correlation_param = _query_param("correlation_param", correlation_param)
        self._attempt_param = _query_param("attempt_param", attempt_param)
        self._account = account
        self._auth_kind = "auth_token" if auth_token is not None else "api_key"
        self._base_url = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        resilient = build_transport(
            policies_, twilio_routes(policies_), transport=transport, name=name, listeners=listeners
        )
        http = httpx.AsyncClient(
            base_url=self._base_url,
            auth=httpx.BasicAuth(user, secret),
            transport=resilient,
            timeout=httpx.Timeout(seconds),
            headers={"Accept": "application/json", "User-Agent": "resilient-voice"},
            follow_redirects=False,
        )
        self._own(http, policies_, resilient)
        self._calls_path = f"{API}/{account}/Calls"
        self._messages_path = f"{API}/{account}/Messages"

    @property
    def account_sid(self) -> str:
        """The account this client acts on."""
        return self._account

    def __repr__(self) -> str:
        return (
            f"TwilioClient(account_sid={self._account!r}, auth={self._auth_kind}, "
            f"base_url={self._base_url!r})"
        )

    async def create_call(
        self,
        *,
        to: str,
        from_: str,
        url: str | None = None,
        twiml: str | None = None,
        application_sid: str | None = None,
        method: str | None = None,
        status_callback: str | None = None,
        status_callback_event: Iterable[str] | None = None,
        status_callback_method: str | None = None,
        **more: Any,
    ) -> Call:
        """Place an outbound call (``POST .../Calls.json``). Never sent twice.

        Args:
            to: E.164 number, or a ``client:``, ``sip:`` or ``sim:`` address.
            from_: A Twilio number or verified caller id (E.164), or ``client:``/``sip:``.
            url: Where Twilio fetches the call's TwiML. Exactly one of ``url``, ``twiml``,
                ``application_sid``.
            twiml: The call's TwiML itself (at most 4000 characters).
            application_sid: A TwiML App (``AP...``).
            method: ``GET`` or ``POST`` for ``url``.
            status_callback: Where Twilio reports call progress.
            status_callback_event: Events to report: ``initiated``, ``ringing``, ``answered``,
                ``completed`` (Twilio's default: ``completed`` only).
            status_callback_method: ``GET`` or ``POST``.
            **more: Further Twilio parameters under their own names (``Timeout=20``,
                ``MachineDetection="Enable"``), forwarded untouched.

        With ``leases=`` the call holds a lease: taken before anything is sent (waiting up to
        ``lease_timeout``), its id and generation planted next to ``rv_attempt`` on the
        ``Url`` and ``StatusCallback`` (``rv_lease``, ``rv_lease_gen``), bound to the new
        call's sid. A definite failure releases it; an unknown outcome keeps it for
        :meth:`reconcile_leases`.

        Returns:
            The call as Twilio created it (usually ``queued``), with ``correlation_id`` and
            ``attempt_id`` set.

        Raises:
            InvalidRequestError: Bad input (with ``leases=``: no ``status_callback``, or
                events without ``completed``); nothing was sent.
            CapacityExhaustedError: With ``leases=``, no call slot freed in time; nothing was
                sent.
            OutcomeUnknownError: The request may have reached Twilio and was not re-sent;
                reconcile (see :meth:`reconcile_call`) before trying again.
            TwilioAPIError: Twilio refused the call (for example 21211, invalid number).
            CircuitOpenError, RateLimitedError: Refused locally; nothing was sent.
        """
        # First: a parameter passed under Twilio's name (``Url=``) explains the errors below.
        extra = check.more_params(more, _CALL_PARAMS)
        form: dict[str, str | list[str]] = {
            "To": check.call_to(to),
            "From": check.call_from(from_),
        }
        source = check.one_of(url=url, twiml=twiml, application_sid=application_sid)
        cid = get_correlation_id() or new_correlation_id()
        attempt_id = new_attempt_id()
        if source == "url":
            form["Url"] = self._tag(check.url("url", url), cid, attempt_id)
        elif source == "twiml":
            form["Twiml"] = check.twiml(twiml)
        else:
            form["ApplicationSid"] = check.sid("application_sid", application_sid, "AP")
        if method is not None:
            form["Method"] = _http_method("method", method)
        if status_callback is not None:
            form["StatusCallback"] = self._tag(
                check.url("status_callback", status_callback), cid, attempt_id
            )
        if status_callback_event is not None:
            form["StatusCallbackEvent"] = check.call_events(status_callback_event)
        if status_callback_method is not None:
            form["StatusCallbackMethod"] = _http_method(
                "status_callback_method", status_callback_method
            )
        form.update(extra)
        if self._leases is not None:
            _lease_needs_callback(form)
            since = datetime.now(UTC) - _SKEW
            call, _ = await create_leased(
                self._leases,
                self._lease_timeout,
                attempt_id,
                lambda lease: self._create(_with_lease(form, lease), cid, attempt_id),
                lambda created: created.sid,
                _match_context(str(form["To"]), str(form["From"]), since),
            )
            return call
        return await self._create(form, cid, attempt_id)

    async def _create(self, form: Mapping[str, str | list[str]], cid: str, attempt_id: str) -> Call:
        try:
            response = await self._send(
                "POST", f"{self._calls_path}.json", form, cid=cid, attempt_id=attempt_id
            )
        except OutcomeUnknownError as exc:
            note = _RECONCILE_NOTE
            if self._attempt_param is not None and ("Url" in form or "StatusCallback" in form):
                note += _CALLBACK_NOTE.format(param=self._attempt_param, attempt_id=exc.attempt_id)
            exc.add_note(note)
            raise
        call = self._created(Call, response, attempt_id)
        call._correlation_id = cid
        call._attempt_id = attempt_id
        return call

    async def get_call(self, sid: str) -> Call:
        """Fetch a call (``GET .../Calls/{sid}.json``)."""
        call_sid = check.sid("sid", sid, "CA")
        response = await self._send("GET", f"{self._calls_path}/{call_sid}.json")
        return self._read(Call, response)

    async def list_calls(
        self,
        *,
        to: str | None = None,
        from_: str | None = None,
        status: str | None = None,
        page_size: int = 50,
        limit: int | None = 50,
    ) -> list[Call]:
        """List calls, newest first, following Twilio's pages up to ``limit`` calls.

        Args:
            to: Only calls to this address.
            from_: Only calls from this address.
            status: Only calls in this status (``queued``, ``completed``...).
            page_size: Calls per request, 1..1000.
            limit: Stop after this many calls; ``None`` reads every page.
        """
        page_size = check_count("page_size", page_size, 1, 1000)
        if limit is not None:
            limit = check_count("limit", limit, 1)
        params: dict[str, str] = {}
        if to is not None:
            params["To"] = check.call_to(to)
        if from_ is not None:
            params["From"] = check.call_from(from_)
        if status is not None:
            params["Status"] = check.text_value("status", status)
        if limit is not None:
            page_size = min(page_size, limit)
        params["PageSize"] = str(page_size)
        calls: list[Call] = []
        path: str | None = f"{self._calls_path}.json"
        query: dict[str, str] | None = params
        while path is not None:
            response = await self._send("GET", path, params=query)
            page = self._read(_CallsPage, response)
            for call in page.calls or ():
                calls.append(call)
                if limit is not None and len(calls) >= limit:
                    return calls
            next_uri = page.next_page_uri
            path = next_uri if isinstance(next_uri, str) and next_uri.startswith(API) else None
            query = None
        return calls

    async def update_call(
        self,
        sid: str,
        *,
        status: str | None = None,
        url: str | None = None,
        twiml: str | None = None,
        method: str | None = None,
        status_callback: str | None = None,
        **more: Any,
    ) -> Call:
        """Change a live call: end it (``status="completed"``/``"canceled"``) or redirect it.

        Ending a call is idempotent (ending it twice is the same as once), so it is retried
        like a read. Redirecting (``url`` or ``twiml``) restarts the call's instructions; a
        repeated redirect would restart them twice, so it is not retried once it may have
        arrived, and may raise :class:`~resilient_voice.OutcomeUnknownError`.

        Raises:
            InvalidRequestError: Bad input (including nothing to change); nothing was sent.
        """
        call_sid = check.sid("sid", sid, "CA")
        extra = check.more_params(more, _UPDATE_PARAMS)
        form: dict[str, str | list[str]] = {}
        if status is not None:
            if status not in check.UPDATE_STATUSES:
                raise InvalidRequestError(
                    "status", f"must be 'completed' or 'canceled', got {status!r}"
                )
            form["Status"] = status
        if url is not None and twiml is not None:
            raise InvalidRequestError("url", "give url= or twiml=, not both")
        if url is not None:
            form["Url"] = check.url("url", url)
        if twiml is not None:
            form["Twiml"] = check.twiml(twiml)
        if method is not None:
            form["Method"] = _http_method("method", method)
        if status_callback is not None:
            form["StatusCallback"] = check.url("status_callback", status_callback)
        form.update(extra)
        if not form:
            raise InvalidRequestError("status", "nothing to update")
        redirect = "Url" in form or "Twiml" in form
        response = await self._send(
            "POST", f"{self._calls_path}/{call_sid}.json", form, idempotent=not redirect
        )
        return self._read(Call, response)

    async def send_message(
        self,
        *,
        to: str,
        from_: str | None = None,
        messaging_service_sid: str | None = None,
        body: str | None = None,
        media_url: Iterable[str] | None = None,
        content_sid: str | None = None,
        status_callback: str | None = None,
        **more: Any,
    ) -> Message:
        """Send an SMS, MMS or channel message (``POST .../Messages.json``). Never sent twice.

        Paced per sender (``from_``, else ``messaging_service_sid``).

        Args:
            to: E.164 number or channel address (``whatsapp:+1...``).
            from_: The sender: E.164, short code, alphanumeric id or channel address.
            messaging_service_sid: A Messaging Service (``MG...``) instead of, or with, ``from_``.
            body: The text, at most 1600 characters.
            media_url: Up to 10 media URLs.
            content_sid: A content template (``HX...``).
            status_callback: Where Twilio reports delivery.
            **more: Further Twilio parameters under their own names, forwarded untouched.

        Raises:
            InvalidRequestError: Bad input; nothing was sent.
            OutcomeUnknownError: The request may have reached Twilio and was not re-sent.
            TwilioAPIError: Twilio refused the message.
        """
        extra = check.more_params(more, _MESSAGE_PARAMS)
        form: dict[str, str | list[str]] = {"To": check.message_to(to)}
        if from_ is None and messaging_service_sid is None:
            raise InvalidRequestError("from_", "give from_= or messaging_service_sid=")
        if from_ is not None:
            form["From"] = check.message_from(from_)
        if messaging_service_sid is not None:
            form["MessagingServiceSid"] = check.sid(
                "messaging_service_sid", messaging_service_sid, "MG"
            )
        if body is None and media_url is None and content_sid is None:
            raise InvalidRequestError("body", "a message needs body=, media_url= or content_sid=")
        if body is not None:
            form["Body"] = check.body(body)
        if media_url is not None:
            form["MediaUrl"] = check.media_urls(media_url)
        if content_sid is not None:
            form["ContentSid"] = check.sid("content_sid", content_sid, "HX")
        cid = get_correlation_id() or new_correlation_id()
        attempt_id = new_attempt_id()
        if status_callback is not None:
            form["StatusCallback"] = self._tag(
                check.url("status_callback", status_callback), cid, attempt_id
            )
        form.update(extra)
        sender = str(form.get("From") or form["MessagingServiceSid"])
        try:
            response = await self._send(
                "POST",
                f"{self._messages_path}.json",
                form,
                cid=cid,
                attempt_id=attempt_id,
                key=sender,
            )
        except OutcomeUnknownError as exc:
            exc.add_note(_MESSAGE_NOTE)
            raise
        return self._created(Message, response, attempt_id)

    async def get_message(self, sid: str) -> Message:
        """Fetch a message (``GET .../Messages/{sid}.json``)."""
        message_sid = check.sid("sid", sid, "SM", "MM")
        response = await self._send("GET", f"{self._messages_path}/{message_sid}.json")
        return self._read(Message, response)

    async def reconcile_call(
        self,
        *,
        to: str,
        from_: str | None = None,
        since: datetime | None = None,
        limit: int = 20,
    ) -> list[Call]:
        """Calls to ``to`` created at or after ``since``: did an unknown-outcome call happen?

        After :class:`~resilient_voice.OutcomeUnknownError` from :meth:`create_call`, note the
        time before the call (``datetime.now(UTC)``) and ask here; an empty list means Twilio
        has no such call (yet: a call may take a moment to appear). Twilio's dates have
        one-second precision and its clock is not yours: take ``since`` a few seconds early.
        """
        if since is not None and since.tzinfo is None:
            raise InvalidRequestError("since", "must be timezone-aware (UTC)")
        calls = await self.list_calls(to=to, from_=from_, limit=limit)
        return _created_since(calls, since)

    async def reconcile_leases(self, *, settle_after: float = SETTLE_AFTER) -> int:
        """Settle this account's leases against the calls Twilio lists as live.

        Run it periodically (every minute or so) on one replica or all: it is what reclaims a
        slot whose final status callback was lost before its TTL would. It notes the time on
        the leases' clock, then lists the calls ``queued``, ``ringing`` and ``in-progress``
        (every page). Every lease of the set whose create had an unknown outcome, whichever
        replica sent it, is settled first, as :meth:`reconcile_call` would match it (the
        destination and caller, created since the attempt, as the sending client stored them
        with the lease's unknown mark): bound to the call at once when one is live; released
        when none is and the lease was marked at least ``settle_after`` seconds ago; otherwise
        left held for the next run. Then :meth:`CallLeases.reconcile
        <resilient_voice.CallLeases.reconcile>` frees every lease bound before that time whose
        call is no longer listed. A replica that crashed after an unknown outcome leaves its
        lease to any other's reconciliation, not to the TTL. (A lease marked without a
        context this client can read, such as one whose addresses were too long to store, is
        left to the TTL.)

        Why wait: a create the client gave up on (a timeout, a dropped connection) may still
        be in flight and be processed by Twilio after this listing; releasing its lease then
        would let that call run without a slot, over the account's concurrent-call limit.
        Holding it a while costs a slot during an incident; the TTL frees it in any case.

        Args:
            settle_after: Seconds from the lease's unknown mark (when the client gave up on the
                create; on the leases' clock, compared with the time noted before the listing)
                after which a create Twilio does not list is taken to have created nothing. It
                must cover how long Twilio may still hold, or show late, a request the client
                gave up on; the create's own attempts, backoff and rate-limit waits came before
                the mark and need no margin. The default, 120 s, is ample for Twilio's request
                handling. ``0`` releases at once (only safe when nothing can still be in
                flight).

        Returns:
            How many bound leases were freed because their call is no longer live.

        Raises:
            TypeError: ``settle_after`` not a number.
            ValueError: ``settle_after`` negative or not finite.
            RuntimeError: The client has no ``leases=``.
            TwilioAPIError, CircuitOpenError, ...: Listing the calls failed; nothing changed.
        """
        settle = check_settle_after(settle_after)
        leases = self._require_leases()
        unknown = await leases.unknown()
        as_of = leases.clock.now()
        live: list[Call] = []
        for status in _LIVE_STATUSES:
            live += await self.list_calls(status=status, page_size=1000, limit=None)
        for lease in unknown:
            context = _read_context(lease.context)
            if context is None:
                continue  # not a context this client wrote: left to the TTL
            to, from_, since = context
            found = [c for c in _created_since(live, since) if c.to == to and c.from_ == from_]
            if not found and not settled(lease, as_of, settle):
                continue  # its create may still be processed: held, looked at again next run
            with anyio.CancelScope(shield=True):
                if found:
                    await leases.bind(lease, found[-1].sid)  # newest first: the oldest match
                else:
                    await lease.release()
        return await leases.reconcile([c.sid for c in live], as_of=as_of)

    def _tag(self, url: str, cid: str, attempt_id: str) -> str:
        """Add the correlation and attempt ids to a URL's query, keeping everything else.

        The query is appended to, not re-encoded, so the URL Twilio requests (and signs) is
        the caller's URL plus our parameters. A correlation parameter already present is left
        as it is (the caller's id wins); the attempt parameter is reserved. The fragment
        (Twilio's connection overrides, ``#rc=3``) is kept.
        """
        extra = []
        parts = urlsplit(url)
        present = {pair.partition("=")[0] for pair in parts.query.split("&") if pair}
        if self._correlation_param is not None and self._correlation_param not in present:
            extra.append(f"{self._correlation_param}={quote(cid, safe='')}")
        if self._attempt_param is not None:
            if self._attempt_param in present:
                # Callbacks must carry the id that OutcomeUnknownError reports, not another.
                raise InvalidRequestError(
                    "url", f"the query parameter {self._attempt_param!r} is reserved"
                )
            extra.append(f"{self._attempt_param}={quote(attempt_id, safe='')}")
        if not extra:
            return url
        query = "&".join([parts.query, *extra] if parts.query else extra)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))

    async def _send(
        self,
        method: str,
        path: str,
        form: Mapping[str, str | list[str]] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        cid: str | None = None,
        attempt_id: str | None = None,
        key: str | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        request = self._http.build_request(method, path, data=form, params=params)
        if idempotent is not None:
            request.extensions[IDEMPOTENT_EXTENSION] = idempotent
        if key is not None:
            request.extensions[LIMITER_KEY_EXTENSION] = key
        if attempt_id is not None:
            request.extensions[ATTEMPT_ID_EXTENSION] = attempt_id
        if cid is not None and get_correlation_id() is None:
            # The id generated for this call: its request header and its webhooks share it.
            with correlation_scope(cid):
                return await self._exchange(request)
        return await self._exchange(request)

    def _api_error(
        self, response: httpx.Response, kind: FailureKind | None = None
    ) -> TwilioAPIError:
        return api_error(response, kind)

    def _unreadable_error(
        self, response: httpx.Response, message: str, kind: FailureKind
    ) -> TwilioAPIError:
        return TwilioAPIError(response.status_code, UNREADABLE, message, kind)


def _match_context(to: str, from_: str, since: datetime) -> str | None:
    """What any replica's :meth:`TwilioClient.reconcile_leases` needs to find an unknown
    create's call, stored with its lease's mark: the destination, the caller and the attempt's
    start (whole seconds, rounded down, like Twilio's dates), as compact JSON.

    ``None`` when it would not fit the lease's bound (addresses of hundreds of characters):
    that lease is then left to the TTL.
    """
    text = json.dumps(
        {"to": to, "from": from_, "since": math.floor(since.timestamp())}, separators=(",", ":")
    )
    return text if len(text) <= _CONTEXT_MAX else None


def _read_context(text: str | None) -> tuple[str, str, datetime] | None:
    """``(to, from, since)`` from a context :func:`_match_context` wrote, else ``None``."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    to, from_, since = data.get("to"), data.get("from"), data.get("since")
    if not isinstance(to, str) or not isinstance(from_, str):
        return None
    if not isinstance(since, int) or isinstance(since, bool):
        return None
    try:
        return to, from_, datetime.fromtimestamp(since, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _created_since(calls: Sequence[Call], since: datetime | None) -> list[Call]:
    """The calls created at or after ``since`` (Twilio's dates have whole seconds)."""
    if since is None:
        return list(calls)
    floor = since.replace(microsecond=0)
    return [c for c in calls if c.date_created is None or c.date_created >= floor]


def _lease_needs_callback(form: Mapping[str, str | list[str]]) -> None:
    """Refuse a leased create whose final status would never be reported."""
    if "StatusCallback" not in form:
        raise InvalidRequestError(
            "status_callback",
            "a create with leases= needs status_callback=: the lease is released by the call's "
            "final status callback (without it the slot would only come back by TTL)",
        )
    for name in ("Url", "StatusCallback"):
        url = form.get(name)
        if isinstance(url, str):
            present = {pair.partition("=")[0] for pair in urlsplit(url).query.split("&")}
            if present & {LEASE_KEY, GENERATION_KEY}:
                raise InvalidRequestError(
                    "status_callback" if name == "StatusCallback" else "url",
                    f"the query parameters {LEASE_KEY!r} and {GENERATION_KEY!r} are reserved",
                )
    events = form.get("StatusCallbackEvent")
    if isinstance(events, list) and "completed" not in events:
        raise InvalidRequestError(
            "status_callback_event",
            "with leases=, include 'completed': the final status callback releases the lease",
        )


def _with_lease(form: Mapping[str, str | list[str]], lease: Lease) -> dict[str, str | list[str]]:
    """``form`` with the lease's id and generation added to the query of its callback URLs."""
    planted = dict(form)
    extra = f"{LEASE_KEY}={quote(lease.id, safe='')}&{GENERATION_KEY}={lease.generation}"
    for name in ("Url", "StatusCallback"):
        url = planted.get(name)
        if isinstance(url, str):
            parts = urlsplit(url)
            query = f"{parts.query}&{extra}" if parts.query else extra
            planted[name] = urlunsplit(
                (parts.scheme, parts.netloc, parts.path, query, parts.fragment)
            )
    return planted


def _http_method(field: str, value: object) -> str:
    text = check.text_value(field, value).upper()
    if text not in ("GET", "POST"):
        raise InvalidRequestError(field, "must be GET or POST")
    return text


class _CallsPage(BaseModel):
    """One page of ``GET .../Calls.json``: only what paging needs (extra keys ignored)."""

    calls: list[Call] | None = None
    next_page_uri: str | None = None
