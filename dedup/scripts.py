"""Lua scripts of the ledger. Each runs atomically on the Redis server.

Time comes from the server (``TIME``), never from the workers, so leases do not depend on the
workers' clocks agreeing. Every write that a worker makes under a claim carries the fence it was
given; a write with an older fence is refused (the script answers ``stale``).

A script that moves a task's ``state`` is handed the states its event may start from and the state
it leads to, from :data:`dedup.lifecycles.task.TASK` (space-joined, ``among`` reads them): the
table decides which moves are made; a task in another state is answered, not moved.

Task hash fields: state, fence, owner, lease_until (ms), fingerprint, kind, attempts, claims,
result, result_digest, event, error, dead_reason, model, prompt_version, created_at, updated_at,
completed_at; ``attempts:<step>`` (the step's model calls), ``open:<step>`` (a call of the step under
way: counted, its outcome not known yet) and ``deaths`` (holders that stopped with a call under way:
their lease ran out and another claim took the task over). Who published the outcome:

- ``published_by``: the coordinates (``topic[partition]@offset``) of the record that published it,
  or ``1`` when the caller named none; absent: not published;
- ``published_how``: ``staged`` (marked in a transaction, before the send: the record read again,
  its transaction aborted, stages it anew) or ``acked`` (marked after the broker acknowledged it);
- ``published``: the previous version's one field (``0``, ``1`` or the coordinates, with no word of
  how). It is written beside ``published_by``, with the same value, so a worker of the previous
  version running beside this one during a rolling upgrade reads who published too; this version
  reads it only where it differs from ``published_by``: a worker of the previous version wrote it
  after (``0`` on a new outcome, or its own record's coordinates), so it is the newer and wins
  (:data:`dedup.lua.PUBLICATION`). Once no worker of the previous version runs, it can go.

A move into ``succeeded`` or ``dead`` clears all three: the new outcome is not published yet.
"""

from __future__ import annotations

import re

from dedup.lua import AMONG, AMONG_SET, NOW, PUBLICATION, UNPUBLISH
from dedup.quota_scripts import BUDGET_RESERVE, BUDGET_SETTLE, RATE, RATE_RECONCILE

__all__ = ["ATTEMPT", "BUDGET_RESERVE", "BUDGET_SETTLE", "CLAIM", "CLAIM_ATTEMPT", "COMPLETE", "END", "EXPIRE", "FAIL",
           "FINISHED", "HEARTBEAT", "MARK", "NOW", "RATE", "RATE_RECONCILE", "REFUND", "REVIVE", "STEP", "TOUCH",
           "claim_script"]

