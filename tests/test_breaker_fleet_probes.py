"""Fleet-wide half-open probes with ``half_open_max_calls`` > 1 and ``success_threshold`` > 1.

Several replicas in one process (one ``RedisBackend`` each, so each has its own replica id), on
real Redis and real time, reusing the helpers of tests/test_breaker_fleet.py. A fleet permit is
a Redis key with a ``PX`` hold of ``max_wait_in_half_open`` or else ``recovery_timeout``; the
bounds below are stated against that hold. Open periods are set with ``force_open(duration)``,
which carries no jitter.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager

import anyio
import pytest

from _redis import (
    COREDIS_CANCEL_LEAK,
    REDIS_URL,
    collect_coredis_garbage,
    free_port,
    fresh_prefix,
    own_redis,
)
from resilient_voice import CircuitBreaker
from resilient_voice.events import BreakerState, FleetStateChanged, StateChanged
from resilient_voice.redis import RedisBackend
from test_breaker_fleet import Replica, _boom, _replicas

pytestmark = COREDIS_CANCEL_LEAK
__all__ = ["collect_coredis_garbage"]


class Probes:
    """Counts the calls the breakers let through, and how many probes ran at once fleet-wide.

    A call that starts while its replica's breaker is half-open is a probe (admission and start
    happen without a pause in between); one that starts once the breaker closed is not (a
    caller that asked for a permit while half-open and was let in closed), and is counted in
    ``by`` only.
    """

    def __init__(self, replicas: list[Replica]) -> None:
        self.breakers = [r.breaker for r in replicas]
        self.started = 0
        self.running = 0
        self.most = 0
        self.by: dict[int, int] = {}

    def make(self, who: int, until: float | anyio.Event, fail: bool = False) -> object:
        """A call of replica ``who`` that runs ``until`` seconds, or until the event is set."""

        async def probe() -> None:
            self.by[who] = self.by.get(who, 0) + 1
            if self.breakers[who].state is not BreakerState.HALF_OPEN:
                return
            self.started += 1
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                if isinstance(until, anyio.Event):
                    await until.wait()
                else:
                    await anyio.sleep(until)
            finally:
                self.running -= 1
            if fail:
                raise ConnectionError("still down")

        return probe


async def _all_at_once(
    callers: list[tuple[int, Replica]],
    probes: Probes,
    during: Callable[[], Awaitable[None]] | None = None,
) -> list[str]:
    """Start every caller at once; the admitted ones run until every other caller has had its
    answer, so each admission is decided while the admitted probes still run (a probe that
    finished early would rightly free its permit for a late caller)."""
    outcomes: list[str] = []
    gate = anyio.Event()

    async def hit(i: int, r: Replica) -> None:
        outcomes.append(await r.hit(probes.make(i, gate)))

    async with anyio.create_task_group() as tasks:
        for i, r in callers:
            tasks.start_soon(hit, i, r)
        with anyio.fail_after(5.0):  # every refusal is at most one round trip (0.5 s timeout)
            while probes.running + len(outcomes) < len(callers):
                await anyio.sleep(0.01)
        if during is not None:
            await during()
        gate.set()
    return outcomes


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[str, AsyncExitStack]]:
    async with AsyncExitStack() as stack:
        yield fresh_prefix(), stack


def _permit_keys(prefix: str, n: int) -> list[str]:
    return [f"{{{prefix}:breaker:upstream}}:p:{i}" for i in range(n)]


async def _held(backend: RedisBackend, prefix: str, n: int) -> list[str | None]:
    values = []
    for key in _permit_keys(prefix, n):
        value = await backend.client.get(key)
        values.append(value.decode() if isinstance(value, bytes) else value)
    return values


async def test_half_open_admits_exactly_max_calls_probes_fleet_wide(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    """Three replicas, five concurrent callers each: three probes fleet-wide, the rest refused."""
    prefix, stack = fleet
    replicas = await _replicas(
        prefix, stack, recovery_timeout=5.0, half_open_max_calls=3, success_threshold=3
    )
    for r in replicas:
        r.breaker.force_open(0.3)
    await anyio.sleep(0.5)  # every open period ran out
    probes = Probes(replicas)
    held: list[str | None] = []

    async def read_permits() -> None:
        held.extend(await _held(replicas[0].backend, prefix, 3))

    callers = [(i, r) for i, r in enumerate(replicas) for _ in range(5)]
    outcomes = await _all_at_once(callers, probes, read_permits)
    assert probes.started == probes.most == 3  # half_open_max_calls, fleet-wide, at once
    assert (outcomes.count("ok"), outcomes.count("rejected")) == (3, 12)
    # While they ran, each held a fleet permit stamped "<replica>:<epoch>" by its replica.
    stamps = [v.split(":") for v in held if v is not None]
    assert len(stamps) == 3
    assert all(epoch.isdigit() for _, epoch in stamps)
    for i, r in enumerate(replicas):
        assert sum(who == r.backend._replica for who, _ in stamps) == probes.by.get(i, 0)


async def _leader_and_followers(
    prefix: str, stack: AsyncExitStack, **options: object
) -> list[Replica]:
    """A opens on its own window; B and C, failing once each, follow it by the rate rule."""
    a, b, c = await _replicas(prefix, stack, recovery_timeout=1.0, **options)
    for _ in range(10):
        await a.hit(_boom)
    await b.hit(_boom)
    await c.hit(_boom)
    assert a.breaker.state is BreakerState.OPEN
    with anyio.fail_after(2.5):  # a tick to publish, a tick to read
        while b.breaker.state is not BreakerState.OPEN or c.breaker.state is not BreakerState.OPEN:
            await anyio.sleep(0.05)
    await anyio.sleep(1.3)  # A's open period (1 s +15 %) ran out; B and C are held open
    return [a, b, c]


async def test_the_leaders_probes_close_it_and_the_followers_follow(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    """success_threshold = half_open_max_calls = 3: A runs the fleet's three probes; when all
    three succeed A closes, and B and C close with it (rule "fleet")."""
    a, b, c = await _leader_and_followers(*fleet, half_open_max_calls=3, success_threshold=3)
    probes = Probes([a, b, c])
    outcomes = await _all_at_once(
        [(i, r) for i, r in enumerate((a, b, c)) for _ in range(4)], probes
    )
    assert probes.by == {0: 3}  # the fleet's three probes, all on the replica that saw the outage
    assert outcomes.count("ok") == 3
    assert a.breaker.state is BreakerState.CLOSED
    with anyio.fail_after(2.5):  # A publishes at once; B and C read it within a tick
        while (
            b.breaker.state is not BreakerState.CLOSED or c.breaker.state is not BreakerState.CLOSED
        ):
            await anyio.sleep(0.05)
    for r in (b, c):
        assert [e.rule for e in r.events if isinstance(e, FleetStateChanged)] == ["rate", "fleet"]


async def test_one_failed_probe_reopens_and_the_late_successes_are_dropped(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    prefix, stack = fleet
    a, b, c = await _leader_and_followers(prefix, stack, half_open_max_calls=3, success_threshold=3)
    probes = Probes([a])
    outcomes: list[str] = []
    failing, failed = anyio.Event(), anyio.Event()

    async def hit(until: anyio.Event, fail: bool) -> None:
        outcomes.append(await a.hit(probes.make(0, until, fail)))
        if fail:
            failed.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(hit, failing, True)
        for _ in range(2):
            tasks.start_soon(hit, failed, False)  # these two succeed once the first has failed
        with anyio.fail_after(5.0):
            while probes.running < 3:
                await anyio.sleep(0.01)
        failing.set()
    assert outcomes == ["failed", "ok", "ok"]
    assert a.breaker.state is BreakerState.OPEN
    transitions = [(e.old, e.new) for e in a.events if isinstance(e, StateChanged)]
    # Opened, probed, reopened: the two late successes (of the half-open epoch) changed nothing.
    assert transitions[-2:] == [
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
    ]
    stats = a.breaker.statistics()
    assert (stats.trips, stats.half_open_calls) == (2, 0)
    assert stats.retry_after > 0.5  # a full open period again (1 s +-15 %), not a probe wait
    # Leaving half-open released A's fleet permits (published at once, one tick at most).
    with anyio.fail_after(1.5):
        while any(v is not None for v in await _held(a.backend, prefix, 3)):
            await anyio.sleep(0.05)
    await anyio.sleep(0.3)
    for r in (b, c):  # still held open by A, which is open on its own window again
        assert r.breaker.state is BreakerState.OPEN


@pytest.mark.parametrize(("max_calls", "threshold"), [(3, 3), (2, 4), (1, 2)])
async def test_probes_spread_over_replicas_close_every_replica_without_waiting_for_expiry(
    fleet: tuple[str, AsyncExitStack], max_calls: int, threshold: int
) -> None:
    """Every replica opened on its own, so each recovers by its own probes and needs
    ``threshold`` successes; the fleet's permits are spread over them (or, with one permit,
    taken by one). A replica whose probe finished must be able to probe again on the fleet
    permit it holds: the permits' hold (10 s here) is no part of a recovery."""
    prefix, stack = fleet
    replicas = await _replicas(
        prefix,
        stack,
        recovery_timeout=10.0,
        half_open_max_calls=max_calls,
        success_threshold=threshold,
        fleet_quorum=None,  # no replica reopens another: each recovers on its own
    )
    for r in replicas:
        r.breaker.force_open(0.2)
    await anyio.sleep(0.4)
    probes = Probes(replicas)
    start = time.monotonic()

    async def caller(i: int, r: Replica) -> None:
        async with anyio.create_task_group() as calls:
            while r.breaker.state is not BreakerState.CLOSED and time.monotonic() - start < 6.0:
                calls.start_soon(r.hit, probes.make(i, 0.1))
                await anyio.sleep(0.02)

    async with anyio.create_task_group() as tasks:
        for i, r in enumerate(replicas):
            tasks.start_soon(caller, i, r)
    elapsed = time.monotonic() - start
    seen = (
        f"after {elapsed:.2f} s: {[r.breaker.state.value for r in replicas]}, "
        f"at most {probes.most} probes at once, calls {probes.by}, "
        f"permits {await _held(replicas[0].backend, prefix, max_calls)}"
    )
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas), seen
    assert probes.most <= max_calls, seen  # never more than the fleet's probes at once
    # Each replica ran its threshold of probes (a call let in once it has closed is counted in
    # ``by`` too, so at least).
    assert all(probes.by.get(i, 0) >= threshold for i in range(3)), seen
    # Tolerance: 3 replicas x threshold probes of 0.1 s, run max_calls at a time (measured:
    # 0.3-0.7 s), plus the release of a closed replica's permits (published at once), on a
    # loaded machine: 4 s, well below the 10 s hold each replica waited for before the fix
    # (measured then with a 5 s hold: 10-20 s).
    assert elapsed < 4.0, seen


