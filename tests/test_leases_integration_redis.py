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
import time
from pathlib import Path
from typing import Any

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import httpx
import pytest

from _apps import LateCreate
from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix
from _together import run_together
from resilient_voice import CallLeases, OutcomeUnknownError
from resilient_voice.asgi import LeaseReleaseMiddleware, TwilioSignatureMiddleware
from resilient_voice.events import Event, LeaseReleased
from resilient_voice.redis import RedisBackend
from resilient_voice.testing import FakeTelephony, serve
from resilient_voice.twilio import TwilioClient
from resilient_voice.vapi import VapiClient

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


SETTLE_AFTER = 1.0


@pytest.mark.parametrize("late_call", [False, True], ids=["no-call", "late-call"])
async def test_settle_after_holds_an_unknown_outcome_by_its_age_in_redis(late_call: bool) -> None:
    """With the leases in Redis, a lease's age comes from the server's clock: an unknown outcome
    with no call listed stays held until it is ``settle_after`` old, and a call the provider
    creates late is bound, not missed. Real time: every check sits at least 0.4 s from the
    1 s bound, ample on a shared machine (each step is a few local round trips)."""
    fake = FakeTelephony(
        vapi_api_keys=["redis-settle-key"],
        vapi_server_url="http://hooks.test/vapi",
        call_duration=60.0,  # live through the test: bound, not released as ended
        seed=5,
    )
    late = LateCreate(httpx.ASGITransport(app=fake))
    async with (
        fake.running(webhook_transport=httpx.MockTransport(lambda _: httpx.Response(204))),
        RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix(), timeout=1.0) as backend,
    ):
        leases = CallLeases("settle", 1, ttl=60.0, store=backend)
        vapi = VapiClient(
            "redis-settle-key",
            base_url="http://127.0.0.1",
            transport=late,
            leases=leases,
            server_url_configured=True,
        )
        async with vapi:
            started = time.monotonic()
            with pytest.raises(OutcomeUnknownError):
                await vapi.create_call(
                    assistant_id=fake.vapi_assistants()[0]["id"],
                    phone_number_id=fake.vapi_phone_numbers()[0]["id"],
                    customer_number="+15550000001",
                )
            await vapi.reconcile_leases(settle_after=SETTLE_AFTER)
            assert len(await leases.unknown()) == 1  # young: held though no call is listed
            if late_call:
                await late.deliver()
            await anyio.sleep(max(0.0, started + SETTLE_AFTER + 0.4 - time.monotonic()))
            await vapi.reconcile_leases(settle_after=SETTLE_AFTER)
            assert await leases.unknown() == ()
            assert leases.statistics().in_use == (1 if late_call else 0)
            assert time.monotonic() - started < SETTLE_AFTER + 5.0, "the machine stalled"
    assert len(fake.calls("vapi")) == (1 if late_call else 0)


@pytest.mark.parametrize("provider", ["twilio", "vapi"])
@pytest.mark.parametrize("late_call", [False, True], ids=["no-call", "late-call"])
async def test_another_replica_settles_an_unknown_outcome_in_redis(
    provider: str, late_call: bool
) -> None:
    """Replica A's create has an unknown outcome and A goes away; replica B (its own backend,
    the same Redis prefix) settles A's lease from what the lease stores: bound to the call A's
    create made, or released ``settle_after`` after A's mark when there is none. Real time, as
    above: every check sits at least 0.4 s from the 1 s bound."""
    fake = FakeTelephony(
        twilio_accounts={SID: TOKEN},
        vapi_api_keys=["redis-replica-key"],
        vapi_server_url="http://hooks.test/vapi",
        call_duration=60.0,  # live through the test: bound, not released as ended
        seed=7,
    )
    late = LateCreate(httpx.ASGITransport(app=fake))
    prefix = fresh_prefix()
    async with (
        fake.running(webhook_transport=httpx.MockTransport(lambda _: httpx.Response(204))),
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as backend_a,
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as backend_b,
    ):
        leases_a = CallLeases("replicas", 1, ttl=60.0, store=backend_a)
        leases_b = CallLeases("replicas", 1, ttl=60.0, store=backend_b)
        started = time.monotonic()
        async with _client(provider, late, leases_a) as replica_a:
            with pytest.raises(OutcomeUnknownError):
                await _create(provider, replica_a, fake)
        # Replica A is gone: only B reconciles from here on.
        async with _client(provider, httpx.ASGITransport(app=fake), leases_b) as replica_b:
            (lease,) = await leases_b.unknown()
            if provider == "twilio":
                assert lease.context is not None  # what B matches A's call by
            await replica_b.reconcile_leases(settle_after=SETTLE_AFTER)
            assert len(await leases_b.unknown()) == 1  # young: held though no call is listed
            if late_call:
                await late.deliver()
            await anyio.sleep(max(0.0, started + SETTLE_AFTER + 0.4 - time.monotonic()))
            await replica_b.reconcile_leases(settle_after=SETTLE_AFTER)
            assert await leases_b.unknown() == ()
            assert leases_b.statistics().in_use == (1 if late_call else 0)
            assert time.monotonic() - started < SETTLE_AFTER + 5.0, "the machine stalled"
    assert len(fake.calls(provider)) == (1 if late_call else 0)


def _client(provider: str, transport: httpx.AsyncBaseTransport, leases: CallLeases) -> Any:
    if provider == "twilio":
        return TwilioClient(
            SID,
            TOKEN,
            base_url="http://127.0.0.1",
            transport=transport,
            calls_per_second=1000.0,
            leases=leases,
        )
    return VapiClient(
        "redis-replica-key",
        base_url="http://127.0.0.1",
        transport=transport,
        leases=leases,
        server_url_configured=True,
    )


async def _create(provider: str, client: Any, fake: FakeTelephony) -> Any:
    if provider == "twilio":
        return await client.create_call(
            to="+15550000002",
            from_="+14155550199",
            url="https://example.com/twiml",
            status_callback="http://hooks.test/twilio/status",
        )
    return await client.create_call(
        assistant_id=fake.vapi_assistants()[0]["id"],
        phone_number_id=fake.vapi_phone_numbers()[0]["id"],
        customer_number="+15550000002",
    )