# KEYS[1] task hash, KEYS[2] steps hash, KEYS[3] the task's cancel mark, KEYS[4] (optional) the asking
#   record's mark (dedup.seen), set to the fingerprint and KEYS[1] for ttl_s, whatever the decision
# ARGV fingerprint, owner, lease_ms, kind, ttl_s, max_deaths, holder (the claiming process's ledger)
# M (baked into the source by :func:`claim_script`, not sent with every claim): from TASK, the
#   sources and target of 'claim', of 'take_over', of 'crash' and of 'cancel', and the initial
#   pseudo-state (a task without a hash)
# -> {decision, fence, attempts, lease_remaining_ms, published_by, published_how} ('': not published,
#    or not said). A task in a state no claim starts from is answered with its state (done, parked).
# A task without a hash whose parent marked it cancelled (KEYS[3]) is not run: it is stored
# dead(cancelled) under fence 1 with the mark's reason as its error, decision 'cancelled'.
# A claim that takes over a running task whose lease ran out with calls under way (``open:<step>``)
# from another owner gives those attempts back (the holder's death cut them short: not the task's
# failure) and counts a death; the death that reaches max_deaths ends the task: dead(crashed),
# decision 'crashed'. The same process claiming again (field holder) is alive (it retries the record
# after a failure of its own code or an outage): its calls stay counted and no death is.
# ARGV[P..P+2] (optional: a child task's parent id, step and n; P is 8 in CLAIM) are kept by the
# claim that creates the hash (parent, parent_step, parent_n): a later claim changes nothing.
_CLAIM = """
local function lineage()
  if ARGV[P] and ARGV[P] ~= '' then
    redis.call('HSET', KEYS[1], 'parent', ARGV[P], 'parent_step', ARGV[P + 1], 'parent_n', ARGV[P + 2])
  end
end
local fp = ARGV[1]
local lease = tonumber(ARGV[3])
if KEYS[4] then
  -- the asking record's mark (dedup.seen): its bytes name this task with this fingerprint
  redis.call('SET', KEYS[4], fp .. ' ' .. KEYS[1], 'EX', tonumber(ARGV[5]))
end
local state = redis.call('HGET', KEYS[1], 'state')
local cancelled = not state and KEYS[3] and M[8] ~= '' and among(M[7], M[9])
  and redis.call('GET', KEYS[3])
if cancelled then
  redis.call('HSET', KEYS[1], 'state', M[8], 'fence', 1, 'owner', ARGV[2], 'lease_until', 0,
             'fingerprint', fp, 'kind', ARGV[4], 'attempts', 0, 'claims', 1, 'created_at', now,
             'updated_at', now, 'holder', ARGV[7], 'dead_reason', 'cancelled', 'error', cancelled)
  lineage()
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {'cancelled', 1, 0, 0, '', ''}
end
if not state then
  redis.call('HSET', KEYS[1], 'state', M[2], 'fence', 1, 'owner', ARGV[2],
             'lease_until', now + lease, 'fingerprint', fp, 'kind', ARGV[4],
             'attempts', 0, 'claims', 1, 'created_at', now, 'updated_at', now,
             'holder', ARGV[7])
  lineage()
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {'claimed', 1, 0, lease, '', ''}
end
local h = redis.call('HMGET', KEYS[1], 'fingerprint', 'fence', 'attempts', 'lease_until', 'holder',
                     'published_by', 'published_how', 'published')
local fence = tonumber(h[2])
local attempts = tonumber(h[3]) or 0
local by, how = published(h[6], h[7], h[8])
if h[1] ~= fp then
  return {'conflict', fence, attempts, 0, by, how}
end
local taken_over = among(M[3], state)
if not taken_over and not among(M[1], state) then
  return {state, fence, attempts, 0, by, how}
end
local lease_until = tonumber(h[4]) or 0
if taken_over and lease_until > now then
  return {'busy', fence, attempts, lease_until - now, by, how}
end
fence = fence + 1
local open = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 5) == 'open:' then open[#open + 1] = f end
end
if #open > 0 then
  redis.call('HDEL', KEYS[1], unpack(open))
  if taken_over and h[5] ~= ARGV[7] then
    for _, f in ipairs(open) do
      local per_step = 'attempts:' .. string.sub(f, 6)
      if (tonumber(redis.call('HGET', KEYS[1], per_step)) or 0) > 0 then
        redis.call('HINCRBY', KEYS[1], per_step, -1)
      end
      if attempts > 0 then attempts = attempts - 1 end
    end
    redis.call('HSET', KEYS[1], 'attempts', attempts)
    local deaths = redis.call('HINCRBY', KEYS[1], 'deaths', 1)
    if deaths >= tonumber(ARGV[6]) and among(M[5], state) then
      redis.call('HSET', KEYS[1], 'state', M[6], 'fence', fence, 'owner', ARGV[2], 'lease_until', 0,
                 'dead_reason', 'crashed', 'updated_at', now,
                 'error', 'the workers holding the task stopped ' .. deaths .. ' times with a call of it under way')
""" + UNPUBLISH + """
      redis.call('HINCRBY', KEYS[1], 'claims', 1)
      redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
      return {'crashed', fence, attempts, 0, '', ''}
    end
  end
end
local target = M[2]
if taken_over then target = M[4] end
redis.call('HSET', KEYS[1], 'state', target, 'fence', fence, 'owner', ARGV[2],
           'lease_until', now + lease, 'updated_at', now, 'holder', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {'claimed', fence, attempts, lease, by, how}
"""
CLAIM = NOW + AMONG + PUBLICATION + "local P = 8\n" + _CLAIM

# KEYS, M and ARGV[1..7] as CLAIM's; ARGV[8] a step, ARGV[9] its max attempts, ARGV[10..12] the parent
# -> CLAIM's answer; when claimed, with {step attempts, task attempts} after it (as ATTEMPT's
#    answer; -2 when the step used all of its attempts: nothing is counted then).
# The claim and the first call's attempt in one round trip: a claim that holds the task counts one
# call of the step at once, open until its outcome is known, as ATTEMPT does under the new fence
# (the claim just set the lease). A claim that does not hold the task counts nothing.
CLAIM_ATTEMPT = NOW + AMONG + PUBLICATION + "local P = 10\nlocal function claim()\n" + _CLAIM + """end
local r = claim()
if r[1] ~= 'claimed' then return r end
local h = redis.call('HMGET', KEYS[1], 'attempts:' .. ARGV[8], 'attempts')
if (tonumber(h[1]) or 0) >= tonumber(ARGV[9]) then
  r[7], r[8] = -2, tonumber(h[2]) or 0
  return r
end
redis.call('HSET', KEYS[1], 'open:' .. ARGV[8], 1)
r[8] = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
r[7] = redis.call('HINCRBY', KEYS[1], 'attempts:' .. ARGV[8], 1)
return r
"""

_STATES = re.compile(r"[A-Za-z0-9_ ]*")