@pytest.mark.parametrize("ending", ["succeeded", "cancelled"])
async def test_a_replica_probes_again_on_its_own_fleet_permit(
    fleet: tuple[str, AsyncExitStack], ending: str
) -> None:
    """One replica, one probe permit: after its probe succeeded (one of the two successes it
    needs) or was cancelled, its next call is the next probe, at once."""
    prefix, stack = fleet
    (a,) = await _replicas(prefix, stack, n=1, recovery_timeout=10.0, success_threshold=2)
    a.breaker.force_open(0.1)
    await anyio.sleep(0.2)
    probes = Probes([a])
    if ending == "succeeded":
        assert await a.hit(probes.make(0, 0.0)) == "ok"
    else:
        with anyio.move_on_after(0.3):
            await a.hit(probes.make(0, 10.0))
    assert a.breaker.state is BreakerState.HALF_OPEN
    assert await a.hit(probes.make(0, 0.0)) == "ok"  # not refused until the 10 s hold expires
    assert a.breaker.state is (
        BreakerState.CLOSED if ending == "succeeded" else BreakerState.HALF_OPEN
    )
    assert probes.started == 2


def _expired_in_time(asked: float, granted: float, admitted: float) -> None:
    """The permits, held 1.0 s (Redis' clock, the same machine's), were taken between ``asked``
    and ``granted``: no probe before ``asked`` + 1.0 s (5 ms for the two clocks' reads); the
    first after ``granted`` + 1.0 s within 0.8 s (B calls every 50 ms, each refusal a round
    trip, on a loaded machine)."""
    assert admitted - asked >= 0.995
    assert admitted - granted <= 1.8


