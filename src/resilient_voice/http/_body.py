"""Reading a response body within the attempt's bounds: time, decoded size, and one stream.

Two ways, both chosen by :class:`~resilient_voice.ResilientTransport`: :func:`buffered` reads a
body into memory inside the attempt (a success answer to a non-idempotent request, so a lost
body is the attempt's failure; every error answer, so the retry policy can judge it), and
:func:`bounded` hands an idempotent answer back streamed, cut off at the attempt's deadline and
at ``max_response_bytes``. ``gzip`` and ``deflate`` are decoded here with a bounded decompressor
so that the cap counts decoded bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

import anyio
import httpx

from resilient_voice._clock import Clock
from resilient_voice.errors import ProviderError
from resilient_voice.failure import FailureKind

__all__ = ["SUCCESS_OVERFLOW", "ResponseTooLargeError", "bounded", "buffered"]


class ResponseTooLargeError(ProviderError):
    """The upstream's answer decodes to more than the transport's ``max_response_bytes``.

    Raised instead of reading further. ``kind`` follows the answer: ``MAYBE_PROCESSED`` for a
    success answer to a non-idempotent request (which then reaches the caller as
    :class:`~resilient_voice.OutcomeUnknownError`), ``PERMANENT`` for a success answer to an
    idempotent one, and the status's own kind for an error answer.

    Attributes:
        limit: The cap, in bytes.
    """

    def __init__(self, status: int, limit: int, kind: FailureKind) -> None:
        super().__init__(
            status, None, f"response body larger than max_response_bytes={limit}", kind
        )
        self.limit = limit


_MAYBE = FailureKind.MAYBE_PROCESSED
SUCCESS_OVERFLOW = {True: FailureKind.PERMANENT, False: _MAYBE}
_ZLIB_WBITS = {
    "gzip": zlib.MAX_WBITS | 16,
    "x-gzip": zlib.MAX_WBITS | 16,
    "deflate": zlib.MAX_WBITS,
}


class _Decoder:
    """A ``gzip``/``deflate`` decoder that never produces more than ``limit`` bytes in all.

    ``zlib``'s ``max_length`` stops a compressed bomb at the cap instead of after it has been
    expanded in memory, which is why the transport decodes these encodings itself rather than
    leaving them to httpx.
    """

    __slots__ = ("_first", "_limit", "_size", "_status", "_wbits", "_zlib", "kind")

    def __init__(self, wbits: int, limit: int | None, status: int, kind: FailureKind) -> None:
        self._wbits = wbits
        self._zlib = zlib.decompressobj(wbits)
        self._first = wbits == zlib.MAX_WBITS
        self._limit = limit
        self._size = 0
        self._status = status
        self.kind = kind

    def decode(self, data: bytes) -> bytes:
        # One byte more than the room left shows an overflow without expanding further.
        room = 0 if self._limit is None else self._limit - self._size + 1
        try:
            out = self._zlib.decompress(data, room)
        except zlib.error as exc:
            if self._first:
                # "deflate" is zlib-wrapped by the standard, raw by some servers (as httpx).
                self._first = False
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.decode(data)
            raise httpx.DecodingError(str(exc)) from exc
        self._first = False
        return self._count(out)

    def flush(self) -> bytes:
        try:
            return self._count(self._zlib.flush())
        except zlib.error as exc:  # pragma: no cover  # flush reports nothing zlib kept
            raise httpx.DecodingError(str(exc)) from exc

    def _count(self, out: bytes) -> bytes:
        self._size += len(out)
        if self._limit is not None and self._size > self._limit:
            raise ResponseTooLargeError(self._status, self._limit, self.kind)
        return out


def _decoder_for(
    response: httpx.Response, request: httpx.Request, limit: int | None, kind: FailureKind
) -> _Decoder | None:
    """A bounded decoder when the body is gzip or deflate (and not also something else).

    None for answers without a body (HEAD, 204, 304), whose ``Content-Length`` describes the
    resource rather than a body and must stay as it is.
    """
    encoding = response.headers.get("content-encoding")
    status = response.status_code
    if encoding is None or request.method == "HEAD" or status in (204, 304):
        return None
    names = [name.strip().lower() for name in encoding.split(",")]
    names = [name for name in names if name and name != "identity"]
    if len(names) != 1 or names[0] not in _ZLIB_WBITS:
        return None
    return _Decoder(_ZLIB_WBITS[names[0]], limit, status, kind)


def _decoded_headers(headers: httpx.Headers, size: int | None) -> httpx.Headers:
    """``headers`` for a body we decoded: no ``Content-Encoding``, a truthful length."""
    headers = headers.copy()
    del headers["content-encoding"]
    if size is None:
        del headers["content-length"]
    else:
        headers["content-length"] = str(size)
    return headers


async def buffered(
    response: httpx.Response, request: httpx.Request, limit: int | None, kind: FailureKind
) -> httpx.Response:
    """Read ``response``'s body into memory (decoded when we can, capped); close the stream."""
    status = response.status_code
    decoder = _decoder_for(response, request, limit, kind)
    chunks: list[bytes] = []
    size = 0
    parts = _async_stream(response).__aiter__()
    done = False
    try:
        async for chunk in parts:
            if decoder is not None:
                chunks.append(decoder.decode(chunk))
                continue
            size += len(chunk)
            if limit is not None and size > limit:
                raise ResponseTooLargeError(status, limit, kind)
            chunks.append(chunk)
        if decoder is not None:
            chunks.append(decoder.flush())
        done = True
    finally:
        if not done:
            await _finish(parts)
        await response.aclose()
    body = b"".join(chunks)
    headers = response.headers
    if decoder is not None:
        headers = _decoded_headers(headers, len(body))
    return httpx.Response(
        status,
        headers=headers,
        stream=httpx.ByteStream(body),
        extensions=response.extensions,
        request=request,
    )


