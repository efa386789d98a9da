"""Helpers of the Redis tests: the shared server's URL, a private redis-server, key prefixes.

Tests use the Redis at ``REDIS_URL`` (127.0.0.1:6379 by default; CI starts one), each under its
own key prefix, and never flush it. Tests that stop Redis start their own server on a free
loopback port.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# coredis (6.9) leaves the anyio memory streams of a request cancelled mid-flight (a timeout, a
# dropped connection) unclosed; their ResourceWarning surfaces from __del__ at the next garbage
# collection. Nothing of ours is left open; tests that cut Redis off collect before they end.
COREDIS_CANCEL_LEAK = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*MemoryObject:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def collect_coredis_garbage() -> Iterator[None]:
    """Collect after each test, once its event loop is gone, under the module's filter.

    Import it into a test module (with ``pytestmark = COREDIS_CANCEL_LEAK``): otherwise the
    streams coredis leaves behind are collected, and warn, during some later test.
    """
    yield
    gc.collect()


REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def fresh_prefix() -> str:
    """A key prefix no other test uses."""
    return f"rvtest-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A redis-server of this test only, on a free loopback port; stop and start it at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="rv-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None, "redis-server is not installed"
        self._process = subprocess.Popen(
            [
                server,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("the test's redis-server did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(5)
            self._process = None


@contextmanager
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server._dir, ignore_errors=True)
