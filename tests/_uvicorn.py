"""A tiny loopback uvicorn runner for the ASGI tests (to be replaced by resilient_voice.testing).

The server runs in a thread with its own event loop, on a socket bound to 127.0.0.1 with an
OS-chosen port, without touching the logging configuration.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


@contextmanager
def serve(app: Any, *, startup_timeout: float = 5.0) -> Iterator[str]:
    """Serve ``app`` on loopback; yield its base URL; stop it (bounded) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="auto",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.005)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(startup_timeout)
    finally:
        sock.close()


_SSL = ssl.create_default_context()  # building one per client costs ~0.1 s


def http_client(**options: Any) -> httpx.AsyncClient:
    """An httpx client for loopback servers that reuses one SSL context."""
    options.setdefault("timeout", 5.0)
    return httpx.AsyncClient(verify=_SSL, trust_env=False, **options)
