"""The typed Twilio client and the official SDK adapter.

``TwilioClient`` speaks Twilio's Calls and Messages API over httpx with a
:class:`~resilient_voice.http.ResilientTransport`; it needs pydantic and httpx only.
``ResilientTwilioHttpClient`` plugs the same protection into the official ``twilio`` package
(``pip install 'resilient-voice[twilio]'``); it is loaded on first use, so importing this
package never imports ``twilio``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient_voice.twilio._client import TwilioClient
from resilient_voice.twilio._errors import TwilioAPIError, TwilioAuthenticationError
from resilient_voice.twilio._models import (
    Call,
    CallDirection,
    CallStatus,
    Message,
    MessageDirection,
    MessageStatus,
)
from resilient_voice.twilio._policies import OPERATIONS, default_policies

if TYPE_CHECKING:
    from resilient_voice.twilio.sdk import ResilientTwilioHttpClient

__all__ = [
    "OPERATIONS",
    "Call",
    "CallDirection",
    "CallStatus",
    "Message",
    "MessageDirection",
    "MessageStatus",
    "ResilientTwilioHttpClient",
    "TwilioAPIError",
    "TwilioAuthenticationError",
    "TwilioClient",
    "default_policies",
]


for _name in __all__:
    _obj = globals().get(_name)
    if getattr(_obj, "__module__", "").startswith(f"{__name__}._"):
        _obj.__module__ = __name__  # the public path in reprs and docs
del _name, _obj


def __getattr__(name: str) -> Any:
    if name == "ResilientTwilioHttpClient":
        from resilient_voice.twilio.sdk import ResilientTwilioHttpClient

        globals()[name] = ResilientTwilioHttpClient
        return ResilientTwilioHttpClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
