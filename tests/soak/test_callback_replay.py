"""Replaying every genuine webhook of a lease campaign changes nothing.

Twilio's signature carries no timestamp and no nonce, so a replayed genuine status callback
passes the signature check by design (docs/reliability.md, "Webhook forgery"). What keeps a
replay harmless is the lease release: by call id and lease generation, once. Each test runs the
same seeded campaign twice against FakeTelephony (its webhooks lost, duplicated and reordered),
in-process on a ManualClock with autojump: once as it is, once with every webhook the fake sends
recorded and POSTed three more times through the whole receiver (signature guard,
LeaseReleaseMiddleware, app): right after the original, up to a minute late while newer calls
hold leases, and after the campaign and a last ``reconcile_leases()``. The two runs must agree
on every lease release (which call, why, when), the lease statistics and the calls created
upstream; every replay must get a 2xx.

The size: ``--soak-size short`` (CI) places ``SHORT`` calls per run, ``full`` places ``FULL``.
The figures go to the terminal reporter at the end of the module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx
import pytest

from _apps import leased_clients
from resilient_voice import CallLeases
from resilient_voice.asgi import (
    LeaseReleaseMiddleware,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.events import Event, LeaseReleased
from resilient_voice.leases import LeaseStatistics
from resilient_voice.testing import CallbackFaults, FakeTelephony, ManualClock

SHORT = 150
FULL = 2000

SID = "AC" + "5" * 32
TOKEN = "replay-token"
VAPI_KEY = "vapi-replay-key"
VAPI_SECRET = "vapi-replay-secret"
HOOKS = "http://hooks.test"
VAPI_HOOK = f"{HOOKS}/vapi/events"
STATUS = f"{HOOKS}/twilio/status"
FROM = "+14155550142"
TWIML = "https://example.com/twiml"
CAPACITY = 5
FAULTS = CallbackFaults(loss=0.05, duplicate=0.1, reorder=0.2, reorder_delay=5.0)

FIGURES: list[str] = []

Provider = Literal["twilio", "vapi"]


@pytest.fixture(scope="module", autouse=True)
def report_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None or not FIGURES:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in FIGURES:
            reporter.write_line(f"callback replay: {line}")


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def receiver(leases: CallLeases) -> Any:
    """The webhook app of a deployment: each signature guard outside its lease release."""
    twilio = TwilioSignatureMiddleware(
        LeaseReleaseMiddleware(_ok, leases=leases, paths=["/twilio/status"], verified=True),
        TOKEN,
        paths=["/twilio/*"],
    )
    vapi = VapiWebhookMiddleware(
        LeaseReleaseMiddleware(_ok, leases=leases, paths=["/vapi/events"], verified=True),
        secret=VAPI_SECRET,
        paths=["/vapi/*"],
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        chosen = twilio if scope.get("path", "").startswith("/twilio") else vapi
        await chosen(scope, receive, send)

    return app


@dataclass(frozen=True)
class Recorded:
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    content: bytes


class Recorder(httpx.AsyncBaseTransport):
    """Between the fake and the receiver: keeps every webhook the fake sends and, with
    ``echo``, POSTs each one a second time as soon as the first has been answered."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, echo: bool) -> None:
        self._inner = inner
        self._echo = echo
        self.sent: list[Recorded] = []
        self.replay_statuses: Counter[int] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        recorded = Recorded(request.method, str(request.url), request.headers.raw, content)
        self.sent.append(recorded)
        response = await self._inner.handle_async_request(request)
        await response.aread()
        if self._echo:
            await self.replay(recorded)
        return response

    async def replay(self, recorded: Recorded) -> None:
        again = httpx.Request(
            recorded.method, recorded.url, headers=recorded.headers, content=recorded.content
        )
        response = await self._inner.handle_async_request(again)
        await response.aread()
        self.replay_statuses[response.status_code] += 1


@dataclass
class Run:
    """What one campaign left behind."""

    releases: list[tuple[str | None, str, float]] = field(default_factory=list)
    per_lease: Counter[str] = field(default_factory=Counter)
    stats: LeaseStatistics | None = None
    calls: list[str] = field(default_factory=list)
    creates: int = 0
    webhooks: int = 0
    replays: Counter[int] = field(default_factory=Counter)
    freed_by_last_reconcile: int = 0
    releases_after_campaign: int = 0


@asynccontextmanager
async def ticking(clock: ManualClock) -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as group:
        # Autojump moves time only while some task sleeps on the clock: this one always does.
        group.start_soon(_forever, clock)
        yield group
        group.cancel_scope.cancel()


async def _forever(clock: ManualClock) -> None:
    while True:
        await clock.sleep(3600.0)


async def every(clock: ManualClock, seconds: float, action: Callable[[], Any]) -> None:
    while True:
        await clock.sleep(seconds)
        await action()


