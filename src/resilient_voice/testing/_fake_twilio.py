"""The Twilio half of the fake: Calls and Messages of the 2010-04-01 REST API.

Bodies follow the reference (``/work/shared/reference/telephony-apis.md`` in the repository):
snake_case JSON, RFC 2822 dates, ``direction`` ``outbound-api``, errors as ``{"code", "message",
"more_info", "status"}``. Calls over the account's calls-per-second are accepted and queued, as
Twilio does, and counted as CPS violations.

Over 400 lines: it is one provider's fake, endpoint by endpoint. Each handler checks a request as
Twilio does (with its error codes), changes the state the endpoints share (calls, messages, the
per-account CPS schedule, requests in flight) and answers in Twilio's shape, in the order of the
reference, so the two can be read side by side. What needs none of that state lives elsewhere:
the HTTP plumbing in ``_fake_common`` and ``_fake_http``, webhook delivery in ``_webhooks``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import anyio

from resilient_voice._request_checks import E164
from resilient_voice.testing._fake_common import (
    Core,
    Request,
    Response,
    Span,
    html_response,
    json_response,
    peak,
)
from resilient_voice.testing._records import CreatedCall, CreatedMessage
from resilient_voice.testing._webhooks import WebhookSender

API_VERSION = "2010-04-01"
PREFIX = f"/{API_VERSION}/Accounts/"
_DOCS = "https://www.twilio.com/docs/errors/"
_WWW_AUTHENTICATE = (b"www-authenticate", b'Basic realm="Twilio API"')
_CALL_EVENTS = ("initiated", "ringing", "answered", "completed")
_ENDED = frozenset(("completed", "canceled", "busy", "failed", "no-answer"))
CALL_CONCURRENCY_ERROR = 10004
_CALL_CONCURRENCY_MESSAGE = "Call concurrency limit exceeded"
_CALL_ADDRESS_SCHEMES = ("client:", "sip:", "sim:")
_MESSAGE_ADDRESS_SCHEMES = ("whatsapp:", "messenger:", "rcs:")
_GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€"
)


def twilio_error(
    status: int, code: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    """A Twilio error body: ``{"code", "message", "more_info", "status"}``."""
    payload = {"code": code, "message": message, "more_info": f"{_DOCS}{code}", "status": status}
    return json_response(status, payload, headers=headers)


def twilio_fault_response(status: int, retry_after: str | None) -> Response:
    """What Twilio's edge answers for an injected 5xx or 429."""
    if status == 429:
        headers = [(b"retry-after", retry_after.encode())] if retry_after is not None else []
        return twilio_error(429, 20429, "Too Many Requests", headers)
    if status == 500:
        return twilio_error(500, 20500, "An internal server error has occurred")
    if status == 503:
        return twilio_error(503, 20503, "Service Unavailable")
    return html_response(status, "Bad Gateway" if status == 502 else "Gateway Error")


def _formatted(number: str) -> str:
    if len(number) == 12 and number.startswith("+1") and number[1:].isdigit():
        return f"({number[2:5]}) {number[5:8]}-{number[8:]}"
    return number


def _rfc2822(core: Core, elapsed: float | None) -> str | None:
    return None if elapsed is None else format_datetime(core.wall(elapsed))


@dataclass(slots=True)
class TwilioCall:
    """A call's fixed timeline; its status at any moment follows from it."""

    sid: str
    account_sid: str
    to: str
    from_: str
    created: float
    dial_at: float
    answer_at: float
    end_at: float
    status_callback: str | None
    callback_method: str
    events: frozenset[str]
    phone_number_sid: str
    changed: anyio.Event | None = None
    ended_status: str | None = None
    ended_at: float | None = None
    error_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def status(self, now: float) -> str:
        if self.ended_status is not None and self.ended_at is not None and now >= self.ended_at:
            return self.ended_status
        if now < self.dial_at:
            return "queued"
        if now < self.answer_at:
            return "ringing"
        if now < self.end_at:
            return "in-progress"
        return "completed"

    def finished_at(self) -> float:
        return self.ended_at if self.ended_at is not None else self.end_at

    def occupies(self) -> tuple[float, float]:
        """When the call holds one of the account's concurrent-call slots: dialled to ended.

        Empty for a call that ended before it was dialled (canceled in the queue, failed over
        the concurrency limit).
        """
        return self.dial_at, max(self.dial_at, self.finished_at())


