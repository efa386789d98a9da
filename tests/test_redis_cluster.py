"""The shared primitives on a real Redis Cluster: three masters of this module's own, on loopback.

The cluster (3 masters, no replicas, on free ports) is started once for the module and torn down
at its end. Every test reaches it through ``RedisBackend(coredis.RedisCluster(...))``, as
docs/scale-out.md tells users to. Real time, bounded; the tolerances are stated at each bound.
"""

from __future__ import annotations

import gc
import logging
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import coredis
import pytest

from _redis import COREDIS_CANCEL_LEAK, collect_coredis_garbage, fresh_prefix
from resilient_voice import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    KeyedLimiter,
    TokenBucket,
)
from resilient_voice.events import Event, FleetStateChanged, StoreAvailabilityChanged
from resilient_voice.redis import RedisBackend

pytestmark = [COREDIS_CANCEL_LEAK, pytest.mark.slow]
__all__ = ["collect_coredis_garbage"]  # an autouse fixture, used by being here
_log = logging.getLogger(__name__)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Cluster:
    """Three redis-server masters in cluster mode; one can be killed and restarted."""

    def __init__(self, server: str, cli: str) -> None:
        self._server, self._cli = server, cli
        self.dir = tempfile.mkdtemp(prefix="rv-cluster-")
        self.ports: list[int] = []
        # The cluster bus listens on port + 10000: both must be free and below 65536.
        while len(self.ports) < 3:
            port = random.randint(20_000, 55_000)
            if port not in self.ports and _port_free(port) and _port_free(port + 10_000):
                self.ports.append(port)
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self.slots: dict[int, list[tuple[int, int]]] = {}

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(
            [self._cli, "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout

    def start_node(self, port: int) -> None:
        self._processes[port] = subprocess.Popen(
            [
                self._server,
                "--port", str(port),
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"{self.dir}/nodes-{port}.conf",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--bind", "127.0.0.1",
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while "PONG" not in self.cli(port, "ping"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {port} did not start")
            time.sleep(0.05)

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        created = subprocess.run(
            [
                self._cli, "--cluster", "create",
                *[f"127.0.0.1:{port}" for port in self.ports],
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        self.wait_ok()
        for line in self.cli(self.ports[0], "cluster", "nodes").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            self.slots[port] = [
                (int(r.split("-")[0]), int(r.split("-")[-1])) for r in fields[8:] if "[" not in r
            ]

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(
            "cluster_state:ok" in self.cli(port, "cluster", "info") for port in self.ports
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def owner(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        return next(p for p, ranges in self.slots.items() for a, b in ranges if a <= slot <= b)

    def kill(self, port: int) -> None:
        process = self._processes.pop(port)
        process.kill()
        process.wait(5)

    def stop(self) -> None:
        for port in list(self._processes):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert server is not None, "redis-server is not installed"
    assert cli is not None, "redis-cli is not installed"
    nodes = Cluster(server, cli)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def _client(cluster: Cluster) -> Any:
    # Every master as a startup node: a client built while one is down still finds the others.
    nodes = [{"host": "127.0.0.1", "port": port} for port in cluster.ports]
    return coredis.RedisCluster(startup_nodes=nodes, decode_responses=False)


@asynccontextmanager
async def _two_replicas(cluster: Cluster) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Two backends under one prefix, each with its own cluster client: two replicas.

    Not a fixture: pytest holds a fixture's value until every teardown has run, so coredis'
    leftover streams (see COREDIS_CANCEL_LEAK) could only be collected after the last test,
    where no filter applies. Each test collects them itself, under the module's filter.
    """
    prefix = fresh_prefix()
    async with AsyncExitStack() as stack:
        backends = []
        for _ in range(2):
            client = await stack.enter_async_context(_client(cluster))
            backends.append(
                await stack.enter_async_context(RedisBackend(client, prefix=prefix, timeout=1.0))
            )
        yield backends[0], backends[1]


async def _slot(backend: RedisBackend, key: str) -> int:
    return int(await backend.client.cluster_keyslot(key))


def _most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    most = j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        most = max(most, j - i)
    return most


async def test_limiters_spread_over_the_shards_each_on_one_slot(
    cluster: Cluster,
) -> None:
    async with _two_replicas(cluster) as replicas:
        backend, _ = replicas
        events: list[Event] = []
        owners: set[int] = set()
        # Names are taken in order until every master serves at least one (CLUSTER KEYSLOT says
        # which); the prefix is random, so which names those are changes from run to run.
        for i in range(64):
            if owners == set(cluster.ports) and i >= 6:
                break
            name = f"limiter-{i}"
            bucket = TokenBucket(100, 2, name=name, store=backend, listeners=[events.append])
            await bucket.acquire()
            key = backend.key_of(name)
            slot = await _slot(backend, key)
            # The schedule and the heartbeats of one limiter share its hash tag, hence its slot.
            assert await _slot(backend, f"{{{backend.prefix}:{name}}}:hb") == slot
            assert await backend.client.exists([key]) == 1
            owners.add(cluster.owner(slot))
        assert owners == set(cluster.ports)
        keyed = KeyedLimiter(100, 2, name="per-client", store=backend, listeners=[events.append])
        for client in ("203.0.113.7", "198.51.100.9", "+14155550100"):
            await keyed.acquire(client)
        digest_key = backend.key_of("per-client:abc")
        assert await _slot(backend, digest_key) == await _slot(
            backend, backend.key_of("per-client")
        )
        # Every call went to the cluster: a CROSSSLOT or any other error would have been a fallback.
        assert not any(isinstance(e, StoreAvailabilityChanged) for e in events)
    gc.collect()  # coredis' streams, under the module's filter


async def test_two_replicas_share_one_bucket_and_one_keyed_limit(
    cluster: Cluster,
) -> None:
    async with _two_replicas(cluster) as replicas:
        events: list[Event] = []
        buckets = [
            TokenBucket(20, 1, name="cps", store=b, listeners=[events.append]) for b in replicas
        ]
        keyed = [
            KeyedLimiter(10, 1, name="inbound", store=b, listeners=[events.append])
            for b in replicas
        ]
        bucket_grants: list[float] = []
        keyed_grants: list[float] = []
        start = time.monotonic()
        end = start + 3.0

        async def take(acquire: Any, grants: list[float]) -> None:
            while time.monotonic() < end:
                await acquire()
                grants.append(time.monotonic() - start)

        async with anyio.create_task_group() as tasks:
            for i in range(6):  # three tasks per replica and limiter
                bucket, limiter = buckets[i % 2], keyed[i % 2]
                tasks.start_soon(take, bucket.acquire, bucket_grants)
                tasks.start_soon(take, partial(limiter.acquire, "one client"), keyed_grants)
        # Combined, the two replicas hold one rate: at most rate + burst in any 1 s window, +1
        # for a wake-up at the window's edge; at least 90 % of the 1 + rate * T allowed (the
        # machine is loaded).
        for grants, rate in ((bucket_grants, 20), (keyed_grants, 10)):
            assert _most_in_one_second(grants) <= rate + 1 + 1, (rate, _most_in_one_second(grants))
            assert len(grants) <= 1 + rate * 3.0 + 2 + 6  # each task may land one grant past `end`
            assert len(grants) >= 0.9 * (1 + rate * 3.0), (rate, len(grants))
        # Shared on the cluster throughout, never each replica's local share.
        assert not any(isinstance(e, StoreAvailabilityChanged) for e in events)
    gc.collect()  # coredis' streams, under the module's filter


async def _boom() -> None:
    raise ConnectionError("upstream down")


async def _hit(breaker: CircuitBreaker, fn: Any) -> str:
    try:
        await breaker.call(fn)
    except CircuitOpenError:
        return "rejected"
    except ConnectionError:
        return "failed"
    return "ok"


async def test_the_fleet_breaker_view_and_its_probe_permit(
    cluster: Cluster,
) -> None:
    async with _two_replicas(cluster) as replicas:
        events: list[Event] = []
        busy, quiet = (
            CircuitBreaker(
                "upstream",
                window_duration=5.0,
                minimum_calls=10,
                failure_rate_threshold=0.5,
                recovery_timeout=30.0,
                store=backend,
                listeners=[events.append] if i else [],
            )
            for i, backend in enumerate(replicas)
        )
        # The busy replica fails 50 times a second, the quiet one twice: alone it would need ~5 s.
        tripped = followed = None
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < 6 and followed is None:
            await _hit(busy, _boom)
            if tripped is None and busy.state is BreakerState.OPEN:
                tripped = time.monotonic()
            if tick % 25 == 0 and await _hit(quiet, _boom) == "rejected":
                followed = time.monotonic()
            tick += 1
            await anyio.sleep(0.02)
        assert tripped is not None
        assert followed is not None
        # Tolerance: the bound, 2 s (one 1 s tick plus the next call at 2/s, 0.5 s).
        assert followed - tripped < 2.0
        assert any(isinstance(e, FleetStateChanged) and e.rule == "rate" for e in events)
        stats = quiet.statistics().fleet
        assert stats is not None
        assert stats.live == 2

        # Half-open: exactly half_open_max_calls (1) probe fleet-wide, by a permit on the cluster.
        for breaker in (busy, quiet):
            breaker.force_open(0.3)
        await anyio.sleep(1.0)  # published (a tick) and both open periods run out
        probes = 0

        async def slow_probe() -> None:
            nonlocal probes
            probes += 1
            await anyio.sleep(0.3)

        outcomes: list[str] = []

        async def probe(breaker: CircuitBreaker) -> None:
            outcomes.append(await _hit(breaker, slow_probe))

        async with anyio.create_task_group() as tasks:
            for breaker in (busy, quiet):
                for _ in range(3):
                    tasks.start_soon(probe, breaker)
        assert probes == 1
        assert outcomes.count("ok") == 1
        assert not any(
            isinstance(e, StoreAvailabilityChanged) for e in events
        )  # the permit came from the cluster, not a local fallback
    gc.collect()  # coredis' streams, under the module's filter


async def test_a_master_restart_falls_back_and_resumes_and_spares_the_other_shards(
    cluster: Cluster,
) -> None:
    prefix = fresh_prefix()
    events: list[tuple[str, float, StoreAvailabilityChanged]] = []
    start = time.monotonic()

    def listen(name: str) -> Any:
        def listener(event: Event) -> None:
            if isinstance(event, StoreAvailabilityChanged):
                events.append((name, time.monotonic() - start, event))

        return listener

    # 0.25 s rather than the default 0.05 s: a loaded machine must not look like an outage.
    async with (
        _client(cluster) as client,
        RedisBackend(client, prefix=prefix, timeout=0.25) as backend,
    ):
        # Two limiters on different masters (CLUSTER KEYSLOT): one will lose its master.
        names: dict[int, str] = {}
        for i in range(40):
            backend.declare(f"cps-{i}", 20.0, 1.0)
            port = cluster.owner(await _slot(backend, backend.key_of(f"cps-{i}")))
            names.setdefault(port, f"cps-{i}")
        victim, other = cluster.ports[0], cluster.ports[1]
        breakers: dict[int, str] = {}
        for i in range(40):
            tag = f"{{{prefix}:breaker:upstream-{i}}}"
            breakers.setdefault(cluster.owner(await _slot(backend, tag)), f"upstream-{i}")
        hit = TokenBucket(20, 1, name=names[victim], store=backend, listeners=[listen("hit")])
        spared = TokenBucket(20, 1, name=names[other], store=backend, listeners=[listen("spared")])
        grants: dict[str, list[float]] = {"hit": [], "spared": []}
        errors: list[BaseException] = []
        done = anyio.Event()

        async def caller(name: str, bucket: TokenBucket) -> None:
            while not done.is_set():
                try:
                    await bucket.acquire()
                except Exception as error:  # asserted empty below
                    errors.append(error)
                    await anyio.sleep(0.01)
                else:
                    grants[name].append(time.monotonic() - start)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(caller, "hit", hit)
            tasks.start_soon(caller, "spared", spared)
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(cluster.kill, victim)
            killed = time.monotonic() - start
            with anyio.fail_after(2.0):  # one timeout (0.25 s) and the next grant, loaded
                while not any(name == "hit" for name, _, _ in events):
                    await anyio.sleep(0.02)
            # While the master is down, a replica starting now (its first call on each
            # node) still shares the limiters of the healthy shards.
            async with (
                _client(cluster) as late_client,
                RedisBackend(late_client, prefix=prefix, timeout=0.25) as late,
            ):
                newcomer: list[Event] = []
                bucket = TokenBucket(20, 1, name=names[other], store=late,
                                             listeners=[newcomer.append])  # fmt: skip
                for _ in range(3):
                    await bucket.acquire()
                assert not any(isinstance(e, StoreAvailabilityChanged) for e in newcomer)
                # Its breakers on a healthy shard take their probe permits from the
                # cluster (True), not locally (None).
                probing = CircuitBreaker(breakers[other], store=late)
                assert await late.probe_permit(probing.name, 1) is True
            down_for = time.monotonic() - start - killed
            await anyio.to_thread.run_sync(cluster.start_node, victim)
            await anyio.to_thread.run_sync(cluster.wait_ok)
            ok_at = time.monotonic() - start
            # Re-probes back off 0.5, 1, 2, 4, 8 s (±20 %) from the fallback: the return
            # comes at most one step (9.6 s) after the cluster is whole again.
            with anyio.fail_after(9.6):
                while len([e for name, _, e in events if name == "hit"]) < 2:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.5)
            done.set()
        resumed = await client.exists([backend.key_of(names[victim])])
    # The limiters keep the last error (its traceback holds coredis' cut-off streams): drop
    # them, then collect, so that the streams warn here, under the module's filter.
    del hit, spared, bucket, backend, client, late, late_client
    gc.collect()
    assert errors == []  # nothing escaped acquire
    hit_changes = [(e.available, e.fallback) for name, _, e in events if name == "hit"]
    assert hit_changes == [(False, "local"), (True, "local")]
    # The other master's limiter: coredis may send one call of it to the dead node while it
    # refreshes its view of the cluster (seen in about 1 run of 3); that limiter then falls back
    # once and is back by its first re-probe. Never more than one round trip of it.
    spared_changes = [(e.available, t) for name, t, e in events if name == "spared"]
    assert [a for a, _ in spared_changes] in ([], [False, True]), spared_changes
    if spared_changes:
        # Its first re-probe (0.5 s, +20 %) plus a timeout (0.25 s) and slack for the load.
        assert spared_changes[1][1] - spared_changes[0][1] < 2.0, spared_changes
    fell_back, returned = (t for name, t, _ in events if name == "hit")
    # The fallback applied: the replica (the only live one) kept granting while its master was
    # down. At least 5 grants (20/s is its share; a loaded machine stalls the loop for up to a
    # second at times, so the bound is loose: it tells "local fallback" from "nothing").
    during = [t for t in grants["hit"] if fell_back < t < fell_back + 0.2 + down_for]
    assert len(during) >= 5, (len(during), down_for)
    assert _most_in_one_second(grants["hit"]) <= 20 + 1 + 1
    assert _most_in_one_second(grants["spared"]) <= 20 + 1 + 1
    assert resumed == 1  # the shared schedule is back on the restarted master
    _log.warning(
        "fell back %.2f s after the kill; back %.2f s after cluster_state:ok (master down %.2f s)",
        fell_back - killed,
        returned - ok_at,
        down_for,
    )