def claim_script(source: str, moves: list[str]) -> str:
    """``source`` (CLAIM or CLAIM_ATTEMPT) with a lifecycle's claim moves baked in as its ``M``: the
    same table for every claim of a ledger, not packed, sent and read with each one."""
    if not all(_STATES.fullmatch(m) for m in moves):
        raise ValueError(f"states must be words: {moves!r}")
    return "local M = {" + ", ".join(f"'{m}'" for m in moves) + "}\n" + source


# KEYS[1] task; ARGV fence, lease_ms -> 1 extended, 0 lost (a newer fence holds it, or it is gone),
# 2 no longer running under this very fence (its holder completed, failed or parked it)
HEARTBEAT = NOW + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  if h[1] and tonumber(h[2]) == tonumber(ARGV[1]) then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]), 'updated_at', now)
return 1
"""

# KEYS[1] task; ARGV fence, lease_ms, step, max_attempts
# -> {step attempts after increment, task attempts}; {-1, n} when the fence is stale;
#    {-2, n} when the step has used all of its attempts (nothing is counted then).
# Counts one model call against the task and its step, durably, before it is made: a redelivery
# or a restart does not reset the count. The call is open (``open:<step>``) until its outcome is
# known: the step's next attempt, END, REFUND, STEP, or the task's end; a claim that takes the task
# over from a holder whose lease ran out gives an open call back (see CLAIM).
ATTEMPT = NOW + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence', 'attempts:' .. ARGV[3], 'attempts')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return {-1, tonumber(h[4]) or 0}
end
if (tonumber(h[3]) or 0) >= tonumber(ARGV[4]) then
  return {-2, tonumber(h[4]) or 0}
end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]), 'updated_at', now,
           'open:' .. ARGV[3], 1)
local total = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {redis.call('HINCRBY', KEYS[1], 'attempts:' .. ARGV[3], 1), total}
"""

# KEYS[1] task; ARGV fence, step name -> 1 | 0 (stale)
# Gives back the attempt counted before a call that the endpoint, not the task, failed.
REFUND = """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence', 'attempts:' .. ARGV[2], 'attempts')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return 0
end
if redis.call('HDEL', KEYS[1], 'open:' .. ARGV[2]) == 0 then
  return 1  -- given back already (or never counted): never twice
end
if (tonumber(h[3]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'attempts:' .. ARGV[2], -1)
end
if (tonumber(h[4]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
return 1
"""

# KEYS[1] task; ARGV fence, step name -> 1 | 0 (stale)
# The outcome of the step's call is known (the task's own failure): the attempt stays spent, and a
# death of the holder from here on gives nothing back.
END = """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HDEL', KEYS[1], 'open:' .. ARGV[2])
return 1
"""

# KEYS[1] task; ARGV fence (the one seen holding the task), error, the sources and target of 'expire'
# -> {'ok', new fence} | {state, fence} (nothing changed: the task moved on)
# The task is past its deadline while another worker holds it: it ends dead(expired) under a fence
# one higher, so that the holder's later writes (its result) are refused. A holder that completed
# first keeps its result.
EXPIRE = NOW + AMONG + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if not among(ARGV[3], h[1]) or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return {h[1] or '', tonumber(h[2]) or 0}
end
local fence = tonumber(h[2]) + 1
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'fence', fence, 'error', ARGV[2], 'dead_reason', 'expired',
           'lease_until', 0, 'updated_at', now)
""" + UNPUBLISH + """
return {'ok', fence}
"""

# KEYS[1] task; ARGV state -> 1 | 0 (not in that state). A write for WAIT to follow on the same
# connection: replicas apply writes in order, so once they hold this one they hold the outcome too.
TOUCH = NOW + """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'updated_at', now)
return 1
"""

# KEYS[1] task, KEYS[2] steps; ARGV fence, step name, step record (JSON) -> 'ok' | 'stale'
STEP = """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return 'stale'
end
redis.call('HDEL', KEYS[1], 'open:' .. ARGV[2])  -- the step's call answered: nothing to give back
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], redis.call('TTL', KEYS[1]))
return 'ok'
"""

# KEYS[1] task, KEYS[2] steps
# ARGV fence, result, digest, event, model, prompt_version, ttl_s, endpoint ('' = the primary),
#      the sources and target of 'complete', and (optional) the coordinates of the record that stages
#      the outcome in a Kafka transaction
# -> {'ok'|'stale'|'already', current fence, current digest, 1 marked | 0}
# Given the coordinates, a result written ('ok') is marked published by that record, staged, as MARK
# would mark it right after: in a transaction the mark comes before the send (only then).
COMPLETE = NOW + AMONG + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence', 'result_digest')
if not h[1] then
  return {'stale', 0, ''}
end
if h[1] == ARGV[10] then
  if tonumber(h[2]) == tonumber(ARGV[1]) then
    -- our own earlier COMPLETE (its reply was lost): write once more, so that a WAIT that follows on
    -- this connection covers the first write too (replicas apply writes in order)
    redis.call('HSET', KEYS[1], 'updated_at', now)
  end
  return {'already', tonumber(h[2]), h[3]}
end
if not among(ARGV[9], h[1]) or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return {'stale', tonumber(h[2]), ''}
end
redis.call('HSET', KEYS[1], 'state', ARGV[10], 'result', ARGV[2], 'result_digest', ARGV[3],
           'event', ARGV[4], 'model', ARGV[5], 'prompt_version', ARGV[6], 'completed_at', now,
           'updated_at', now, 'lease_until', 0)
redis.call('HDEL', KEYS[1], 'error', 'dead_reason', 'published', 'published_by', 'published_how')
if ARGV[8] and ARGV[8] ~= '' then
  -- a fallback endpoint answered: the record says so, as the result event does
  redis.call('HSET', KEYS[1], 'degraded', 1, 'endpoint', ARGV[8])
else
  redis.call('HDEL', KEYS[1], 'degraded', 'endpoint')
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
end
if ARGV[11] and ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'published_by', ARGV[11], 'published', ARGV[11], 'published_how', 'staged')
  return {'ok', tonumber(ARGV[1]), ARGV[3], 1}
end
return {'ok', tonumber(ARGV[1]), ARGV[3], 0}
"""

