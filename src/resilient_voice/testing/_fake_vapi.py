"""The Vapi half of the fake: calls, assistants and phone numbers, with Bearer auth.

Bodies are camelCase JSON with ISO 8601 dates (milliseconds, ``Z``); errors use the NestJS shape
Vapi answers with, ``{"message", "error", "statusCode"}``. Server messages (``status-update``,
``end-of-call-report``) go to the server URL with the configured credential header.

Over 400 lines: it is one provider's fake, endpoint by endpoint, like ``_fake_twilio``. Each
handler checks a request as Vapi does, changes the state the endpoints share (calls, assistants,
phone numbers, the org's concurrency) and answers in Vapi's shape, in the order of the reference.
What needs none of that state lives elsewhere: the HTTP plumbing in ``_fake_common`` and
``_fake_http``, webhook delivery in ``_webhooks``.
"""

from __future__ import annotations

import copy
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from resilient_voice._request_checks import E164
from resilient_voice.testing._fake_common import (
    Core,
    Request,
    Response,
    Span,
    iso_ms,
    json_response,
    peak,
    truncate_ms,
)
from resilient_voice.testing._records import CreatedCall
from resilient_voice.testing._webhooks import WebhookSender

_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}
_READ_ONLY = ("id", "orgId", "createdAt", "updatedAt")
_DATE_FILTERS = ("Gt", "Lt", "Ge", "Le")
_ENDED_REASON = "customer-ended-call"
CONCURRENCY_ENDED_REASON = "call.start.error-subscription-concurrency-limit-reached"
_LOOSE_NUMBER = re.compile(r"\+?[A-Za-z0-9]+")


def vapi_error(status: int, message: str | list[str]) -> Response:
    """A Vapi (NestJS) error body."""
    payload: dict[str, Any] = {"message": message, "statusCode": status}
    reason = _REASONS.get(status)
    if reason is not None:
        payload["error"] = reason
    return json_response(status, payload)


def vapi_fault_response(status: int, retry_after: str | None) -> Response:
    """What Vapi answers for an injected 5xx or 429."""
    if status == 429:
        response = vapi_error(429, "ThrottlerException: Too Many Requests")
        if retry_after is not None:
            response.headers.append((b"retry-after", retry_after.encode()))
        return response
    message = "Internal server error" if status == 500 else "Service Unavailable"
    return vapi_error(status, message)


@dataclass(slots=True)
class VapiCall:
    """A Vapi call's fixed timeline and the fields it was created with."""

    id: str
    created: float
    created_at: datetime
    answer_at: float
    end_at: float
    fields: dict[str, Any]
    server_url: str | None
    ended_reason: str = _ENDED_REASON

    @property
    def blocked(self) -> bool:
        return self.ended_reason == CONCURRENCY_ENDED_REASON

    def status(self, now: float) -> str:
        if now < self.answer_at:
            return "ringing"
        if now < self.end_at:
            return "in-progress"
        return "ended"


