"""Two OS processes place calls through TwilioClient(leases=...) sharing one lease set in Redis.

The fake Twilio and the webhook receiver (TwilioSignatureMiddleware around
LeaseReleaseMiddleware, its leases on the same Redis) run here behind ``serve``; the two
callers are subprocesses, one on asyncio and one on trio. Real time, bounded: calls last 0.1 to
0.4 s, the whole campaign a few seconds; the bounds below are generous because the machine is
shared. The fake fails any call dialled over ``capacity`` with 10004, so a fleet that
over-admitted would show it twice: in the peak and in failed calls.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import pytest

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix
from _together import run_together
from resilient_voice import CallLeases
from resilient_voice.asgi import LeaseReleaseMiddleware, TwilioSignatureMiddleware
from resilient_voice.events import Event, LeaseReleased
from resilient_voice.redis import RedisBackend
from resilient_voice.testing import FakeTelephony, serve

pytestmark = [COREDIS_CANCEL_LEAK, pytest.mark.slow]
__all__ = ["collect_coredis_garbage"]

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
SID = "AC" + "9" * 32
TOKEN = "fleet-token"
CAPACITY = 3
CALLS_PER_PROCESS = 20


class Receiver:
    """The webhook app; its lease set (on Redis) is built in the server's own event loop."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._app: Any = None
        self.released: list[LeaseReleased] = []

    def _heard(self, event: Event) -> None:
        if isinstance(event, LeaseReleased):
            self.released.append(event)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self._app(scope, receive, send)
            return
        await receive()
        async with RedisBackend.from_url(REDIS_URL, prefix=self._prefix, timeout=1.0) as backend:
            leases = CallLeases("fleet", CAPACITY, ttl=60.0, store=backend, listeners=[self._heard])
            self._app = TwilioSignatureMiddleware(
                LeaseReleaseMiddleware(_ok, leases=leases, paths=["/twilio/status"], verified=True),
                TOKEN,
                paths=["/twilio/*"],
            )
            await send({"type": "lifespan.startup.complete"})
            await receive()
        await send({"type": "lifespan.shutdown.complete"})


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _callers(common: dict[str, Any]) -> list[dict[str, Any]]:
    """Run both callers together: released at once when both are connected."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    commands = [
        [
            sys.executable,
            str(TESTS / "_lease_campaign_worker.py"),
            json.dumps({**common, "backend": backend, "first": index * 1000}),
        ]
        for index, backend in enumerate(("asyncio", "trio"))
    ]
    return run_together(commands, env=env, timeout=120)


async def test_two_processes_sharing_redis_never_exceed_one_capacity() -> None:
    prefix = fresh_prefix()
    fake = FakeTelephony(
        twilio_accounts={SID: TOKEN},
        calls_per_second=1000.0,
        call_duration=(0.1, 0.4),
        twilio_call_concurrency_limit=CAPACITY,
        seed=11,
    )
    receiver = Receiver(prefix)
    async with serve(fake) as fake_url, serve(receiver) as hook_url:
        common = {
            "url": REDIS_URL,
            "prefix": prefix,
            "name": "fleet",
            "capacity": CAPACITY,
            "ttl": 60.0,
            "sid": SID,
            "token": TOKEN,
            "fake_url": fake_url,
            "hook_url": hook_url,
            "calls": CALLS_PER_PROCESS,
            "tasks": 4,
        }
        results = await anyio.to_thread.run_sync(_callers, common)
        created = [sid for result in results for sid in result["created"]]
        with anyio.fail_after(30):  # the last calls end within 0.4 s; 30 s for a loaded host
            while len(receiver.released) < len(created):
                await anyio.sleep(0.05)
    assert [r["failed"] for r in results] == [[], []]
    assert len(created) == 2 * CALLS_PER_PROCESS
    assert fake.peak_calls_in_progress("twilio") <= CAPACITY
    assert [c for c in fake.callbacks() if c.status == "failed"] == []  # no 10004
    assert sorted(e.call_id or "" for e in receiver.released) == sorted(created)
    assert {e.reason for e in receiver.released} == {"webhook"}