# KEYS[1] task; ARGV fence, error, dead_reason ('' = failed and reclaimable), the sources and target
# of the event ('fail', or 'die' with a reason) -> 'ok' | 'stale'
FAIL = NOW + AMONG + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if not among(ARGV[4], h[1]) or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return 'stale'
end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[5], 'error', ARGV[2], 'lease_until', 0,
             'updated_at', now)
  return 'ok'
end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'error', ARGV[2], 'dead_reason', ARGV[3],
           'lease_until', 0, 'updated_at', now)
""" + UNPUBLISH + """
return 'ok'
"""

# KEYS task hashes; ARGV[1] their fingerprints and ARGV[2] the coordinates of the records that
# carry them ('-': any record), each list joined by spaces (neither holds one; one argument each
# packs and sends in a fraction of the time of one per task), ARGV[3] the done states (those
# 'publish' starts from) -> per task 1 when it is done (succeeded or dead) with that fingerprint and
# its outcome was published by another record, else 0.
# Read-only: a replay's batch asks once for all of its tasks (see Ledger.finished).
FINISHED = AMONG_SET + PUBLICATION + """
local fps, coords = {}, {}
for fp in string.gmatch(ARGV[1], '%S+') do fps[#fps + 1] = fp end
for c in string.gmatch(ARGV[2], '%S+') do coords[#coords + 1] = c end
local done = among_set(ARGV[3])
local out = {}
for i = 1, #KEYS do
  -- not published_how: who published is all this asks
  local h = redis.call('HMGET', KEYS[i], 'state', 'fingerprint', 'published_by', 'published')
  local by = published(h[3], nil, h[4])
  if h[1] and done[h[1]] and h[2] == fps[i] and by ~= '' and by ~= coords[i] then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS[1] task; ARGV state expected ('succeeded' or 'dead'), by (the publishing record's
# coordinates, or '1'), how ('staged' | 'acked' | '': not said), the states 'publish' starts from
# -> 1 marked, 0 not in that state
MARK = AMONG + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[1] or not among(ARGV[4], state) then
  return 0
end
-- 'published' mirrors published_by for the previous version's workers (see the module's docstring)
redis.call('HSET', KEYS[1], 'published_by', ARGV[2], 'published', ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'published_how')
else
  redis.call('HSET', KEYS[1], 'published_how', ARGV[3])
end
return 1
"""

# KEYS[1] task, KEYS[2] tools; ARGV the sources and target of 'revive' -> 1 revived, 0 not dead. A dead task becomes claimable again, each
# step with a fresh attempt budget and no deaths counted (the task's total count stays), after an operator redrives its
# dead letter. A rejected or expired approval (a:), or an expired reconcile answer (o:), is dropped with it: the
# redriven call asks again.
REVIVE = NOW + AMONG + """
if not among(ARGV[1], redis.call('HGET', KEYS[1], 'state')) then
  return 0
end
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(f, 1, 2) == 'a:' or string.sub(f, 1, 2) == 'o:' then
    local d = cjson.decode(redis.call('HGET', KEYS[2], f))['decision']
    if d == 'rejected' or d == 'expired' then redis.call('HDEL', KEYS[2], f) end
  end
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'lease_until', 0, 'updated_at', now)
redis.call('HDEL', KEYS[1], 'dead_reason', 'deaths')
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 9) == 'attempts:' or string.sub(f, 1, 5) == 'open:' then
    redis.call('HDEL', KEYS[1], f)
  end
end
return 1
"""
