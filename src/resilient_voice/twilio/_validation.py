"""Twilio's input rules, checked before anything is sent.

A request Twilio would refuse with a 400 costs a round trip, a token of the account's
calls-per-second and, worse, can hide a bug until production. The rules follow Twilio's
documented parameters (see ``docs/twilio.md`` for the table); anything they do not cover is left
for Twilio to judge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from resilient_voice._request_checks import E164, E164_RULE
from resilient_voice.errors import InvalidRequestError

__all__ = ["InvalidRequestError"]


_SID_BODY = "[0-9a-fA-F]{32}"
_PASCAL = re.compile(r"[A-Z][A-Za-z0-9]*")
_SHORT_CODE = re.compile(r"[0-9]{3,8}")
_ALPHA_SENDER = re.compile(r"(?=[A-Za-z0-9 ]*[A-Za-z])[A-Za-z0-9 ]{1,11}")

CALL_TO_SCHEMES = ("client:", "sip:", "sim:")
CALL_FROM_SCHEMES = ("client:", "sip:")
MESSAGE_CHANNELS = ("whatsapp:", "messenger:", "rcs:")
CALL_EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})
UPDATE_STATUSES = frozenset({"completed", "canceled"})
MAX_TWIML = 4000
MAX_BODY = 1600
MAX_MEDIA = 10


def text_value(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(field, f"must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidRequestError(field, "must not be empty")
    return value


def _scheme_address(value: str, schemes: tuple[str, ...]) -> bool:
    for scheme in schemes:
        if value.startswith(scheme):
            rest = value[len(scheme) :]
            return bool(rest) and not any(c.isspace() for c in rest)
    return False


def call_to(value: object) -> str:
    """``To`` of a call: E.164, or a ``client:``, ``sip:`` or ``sim:`` address."""
    text = text_value("to", value)
    if E164.fullmatch(text) or _scheme_address(text, CALL_TO_SCHEMES):
        return text
    raise InvalidRequestError("to", f"must be {E164_RULE} or a client:, sip: or sim: address")


def call_from(value: object) -> str:
    """``From`` of a call: E.164 (a Twilio number or verified caller id), ``client:``, ``sip:``."""
    text = text_value("from_", value)
    if E164.fullmatch(text) or _scheme_address(text, CALL_FROM_SCHEMES):
        return text
    raise InvalidRequestError("from_", f"must be {E164_RULE} or a client: or sip: address")


def _channel(text: str) -> bool:
    for scheme in MESSAGE_CHANNELS:
        if text.startswith(scheme):
            rest = text[len(scheme) :]
            if scheme == "whatsapp:":
                return E164.fullmatch(rest) is not None
            return bool(rest) and not any(c.isspace() for c in rest)
    return False


def message_to(value: object) -> str:
    """``To`` of a message: E.164 or a channel address (``whatsapp:+1...``, ``messenger:``...)."""
    text = text_value("to", value)
    if E164.fullmatch(text) or _channel(text):
        return text
    raise InvalidRequestError(
        "to", f"must be {E164_RULE} or a channel address such as whatsapp:+15551234567"
    )


def message_from(value: object) -> str:
    """``From`` of a message: E.164, a short code, an alphanumeric sender id or a channel."""
    text = text_value("from_", value)
    if (
        E164.fullmatch(text)
        or _SHORT_CODE.fullmatch(text)
        or _ALPHA_SENDER.fullmatch(text)
        or _channel(text)
    ):
        return text
    raise InvalidRequestError(
        "from_",
        f"must be {E164_RULE}, a short code, an alphanumeric sender id (1-11 characters) "
        "or a channel address",
    )


def sid(field: str, value: object, *prefixes: str) -> str:
    """A Twilio SID: a two-letter prefix and 32 hexadecimal digits."""
    text = text_value(field, value)
    if len(text) == 34 and text[:2] in prefixes and re.fullmatch(_SID_BODY, text[2:]):
        return text
    expected = " or ".join(prefixes)
    raise InvalidRequestError(field, f"must be a SID: {expected} followed by 32 hex digits")


def url(field: str, value: object) -> str:
    """An absolute http(s) URL, as Twilio needs for anything it will request."""
    text = text_value(field, value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError(field, "must be an absolute http:// or https:// URL")
    if any(c.isspace() for c in text):
        raise InvalidRequestError(field, "must not contain whitespace")
    return text


def one_of(**sources: object) -> str:
    """The name of the single source given; raise unless exactly one is."""
    given = [name for name, value in sources.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(f"{name}=" for name in sources)
        got = ", ".join(f"{name}=" for name in given) or "none"
        raise InvalidRequestError(
            given[0] if given else "url", f"give exactly one of {names} (got {got})"
        )
    return given[0]


def twiml(value: object) -> str:
    text = text_value("twiml", value)
    if len(text) > MAX_TWIML:
        raise InvalidRequestError("twiml", f"is {len(text)} characters; Twilio takes {MAX_TWIML}")
    return text


def body(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError("body", f"must be a str, got {type(value).__name__}")
    if len(value) > MAX_BODY:
        raise InvalidRequestError("body", f"is {len(value)} characters; Twilio takes {MAX_BODY}")
    return value


def media_urls(value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidRequestError("media_url", "must be a list of URLs")
    items = [url("media_url", item) for item in value]
    if not items:
        raise InvalidRequestError("media_url", "must not be empty (omit it instead)")
    if len(items) > MAX_MEDIA:
        raise InvalidRequestError("media_url", f"has {len(items)} URLs; Twilio takes {MAX_MEDIA}")
    return items


def call_events(value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidRequestError("status_callback_event", "must be a list of event names")
    events = list(value)
    unknown = [e for e in events if e not in CALL_EVENTS]
    if unknown:
        raise InvalidRequestError(
            "status_callback_event",
            f"unknown event(s) {unknown!r}; Twilio sends {sorted(CALL_EVENTS)}",
        )
    return events


FormValue = str | list[str]


def more_params(more: Mapping[str, object], taken: Iterable[str]) -> dict[str, FormValue]:
    """Extra Twilio parameters, forwarded untouched under their own (PascalCase) names."""
    reserved = set(taken)
    out: dict[str, FormValue] = {}
    for name, value in more.items():
        if not _PASCAL.fullmatch(name):
            raise InvalidRequestError(
                name, "extra parameters use Twilio's own PascalCase names (Timeout, Record...)"
            )
        if name in reserved:
            raise InvalidRequestError(
                name, f"is set by a named argument; pass {_keyword(name)}= instead"
            )
        if value is None:
            continue
        out[name] = _form_value(name, value)
    return out


def _keyword(name: str) -> str:
    """The keyword argument that sets Twilio's parameter ``name`` (``Url`` -> ``url``)."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return "from_" if snake == "from" else snake


def _form_value(name: str, value: object) -> FormValue:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return [str(_form_value(name, item)) for item in value]
    raise InvalidRequestError(
        name, f"must be a str, number, bool or list, got {type(value).__name__}"
    )
