"""Lua scripts of a session's side of the ledger (:mod:`dedup.sessions`).

Every script gets the session's four keys, which share the hash tag ``{<session id>}`` (one slot):
``KEYS[1]`` the hash (``kind``, ``version``, ``epoch``, ``state``, ``summary``, ``ttl``, ``next_ticket``,
``holder``, ``holder_fence``, ``holder_until``, ``free_since``, ``passed``, ``erased_ms``, ``base``
(how many turns were dropped from the head of the list), and per task
``t:<task>`` its ticket, ``f:<task>`` the newest fence it entered with, ``e:<task>`` the epoch it
entered (held) in), ``KEYS[2]`` the queue (zset: task by ticket), ``KEYS[3]`` the turns (list of
JSON) and ``KEYS[4]`` the applied marks (zset: task by the version its apply made, the newest
:data:`MARKS_MAX` kept: a replay older than those runs as a new arrival, as a task past the ledger's
retention does). A session stored before the zset keeps its marks as hash fields ``a:<task>`` =
``turn``: still read, and erased by ``leave`` and ``delete``; ``left`` marks are no longer written.
A script that writes refreshes the TTL of all four to the kind's (``ttl``). Times are the server's.

**Turn indices are absolute** (a summary's ``upto``, an entered view's first turn): the stored list
begins at turn ``base``. A summary that covers more turns drops the oldest of those it covers beyond
:data:`TURNS_MAX` (``base`` moves on); the turns after the summary are never dropped.

**Erasure** (:data:`DELETE`) moves the ``epoch`` on (from 1; a hash without one is at 1) and erases
the content (``kind``, ``state``, ``summary``, the turns, the applied marks), the version moving on
as ever; it keeps what orders the tasks (the holder and its lease, the queue, tickets, fences and
epochs), so a live holder keeps its turn and the waiters their places. An update of a task that did
not enter in the current epoch (``e:<task>``, 1 when absent) is ``stale``: it read what was erased.
A session that nobody holds or waits for is left as a tombstone ``{epoch, version, erased_ms}``.
"""

from __future__ import annotations

from dedup.lua import NOW

__all__ = ["APPLY", "DELETE", "ENTER", "LEAVE", "MARKS_MAX", "PUT", "RENEW", "SUMMARIZE", "TURNS_MAX"]

MARKS_MAX = 10_000  # applied marks kept per session, the newest (dedup.sessions.Sessions.marks_max)
TURNS_MAX = 1_000  # summarised turns kept per session, the newest (dedup.sessions.Sessions.turns_max)

# the TTL of a session whose hash has none (never: ENTER writes it); dedup.sessions.DEFAULT_TTL_S
_DEFAULT_TTL_S = 2_592_000

# ``keep()``: every key of the session lives the kind's TTL from now
_KEEP = f"""
local function keep()
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl')) or {_DEFAULT_TTL_S}
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# ``free()``: nobody holds the session, free since now
_FREE = """
local function free()
  redis.call('HSET', KEYS[1], 'holder', '', 'holder_fence', 0, 'holder_until', 0, 'free_since', now)
end
"""

# ``applied(task)``: whether the session applied the task's update (a mark of the zset, or a hash
# field ``a:<task>`` = ``turn`` of a session stored before the zset)
_APPLIED = """
local function applied(task)
  return redis.call('ZSCORE', KEYS[4], task) or redis.call('HGET', KEYS[1], 'a:' .. task) == 'turn'
end
"""

# ``waiting(task, ticket, head)``: the answer of a task that waits behind ``head``
_WAITING = """
local function waiting(task, ticket, head)
  return {'waiting', head, redis.call('ZRANK', KEYS[2], task), ticket}
end
"""

# KEYS hash, queue, turns, applied; ARGV kind, task, fence, lease_ms, ttl_s, stall_ms, tenant
# -> {'entered', version, state or '', summary or '', turns after the summary, their first index, ticket}
#  | {'waiting', the holder or head it waits behind, how many are queued ahead, ticket}
#  | {'applied', version} | {'wrong_tenant', tenant} | {'wrong_kind', kind} | {'stale', the newest fence of the task}
# The first enter records the kind and the tenant; another tenant is refused before the kind is
# compared (it learns nothing of the session's kind); nothing is written for either. A session
# recorded before tenants were kept takes the tenant of its next enter.
# The ticket is taken once per task id (arrival order); a task passed over keeps it and is queued
# again at it. The head enters when no other task holds the session with a live lease; a head that
# does not come for stall_ms after the session fell free (an apply, a leave, a lease run out, a
# head passed) is passed over, one head per stall_ms. A newer run of the holder (its redelivery)
# holds on at once, wherever its ticket stands.
ENTER = NOW + _KEEP + _FREE + _APPLIED + _WAITING + """
local task, fence, stall = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[6])
local kind = redis.call('HGET', KEYS[1], 'kind')
if not kind then  -- new, or erased: the holder, tickets and queue an erasure kept stay as they are
  redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'tenant', ARGV[7])
  redis.call('HDEL', KEYS[1], 'erased_ms')
  local fresh = {'version', 0, 'epoch', 1, 'next_ticket', 0, 'passed', 0, 'free_since', now, 'holder', '',
                 'holder_fence', 0, 'holder_until', 0}
  for i = 1, #fresh, 2 do redis.call('HSETNX', KEYS[1], fresh[i], fresh[i + 1]) end
