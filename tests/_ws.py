"""WebSocket helpers: uvicorn with websockets on loopback, and a wsproto client over anyio.

``resilient_voice.testing.serve`` disables websockets (so that no websocket package is imported
by users' tests); these tests need a real handshake, so they run uvicorn with its wsproto
implementation, in a thread of its own, the way ``serve`` does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from resilient_voice.testing._serve import _listening_socket, _server_class, _stop


@asynccontextmanager
async def serve_ws(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn (HTTP and wsproto websockets); yield ``host:port``."""
    sock = _listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        ws="wsproto",
        lifespan="off",
        loop="asyncio",
        log_config=None,
        log_level=logging.WARNING,
        access_log=False,
        proxy_headers=False,
    )
    server = _server_class()(config)
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        finally:
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    thread = threading.Thread(target=run, name=f"ws-serve-{port}", daemon=True)
    thread.start()
    try:
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.005)
        yield f"127.0.0.1:{port}"
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(server, loops, thread, 5.0)
            sock.close()


@dataclass
class Handshake:
    """What a websocket client saw: 101 and the first text message, or the refusal."""

    status: int
    headers: dict[str, str]
    body: bytes
    message: str | None


async def handshake(address: str, path: str, headers: dict[str, str]) -> Handshake:
    """Open a websocket to ``ws://address/path`` with ``headers``; read one message; close."""
    host, port = address.rsplit(":", 1)
    connection = WSConnection(ConnectionType.CLIENT)
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(connection.send(Request(host=address, target=path, extra_headers=extra)))
        status, seen, body, message = 0, {}, b"", None
        with anyio.fail_after(5):
            while True:
                try:
                    data = await stream.receive()
                except anyio.EndOfStream:
                    data = b""
                connection.receive_data(data or None)
                for event in connection.events():
                    if isinstance(event, AcceptConnection):
                        status = 101
                        seen = {k.decode(): v.decode() for k, v in event.extra_headers}
                    elif isinstance(event, RejectConnection):
                        status = event.status_code
                        seen = {k.decode(): v.decode() for k, v in event.headers}
                        if not event.has_body:
                            return Handshake(status, seen, body, None)
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            return Handshake(status, seen, body, None)
                    elif isinstance(event, TextMessage):
                        message = event.data
                        await stream.send(connection.send(CloseConnection(code=1000)))
                        return Handshake(status, seen, body, message)
                    elif isinstance(event, CloseConnection):
                        return Handshake(status, seen, body, message)
                if not data:
                    return Handshake(status, seen, body, message)
