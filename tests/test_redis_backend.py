"""RedisBackend against a real Redis: the script computes what _gcra computes, on Redis' clock.

No mocks: the shared Redis at REDIS_URL under a fresh key prefix per test, or a private
redis-server for the tests that stop it. Timing assertions use Redis' own clock (the script's
answers), so they are exact; the few that sleep for real state their tolerance.
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
from collections.abc import AsyncIterator

import anyio
import coredis
import pytest

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix, own_redis
from resilient_voice import KeyedLimiter, TokenBucket
from resilient_voice.limiter import BucketStore, StoreUnavailableError, _gcra
from resilient_voice.redis import RedisBackend

pytestmark = COREDIS_CANCEL_LEAK
__all__ = ["collect_coredis_garbage"]  # an autouse fixture, used by being here


@pytest.fixture
async def backend() -> AsyncIterator[RedisBackend]:
    async with RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix(), timeout=1.0) as b:
        yield b


async def test_it_is_a_bucket_store(backend: RedisBackend) -> None:
    assert isinstance(backend, BucketStore)
    assert repr(backend).startswith("RedisBackend(prefix='rvtest-")


async def test_the_script_computes_the_gcra_schedule_on_the_server_clock(
    backend: RedisBackend,
) -> None:
    TokenBucket(10, 3, name="cps", store=backend)  # declares the configuration
    tau = _gcra.depth(3, 0.1)
    full = _gcra.NEVER
    batches = [[0.1], [0.1, 0.1, 0.1], [0.2, 0.1], [0.1] * 5]
    for costs in batches:
        limits = [0.35] * len(costs)
        answer = await backend._run("cps", ["r", repr(tau), *_pairs(costs, limits)])
        now = float(answer[1])
        expected_full, delays, refused = _gcra.reserve(full, now, costs, limits, tau)
        assert [float(d) for d in answer[5:]] == delays
        assert float(answer[2]) == expected_full
        assert (float(answer[3]) if answer[3] else None) == refused
        full = expected_full


def _pairs(costs: list[float], limits: list[float]) -> list[str]:
    return [value for pair in zip(costs, limits, strict=True) for value in map(repr, pair)]


async def test_a_deadline_past_the_schedule_is_refused_and_reserving_stops(
    backend: RedisBackend,
) -> None:
    tau = _gcra.depth(1, 1.0)
    first = await backend.reserve("b", [1.0, 1.0, 1.0], [math.inf, 0.5, math.inf], tau)
    assert first.delays == (0.0,)
    assert first.refused_wait is not None
    assert 0.9 < first.refused_wait <= 1.0  # the second slot, one interval after the first
    assert 0.9 < first.backlog <= 1.0


async def test_give_back_only_where_the_schedule_still_ends(backend: RedisBackend) -> None:
    tau = _gcra.depth(1, 1.0)
    mine = await backend.reserve("b", [1.0, 1.0], [math.inf, math.inf], tau)
    theirs = await backend.reserve("b", [1.0], [math.inf], tau)
    assert not await backend.give_back("b", 1.0, mine.end)  # another reservation followed
    assert await backend.give_back("b", 1.0, theirs.end)
    again = await backend.reserve("b", [1.0], [math.inf], tau)
    assert again.end == theirs.end  # the slot given back is used again, never twice


async def test_pause_pushes_the_shared_schedule_forward(backend: RedisBackend) -> None:
    tau = _gcra.depth(1, 0.1)
    paused = await backend.pause("b", 2.0)
    assert 1.99 < paused.backlog <= 2.0
    after = await backend.reserve("b", [0.1], [math.inf], tau)
    assert 1.9 < after.delays[0] <= 2.0


async def test_keys_share_one_hash_tag_hold_no_personal_data_and_expire(
    backend: RedisBackend,
) -> None:
    limiter = KeyedLimiter(1, name="per-caller", store=backend)
    await limiter.acquire("+15551234567")
    client = backend.client
    keys = sorted([k.decode() async for k in client.scan_iter(match=f"{{{backend.prefix}:*")])
    assert len(keys) == 2
    schedule, heartbeats = keys
    assert schedule.startswith(f"{{{backend.prefix}:per-caller}}:b:")
    assert heartbeats == f"{{{backend.prefix}:per-caller}}:hb"
    assert "5551234567" not in schedule
    assert 0 < await client.pttl(schedule) <= 61_000  # the refill (1 s) plus 60 s idle
    assert 0 < await client.pttl(heartbeats) <= 3_000
    assert backend.live_replicas(backend.key_of("per-caller")) == 1


async def test_replicas_configured_differently_under_one_name_are_refused(
    backend: RedisBackend, caplog: pytest.LogCaptureFixture
) -> None:
    other = RedisBackend(backend.client, prefix=backend.prefix)
    first = TokenBucket(5, name="acct", store=backend)
    second = TokenBucket(10, name="acct", store=other)
    await first.acquire()
    with pytest.raises(ValueError, match=r"rate/burst 10\.0/1\.0 here but 5\.0/1\.0"):
        await second.acquire()
    with pytest.raises(ValueError, match="its own name"):
        await second.try_acquire()
    assert len([r for r in caplog.records if r.name == "resilient_voice.redis"]) == 1
    with pytest.raises(ValueError, match="its own name"):
        TokenBucket(6, name="acct", store=backend)  # caught in one process at construction


async def test_a_shared_store_needs_a_name(backend: RedisBackend) -> None:
    with pytest.raises(ValueError, match="needs a name"):
        TokenBucket(5, store=backend)
    with pytest.raises(ValueError, match="needs a name"):
        KeyedLimiter(5, store=backend)


async def test_buckets_sharing_redis_share_one_schedule(backend: RedisBackend) -> None:
    first = TokenBucket(1, name="acct", store=backend)
    second = TokenBucket(1, name="acct", store=backend)
    assert await first.try_acquire()
    assert not await second.try_acquire()


async def test_noscript_after_a_restart_reloads_the_script() -> None:
    with own_redis() as server:
        async with RedisBackend.from_url(server.url, prefix=fresh_prefix(), timeout=1.0) as b:
            bucket = TokenBucket(1000, name="acct", store=b)
            await bucket.acquire()
            await b.client.script_flush()
            await bucket.acquire()


async def test_a_dead_or_slow_redis_raises_store_unavailable_within_the_timeout() -> None:
    with own_redis() as server:
        async with RedisBackend.from_url(server.url, prefix=fresh_prefix(), timeout=0.05) as b:
            tau = _gcra.depth(1, 1.0)
            await b.reserve("b", [1.0], [math.inf], tau)
            async with RedisBackend.from_url(server.url) as other, anyio.create_task_group() as tg:
                tg.start_soon(_busy, other, 0.3)
                await anyio.sleep(0.05)
                started = anyio.current_time()
                with pytest.raises(StoreUnavailableError, match="did not answer"):
                    await b.reserve("b", [1.0], [math.inf], tau)
                assert anyio.current_time() - started < 0.25  # the timeout, with slack
            server.stop()
            with pytest.raises(StoreUnavailableError):
                await b.reserve("b", [1.0], [math.inf], tau)
    gc.collect()  # coredis' leaked streams warn here, under this module's filter


async def _busy(backend: RedisBackend, seconds: float) -> None:
    """Keep the server busy for ``seconds`` (a script blocks every other client)."""
    spin = (
        "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 "
        "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 - s > tonumber(ARGV[1])"
    )
    await backend.client.eval(spin, keys=[], args=[str(seconds)])


def test_the_constructor_checks_its_arguments() -> None:
    client = coredis.Redis.from_url(REDIS_URL)
    with pytest.raises(TypeError, match="coredis"):
        RedisBackend(object())
    with pytest.raises(ValueError, match="prefix"):
        RedisBackend(client, prefix="a{b}")
    with pytest.raises(ValueError, match="timeout"):
        RedisBackend(client, timeout=0)


def test_min_replicas_is_checked_and_taken_by_from_url_too() -> None:
    assert RedisBackend(coredis.Redis.from_url(REDIS_URL)).min_replicas == 1
    backend = RedisBackend.from_url(REDIS_URL, min_replicas=3)
    assert backend.min_replicas == 3
    assert "min_replicas=3" in repr(backend)
    assert backend.live_replicas("never-used") == 3  # before any answer
    with pytest.raises(ValueError, match="min_replicas"):
        RedisBackend.from_url(REDIS_URL, min_replicas=0)
    with pytest.raises(TypeError, match="min_replicas"):
        RedisBackend.from_url(REDIS_URL, min_replicas=True)
    with pytest.raises(TypeError, match="min_replicas"):
        RedisBackend.from_url(REDIS_URL, min_replicas=3.0)  # type: ignore[arg-type]


@pytest.mark.slow
def test_without_coredis_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['coredis'] = None\n"
        "import resilient_voice.redis as r\n"
        "try:\n    r.RedisBackend.from_url('redis://x')\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "pip install 'resilient-voice[redis]'" in out.stdout


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's client is asyncio only
async def test_a_redis_py_asyncio_client_works_too() -> None:
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(REDIS_URL)
    try:
        backend = RedisBackend(client, prefix=fresh_prefix(), timeout=1.0)
        bucket = TokenBucket(1, name="acct", store=backend)
        assert await bucket.try_acquire()
        assert not await bucket.try_acquire()
        tau = _gcra.depth(1, 1.0)
        mine = await backend.reserve("acct", [1.0], [math.inf], tau)
        assert 0.9 < mine.delays[0] <= 1.0
        assert await backend.give_back("acct", 1.0, mine.end)
        await client.script_flush()  # NOSCRIPT: reloaded once
        paused = await backend.pause("acct", 2.0)
        assert 1.9 < paused.backlog <= 2.0
        other = RedisBackend(client, prefix=backend.prefix)
        with pytest.raises(ValueError, match="its own name"):
            await TokenBucket(2, name="acct", store=other).acquire()
    finally:
        await client.aclose()
