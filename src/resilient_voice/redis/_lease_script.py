"""The Lua script behind :class:`~resilient_voice.redis.RedisBackend`'s call leases.

One script for every operation on a lease set, so that one cached script (one ``EVAL`` per node)
covers them and each operation is atomic on the server (no check-then-act: an acquire counts and
adds in one step).
It applies exactly the rules of :class:`resilient_voice.leases._core.LeaseTable`, on the
server's clock (``TIME``), so clock skew between replicas changes nothing.

Keys of set ``name``, all under the hash tag ``{<prefix>:leases:<name>}`` and all declared in
``KEYS`` (Redis Cluster puts them in one slot)::

    ...:z    ZSET lease id -> expiry (server seconds): what is held; ZCARD is in use
    ...:l    HASH lease id -> "generation|acquired|bound|call id|attempt id|marked|context":
             the last two set with the attempt id by an unknown mark (when, on the server's
             clock, and the client's context, which may hold ``|``: it is the rest of the
             record); a record of five fields (an older release) reads with both empty
    ...:c    HASH call id -> lease id (the bindings a webhook releases by)
    ...:ez   ZSET call id -> expiry of a release that came before its bind (receive time + ttl)
    ...:eg   HASH call id -> that release's generation ("" for any)
    ...:s    HASH g (the generation counter), b and t (the learned capacity and when it was
             set), cfg (capacity/ttl/recovery, to refuse replicas configured differently),
             i (the incarnation: Redis' time when the script created the hash), h (until when
             a set forgotten by Redis grants nothing, set by the first restore)
    ...:hb   ZSET replica -> heartbeat (what ``on_backend_error="local"`` divides by)
    ...:q    ZSET of waiters' tickets, all scored 0 so that they sort by name: a ticket is
             16 hex digits of the priority (higher first) then 16 decimal digits of a sequence
             (``HINCRBY ...:s q``): the fleet's order of waiters
    ...:qd   ZSET ticket -> liveness deadline (server seconds, refreshed by its process)

An acquire (op ``q``) is granted in the fleet's order of waiters: with a ticket, only while
fewer live tickets rank ahead of it than slots are free; without one, only while more slots are
free than live tickets outrank it (a newcomer never jumps the queue). A refused acquire that will
wait gets its ticket in the same step. Tickets past their liveness deadline (a crashed process)
are dropped by the next ``q``, ``k`` or ``x``; a dropped or left ticket publishes on the channel
when a slot is free, so that the waiters behind it ask again.

A release publishes on the channel ``...:w`` so that waiting replicas ask again at once (a lost
message costs at most the waiter's bounded poll); the message is ``t`` and the server time, so
that a waiter refused at a later time knows the message is not news to it. The lease keys expire
``ttl`` plus a minute after their last write; ``...:s`` does not expire, so generations keep
growing.

Every call names, after its op (``a:<incarnation>``), the incarnation its process last saw
("" for none yet); when the set has another one (Redis forgot the set, its state hash included,
and a call recreated it), the script does nothing and answers ``lost`` and the incarnation, so
no operation runs on a set that lacks the leases its process holds. Op ``P`` restores them:
groups of (id, generation, age, bound age, call id, attempt id, marked age, context) after the
hold; a lease is inserted only while absent and younger than ``ttl`` (expiring ``ttl`` after its
acquire, on this server's clock), with its binding unless the call id is bound to another
lease meanwhile; the generation counter is raised above every restored generation; the first
restore of an incarnation starts the hold (``RESTORE_HOLD_S``) during which nothing is granted,
time for the other replicas to restore theirs. Op ``H`` answers which of the given lease ids the
set no longer holds (released elsewhere, reclaimed).

Every answer starts with the same header: ``ok``, in use, effective capacity, seconds to the next
change (a TTL running out, a step of recovery, the end of the restore hold; "" for none), seconds
to the first expiry, live replicas (heartbeats under 3 s old; a replica beats at most once a
second), the count of leases this call reclaimed by TTL, the server time of the answer (replies of
concurrent calls may arrive out of order: the newest view wins), the incarnation, then the
reclaimed leases' (id, call id) pairs; the operation's own results follow.

Early releases follow the table's rule: one is recorded only while a held lease is unbound (of
its generation, when it names one), and dropped once every lease acquired at or before it was
received is bound, released or reclaimed (``forget_early``, after each bind, release and
reclaim, a scan of the lease records only while an early release is kept).

Over 400 lines: it is one Lua script, and one script on purpose (one cached ``EVALSHA`` per node,
each operation atomic on the server); its operations share the locals and helpers defined at its
top, so splitting it would mean concatenating fragments that only work together.
"""

