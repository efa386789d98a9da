"""FakeTelephony: a fault-injecting Twilio and Vapi upstream, as an ASGI 3 app.

Serve it with :func:`resilient_voice.testing.serve` and point a client at the URL: it answers
the Twilio Calls/Messages and Vapi call/assistant/phone-number endpoints this library uses,
keeps their state, records every request, injects the faults of its script, paces Twilio calls
like Twilio does and sends signed webhooks when calls progress.

Served over loopback it runs on real time in the server's thread, so those tests use high rates
and short durations. In-process (``httpx.ASGITransport``) it can run on a ``ManualClock``
(``clock=``), with :meth:`FakeTelephony.running` starting its webhook sender in the test's own
task group instead of the ASGI lifespan.

Over 400 lines: :class:`FakeTelephony` is the fake's one public class. Its docstring states the
behaviour tests rely on, its constructor checks some twenty options and wires the parts, its
snapshot helpers are what tests read, and its per-request dispatch is the one place where the
fault script, the request records and the provider halves meet. What stands on its own lives
beside it: the HTTP side in ``_fake_http``, the providers in ``_fake_twilio`` and ``_fake_vapi``,
faults in ``_faults``, webhook delivery in ``_webhooks``, records in ``_records``.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import anyio

from resilient_voice import _validate
from resilient_voice._clock import SYSTEM_CLOCK, Clock
from resilient_voice._validate import number, optional_whole
from resilient_voice.asgi._types import Receive, Scope, Send
from resilient_voice.testing._fake_common import (
    Core,
    Request,
    Response,
    frozen_multi,
    span,
)
from resilient_voice.testing._fake_http import (
    DISCONNECTED,
    ENDPOINTS,
    NOT_ALLOWED,
    NOT_FOUND,
    parse_request,
    read_body,
    retry_after_value,
    route,
    send_part,
)
from resilient_voice.testing._fake_twilio import (
    TwilioApi,
    twilio_error,
    twilio_fault_response,
)
from resilient_voice.testing._fake_vapi import VapiApi, vapi_error, vapi_fault_response
from resilient_voice.testing._faults import CallbackFaults, Fault, FaultScript
from resilient_voice.testing._records import (
    CallbackRecord,
    CreatedCall,
    CreatedMessage,
    Provider,
    RecordedRequest,
)
from resilient_voice.testing._serve import DropConnectionError
from resilient_voice.testing._webhooks import WebhookSender

if TYPE_CHECKING:
    import httpx

__all__ = ["ENDPOINTS", "FakeTelephony"]

_DROPS = frozenset(("drop_before", "drop_after"))


class FakeTelephony:
    """A fault-injecting fake of the Twilio and Vapi REST APIs, as an ASGI 3 application.

    Twilio: ``POST/GET /2010-04-01/Accounts/{AccountSid}/Calls.json`` (create, list),
    ``GET/POST .../Calls/{CallSid}.json`` (fetch, update), ``POST .../Messages.json``,
    ``GET .../Messages/{MessageSid}.json``; form-encoded bodies; HTTP Basic auth with the
    Account SID and auth token or an API key SID and secret; Twilio's JSON bodies and error
    codes (20003, 20404, 20429, 20500, 20503, 21211...). Vapi: ``POST/GET /call``,
    ``GET /call/{id}``, ``GET /assistant``, ``GET/PATCH /assistant/{id}``,
    ``GET /phone-number``; Bearer auth; camelCase JSON and NestJS-style errors.

    Twilio pacing: each account dials at most ``calls_per_second``. Faster creations are
    accepted as ``queued`` (with a ``queue_time``), as Twilio does, and counted as CPS
    violations: a creation at time ``t`` violates when ``t < TAT - cps_tolerance``, where
    ``TAT`` (theoretical arrival time) is the conforming schedule of a token bucket with burst 1
    and rate ``cps`` (the GCRA). A violating call does not move ``TAT``, so one early call counts
    once and does not make the calls after it late. The tolerance absorbs scheduler and loopback
    jitter (a request that reaches the fake late, then one on time, look like a burst); 50 ms
    by default, so a client that paces at the same rate sees zero violations even on a loaded
    CI machine, while an unpaced burst of more than ``1 + cps_tolerance * cps`` calls is
    always caught.

    Calls move through queued, ringing (``ring_duration``), in-progress (``call_duration``) and
    completed (Vapi: ended); either duration may be a ``(min, max)`` range, drawn per call from
    the seed. With ``twilio_call_concurrency_limit`` an account holds at most that many calls
    in progress (dialled, not yet ended): a call that would be dialled over it is still created
    (``201``, ``queued``), then fails when it is dialled, with ``CallStatus=failed`` and
    ``ErrorCode=10004`` in its status callback, as Twilio does. Vapi reports
    ``subscriptionLimits`` on every created call; a call created while ``vapi_concurrency_limit``
    calls are active comes back ``concurrencyBlocked`` and ends at once with
    ``endedReason`` ``call.start.error-subscription-concurrency-limit-reached`` (Vapi documents
    that fate and waiting for a slot; the fake takes the first). :meth:`peak_calls_in_progress`
    tells how many calls held a slot at once.

    With ``status_callbacks`` the fake POSTs Twilio status callbacks (events from
    ``StatusCallbackEvent``, ``completed`` by default) to the call's ``StatusCallback`` URL,
    query string kept, signed with the account's auth token through
    ``twilio.request_validator.RequestValidator``; and Vapi ``status-update`` and
    ``end-of-call-report`` messages to the server URL (``assistantOverrides.server.url``, the
    assistant's ``server.url``, else ``vapi_server_url``) with the credential in
    ``vapi_credential_header``. Webhooks need a task group to run in: the ASGI lifespan's
    (``serve`` runs it) or the one :meth:`running` opens. ``callback_delay`` sends each
    webhook that long after its event (a range draws per webhook), from its own task.

    State is shared between the server's thread and the test's; every helper returns a
    snapshot taken under a lock. Time is read from ``clock``: seconds since the fake started
    (lifespan startup or :meth:`running`), or since construction. Fault windows, call
    lifetimes, CPS accounting, injected delays and webhook timing all follow it; the HTTP
    timeout of a webhook and the safety bound of a stalled answer stay on real time, because
    they bound real I/O.

    Args:
        seed: Seeds every random choice (ids, faults, webhook misbehaviour).
        twilio_accounts: Account SID (``AC...``) to auth token.
        twilio_api_keys: API key SID (``SK...``) to ``(account_sid, secret)``.
        vapi_api_keys: Accepted Vapi private keys.
        calls_per_second: Twilio CPS for every account, or per Account SID (others get 1).
        cps_tolerance: Seconds of earliness forgiven before a call counts as a CPS violation.
        call_duration: Seconds a call stays in progress, or a ``(min, max)`` range drawn per
            call from the seed.
        ring_duration: Seconds a call rings before it is answered, or a ``(min, max)`` range.
        status_callbacks: Send webhooks at all.
        callback_faults: Loss, duplication and reordering of webhooks.
        callback_timeout: Timeout of each webhook request, in seconds.
        callback_delay: Seconds between an event and its webhook, or a ``(min, max)`` range
            drawn per webhook from the seed (on top of any ``callback_faults`` reordering).
        twilio_concurrency_limit: Concurrent REST requests per account above which Twilio
            answers 429 (20429); None for no limit. Not calls: see the next option.
        twilio_call_concurrency_limit: Calls in progress per account; a call dialled over it
            fails (``ErrorCode`` 10004 in its status callback). None for no limit.
        vapi_server_url: The org-level Vapi server URL.
        vapi_credential: The secret sent with Vapi server messages.
        vapi_credential_header: The header that carries it (``Authorization`` gets ``Bearer``).
        vapi_assistants: Assistants to create, each a mapping of fields over the defaults.
        vapi_phone_numbers: Numbers of the Vapi phone numbers to create.
        vapi_concurrency_limit: Org call concurrency reported in ``subscriptionLimits``.
        faults: The fault script (see :class:`Fault`); settable later via :attr:`faults`.
        clock: Where time comes from (the library's ``Clock``); the system clock by default.
            A ``ManualClock`` is not thread-safe: use it only with the fake in the test's own
            event loop (``httpx.ASGITransport``), never behind ``serve``.

    Raises:
        ValueError, TypeError: Invalid configuration.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        twilio_accounts: Mapping[str, str] | None = None,
        twilio_api_keys: Mapping[str, tuple[str, str]] | None = None,
        vapi_api_keys: Iterable[str] = (),
        calls_per_second: float | Mapping[str, float] = 1.0,
        cps_tolerance: float = 0.05,
        call_duration: float | tuple[float, float] = 0.1,
        ring_duration: float | tuple[float, float] = 0.0,
        status_callbacks: bool = True,
        callback_faults: CallbackFaults | None = None,
        callback_timeout: float = 2.0,
        callback_delay: float | tuple[float, float] = 0.0,
        twilio_concurrency_limit: int | None = None,
        twilio_call_concurrency_limit: int | None = None,
        vapi_server_url: str | None = None,
        vapi_credential: str | None = None,
        vapi_credential_header: str = "X-Vapi-Secret",
        vapi_assistants: Sequence[Mapping[str, Any]] = ({},),
        vapi_phone_numbers: Sequence[str] = ("+15005550006",),
        vapi_concurrency_limit: int = 10,
        faults: Sequence[Fault] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        _validate.integer("seed", seed)
        accounts = dict(_mapping("twilio_accounts", twilio_accounts))
        for sid, token in accounts.items():
            if not (isinstance(sid, str) and sid.startswith("AC")):
                raise ValueError(f"twilio_accounts: Account SIDs start with 'AC', got {sid!r}")
            if not (isinstance(token, str) and token):
                raise ValueError(
                    f"twilio_accounts: the auth token of {sid} must be a non-empty str"
                )
        api_keys = dict(_mapping("twilio_api_keys", twilio_api_keys))
        for key_sid, pair in api_keys.items():
            if not (isinstance(key_sid, str) and key_sid.startswith("SK")):
                raise ValueError(f"twilio_api_keys: key SIDs start with 'SK', got {key_sid!r}")
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"twilio_api_keys: {key_sid} must map to (account_sid, secret)")
            if pair[0] not in accounts:
                raise ValueError(f"twilio_api_keys: {key_sid} names an unknown account {pair[0]!r}")
            if not (isinstance(pair[1], str) and pair[1]):
                raise ValueError(
                    f"twilio_api_keys: the secret of {key_sid} must be a non-empty str"
                )
        vapi_keys = _strings("vapi_api_keys", vapi_api_keys)
        if isinstance(calls_per_second, Mapping):
            cps = {sid: number("calls_per_second", v) for sid, v in calls_per_second.items()}
            default_cps = 1.0
        else:
            cps, default_cps = {}, number("calls_per_second", calls_per_second)
        tolerance = number("cps_tolerance", cps_tolerance, inclusive=True)
        duration = span("call_duration", call_duration)
        ring = span("ring_duration", ring_duration)
        timeout = number("callback_timeout", callback_timeout)
        delay = span("callback_delay", callback_delay)
        _validate.flag("status_callbacks", status_callbacks)
        _validate.optional_whole("twilio_concurrency_limit", twilio_concurrency_limit)
        call_limit = optional_whole("twilio_call_concurrency_limit", twilio_call_concurrency_limit)
        _validate.whole("vapi_concurrency_limit", vapi_concurrency_limit)
        if vapi_server_url is not None and not (
            isinstance(vapi_server_url, str)
            and vapi_server_url.isprintable()
            and vapi_server_url.startswith(("http://", "https://"))
            and len(vapi_server_url) > len("https://")
        ):
            raise ValueError(f"vapi_server_url must be an http(s) URL, got {vapi_server_url!r}")
        if vapi_credential is not None and not (
            isinstance(vapi_credential, str) and vapi_credential.strip()
        ):
            raise ValueError("vapi_credential must be None or a non-empty str")
        _validate.header("vapi_credential_header", vapi_credential_header)
        assistants = _collection("vapi_assistants", vapi_assistants)
        if not all(isinstance(assistant, Mapping) for assistant in assistants):
            raise TypeError("vapi_assistants must be mappings (assistant JSON)")
        numbers = _strings("vapi_phone_numbers", vapi_phone_numbers)
        rules = _collection("faults", faults)
        if not all(isinstance(rule, Fault) for rule in rules):
            raise TypeError(f"faults must be Fault rules, got {rules!r}")
        if not isinstance(clock, Clock):
            raise TypeError(f"clock must provide the Clock protocol, got {clock!r}")
        callback_faults = callback_faults if callback_faults is not None else CallbackFaults()
        if not isinstance(callback_faults, CallbackFaults):
            raise TypeError("callback_faults must be a CallbackFaults")

        self._core = Core(seed, clock)
        self._script = FaultScript(rules, self._core.faults)
        self._sender = WebhookSender(self._core, callback_faults, timeout, delay)
        self._twilio = TwilioApi(
            self._core,
            self._sender,
            accounts=accounts,
            api_keys=api_keys,
            calls_per_second=cps,
            default_cps=default_cps,
            cps_tolerance=tolerance,
            call_duration=duration,
            ring_duration=ring,
            status_callbacks=status_callbacks,
            concurrency_limit=twilio_concurrency_limit,
            call_concurrency_limit=call_limit,
        )
        self._vapi = VapiApi(
            self._core,
            self._sender,
            api_keys=vapi_keys,
            server_url=vapi_server_url,
            credential=vapi_credential,
            credential_header=vapi_credential_header,
            call_duration=duration,
            ring_duration=ring,
            status_callbacks=status_callbacks,
            assistants=assistants,
            phone_numbers=numbers,
            concurrency_limit=vapi_concurrency_limit,
        )
        self._requests: list[RecordedRequest] = []
        self._next_index = 0

    def __repr__(self) -> str:
        return (
            f"FakeTelephony(twilio_accounts={list(self._twilio.account_sids())}, "
            f"faults={len(self._script.faults)})"
        )

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The fault script. Assigning a new one starts its counts afresh."""
        return self._script.faults

    @faults.setter
    def faults(self, faults: Sequence[Fault]) -> None:
        self._script = FaultScript(faults, self._core.faults)

    @property
    def vapi_org_id(self) -> str:
        """The id of the fake Vapi org."""
        return self._vapi.org_id

    def elapsed(self) -> float:
        """Seconds since the fake started (the time fault windows refer to)."""
        return self._core.elapsed()

    def requests(self, endpoint: str | None = None) -> list[RecordedRequest]:
        """Recorded requests in arrival order, optionally only endpoints matching a glob."""
        with self._core.lock:
            rows = sorted(self._requests, key=lambda r: r.index)
        if endpoint is None:
            return rows
        return [r for r in rows if r.endpoint and fnmatch.fnmatchcase(r.endpoint, endpoint)]

    def calls(
        self, provider: Provider | None = None, *, to: str | None = None
    ) -> list[CreatedCall]:
        """Calls really created, in creation order (whatever the clients were told)."""
        with self._core.lock:
            rows = [*self._twilio.created_calls, *self._vapi.created_calls]
        rows.sort(key=lambda c: (c.time, c.request_index))
        return [
            c
            for c in rows
            if (provider is None or c.provider == provider) and (to is None or c.to == to)
        ]

    def messages(self) -> list[CreatedMessage]:
        """Twilio messages really created, in creation order."""
        with self._core.lock:
            return list(self._twilio.created_messages)

    def duplicate_destinations(self, provider: Provider | None = None) -> dict[str, int]:
        """Destination numbers called more than once, with how many calls each got."""
        counts: dict[str, int] = {}
        for call in self.calls(provider):
            counts[call.to] = counts.get(call.to, 0) + 1
        return {number: count for number, count in counts.items() if count > 1}

    def cps_violations(self, account_sid: str | None = None) -> int:
        """Twilio calls created faster than the account's CPS (see the class docstring)."""
        with self._core.lock:
            if account_sid is not None:
                return self._twilio.violations.get(account_sid, 0)
            return sum(self._twilio.violations.values())

    def peak_calls_in_progress(self, provider: Provider, *, account: str | None = None) -> int:
        """The most calls that held a concurrent-call slot at the same moment.

        Twilio: from dialled to ended (a queued call holds none, nor does one failed over the
        concurrency limit), per account when ``account`` is given, else over all accounts.
        Vapi: from created to ended (a blocked call holds none). Ends come from the calls'
        timelines, so calls not ended yet count as scheduled.
        """
        if provider == "twilio":
            return self._twilio.peak_in_progress(account)
        return self._vapi.peak_in_progress()

    def callbacks(self, kind: str | None = None) -> list[CallbackRecord]:
        """Webhook delivery attempts, in the order they finished."""
        with self._core.lock:
            rows = list(self._sender.records)
        return [r for r in rows if kind is None or r.kind == kind]

    def twilio_call(self, sid: str) -> dict[str, Any] | None:
        """The Twilio call resource as a fetch would return it now, or None."""
        with self._core.lock:
            call = self._twilio.calls.get(sid)
            return None if call is None else self._twilio.call_json(call, self._core.elapsed())

    def vapi_call(self, call_id: str) -> dict[str, Any] | None:
        """The Vapi call object as ``GET /call/{id}`` would return it now, or None."""
        with self._core.lock:
            call = self._vapi.calls.get(call_id)
            return None if call is None else self._vapi.call_json(call, self._core.elapsed())

    def vapi_assistants(self) -> list[dict[str, Any]]:
        """The Vapi assistants, in creation order (ids for ``assistantId``)."""
        with self._core.lock:
            return json.loads(json.dumps(list(self._vapi.assistants.values())))  # type: ignore[no-any-return]

    def vapi_phone_numbers(self) -> list[dict[str, Any]]:
        """The Vapi phone numbers, in creation order (ids for ``phoneNumberId``)."""
        with self._core.lock:
            return json.loads(json.dumps(list(self._vapi.phone_numbers.values())))  # type: ignore[no-any-return]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    @asynccontextmanager
    async def running(
        self, *, webhook_transport: httpx.AsyncBaseTransport | None = None
    ) -> AsyncIterator[Self]:
        """Start the fake's background work (webhooks, call progress) without an ASGI lifespan.

        What the lifespan does when :func:`serve` runs the fake, for tests that drive it
        in-process through ``httpx.ASGITransport(app=fake)``: the time origin moves to now, and
        webhooks are sent from a task group that lives as long as the ``async with`` block.
        Leaving the block cancels webhooks still pending and closes the webhook client.

        Args:
            webhook_transport: Deliver webhooks through this transport (for instance
                ``httpx.ASGITransport(app=receiver)``) instead of the network. The caller
                keeps ownership of it.

        Raises:
            RuntimeError: The fake is already running (here or under a lifespan).
        """
        if self._core.task_group is not None:
            raise RuntimeError("this FakeTelephony is already running")
        self._sender.transport = webhook_transport
        try:
            async with anyio.create_task_group() as group:
                self._core.task_group = group
                self._core.restart()
                try:
                    yield self
                finally:
                    group.cancel_scope.cancel()
        finally:
            self._core.task_group = None
            with anyio.CancelScope(shield=True):
                await self._sender.aclose()
            self._sender.transport = None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()
        async with self.running():
            await send({"type": "lifespan.startup.complete"})
            await receive()
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        if body is DISCONNECTED:
            return  # the client left mid-body: a real server processes nothing
        arrival = self._core.elapsed()
        with self._core.lock:
            index = self._next_index
            self._next_index += 1
        method: str = scope["method"]
        path: str = scope["path"]
        request = parse_request(scope, body or b"")
        twilio = path.startswith("/2010-04-01/")
        endpoint = route(method, path, request)
        account = request.params.get("account") if twilio else None
        inflight = self._twilio.enter(account) if account is not None else 0
        auth_user: str | None = None
        fault: Fault | None = None
        delay = 0.0
        try:
            if body is None:
                response = (
                    twilio_error(413, 20001, "Request body too large") if twilio else _too_large()
                )
            elif endpoint == NOT_FOUND:
                response = self._twilio.not_found(path) if twilio else self._vapi_missing(request)
            elif endpoint == NOT_ALLOWED:
                response = (
                    twilio_error(405, 20004, "Method not allowed")
                    if twilio
                    else self._vapi_missing(request)
                )
            else:
                decision = self._script.decide(endpoint, arrival)
                fault, delay = decision.fault, decision.delay
                if delay:
                    await self._core.clock.sleep(delay)
                if fault is not None and fault.kind in ("error", "rate_limit"):
                    status = 429 if fault.kind == "rate_limit" else fault.status
                    header = retry_after_value(fault.retry_after) if status == 429 else None
                    response = (
                        twilio_fault_response(status, header)
                        if twilio
                        else vapi_fault_response(status, header)
                    )
                elif fault is not None and fault.kind == "drop_before":
                    response = None
                else:
                    response, auth_user = self._process(endpoint, request, index, inflight)
            fault_name: str | None = fault.kind if fault is not None else None
            if response is not None and response.status == 429 and fault is None:
                fault_name = "concurrency"
            drop = fault if fault is not None and fault.kind in _DROPS else None
            self._record(
                index,
                arrival,
                request,
                endpoint,
                auth_user,
                None if drop is not None or response is None else response.status,
                fault_name,
                delay,
                response.created if response is not None else None,
            )
            if drop is not None:
                raise DropConnectionError(reset=drop.reset)
            if response is None:  # pragma: no cover  # only drop_before leaves it unset
                raise DropConnectionError
            if fault is not None and fault.kind == "drop_mid_body":
                await send_part(response, receive, send, stall=fault.stall)
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response.headers,
                }
            )
            await send({"type": "http.response.body", "body": response.body})
        finally:
            if account is not None:
                self._twilio.leave(account)

    def _process(
        self, endpoint: str, request: Request, index: int, inflight: int
    ) -> tuple[Response, str | None]:
        if endpoint.startswith("twilio."):
            user, ok = self._twilio.authenticate(request, request.params["account"])
            if not ok:
                return self._twilio.unauthorized(), user
            if self._twilio.over_concurrency(inflight):
                return twilio_error(429, 20429, "Too Many Requests"), user
            return self._twilio.handle(endpoint, request, index, inflight), user
        if not self._vapi.authenticate(request):
            return self._vapi.unauthorized(), None
        return self._vapi.handle(endpoint, request, index), None

    def _vapi_missing(self, request: Request) -> Response:
        return self._vapi.not_found(request.method, request.path)

    def _record(
        self,
        index: int,
        arrival: float,
        request: Request,
        endpoint: str,
        auth_user: str | None,
        status: int | None,
        fault: str | None,
        delay: float,
        created: str | None,
    ) -> None:
        headers = dict(request.headers)
        if "authorization" in headers:
            scheme = headers["authorization"].partition(" ")[0]
            headers["authorization"] = f"{scheme} <redacted>"
        record = RecordedRequest(
            index=index,
            time=arrival,
            method=request.method,
            path=request.path,
            endpoint=None if endpoint in (NOT_FOUND, NOT_ALLOWED) else endpoint,
            query=frozen_multi(request.query),
            form=frozen_multi(request.form),
            json=request.json,
            body=request.body,
            headers=headers,
            auth_user=auth_user,
            status=status,
            fault=fault,
            delay=delay,
            created=created,
        )
        with self._core.lock:
            self._requests.append(record)


def _mapping(name: str, value: object) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping, got {value!r}")
    return value


def _collection(name: str, value: object) -> tuple[Any, ...]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list, got {value!r}")
    return tuple(value)


def _strings(name: str, value: object) -> tuple[str, ...]:
    items = _collection(name, value)
    if not all(isinstance(item, str) and item and item.isprintable() for item in items):
        raise ValueError(f"{name} must hold non-empty strings, got {items!r}")
    return items


def _too_large() -> Response:
    return vapi_error(413, "request entity too large")
