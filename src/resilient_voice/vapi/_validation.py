"""Argument checks and request-body building for the Vapi client; nothing here does I/O.

Bad input is refused with :class:`~resilient_voice.InvalidRequestError` before any request: a
typo must not cost a breaker permit, a token, or a round trip that Vapi answers with 400.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from resilient_voice._request_checks import E164_RULE, check_count, is_e164
from resilient_voice.errors import InvalidRequestError
from resilient_voice.vapi._models import ATTEMPT_ID_KEY, CORRELATION_ID_KEY

__all__ = [
    "camel_keys",
    "check_id",
    "check_limit",
    "create_call_body",
    "customer_body",
    "format_datetime",
    "plant_metadata",
]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Vapi's own rule for a number when its E.164 check is off (CreateCustomerDTO).
_LOOSE_NUMBER = re.compile(r"\+?[A-Za-z0-9]+")
_NUMBER_LENGTH = range(3, 41)
_EXTENSION = re.compile(r"[0-9]{1,10}")
_SIP_SCHEMES = ("sip:", "sips:")
MAX_NAME = 40
MAX_LIMIT = 1000

# Keys of the create-call body that create_call's own parameters own.
_OWNED = frozenset(
    {"assistantId", "assistant", "phoneNumberId", "customer", "customerId", "assistantOverrides"}
)
# CreateCustomerDTO's fields, as Vapi documents them, without assistantOverrides (see below).
_CUSTOMER_TEXT = {"name": MAX_NAME, "email": MAX_NAME, "externalId": MAX_NAME}
_CUSTOMER_KEYS = frozenset(
    {"number", "numberE164CheckEnabled", "extension", "sipUri", *_CUSTOMER_TEXT}
)
_OTHER_AGENTS = frozenset({"squadId", "squad", "workflowId", "workflow"})
_READ_ONLY = frozenset({"id", "orgId", "createdAt", "updatedAt"})


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a plausible Vapi id (safe to put in a URL path)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidRequestError(
            name, f"must be a non-empty id of letters, digits and ._:- (got {value!r})"
        )
    return value


def check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    return check_count("limit", limit, 1, MAX_LIMIT)


def format_datetime(name: str, value: object) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``, as Vapi's date filters take it."""
    if not isinstance(value, datetime):
        raise InvalidRequestError(name, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequestError(name, "must be timezone-aware (naive datetimes are ambiguous)")
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
            raise InvalidRequestError(key, "given twice (as snake_case and camelCase)")
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
        raise InvalidRequestError("assistant_overrides", "'metadata' must be a mapping")
    metadata = dict(user) if user is not None else {}
    metadata[ATTEMPT_ID_KEY] = attempt_id
    if correlation_id is not None:
        metadata[CORRELATION_ID_KEY] = correlation_id
    else:
        metadata.pop(CORRELATION_ID_KEY, None)
    planted["metadata"] = metadata
    return planted


def customer_body(customer: object) -> dict[str, Any]:
    """Validate a ``customer=`` (mapping or :class:`VapiCustomer`) and return Vapi's JSON for it.

    Keys may be snake_case or camelCase. Unknown keys are refused rather than forwarded: Vapi
    ignores a misspelt field, and a dropped ``extension`` dials the wrong person.
    ``assistantOverrides`` is refused too: Vapi documents it for batch calls, and whether it
    would replace the top-level overrides (and the attempt id planted there) is not documented;
    pass ``assistant_overrides=`` instead.
    """
    raw = _jsonable(customer)
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(
            "customer", f"must be a mapping or a VapiCustomer, got {type(customer).__name__}"
        )
    fields = {key: value for key, value in camel_keys(raw).items() if value is not None}
    if "assistantOverrides" in fields:
        raise InvalidRequestError(
            "customer",
            "'assistantOverrides' is for batch calls; pass assistant_overrides= "
            "to create_call instead",
        )
    unknown = sorted(fields.keys() - _CUSTOMER_KEYS)
    if unknown:
        raise InvalidRequestError(
            "customer", f"unknown field(s) {unknown}; Vapi's are {sorted(_CUSTOMER_KEYS)}"
        )
    if ("number" in fields) == ("sipUri" in fields):
        raise InvalidRequestError("customer", "needs exactly one of 'number' and 'sipUri'")
    check = fields.get("numberE164CheckEnabled", True)
    if not isinstance(check, bool):
        raise InvalidRequestError("customer", "'numberE164CheckEnabled' must be a bool")
    number = fields.get("number")
    if number is not None:
        if check and not is_e164(number):
            raise InvalidRequestError(
                "customer",
                f"'number' must be {E164_RULE} like +14155550100 "
                f"(or set numberE164CheckEnabled=False), got {number!r}",
            )
        if not check and not (
            isinstance(number, str)
            and len(number) in _NUMBER_LENGTH
            and _LOOSE_NUMBER.fullmatch(number)
        ):
            raise InvalidRequestError(
                "customer",
                f"'number' must be 3..40 letters or digits, optionally after a '+', got {number!r}",
            )
    elif "numberE164CheckEnabled" in fields:
        raise InvalidRequestError("customer", "'numberE164CheckEnabled' applies to 'number' only")
    sip_uri = fields.get("sipUri")
    if sip_uri is not None and not _is_sip_uri(sip_uri):
        raise InvalidRequestError(
            "customer", f"'sipUri' must be a sip: or sips: URI without spaces, got {sip_uri!r}"
        )
    extension = fields.get("extension")
    if extension is not None and not (
        isinstance(extension, str) and _EXTENSION.fullmatch(extension)
    ):
        raise InvalidRequestError(
            "customer", f"'extension' must be 1..10 digits (a str), got {extension!r}"
        )
    for key, limit in _CUSTOMER_TEXT.items():
        value = fields.get(key)
        if value is not None and not (isinstance(value, str) and 1 <= len(value) <= limit):
            raise InvalidRequestError("customer", f"{key!r} must be 1..{limit} characters")
    return fields


def _is_sip_uri(value: object) -> bool:
    if not isinstance(value, str):
        return False
    lowered = value.lower()
    for scheme in _SIP_SCHEMES:
        if lowered.startswith(scheme):
            rest = value[len(scheme) :]
            return bool(rest) and rest.isprintable() and not any(c.isspace() for c in rest)
    return False


def _customer(customer_number: object, customer: object, customer_id: object) -> tuple[str, Any]:
    """The body key and value for the one customer argument given (Vapi takes exactly one)."""
    given = [
        name
        for name, value in (
            ("customer_number", customer_number),
            ("customer", customer),
            ("customer_id", customer_id),
        )
        if value is not None
    ]
    if len(given) != 1:
        got = ", ".join(f"{name}=" for name in given) or "none"
        raise InvalidRequestError(
            "customer_number",
            f"give exactly one of customer_number=, customer= and customer_id= (got {got})",
        )
    if customer_id is not None:
        return "customerId", check_id("customer_id", customer_id)
    if customer is not None:
        return "customer", customer_body(customer)
    if not is_e164(customer_number):
        raise InvalidRequestError(
            "customer_number", f"must be {E164_RULE} like +14155550100, got {customer_number!r}"
        )
    return "customer", {"number": customer_number}


def create_call_body(
    *,
    assistant_id: str | None,
    assistant: Mapping[str, Any] | BaseModel | None,
    phone_number_id: str | None,
    customer_number: str | None,
    customer: Mapping[str, Any] | BaseModel | None = None,
    customer_id: str | None = None,
    assistant_overrides: Mapping[str, Any] | BaseModel | None,
    name: str | None,
    more: Mapping[str, Any],
) -> dict[str, Any]:
    """Validate the arguments of ``create_call`` and build its JSON body (without our ids)."""
    extra = camel_keys(more)
    if "customers" in extra:
        raise InvalidRequestError(
            "customers", "batch calls are not supported: call create_call once per customer"
        )
    clash = sorted(_OWNED & extra.keys())
    if clash:
        raise InvalidRequestError(
            clash[0], f"pass {clash} through create_call's own parameters, not as extra fields"
        )
    agents = [key for key in _OTHER_AGENTS if key in extra]
    chosen = (assistant_id is not None) + (assistant is not None) + len(agents)
    if chosen != 1:
        raise InvalidRequestError(
            "assistant_id",
            "give exactly one of assistant_id= and assistant= (or one squad/workflow field)",
        )
    body: dict[str, Any] = {}
    if assistant_id is not None:
        body["assistantId"] = check_id("assistant_id", assistant_id)
    if assistant is not None:
        inline = _jsonable(assistant)
        if not isinstance(inline, Mapping) or not inline:
            raise InvalidRequestError(
                "assistant", "must be a non-empty mapping (a transient assistant)"
            )
        body["assistant"] = dict(inline)
    if phone_number_id is not None:
        body["phoneNumberId"] = check_id("phone_number_id", phone_number_id)
    elif "phoneNumber" not in extra:
        raise InvalidRequestError("phone_number_id", "is required (or a transient phone_number=)")
    key, value = _customer(customer_number, customer, customer_id)
    body[key] = value
    overrides = _jsonable(assistant_overrides)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise InvalidRequestError("assistant_overrides", "must be a mapping")
    if overrides is not None:
        body["assistantOverrides"] = overrides
    if name is not None:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise InvalidRequestError("name", f"must be 1..{MAX_NAME} characters, got {name!r}")
        body["name"] = name
    body.update(extra)
    return body


def update_assistant_body(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the changes of ``update_assistant`` and build its JSON body."""
    if not changes:
        raise InvalidRequestError("changes", "update_assistant needs at least one field to change")
    body = camel_keys(changes)
    read_only = sorted(_READ_ONLY & body.keys())
    if read_only:
        raise InvalidRequestError(read_only[0], f"{read_only} cannot be changed")
    return body
