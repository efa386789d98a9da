"""The leased lanes of the outbound soak: creates that hold call leases, webhooks that free them.

Two lanes, ``twilio-leased`` (``TwilioClient(..., leases=...)``) and ``vapi-leased``
(``VapiClient(..., leases=...)``), each with its own small ``CallLeases``, breaker, retry policy
and pacing, against a FakeTelephony whose calls live a fraction of a second and whose signed
status callbacks and end-of-call reports (lost, duplicated, reordered) go to a webhook receiver
served on loopback: the signature guard outside ``LeaseReleaseMiddleware``, as deployed.

The lease sets are in memory, so they belong to the test's event loop (asyncio or trio), while
``serve`` runs uvicorn in a thread of its own on asyncio. :class:`Bridge` is what uvicorn
serves: it reads each webhook off the socket and runs the receiver (guard, lease middleware,
app) in the test's loop with the scope uvicorn built, through an anyio event loop token.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from _soak import (
    CPS_TOLERANCE,
    FROM,
    TIMEOUT,
    TOKEN,
    TWIML,
    VAPI_KEY,
    BreakerLog,
    Job,
    Lane,
    Phase,
    breaker,
    retry,
    since,
    vapi_policies,
)

from resilient_voice import CallLeases, ResilientVoiceError
from resilient_voice.asgi import (
    LeaseReleaseMiddleware,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.events import Event, LeaseAcquired, LeaseReleased
from resilient_voice.testing import CallbackFaults, FakeTelephony
from resilient_voice.twilio import TwilioClient
from resilient_voice.vapi import VapiClient

SID = "AC" + "e" * 32
VAPI_SECRET = "soak-vapi-webhook-secret"
# Calls are short so that small lease sets turn over quickly: ring up to 30 ms, talk 20 to
# 120 ms, each webhook 0 to 20 ms late, a reordered one held up to 150 ms more.
RING = (0.0, 0.03)
TALK = (0.02, 0.12)
CALLBACK_DELAY = (0.0, 0.02)
CALLBACK_FAULTS = CallbackFaults(loss=0.05, duplicate=0.1, reorder=0.2, reorder_delay=0.15)
# Every event, so that progress callbacks can arrive after ``completed``.
EVENTS = ("initiated", "ringing", "answered", "completed")
# After a phase, a call placed at its end has ended and its webhooks have arrived this much
# later (the bounds above add up to 0.32 s; the rest is slack for a loaded machine).
SETTLE = 0.5
# ``reconcile_leases(settle_after=)``: how long after its unknown mark (when the client gave up
# on the create) a lease with no call listed is released (the library's default, 120 s, is for
# real providers). The fake handles a request within 0.07 s of reading it (the latency faults,
# 0.05 and 0.02 s, added up); the rest is for a request a loaded machine has not read yet. 6 s
# was chosen when the count started at the acquire (a create is given up at most 4.6 s after
# its lease: 3 attempts of TIMEOUT, 1 s, pacing waits under 0.2 s, 2 backoffs of at most 0.5 s)
# and is kept: from the mark it leaves those 4.6 s as further slack. A create the client gave up
# on has been processed, or never will be, by then, so a call cannot run after its lease was
# released and the peak assertion cannot count it.
SETTLE_AFTER = 6.0


def leased_fake(hook_url: str, twilio_cps: float, seed: int = 23) -> FakeTelephony:
    """The upstream of the leased soak: webhooks on, sent to ``hook_url``'s receiver."""
    return FakeTelephony(
        seed=seed,
        twilio_accounts={SID: TOKEN},
        vapi_api_keys=[VAPI_KEY],
        calls_per_second={SID: twilio_cps},
        cps_tolerance=CPS_TOLERANCE,
        call_duration=TALK,
        ring_duration=RING,
        callback_delay=CALLBACK_DELAY,
        callback_faults=CALLBACK_FAULTS,
        vapi_server_url=f"{hook_url}/vapi/events",
        vapi_credential=VAPI_SECRET,
        # The leases are the limit under test: the fake neither refuses nor blocks calls, it
        # records how many were in progress at once (peak_calls_in_progress).
        vapi_concurrency_limit=1_000_000,
    )