async def _wait_for_a_probe(r: Replica, probes: Probes) -> float:
    """Call every 50 ms until a probe is admitted; when (time.monotonic())."""
    while await r.hit(probes.make(1, 0.0)) == "rejected":
        await anyio.sleep(0.05)
    return time.monotonic()


async def test_a_cancelled_probes_permit_holds_the_others_off_until_it_expires(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    """A takes the fleet's three permits and its probes are cancelled: A keeps them (stamped
    with its id) until they expire, 1 s (``recovery_timeout``) after they were taken; B probes
    then, not before and not much later."""
    prefix, stack = fleet
    a, b = await _replicas(prefix, stack, n=2, recovery_timeout=1.0, half_open_max_calls=3)
    for r in (a, b):
        r.breaker.force_open(0.1)
    await anyio.sleep(0.2)
    probes = Probes([a, b])
    asked = time.monotonic()
    async with anyio.create_task_group() as tasks:
        for _ in range(3):
            tasks.start_soon(a.hit, probes.make(0, 30.0))
        while probes.running < 3:
            await anyio.sleep(0.01)
        granted = time.monotonic()
        assert await b.hit(probes.make(1, 0.0)) == "rejected"
        tasks.cancel_scope.cancel()
    assert a.breaker.statistics().half_open_calls == 0  # the local slots are free again
    with anyio.fail_after(3.0):
        admitted = await _wait_for_a_probe(b, probes)
    _expired_in_time(asked, granted, admitted)


async def test_a_vanished_replicas_permit_holds_the_others_off_until_it_expires(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    """A takes the fleet's three permits and then goes away (its calls cancelled, its backend
    closed): nobody releases them, and B probes once they expire (1 s after they were taken)."""
    prefix, stack = fleet
    (b,) = await _replicas(prefix, stack, n=1, recovery_timeout=1.0, half_open_max_calls=3)
    async with RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=0.5) as doomed:
        a = Replica(
            doomed,
            CircuitBreaker("upstream", recovery_timeout=1.0, half_open_max_calls=3, store=doomed),
            [],
        )
        probes = Probes([a, b])
        for r in (a, b):
            r.breaker.force_open(0.1)
        await anyio.sleep(0.2)
        asked = time.monotonic()
        async with anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(a.hit, probes.make(0, 30.0))
            while probes.running < 3:
                await anyio.sleep(0.01)
            granted = time.monotonic()
            tasks.cancel_scope.cancel()
    del a
    assert await b.hit(probes.make(1, 0.0)) == "rejected"
    with anyio.fail_after(3.0):
        admitted = await _wait_for_a_probe(b, probes)
    _expired_in_time(asked, granted, admitted)


async def test_a_late_release_leaves_the_next_half_open_periods_permit(
    fleet: tuple[str, AsyncExitStack],
) -> None:
    """A closes (its permits' release is queued for the background task) and, before that task
    has run, opens again and takes the fleet's one permit for its next probe. The release that
    follows must not delete that permit: B stays refused while A's probe runs."""
    prefix, stack = fleet
    a, b = await _replicas(prefix, stack, n=2, recovery_timeout=5.0, fleet_quorum=None)
    for r in (a, b):
        r.breaker.force_open(0.1)
    await anyio.sleep(0.3)
    probes = Probes([a, b])
    assert await a.hit(probes.make(0, 0.0)) == "ok"
    assert a.breaker.state is BreakerState.CLOSED
    a.breaker.force_open(1e-6)  # no await since it closed: its release has not run yet
    gate = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(a.hit, probes.make(0, gate))
        with anyio.fail_after(2.0):
            while probes.running < 1:
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)  # the background task has run the release
        (held,) = await _held(a.backend, prefix, 1)
        assert held is not None
        assert held.startswith(f"{a.backend._replica}:")
        assert await b.hit(probes.make(1, 0.0)) == "rejected"
        gate.set()
    assert probes.most == 1  # before the fix: 2, A's new permit deleted and taken by B


