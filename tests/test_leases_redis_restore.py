"""CallLeases after Redis restarts empty: each replica restores the leases it holds.

A private redis-server (no persistence) is killed and started again; two replicas (two
``RedisBackend``) held the set at capacity. Real time, bounded: the lease TTL is 8 s and each
wait below states its bound and tolerance (the shared test machine is loaded).
"""

from __future__ import annotations

import logging
import time

import anyio
import coredis  # noqa: F401  # the redis extra, installed by [dev]: fail, never skip
import pytest

from _redis import COREDIS_CANCEL_LEAK, collect_coredis_garbage, fresh_prefix, own_redis
from resilient_voice import CallLeases, CapacityExhaustedError
from resilient_voice.redis import RedisBackend, _lease_queue, _lease_script

pytestmark = [COREDIS_CANCEL_LEAK]
__all__ = ["collect_coredis_garbage"]

TTL = 8.0


async def _in_use(backend: RedisBackend, name: str) -> int:
    return int(await backend.client.zcard(backend.lease_keys(name)[0]))


async def test_two_replicas_restore_their_leases_after_redis_restarts_empty(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The set grants nothing for 3 s once a loss is noticed (6 s by default), time for the
    # other replica to restore: its listener reconnects after 0.5 s and its keeper checks
    # within 1 s more (a loaded machine may take longer: the checks below do not depend on it).
    monkeypatch.setattr(_lease_script, "RESTORE_HOLD_S", 3.0)
    caplog.set_level(logging.WARNING, logger="resilient_voice.redis")
    prefix = fresh_prefix()
    with own_redis() as server:
        async with (
            RedisBackend.from_url(server.url, prefix=prefix, timeout=1.0) as one,
            RedisBackend.from_url(server.url, prefix=prefix, timeout=1.0) as two,
        ):
            a = CallLeases("acct", 4, ttl=TTL, store=one)
            b = CallLeases("acct", 4, ttl=TTL, store=two)
            started = time.monotonic()
            a1 = await a.bind(await a.acquire(), "CA-a1")
            a2 = await a.acquire()  # unbound
            a3 = await a.bind(await a.acquire(), "CA-a3")
            b1 = await b.bind(await b.acquire(), "CA-b1")
            # The webhook of a3's call ends up at the other replica: a3's acquirer never hears.
            assert await b.release("CA-a3") is True
            b2 = await b.acquire()  # unbound
            top = max(x.generation for x in (a1, a2, a3, b1, b2))
            with pytest.raises(CapacityExhaustedError):
                await a.acquire(timeout=0)

            server.stop()
            server.start()
            assert await _in_use(one, "acct") == 0  # Redis forgot the set

            # The next acquire anywhere is refused: this replica restores its leases before the
            # acquire runs, and the set grants nothing while the other one restores its own,
            # once its listener is back (10 s allows for the load).
            with pytest.raises(CapacityExhaustedError):
                await a.acquire(timeout=0)
            with anyio.fail_after(10):
                while await _in_use(one, "acct") < 5:
                    await anyio.sleep(0.05)
            for leases in (a, b):
                with pytest.raises(CapacityExhaustedError):
                    await leases.acquire(timeout=0)
            # a1, a2, b1, b2, and a3: released before the loss by the other replica, restored
            # by its acquirer (on the safe side: fewer calls than capacity).
            assert a.statistics().in_use == 5
            assert b.statistics().in_use == 5
            assert any("forgotten by Redis" in r.getMessage() for r in caplog.records)

            # Bindings came back: a webhook at either replica frees a restored lease; a stale
            # generation frees nothing.
            assert await b.release("CA-a1", generation=a1.generation) is True
            assert await a.release("CA-b1", generation=b1.generation + 100) is False
            assert await a.release("CA-b1", generation=b1.generation) is True
            # The next reconcile frees a3 (bound before as_of, its call not live).
            assert await b.reconcile(["CA-other"]) == 1
            assert await _in_use(one, "acct") == 2  # a2 and b2
            with anyio.fail_after(10):  # the hold ends 3 s after the loss was noticed
                while True:
                    try:
                        new = await a.acquire(timeout=0)
                        break
                    except CapacityExhaustedError:
                        await anyio.sleep(0.1)
            assert new.generation > top  # fencing keeps working
            await new.release()

            # The unbound restored leases keep their time left: the TTL reclaims them at
            # started + TTL (plus 0.5 s of slack; Redis' clock, the same machine's).
            assert await _in_use(one, "acct") == 2
            await anyio.sleep(max(0.0, started + TTL + 0.5 - time.monotonic()))
            granted = [await a.acquire(timeout=0) for _ in range(4)]
            assert len(granted) == 4
            assert a2.id not in {g.id for g in granted}
            for lease in granted:
                await lease.release()


async def test_a_replica_that_restores_before_its_first_call_after_the_loss() -> None:
    """The listener's reconnection makes an idle replica check, without waiting for a call."""
    prefix = fresh_prefix()
    with own_redis() as server:
        async with RedisBackend.from_url(server.url, prefix=prefix, timeout=1.0) as one:
            leases = CallLeases("acct", 2, ttl=TTL, store=one)
            first = await leases.bind(await leases.acquire(), "CA-1")
            await leases.acquire()
            server.stop()
            server.start()
            # Bound: the listener reconnects within its backoff (0.5 s, then 1 s, ...) and the
            # keeper checks within a second; 10 s allows for the load.
            with anyio.fail_after(10):
                while await _in_use(one, "acct") < 2:
                    await anyio.sleep(0.05)
            with pytest.raises(CapacityExhaustedError):
                await leases.acquire(timeout=0)
            assert await leases.release("CA-1", generation=first.generation) is True
            assert leases.statistics().in_use == 1


async def test_a_fresh_replica_does_not_take_an_empty_set_for_a_lost_one() -> None:
    """A process seeing the set for the first time has nothing to compare, and no extra call."""
    prefix = fresh_prefix()
    with own_redis() as server:
        async with RedisBackend.from_url(server.url, prefix=prefix, timeout=1.0) as one:
            leases = CallLeases("acct", 2, ttl=TTL, store=one)
            lease = await leases.acquire()
            await lease.release()
            assert await _in_use(one, "acct") == 0
            again = await leases.acquire()
            assert again.generation == lease.generation + 1


async def test_a_replica_forgets_leases_released_elsewhere_before_a_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its periodic check (every 30 s by default, 0.3 s here) drops what others released."""
    monkeypatch.setattr(_lease_queue, "HELD_SWEEP_S", 0.3)
    monkeypatch.setattr(_lease_script, "RESTORE_HOLD_S", 0.5)
    prefix = fresh_prefix()
    with own_redis() as server:
        async with (
            RedisBackend.from_url(server.url, prefix=prefix, timeout=1.0) as one,
            RedisBackend.from_url(server.url, prefix=prefix, timeout=1.0) as two,
        ):
            a = CallLeases("acct", 2, ttl=TTL, store=one)
            b = CallLeases("acct", 2, ttl=TTL, store=two)
            await a.bind(await a.acquire(), "CA-1")
            kept = await a.bind(await a.acquire(), "CA-2")
            assert await b.release("CA-1") is True
            # The keeper runs every second; 2.5 s covers two of its runs (loaded machine).
            await anyio.sleep(2.5)
            server.stop()
            server.start()
            with anyio.fail_after(10):  # the hold (0.5 s) ends, then the freed slot is granted
                while True:
                    try:
                        new = await a.acquire(timeout=0)
                        break
                    except CapacityExhaustedError:
                        await anyio.sleep(0.1)
            assert new.generation > kept.generation
            assert await _in_use(one, "acct") == 2  # CA-2's lease (restored) and the new one
            with pytest.raises(CapacityExhaustedError):
                await b.acquire(timeout=0)


async def test_round_trips_one_per_call_and_two_more_on_a_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The incarnation rides on every call; only a call that finds the set lost costs more."""
    monkeypatch.setattr(_lease_script, "RESTORE_HOLD_S", 0.0)
    prefix = fresh_prefix()
    with own_redis() as server:
        async with RedisBackend.from_url(server.url, prefix=prefix, timeout=1.0) as one:
            leases = CallLeases("acct", 3, ttl=TTL, store=one)
            ops: list[str] = []
            script = RedisBackend._script

            async def counted(
                self: RedisBackend, text: str, keys: list[str], argv: list[str]
            ) -> object:
                if text == _lease_script.LEASES:
                    ops.append(argv[0].split(":")[0])
                return await script(self, text, keys, argv)

            monkeypatch.setattr(RedisBackend, "_script", counted)
            await leases.bind(await leases.acquire(), "CA-1")
            assert ops == ["q", "b"]  # q: an acquire in the fleet order of waiters
            server.stop()
            server.start()
            ops.clear()
            await leases.acquire(timeout=0)
            # Refused as lost, the restore, the acquire again (the keeper may check too).
            assert [op for op in ops if op != "H"] == ["q", "P", "q"]
            assert await _in_use(one, "acct") == 2
