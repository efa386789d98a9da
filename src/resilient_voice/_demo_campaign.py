"""The demo's campaign: call every number exactly once, through whatever the provider does.

A number leaves the queue when it is placed (the client said so, or reconciling found the call
upstream) or when the provider refused it for good (a permanent error). Everything else puts it
back with the retry policy's backoff: a refusal by the open breaker or by the limiter (nothing
was sent), a definite transient failure after the retries (429 or 5xx, nothing created), and an
unknown outcome that reconciling showed was not placed. While the breaker is open the campaign
pauses until it may let a probe through (dialling on would only collect refusals). It stops
dispatching at its deadline; what is not placed by then is reported unplaced.

Shared by the in-process demo (:mod:`resilient_voice._demo`) and each worker of a fleet
(:mod:`resilient_voice._demo_fleet`): both build a client with :func:`open_client` and run a
:class:`Campaign` over their numbers.
"""

from __future__ import annotations

import contextvars
import heapq
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from resilient_voice._demo_faults import ATTEMPT_HEADER, attempt_tag
from resilient_voice.breaker import CircuitBreaker
from resilient_voice.errors import (
    CircuitOpenError,
    OutcomeUnknownError,
    ProviderError,
    RejectedError,
)
from resilient_voice.events import BreakerState, Event, RetryScheduled, StateChanged
from resilient_voice.failure import FailureKind
from resilient_voice.limiter import TokenBucket
from resilient_voice.policy import Policy
from resilient_voice.retry import RetryPolicy

__all__ = [
    "ACCOUNT_SID",
    "AUTH_TOKEN",
    "VAPI_KEY",
    "Campaign",
    "Counts",
    "Tally",
    "create_policies",
    "open_client",
]

ACCOUNT_SID = "AC" + "de30" * 8
AUTH_TOKEN = "demo-auth-token"  # noqa: S105  (a fake account on loopback)
VAPI_KEY = "demo-vapi-key"
CALLER_ID = "+15005550006"
FINAL = frozenset(("placed", "reconciled", "failed"))

_log = logging.getLogger("resilient_voice.demo")
# The (number, attempt) the current task is placing: the demo's transport tags the request.
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("demo_attempt", default=None)

Place = Callable[[str], Awaitable[None]]
Reconcile = Callable[[str, str], Awaitable[bool]]