class TwilioApi:
    """Handlers and state for the Twilio endpoints; called under the server loop."""

    def __init__(
        self,
        core: Core,
        sender: WebhookSender,
        *,
        accounts: Mapping[str, str],
        api_keys: Mapping[str, tuple[str, str]],
        calls_per_second: Mapping[str, float],
        default_cps: float,
        cps_tolerance: float,
        call_duration: Span,
        ring_duration: Span,
        status_callbacks: bool,
        concurrency_limit: int | None,
        call_concurrency_limit: int | None,
    ) -> None:
        self._core = core
        self._sender = sender
        self._accounts = dict(accounts)
        self._api_keys = dict(api_keys)
        self._cps = dict(calls_per_second)
        self._default_cps = default_cps
        self._tolerance = cps_tolerance
        self._call_duration = call_duration
        self._ring_duration = ring_duration
        self._status_callbacks = status_callbacks
        self._concurrency_limit = concurrency_limit
        self._call_concurrency_limit = call_concurrency_limit
        self.calls: dict[str, TwilioCall] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.created_calls: list[CreatedCall] = []
        self.created_messages: list[CreatedMessage] = []
        self.violations: dict[str, int] = {}
        self._tat: dict[str, float] = {}
        self._next_dial: dict[str, float] = {}
        self._inflight: dict[str, int] = {}

    def account_sids(self) -> tuple[str, ...]:
        return tuple(self._accounts)

    def authenticate(self, request: Request, account_sid: str) -> tuple[str | None, bool]:
        """The Basic-auth user name and whether it may act on ``account_sid``."""
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, False
        user, sep, password = decoded.partition(":")
        if not sep:
            return user, False
        if user.startswith("SK"):
            key = self._api_keys.get(user)
            ok = (
                key is not None
                and key[0] == account_sid
                and hmac.compare_digest(key[1].encode(), password.encode())
            )
            return user, ok
        token = self._accounts.get(user)
        ok = (
            token is not None
            and user == account_sid
            and hmac.compare_digest(token.encode(), password.encode())
        )
        return user, ok

    def enter(self, account_sid: str) -> int:
        """Count a request in flight for the account; returns the new count."""
        with self._core.lock:
            count = self._inflight.get(account_sid, 0) + 1
            self._inflight[account_sid] = count
        return count

    def leave(self, account_sid: str) -> None:
        with self._core.lock:
            self._inflight[account_sid] = self._inflight.get(account_sid, 1) - 1

    def over_concurrency(self, inflight: int) -> bool:
        return self._concurrency_limit is not None and inflight > self._concurrency_limit

    def handle(
        self, endpoint: str, request: Request, request_index: int, inflight: int
    ) -> Response:
        """Answer an authenticated request to ``endpoint``."""
        account = request.params["account"]
        headers = [
            (b"twilio-request-id", self._core.hex_sid("RQ").encode()),
            (b"twilio-concurrent-requests", str(inflight).encode()),
        ]
        if endpoint == "twilio.calls.create":
            response = self._create_call(request, account, request_index)
        elif endpoint == "twilio.calls.fetch":
            response = self._fetch_call(request, account)
        elif endpoint == "twilio.calls.update":
            response = self._update_call(request, account)
        elif endpoint == "twilio.calls.list":
            response = self._list_calls(request, account)
        elif endpoint == "twilio.messages.create":
            response = self._create_message(request, account, request_index)
        else:
            response = self._fetch_message(request, account)
        response.headers.extend(headers)
        return response

    def not_found(self, path: str) -> Response:
        return twilio_error(404, 20404, f"The requested resource {path} was not found")

    def unauthorized(self) -> Response:
        return twilio_error(401, 20003, "Authenticate", [_WWW_AUTHENTICATE])

    def _cps_for(self, account: str) -> float:
        return self._cps.get(account, self._default_cps)

    def _create_call(self, request: Request, account: str, request_index: int) -> Response:
        to = request.first("To")
        from_ = request.first("From")
        if not to:
            return twilio_error(400, 21201, "No 'To' number is specified")
        if not from_:
            return twilio_error(400, 21213, "No 'From' number is specified")
        if not (E164.fullmatch(to) or to.startswith(_CALL_ADDRESS_SCHEMES)):
            return twilio_error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not (E164.fullmatch(from_) or from_.startswith("client:")):
            return twilio_error(400, 21212, f"Invalid 'From' Phone Number: {from_}")
        if not (request.first("Url") or request.first("Twiml") or request.first("ApplicationSid")):
            return twilio_error(400, 21205, "Url parameter is required.")
        method = (request.first("StatusCallbackMethod") or "POST").upper()
        if method not in ("GET", "POST"):
            return twilio_error(400, 21209, f"Invalid StatusCallbackMethod: {method}")
        events = frozenset(
            event
            for value in request.form.get("StatusCallbackEvent", [])
            for event in value.split()
            if event in _CALL_EVENTS
        ) or frozenset(("completed",))
        sid = self._core.hex_sid("CA")
        phone_number_sid = self._core.hex_sid("PN")
        with self._core.lock:
            now = self._core.elapsed()
            interval = 1.0 / self._cps_for(account)
            tat = self._tat.get(account, -math.inf)
            violation = now < tat - self._tolerance
            if violation:
                self.violations[account] = self.violations.get(account, 0) + 1
            else:
                self._tat[account] = max(now, tat) + interval
            dial_at = max(now, self._next_dial.get(account, now))
            self._next_dial[account] = dial_at + interval
            answer_at = dial_at + self._core.draw(self._ring_duration, self._core.durations)
            end_at = answer_at + self._core.draw(self._call_duration, self._core.durations)
            over = self._over_call_concurrency(account, dial_at)
            call = TwilioCall(
                sid=sid,
                account_sid=account,
                to=to,
                from_=from_,
                created=now,
                dial_at=dial_at,
                answer_at=answer_at,
                end_at=end_at,
                status_callback=request.first("StatusCallback") or None,
                callback_method=method,
                events=events,
                phone_number_sid=phone_number_sid,
            )
            if over:
                # Twilio accepts the create and fails the call when it would be dialled.
                call.ended_status, call.ended_at = "failed", dial_at
                call.error_code = CALL_CONCURRENCY_ERROR
            self.calls[sid] = call
            # Twilio answers a create with the call still queued, whatever happens next.
            resource = self.call_json(call, now) | {
                "status": "queued",
                "start_time": None,
                "end_time": None,
                "duration": None,
                "date_updated": _rfc2822(self._core, now),
            }
            self.created_calls.append(
                CreatedCall(
                    provider="twilio",
                    id=sid,
                    account=account,
                    to=to,
                    from_=from_,
                    time=now,
                    request_index=request_index,
                    queue_time=dial_at - now,
                    cps_violation=violation,
                    callback_url=call.status_callback,
                    resource=resource,
                )
            )
        if call.status_callback and self._status_callbacks:
            call.changed = anyio.Event()
            self._core.spawn(self._run_call, call)
        return json_response(201, resource, created=sid)

    def _over_call_concurrency(self, account: str, dial_at: float) -> bool:
        """Whether the account's calls in progress at ``dial_at`` already fill its limit.

        Calls are dialled in creation order, so every call that could hold a slot then is
        already known; one ended early later (an update) counts as it was known now.
        """
        limit = self._call_concurrency_limit
        if limit is None:
            return False
        busy = 0
        for other in self.calls.values():
            if other.account_sid != account:
                continue
            start, end = other.occupies()
            if start <= dial_at < end:
                busy += 1
        return busy >= limit

    def peak_in_progress(self, account: str | None) -> int:
        """The most calls that held a concurrent-call slot at once (see :meth:`occupies`)."""
        with self._core.lock:
            spans = [
                call.occupies()
                for call in self.calls.values()
                if account is None or call.account_sid == account
            ]
        return peak(spans)

    def call_json(self, call: TwilioCall, now: float) -> dict[str, Any]:
        """The call resource as Twilio would return it at ``now``."""
        core = self._core
        status = call.status(now)
        ended = status in _ENDED
        finished = call.finished_at()
        answered = call.answer_at if call.answer_at <= min(now, finished) else None
        started = call.dial_at if call.dial_at <= min(now, finished) else None
        points = [call.created]
        points += [t for t in (started, answered) if t is not None]
        if ended:
            points.append(finished)
        updated = max(points)
        duration = str(int(finished - answered)) if ended and answered is not None else None
        uri = f"{PREFIX}{call.account_sid}/Calls/{call.sid}"
        return {
            "account_sid": call.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": _rfc2822(core, call.created),
            "date_updated": _rfc2822(core, updated),
            "direction": "outbound-api",
            "duration": duration,
            "end_time": _rfc2822(core, finished) if ended else None,
            "forwarded_from": None,
            "from": call.from_,
            "from_formatted": _formatted(call.from_),
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": call.phone_number_sid,
            "price": None,
            "price_unit": "USD",
            "queue_time": str(round((call.dial_at - call.created) * 1000)),
            "sid": call.sid,
            "start_time": _rfc2822(core, started),
            "status": status,
            "subresource_uris": {
                "events": f"{uri}/Events.json",
                "notifications": f"{uri}/Notifications.json",
                "payments": f"{uri}/Payments.json",
                "recordings": f"{uri}/Recordings.json",
                "streams": f"{uri}/Streams.json",
                "transcriptions": f"{uri}/Transcriptions.json",
            },
            "to": call.to,
            "to_formatted": _formatted(call.to),
            "trunk_sid": None,
            "uri": f"{uri}.json",
        }

    def _call(self, request: Request, account: str) -> TwilioCall | None:
        call = self.calls.get(request.params["sid"])
        return call if call is not None and call.account_sid == account else None

    def _fetch_call(self, request: Request, account: str) -> Response:
        with self._core.lock:
            call = self._call(request, account)
            if call is None:
                return self.not_found(request.path)
            return json_response(200, self.call_json(call, self._core.elapsed()))

    def _update_call(self, request: Request, account: str) -> Response:
        new_status = request.first("Status")
        redirect = request.first("Url") or request.first("Twiml")
        if new_status is not None and new_status not in ("canceled", "completed"):
            return twilio_error(400, 20001, f"Status must be canceled or completed: {new_status}")
        with self._core.lock:
            call = self._call(request, account)
            if call is None:
                return self.not_found(request.path)
            now = self._core.elapsed()
            current = call.status(now)
            if current in _ENDED:
                if redirect:
                    return twilio_error(400, 21220, "Call is not in-progress. Cannot redirect.")
            elif new_status is not None:
                if current in ("queued", "ringing"):
                    call.ended_status, call.ended_at = "canceled", now
                elif new_status == "completed":
                    call.ended_status, call.ended_at = "completed", now
            if request.first("StatusCallback"):
                call.status_callback = request.first("StatusCallback")
            body = self.call_json(call, now)
        if call.changed is not None and call.ended_status is not None:
            call.changed.set()
        return json_response(200, body)

    def _list_calls(self, request: Request, account: str) -> Response:
        try:
            page_size = int(request.query_first("PageSize") or 50)
            page = int(request.query_first("Page") or 0)
        except ValueError:
            return twilio_error(400, 20001, "PageSize and Page must be integers")
        if not 1 <= page_size <= 1000 or page < 0:
            return twilio_error(400, 20001, "PageSize must be 1-1000 and Page >= 0")
        to, from_, status = (request.query_first(n) for n in ("To", "From", "Status"))
        start = page * page_size
        with self._core.lock:
            now = self._core.elapsed()
            rows = [
                call
                for call in reversed(self.calls.values())
                if call.account_sid == account
                and (to is None or call.to == to)
                and (from_ is None or call.from_ == from_)
                and (status is None or call.status(now) == status)
            ]
            chunk = [self.call_json(call, now) for call in rows[start : start + page_size]]
        filters = [(n, v) for n, v in (("To", to), ("From", from_), ("Status", status)) if v]
        base = f"{PREFIX}{account}/Calls.json"

        def page_uri(number: int) -> str:
            return f"{base}?{urlencode([*filters, ('PageSize', page_size), ('Page', number)])}"

        more = start + page_size < len(rows)
        return json_response(
            200,
            {
                "calls": chunk,
                "end": start + max(len(chunk) - 1, 0),
                "first_page_uri": page_uri(0),
                "next_page_uri": page_uri(page + 1) if more else None,
                "page": page,
                "page_size": page_size,
                "previous_page_uri": page_uri(page - 1) if page > 0 else None,
                "start": start,
                "uri": page_uri(page),
            },
        )

    def _create_message(self, request: Request, account: str, request_index: int) -> Response:
        to = request.first("To")
        from_ = request.first("From") or None
        service = request.first("MessagingServiceSid") or None
        body = request.first("Body")
        media = request.form.get("MediaUrl", [])
        content_sid = request.first("ContentSid")
        if not to:
            return twilio_error(400, 21604, "A 'To' phone number is required.")
        if not (from_ or service):
            return twilio_error(400, 21603, "A 'From' phone number is required.")
        if not (body or media or content_sid):
            return twilio_error(400, 21602, "Message body is required.")
        if not (E164.fullmatch(to) or to.startswith(_MESSAGE_ADDRESS_SCHEMES)):
            return twilio_error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if body is not None and len(body) > 1600:
            return twilio_error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        sid = self._core.hex_sid("MM" if media else "SM")
        segments = 0 if from_ is None else _segments(body or "")
        uri = f"{PREFIX}{account}/Messages/{sid}"
        with self._core.lock:
            now = self._core.elapsed()
            stamp = _rfc2822(self._core, now)
            resource: dict[str, Any] = {
                "account_sid": account,
                "api_version": API_VERSION,
                "body": body or "",
                "date_created": stamp,
                "date_sent": None,
                "date_updated": stamp,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": from_,
                "messaging_service_sid": service,
                "num_media": str(len(media)),
                "num_segments": str(segments),
                "price": None,
                "price_unit": "USD",
                "sid": sid,
                "status": "accepted" if from_ is None else "queued",
                "subresource_uris": {"media": f"{uri}/Media.json"},
                "to": to,
                "uri": f"{uri}.json",
            }
            self.messages[sid] = resource
            self.created_messages.append(
                CreatedMessage(
                    id=sid,
                    account=account,
                    to=to,
                    from_=from_,
                    time=now,
                    request_index=request_index,
                    resource=dict(resource),
                )
            )
        return json_response(201, resource, created=sid)

    def _fetch_message(self, request: Request, account: str) -> Response:
        with self._core.lock:
            message = self.messages.get(request.params["sid"])
            if message is None or message["account_sid"] != account:
                return self.not_found(request.path)
            return json_response(200, message)

    async def _run_call(self, call: TwilioCall) -> None:
        """Send the requested status callbacks as the call moves along its timeline."""
        milestones = (
            ("initiated", call.dial_at, "initiated"),
            ("ringing", call.dial_at, "ringing"),
            ("answered", call.answer_at, "in-progress"),
            ("completed", call.end_at, "completed"),
        )
        sequence = 0
        for event, at, status in milestones:
            delay = at - self._core.elapsed()
            if delay > 0 and call.changed is not None:
                clock = self._core.clock
                with clock.deadline_scope(clock.now() + delay):
                    await call.changed.wait()
            if call.ended_status is not None:
                if "completed" in call.events:
                    await self._status_callback(call, call.ended_status, sequence)
                return
            if event in call.events:
                await self._status_callback(call, status, sequence)
                sequence += 1

    async def _status_callback(self, call: TwilioCall, status: str, sequence: int) -> None:
        from twilio.request_validator import RequestValidator

        url = call.status_callback
        if url is None:
            return
        now = self._core.elapsed()
        params = {
            "AccountSid": call.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": status,
            "CallbackSource": "call-progress-events",
            "Called": call.to,
            "Caller": call.from_,
            "Direction": "outbound-api",
            "From": call.from_,
            "SequenceNumber": str(sequence),
            "Timestamp": format_datetime(self._core.wall(now)),
            "To": call.to,
        }
        if status in _ENDED:
            seconds = (
                max(0, int(call.finished_at() - call.answer_at)) if status == "completed" else 0
            )
            params |= {"CallDuration": str(seconds), "Duration": str(math.ceil(seconds / 60))}
            params["SipResponseCode"] = "200" if status == "completed" else "487"
            if call.error_code is not None:
                params["ErrorCode"] = str(call.error_code)
                params["ErrorMessage"] = _CALL_CONCURRENCY_MESSAGE
        validator = RequestValidator(self._accounts[call.account_sid])
        headers = {
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": self._core.uuid(),
        }
        if call.callback_method == "GET":
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
            headers["X-Twilio-Signature"] = validator.compute_signature(url, {})
            content = b""
        else:
            headers["X-Twilio-Signature"] = validator.compute_signature(url, params)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            content = urlencode(params).encode()
        await self._sender.deliver(
            provider="twilio",
            kind="status-callback",
            call_id=call.sid,
            status=status,
            url=url,
            method=call.callback_method,
            headers=headers,
            content=content,
        )


def _segments(body: str) -> int:
    if not body:
        return 1
    if all(char in _GSM7 for char in body):
        return 1 if len(body) <= 160 else math.ceil(len(body) / 153)
    return 1 if len(body) <= 70 else math.ceil(len(body) / 67)