class VapiApi:
    """Handlers and state for the Vapi endpoints."""

    def __init__(
        self,
        core: Core,
        sender: WebhookSender,
        *,
        api_keys: Iterable[str],
        server_url: str | None,
        credential: str | None,
        credential_header: str,
        call_duration: Span,
        ring_duration: Span,
        status_callbacks: bool,
        assistants: Sequence[Mapping[str, Any]],
        phone_numbers: Sequence[str],
        concurrency_limit: int,
    ) -> None:
        self._core = core
        self._sender = sender
        self._keys = tuple(key.encode() for key in api_keys)
        self._server_url = server_url
        self._credential = credential
        self._credential_header = credential_header
        self._call_duration = call_duration
        self._ring_duration = ring_duration
        self._status_callbacks = status_callbacks
        self._concurrency_limit = concurrency_limit
        self.org_id = core.uuid()
        self.calls: dict[str, VapiCall] = {}
        self.created_calls: list[CreatedCall] = []
        stamp = iso_ms(core.wall_origin)
        self.assistants: dict[str, dict[str, Any]] = {}
        for spec in assistants:
            assistant = {
                "id": core.uuid(),
                "orgId": self.org_id,
                "name": "Fake Assistant",
                "firstMessage": "Hello, this is a test call.",
                "model": {"provider": "openai", "model": "gpt-4o", "messages": []},
                "voice": {"provider": "vapi", "voiceId": "Elliot"},
                "transcriber": {"provider": "deepgram", "model": "nova-2", "language": "en"},
                "serverMessages": ["end-of-call-report", "status-update"],
                "createdAt": stamp,
                "updatedAt": stamp,
                **copy.deepcopy(dict(spec)),
            }
            self.assistants[assistant["id"]] = assistant
        self.phone_numbers: dict[str, dict[str, Any]] = {}
        for number in phone_numbers:
            phone_number: dict[str, Any] = {
                "id": core.uuid(),
                "orgId": self.org_id,
                "provider": "twilio",
                "number": number,
                "twilioAccountSid": core.hex_sid("AC"),
                "status": "active",
                "name": f"Fake {number}",
                "assistantId": next(iter(self.assistants), None),
                "smsEnabled": True,
                "createdAt": stamp,
                "updatedAt": stamp,
            }
            self.phone_numbers[phone_number["id"]] = phone_number

    def authenticate(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = token.strip().encode()
        return any(hmac.compare_digest(candidate, key) for key in self._keys)

    def unauthorized(self) -> Response:
        return vapi_error(
            401,
            "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
            "or vice versa.",
        )

    def not_found(self, method: str, path: str) -> Response:
        return vapi_error(404, f"Cannot {method} {path}")

    def handle(self, endpoint: str, request: Request, request_index: int) -> Response:
        """Answer an authenticated request to ``endpoint``."""
        if endpoint == "vapi.calls.create":
            return self._create_call(request, request_index)
        if endpoint == "vapi.calls.get":
            with self._core.lock:
                call = self.calls.get(request.params["id"])
                if call is None:
                    return vapi_error(404, "Call not found")
                return json_response(200, self.call_json(call, self._core.elapsed()))
        if endpoint == "vapi.calls.list":
            return self._list_calls(request)
        if endpoint == "vapi.assistants.list":
            return self._list_assistants(request)
        if endpoint == "vapi.assistants.get":
            with self._core.lock:
                assistant = self.assistants.get(request.params["id"])
                if assistant is None:
                    return vapi_error(404, "Assistant not found")
                return json_response(200, assistant)
        if endpoint == "vapi.assistants.update":
            return self._update_assistant(request)
        with self._core.lock:
            return json_response(200, list(self.phone_numbers.values()))

    def call_json(self, call: VapiCall, now: float) -> dict[str, Any]:
        """The call object as Vapi would return it at ``now``."""
        status = call.status(now)
        body: dict[str, Any] = {
            "id": call.id,
            "orgId": self.org_id,
            "createdAt": iso_ms(call.created_at),
            "updatedAt": iso_ms(call.created_at),
            "type": "outboundPhoneCall",
            "status": status,
            "phoneCallProvider": "twilio",
            "phoneCallTransport": "pstn",
            "cost": 0,
            "costs": [],
            "messages": [],
            **call.fields,
        }
        if status in ("in-progress", "ended") and not call.blocked:
            body["startedAt"] = iso_ms(self._core.wall(call.answer_at))
            body["updatedAt"] = body["startedAt"]
        if status == "ended":
            body["endedAt"] = iso_ms(self._core.wall(call.end_at))
            body["updatedAt"] = body["endedAt"]
            body["endedReason"] = call.ended_reason
        return body

    def _create_call(self, request: Request, request_index: int) -> Response:
        data = request.json
        if not isinstance(data, dict):
            return vapi_error(400, ["body must be a JSON object"])
        if "customers" in data:
            return vapi_error(400, ["FakeTelephony does not implement batch calls (customers)"])
        assistant_id = data.get("assistantId")
        if assistant_id is None and not isinstance(data.get("assistant"), dict):
            return vapi_error(
                400, "Couldn't Get Assistant. Need Either `assistant` Or `assistantId`."
            )
        phone_number_id = data.get("phoneNumberId")
        customer = data.get("customer")
        customer_id = data.get("customerId")
        if (customer is None) == (customer_id is None):
            return vapi_error(400, "Need Either `customer` Or `customerId`.")
        if customer_id is not None:
            if not isinstance(customer_id, str) or not customer_id:
                return vapi_error(400, ["customerId must be a string"])
            destination = customer_id
        else:
            problems = _customer_problems(customer)
            if problems or not isinstance(customer, dict):
                return vapi_error(400, problems)
            destination = str(customer.get("number") or customer["sipUri"])
        with self._core.lock:
            assistant = self.assistants.get(str(assistant_id)) if assistant_id is not None else None
            if assistant_id is not None and assistant is None:
                return vapi_error(
                    400, f"Couldn't Get Assistant. `assistantId` {assistant_id} Does Not Exist."
                )
            phone_number = self.phone_numbers.get(str(phone_number_id)) if phone_number_id else None
            if phone_number is None:
                return vapi_error(
                    400,
                    f"Couldn't Get Phone Number. `phoneNumberId` {phone_number_id} Does Not Exist.",
                )
            now = self._core.elapsed()
            active = sum(1 for c in self.calls.values() if c.status(now) != "ended")
        call_id = self._core.uuid()
        provider_sid = self._core.hex_sid("CA")
        overrides = data.get("assistantOverrides")
        fields: dict[str, Any] = {
            key: copy.deepcopy(value)
            for key, value in data.items()
            if key in ("assistantId", "assistant", "assistantOverrides", "name", "metadata")
        }
        fields |= {"phoneNumberId": phone_number_id, "phoneCallProviderId": provider_sid}
        if customer_id is not None:
            fields["customerId"] = customer_id
        else:
            fields["customer"] = copy.deepcopy(customer)
        blocked = active >= self._concurrency_limit
        if blocked:
            # Vapi documents two fates for a blocked call (wait for a slot, or end); the fake
            # ends it at once, so it never holds a slot.
            answer_at = end_at = now
        else:
            with self._core.lock:
                answer_at = now + self._core.draw(self._ring_duration, self._core.durations)
                end_at = answer_at + self._core.draw(self._call_duration, self._core.durations)
        call = VapiCall(
            id=call_id,
            created=now,
            created_at=truncate_ms(self._core.wall(now)),
            answer_at=answer_at,
            end_at=end_at,
            fields=fields,
            server_url=_server_url(overrides, assistant, data.get("assistant")) or self._server_url,
            ended_reason=CONCURRENCY_ENDED_REASON if blocked else _ENDED_REASON,
        )
        resource = self.call_json(call, now)
        resource |= {"status": "queued", "updatedAt": resource["createdAt"]}
        for key in ("startedAt", "endedAt", "endedReason"):
            resource.pop(key, None)
        resource["subscriptionLimits"] = {
            "concurrencyBlocked": blocked,
            "concurrencyLimit": self._concurrency_limit,
            "remainingConcurrentCalls": max(self._concurrency_limit - active - 1, 0),
        }
        with self._core.lock:
            self.calls[call_id] = call
            self.created_calls.append(
                CreatedCall(
                    provider="vapi",
                    id=call_id,
                    account=self.org_id,
                    to=destination,
                    from_=phone_number["number"],
                    time=now,
                    request_index=request_index,
                    queue_time=0.0,
                    cps_violation=False,
                    callback_url=call.server_url,
                    resource=copy.deepcopy(resource),
                )
            )
        if call.server_url and self._status_callbacks:
            self._core.spawn(self._run_call, call)
        return json_response(201, resource, created=call_id)

    def peak_in_progress(self) -> int:
        """The most calls that held one of the org's slots at once (created to ended)."""
        with self._core.lock:
            spans = [(call.created, call.end_at) for call in self.calls.values()]
        return peak(spans)

    def _filters(self, request: Request) -> tuple[int, list[tuple[str, str, datetime]]] | str:
        try:
            limit = int(request.query_first("limit") or 100)
        except ValueError:
            return "limit must be an integer number"
        if not 0 <= limit <= 1000:
            return "limit must not be greater than 1000"
        found: list[tuple[str, str, datetime]] = []
        for field in ("createdAt", "updatedAt"):
            for op in _DATE_FILTERS:
                raw = request.query_first(field + op)
                if raw is None:
                    continue
                try:
                    moment = datetime.fromisoformat(raw)
                except ValueError:
                    return f"{field}{op} must be a valid ISO 8601 date string"
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
                found.append((field, op, moment))
        return limit, found

    def _list_calls(self, request: Request) -> Response:
        parsed = self._filters(request)
        if isinstance(parsed, str):
            return vapi_error(400, [parsed])
        limit, dates = parsed
        wanted = {key: request.query_first(key) for key in ("id", "assistantId", "phoneNumberId")}
        with self._core.lock:
            now = self._core.elapsed()
            rows = [self.call_json(call, now) for call in reversed(self.calls.values())]
        rows = [
            row
            for row in rows
            if all(value is None or row.get(key) == value for key, value in wanted.items())
            and _dates_match(row, dates)
        ]
        return json_response(200, rows[:limit])

    def _list_assistants(self, request: Request) -> Response:
        parsed = self._filters(request)
        if isinstance(parsed, str):
            return vapi_error(400, [parsed])
        limit, dates = parsed
        with self._core.lock:
            rows = [copy.deepcopy(a) for a in reversed(self.assistants.values())]
        return json_response(200, [row for row in rows if _dates_match(row, dates)][:limit])

    def _update_assistant(self, request: Request) -> Response:
        data = request.json
        if not isinstance(data, dict):
            return vapi_error(400, ["body must be a JSON object"])
        forbidden = [f"property {key} should not exist" for key in data if key in _READ_ONLY]
        if forbidden:
            return vapi_error(400, forbidden)
        with self._core.lock:
            assistant = self.assistants.get(request.params["id"])
            if assistant is None:
                return vapi_error(404, "Assistant not found")
            assistant.update(copy.deepcopy(data))
            assistant["updatedAt"] = iso_ms(self._core.wall(self._core.elapsed()))
            return json_response(200, assistant)

    async def _run_call(self, call: VapiCall) -> None:
        """Send ``status-update`` (in-progress, ended) and ``end-of-call-report`` on time."""
        if not call.blocked:
            await self._core.clock.sleep(call.answer_at - self._core.elapsed())
            await self._message(call, "status-update", "in-progress")
        await self._core.clock.sleep(call.end_at - self._core.elapsed())
        await self._message(call, "status-update", "ended")
        await self._message(call, "end-of-call-report", "ended")

    async def _message(self, call: VapiCall, kind: str, status: str) -> None:
        url = call.server_url
        if url is None:
            return
        now = self._core.elapsed()
        with self._core.lock:
            at = call.end_at if status == "ended" else call.answer_at
            call_body = self.call_json(call, max(now, at))
            phone_number = copy.deepcopy(self.phone_numbers.get(call.fields["phoneNumberId"]))
        message: dict[str, Any] = {
            "timestamp": int(self._core.wall(now).timestamp() * 1000),
            "type": kind,
            "call": call_body,
            "customer": call_body.get("customer"),
            "phoneNumber": phone_number,
        }
        if kind == "status-update":
            message["status"] = status
            if status == "ended":
                message["endedReason"] = call.ended_reason
        else:
            seconds = call.end_at - call.answer_at
            message |= {
                "endedReason": call.ended_reason,
                "startedAt": call_body.get("startedAt"),
                "endedAt": call_body.get("endedAt"),
                "durationMs": round(seconds * 1000),
                "durationSeconds": seconds,
                "cost": 0,
                "summary": "",
                "transcript": "",
                "messages": [],
                "artifact": {"messages": [], "messagesOpenAIFormatted": [], "transcript": ""},
                "analysis": {},
            }
        headers = {"Content-Type": "application/json", "User-Agent": "Vapi/1.0"}
        if self._credential is not None:
            value = self._credential
            if self._credential_header.lower() == "authorization":
                value = f"Bearer {value}"
            headers[self._credential_header] = value
        await self._sender.deliver(
            provider="vapi",
            kind=kind,
            call_id=call.id,
            status=status,
            url=url,
            method="POST",
            headers=headers,
            content=json.dumps({"message": message}, separators=(",", ":")).encode(),
        )


def _customer_problems(customer: object) -> list[str]:
    """What Vapi would refuse in a ``customer`` (CreateCustomerDTO); empty when it is valid."""
    if not isinstance(customer, dict):
        return ["customer must be an object"]
    problems = []
    number, sip_uri = customer.get("number"), customer.get("sipUri")
    if number is None and sip_uri is None:
        problems.append("customer.number or customer.sipUri must be provided")
    if number is not None:
        if not isinstance(number, str) or not 3 <= len(number) <= 40:
            problems.append("customer.number must be longer than or equal to 3 characters")
        elif customer.get("numberE164CheckEnabled", True) is not False:
            if not E164.fullmatch(number):
                problems.append("customer.number must be a valid phone number in the E.164 format.")
        elif not _LOOSE_NUMBER.fullmatch(number):
            problems.append("customer.number must contain only letters and digits")
    if sip_uri is not None and not (
        isinstance(sip_uri, str) and sip_uri.lower().startswith(("sip:", "sips:"))
    ):
        problems.append("customer.sipUri must be a valid SIP URI")
    extension = customer.get("extension")
    if extension is not None and not (isinstance(extension, str) and len(extension) <= 10):
        problems.append("customer.extension must be shorter than or equal to 10 characters")
    for key in ("name", "email", "externalId"):
        value = customer.get(key)
        if value is not None and not (isinstance(value, str) and len(value) <= 40):
            problems.append(f"customer.{key} must be shorter than or equal to 40 characters")
    return problems


def _server_url(*sources: Any) -> str | None:
    for source in sources:
        if isinstance(source, Mapping):
            server = source.get("server")
            if isinstance(server, Mapping) and isinstance(server.get("url"), str):
                return str(server["url"])
    return None


def _dates_match(row: Mapping[str, Any], filters: list[tuple[str, str, datetime]]) -> bool:
    for field, op, bound in filters:
        value = datetime.fromisoformat(row[field])
        if not (
            (op == "Gt" and value > bound)
            or (op == "Lt" and value < bound)
            or (op == "Ge" and value >= bound)
            or (op == "Le" and value <= bound)
        ):
            return False
    return True
