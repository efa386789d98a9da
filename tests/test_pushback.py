"""Fleet pushback: a provider's 429 with a retry-after pauses the policy's limiter for everyone.

In process on a ManualClock (exact), through the httpx transport, and across two RedisBackend
"replicas" in one process on real time (tolerance stated at the assertion).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

from resilient_voice import FailureKind, ProviderError, RetryPolicy
from resilient_voice.http import ResilientTransport
from resilient_voice.limiter import KeyedLimiter, TokenBucket
from resilient_voice.policy import MAX_PUSHBACK, Policy
from resilient_voice.testing import ManualClock


def too_many(retry_after: float | None, status: int = 429) -> ProviderError:
    return ProviderError(
        status, 20429, "Too Many Requests", FailureKind.NOT_SENT, retry_after=retry_after
    )


def failing(error: Exception) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        raise error

    return call


async def ok() -> None:
    return None


async def granted_at(clock: ManualClock, policy: Policy, **options: object) -> float:
    """When the next call through ``policy`` got its token (the call itself takes no time)."""
    await policy.run(ok, **options)  # type: ignore[arg-type]
    return clock.now()


async def test_a_429_with_retry_after_delays_the_other_callers_next_grant() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=1, clock=clock)
    policy = Policy(limiter=bucket, clock=clock)
    with pytest.raises(ProviderError):
        await policy.run(failing(too_many(2.0)))
    # Without the pushback the other caller's token would come one interval (0.1 s) later.
    assert await granted_at(clock, policy) == pytest.approx(2.0)
    # Then the bucket resumes at its rate, without a burst.
    assert await granted_at(clock, policy) == pytest.approx(2.1)


async def test_waiters_queued_during_the_failing_attempt_wait_too() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=1, clock=clock)
    policy = Policy(limiter=bucket, clock=clock)
    grants: list[float] = []
    failed = anyio.Event()

    async def slow_429() -> None:
        await clock.sleep(0.05)  # the other caller queues for its token meanwhile
        failed.set()
        raise too_many(2.0)

    async def other() -> None:
        await anyio.sleep(0)  # after the failing caller took the first token
        grants.append(await granted_at(clock, policy))

    async def first() -> None:
        with pytest.raises(ProviderError):
            await policy.run(slow_429)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(other)
    assert failed.is_set()
    # The other caller had queued before the 429 arrived: its slot (0.1) was not yet reserved
    # in memory, so it moves to the end of the pause.
    assert grants == [pytest.approx(2.05)]


async def test_the_pause_is_capped_by_the_retry_policys_max_delay() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=1, clock=clock)
    retry = RetryPolicy(max_attempts=1, max_delay=5.0, clock=clock)
    policy = Policy(limiter=bucket, retry=retry, clock=clock)
    with pytest.raises(ProviderError):
        await policy.run(failing(too_many(3600.0)), idempotent=True)
    assert await granted_at(clock, policy) == pytest.approx(5.0)


async def test_without_a_retry_policy_the_pause_is_capped_by_max_pushback() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=1, clock=clock)
    policy = Policy(limiter=bucket, clock=clock)
    with pytest.raises(ProviderError):
        await policy.run(failing(too_many(86400.0)))
    assert await granted_at(clock, policy) == pytest.approx(MAX_PUSHBACK)


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(429, None), (429, 0.0), (503, 2.0), (None, None)],
    ids=["429-without-retry-after", "429-retry-after-0", "503-with-retry-after", "not-provider"],
)
async def test_no_pause_without_a_429_and_a_positive_retry_after(
    status: int | None, retry_after: float | None
) -> None:
    error = RuntimeError("boom") if status is None else too_many(retry_after, status)
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=1, clock=clock)
    policy = Policy(limiter=bucket, clock=clock)
    with pytest.raises(type(error)):
        await policy.run(failing(error))
    assert await granted_at(clock, policy) == pytest.approx(0.1)


async def test_a_keyed_limiter_pauses_the_keys_bucket_only() -> None:
    clock = ManualClock(autojump=True)
    limiter = KeyedLimiter(rate=10.0, burst=1, clock=clock)
    policy = Policy(limiter=limiter, clock=clock)
    with pytest.raises(ProviderError):
        await policy.run(failing(too_many(2.0)), key="+15550001")
    assert await granted_at(clock, policy, key="+15550002") == pytest.approx(0.0)
    assert await granted_at(clock, policy, key="+15550001") == pytest.approx(2.0)


async def test_the_transport_pauses_on_twilios_20429_with_retry_after() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=1, clock=clock)
    answers = [
        httpx.Response(
            429,
            headers={"Retry-After": "2"},
            json={"code": 20429, "message": "Too Many Requests", "status": 429},
        ),
        httpx.Response(200, json={"calls": []}),
    ]
    transport = ResilientTransport(
        Policy(limiter=bucket, clock=clock),
        transport=httpx.MockTransport(lambda request: answers.pop(0)),
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.twilio.com") as http:
        first = await http.get("/2010-04-01/Accounts/AC1/Calls.json")
        assert first.status_code == 429
        await http.get("/2010-04-01/Accounts/AC1/Calls.json")
    # The second request's token came at the end of the pause.
    assert clock.now() == pytest.approx(2.0)


async def test_the_transport_reads_retry_after_ms() -> None:
    clock = ManualClock(autojump=True)
    bucket = TokenBucket(rate=10.0, burst=1, clock=clock)
    answers = [
        httpx.Response(429, headers={"retry-after-ms": "1500"}, json={"message": "slow down"}),
        httpx.Response(200, json={}),
    ]
    transport = ResilientTransport(
        Policy(limiter=bucket, clock=clock),
        transport=httpx.MockTransport(lambda request: answers.pop(0)),
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.vapi.ai") as http:
        await http.get("/call")
        await http.get("/call")
    assert clock.now() == pytest.approx(1.5)


async def test_a_redis_store_pauses_the_other_replica() -> None:
    """Two backends and two buckets of one name in one process: two replicas of a fleet.

    Real time: the other replica's grant comes after the 1 s pause, measured on the monotonic
    clock (tolerance: not before 0.9 s, i.e. one 0.1 s interval early at most for rounding
    between Redis' clock and ours; not after 2 s on a loaded machine).
    """
    import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip

    from _redis import REDIS_URL, fresh_prefix
    from resilient_voice.redis import RedisBackend

    prefix = fresh_prefix()
    async with (
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as one,
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as two,
    ):
        mine = TokenBucket(rate=10.0, burst=1, name="cps", store=one)
        theirs = TokenBucket(rate=10.0, burst=1, name="cps", store=two)
        policy = Policy(limiter=mine)
        with pytest.raises(ProviderError):
            await policy.run(failing(too_many(1.0)))
        started = time.monotonic()
        with anyio.fail_after(5):
            await theirs.acquire()
        waited = time.monotonic() - started
    assert 0.9 <= waited < 2.0
