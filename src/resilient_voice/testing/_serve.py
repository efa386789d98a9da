"""Run any ASGI app on loopback with uvicorn, in its own thread, for asyncio and trio tests.

The server gets its own thread and its own asyncio event loop, so the test's event loop (asyncio
or trio) only ever talks to it over real sockets: what the client sees is exactly what a client
of a real upstream would see, transport errors included.

An app can make the server drop the connection without any response by raising
:class:`DropConnectionError` before it starts the response. Uvicorn alone would answer such an
exception with a 500, which a client sees as an HTTP response; ``serve()`` installs a per-connection
wrapper that closes (or resets) the socket instead, then waits for uvicorn to notice the
disconnect so that it does not try to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from resilient_voice._pickling import reduce_exception
from resilient_voice.asgi._types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    import uvicorn

__all__ = ["DropConnectionError", "serve"]

_POLL = 0.005
_LINGER_ZERO = struct.pack("ii", 1, 0)


class DropConnectionError(Exception):
    """Raised by an app served by :func:`serve` to drop the connection without a response.

    Raised before ``http.response.start``, the client sees a transport error (httpx
    ``RemoteProtocolError`` "Server disconnected without sending a response", or ``ReadError``
    for a reset) instead of any HTTP status. Raised after the response started (a status and
    part of a body sent with ``more_body``), the body is cut short: the client has the status
    and headers, then its body read fails (``RemoteProtocolError``, "peer closed connection
    without sending complete message body"). Under a server other than
    :func:`serve` it is an ordinary exception (uvicorn answers 500; httpx's ``ASGITransport``
    raises it into the client).

    Args:
        reset: Abort the socket (TCP RST) instead of closing it cleanly (FIN).
    """

    def __init__(self, *, reset: bool = False) -> None:
        super().__init__("connection dropped on purpose")
        self.reset = reset

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_exception(self)


class _DroppingApp:
    """Per-connection wrapper: turns :class:`DropConnectionError` into a closed socket."""

    __slots__ = ("_app", "_transport")

    def __init__(self, app: ASGIApp, transport: asyncio.Transport) -> None:
        self._app = app
        self._transport = transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._app(scope, receive, send)
        except DropConnectionError as exc:
            if exc.reset:
                raw = self._transport.get_extra_info("socket")
                if raw is not None:
                    # A zero linger time makes close() send RST instead of FIN.
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                self._transport.abort()
            else:
                self._transport.close()
            # Until uvicorn sees the disconnect it would answer a returning app with a 500.
            with anyio.move_on_after(2.0):
                while (await receive())["type"] != "http.disconnect":
                    pass


def _import_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise ModuleNotFoundError(
            "serve() needs the uvicorn package: pip install 'resilient-voice[testing]'",
            name="uvicorn",
        ) from exc
    return uvicorn


def _protocol_class() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _DroppingH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.app = _DroppingApp(self.app, transport)

    return _DroppingH11Protocol


def _server_class() -> type[uvicorn.Server]:
    import uvicorn

    class _Server(uvicorn.Server):
        """Stops as soon as asked instead of polling ``should_exit`` every 100 ms."""

        stop_event: asyncio.Event | None = None

        async def main_loop(self) -> None:
            self.stop_event = asyncio.Event()
            if not self.should_exit:
                await self.stop_event.wait()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn's own shutdown sleeps in 100 ms steps; tests start and stop servers
            # constantly, so poll finely and keep the same order: stop listening, close idle
            # connections, let requests finish (bounded), cancel the rest, then lifespan.
            loop = asyncio.get_running_loop()
            for server in self.servers:
                server.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()
            grace = self.config.timeout_graceful_shutdown or 1
            deadline = loop.time() + grace
            state = self.server_state
            while (state.connections or state.tasks) and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(_POLL)  # uvicorn offers no event to wait on
            for task in list(state.tasks):
                task.cancel()
            for connection in list(state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
            # A closed transport releases its socket in a later loop callback: let those run
            # before the loop stops, or the sockets are left to the garbage collector (and to
            # pytest's unraisable-warning check).
            drain_until = loop.time() + 1.0
            while state.connections and loop.time() < drain_until:  # noqa: ASYNC110
                await asyncio.sleep(_POLL)
            for server in self.servers:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 1.0)
            if not self.force_exit:
                await self.lifespan.shutdown()

    return _Server


def _listening_socket(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto is
    # TCP, and without it Nagle plus delayed ACKs add about 40 ms to every response.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 5.0,
    root_path: str = "",
    proxy_headers: bool = False,
    forwarded_allow_ips: str | list[str] | None = None,
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on ``host`` in a background thread; yield its base URL.

    Works the same from asyncio and trio: the server has its own thread and asyncio loop, and
    this function only polls it with short ``anyio.sleep`` calls. The ASGI lifespan protocol runs
    (``lifespan="auto"``), so an app can start and stop background work. Uvicorn's logging is
    left unconfigured (``log_config=None``), its access log is off, and websockets are disabled
    so no optional websocket package is imported.

    Args:
        app: Any ASGI 3 application.
        host: The address to bind; loopback by default.
        port: The port to bind; 0 lets the OS pick a free one.
        startup_timeout: Seconds to wait for the server to listen.
        shutdown_timeout: Seconds to wait for a clean stop (in-flight requests get this long,
            then are cancelled; then the wait is abandoned with an error).
        root_path: uvicorn's ``--root-path``: the prefix a proxy in front strips, which uvicorn
            puts in ``root_path`` and in front of ``path``.
        proxy_headers: uvicorn's ``--proxy-headers`` (off here, unlike uvicorn's own default),
            to test how middleware sees a scope the server already rewrote.
        forwarded_allow_ips: uvicorn's ``--forwarded-allow-ips`` (its default: loopback).

    Yields:
        The base URL, such as ``http://127.0.0.1:53124``.

    Raises:
        ModuleNotFoundError: uvicorn is not installed (the ``testing`` extra).
        RuntimeError: The server failed to start or to stop in time; an exception raised in the
            server thread is chained.
    """
    uvicorn = _import_uvicorn()
    if startup_timeout <= 0 or shutdown_timeout <= 0:
        raise ValueError("startup_timeout and shutdown_timeout must be positive")
    sock = _listening_socket(host, port)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=_protocol_class(),
        ws="none",
        lifespan="auto",
        loop="asyncio",
        log_config=None,
        log_level=logging.WARNING,
        access_log=False,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
        root_path=root_path,
        server_header=False,
        date_header=True,
        timeout_graceful_shutdown=max(math.ceil(shutdown_timeout) - 1, 1),
    )
    server = _server_class()(config)
    loop_box: list[asyncio.AbstractEventLoop] = []
    failure: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loop_box.append(loop)
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        except BaseException as exc:  # noqa: BLE001  # reported to the test thread
            failure.append(exc)
        finally:
            try:
                # One more pass for close callbacks scheduled during shutdown.
                loop.run_until_complete(asyncio.sleep(0))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    thread = threading.Thread(target=run, name=f"resilient-voice-serve-{bound_port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the ASGI server on port {bound_port} did not start")
            await anyio.sleep(_POLL)
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{bound_port}"
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(server, loop_box, thread, shutdown_timeout)
            sock.close()
    if failure and not isinstance(failure[0], SystemExit):
        raise RuntimeError("the ASGI server thread failed") from failure[0]


async def _stop(
    server: uvicorn.Server,
    loop_box: list[asyncio.AbstractEventLoop],
    thread: threading.Thread,
    wait: float,
) -> None:
    def request_stop() -> None:
        server.should_exit = True
        stop_event = getattr(server, "stop_event", None)
        if stop_event is not None:
            stop_event.set()

    server.should_exit = True
    if loop_box and thread.is_alive():
        try:
            loop_box[0].call_soon_threadsafe(request_stop)
        except RuntimeError:  # the loop already closed: nothing left to stop
            return
    deadline = time.monotonic() + wait
    while thread.is_alive():
        if time.monotonic() > deadline:
            server.force_exit = True
            raise RuntimeError("the ASGI server did not stop in time")
        await anyio.sleep(_POLL)
    thread.join()
