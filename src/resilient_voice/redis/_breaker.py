"""The breaker side of :class:`~resilient_voice.redis.RedisBackend`: the fleet view.

A breaker built with ``store=backend`` never waits on Redis on its closed path. The backend
keeps the breakers (weakly) and runs one background task (started by ``async with backend``)
that, about once a second and at once after any transition, makes one script call per breaker:
it writes this replica's summary (state, whether the fleet opened it, window calls and
failures) with a heartbeat, drops replicas whose heartbeat expired, and reads back the others'
summaries, which the breaker judges locally (:mod:`resilient_voice.breaker._fleet`).

Keys of breaker ``name``, all under the hash tag ``{<prefix>:breaker:<name>}``::

    ...:r       ZSET replica -> heartbeat (server time); members older than HEARTBEAT_S dropped
    ...:s       HASH replica -> "open|fleet_opened|calls|failures"
    ...:p:<i>   probe permit i of half_open_max_calls (SET PX, value "<replica>:<epoch>")
    ...:c       channel: a summary whose state changed (or a new replica) is announced here, so
                every replica reads the view at once instead of at its next tick

The announcements travel on the backend's one Pub/Sub connection (the one that wakes lease
waiters); when it is down, the once-a-second tick still brings every change.

When Redis is slow or gone, every call is bounded by the backend's ``timeout``; the breaker keeps
deciding on its own window, one log line is written per transition of availability, and the
fleet view resumes with the next answer.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from typing import TYPE_CHECKING, Any

import anyio

from resilient_voice.breaker._fleet import ReplicaSummary
from resilient_voice.events import BreakerState, StoreAvailabilityChanged, dispatch
from resilient_voice.redis._lease_listen import LeaseListener

if TYPE_CHECKING:
    from resilient_voice.breaker._facade import CircuitBreaker

__all__ = ["FLEET_TICK_S", "BreakerFleet"]

_log = logging.getLogger("resilient_voice.redis")

FLEET_TICK_S = 1.0
"""Seconds between two summaries of one replica (a transition is published at once)."""

FLEET_HEARTBEAT_S = 3.0
"""Seconds a replica counts as live after its last summary."""

FLEET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
for _, r in ipairs(dead) do redis.call('HDEL', KEYS[2], r) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old or string.sub(old, 1, 3) ~= string.sub(ARGV[2], 1, 3) then
  redis.call('PUBLISH', ARGV[4], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 1000))
return redis.call('HGETALL', KEYS[2])
"""

