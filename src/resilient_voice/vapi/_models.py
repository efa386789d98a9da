"""Pydantic models of the Vapi objects the client returns.

Vapi adds fields to its objects often, and its enums (call status, ended reason) grow. A new
field or value must never break a user, so every model keeps unknown fields (``extra="allow"``,
readable through ``model_extra`` or attribute access) and every enum-typed field also accepts any
string it does not know. Attributes are snake_case; the JSON keys are Vapi's camelCase
(``populate_by_name`` accepts both when building a model by hand).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "ATTEMPT_ID_KEY",
    "CONCURRENCY_ENDED_REASON",
    "CORRELATION_ID_KEY",
    "CallStatus",
    "CallType",
    "PhoneNumberStatus",
    "SubscriptionLimits",
    "VapiAssistant",
    "VapiCall",
    "VapiCustomer",
    "VapiModel",
    "VapiPhoneNumber",
]

ATTEMPT_ID_KEY = "rv_attempt_id"
"""The ``assistantOverrides.metadata`` key holding the attempt id of the create call."""

CORRELATION_ID_KEY = "rv_cid"
"""The ``assistantOverrides.metadata`` key holding the correlation id current at creation."""

CONCURRENCY_ENDED_REASON = "call.start.error-subscription-concurrency-limit-reached"
"""The ``endedReason`` of a call that could not start because every concurrency slot was taken."""


class CallStatus(enum.StrEnum):
    """A call's ``status`` as Vapi documents it; fields typed with it accept other strings too."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RINGING = "ringing"
    IN_PROGRESS = "in-progress"
    FORWARDING = "forwarding"
    ENDED = "ended"
    NOT_FOUND = "not-found"
    DELETION_FAILED = "deletion-failed"


class CallType(enum.StrEnum):
    """A call's ``type``; a field typed with it also accepts other strings."""

    INBOUND_PHONE_CALL = "inboundPhoneCall"
    OUTBOUND_PHONE_CALL = "outboundPhoneCall"
    WEB_CALL = "webCall"
    WEBSOCKET_CALL = "vapi.websocketCall"


class PhoneNumberStatus(enum.StrEnum):
    """A phone number's ``status``; a field typed with it also accepts other strings."""

    ACTIVE = "active"
    ACTIVATING = "activating"
    BLOCKED = "blocked"


# Left to right: a known value becomes the enum member, anything else stays a plain string. In
# pydantic's default "smart" mode a str input would always pick the str branch.
_Status = Annotated[CallStatus | str, Field(union_mode="left_to_right")]
_Type = Annotated[CallType | str, Field(union_mode="left_to_right")]
_NumberStatus = Annotated[PhoneNumberStatus | str, Field(union_mode="left_to_right")]


class VapiModel(BaseModel):
    """Base of the Vapi models: unknown fields kept, camelCase aliases, snake_case attributes."""

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        alias_generator=to_camel,
    )

    def to_json_dict(self) -> dict[str, Any]:
        """The object as Vapi's JSON (camelCase keys, unset fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class SubscriptionLimits(VapiModel):
    """The org's concurrency state, returned with a created call.

    Attributes:
        concurrency_blocked: True when every concurrency slot was taken: the call was created
            but may wait for a slot or end with :data:`CONCURRENCY_ENDED_REASON`.
        concurrency_limit: The org's concurrent call slots.
        remaining_concurrent_calls: Slots left after this call.
    """

    concurrency_blocked: bool | None = None
    concurrency_limit: int | None = None
    remaining_concurrent_calls: int | None = None


class VapiCustomer(VapiModel):
    """The customer of a call (``customer``), as Vapi returns it and as ``create_call`` takes it.

    ``VapiClient.create_call(customer=VapiCustomer(number="+14155550100", name="Ada"))``.
    Fields this version does not know are kept when reading, but refused by ``create_call``.
    """

    number: str | None = None
    number_e164_check_enabled: bool | None = None
    name: str | None = None
    extension: str | None = None
    sip_uri: str | None = None
    email: str | None = None
    external_id: str | None = None


class VapiCall(VapiModel):
    """A Vapi call object (``POST /call``, ``GET /call/{id}``, ``GET /call``).

    Only ``id`` is required; Vapi documents ``orgId``, ``createdAt`` and ``updatedAt`` as
    required too, but a missing one must not make a created call unreadable.
    """

    id: str
    org_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    type: _Type | None = None
    status: _Status | None = None
    ended_reason: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    name: str | None = None
    assistant_id: str | None = None
    phone_number_id: str | None = None
    customer: VapiCustomer | None = None
    customer_id: str | None = None
    assistant_overrides: dict[str, Any] | None = None
    phone_call_provider: str | None = None
    phone_call_provider_id: str | None = None
    phone_call_transport: str | None = None
    cost: float | None = None
    subscription_limits: SubscriptionLimits | None = None

    @property
    def metadata(self) -> Mapping[str, Any]:
        """``assistantOverrides.metadata``, or an empty mapping."""
        overrides = self.assistant_overrides
        metadata = overrides.get("metadata") if overrides is not None else None
        return metadata if isinstance(metadata, Mapping) else {}

    @property
    def attempt_id(self) -> str | None:
        """The attempt id :class:`~resilient_voice.vapi.VapiClient` planted when creating it."""
        value = self.metadata.get(ATTEMPT_ID_KEY)
        return value if isinstance(value, str) else None

    @property
    def correlation_id(self) -> str | None:
        """The correlation id that was current when the call was created, if one was."""
        value = self.metadata.get(CORRELATION_ID_KEY)
        return value if isinstance(value, str) else None

    @property
    def concurrency_blocked(self) -> bool:
        """Whether Vapi said every concurrency slot was taken when this call was created."""
        limits = self.subscription_limits
        return limits is not None and limits.concurrency_blocked is True


class VapiAssistant(VapiModel):
    """A Vapi assistant (``GET /assistant``, ``GET/PATCH /assistant/{id}``)."""

    id: str
    org_id: str | None = None
    name: str | None = None
    first_message: str | None = None
    model: dict[str, Any] | None = None
    voice: dict[str, Any] | None = None
    transcriber: dict[str, Any] | None = None
    server: dict[str, Any] | None = None
    server_messages: list[str] | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class VapiPhoneNumber(VapiModel):
    """A Vapi phone number (``GET /phone-number``); the provider-specific fields stay extra."""

    id: str
    org_id: str | None = None
    provider: str | None = None
    number: str | None = None
    name: str | None = None
    status: _NumberStatus | None = None
    assistant_id: str | None = None
    squad_id: str | None = None
    workflow_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