class Tally:
    """Counts what the campaign's primitives report, for the live view and the summary."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.retries = 0
        self.state = BreakerState.CLOSED
        self.transitions: list[dict[str, Any]] = []
        self.latencies: list[float] = []

    def count_retries(self, event: Event) -> None:
        """The retry policy's listener: counts scheduled retries."""
        if isinstance(event, RetryScheduled):
            self.retries += 1

    def __call__(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self.state = event.new
            self.transitions.append(
                {
                    "at_s": round(time.monotonic() - self.started, 3),
                    "from": event.old.value,
                    "to": event.new.value,
                }
            )


@dataclass(slots=True)
class Counts:
    """What happened to the attempts (each number may take several)."""

    attempts: int = 0
    refused_breaker: int = 0
    refused_limiter: int = 0
    outcome_unknown: int = 0
    reconciled_placed: int = 0
    reconciled_not_placed: int = 0
    failed_transient: int = 0
    requeued: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Campaign:
    """Places each of ``numbers`` once, re-queueing what did not go through, until ``deadline``.

    Args:
        numbers: The numbers, in dialling order.
        place: Places one call (raises what the client raises).
        reconcile: ``(number, attempt_id) -> bool``: whether that attempt created a call.
        cps: Attempts dispatched per second (the client's limiter is the real guard).
        deadline: ``time.monotonic()`` after which nothing more is dispatched.
        backoff: The retry policy's backoff, by the number's attempt (1 after the first).
        on_outcome: Called with (number, outcome) each time a number's state changes.
    """

    def __init__(
        self,
        numbers: Sequence[str],
        place: Place,
        reconcile: Reconcile,
        *,
        cps: float,
        deadline: float,
        backoff: Callable[[int], float],
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        self.numbers = list(numbers)
        self.outcomes: dict[str, str] = dict.fromkeys(self.numbers, "queued")
        self.tries: dict[str, int] = dict.fromkeys(self.numbers, 0)
        self.counts = Counts()
        self.finished = False
        self._place = place
        self._reconcile = reconcile
        self._interval = 1.0 / cps
        self._deadline = deadline
        self._backoff = backoff
        self._on_outcome = on_outcome
        # (not before, order, number): fresh numbers in dialling order, then the re-queued.
        self._queue: list[tuple[float, int, str]] = [(0.0, i, n) for i, n in enumerate(numbers)]
        self._order = len(self.numbers)
        self._in_flight = 0
        self._paused_until = 0.0
        # About a second of calls: more would only wait in the limiter while re-queued numbers
        # (and the breaker's probe) queue behind them.
        self._max_in_flight = max(2, math.ceil(cps))

    def _set(self, number: str, outcome: str) -> None:
        self.outcomes[number] = outcome
        if self._on_outcome is not None:
            self._on_outcome(number, outcome)

    def _requeue(self, number: str, delay: float) -> None:
        self.counts.requeued += 1
        self._set(number, "queued")
        heapq.heappush(self._queue, (time.monotonic() + delay, self._order, number))
        self._order += 1

    async def run(self) -> None:
        """Dispatch until every number is settled or the deadline passes, then wait for the
        attempts in flight (each bounded by the policy's timeouts)."""
        next_slot = time.monotonic()
        async with anyio.create_task_group() as tasks:
            while self._queue or self._in_flight:
                now = time.monotonic()
                if now >= self._deadline:
                    break
                ready = self._queue and self._queue[0][0] <= now
                slot = max(next_slot, self._paused_until)
                if ready and now >= slot and self._in_flight < self._max_in_flight:
                    _, _, number = heapq.heappop(self._queue)
                    self._in_flight += 1
                    self._set(number, "in flight")
                    tasks.start_soon(self._attempt, number)
                    next_slot = max(next_slot + self._interval, now - self._interval)
                    continue
                wake = min(self._deadline, now + 0.05)
                if self._queue:
                    wake = min(wake, max(self._queue[0][0], slot))
                await anyio.sleep(max(0.0, wake - now))
        self.finished = True

    async def _attempt(self, number: str) -> None:
        attempt = self.tries[number]
        self.tries[number] += 1
        self.counts.attempts += 1
        # Each attempt runs in its own task, so the tag never leaks to another attempt.
        _CURRENT.set(attempt_tag(number, attempt))
        try:
            await self._place(number)
        except OutcomeUnknownError as exc:
            self.counts.outcome_unknown += 1
            await self._settle_unknown(number, exc.attempt_id, attempt)
        except RejectedError as exc:
            if isinstance(exc, CircuitOpenError):
                self.counts.refused_breaker += 1
                # Dialling on while the breaker is open only collects refusals: pause until it
                # lets a probe through.
                resume = time.monotonic() + (exc.retry_after or 0.0)
                self._paused_until = max(self._paused_until, resume)
            else:
                self.counts.refused_limiter += 1
            self._requeue(number, max(exc.retry_after or 0.0, self._backoff(attempt + 1)))
        except ProviderError as exc:
            if exc.kind is FailureKind.PERMANENT:
                self._fail(number, exc)
            else:
                self.counts.failed_transient += 1
                self._requeue(number, self._backoff(attempt + 1))
        except Exception as exc:  # noqa: BLE001  (reported, never re-sent blindly)
            self._fail(number, exc)
        else:
            self._set(number, "placed")
        finally:
            self._in_flight -= 1

    async def _settle_unknown(self, number: str, attempt_id: str, attempt: int) -> None:
        """Reconcile an unknown outcome: placed, or back on the queue. Never re-sent unchecked."""
        for tries in range(1, 6):
            try:
                found = await self._reconcile(number, attempt_id)
            except Exception:  # noqa: BLE001  (the listing failed: try again, never guess)
                _log.warning("reconciling %s failed (try %d)", number, tries, exc_info=True)
                await anyio.sleep(self._backoff(tries))
                continue
            if found:
                self.counts.reconciled_placed += 1
                self._set(number, "reconciled")
            else:
                self.counts.reconciled_not_placed += 1
                self._requeue(number, self._backoff(attempt + 1))
            return
        self._set(number, "unknown")

    def _fail(self, number: str, exc: Exception) -> None:
        name = type(exc).__name__
        self.counts.errors[name] = self.counts.errors.get(name, 0) + 1
        _log.warning("%s failed for good: %s", number, exc)
        self._set(number, "failed")


def create_policies(
    cps: float,
    recovery_timeout: float,
    tally: Tally,
    listeners: Sequence[Any] = (),
    *,
    store: Any = None,
    bucket: str = "demo-cps",
) -> tuple[Policy, Policy, RetryPolicy]:
    """The create and read policies of the demo's client, and the create policy's retry.

    With ``store`` (a ``RedisBackend``) the pacing bucket ``bucket`` is shared by every process
    that names it: the fleet's one CPS budget.
    """
    breaker = CircuitBreaker(
        "demo",
        failure_threshold=3,
        recovery_timeout=recovery_timeout,
        listeners=[tally, *listeners],
    )
    retry = RetryPolicy(
        max_attempts=3,
        base_delay=0.05,
        max_delay=0.5,
        name="create_call",
        listeners=[tally.count_retries, *listeners],
    )
    limiter = TokenBucket(cps, burst=1, name=bucket, store=store, listeners=listeners)
    create = Policy(breaker=breaker, limiter=limiter, retry=retry, timeout=5.0)
    read = Policy(
        retry=RetryPolicy(max_attempts=5, base_delay=0.05, max_delay=0.5, name="read"),
        timeout=5.0,
    )
    return create, read, retry


def timed_transport(samples: list[float]) -> Any:
    """An httpx transport that tags create requests with the attempt and times each request.

    The time runs from the moment the request is handed to the connection pool until the
    response's headers arrive: one request, not the limiter's wait or the retries around it.
    """
    import httpx

    class TimedTransport(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self._inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            tag = _CURRENT.get()
            if tag is None or request.method != "POST":
                return await self._inner.handle_async_request(request)
            request.headers[ATTEMPT_HEADER] = tag
            started = time.perf_counter()
            response = await self._inner.handle_async_request(request)
            samples.append(time.perf_counter() - started)
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    return TimedTransport()


@asynccontextmanager
async def open_client(
    provider: str,
    upstream: str,
    create: Policy,
    read: Policy,
    samples: list[float],
    listeners: Sequence[Any] = (),
) -> AsyncIterator[tuple[Place, Reconcile]]:
    """Yield (place, reconcile) for the chosen provider's typed client, closing it after."""
    transport = timed_transport(samples)
    policies = {"create_call": create, "read": read}
    if provider == "twilio":
        from resilient_voice.twilio import TwilioClient

        twilio = TwilioClient(
            ACCOUNT_SID, AUTH_TOKEN, base_url=upstream, policies=policies, transport=transport
        )
        for listener in listeners:
            twilio.transport.add_listener(listener)

        async def place_twilio(number: str) -> None:
            await twilio.create_call(
                to=number, from_=CALLER_ID, url="https://example.com/twiml/outbound"
            )

        async def reconcile_twilio(number: str, attempt_id: str) -> bool:
            return bool(await twilio.reconcile_call(to=number))

        try:
            yield place_twilio, reconcile_twilio
        finally:
            await twilio.aclose()
        return

    from resilient_voice.vapi import VapiClient

    vapi = VapiClient(VAPI_KEY, base_url=upstream, policies=policies, transport=transport)
    for listener in listeners:
        vapi.add_listener(listener)
    try:
        # The fake's assistant and phone number, looked up once before the campaign.
        assistant_id = (await vapi.list_assistants())[0].id
        phone_number_id = (await vapi.list_phone_numbers())[0].id

        async def place_vapi(number: str) -> None:
            await vapi.create_call(
                assistant_id=assistant_id, phone_number_id=phone_number_id, customer_number=number
            )

        async def reconcile_vapi(number: str, attempt_id: str) -> bool:
            return await vapi.reconcile_call(attempt_id, limit=1000) is not None

        yield place_vapi, reconcile_vapi
    finally:
        await vapi.aclose()
