"""The app of the ``uvicorn --workers 2`` deployment tests, configured from the environment.

``RV_DEPLOY_TOKEN`` is the Auth Token; ``RV_DEPLOY_OPTIONS`` the middleware's keyword arguments
as a Python literal (only plain values: strings, lists, dicts). Every path but the readiness
probe is guarded: ``paths=`` matching under ``--root-path`` is the path matchers' business.
"""

import ast
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from resilient_voice.asgi import TwilioSignatureMiddleware


async def _ok(request: Request) -> Response:
    await request.body()
    return PlainTextResponse("ok")


_inner = Starlette(
    routes=[Route("/twilio/status", _ok, methods=["POST"]), Route("/ready", _ok)],
)
_guarded = TwilioSignatureMiddleware(
    _inner,
    os.environ["RV_DEPLOY_TOKEN"],
    **ast.literal_eval(os.environ.get("RV_DEPLOY_OPTIONS", "{}")),
)


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Readiness probes skip the guard; everything else is checked."""
    if scope["type"] == "http" and scope["path"].endswith("/ready"):
        await _inner(scope, receive, send)
        return
    await _guarded(scope, receive, send)
