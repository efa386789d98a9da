"""What :class:`~resilient_voice.testing.FakeTelephony` remembers, as frozen records.

Tests read these to assert what really happened upstream: which requests arrived, which calls
were really created (and for which destination), which webhooks were delivered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CallbackRecord", "CreatedCall", "CreatedMessage", "RecordedRequest"]

Provider = Literal["twilio", "vapi"]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake received and answered it.

    Attributes:
        index: Position in arrival order, from 0.
        time: Seconds since the fake started, when the request body had been read.
        method: The HTTP method.
        path: The URL path.
        endpoint: The endpoint name (``"twilio.calls.create"``...), None for an unknown route.
        query: Query parameters (repeated keys keep every value, in order).
        form: Form fields of a form-encoded body, else empty.
        json: The parsed JSON body, else None.
        body: The raw body.
        headers: Lower-cased header names; repeated headers joined with ``", "``. The
            ``authorization`` value is reduced to its scheme (``"Basic <redacted>"``).
        auth_user: The Basic-auth user name (an Account SID or API key SID), if any.
        status: The status answered, or None when the connection was dropped instead (a
            ``drop_mid_body`` fault records the status it sent before cutting the body).
        fault: The kind of the fault applied (``"error"``, ``"rate_limit"``, ``"drop_before"``,
            ``"drop_after"``, ``"drop_mid_body"``), ``"concurrency"`` for a Twilio concurrency
            429, else None.
        delay: Seconds of injected latency.
        created: The id of the resource this request created (call or message), if any.
    """

    index: int
    time: float
    method: str
    path: str
    endpoint: str | None
    query: Mapping[str, tuple[str, ...]]
    form: Mapping[str, tuple[str, ...]]
    json: Any
    body: bytes
    headers: Mapping[str, str]
    auth_user: str | None
    status: int | None
    fault: str | None
    delay: float
    created: str | None


@dataclass(frozen=True, slots=True)
class CreatedCall:
    """A call the fake really created (whatever the client was told).

    Attributes:
        provider: ``"twilio"`` or ``"vapi"``.
        id: The Twilio Call SID or the Vapi call id.
        account: The Twilio Account SID, or the Vapi org id.
        to: The destination number (Twilio ``To``, Vapi ``customer.number``).
        from_: The caller (Twilio ``From``, the Vapi phone number's number).
        time: Seconds since the fake started when it was created.
        request_index: The :class:`RecordedRequest` that created it.
        queue_time: Seconds it waited in the account's CPS queue before dialling (Twilio).
        cps_violation: Whether its creation broke the account's calls-per-second bound.
        callback_url: The Twilio ``StatusCallback`` or the Vapi server URL, if any.
        resource: The JSON body returned on creation.
    """

    provider: Provider
    id: str
    account: str
    to: str
    from_: str
    time: float
    request_index: int
    queue_time: float
    cps_violation: bool
    callback_url: str | None
    resource: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CreatedMessage:
    """A Twilio message the fake really created.

    Attributes:
        id: The Message SID.
        account: The Account SID.
        to: The destination.
        from_: The sender, or None when a Messaging Service picks one.
        time: Seconds since the fake started when it was created.
        request_index: The :class:`RecordedRequest` that created it.
        resource: The JSON body returned on creation.
    """

    id: str
    account: str
    to: str
    from_: str | None
    time: float
    request_index: int
    resource: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CallbackRecord:
    """One webhook delivery attempt by the fake.

    Attributes:
        time: Seconds since the fake started when it was sent.
        provider: ``"twilio"`` or ``"vapi"``.
        kind: ``"status-callback"`` (Twilio), ``"status-update"`` or ``"end-of-call-report"``
            (Vapi).
        call_id: The call it is about.
        status: The Twilio ``CallStatus`` or the Vapi status it reports.
        url: Where it was sent.
        duplicate: Whether this is the injected second copy of a callback.
        lost: Whether it was dropped on purpose (not sent; ``response_status`` is None).
        response_status: The receiver's status code, None if not sent or it failed.
        error: The transport error, if the delivery failed.
    """

    time: float
    provider: Provider
    kind: str
    call_id: str
    status: str
    url: str
    duplicate: bool
    lost: bool
    response_status: int | None
    error: str | None