else
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  if tenant and tenant ~= ARGV[7] then return {'wrong_tenant', tenant} end
  if kind ~= ARGV[1] then return {'wrong_kind', kind} end
  if not tenant then redis.call('HSET', KEYS[1], 'tenant', ARGV[7]) end
end
if applied(task) then return {'applied', redis.call('HGET', KEYS[1], 'version')} end
local newest = tonumber(redis.call('HGET', KEYS[1], 'f:' .. task))
if newest and newest > fence then return {'stale', tostring(newest)} end
redis.call('HSET', KEYS[1], 'ttl', ARGV[5], 'f:' .. task, fence)
local ticket = redis.call('HGET', KEYS[1], 't:' .. task)
if not ticket then
  ticket = redis.call('HINCRBY', KEYS[1], 'next_ticket', 1)
  redis.call('HSET', KEYS[1], 't:' .. task, ticket)
end
redis.call('ZADD', KEYS[2], ticket, task)
keep()
local h = redis.call('HMGET', KEYS[1], 'holder', 'holder_until', 'free_since')
local holder, held_until = h[1] or '', tonumber(h[2]) or 0
if holder ~= '' and holder ~= task and held_until > now then return waiting(task, ticket, holder) end
local since = math.max(tonumber(h[3]) or 0, held_until)
while holder ~= task do  -- a newer run of the holder holds on; another task enters at the head
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head == task then break end
  if now < since + stall then return waiting(task, ticket, head) end
  redis.call('ZREM', KEYS[2], head)
  free()
  redis.call('HINCRBY', KEYS[1], 'passed', 1)
  since = now
end
local s = redis.call('HMGET', KEYS[1], 'version', 'state', 'summary', 'epoch', 'base')
redis.call('HSET', KEYS[1], 'holder', task, 'holder_fence', fence, 'holder_until', now + tonumber(ARGV[4]),
           'e:' .. task, s[4] or 1)
local base, upto = tonumber(s[5]) or 0, 0
if s[3] then upto = tonumber(cjson.decode(s[3])['upto']) end
upto = math.max(upto, base)
return {'entered', s[1], s[2] or '', s[3] or '', redis.call('LRANGE', KEYS[3], upto - base, -1), upto, ticket}
"""

# KEYS hash, queue, turns, applied; ARGV task, fence, lease_ms -> 1 (extended) | 0 (it does not hold the
# session under this fence)
RENEW = NOW + _KEEP + """
local h = redis.call('HMGET', KEYS[1], 'holder', 'holder_fence')
if h[1] ~= ARGV[1] or tonumber(h[2]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'holder_until', now + tonumber(ARGV[3]))
keep()
return 1
"""

# KEYS hash, queue, turns, applied; ARGV task, fence, read version, turn (JSON or ''), state (JSON or ''),
# how many applied marks to keep
# -> {'ok' | 'again' | 'moved' | 'stale', the session's version}
# Once per task id; 'stale' when a newer run of this task entered (nothing changed: that run goes on),
# or the session was erased since the task entered (out of the queue, the session freed if it held it).
APPLY = NOW + _KEEP + _FREE + _APPLIED + """
local task = ARGV[1]
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if not version then return {'stale', 0} end
if applied(task) then return {'again', version} end
local newest = tonumber(redis.call('HGET', KEYS[1], 'f:' .. task))
if newest and newest > tonumber(ARGV[2]) then return {'stale', version} end
local e = redis.call('HMGET', KEYS[1], 'epoch', 'e:' .. task)
if (tonumber(e[2]) or 1) ~= (tonumber(e[1]) or 1) then  -- it read what was erased
  redis.call('HDEL', KEYS[1], 't:' .. task, 'f:' .. task, 'e:' .. task)
  redis.call('ZREM', KEYS[2], task)
  if redis.call('HGET', KEYS[1], 'holder') == task then free() end
  return {'stale', version}
