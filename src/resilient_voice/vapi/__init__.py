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

from resilient_voice.vapi._client import ATTEMPT_ID_EXTENSION, DEFAULT_BASE_URL, VapiClient
from resilient_voice.vapi._errors import (
    VapiAPIError,
    VapiAuthenticationError,
    VapiConcurrencyLimitError,
)
from resilient_voice.vapi._models import (
    ATTEMPT_ID_KEY,
    CONCURRENCY_ENDED_REASON,
    CORRELATION_ID_KEY,
    CallStatus,
    CallType,
    PhoneNumberStatus,
    SubscriptionLimits,
    VapiAssistant,
    VapiCall,
    VapiCustomer,
    VapiModel,
    VapiPhoneNumber,
)
from resilient_voice.vapi._policies import OPERATIONS, default_policies
from resilient_voice.vapi._sdk import (
    SdkRequestOptions,
    attempt_overrides,
    no_sdk_retries,
    sdk_http_client,
)

__all__ = [
    "ATTEMPT_ID_EXTENSION",
    "ATTEMPT_ID_KEY",
    "CONCURRENCY_ENDED_REASON",
    "CORRELATION_ID_KEY",
    "DEFAULT_BASE_URL",
    "OPERATIONS",
    "CallStatus",
    "CallType",
    "PhoneNumberStatus",
    "SdkRequestOptions",
    "SubscriptionLimits",
    "VapiAPIError",
    "VapiAssistant",
    "VapiAuthenticationError",
    "VapiCall",
    "VapiClient",
    "VapiConcurrencyLimitError",
    "VapiCustomer",
    "VapiModel",
    "VapiPhoneNumber",
    "attempt_overrides",
    "default_policies",
    "no_sdk_retries",
    "sdk_http_client",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("resilient_voice.vapi._"):
        _obj.__module__ = __name__
del _name, _obj
