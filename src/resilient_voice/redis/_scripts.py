"""The Lua script behind :class:`~resilient_voice.redis.RedisBackend`'s limiter.

One script for the three operations of the store seam, so that one cached script covers them
and a node that lost its cache (``NOSCRIPT``) costs one ``EVAL``. It computes exactly what
:mod:`resilient_voice.limiter._gcra` computes (the same IEEE double operations in the same
order), on the server's clock (``TIME``), so clock skew between replicas changes nothing.

The schedule of one bucket is a hash: ``f``, the time it is full again (server seconds), and
``c``, the configuration of the replica that wrote it. A caller whose configuration differs
while the schedule is alive is refused (``conflict``): two rates under one name would otherwise
mix silently. The hash expires ``IDLE_TTL_MS`` after the bucket is full again.

A call that carries a replica id (at most one per limiter and second, see ``BEAT_S``) also writes
this replica's heartbeat into the limiter's ZSET of live replicas (scored by server time,
members older than ``HEARTBEAT_S`` dropped) and answers how many are live: what a replica
divides the rate by when Redis becomes unavailable (``on_backend_error="local"``), the most of
these answers within a minute (:mod:`._replicas`).

Numbers travel as strings: Redis turns a Lua number in a reply into an integer, and
``%.17g`` round-trips a double exactly, so the ``end`` a replica hands back to ``give_back``
compares equal to the stored value only if nobody reserved since.
"""

from __future__ import annotations

__all__ = ["BEAT_S", "HEARTBEAT_S", "IDLE_TTL_MS", "LIMITER"]

IDLE_TTL_MS = 60_000
"""How long a full bucket's schedule (and its configuration) stays in Redis."""

HEARTBEAT_S = 3
"""Seconds a replica counts as live after its last heartbeat (the fallback's share of the limit)."""

BEAT_S = 1.0
"""Least seconds between two heartbeats of one replica for one limiter (they ride on calls)."""

LIMITER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = KEYS[1]
local op = ARGV[1]
local cfg = ARGV[2]
local live = ''
if ARGV[3] ~= '' then
  local hb = KEYS[2]
  redis.call('ZADD', hb, now, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', hb, '-inf', now - HEARTBEAT_S)
  redis.call('PEXPIRE', hb, HEARTBEAT_S * 1000)
  live = tostring(redis.call('ZCARD', hb))
end
local stored = redis.call('HMGET', key, 'f', 'c')
if stored[2] and stored[2] ~= '' and cfg ~= '' and stored[2] ~= cfg then
  return {'conflict', stored[2]}
end
if cfg == '' and stored[2] then cfg = stored[2] end
local full = tonumber(stored[1]) or 0
local function fmt(x) return string.format('%.17g', x) end
local function save(f)
  if f > now then
    redis.call('HSET', key, 'f', fmt(f), 'c', cfg)
    redis.call('PEXPIRE', key, math.ceil((f - now) * 1000) + IDLE_TTL)
  elseif stored[1] then
    redis.call('HSET', key, 'f', fmt(f), 'c', cfg)
    redis.call('PEXPIRE', key, IDLE_TTL)
  end
end
if op == 'r' then
  local tau = tonumber(ARGV[4])
  local delays = {}
  local refused = ''
  for i = 5, #ARGV, 2 do
    local cost = tonumber(ARGV[i])
    local delay = full + cost - tau - now
    if delay < 0 then delay = 0 end
    if delay > tonumber(ARGV[i + 1]) then
      refused = fmt(delay)
      break
    end
    local at = now + delay
    if full > at then full = full + cost else full = at + cost end
    delays[#delays + 1] = fmt(delay)
  end
  save(full)
  return {'ok', fmt(now), fmt(full), refused, live, unpack(delays)}
elseif op == 'g' then
  if stored[1] and tonumber(stored[1]) == tonumber(ARGV[5]) then
    save(full - tonumber(ARGV[4]))
    return {'ok', fmt(now), fmt(full - tonumber(ARGV[4])), '1', live}
  end
  return {'ok', fmt(now), fmt(full), '', live}
else
  local until_ = now + tonumber(ARGV[4])
  if until_ > full then full = until_ end
  save(full)
  return {'ok', fmt(now), fmt(full), '', live}
end
""".replace("IDLE_TTL", str(IDLE_TTL_MS)).replace("HEARTBEAT_S", str(HEARTBEAT_S))
