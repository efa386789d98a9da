"""CallLeases on real Redis: the contract, the key layout, wake-ups, two OS processes, an outage.

Real time, bounded: every wait below is a fraction of a second to a few seconds, and each bound
states its tolerance (the machine running the tests is shared and loaded). Each test uses its own
key prefix on the shared Redis; the outage tests start their own redis-server and kill it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import pytest

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, fresh_prefix, own_redis
from _together import run_together
from resilient_voice import CallLeases, CapacityExhaustedError, Lease
from resilient_voice.events import Event, LeaseReleased, StoreAvailabilityChanged
from resilient_voice.leases import LeaseStore
from resilient_voice.leases._store import InMemoryLeaseStore
from resilient_voice.redis import RedisBackend, _lease_script
from resilient_voice.testing import ManualClock

pytestmark = [COREDIS_CANCEL_LEAK]
__all__ = ["collect_coredis_garbage"]

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@pytest.fixture
async def backend() -> AsyncIterator[RedisBackend]:
    # A 1 s timeout: the shared test machine is loaded, and a spurious timeout would put the
    # set on its fallback mid-test.
    async with RedisBackend.from_url(REDIS_URL, prefix=fresh_prefix(), timeout=1.0) as b:
        yield b


async def test_the_backend_is_a_lease_store(backend: RedisBackend) -> None:
    assert isinstance(backend, LeaseStore)


async def test_acquire_bind_and_release_by_call_id_with_generations(backend: RedisBackend) -> None:
    leases = CallLeases("acct", 2, ttl=60.0, store=backend)
    first = await leases.acquire()
    second = await leases.acquire()
    assert second.generation == first.generation + 1
    with pytest.raises(CapacityExhaustedError) as caught:
        await leases.acquire(timeout=0)
    assert caught.value.retry_after is not None
    assert 55.0 < caught.value.retry_after <= 60.0
    bound = await leases.bind(first, "CA1")
    assert bound.call_id == "CA1"
    assert await leases.release("CA1", generation=first.generation + 5) is False  # stale
    assert await leases.release("CA1", generation=first.generation) is True
    assert await leases.release("CA1") is False  # a duplicate webhook
    assert await second.release() is True
    assert await second.release() is False
    assert await leases.release("never-bound") is False
    stats = leases.statistics()
    assert (stats.in_use, stats.acquired, stats.released, stats.refused) == (0, 2, 2, 1)


async def test_a_release_before_the_bind_frees_the_lease_at_the_bind(
    backend: RedisBackend,
) -> None:
    events: list[Event] = []
    leases = CallLeases("acct", 1, ttl=60.0, store=backend, listeners=[events.append])
    lease = await leases.acquire()
    assert await leases.release("CA1", generation=lease.generation) is False
    await leases.bind(lease, "CA1")
    assert leases.statistics().in_use == 0
    assert [(e.reason, e.call_id) for e in events if isinstance(e, LeaseReleased)] == [
        ("webhook", "CA1")
    ]
    other = await leases.acquire(timeout=0)
    await leases.release("CA2", generation=other.generation + 1)  # another generation
    await leases.bind(other, "CA2")
    assert leases.statistics().in_use == 1


Early = Callable[[], Awaitable[list[str]]]


@pytest.fixture(params=["memory", "redis"])
async def early_set(
    request: pytest.FixtureRequest, backend: RedisBackend
) -> tuple[CallLeases, Early, Callable[[], None]]:
    """A set, its early releases (call ids, oldest first), and a step of its clock.

    In memory on a ManualClock that the step advances; on Redis its server clock, on which
    one round trip after another is a later time already.
    """
    if request.param == "memory":
        clock = ManualClock()
        store = InMemoryLeaseStore(clock=clock)
        leases = CallLeases("acct", 4, ttl=60.0, clock=clock, store=store)

        async def in_memory() -> list[str]:
            return [call_id for call_id, _, _ in store.table("acct").early()]

        return leases, in_memory, lambda: clock.advance(0.001)
    leases = CallLeases("acct", 4, ttl=60.0, store=backend)
    keys = backend.lease_keys("acct")

    async def on_redis() -> list[str]:
        ordered = await backend.client.zrange(keys[3], 0, -1)
        generations = await backend.client.hkeys(keys[4])
        assert sorted(generations) == sorted(ordered)  # the two keys of an early release
        return [call_id.decode() for call_id in ordered]

    return leases, on_redis, lambda: None


async def test_replays_with_no_unbound_lease_record_no_early_release(
    early_set: tuple[CallLeases, Early, Callable[[], None]],
) -> None:
    leases, early, step = early_set
    done = await leases.bind(await leases.acquire(), "CA-done")
    assert await leases.release("CA-done", generation=done.generation) is True
    await leases.bind(await leases.acquire(), "CA-live")  # held, but bound
    for index in range(20):
        step()
        assert await leases.release("CA-done", generation=done.generation) is False
        assert await leases.release("CA-done") is False
        assert await leases.release(f"CA-never-{index}") is False
    assert await early() == []
    assert leases.statistics().in_use == 1


async def test_an_early_release_frees_a_pending_lease_and_goes_with_the_older_unbound_ones(
    early_set: tuple[CallLeases, Early, Callable[[], None]],
) -> None:
    leases, early, step = early_set
    bound = await leases.bind(await leases.acquire(), "CA-bound")
    pending = await leases.acquire()
    step()
    assert await leases.release("CA-x", generation=bound.generation) is False  # bound lease
    assert await leases.release("CA-x", generation=pending.generation + 1) is False  # none yet
    assert await early() == []
    assert await leases.release("CA-pending", generation=pending.generation) is False
    assert await early() == ["CA-pending"]
    await leases.bind(pending, "CA-pending")  # freed at once: the webhook came first
    assert await early() == []
    assert leases.statistics().in_use == 1
    first = await leases.acquire()
    step()
    second = await leases.acquire()
    step()
    await leases.release("CA-early")
    assert await leases.release("CA-other") is False
    step()
    third = await leases.acquire()  # acquired after those releases: never theirs
    await leases.bind(first, "CA-first")
    assert await early() == ["CA-early", "CA-other"]  # ``second`` may still be theirs
    await second.release()
    assert await early() == []  # ``third`` is unbound, but younger than both
    for index in range(50):
        await leases.release(f"CA-replay-{index}")  # a flood while ``third`` is pending
    assert len(await early()) == 50
    await leases.bind(third, "CA-third")
    assert await early() == []
    assert leases.statistics().in_use == 3


async def test_an_early_release_goes_when_its_only_older_lease_is_reclaimed(
    backend: RedisBackend,
) -> None:
    """On Redis' clock: a lease acquired at 0, a release at 1 s, the lease reclaimed by its
    2 s TTL; the release is dropped with it, before its own TTL (3 s) runs out. Tolerance: the
    check runs between 2.2 s and 3 s, 0.8 s for two round trips on a loaded machine."""
    leases = CallLeases("acct", 2, ttl=2.0, store=backend)
    keys = backend.lease_keys("acct")
    await leases.acquire()
    await anyio.sleep(1.0)
    await leases.release("CA-early")
    assert await backend.client.zcard(keys[3]) == 1
    await anyio.sleep(1.2)
    await leases.acquire()  # reclaims the first lease; the new one came after the release
    assert leases.statistics().reclaimed_by_ttl == 1
    assert await backend.client.zcard(keys[3]) == 0
    assert await backend.client.exists([keys[4]]) == 0


async def test_reconcile_and_unknown_outcomes(backend: RedisBackend) -> None:
    leases = CallLeases("acct", 5, ttl=60.0, store=backend)
    gone = await leases.bind(await leases.acquire(), "CA-gone")
    await leases.bind(await leases.acquire(), "CA-live")
    unknown = await leases.mark_unknown(await leases.acquire(), "att-1")
    await anyio.sleep(0.05)
    as_of = leases.clock.now()
    await anyio.sleep(0.05)
    late = await leases.bind(await leases.acquire(), "CA-late")
    assert await leases.reconcile(["CA-live"], as_of=as_of) == 1
    assert await leases.release("CA-gone") is False
    listed = await leases.unknown()
    assert [(x.id, x.attempt_id) for x in listed] == [(unknown.id, "att-1")]
    assert await leases.reconcile(["CA-live"]) == 1  # CA-late, bound before now
    assert leases.statistics().in_use == 2
    assert (gone.call_id, late.call_id) == ("CA-gone", "CA-late")


async def test_capacity_signals_and_provider_limits_are_shared(backend: RedisBackend) -> None:
    leases = CallLeases("acct", 8, ttl=60.0, store=backend, capacity_recovery=60.0)
    async with RedisBackend.from_url(REDIS_URL, prefix=backend.prefix, timeout=1.0) as other:
        replica = CallLeases("acct", 8, ttl=60.0, store=other, capacity_recovery=60.0)
        await leases.signal_capacity("twilio:10004")
        held = [await replica.acquire(timeout=0) for _ in range(4)]
        with pytest.raises(CapacityExhaustedError):
            await replica.acquire(timeout=0)
        assert replica.statistics().effective_capacity == 4
        await replica.observe_provider_limits(remaining=2)
        assert replica.statistics().effective_capacity == 6
        await leases.observe_provider_limits(concurrency_limit=20)
        assert leases.statistics().effective_capacity == 8
        for lease in held:
            await lease.release()


async def test_leaked_leases_are_reclaimed_after_the_ttl(backend: RedisBackend) -> None:
    events: list[Event] = []
    leases = CallLeases("acct", 1, ttl=0.3, store=backend, listeners=[events.append])
    await leases.bind(await leases.acquire(), "CA1")
    started = time.monotonic()
    lease = await leases.acquire(timeout=5.0)  # waits for the TTL on Redis' clock
    waited = time.monotonic() - started
    # 0.3 s on the server's clock; the waiter sleeps the server's delay, plus round trips.
    assert 0.2 < waited < 2.0
    assert leases.statistics().reclaimed_by_ttl == 1
    assert [(e.reason, e.call_id) for e in events if isinstance(e, LeaseReleased)] == [
        ("ttl", "CA1")
    ]
    assert isinstance(lease, Lease)


async def test_a_waiter_is_woken_by_a_release_in_another_replica(backend: RedisBackend) -> None:
    async with RedisBackend.from_url(REDIS_URL, prefix=backend.prefix, timeout=1.0) as other:
        here = CallLeases("acct", 1, ttl=60.0, store=backend)
        there = CallLeases("acct", 1, ttl=60.0, store=other)
        held = await there.bind(await there.acquire(), "CA1")
        woken: list[float] = []

        async def wait() -> None:
            await here.acquire(timeout=10.0)
            woken.append(time.monotonic())

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait)
            await anyio.sleep(0.5)
            released = time.monotonic()
            assert await there.release("CA1", generation=held.generation) is True
        # Without a wake-up the waiter would poll every 2 s: 1 s is round trips and slack.
        assert woken[0] - released < 1.0


async def test_a_cancelled_waiter_strands_nothing_on_redis(backend: RedisBackend) -> None:
    leases = CallLeases("acct", 1, ttl=60.0, store=backend)
    held = await leases.acquire()
    got: list[Lease] = []

    async def wait() -> None:
        got.append(await leases.acquire(timeout=10.0))

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_acquire_in, scope, leases)
        await anyio.sleep(0.2)
        tasks.start_soon(wait)
        await anyio.sleep(0.2)
        scope.cancel()
        await held.release()
    assert len(got) == 1
    assert leases.statistics().in_use == 1


async def _acquire_in(scope: anyio.CancelScope, leases: CallLeases) -> None:
    with scope:
        await leases.acquire()


async def test_keys_share_one_hash_tag_and_the_lease_keys_expire(backend: RedisBackend) -> None:
    leases = CallLeases("twilio:AC1", 2, ttl=60.0, store=backend)
    await leases.bind(await leases.acquire(), "CA1")
    await leases.acquire()  # a create still pending: the release below may be its call's
    await leases.release("CA9")  # an early release
    keys = backend.lease_keys("twilio:AC1")
    tag = f"{{{backend.prefix}:leases:twilio:AC1}}"
    assert all(key.startswith(tag + ":") for key in keys)
    client = backend.client
    for key in keys[:5]:
        ttl = await client.pttl(key)
        assert 60_000 < ttl <= 120_000, key
    assert await client.pttl(keys[5]) == -1  # the generation counter outlives idle periods


async def test_replicas_configured_differently_under_one_name_are_refused(
    backend: RedisBackend,
) -> None:
    await CallLeases("acct", 2, ttl=60.0, store=backend).acquire()
    with pytest.raises(ValueError, match="capacity/ttl/recovery"):
        CallLeases("acct", 3, ttl=60.0, store=backend)
    async with RedisBackend.from_url(REDIS_URL, prefix=backend.prefix, timeout=1.0) as other:
        with pytest.raises(ValueError, match="another replica"):
            await CallLeases("acct", 3, ttl=60.0, store=other).acquire()


def _run_replicas(replicas: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    """Run the replicas together: released at once when every one is connected."""
    prefix = fresh_prefix()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    commands = [
        [
            sys.executable,
            str(TESTS / "_lease_worker.py"),
            json.dumps({**given, "url": REDIS_URL, "prefix": prefix, "seconds": seconds}),
        ]
        for given in replicas
    ]
    return run_together(commands, env=env, timeout=seconds + 60)


@pytest.mark.slow
def test_two_processes_never_hold_more_than_the_capacity_together() -> None:
    common = {"name": "acct", "capacity": 3, "ttl": 60.0, "tasks": 4, "hold": 0.03}
    results = _run_replicas(
        [{**common, "backend": "asyncio"}, {**common, "backend": "trio"}], seconds=3.0
    )
    # Each recorded interval lies inside the time its lease was really held (taken after the
    # grant returned, ended before the release was sent): no tolerance is needed.
    edges = sorted(
        (t, step) for r in results for got, done in r["held"] for t, step in ((got, 1), (done, -1))
    )
    most = current = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        current += step
        most = max(most, current)
    assert most <= 3
    assert all(len(r["held"]) >= 5 for r in results)  # both processes were served
    assert most == 3  # and the capacity was used


async def _in_use_of(backend: RedisBackend, name: str) -> int:
    return int(await backend.client.zcard(backend.lease_keys(name)[0]))


@pytest.mark.slow
async def test_an_outage_falls_back_to_the_local_share_and_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis comes back empty: the replay restores this replica's shared lease first, and the
    # set then grants nothing for RESTORE_HOLD_S (1 s here, 6 s by default).
    monkeypatch.setattr(_lease_script, "RESTORE_HOLD_S", 1.0)
    events: list[Event] = []
    with own_redis() as server:
        async with (
            RedisBackend.from_url(server.url, prefix=fresh_prefix(), timeout=0.2) as one,
            RedisBackend.from_url(server.url, prefix=one.prefix, timeout=0.2) as two,
        ):
            leases = CallLeases("acct", 4, ttl=60.0, store=one, listeners=[events.append])
            replica = CallLeases("acct", 4, ttl=60.0, store=two)
            await (await replica.acquire()).release()  # two live replicas: a share of 2
            shared = await leases.bind(await leases.acquire(), "CA-shared")
            server.stop()
            local = [await leases.acquire(timeout=0) for _ in range(2)]
            assert all(lease.id.startswith("local-") for lease in local)
            with pytest.raises(CapacityExhaustedError):
                await leases.acquire(timeout=0)
            assert [e.available for e in events if isinstance(e, StoreAvailabilityChanged)] == [
                False
            ]
            # A webhook for the shared lease during the outage is kept for replay.
            assert await leases.release("CA-shared", generation=shared.generation) is False
            await leases.bind(local[0], "CA-local")
            assert await leases.release("CA-local") is True
            server.start()  # an empty Redis: what it held is gone
            # Re-probes back off from 0.5 s; a few seconds is plenty for the first ones.
            deadline = time.monotonic() + 10.0
            back: list[Lease] = []
            while time.monotonic() < deadline and not any(
                e.available for e in events if isinstance(e, StoreAvailabilityChanged)
            ):
                try:
                    back.append(await leases.acquire(timeout=0))
                except CapacityExhaustedError:
                    await anyio.sleep(0.2)
            assert [e.available for e in events if isinstance(e, StoreAvailabilityChanged)] == [
                False,
                True,
            ]
            # The shared lease came back and was released by the replayed webhook.
            assert await _in_use_of(one, "acct") == len([x for x in back if x.id[:6] != "local-"])
            await anyio.sleep(1.2)  # the restore hold (1 s) is over
            # The local lease still held counts against this replica's shared acquires.
            while True:
                try:
                    back.append(await leases.acquire(timeout=0))
                except CapacityExhaustedError:
                    break
            shared_back = [lease for lease in back if not lease.id.startswith("local-")]
            local_held = [local[1], *(lease for lease in back if lease.id.startswith("local-"))]
            assert len(shared_back) == 4 - len(local_held)
            for lease in local_held:
                assert await lease.release() is True


@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_allow_and_deny_when_redis_is_unreachable(mode: Any) -> None:
    with own_redis() as server:
        url = server.url
        server.stop()
        async with RedisBackend.from_url(url, prefix=fresh_prefix(), timeout=0.2) as b:
            leases = CallLeases("acct", 1, ttl=60.0, store=b, on_backend_error=mode)
            if mode == "allow":
                first = await leases.acquire(timeout=0)
                second = await leases.acquire(timeout=0)
                assert first.id.startswith("allow-")
                assert second.generation == first.generation + 1
                assert await leases.bind(first, "CA1") == Lease(
                    first.id, first.generation, first.acquired_at, "CA1"
                )
                assert await first.release() is False
            else:
                with pytest.raises(CapacityExhaustedError):
                    await leases.acquire(timeout=0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's client is asyncio only
async def test_a_redis_py_asyncio_client_serves_leases_and_wake_ups() -> None:
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(REDIS_URL)
    try:
        prefix = fresh_prefix()
        async with (
            RedisBackend(client, prefix=prefix, timeout=1.0) as one,
            RedisBackend(client, prefix=prefix, timeout=1.0) as two,
        ):
            here = CallLeases("acct", 1, ttl=60.0, store=one)
            there = CallLeases("acct", 1, ttl=60.0, store=two)
            held = await there.bind(await there.acquire(), "CA1")
            woken: list[float] = []

            async def wait() -> None:
                lease = await here.acquire(timeout=10.0)
                woken.append(time.monotonic())
                await lease.release()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                await anyio.sleep(0.5)
                released = time.monotonic()
                assert await there.release("CA1", generation=held.generation) is True
            assert woken[0] - released < 1.0  # a wake-up, not the 2 s poll
    finally:
        await client.aclose()


async def test_an_unknown_mark_keeps_its_context_and_time_on_redis() -> None:
    """Any replica reads the mark: two backends on one prefix. Real time: the mark is 0.3 s
    after the acquire, read back within 0.3 s to 1.3 s of it (a loaded machine)."""
    prefix = fresh_prefix()
    async with (
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as mine,
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as other,
    ):
        await _marks_are_shared(CallLeases("acct", 2, ttl=60.0, store=mine), other)


async def _marks_are_shared(leases: CallLeases, other: RedisBackend) -> None:
    lease = await leases.acquire()
    await anyio.sleep(0.3)
    context = '{"to":"sip:a|b@example.com","from":"+14155550100","since":1}'
    await leases.mark_unknown(lease, "att-1", context=context)
    plain = await leases.mark_unknown(await leases.acquire(), "att-2")
    replica = CallLeases("acct", 2, ttl=60.0, store=other)
    first, second = await replica.unknown()
    assert (first.id, first.attempt_id, first.context) == (lease.id, "att-1", context)
    assert first.marked_at is not None
    assert 0.25 <= first.marked_at - first.acquired_at <= 1.3
    assert (second.id, second.attempt_id, second.context) == (plain.id, "att-2", None)
    assert second.marked_at is not None
    await replica.bind(first, "CA1")  # a bind clears the mark, context and all
    assert [x.id for x in await leases.unknown()] == [plain.id]
    await leases.mark_unknown(plain, "att-3", context="again")
    (again,) = await replica.unknown()
    assert (again.attempt_id, again.context) == ("att-3", "again")