end
if version ~= tonumber(ARGV[3]) then return {'moved', version} end
if ARGV[4] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[5]) end
version = version + 1
redis.call('HSET', KEYS[1], 'version', version)
redis.call('HDEL', KEYS[1], 't:' .. task, 'f:' .. task, 'e:' .. task, 'a:' .. task)
redis.call('ZADD', KEYS[4], version, task)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[6]) - 1)
redis.call('ZREM', KEYS[2], task)
if redis.call('HGET', KEYS[1], 'holder') == task then free() end
keep()
return {'ok', version}
"""

# KEYS hash, queue, turns, applied; ARGV task, fence ('' for whichever run) -> 'left' | 'again' (applied, or
# neither queued nor holding: nothing to leave) | 'stale' (a newer run of this task entered)
LEAVE = NOW + _KEEP + _FREE + _APPLIED + """
local task = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then return 'again' end
if applied(task) then return 'again' end
if ARGV[2] ~= '' then
  local newest = tonumber(redis.call('HGET', KEYS[1], 'f:' .. task))
  if newest and newest > tonumber(ARGV[2]) then return 'stale' end
end
local holding = redis.call('HGET', KEYS[1], 'holder') == task
local ticketed = redis.call('HDEL', KEYS[1], 't:' .. task) == 1
local queued = redis.call('ZREM', KEYS[2], task) == 1
if not (holding or ticketed or queued) then return 'again' end
-- its fence too: a task that left comes back as a new arrival at any fence (its dead letter
-- replayed after its ledger record expired claims again at fence 1)
redis.call('HDEL', KEYS[1], 'f:' .. task, 'e:' .. task, 'a:' .. task)  -- no mark: it holds no place
if holding then free() end
keep()
return 'left'
"""

# KEYS hash, queue, turns, applied; ARGV upto, summary (JSON {upto, text}), read version, turns kept -> 1 | 0
# Stored when the version is the one read and it covers more turns than the stored one, no more than there are;
# of the turns it covers, the newest ARGV[4] stay stored (base moves on past those dropped).
SUMMARIZE = _KEEP + """
if redis.call('HEXISTS', KEYS[1], 'kind') == 0 then return 0 end
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if not version or version ~= tonumber(ARGV[3]) then return 0 end
local upto = tonumber(ARGV[1])
local base = tonumber(redis.call('HGET', KEYS[1], 'base')) or 0
if upto > base + redis.call('LLEN', KEYS[3]) then return 0 end
local stored = redis.call('HGET', KEYS[1], 'summary')
if stored and tonumber(cjson.decode(stored)['upto']) >= upto then return 0 end
redis.call('HSET', KEYS[1], 'summary', ARGV[2])
local drop = upto - base - tonumber(ARGV[4])
if drop > 0 then
  redis.call('LTRIM', KEYS[3], drop, -1)
  redis.call('HSET', KEYS[1], 'base', base + drop)
end
keep()
return 1
"""

# KEYS hash, queue, turns, applied; ARGV version, 'state' | 'turns', the state (JSON) or each turn (JSON)
# -> {'ok' | 'conflict' | 'missing', the session's version}
# The operator's correction: replacing the turns drops the summary (it summarised others).
PUT = _KEEP + """
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if not version or redis.call('HEXISTS', KEYS[1], 'kind') == 0 then return {'missing', 0} end
if version ~= tonumber(ARGV[1]) then return {'conflict', version} end
if ARGV[2] == 'state' then
  redis.call('HSET', KEYS[1], 'state', ARGV[3])
else
  redis.call('DEL', KEYS[3])
  for i = 3, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
  redis.call('HDEL', KEYS[1], 'summary', 'base')  -- the operator's turns are the whole history
end
version = version + 1
redis.call('HSET', KEYS[1], 'version', version)
keep()
return {'ok', version}
"""

# KEYS hash, queue, turns, applied -> 1 (erased) | 0 (no session: never created, expired, or erased already)
# The erasure: the content goes (kind, tenant, state, summary, the turns, the applied marks), the
# epoch and the version move on; the holder, its lease, the queue, tickets, fences and epochs stay
# (the live holder keeps its turn, waiters their places). Nobody holding or queued: a tombstone
# {epoch, version, erased_ms} with the session's TTL.
DELETE = NOW + _KEEP + """
local f = redis.call('HMGET', KEYS[1], 'kind', 'epoch', 'version', 'ttl', 'holder')
if not f[1] then return 0 end
local epoch, version = (tonumber(f[2]) or 1) + 1, (tonumber(f[3]) or 0) + 1
redis.call('DEL', KEYS[3], KEYS[4])
if (f[5] or '') == '' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'version', version, 'erased_ms', now)
  redis.call('EXPIRE', KEYS[1], tonumber(f[4]) or """ + str(_DEFAULT_TTL_S) + """)
  return 1
end
redis.call('HDEL', KEYS[1], 'kind', 'tenant', 'state', 'summary', 'base')
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) == 'a:' then redis.call('HDEL', KEYS[1], field) end
end
redis.call('HSET', KEYS[1], 'epoch', epoch, 'version', version, 'erased_ms', now)
keep()
return 1
"""
