"""RedisBackend: a :class:`~resilient_voice.limiter.BucketStore` on Redis, through coredis.

Every operation is one ``EVALSHA`` of :data:`~._scripts.LIMITER` (one round trip, atomic on the
server, timed by the server's ``TIME``), bounded by ``timeout``. A node that has not cached the
script (first use, after a restart) answers ``NOSCRIPT``, and the call is repeated once as
``EVAL``, on that node only (see ``BreakerFleet._script``).

Key layout: every key of one limiter shares the hash tag ``{<prefix>:<name>}`` (Redis Cluster
puts them in one slot; the script declares each key it touches in ``KEYS``)::

    {rv:twilio:AC...:calls}:b            the schedule of a TokenBucket
    {rv:http_server}:b:<digest>          one client's schedule of a KeyedLimiter
    {rv:http_server}:hb                  heartbeats of the live replicas (a ZSET, 3 s; one
                                         beat per replica and second rides on a call; the
                                         fallback divides by the most counted in a minute,
                                         see :mod:`._replicas`)

A :class:`~resilient_voice.limiter.KeyedLimiter` hands over a digest of each key, never the key
itself, so no client address or phone number reaches the keyspace.

coredis is imported when a backend is built, not when :mod:`resilient_voice` is: the core stays
light, and a missing extra says which one to install.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import anyio

from resilient_voice import _validate
from resilient_voice.limiter._store import Reservation, StoreUnavailableError
from resilient_voice.redis._breaker import BreakerFleet, _FleetState
from resilient_voice.redis._lease_listen import LeaseListener
from resilient_voice.redis._leases import LeaseFleet, LeaseSet
from resilient_voice.redis._replicas import ReplicaPeak
from resilient_voice.redis._scripts import BEAT_S, LIMITER

__all__ = ["RedisBackend"]

_log = logging.getLogger("resilient_voice.redis")
_INSTALL = "RedisBackend needs coredis: pip install 'resilient-voice[redis]'"
_NO_LIMIT = "1e300"  # "no deadline" as the script's tonumber() reads it (it has no inf)


def _coredis() -> Any:
    try:
        import coredis
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return coredis


class RedisBackend(BreakerFleet, LeaseFleet):
    """The shared store of a fleet: limiter schedules in Redis, decided on Redis' clock.

    Build one per process and event loop, after the worker has forked (a connection pool does
    not survive a fork), and pass it as ``store=`` to the primitives that must hold across
    replicas::

        async with RedisBackend.from_url("redis://redis:6379/0") as backend:
            calls = TokenBucket(5, name="twilio:AC...:calls", store=backend)

    Args:
        client: A ``coredis.Redis`` or ``coredis.RedisCluster`` (asyncio and trio), or
            redis-py's ``redis.asyncio.Redis`` (asyncio only; about half coredis' cost per
            call). The caller opens and closes it (``async with client`` for coredis); a
            backend from :meth:`from_url` owns its own coredis client.
        prefix: The first part of every key's hash tag, to separate applications sharing a
            database.
        timeout: Seconds allowed for each call to Redis (> 0). A call that takes longer raises
            :class:`~resilient_voice.limiter.StoreUnavailableError`: slots it may have reserved
            are lost, never granted twice.
        min_replicas: The fewest replicas ``on_backend_error="local"`` assumes while Redis is
            unavailable (an int >= 1): this replica's share is ``rate / replicas`` (``capacity
            // replicas``, at least 1, for call leases), ``replicas`` being the larger of
            ``min_replicas`` and the most replicas Redis reported in the 60 s up to its last
            answer. A replica counts only what Redis told it: one that never got an answer, or
            the first to send a heartbeat at start-up, sees itself alone and would take the
            whole limit. Set it to the number of processes sharing the limits (``uvicorn
            --workers N`` times the Kubernetes ``replicas``) to close that gap. It applies to
            every limiter and lease set of the backend: one used by fewer processes, or a fleet
            scaled below it, gets less than its share while Redis is gone, never more.

    Raises:
        TypeError: ``min_replicas`` not an int (a bool is refused).
        ValueError: ``prefix`` empty or holding ``{``/``}``, ``timeout`` not > 0,
            ``min_replicas`` < 1.
        ImportError: coredis is not installed.

    It is also a :class:`~resilient_voice.breaker.BreakerStore`: ``CircuitBreaker(name,
    store=backend)`` joins the fleet view of that breaker (see :mod:`._breaker`); its
    background task runs while the backend is entered (``async with backend``). And it is a
    :class:`~resilient_voice.leases.LeaseStore`: ``CallLeases(name, capacity, ttl=...,
    store=backend)`` shares one capacity of call slots across replicas (see :mod:`._leases`).
    """

    __slots__ = (
        "_beats",
        "_client",
        "_configs",
        "_conflicts",
        "_errors",
        "_fleet_state",
        "_fleet_tasks",
        "_lease_sets",
        "_lease_state",
        "_live",
        "_min_replicas",
        "_noscript",
        "_owns",
        "_prefix",
        "_redispy",
        "_replica",
        "_timeout",
    )

    def __init__(
        self, client: Any, *, prefix: str = "rv", timeout: float = 0.05, min_replicas: int = 1
    ) -> None:
        if type(client).__module__.split(".")[0] == "redis":
            # redis-py's asyncio client: asyncio only, but about twice as fast per call.
            import redis.asyncio
            import redis.exceptions

            if not isinstance(client, redis.asyncio.Redis | redis.asyncio.RedisCluster):
                raise TypeError(
                    f"a redis-py client must be redis.asyncio.Redis, got {type(client)!r}"
                )
            self._redispy = True
            self._noscript: type[Exception] = redis.exceptions.NoScriptError
            self._errors: tuple[type[Exception], ...] = (redis.exceptions.RedisError, OSError)
        else:
            coredis = _coredis()
            if not isinstance(client, coredis.Redis | coredis.RedisCluster):
                raise TypeError(
                    "client must be a coredis.Redis or coredis.RedisCluster (or redis-py's "
                    f"redis.asyncio.Redis), got {type(client)!r}"
                )
            self._redispy = False
            self._noscript = coredis.exceptions.NoScriptError
            self._errors = (coredis.exceptions.RedisError, OSError)
        _validate.label("prefix", prefix)
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty str without braces, got {prefix!r}")
        _validate.number("timeout", timeout)
        _validate.whole("min_replicas", min_replicas)
        self._client: Any = client
        self._prefix = prefix
        self._timeout = float(timeout)
        self._min_replicas = min_replicas
        self._configs: dict[str, str] = {}
        self._conflicts: set[str] = set()
        self._live: dict[str, ReplicaPeak] = {}
        self._beats: dict[str, float] = {}
        self._replica = uuid.uuid4().hex
        self._owns = False
        self._fleet_state = _FleetState()
        self._fleet_tasks: Any = None
        self._lease_sets: dict[str, LeaseSet] = {}
        self._lease_state = LeaseListener()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "rv",
        timeout: float = 0.05,
        min_replicas: int = 1,
        **options: Any,
    ) -> RedisBackend:
        """A backend with its own ``coredis.Redis`` for ``url`` (``options`` go to coredis).

        Enter it (``async with backend``) before use: coredis opens its connection pool there.
        """
        coredis = _coredis()
        options.setdefault("decode_responses", False)
        client = coredis.Redis.from_url(url, **options)
        backend = cls(client, prefix=prefix, timeout=timeout, min_replicas=min_replicas)
        backend._owns = True
        return backend

    @property
    def client(self) -> Any:
        """The coredis client."""
        return self._client

    @property
    def prefix(self) -> str:
        """The first part of every key's hash tag."""
        return self._prefix

    @property
    def min_replicas(self) -> int:
        """The fewest replicas the local fallback divides by."""
        return self._min_replicas

    async def __aenter__(self) -> Self:
        if self._owns:
            await self._client.__aenter__()
        # The breakers' fleet view: one bounded background task per backend.
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        tasks.start_soon(self._fleet_loop)
        # Call leases' wake-ups: one subscription for every lease set of this backend.
        tasks.start_soon(self._lease_listener)
        # Call leases' tickets: their liveness, refreshed while this process waits.
        tasks.start_soon(self._lease_keeper)
        self._fleet_tasks = tasks
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks, self._fleet_tasks = self._fleet_tasks, None
        if tasks is not None:
            tasks.cancel_scope.cancel()
            await tasks.__aexit__(None, None, None)
        if self._owns:
            await self._client.__aexit__(exc_type, exc, tb)

    def declare(self, name: str, rate: float, burst: float) -> None:
        """Record the configuration a bucket named ``name`` runs with (called by the bucket).

        The script compares it with the one stored beside the schedule, so that two replicas
        configured differently under one name are refused instead of mixing their rates.
        """
        config = f"{rate!r}/{burst!r}"
        known = self._configs.get(name)
        if known is not None and known != config:
            raise ValueError(
                f"limiter name {name!r} is used with rate/burst {known} and {config} on one "
                "shared store: give each configuration its own name"
            )
        self._configs[name] = config

    def key_of(self, key: str) -> str:
        """The Redis key of the store key ``key`` (``name`` or ``name:<digest>``)."""
        return self._locate(key)[1]

    def _locate(self, key: str) -> tuple[str, str, str]:
        """The limiter's name, the Redis key for ``key``, and the configuration declared."""
        config = self._configs.get(key)
        if config is not None:
            return key, f"{{{self._prefix}:{key}}}:b", config
        name, _, digest = key.rpartition(":")
        config = self._configs.get(name)
        if config is not None:
            return name, f"{{{self._prefix}:{name}}}:b:{digest}", config
        return key, f"{{{self._prefix}:{key}}}:b", ""

    def live_replicas(self, key: str) -> int:
        """What ``on_backend_error="local"`` divides ``key``'s limiter's rate by.

        The most replicas with a heartbeat under 3 s old that Redis reported for the limiter
        in the 60 s up to its last answer (:class:`~._replicas.ReplicaPeak`), not only the last
        count: a replica missing from one answer (a stalled loop, a pause in its traffic) still
        serves its share. Never fewer than ``min_replicas`` (1 by default), also before any
        answer.
        """
        peak = self._live.get(self._locate(key)[0])
        return self._min_replicas if peak is None else max(self._min_replicas, peak.most)

    async def _run(self, key: str, args: list[str]) -> list[bytes]:
        """One script call for ``key``, bounded by ``timeout``; Redis' errors mapped."""
        name, redis_key, config = self._locate(key)
        keys = [redis_key, f"{{{self._prefix}:{name}}}:hb"]
        now = time.monotonic()
        beat = now - self._beats.get(name, -BEAT_S) >= BEAT_S
        if beat:
            self._beats[name] = now
        argv = [args[0], config, self._replica if beat else "", *args[1:]]
        try:
            reply = await self._script(LIMITER, keys, argv)
        except TimeoutError as exc:
            raise StoreUnavailableError(f"Redis did not answer within {self._timeout} s") from exc
        except self._errors as exc:
            raise StoreUnavailableError(f"Redis failed: {type(exc).__name__}: {exc}") from exc
        answer: list[bytes] = [x.encode() if isinstance(x, str) else x for x in reply]
        if answer[0] == b"conflict":
            stored = answer[1].decode()
            if key not in self._conflicts:
                self._conflicts.add(key)
                _log.error(
                    "limiter %r: this replica runs rate/burst %s, the shared schedule %s",
                    key,
                    config,
                    stored,
                )
            raise ValueError(
                f"limiter {key!r} runs with rate/burst {config} here but {stored} in another "
                "replica sharing this Redis: give each configuration its own name"
            )
        if answer[4]:
            peak = self._live.get(name)
            if peak is None:
                peak = self._live[name] = ReplicaPeak()
            peak.seen(int(answer[4]))
        return answer

    async def reserve(
        self, key: str, costs: Sequence[float], limits: Sequence[float], tau: float
    ) -> Reservation:
        args = ["r", repr(tau)]
        for cost, limit in zip(costs, limits, strict=True):
            args.append(repr(cost))
            args.append(repr(limit) if limit < 1e300 else _NO_LIMIT)
        answer = await self._run(key, args)
        now, full = float(answer[1]), float(answer[2])
        refused = float(answer[3]) if answer[3] else None
        delays = tuple(float(d) for d in answer[5:])
        return Reservation(delays, refused, max(0.0, full - now), full)

    async def give_back(self, key: str, cost: float, end: float) -> bool:
        answer = await self._run(key, ["g", repr(cost), repr(end)])
        return bool(answer[3])

    async def pause(self, key: str, seconds: float) -> Reservation:
        answer = await self._run(key, ["p", repr(seconds)])
        now, full = float(answer[1]), float(answer[2])
        return Reservation((), None, max(0.0, full - now), full)

    def __repr__(self) -> str:
        return (
            f"RedisBackend(prefix={self._prefix!r}, timeout={self._timeout!r}, "
            f"min_replicas={self._min_replicas!r})"
        )
