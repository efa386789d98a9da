"""The typed Twilio client and the official SDK adapter.

``TwilioClient`` speaks Twilio's Calls and Messages API over httpx with a
:class:`~resilient_voice.http.ResilientTransport`; it needs pydantic and httpx only.
``ResilientTwilioHttpClient`` plugs the same protection into the official ``twilio`` package
(``pip install 'resilient-voice[twilio]'``); it is loaded on first use, so importing this
package never imports ``twilio``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resilient_voice._exports import lazy_exports, publish
from resilient_voice.twilio._client import TwilioClient
from resilient_voice.twilio._errors import TwilioAPIError, TwilioAuthenticationError
from resilient_voice.twilio._models import (
    Call as Call,
)
from resilient_voice.twilio._models import (
    CallDirection as CallDirection,
)
from resilient_voice.twilio._models import (
    CallStatus as CallStatus,
)
from resilient_voice.twilio._models import (
    Message as Message,
)
from resilient_voice.twilio._models import (
    MessageDirection as MessageDirection,
)
from resilient_voice.twilio._models import (
    MessageStatus as MessageStatus,
)
from resilient_voice.twilio._policies import default_policies

if TYPE_CHECKING:
    from resilient_voice.twilio._sdk import ResilientTwilioHttpClient

__all__ = [
    "ResilientTwilioHttpClient",
    "TwilioAPIError",
    "TwilioAuthenticationError",
    "TwilioClient",
    "default_policies",
]

# The models the client returns, to be read: importable from here for annotations, not part of
# ``__all__``.
_RETURN_TYPES = [
    "Call",
    "CallDirection",
    "CallStatus",
    "Message",
    "MessageDirection",
    "MessageStatus",
]

publish(globals(), [*__all__, *_RETURN_TYPES])
__getattr__, __dir__ = lazy_exports(
    globals(), {"ResilientTwilioHttpClient": "resilient_voice.twilio._sdk"}, __all__
)
