"""A raw TCP upstream on 127.0.0.1 that misbehaves the way load balancers and edges do.

It runs in the test's own event loop (anyio: asyncio or trio). Every request is read in full and
recorded, then answered with a status line and full headers, ``Content-Length`` included, and:

- ``"drop"``: half of the body, then the connection is closed;
- ``"stall"``: half of the body, then nothing more until the client leaves (bounded);
- ``"drip"``: the body one byte every ``drip_interval`` seconds, for at most ``drip_for``
  seconds, then the rest at once (so a client that does not give up still finishes);
- ``"whole"``: the whole body (for bodies that are hostile in themselves).

And one that fails the request instead of the answer:

- ``"reset"``: the request's head and the first 64 KiB of its body are read (and recorded),
  then the connection is reset, so a client sending a larger body fails mid-send.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

Mode = Literal["drop", "stall", "drip", "whole", "reset"]

_STALL_LIMIT = 10.0
_RESET_AFTER = 65536
_REASONS = {200: "OK", 201: "Created", 500: "Internal Server Error"}


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RawUpstream:
    url: str
    requests: list[RawRequest] = field(default_factory=list)


@asynccontextmanager
async def raw_upstream(
    body: bytes,
    *,
    mode: Mode,
    status: int = 201,
    headers: dict[str, str] | None = None,
    drip_interval: float = 0.02,
    drip_for: float = 2.0,
) -> AsyncIterator[RawUpstream]:
    """Serve one misbehaviour on a free loopback port; yield the upstream (its URL, requests)."""
    extra = {"content-type": "application/json", **(headers or {})}
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in extra.items())
        + f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610  # not Django
    upstream = RawUpstream(url=f"http://127.0.0.1:{port}")

    async def handle(client: anyio.abc.SocketStream) -> None:
        # The client may leave first, as clients that give up do.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await answer(client)

    async def answer(client: anyio.abc.SocketStream) -> None:
        async with client:
            reader = BufferedByteReceiveStream(client)
            while True:
                try:
                    raw_head = await reader.receive_until(b"\r\n\r\n", 65536)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                request_line, *lines = raw_head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                fields = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
                length = int(fields.get("content-length", "0"))
                if mode == "reset":
                    content = await reader.receive_exactly(min(length, _RESET_AFTER))
                    upstream.requests.append(RawRequest(method, path, fields, content))
                    raw = client.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610  # not Django
                    # Linger 0: closing sends a reset instead of a FIN.
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                content = await reader.receive_exactly(length) if length else b""
                upstream.requests.append(RawRequest(method, path, fields, content))
                if mode == "whole":
                    await client.send(head + body)
                    continue
                await client.send(head + body[: len(body) // 2])
                if mode == "drop":
                    return
                if mode == "stall":
                    with anyio.move_on_after(_STALL_LIMIT):
                        try:
                            while await client.receive():
                                pass
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            pass
                    return
                rest = body[len(body) // 2 :]
                with anyio.move_on_after(drip_for):
                    while len(rest) > 1:
                        await anyio.sleep(drip_interval)
                        await client.send(rest[:1])
                        rest = rest[1:]
                await client.send(rest)

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        try:
            yield upstream
        finally:
            group.cancel_scope.cancel()
