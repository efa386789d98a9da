"""The ASGI 3 types of the middlewares and of the testing fake and server, defined once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Any for the arguments so that apps typed with other frameworks' scope types (Litestar's
# TypedDicts, asgiref's) can be wrapped without casts.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