def _async_stream(response: httpx.Response) -> httpx.AsyncByteStream:
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):
        raise TypeError("the inner transport answered with a synchronous body stream")
    return stream


async def _finish(parts: AsyncIterator[bytes]) -> None:
    """Finish a body iterator, also when it is left early (an overflow, a decoding error).

    Closing the outermost generator would leave the ones below it (httpx's, httpcore's)
    suspended, to be collected later (trio warns about it). A read under an already-cancelled
    scope instead raises through every one of them, and each closes what it holds; an
    iterator already exhausted or failed just ends.
    """
    with anyio.CancelScope() as scope:
        scope.cancel()
        while await anext(parts, None) is not None:
            pass


def bounded(
    response: httpx.Response,
    request: httpx.Request,
    limit: int | None,
    clock: Clock,
    deadline: float | None,
    timeout: float | None,
) -> httpx.Response:
    """Hand a streamed answer back with its body read bounded in time and size.

    Without a deadline, an answer left to httpx to decode whose ``Content-Length`` is within
    the cap goes back as it came: the HTTP layer (h11, h2) refuses a body longer than it
    declared, so wrapping it would only cost time.
    """
    decoder = _decoder_for(response, request, limit, FailureKind.PERMANENT)
    if decoder is None and deadline is None:
        if limit is None:
            return response
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= limit:
            return response
    status = response.status_code
    if decoder is not None:
        response.headers = _decoded_headers(response.headers, None)
    response.stream = _BoundedStream(
        _async_stream(response), request, decoder, limit, status, clock, deadline, timeout
    )
    return response


class _BoundedStream(httpx.AsyncByteStream):
    """An idempotent answer's body, cut off at the attempt's deadline and at the size cap.

    Reading a normal body costs one clock reading per chunk, no task, timer or cancel scope:
    the deadline is checked as each chunk arrives, and before the first read httpx's read
    timeout for this body is lowered to the time left (httpcore reads it once, when the body
    read starts), so neither a body dripped a byte at a time nor one that stalls outright
    holds the caller long past the attempt's timeout.
    """

    __slots__ = (
        "_clock",
        "_deadline",
        "_decoder",
        "_inner",
        "_limit",
        "_request",
        "_status",
        "_timeout",
    )

    def __init__(
        self,
        inner: httpx.AsyncByteStream,
        request: httpx.Request,
        decoder: _Decoder | None,
        limit: int | None,
        status: int,
        clock: Clock,
        deadline: float | None,
        timeout: float | None,
    ) -> None:
        self._inner = inner
        self._request = request
        self._decoder = decoder
        self._limit = limit
        self._status = status
        self._clock = clock
        self._deadline = deadline
        self._timeout = timeout

    def _late(self) -> httpx.ReadTimeout:
        return httpx.ReadTimeout(
            f"the response body was not read within the attempt's timeout ({self._timeout} s)",
            request=self._request,
        )

    async def __aiter__(self) -> AsyncIterator[bytes]:
        decoder = self._decoder
        limit = self._limit
        deadline = self._deadline
        now = self._clock.now
        timeouts: dict[str, float | None] | None = None
        read_timeout: float | None = None
        if deadline is not None:
            left = deadline - now()
            if left <= 0:
                raise self._late()
            found = self._request.extensions.get("timeout")
            if isinstance(found, dict):
                read_timeout = found.get("read")
                if read_timeout is None or read_timeout > left:
                    timeouts = found
                    found["read"] = left
        chunks = self._inner.__aiter__()
        size = 0
        done = False
        try:
            async for chunk in chunks:
                if deadline is not None and now() > deadline:
                    raise self._late()
                if decoder is not None:
                    chunk = decoder.decode(chunk)  # noqa: PLW2901  # the decoded form replaces it
                else:
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise ResponseTooLargeError(self._status, limit, FailureKind.PERMANENT)
                if chunk:
                    yield chunk
            if decoder is not None:
                tail = decoder.flush()
                if tail:
                    yield tail
            done = True
        finally:
            if timeouts is not None:
                timeouts["read"] = read_timeout  # the request may be sent again
            if not done:
                await _finish(chunks)

    async def aclose(self) -> None:
        await self._inner.aclose()