# ARGV: this replica's stamp prefix, the new stamp, the hold (ms), and how many of this replica's
# permits are busy (probes running or being asked for). One of its own beyond those is taken
# again before a free one, so a replica's finished probe never waits for its permit's expiry.
PERMIT = """
local mine, free = 0, nil
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if not v then
    free = free or KEYS[i]
  elseif string.sub(v, 1, #ARGV[1]) == ARGV[1] then
    mine = mine + 1
    if mine > tonumber(ARGV[4]) then
      redis.call('SET', KEYS[i], ARGV[2], 'PX', ARGV[3])
      return 1
    end
  end
end
if free then
  redis.call('SET', free, ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# ARGV: this replica's stamp prefix, and the epoch it left half-open in: only its permits
# stamped before that epoch are deleted, never one taken since for its next half-open period.
RELEASE = """
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
    local epoch = tonumber(string.sub(v, #ARGV[1] + 1))
    if epoch and epoch < tonumber(ARGV[2]) then redis.call('DEL', KEYS[i]) end
  end
end
return 0
"""


class BreakerFleet:
    """The :class:`~resilient_voice.breaker.BreakerStore` half of the Redis backend."""

    __slots__ = ()

    # Provided by RedisBackend.
    _client: Any
    _prefix: str
    _timeout: float
    _replica: str
    _errors: tuple[type[Exception], ...]
    _noscript: type[Exception]
    _redispy: bool
    _fleet_state: _FleetState
    _lease_state: LeaseListener

    def attach(self, breaker: CircuitBreaker) -> None:
        """Serve ``breaker`` from this backend's background task (it is kept weakly)."""
        fleet = self._fleet_state
        fleet.breakers[breaker.name] = breaker
        # Another replica's transition wakes the background task (one more tick, no more).
        listener = self._lease_state
        channel = self._channel(breaker.name)
        listener.wakers.setdefault(channel, set()).add(fleet.poke)
        listener.declared.add(channel)
        listener.poke()
        fleet.poke()

    def state_changed(self, name: str, epoch: int, old: BreakerState, new: BreakerState) -> None:
        """Publish at once: wake the background task (never blocks or raises).

        Leaving half-open queues the release of this replica's probe permits, up to ``epoch``
        (the new state's): the release may run after the replica has taken permits for its
        next half-open period, which it must leave in place.
        """
        fleet = self._fleet_state
        if old is BreakerState.HALF_OPEN and new is not BreakerState.HALF_OPEN:
            fleet.release[name] = max(epoch, fleet.release.get(name, epoch))
        fleet.poke()

    async def probe_permit(self, name: str, epoch: int) -> bool | None:
        """One of the fleet's ``half_open_max_calls`` probe permits, in one bounded call.

        A permit stays this replica's until it leaves half-open (or the permit expires), also
        once its probe has finished: the probe's outcome is not sent to Redis. The replica takes
        one of its own permits again when it holds more than it has probes running or asking
        (a probe that succeeded short of ``success_threshold``, or was cancelled, left one
        behind); otherwise a free one. Without that reuse, a replica needing more successful
        probes than it holds permits waited for their expiry (``recovery_timeout``) each time.
        """
        fleet = self._fleet_state
        breaker = fleet.breakers.get(name)
        if breaker is None:
            return None
        config = breaker.config
        hold = config.max_wait_in_half_open or config.recovery_timeout
        keys = [f"{self._tag(name)}:p:{i}" for i in range(config.half_open_max_calls)]
        asking = fleet.asking.get(name, 0)
        busy = breaker.statistics().half_open_calls + asking
        fleet.asking[name] = asking + 1
        try:
            reply = await self._script(
                PERMIT,
                keys,
                [f"{self._replica}:", f"{self._replica}:{epoch}", str(int(hold * 1000)), str(busy)],
            )
        except Exception as exc:  # noqa: BLE001 - any failure means "probe on the local permit"
            self._fleet_down(exc)
            return None
        finally:
            fleet.asking[name] -= 1
        return bool(int(reply))

    def _tag(self, name: str) -> str:
        return f"{{{self._prefix}:breaker:{name}}}"

    def _channel(self, name: str) -> str:
        return f"{self._tag(name)}:c"

    async def _script(self, script: str, keys: list[str], argv: list[str]) -> Any:
        """One bounded ``EVALSHA`` of ``script``; ``EVAL`` when the node has not cached it.

        The digest is computed here, never asked of Redis: ``SCRIPT LOAD`` goes to every node
        of a cluster and fails while any one is down, which would cut off the healthy shards
        too. ``EVAL`` goes where ``keys`` live and caches the script there (first use, after a
        restart, on a node that took over the slot).
        """
        shas = self._fleet_state.shas
        sha = shas.get(script)
        if sha is None:
            sha = shas[script] = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324
        with anyio.fail_after(self._timeout):
            try:
                if self._redispy:
                    return await self._client.evalsha(sha, len(keys), *keys, *argv)
                return await self._client.evalsha(sha, keys=keys, args=argv)
            except self._noscript:
                if self._redispy:
                    return await self._client.eval(script, len(keys), *keys, *argv)
                return await self._client.eval(script, keys=keys, args=argv)

    def _fleet_down(self, exc: BaseException) -> None:
        fleet = self._fleet_state
        for breaker in list(fleet.breakers.values()):
            breaker._fleet_unavailable()
        if fleet.available:
            fleet.available = False
            _log.warning(
                "breaker fleet view unavailable (%s: %s); each breaker decides locally",
                type(exc).__name__,
                exc,
            )
            self._fleet_event(False)

    def _fleet_up(self) -> None:
        fleet = self._fleet_state
        if not fleet.available:
            fleet.available = True
            _log.warning("breaker fleet view available again")
            self._fleet_event(True)

    def _fleet_event(self, available: bool) -> None:
        for breaker in list(self._fleet_state.breakers.values()):
            if breaker._listeners:
                dispatch(
                    breaker._listeners,
                    StoreAvailabilityChanged(breaker.name, available, "local", "breaker"),
                )

    async def _fleet_loop(self) -> None:
        """The background task: publish and read every attached breaker's summary."""
        fleet = self._fleet_state
        while True:
            fleet.wake = anyio.Event()
            for name, breaker in list(fleet.breakers.items()):
                await self._fleet_tick(name, breaker)
            with anyio.move_on_after(FLEET_TICK_S):
                await fleet.wake.wait()

    async def _fleet_tick(self, name: str, breaker: CircuitBreaker) -> None:
        fleet = self._fleet_state
        tag = self._tag(name)
        try:
            until = fleet.release.pop(name, None)
            if until is not None:
                keys = [f"{tag}:p:{i}" for i in range(breaker.config.half_open_max_calls)]
                try:
                    await self._script(RELEASE, keys, [f"{self._replica}:", str(until)])
                except Exception:
                    # Tried again at the next tick: an epoch-bounded release stays safe late.
                    fleet.release[name] = max(until, fleet.release.get(name, until))
                    raise
            opened, fleet_opened, calls, failures = breaker._fleet_summary()
            summary = f"{int(opened)}|{int(fleet_opened)}|{calls}|{failures}"
            reply = await self._script(
                FLEET,
                [f"{tag}:r", f"{tag}:s"],
                [self._replica, summary, repr(FLEET_HEARTBEAT_S), self._channel(name)],
            )
        except Exception as exc:  # noqa: BLE001 - Redis slow or gone: the breaker stays local
            self._fleet_down(exc)
            return
        self._fleet_up()
        summaries = []
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
        for replica, value in zip(items[::2], items[1::2], strict=True):
            o, f, c, e = value.split("|")
            summaries.append(ReplicaSummary(replica, o == "1", f == "1", int(c), int(e)))
        try:
            breaker._fleet_apply(summaries, self._replica, FLEET_TICK_S)
        except RuntimeError:
            # Another running loop holds the breaker's permits (a breaker shared across loops,
            # against docs/breaker.md): skip this tick rather than end the task for everyone.
            return


class _FleetState:
    """The fleet half's mutable state (one per backend)."""

    __slots__ = ("asking", "available", "breakers", "release", "shas", "wake")

    def __init__(self) -> None:
        self.breakers: weakref.WeakValueDictionary[str, CircuitBreaker] = (
            weakref.WeakValueDictionary()
        )
        # Built by the background task (an anyio.Event needs a running loop); None before.
        self.wake: anyio.Event | None = None
        # Breakers whose probe permits to release, with the epoch they left half-open in.
        self.release: dict[str, int] = {}
        # Probe permits being asked for, per breaker: each counts as busy for the next asker.
        self.asking: dict[str, int] = {}
        self.shas: dict[str, str] = {}
        self.available = True

    def poke(self) -> None:
        """Wake the background task now (a transition to publish)."""
        if self.wake is not None:
            self.wake.set()
