"""The app of the ``uvicorn --workers 3`` test: RateLimitMiddleware sharing one Redis store.

Each worker process imports this module after it has started, so each builds its own backend
and connection pool (nothing crosses a fork); the ASGI lifespan opens and closes the pool.
Every response names the worker's pid in ``x-pid``, so the test sees that several served.
"""

from __future__ import annotations

import os
from typing import Any

from resilient_voice.asgi import RateLimitMiddleware
from resilient_voice.redis import RedisBackend

backend = RedisBackend.from_url(
    os.environ["RV_REDIS_URL"], prefix=os.environ["RV_PREFIX"], timeout=1.0
)
_PID = str(os.getpid()).encode()


async def _inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        async with backend:
            await send({"type": "lifespan.startup.complete"})
            await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


_limited = RateLimitMiddleware(_inner, rate=2, burst=5, store=backend, name="inbound")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await _limited(scope, receive, send)
        return

    async def send_with_pid(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-pid", _PID)]
        await send(message)

    await _limited(scope, receive, send_with_pid)