async def test_a_release_redis_missed_is_retried_before_the_permit_expires() -> None:
    """A leaves half-open while its Redis does not answer: the release of its permit fails,
    and runs at a later tick once Redis answers again, long before the 10 s hold."""
    with own_redis() as server:
        process = server._process
        assert process is not None
        async with AsyncExitStack() as stack:
            prefix = fresh_prefix()
            replicas = []
            for _ in range(2):
                backend = await stack.enter_async_context(
                    RedisBackend.from_url(server.url, prefix=prefix, timeout=0.2)
                )
                breaker = CircuitBreaker("upstream", recovery_timeout=10.0, store=backend)
                replicas.append(Replica(backend, breaker, []))
            a, b = replicas
            for r in replicas:
                r.breaker.force_open(0.1)
            await anyio.sleep(0.2)
            probes = Probes(replicas)
            gate = anyio.Event()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(a.hit, probes.make(0, gate))
                with anyio.fail_after(2.0):
                    while probes.running < 1:
                        await anyio.sleep(0.01)
                os.kill(process.pid, signal.SIGSTOP)
                gate.set()  # A's probe succeeds and A closes; its release times out
            await anyio.sleep(0.5)
            os.kill(process.pid, signal.SIGCONT)
            assert a.breaker.state is BreakerState.CLOSED
            # Tolerance: the next tick (1 s) retries the release, plus a loaded machine: 3 s,
            # against the permit's 10 s hold that bounded B's wait before the fix.
            with anyio.fail_after(3.0):
                while await _held(b.backend, prefix, 1) != [None]:
                    await anyio.sleep(0.05)
            gate = anyio.Event()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(b.hit, probes.make(1, gate))
                with anyio.fail_after(2.0):
                    while probes.running < 1:
                        await anyio.sleep(0.01)
                (held,) = await _held(b.backend, prefix, 1)
                assert held is not None  # B probes on the fleet's permit, not a local one
                assert held.startswith(f"{b.backend._replica}:")
                gate.set()