from __future__ import annotations

from resilient_voice.redis._scripts import HEARTBEAT_S

__all__ = [
    "HELD_SWEEP_S",
    "LEASES",
    "LEASE_IDLE_MS",
    "RESTORE_HOLD_S",
    "TICKET_EXPIRY_S",
    "TICKET_REFRESH_S",
]

HELD_SWEEP_S = 30.0
"""How often a backend holding leases asks which of them the set still holds (op ``H``, one call
per set), to forget those released by other replicas (a webhook received elsewhere) before a
loss would make it restore them; sooner when it remembers more leases than the capacity."""

RESTORE_HOLD_S = 6.0
"""How long a lease set forgotten by Redis grants nothing once a replica noticed: the time the
other replicas need to restore the leases they hold (their listener reconnects within its
backoff, at most 4 s, and their keeper then checks within a second)."""

TICKET_REFRESH_S = 1.0
"""How often a backend refreshes the liveness of its waiters' tickets (one call per set)."""

TICKET_EXPIRY_S = 3.0
"""How long a ticket stays live without a refresh: three refresh periods, so a slow answer or
two does not drop a live waiter, while a crashed process blocks the queue for at most this
long (its waiters' places are then given to those behind them)."""

LEASE_IDLE_MS = 60_000
"""How long the keys of a lease set outlive their ``ttl`` after the last write."""

LEASES = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local Z, L, C, EZ, EG, S, HB = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local Q, QD = KEYS[8], KEYS[9]
local op, expect = string.match(ARGV[1], '^([^:]*):?(.*)$')
local cfg, replica, chan = ARGV[2], ARGV[3], ARGV[4]
local stored = redis.call('HGET', S, 'cfg')
if stored and stored ~= cfg then return {'conflict', stored} end
if not stored then redis.call('HSET', S, 'cfg', cfg) end
local inc = redis.call('HGET', S, 'i')
if not inc then
  inc = t[1] .. '.' .. t[2]
  redis.call('HSET', S, 'i', inc)
end
if expect ~= '' and expect ~= inc then return {'lost', inc} end
local capacity, ttl, recovery = string.match(cfg, '^([^/]+)/([^/]+)/([^/]+)$')
capacity, ttl, recovery = tonumber(capacity), tonumber(ttl), tonumber(recovery)
local function fmt(x) return string.format('%.17g', x) end
if replica ~= '' then
  redis.call('ZADD', HB, now, replica)
  redis.call('PEXPIRE', HB, HEARTBEAT_S * 1000)
end
redis.call('ZREMRANGEBYSCORE', HB, '-inf', now - HEARTBEAT_S)
local live = tostring(redis.call('ZCARD', HB))
local function split(rec)
  local f = {'', '', '', '', '', '', ''}
  local pos = 1
  for i = 1, 6 do
    local at = string.find(rec, '|', pos, true)
    if not at then
      f[i] = string.sub(rec, pos)
      return f
    end
    f[i] = string.sub(rec, pos, at - 1)
    pos = at + 1
  end
  f[7] = string.sub(rec, pos)
  return f
end
local function join(f) return table.concat(f, '|', 1, 7) end
local function unbind(id, call)
  if call ~= '' and redis.call('HGET', C, call) == id then redis.call('HDEL', C, call) end
end
local function drop(id, f)
  redis.call('ZREM', Z, id)
  redis.call('HDEL', L, id)
  unbind(id, f[4])
