"""Argument checks and request-body building for the Vapi client; nothing here does I/O.

Bad input is refused with :class:`VapiValidationError` before any request: a typo must not
cost a breaker permit, a token, or a round trip that Vapi answers with 400.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from resilient_voice.vapi._errors import VapiValidationError
from resilient_voice.vapi._models import ATTEMPT_ID_KEY, CORRELATION_ID_KEY

__all__ = [
    "camel_keys",
    "check_id",
    "check_limit",
    "format_datetime",
    "plant_metadata",
]

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_NAME = 40
MAX_LIMIT = 1000

# Keys of the create-call body that create_call's own parameters own.
_OWNED = frozenset({"assistantId", "assistant", "phoneNumberId", "customer", "assistantOverrides"})
_OTHER_AGENTS = frozenset({"squadId", "squad", "workflowId", "workflow"})
_READ_ONLY = frozenset({"id", "orgId", "createdAt", "updatedAt"})


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a plausible Vapi id (safe to put in a URL path)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise VapiValidationError(
            f"{name} must be a non-empty id of letters, digits and ._:- (got {value!r})"
        )
    return value


def check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise VapiValidationError(f"limit must be an int in 1..{MAX_LIMIT}, got {limit!r}")
    return limit


def format_datetime(name: str, value: object) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``, as Vapi's date filters take it."""
    if not isinstance(value, datetime):
        raise VapiValidationError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise VapiValidationError(f"{name} must be timezone-aware (naive datetimes are ambiguous)")
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return value


def camel_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys to camelCase (``schedule_plan`` -> ``schedulePlan``); values as given."""
    body: dict[str, Any] = {}
    for key, value in values.items():
        camel = to_camel(key) if "_" in key else key
        if camel in body:
            raise VapiValidationError(f"{key!r} given twice (as snake_case and camelCase)")
        body[camel] = _jsonable(value)
    return body


def plant_metadata(
    overrides: Mapping[str, Any] | None, attempt_id: str, correlation_id: str | None
) -> dict[str, Any]:
    """Return a copy of ``overrides`` whose ``metadata`` carries our attempt and correlation ids.

    The caller's metadata keys are kept; only :data:`ATTEMPT_ID_KEY` and
    :data:`CORRELATION_ID_KEY` are ours and set here. Nothing the caller passed is mutated.
    """
    planted = dict(overrides) if overrides is not None else {}
    user = planted.get("metadata")
    if user is not None and not isinstance(user, Mapping):
        raise VapiValidationError("assistant_overrides['metadata'] must be a mapping")
    metadata = dict(user) if user is not None else {}
    metadata[ATTEMPT_ID_KEY] = attempt_id
    if correlation_id is not None:
        metadata[CORRELATION_ID_KEY] = correlation_id
    else:
        metadata.pop(CORRELATION_ID_KEY, None)
    planted["metadata"] = metadata
    return planted


def create_call_body(
    *,
    assistant_id: str | None,
    assistant: Mapping[str, Any] | BaseModel | None,
    phone_number_id: str | None,
    customer_number: str,
    assistant_overrides: Mapping[str, Any] | BaseModel | None,
    name: str | None,
    more: Mapping[str, Any],
) -> dict[str, Any]:
    """Validate the arguments of ``create_call`` and build its JSON body (without our ids)."""
    extra = camel_keys(more)
    if "customers" in extra:
        raise VapiValidationError(
            "batch calls (customers=) are not supported: call create_call once per customer"
        )
    clash = sorted(_OWNED & extra.keys())
    if clash:
        raise VapiValidationError(
            f"pass {clash} through create_call's own parameters, not as extra fields"
        )
    agents = [key for key in _OTHER_AGENTS if key in extra]
    chosen = (assistant_id is not None) + (assistant is not None) + len(agents)
    if chosen != 1:
        raise VapiValidationError(
            "give exactly one of assistant_id= and assistant= (or one squad/workflow field)"
        )
    body: dict[str, Any] = {}
    if assistant_id is not None:
        body["assistantId"] = check_id("assistant_id", assistant_id)
    if assistant is not None:
        inline = _jsonable(assistant)
        if not isinstance(inline, Mapping) or not inline:
            raise VapiValidationError(
                "assistant must be a non-empty mapping (a transient assistant)"
            )
        body["assistant"] = dict(inline)
    if phone_number_id is not None:
        body["phoneNumberId"] = check_id("phone_number_id", phone_number_id)
    elif "phoneNumber" not in extra:
        raise VapiValidationError("phone_number_id is required (or a transient phone_number=)")
    if not isinstance(customer_number, str) or not _E164.fullmatch(customer_number):
        raise VapiValidationError(
            f"customer_number must be an E.164 number like +14155550100, got {customer_number!r}"
        )
    body["customer"] = {"number": customer_number}
    overrides = _jsonable(assistant_overrides)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise VapiValidationError("assistant_overrides must be a mapping")
    if overrides is not None:
        body["assistantOverrides"] = overrides
    if name is not None:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise VapiValidationError(f"name must be 1..{MAX_NAME} characters, got {name!r}")
        body["name"] = name
    body.update(extra)
    return body


def update_assistant_body(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the changes of ``update_assistant`` and build its JSON body."""
    if not changes:
        raise VapiValidationError("update_assistant needs at least one field to change")
    body = camel_keys(changes)
    read_only = sorted(_READ_ONLY & body.keys())
    if read_only:
        raise VapiValidationError(f"{read_only} cannot be changed")
    return body