@contextmanager
def _redis_away(how: str) -> Iterator[tuple[str, object]]:
    """A Redis URL that fails the way ``how`` says, and a callable that makes it fail."""
    if how == "refused":
        yield f"redis://127.0.0.1:{free_port()}/0", lambda: None
        return
    with own_redis() as server:
        process = server._process
        assert process is not None
        if how == "stopped":
            yield server.url, server.stop
            return
        # Paused: the server keeps its connections and answers nothing, so every call times out.
        yield server.url, lambda: os.kill(process.pid, signal.SIGSTOP)
        os.kill(process.pid, signal.SIGCONT)


@pytest.mark.parametrize("how", ["refused", "stopped", "paused"])
async def test_without_redis_each_replica_probes_on_its_local_permits(how: str) -> None:
    """No answer for the fleet permit (connection refused, server gone, server paused: every
    call times out): each replica admits up to ``half_open_max_calls`` probes of its own."""
    with _redis_away(how) as (url, break_redis):
        async with AsyncExitStack() as stack:
            prefix = fresh_prefix()
            replicas = []
            for _ in range(3):
                backend = await stack.enter_async_context(
                    RedisBackend.from_url(url, prefix=prefix, timeout=0.1)
                )
                breaker = CircuitBreaker(
                    "upstream", recovery_timeout=5.0, half_open_max_calls=3, store=backend
                )
                replicas.append(Replica(backend, breaker, []))
            await anyio.sleep(0.2)  # the backends connect (or fail to)
            break_redis()  # type: ignore[operator]
            for r in replicas:
                r.breaker.force_open(0.1)
            await anyio.sleep(0.2)
            probes = Probes(replicas)
            callers = [(i, r) for i, r in enumerate(replicas) for _ in range(5)]
            outcomes = await _all_at_once(callers, probes)
            assert probes.by == {0: 3, 1: 3, 2: 3}  # the local permits, on every replica
            assert (outcomes.count("ok"), outcomes.count("rejected")) == (9, 6)
            for r in replicas:
                assert r.breaker.state is BreakerState.CLOSED
                stats = r.breaker.statistics().fleet
                assert stats is None or not stats.available