end
local function forget_early()
  if redis.call('ZCARD', EZ) == 0 then return end
  local oldest = nil
  for _, rec in ipairs(redis.call('HVALS', L)) do
    local f = split(rec)
    if f[4] == '' and (oldest == nil or tonumber(f[2]) < oldest) then oldest = tonumber(f[2]) end
  end
  local max = '+inf'
  if oldest then max = '(' .. fmt(oldest + ttl) end
  local old = redis.call('ZRANGEBYSCORE', EZ, '-inf', max)
  for _, call in ipairs(old) do redis.call('HDEL', EG, call) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', EZ, '-inf', max) end
end
local function could_bind(gen)
  for _, rec in ipairs(redis.call('HVALS', L)) do
    local f = split(rec)
    if f[4] == '' and (gen == '' or tonumber(gen) == tonumber(f[1])) then return true end
  end
  return false
end
local reclaimed = {}
local dead = redis.call('ZRANGEBYSCORE', Z, '-inf', now)
for _, id in ipairs(dead) do
  local rec = redis.call('HGET', L, id)
  local call = ''
  if rec then call = split(rec)[4] end
  unbind(id, call)
  redis.call('HDEL', L, id)
  reclaimed[#reclaimed + 1] = id
  reclaimed[#reclaimed + 1] = call
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', Z, '-inf', now) end
local gone = redis.call('ZRANGEBYSCORE', EZ, '-inf', now)
for _, call in ipairs(gone) do redis.call('HDEL', EG, call) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', EZ, '-inf', now) end
if #dead > 0 then forget_early() end
local state = redis.call('HMGET', S, 'b', 't')
local base = tonumber(state[1]) or capacity
local since = tonumber(state[2]) or 0
local hold = tonumber(redis.call('HGET', S, 'h') or '0')
local function effective()
  if base >= capacity then return capacity end
  return math.min(capacity, base + math.floor((now - since) / recovery))
end
local function touch()
  local ms = math.ceil(ttl * 1000) + IDLE_MS
  for _, k in ipairs({Z, L, C, EZ, EG}) do redis.call('PEXPIRE', k, ms) end
end
local freed = false
local result = {}
local function free_slots(extra)
  return effective() - redis.call('ZCARD', Z) - extra
end
local function unqueue(ticket)
  redis.call('ZREM', QD, ticket)
  return redis.call('ZREM', Q, ticket)
end
if op == 'q' or op == 'k' or op == 'x' then
  local lapsed = redis.call('ZRANGEBYSCORE', QD, '-inf', now)
  for _, ticket in ipairs(lapsed) do unqueue(ticket) end
  if #lapsed > 0 and redis.call('ZCARD', Q) > 0 and free_slots(0) > 0 then freed = true end
end
if op == 'q' then
  local id, extra, rank, ticket, wait = ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
  local ahead
  if ticket ~= '' then
    -- A ticket dropped meanwhile (a stalled process) comes back at its place.
    redis.call('ZADD', Q, 'NX', 0, ticket)
    ahead = redis.call('ZRANK', Q, ticket)
  else
    ahead = redis.call('ZLEXCOUNT', Q, '-', '(' .. rank .. '~')
  end
  if now >= hold and ahead < free_slots(extra) then
    if ticket ~= '' then unqueue(ticket) end
    local g = redis.call('HINCRBY', S, 'g', 1)
    redis.call('ZADD', Z, now + ttl, id)
    redis.call('HSET', L, id, g .. '|' .. fmt(now) .. '|||')
    touch()
    result = {tostring(g)}
  else
    if ticket == '' and wait == '1' then
      ticket = rank .. string.format('%016d', redis.call('HINCRBY', S, 'q', 1))
      redis.call('ZADD', Q, 0, ticket)
    end
    if ticket ~= '' then
      redis.call('ZADD', QD, now + TICKET_EXPIRY_S, ticket)
      local ms = math.ceil(TICKET_EXPIRY_S * 1000) + IDLE_MS
      redis.call('PEXPIRE', Q, ms)
      redis.call('PEXPIRE', QD, ms)
    end
    result = {'', ticket}
  end
elseif op == 'k' then
  for i = 5, #ARGV do redis.call('ZADD', QD, 'XX', now + TICKET_EXPIRY_S, ARGV[i]) end
  local ms = math.ceil(TICKET_EXPIRY_S * 1000) + IDLE_MS
  redis.call('PEXPIRE', Q, ms)
  redis.call('PEXPIRE', QD, ms)
elseif op == 'x' then
  if unqueue(ARGV[5]) == 1 and redis.call('ZCARD', Q) > 0 and free_slots(0) > 0 then
    freed = true
  end
elseif op == 'a' then
  local extra = tonumber(ARGV[6])
  if now >= hold and redis.call('ZCARD', Z) + extra < effective() then
    local g = redis.call('HINCRBY', S, 'g', 1)
    redis.call('ZADD', Z, now + ttl, ARGV[5])
    redis.call('HSET', L, ARGV[5], g .. '|' .. fmt(now) .. '|||')
    touch()
    result = {tostring(g)}
  end
elseif op == 'b' then
  local id, call = ARGV[5], ARGV[6]
  local rec = redis.call('HGET', L, id)
  if rec then
    local f = split(rec)
    local early = redis.call('HGET', EG, call)
    if early and (early == '' or tonumber(early) == tonumber(f[1])) then
      redis.call('HDEL', EG, call)
      redis.call('ZREM', EZ, call)
      drop(id, f)
      forget_early()
      freed = true
      result = {'1'}
    else
      unbind(id, f[4])
      local prev = redis.call('HGET', C, call)
      if prev and prev ~= id then
        local p = redis.call('HGET', L, prev)
        if p then
          local pf = split(p)
          pf[4] = ''
          redis.call('HSET', L, prev, join(pf))
        end
      end
      f[3], f[4], f[5], f[6], f[7] = fmt(now), call, '', '', ''
      redis.call('HSET', L, id, join(f))
      redis.call('HSET', C, call, id)
      forget_early()
      touch()
    end
  end
elseif op == 'r' then
  local rec = redis.call('HGET', L, ARGV[5])
  if rec then
    local f = split(rec)
    drop(ARGV[5], f)
    forget_early()
    freed = true
    result = {'1', f[4]}
  end
elseif op == 'c' then
  local call, gen = ARGV[5], ARGV[6]
  local id = redis.call('HGET', C, call)
  if id and not redis.call('HGET', L, id) then
    redis.call('HDEL', C, call)
    id = false
  end
  if not id then
    if could_bind(gen) then
      redis.call('ZADD', EZ, fmt(now + ttl), call)
      redis.call('HSET', EG, call, gen)
      touch()
    end
  else
    local f = split(redis.call('HGET', L, id))
    if gen == '' or tonumber(gen) == tonumber(f[1]) then
      drop(id, f)
      freed = true
      result = {id}
    end
  end
elseif op == 'u' then
  local rec = redis.call('HGET', L, ARGV[5])
  if rec then
    local f = split(rec)
    f[5], f[6], f[7] = ARGV[6], fmt(now), ARGV[7] or ''
    redis.call('HSET', L, ARGV[5], join(f))
    result = {'1'}
  end
elseif op == 'U' then
  local all = redis.call('HGETALL', L)
  for i = 1, #all, 2 do
    local f = split(all[i + 1])
    if f[5] ~= '' and f[4] == '' then
      result[#result + 1] = all[i]
      result[#result + 1] = f[1]
      result[#result + 1] = fmt(now - tonumber(f[2]))
      result[#result + 1] = f[5]
      result[#result + 1] = f[6] ~= '' and fmt(now - tonumber(f[6])) or ''
      result[#result + 1] = f[7]
    end
  end
elseif op == 'R' then
  local cutoff = now - tonumber(ARGV[5])
  local alive = {}
  for i = 6, #ARGV do alive[ARGV[i]] = true end
  local all = redis.call('HGETALL', L)
  for i = 1, #all, 2 do
    local f = split(all[i + 1])
    if f[4] ~= '' and f[3] ~= '' and tonumber(f[3]) < cutoff and tonumber(f[2]) < cutoff
        and not alive[f[4]] then
      drop(all[i], f)
      freed = true
      result[#result + 1] = all[i]
      result[#result + 1] = f[4]
    end
  end
elseif op == 's' or op == 'o' then
  local old = effective()
  local new = old
  if op == 's' then
    new = math.max(1, math.floor(old / 2))
  else
    local cands = {}
    if ARGV[5] ~= '' then cands[#cands + 1] = tonumber(ARGV[5]) end
    if ARGV[6] ~= '' then cands[#cands + 1] = redis.call('ZCARD', Z) + tonumber(ARGV[6]) end
    if #cands > 0 then
      new = capacity
      for _, c in ipairs(cands) do if c < new then new = c end end
      if new < 1 then new = 1 end
    end
  end
  if op == 's' or ARGV[5] ~= '' or ARGV[6] ~= '' then
    base, since = new, now
    redis.call('HSET', S, 'b', tostring(base), 't', fmt(since))
    if new > old then freed = true end
  end
  result = {tostring(old), tostring(new)}
elseif op == 'H' then
  for i = 5, #ARGV do
    if not redis.call('ZSCORE', Z, ARGV[i]) then result[#result + 1] = ARGV[i] end
  end
elseif op == 'P' then
  local top = tonumber(redis.call('HGET', S, 'g') or '0')
  local n = 0
  local function ago(x) if x == '' then return '' end return fmt(now - tonumber(x)) end
  for i = 6, #ARGV, 8 do
    local id, gen, age = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    if gen > top then top = gen end
    if age < ttl and not redis.call('ZSCORE', Z, id) then
      local call = ARGV[i + 4]
      if call ~= '' and redis.call('HGET', C, call) then call = '' end
      redis.call('ZADD', Z, fmt(now - age + ttl), id)
      redis.call('HSET', L, id, join({ARGV[i + 1], fmt(now - age), ago(ARGV[i + 3]), call,
        ARGV[i + 5], ago(ARGV[i + 6]), ARGV[i + 7]}))
      if call ~= '' then redis.call('HSET', C, call, id) end
      n = n + 1
    end
  end
  if top > tonumber(redis.call('HGET', S, 'g') or '0') then redis.call('HSET', S, 'g', top) end
  if n > 0 then touch() end
  if redis.call('HSETNX', S, 'h', fmt(now + tonumber(ARGV[5]))) == 1 then
    hold = now + tonumber(ARGV[5])
  end
  result = {tostring(n)}
end
if freed or #dead > 0 then redis.call('PUBLISH', chan, 't' .. fmt(now)) end
local eff = effective()
local first = redis.call('ZRANGE', Z, 0, 0, 'WITHSCORES')
local first_expiry = ''
local next_change = nil
if #first > 0 then
  first_expiry = fmt(tonumber(first[2]) - now)
  next_change = tonumber(first[2]) - now
end
if now < hold and (next_change == nil or hold - now < next_change) then
  next_change = hold - now
end
if eff < capacity then
  local step = since + (math.floor((now - since) / recovery) + 1) * recovery - now
  if next_change == nil or step < next_change then next_change = step end
end
local header = {'ok', tostring(redis.call('ZCARD', Z)), tostring(eff),
  next_change and fmt(next_change) or '', first_expiry, live, tostring(#reclaimed / 2), fmt(now),
  inc}
for _, x in ipairs(reclaimed) do header[#header + 1] = x end
for _, x in ipairs(result) do header[#header + 1] = x end
return header
""".replace("HEARTBEAT_S", str(HEARTBEAT_S))
    .replace("IDLE_MS", str(LEASE_IDLE_MS))
    .replace("TICKET_EXPIRY_S", repr(TICKET_EXPIRY_S))
)
