"""The request body handed to the inner transport: in memory, iterated without a generator.

httpcore sends a body with ``async for chunk in request.stream``. When the connection fails
mid-send (a reset, a write timeout) the loop is left by the exception, and an async generator
behind ``__aiter__`` (httpx's ``ByteStream``'s is one) stays suspended until it is collected;
trio's finalizer then warns with a ``ResourceWarning``. An iterator object has nothing to
finalize, so leaving it half-way costs nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

__all__ = ["RequestBody"]


class RequestBody(httpx.ByteStream):
    """A request body in memory, sent again as it is on every attempt.

    Still an ``httpx.ByteStream`` (its synchronous iteration is httpx's), so whatever checks
    for one (httpx's redirects, another transport) sees a body that can be replayed.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self._body = body

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _OneChunk(self._body)


class _OneChunk:
    """The body as one chunk, like ``ByteStream``'s generator, but with no frame to suspend."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __aiter__(self) -> _OneChunk:
        return self

    async def __anext__(self) -> bytes:
        body = self._body
        if body is None:
            raise StopAsyncIteration
        self._body = None
        return body