async def campaign(provider: Provider, count: int, *, replay: bool) -> Run:
    clock = ManualClock(autojump=True)
    run = Run()

    def listen(event: Event) -> None:
        if isinstance(event, LeaseReleased):
            run.releases.append((event.call_id, event.reason, clock.now()))
            run.per_lease[event.lease_id] += 1

    leases = CallLeases("replay", CAPACITY, ttl=600.0, clock=clock, listeners=[listen])
    fake = FakeTelephony(
        twilio_accounts={SID: TOKEN},
        vapi_api_keys=[VAPI_KEY],
        vapi_server_url=VAPI_HOOK,
        vapi_credential=VAPI_SECRET,
        clock=clock,
        seed=19,
        calls_per_second=1000.0,
        call_duration=(5.0, 60.0),
        ring_duration=(0.0, 10.0),
        callback_delay=(0.0, 3.0),
        callback_faults=FAULTS,
        twilio_call_concurrency_limit=CAPACITY,
        vapi_concurrency_limit=CAPACITY,
    )
    recorder = Recorder(httpx.ASGITransport(app=receiver(leases)), echo=replay)
    upstream = httpx.ASGITransport(app=fake)
    twilio, vapi = leased_clients(upstream, clock, leases, sid=SID, token=TOKEN, vapi_key=VAPI_KEY)
    reconcile = twilio.reconcile_leases if provider == "twilio" else vapi.reconcile_leases

    async def one(i: int) -> None:
        to = f"+1555{i:07d}"
        if provider == "twilio":
            await twilio.create_call(to=to, from_=FROM, url=TWIML, status_callback=STATUS)
        else:
            await vapi.create_call(
                assistant_id=fake.vapi_assistants()[0]["id"],
                phone_number_id=fake.vapi_phone_numbers()[0]["id"],
                customer_number=to,
            )

    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    late = 0

    async def replay_late() -> None:
        # Each webhook once more, up to a minute late, while newer calls hold leases.
        nonlocal late
        batch, late = recorder.sent[late:], len(recorder.sent)
        for recorded in batch:
            await recorder.replay(recorded)

    async with fake.running(webhook_transport=recorder), twilio, vapi, ticking(clock) as group:
        group.start_soon(every, clock, 30.0, reconcile)
        if replay:
            group.start_soon(every, clock, 60.0, replay_late)
        async with anyio.create_task_group() as callers:
            for _ in range(3 * CAPACITY):
                callers.start_soon(worker)
        start = clock.now()
        while leases.statistics().in_use:
            assert clock.now() - start < 3600.0, "simulated time ran out"
            await clock.sleep(1.0)
        await clock.sleep(120.0)  # the last delayed and reordered webhooks arrive
        await reconcile()
        settled = len(run.releases)
        if replay:
            await replay_late()
            for recorded in list(recorder.sent):
                await recorder.replay(recorded)
        run.freed_by_last_reconcile = await reconcile()
        run.releases_after_campaign = len(run.releases) - settled
        run.stats = leases.statistics()
    run.calls = [c.id for c in fake.calls(provider)]
    run.creates = len(fake.requests(f"{provider}.calls.create"))
    run.webhooks = len(recorder.sent)
    run.replays = recorder.replay_statuses
    return run


@pytest.mark.parametrize("provider", ["twilio", "vapi"])
async def test_replaying_every_webhook_changes_nothing(
    provider: Provider, soak_size: str, anyio_backend: str
) -> None:
    count = SHORT if soak_size == "short" else FULL
    normal = await campaign(provider, count, replay=False)
    replayed = await campaign(provider, count, replay=True)

    # Every replay passed the signature check (by design) and was answered like the original.
    assert replayed.webhooks > count
    assert replayed.replays == Counter({204: 3 * replayed.webhooks})
    assert normal.replays == Counter()

    # The same calls, created once each: a replay creates nothing upstream.
    assert replayed.calls == normal.calls
    assert len(set(replayed.calls)) == replayed.creates == normal.creates == count
    assert replayed.webhooks == normal.webhooks

    # Every lease released exactly once; the same call freed for the same reason at the same
    # simulated second in both runs, so no replay of an old callback freed a newer call's lease
    # (it carries the old lease's generation).
    assert len(replayed.per_lease) == count
    assert set(replayed.per_lease.values()) == {1}
    assert replayed.releases == normal.releases
    assert replayed.stats == normal.stats
    assert replayed.stats is not None
    assert replayed.stats.in_use == 0
    assert replayed.stats.effective_capacity == CAPACITY

    # After the replays, nothing was left to free, and reconciliation freed nothing extra.
    assert replayed.releases_after_campaign == normal.releases_after_campaign == 0
    assert replayed.freed_by_last_reconcile == normal.freed_by_last_reconcile == 0

    stats = replayed.stats
    reasons = Counter(reason for _, reason, _ in replayed.releases)
    FIGURES.append(
        f"{provider} on {anyio_backend} ({soak_size}): {count} calls, "
        f"{replayed.webhooks} webhooks sent, "
        f"{sum(replayed.replays.values())} replays all {sorted(replayed.replays)}; "
        f"releases by reason {dict(sorted(reasons.items()))} in both runs; "
        f"released={stats.released} reclaimed_by_ttl={stats.reclaimed_by_ttl} "
        f"reclaimed_by_reconcile={stats.reclaimed_by_reconcile} in_use={stats.in_use} "
        f"effective_capacity={stats.effective_capacity}; creates {replayed.creates} "
        f"(normal {normal.creates}); extra frees by replays or last reconcile 0"
    )
