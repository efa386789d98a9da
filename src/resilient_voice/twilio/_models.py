"""Pydantic models of Twilio's Call and Message resources.

Twilio adds fields and status values over time; neither may break a user. Every model keeps
unknown fields (``extra="allow"``), and the enum-typed fields fall back to the plain string when
Twilio sends a value this version does not know, so ``call.status == "completed"`` works for both.
Dates arrive as RFC 2822 strings (``Tue, 31 Aug 2010 20:36:28 +0000``) and become aware
``datetime`` objects.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

__all__ = [
    "Call",
    "CallDirection",
    "CallStatus",
    "Message",
    "MessageDirection",
    "MessageStatus",
]


class CallStatus(enum.StrEnum):
    """A call's status; an unknown value arrives as a plain ``str``."""

    QUEUED = "queued"
    RINGING = "ringing"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    BUSY = "busy"
    FAILED = "failed"
    NO_ANSWER = "no-answer"
    CANCELED = "canceled"


class CallDirection(enum.StrEnum):
    """Which way a call goes; an unknown value arrives as a plain ``str``."""

    INBOUND = "inbound"
    OUTBOUND_API = "outbound-api"
    OUTBOUND_DIAL = "outbound-dial"
    TRUNKING_TERMINATING = "trunking-terminating"
    TRUNKING_ORIGINATING = "trunking-originating"


class MessageStatus(enum.StrEnum):
    """A message's status; an unknown value arrives as a plain ``str``."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    RECEIVING = "receiving"
    RECEIVED = "received"
    ACCEPTED = "accepted"
    SCHEDULED = "scheduled"
    READ = "read"
    PARTIALLY_DELIVERED = "partially_delivered"
    CANCELED = "canceled"


class MessageDirection(enum.StrEnum):
    """Which way a message goes; an unknown value arrives as a plain ``str``."""

    INBOUND = "inbound"
    OUTBOUND_API = "outbound-api"
    OUTBOUND_CALL = "outbound-call"
    OUTBOUND_REPLY = "outbound-reply"


def _tolerant(enum_type: type[enum.StrEnum]) -> BeforeValidator:
    members = {member.value: member for member in enum_type}

    def convert(value: Any) -> Any:
        return members.get(value, value) if isinstance(value, str) else value

    return BeforeValidator(convert)


def _rfc2822(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return value  # ISO 8601 and friends: let pydantic try
    return value


def _blank_to_none(value: Any) -> Any:
    return None if value == "" else value


Date = Annotated[datetime | None, BeforeValidator(_rfc2822)]
OptionalInt = Annotated[int | None, BeforeValidator(_blank_to_none)]
OptionalDecimal = Annotated[Decimal | None, BeforeValidator(_blank_to_none)]


class _Resource(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Call(_Resource):
    """A Twilio Call resource. Unknown fields are kept (``call.model_extra``).

    ``correlation_id`` and ``attempt_id`` are set on the result of
    :meth:`TwilioClient.create_call`: the ids the client sent with the call (as ``rv_cid`` and
    ``rv_attempt`` on its URLs), so the call's webhooks can be matched to it.
    """

    sid: str
    account_sid: str | None = None
    parent_call_sid: str | None = None
    to: str | None = None
    to_formatted: str | None = None
    from_: str | None = Field(default=None, alias="from")
    from_formatted: str | None = None
    phone_number_sid: str | None = None
    status: Annotated[CallStatus | str, _tolerant(CallStatus)]
    direction: Annotated[CallDirection | str | None, _tolerant(CallDirection)] = None
    answered_by: str | None = None
    start_time: Date = None
    end_time: Date = None
    duration: OptionalInt = None
    price: OptionalDecimal = None
    price_unit: str | None = None
    queue_time: OptionalInt = None
    """Milliseconds the call waited in the account's calls-per-second queue."""
    date_created: Date = None
    date_updated: Date = None
    api_version: str | None = None
    caller_name: str | None = None
    forwarded_from: str | None = None
    group_sid: str | None = None
    trunk_sid: str | None = None
    uri: str | None = None
    subresource_uris: dict[str, str] | None = None

    _correlation_id: str | None = PrivateAttr(default=None)
    _attempt_id: str | None = PrivateAttr(default=None)

    @property
    def correlation_id(self) -> str | None:
        """The correlation id sent with this call's creation, if this object came from one."""
        return self._correlation_id

    @property
    def attempt_id(self) -> str | None:
        """The attempt id sent with this call's creation, if this object came from one."""
        return self._attempt_id


class Message(_Resource):
    """A Twilio Message resource. Unknown fields are kept (``message.model_extra``)."""

    sid: str
    account_sid: str | None = None
    messaging_service_sid: str | None = None
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    body: str | None = None
    num_segments: OptionalInt = None
    num_media: OptionalInt = None
    direction: Annotated[MessageDirection | str | None, _tolerant(MessageDirection)] = None
    status: Annotated[MessageStatus | str, _tolerant(MessageStatus)]
    error_code: OptionalInt = None
    error_message: str | None = None
    price: OptionalDecimal = None
    price_unit: str | None = None
    date_created: Date = None
    date_sent: Date = None
    date_updated: Date = None
    api_version: str | None = None
    uri: str | None = None
    subresource_uris: dict[str, str] | None = None
