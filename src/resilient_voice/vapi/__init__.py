"""Vapi: a typed resilient client, pydantic models, and the official SDK made resilient.

- :class:`VapiClient`: calls, assistants and phone numbers over httpx and
  :class:`~resilient_voice.http.ResilientTransport`, with a policy per operation
  (:func:`default_policies`), ``create_call`` never sent twice, and
  :meth:`VapiClient.reconcile_call` to resolve an :class:`~resilient_voice.OutcomeUnknownError`.
- Models that keep unknown fields: :class:`VapiCall`, :class:`VapiAssistant`,
  :class:`VapiPhoneNumber`.
- The official SDK recipe: :func:`sdk_http_client` for ``AsyncVapi(httpx_client=...)`` and
  :func:`no_sdk_retries` for every SDK call's ``request_options``.

See docs/vapi.md.
"""

from __future__ import annotations

from resilient_voice._exports import publish
from resilient_voice.vapi._client import VapiClient
from resilient_voice.vapi._errors import (
    VapiAPIError,
    VapiAuthenticationError,
    VapiConcurrencyLimitError,
)
from resilient_voice.vapi._models import (
    CallStatus as CallStatus,
)
from resilient_voice.vapi._models import (
    CallType as CallType,
)
from resilient_voice.vapi._models import (
    PhoneNumberStatus as PhoneNumberStatus,
)
from resilient_voice.vapi._models import (
    SubscriptionLimits as SubscriptionLimits,
)
from resilient_voice.vapi._models import (
    VapiAssistant as VapiAssistant,
)
from resilient_voice.vapi._models import (
    VapiCall as VapiCall,
)
from resilient_voice.vapi._models import (
    VapiCustomer,
)
from resilient_voice.vapi._models import (
    VapiPhoneNumber as VapiPhoneNumber,
)
from resilient_voice.vapi._policies import default_policies
from resilient_voice.vapi._sdk import (
    SdkRequestOptions as SdkRequestOptions,
)
from resilient_voice.vapi._sdk import (
    attempt_overrides,
    no_sdk_retries,
    sdk_http_client,
)

__all__ = [
    "VapiAPIError",
    "VapiAuthenticationError",
    "VapiClient",
    "VapiConcurrencyLimitError",
    "VapiCustomer",
    "attempt_overrides",
    "default_policies",
    "no_sdk_retries",
    "sdk_http_client",
]

# The models and records the client returns, to be read: importable from here for annotations,
# not part of ``__all__``.
_RETURN_TYPES = [
    "CallStatus",
    "CallType",
    "PhoneNumberStatus",
    "SdkRequestOptions",
    "SubscriptionLimits",
    "VapiAssistant",
    "VapiCall",
    "VapiPhoneNumber",
]

publish(globals(), [*__all__, *_RETURN_TYPES])