@dataclass
class Received:
    """What the receiver's app saw, and what the bridge could not deliver."""

    statuses: Counter[int] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def receiver(
    twilio: CallLeases, vapi: CallLeases | None = None, received: Received | None = None
) -> Any:
    """The webhook app of a deployment: each signature guard outside its lease release
    (Twilio's status callbacks; Vapi's server messages when ``vapi`` is given)."""
    seen = received if received is not None else Received()

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body", False):
            pass
        seen.paths[scope["path"]] += 1
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    twilio_app = TwilioSignatureMiddleware(
        LeaseReleaseMiddleware(ok, leases=twilio, paths=["/twilio/status"], verified=True),
        TOKEN,
        paths=["/twilio/*"],
    )
    vapi_app = (
        None
        if vapi is None
        else VapiWebhookMiddleware(
            LeaseReleaseMiddleware(ok, leases=vapi, paths=["/vapi/events"], verified=True),
            secret=VAPI_SECRET,
            paths=["/vapi/*"],
        )
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if vapi_app is None or scope.get("path", "").startswith("/twilio"):
            await twilio_app(scope, receive, send)
        else:
            await vapi_app(scope, receive, send)

    return app


class Bridge:
    """Served by uvicorn in its own thread; runs ``app`` in the event loop that built it.

    Build it inside the test's loop. Each request's body is read whole on the server's side,
    then handed over with uvicorn's own scope (so the signature guard sees the URL the fake
    signed); the answer's status, headers and body come back and are sent as they are. An
    exception of ``app`` is recorded in ``received.errors`` and answered with 500.
    """

    def __init__(self, app: Any, received: Received) -> None:
        self._app = app
        self._received = received
        self._token = anyio.lowlevel.current_token()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        run = functools.partial(
            anyio.from_thread.run, self._run, dict(scope), b"".join(chunks), token=self._token
        )
        status, headers, body = await anyio.to_thread.run_sync(run)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _run(self, scope: Any, body: bytes) -> tuple[int, list[Any], bytes]:
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if given:
                return {"type": "http.disconnect"}
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        try:
            await self._app(scope, receive, send)
        except Exception as exc:  # recorded, then asserted on
            self._received.errors.append(f"{type(exc).__name__}: {exc}")
            return 500, [], b""
        status = int(start.get("status", 500))
        self._received.statuses[status] += 1
        return status, list(start.get("headers", [])), b"".join(parts)


@dataclass
class LeaseLedger:
    """A lease set's events: every lease acquired, every release and why, the most held."""

    acquired: set[str] = field(default_factory=set)
    releases: Counter[str] = field(default_factory=Counter)  # lease id -> times released
    reasons: Counter[str] = field(default_factory=Counter)
    most_in_use: int = 0
    most_waited: float = 0.0

    def __call__(self, event: Event) -> None:
        if isinstance(event, LeaseAcquired):
            self.acquired.add(event.lease_id)
            self.most_in_use = max(self.most_in_use, event.in_use)
            self.most_waited = max(self.most_waited, event.waited)
        elif isinstance(event, LeaseReleased):
            self.releases[event.lease_id] += 1
            self.reasons[event.reason] += 1


@dataclass
class LeasedLane:
    """A lane, its client (for ``reconcile_leases``), its lease set and that set's ledger."""

    lane: Lane
    client: TwilioClient | VapiClient
    leases: CallLeases
    ledger: LeaseLedger
    reconcile_runs: int = 0
    reconcile_failures: int = 0
    freed_by_reconcile: int = 0

    async def reconcile_leases(self) -> None:
        """One ``reconcile_leases()``; a refusal or an error is counted, tried at the next."""
        self.reconcile_runs += 1
        try:
            self.freed_by_reconcile += await self.client.reconcile_leases(settle_after=SETTLE_AFTER)
        except ResilientVoiceError:
            self.reconcile_failures += 1


async def reconcile_every(lanes: Sequence[LeasedLane], period: float) -> None:
    """What an operator runs periodically (docs/leases.md): here every ``period`` seconds."""
    while True:
        await anyio.sleep(period)
        for lane in lanes:
            await lane.reconcile_leases()


def settler(
    lanes: Sequence[LeasedLane], bound: float, after: list[dict[str, Any]]
) -> Callable[[Phase], Awaitable[None]]:
    """The soak's ``after_phase``: let the phase's calls end, then reconcile until every
    lease is free and no unknown outcome is left (at most ``bound`` seconds); note what was
    left after each phase in ``after``."""

    async def settle(phase: Phase) -> None:
        started = time.monotonic()
        await anyio.sleep(SETTLE)
        while True:
            for lane in lanes:
                await lane.reconcile_leases()
            held = {ln.lane.name: ln.leases.statistics().in_use for ln in lanes}
            unknown = {ln.lane.name: len(await ln.leases.unknown()) for ln in lanes}
            if not any(held.values()) and not any(unknown.values()):
                break
            if time.monotonic() - started > bound:
                break  # the test asserts on ``after``
            await anyio.sleep(0.1)
        after.append(
            {
                "phase": phase.name,
                "in_use": held,
                "unknown": unknown,
                "settle_s": round(time.monotonic() - started, 2),
            }
        )

    return settle


@asynccontextmanager
async def leased_lanes(
    url: str,
    hook_url: str,
    fake: FakeTelephony,
    *,
    capacity: int,
    ttl: float,
    twilio_cps: float,
    vapi_cps: float,
    workers: int,
) -> AsyncIterator[list[LeasedLane]]:
    """The two leased lanes, open for the duration of the block."""
    async with AsyncExitStack() as stack:
        built: list[LeasedLane] = []

        ledger = LeaseLedger()
        leases = CallLeases("soak:twilio", capacity, ttl=ttl, listeners=[ledger])
        log = BreakerLog("twilio-leased")
        twilio = await stack.enter_async_context(
            TwilioClient(
                SID,
                TOKEN,
                base_url=url,
                calls_per_second=twilio_cps,
                breaker=breaker("twilio-leased", log),
                retry=retry("twilio-leased"),
                timeout=TIMEOUT,
                leases=leases,
            )
        )

        async def twilio_create(job: Job) -> tuple[str, str | None]:
            call = await twilio.create_call(
                to=job.number,
                from_=FROM,
                url=TWIML,
                status_callback=f"{hook_url}/twilio/status",
                status_callback_event=EVENTS,
            )
            return "placed", call.sid

        async def twilio_reconcile(job: Job) -> str | None:
            found = await twilio.reconcile_call(to=job.number, since=since(job))
            return found[0].sid if found else None

        lane = Lane("twilio-leased", "twilio", twilio_create, twilio_reconcile, log, workers)
        built.append(LeasedLane(lane, twilio, leases, ledger))

        ledger = LeaseLedger()
        leases = CallLeases("soak:vapi", capacity, ttl=ttl, listeners=[ledger])
        log = BreakerLog("vapi-leased")
        vapi = await stack.enter_async_context(
            VapiClient(
                VAPI_KEY,
                base_url=url,
                policies=vapi_policies("vapi-leased", log, vapi_cps),
                timeout=TIMEOUT,
                leases=leases,
                server_url_configured=True,  # the fake's org-level server URL
            )
        )
        assistant = fake.vapi_assistants()[0]["id"]
        phone = fake.vapi_phone_numbers()[0]["id"]

        async def vapi_create(job: Job) -> tuple[str, str | None]:
            call = await vapi.create_call(
                assistant_id=assistant, phone_number_id=phone, customer_number=job.number
            )
            return "placed", call.id

        async def vapi_reconcile(job: Job) -> str | None:
            assert job.attempt_id is not None
            found = await vapi.reconcile_call(job.attempt_id, created_after=since(job), limit=1000)
            return None if found is None else found.id

        lane = Lane("vapi-leased", "vapi", vapi_create, vapi_reconcile, log, workers)
        built.append(LeasedLane(lane, vapi, leases, ledger))
        yield built


def lease_figures(lane: LeasedLane, judged: dict[str, Any]) -> dict[str, Any]:
    """The lane's lease accounting, from its ledger, its set's statistics and the lane's
    figures (``judge``): every try of a create takes one lease, and ``lease.release()``
    (reason ``lease``) frees those of the tries that created nothing for certain (refused
    locally, an unprocessed 429 sent again, a definite failure) and those of the unknown
    outcomes that ``reconcile_leases()`` found without a live call; it binds the others."""
    stats = lane.leases.statistics()
    ledger = lane.ledger
    tries = judged["creates"] + judged["local_rejections"] + judged["resubmitted_unprocessed"]
    certain = judged["failed"] + judged["local_rejections"] + judged["resubmitted_unprocessed"]
    unknown_released = ledger.reasons["lease"] - certain
    return {
        "capacity": stats.capacity,
        "effective_capacity_at_end": stats.effective_capacity,
        "acquired": stats.acquired,
        "create_tries": tries,
        "released_by_webhook": ledger.reasons["webhook"],
        "released_by_lease_release": ledger.reasons["lease"],
        "reclaimed_by_reconcile": ledger.reasons["reconcile"],
        "reclaimed_by_ttl": ledger.reasons["ttl"],
        "released_in_all": sum(ledger.reasons.values()),
        "leases_released_twice": sum(1 for count in ledger.releases.values() if count > 1),
        "leases_never_released": len(ledger.acquired - set(ledger.releases)),
        "in_use_at_end": stats.in_use,
        "most_held_at_once": ledger.most_in_use,
        "longest_wait_for_a_lease_s": round(ledger.most_waited, 3),
        "unknown_outcomes": judged["unknown"],
        "unknown_released_by_reconcile_leases": unknown_released,
        "unknown_bound_by_reconcile_leases": judged["unknown"] - unknown_released,
        "capacity_signals": stats.capacity_signals,
        "refused": stats.refused,
        "reconcile_leases_runs": lane.reconcile_runs,
        "reconcile_leases_failures": lane.reconcile_failures,
    }
