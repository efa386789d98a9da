"""Pure ASGI 3 middleware for any framework (FastAPI, Starlette, Litestar, Quart, Django).

Every component is an ``async def __call__(self, scope, receive, send)`` class or app: it passes
through the scopes it does not handle and never buffers a body it does not need. Names are loaded
on first access, so importing one middleware does not import the others' dependencies
(prometheus-client for metrics, twilio for signature checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resilient_voice._exports import lazy_exports

if TYPE_CHECKING:
    from resilient_voice.asgi._correlation import CorrelationIdMiddleware
    from resilient_voice.asgi._leases import LeaseReleaseMiddleware
    from resilient_voice.asgi._metrics import MetricsMiddleware, make_metrics_app
    from resilient_voice.asgi._proxies import TrustedProxies
    from resilient_voice.asgi._ratelimit import RateLimitMiddleware
    from resilient_voice.asgi._twilio import TwilioSignatureMiddleware
    from resilient_voice.asgi._vapi import VapiWebhookMiddleware

__all__ = [
    "CorrelationIdMiddleware",
    "LeaseReleaseMiddleware",
    "MetricsMiddleware",
    "RateLimitMiddleware",
    "TrustedProxies",
    "TwilioSignatureMiddleware",
    "VapiWebhookMiddleware",
    "make_metrics_app",
]

__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "CorrelationIdMiddleware": "resilient_voice.asgi._correlation",
        "LeaseReleaseMiddleware": "resilient_voice.asgi._leases",
        "MetricsMiddleware": "resilient_voice.asgi._metrics",
        "make_metrics_app": "resilient_voice.asgi._metrics",
        "RateLimitMiddleware": "resilient_voice.asgi._ratelimit",
        "TrustedProxies": "resilient_voice.asgi._proxies",
        "TwilioSignatureMiddleware": "resilient_voice.asgi._twilio",
        "VapiWebhookMiddleware": "resilient_voice.asgi._vapi",
    },
    __all__,
)
