"""The fallback's divisor: the most replicas seen recently, not the count of the last answer.

``on_backend_error="local"`` gives a replica ``rate / replicas`` (``capacity // replicas`` for
call leases) while Redis is gone. The rule (``resilient_voice.redis._replicas.ReplicaPeak``):
the most replicas Redis reported in the ``PEAK_S`` seconds up to its last answer, and never fewer
than the backend's ``min_replicas``. The unit tests drive it with explicit times; the Redis tests
use three backends on a private redis-server (three replica ids, as three processes would have),
drop the others' heartbeats by deleting the ZSET (what 3 s without a heartbeat does, without
waiting for it) and kill the server, or use one backend whose Redis never answers, or answers
once before it dies.

Real time, bounded: each Redis test waits about 1 s (a replica beats at most once a second per
limiter, and only a beat brings a limiter's count back) and reads no timing-sensitive figure:
the local shares are counted as grants available at once.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
import pytest

from _redis import COREDIS_CANCEL_LEAK, collect_coredis_garbage, fresh_prefix, own_redis
from resilient_voice import CallLeases, CapacityExhaustedError, KeyedLimiter, TokenBucket
from resilient_voice.redis import RedisBackend, _replicas
from resilient_voice.redis._replicas import ReplicaPeak

pytestmark = COREDIS_CANCEL_LEAK
__all__ = ["collect_coredis_garbage"]  # an autouse fixture, used by being here

H = _replicas.PEAK_S


def test_before_any_answer_the_divisor_is_one() -> None:
    peak = ReplicaPeak()
    assert (peak.most, peak.last) == (1, 1)
    peak.seen(0, at=5.0)  # a lease set's answer may count nobody (this call did not beat)
    assert (peak.most, peak.last) == (1, 1)


def test_the_peak_holds_for_the_horizon_after_it_then_follows_the_answers() -> None:
    peak = ReplicaPeak()
    peak.seen(1, at=0.0)
    peak.seen(3, at=1.0)
    peak.seen(1, at=2.0)  # the others' heartbeats lapsed
    assert (peak.most, peak.last) == (3, 1)
    peak.seen(1, at=1.0 + H)
    assert peak.most == 3  # exactly the horizon: still remembered
    peak.seen(1, at=1.0 + H + 0.001)
    assert peak.most == 1  # a fleet that scaled down is counted at its new size


def test_without_new_answers_the_peak_stays() -> None:
    # The window is anchored at the last answer, not at now: during an outage nothing new is
    # known, and the replicas that were serving are still serving.
    peak = ReplicaPeak()
    peak.seen(4, at=0.0)
    peak.seen(2, at=1.0)
    assert peak.most == 4  # read at any later time: it only moves with answers


def test_when_the_peak_expires_the_next_highest_in_the_window_counts() -> None:
    peak = ReplicaPeak()
    peak.seen(5, at=0.0)
    peak.seen(2, at=10.0)
    peak.seen(4, at=20.0)
    peak.seen(3, at=30.0)
    peak.seen(1, at=H + 5.0)
    assert peak.most == 4  # 5 is past the horizon; 4 (at 20) is not
    peak.seen(1, at=H + 25.0)
    assert peak.most == 3
    peak.seen(2, at=H + 35.0)
    assert peak.most == 2
    assert len(peak._marks) == 1  # entries only for counts that can still be the peak


def test_equal_counts_extend_the_peak() -> None:
    peak = ReplicaPeak()
    peak.seen(3, at=0.0)
    peak.seen(3, at=50.0)
    peak.seen(1, at=H + 10.0)
    assert peak.most == 3  # the 3 seen at 50 s is inside the window


async def _three_then_one_then_gone(limiter: str, min_replicas: int = 1) -> tuple[int, int]:
    """Three replicas use a limiter, this one last (it reads 3); the others' heartbeats lapse
    and this one's next answer reads 1; then Redis dies. This one is built with
    ``min_replicas``.

    Returns:
        The divisor, and the grants available at once from the local share.
    """
    rate, burst = 1.0, 30.0  # a slow refill: what is available at once is the local share
    name = "cps" if limiter == "bucket" else "per-client"
    with own_redis() as server:
        prefix = fresh_prefix()
        async with (
            RedisBackend.from_url(
                server.url, prefix=prefix, timeout=0.25, min_replicas=min_replicas
            ) as this,
            RedisBackend.from_url(server.url, prefix=prefix, timeout=0.25) as two,
            RedisBackend.from_url(server.url, prefix=prefix, timeout=0.25) as three,
        ):

            def make(store: RedisBackend) -> Callable[[], Awaitable[bool]]:
                if limiter == "bucket":
                    return TokenBucket(rate, burst, name=name, store=store).try_acquire
                keyed = KeyedLimiter(rate, burst=burst, name=name, store=store)
                return partial(keyed.try_acquire, "client")

            take = make(this)
            for other in (make(two), make(three), take):
                assert await other()
            assert this._live[name].last == 3
            # What 3 s without the others' heartbeats does, without the wait.
            await this.client.delete([f"{{{prefix}:{name}}}:hb"])
            await anyio.sleep(1.05)  # this replica beats again (at most once a second)
            assert await take()
            assert this._live[name].last == 1
            divisor = this.live_replicas(name)
            server.stop()
            granted = 0
            while granted < 2 * burst and await take():
                granted += 1
    gc.collect()
    return divisor, granted


@pytest.mark.parametrize("limiter", ["bucket", "keyed"])
@pytest.mark.parametrize("horizon_passed", [False, True], ids=["within", "after"])
async def test_the_limiter_divides_by_the_most_replicas_seen_recently(
    monkeypatch: pytest.MonkeyPatch, horizon_passed: bool, limiter: str
) -> None:
    if horizon_passed:
        monkeypatch.setattr(_replicas, "PEAK_S", 0.5)  # the 1 s between the answers is past it
    divisor, granted = await _three_then_one_then_gone(limiter)
    # Four tokens went to the shared schedule (about one back by the refill), so the local share
    # starts with about 27 of 30 tokens: a third as many at a third of the rate. +-2 for the
    # refill and the rounding of slots.
    if horizon_passed:
        assert divisor == 1
        assert 25 <= granted <= 30, granted
    else:
        assert divisor == 3
        assert 7 <= granted <= 11, granted


@pytest.mark.parametrize("min_replicas", [1, 2])
@pytest.mark.parametrize("horizon_passed", [False, True], ids=["within", "after"])
async def test_call_leases_divide_by_the_most_replicas_seen_recently(
    monkeypatch: pytest.MonkeyPatch, horizon_passed: bool, min_replicas: int
) -> None:
    if horizon_passed:
        monkeypatch.setattr(_replicas, "PEAK_S", 0.2)
    capacity = 6
    with own_redis() as server:
        prefix = fresh_prefix()
        async with (
            RedisBackend.from_url(
                server.url, prefix=prefix, timeout=0.25, min_replicas=min_replicas
            ) as this,
            RedisBackend.from_url(server.url, prefix=prefix, timeout=0.25) as two,
            RedisBackend.from_url(server.url, prefix=prefix, timeout=0.25) as three,
        ):
            mine = CallLeases("acct", capacity, ttl=60.0, store=this)
            for store in (two, three):
                await (
                    await CallLeases("acct", capacity, ttl=60.0, store=store).acquire()
                ).release()
            await (await mine.acquire()).release()
            assert this.live_lease_replicas("acct") == 3
            # What 3 s without the others' heartbeats does, without the wait. Every lease
            # answer counts the live replicas, beat or not: the next one reads 1 (or 0).
            await this.client.delete([f"{{{prefix}:leases:acct}}:hb"])
            await anyio.sleep(0.3)
            await (await mine.acquire()).release()
            assert this._lease_sets["acct"].live.last == 1
            server.stop()
            local = []
            while len(local) <= capacity:
                try:
                    local.append(await mine.acquire(timeout=0))
                except CapacityExhaustedError:
                    break
            assert all(lease.id.startswith("local-") for lease in local)
            for lease in local:
                await lease.release()
    gc.collect()
    # capacity // replicas: within the horizon the peak, 3, wins over min_replicas (1 or 2);
    # past it the peak is the last count, 1, and min_replicas wins: 6 // 1 or 6 // 2.
    assert len(local) == capacity // (min_replicas if horizon_passed else 3)


@pytest.mark.parametrize("horizon_passed", [False, True], ids=["within", "after"])
async def test_the_larger_of_min_replicas_and_the_peak_divides_the_limiter(
    monkeypatch: pytest.MonkeyPatch, horizon_passed: bool
) -> None:
    if horizon_passed:
        monkeypatch.setattr(_replicas, "PEAK_S", 0.5)
    divisor, granted = await _three_then_one_then_gone("bucket", min_replicas=2)
    # About 27 of 30 tokens left (see above): a third of them within the horizon, where the peak
    # (3) is above min_replicas; half past it, where the peak fell to the last count (1). +-2.
    if horizon_passed:
        assert divisor == 2
        assert 11 <= granted <= 16, granted
    else:
        assert divisor == 3
        assert 7 <= granted <= 11, granted


@pytest.mark.parametrize("min_replicas", [1, 3])
@pytest.mark.parametrize("answered", [False, True], ids=["never-answered", "answered-alone"])
async def test_min_replicas_divides_the_limiter_of_a_replica_that_saw_itself_alone(
    answered: bool, min_replicas: int
) -> None:
    # The start-up case: Redis down from the start, or dead right after the first answer,
    # which counted only this replica. The peak is 1 either way; min_replicas is the divisor.
    rate, burst = 1.0, 30.0  # a slow refill: what is available at once is the local share
    with own_redis() as server:
        if not answered:
            server.stop()
        async with RedisBackend.from_url(
            server.url, prefix=fresh_prefix(), timeout=0.25, min_replicas=min_replicas
        ) as backend:
            bucket = TokenBucket(rate, burst, name="cps", store=backend)
            left = burst
            if answered:
                assert await bucket.try_acquire()
                assert (backend._live["cps"].most, backend._live["cps"].last) == (1, 1)
                left -= 1
                server.stop()
            else:
                assert "cps" not in backend._live
            assert backend.live_replicas("cps") == min_replicas
            granted = 0
            while granted < 2 * burst and await bucket.try_acquire():
                granted += 1
    gc.collect()
    # The local share holds left / min_replicas tokens' worth of grants (30 -> 30 or 10; 29 ->
    # 29 or 9), +1 for the refill while the grants are counted and Redis is found gone.
    share = int(left // min_replicas)
    assert share <= granted <= share + 1, (granted, share)


@pytest.mark.parametrize(("min_replicas", "capacity"), [(1, 6), (3, 6), (3, 2)])
@pytest.mark.parametrize("answered", [False, True], ids=["never-answered", "answered-alone"])
async def test_min_replicas_divides_the_call_leases_of_a_replica_that_saw_itself_alone(
    answered: bool, min_replicas: int, capacity: int
) -> None:
    with own_redis() as server:
        if not answered:
            server.stop()
        async with RedisBackend.from_url(
            server.url, prefix=fresh_prefix(), timeout=0.25, min_replicas=min_replicas
        ) as backend:
            leases = CallLeases("acct", capacity, ttl=60.0, store=backend)
            if answered:
                await (await leases.acquire()).release()
                assert backend._lease_sets["acct"].live.most == 1
                server.stop()
            assert backend.live_lease_replicas("acct") == min_replicas
            local = []
            while len(local) <= capacity:
                try:
                    local.append(await leases.acquire(timeout=0))
                except CapacityExhaustedError:
                    break
            assert all(lease.id.startswith("local-") for lease in local)
            for lease in local:
                await lease.release()
    gc.collect()
    # capacity // min_replicas, at least 1: 6, 2, and 1 for a capacity of 2 over 3 replicas.
    assert len(local) == max(1, capacity // min_replicas)
