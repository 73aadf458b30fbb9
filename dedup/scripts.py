"""Lua scripts of the ledger. Each runs atomically on the Redis server.

Time comes from the server (``TIME``), never from the workers, so leases do not depend on the
workers' clocks agreeing. Every write that a worker makes under a claim carries the fence it was
given; a write with an older fence is refused (the script answers ``stale``).

Task hash fields: state, fence, owner, lease_until (ms), fingerprint, kind, attempts, claims,
result, result_digest, event, published, error, dead_reason, model, prompt_version, created_at,
updated_at, completed_at; ``attempts:<step>`` (the step's model calls), ``open:<step>`` (a call of the
step under way: counted, its outcome not known yet) and ``deaths`` (holders that stopped with a call
under way: their lease ran out and another claim took the task over).
"""

from __future__ import annotations

NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] task hash, KEYS[2] steps hash
# ARGV fingerprint, owner, lease_ms, kind, ttl_s, max_deaths, holder (the claiming process's ledger)
# -> {decision, fence, attempts, lease_remaining_ms, published} (published: '0', or who published)
# A claim that takes over a running task whose lease ran out with calls under way (``open:<step>``)
# from another owner gives those attempts back (the holder's death cut them short: not the task's
# failure) and counts a death; the death that reaches max_deaths ends the task: dead(crashed),
# decision 'crashed'. The same process claiming again (field holder) is alive (it retries the record
# after a failure of its own code or an outage): its calls stay counted and no death is.
CLAIM = NOW + """
local fp = ARGV[1]
local lease = tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], 'state', 'running', 'fence', 1, 'owner', ARGV[2],
             'lease_until', now + lease, 'fingerprint', fp, 'kind', ARGV[4],
             'attempts', 0, 'claims', 1, 'published', 0, 'created_at', now, 'updated_at', now,
             'holder', ARGV[7])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {'claimed', 1, 0, lease, '0'}
end
local h = redis.call('HMGET', KEYS[1], 'fingerprint', 'fence', 'attempts', 'lease_until', 'published', 'holder')
local fence = tonumber(h[2])
local attempts = tonumber(h[3]) or 0
local published = h[5] or '0'
if h[1] ~= fp then
  return {'conflict', fence, attempts, 0, published}
end
if state == 'succeeded' or state == 'dead' then
  return {state, fence, attempts, 0, published}
end
if state == 'waiting_approval' then
  return {'parked', fence, attempts, 0, published}
end
local lease_until = tonumber(h[4]) or 0
if state == 'running' and lease_until > now then
  return {'busy', fence, attempts, lease_until - now, published}
end
fence = fence + 1
local open = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 5) == 'open:' then open[#open + 1] = f end
end
if #open > 0 then
  redis.call('HDEL', KEYS[1], unpack(open))
  if state == 'running' and h[6] ~= ARGV[7] then
    for _, f in ipairs(open) do
      local per_step = 'attempts:' .. string.sub(f, 6)
      if (tonumber(redis.call('HGET', KEYS[1], per_step)) or 0) > 0 then
        redis.call('HINCRBY', KEYS[1], per_step, -1)
      end
      if attempts > 0 then attempts = attempts - 1 end
    end
    redis.call('HSET', KEYS[1], 'attempts', attempts)
    local deaths = redis.call('HINCRBY', KEYS[1], 'deaths', 1)
    if deaths >= tonumber(ARGV[6]) then
      redis.call('HSET', KEYS[1], 'state', 'dead', 'fence', fence, 'owner', ARGV[2], 'lease_until', 0,
                 'dead_reason', 'crashed', 'published', 0, 'updated_at', now,
                 'error', 'the workers holding the task stopped ' .. deaths .. ' times with a call of it under way')
      redis.call('HINCRBY', KEYS[1], 'claims', 1)
      redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
      return {'crashed', fence, attempts, 0, '0'}
    end
  end
end
redis.call('HSET', KEYS[1], 'state', 'running', 'fence', fence, 'owner', ARGV[2],
           'lease_until', now + lease, 'updated_at', now, 'holder', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {'claimed', fence, attempts, lease, published}
"""

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

# KEYS[1] task; ARGV fence (the one seen holding the task), error
# -> {'ok', new fence} | {state, fence} (nothing changed: the task moved on)
# The task is past its deadline while another worker holds it: it ends dead(expired) under a fence
# one higher, so that the holder's later writes (its result) are refused. A holder that completed
# first keeps its result.
EXPIRE = NOW + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return {h[1] or '', tonumber(h[2]) or 0}
end
local fence = tonumber(h[2]) + 1
redis.call('HSET', KEYS[1], 'state', 'dead', 'fence', fence, 'error', ARGV[2], 'dead_reason', 'expired',
           'lease_until', 0, 'published', 0, 'updated_at', now)
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
# ARGV fence, result, digest, event, model, prompt_version, ttl_s
# -> {'ok'|'stale'|'already', current fence, current digest}
COMPLETE = NOW + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence', 'result_digest')
if not h[1] then
  return {'stale', 0, ''}
end
if h[1] == 'succeeded' then
  if tonumber(h[2]) == tonumber(ARGV[1]) then
    -- our own earlier COMPLETE (its reply was lost): write once more, so that a WAIT that follows on
    -- this connection covers the first write too (replicas apply writes in order)
    redis.call('HSET', KEYS[1], 'updated_at', now)
  end
  return {'already', tonumber(h[2]), h[3]}
end
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return {'stale', tonumber(h[2]), ''}
end
redis.call('HSET', KEYS[1], 'state', 'succeeded', 'result', ARGV[2], 'result_digest', ARGV[3],
           'event', ARGV[4], 'model', ARGV[5], 'prompt_version', ARGV[6], 'completed_at', now,
           'updated_at', now, 'lease_until', 0, 'published', 0)
redis.call('HDEL', KEYS[1], 'error', 'dead_reason')
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
return {'ok', tonumber(ARGV[1]), ARGV[3]}
"""

# KEYS[1] task; ARGV fence, error, dead_reason ('' = failed and reclaimable) -> 'ok' | 'stale'
FAIL = NOW + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return 'stale'
end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[2], 'lease_until', 0,
             'updated_at', now)
else
  redis.call('HSET', KEYS[1], 'state', 'dead', 'error', ARGV[2], 'dead_reason', ARGV[3],
             'lease_until', 0, 'published', 0, 'updated_at', now)
end
return 'ok'
"""

# KEYS task hashes; ARGV[1] their fingerprints and ARGV[2] the coordinates of the records that
# carry them ('-': any record), each list joined by spaces (neither holds one; one argument each
# packs and sends in a fraction of the time of one per task) -> per task 1 when it is done
# (succeeded or dead) with that fingerprint and its outcome was published by another record, else 0.
# Read-only: a replay's batch asks once for all of its tasks (see Ledger.finished).
FINISHED = """
local fps, coords = {}, {}
for fp in string.gmatch(ARGV[1], '%S+') do fps[#fps + 1] = fp end
for c in string.gmatch(ARGV[2], '%S+') do coords[#coords + 1] = c end
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'state', 'fingerprint', 'published')
  if (h[1] == 'succeeded' or h[1] == 'dead') and h[2] == fps[i] and h[3] and h[3] ~= '0'
     and h[3] ~= coords[i] then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS[1] task; ARGV state expected ('succeeded' or 'dead'), by (the publishing record's
# coordinates, or '1') -> 1 marked, 0 not in that state
PUBLISHED = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'published', ARGV[2])
return 1
"""

# KEYS[1] task, KEYS[2] tools; -> 1 revived, 0 not dead. A dead task becomes claimable again, each
# step with a fresh attempt budget and no deaths counted (the task's total count stays), after an operator redrives its
# dead letter. A rejected or expired approval is dropped with it: the redriven call asks again.
REVIVE = NOW + """
if redis.call('HGET', KEYS[1], 'state') ~= 'dead' then
  return 0
end
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(f, 1, 2) == 'a:' then
    local d = cjson.decode(redis.call('HGET', KEYS[2], f))['decision']
    if d == 'rejected' or d == 'expired' then redis.call('HDEL', KEYS[2], f) end
  end
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'lease_until', 0, 'updated_at', now)
redis.call('HDEL', KEYS[1], 'dead_reason', 'deaths')
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 9) == 'attempts:' or string.sub(f, 1, 5) == 'open:' then
    redis.call('HDEL', KEYS[1], f)
  end
end
return 1
"""

# The rate limits are token buckets on the server's clock, shared by every replica: a bucket
# holds up to one minute's budget and refills continuously at the per-minute rate, so no two
# calls ever land closer together than the budget allows (fixed one-minute windows would let
# twice the budget through around a minute's edge). Fields: ts (last update, ms), req and tok
# (what is left; tok goes below zero when the endpoint reports more tokens than estimated).
BUCKETS = """
local function refill(stored, limit, elapsed)
  if limit <= 0 then return 0 end
  local left = tonumber(stored) or limit
  return math.min(limit, left + elapsed * limit / 60000)
end
local state = redis.call('HMGET', KEYS[1], 'ts', 'req', 'tok')
local elapsed = math.max(0, now - (tonumber(state[1]) or now))
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local req, tok = refill(state[2], rpm, elapsed), refill(state[3], tpm, elapsed)
local function save()
  redis.call('HSET', KEYS[1], 'ts', now, 'req', tostring(req), 'tok', tostring(tok))
  redis.call('PEXPIRE', KEYS[1], 120000)
end
"""

# Weighted fairness between tenants, only when the quota is contended. Each tenant's use of the
# endpoint (tokens when there is a tpm limit, else requests) decays with a half-life; divided by the
# tenant's weight it is the tenant's *normalized use*. A caller that is refused (no room, or it
# yields) registers its tenant as waiting, with its normalized use as score, until shortly after it
# will try again. A caller whose tenant is ahead (higher normalized use) of a tenant that waits
# yields: it is refused even when there is room, so the room goes to the tenant furthest behind and
# the tenants' shares converge to their weights. A lone tenant never waits for itself, so it may use
# the whole quota. Interactive callers yield only to interactive waiters (batch work cannot use the
# reserve anyway); batch callers yield to both. A tenant that was not waiting starts no lower than
# the least served tenant that waits: idleness banks no credit to flood the others with later.
# Keys (one hash tag, the endpoint's): fair hash (u:<tenant> use, t:<tenant> ms of that use),
# waiting zsets interactive and batch (tenant -> normalized use), their expiry zset
# ("i:<tenant>"/"b:<tenant>" -> ms), seen zset (tenant -> ms of last use, to forget idle tenants).
# Every call forgets at most 64 expired entries of each, and adds at most one: the state is bounded
# by the tenants seen in the last 20 half-lives, whatever tenant ids producers send.
FAIR = """
local fair_keys = {KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local tenant, weight, half = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local function expire_all()
  for _, k in ipairs(fair_keys) do redis.call('PEXPIRE', k, math.max(120000, math.ceil(20 * half))) end
end
local function wait_key(c) if c == 'i' then return KEYS[3] end return KEYS[4] end
local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 64)
for _, m in ipairs(gone) do
  redis.call('ZREM', wait_key(string.sub(m, 1, 1)), string.sub(m, 3))
  redis.call('ZREM', KEYS[5], m)
end
local idle = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now - 20 * half, 'LIMIT', 0, 64)
for _, t in ipairs(idle) do
  redis.call('HDEL', KEYS[2], 'u:' .. t, 't:' .. t)
  redis.call('ZREM', KEYS[6], t)
end
local f = redis.call('HMGET', KEYS[2], 'u:' .. tenant, 't:' .. tenant)
local used = tonumber(f[1]) or 0
local since = now - (tonumber(f[2]) or now)
if since > 0 then used = used * math.pow(0.5, since / half) end
local function remember(score_waiting)
  redis.call('HSET', KEYS[2], 'u:' .. tenant, tostring(used), 't:' .. tenant, now)
  redis.call('ZADD', KEYS[6], now, tenant)
  if score_waiting then
    redis.call('ZADD', KEYS[3], 'XX', used / weight, tenant)
    redis.call('ZADD', KEYS[4], 'XX', used / weight, tenant)
  end
  expire_all()
end
local function least(key)
  local r = redis.call('ZRANGE', key, 0, 1, 'WITHSCORES')
  for i = 1, #r, 2 do
    if r[i] ~= tenant then return tonumber(r[i + 1]) end
  end
  return nil
end
"""

# KEYS[1] rate-limit hash of one endpoint; KEYS[2..6] the fairness state of the endpoint (FAIR)
# ARGV rpm, tpm (0 = no limit), estimated tokens, reserved share for interactive work, priority,
#      tenant, its weight, the half-life of use in ms
# -> {wait, yielded}: wait 0 when the call may go now (and it is counted), else milliseconds until
# it may be tried again; yielded 1 when there was room but a tenant further behind waits for it.
# Batch work must leave the reserved share in each bucket, so interactive work always finds room;
# an estimate larger than a whole bucket goes once the bucket is full.
RATE = NOW + BUCKETS + FAIR + """
local est = tonumber(ARGV[3])
local class = 'b'
local reserve = 0.0
if ARGV[5] == 'interactive' then class = 'i' else reserve = tonumber(ARGV[4]) end
local wait = 0
if rpm > 0 then
  local need = math.min(rpm, 1 + reserve * rpm)
  if req < need then wait = math.max(wait, (need - req) * 60000 / rpm) end
end
if tpm > 0 then
  local need = math.min(tpm, est + reserve * tpm)
  if tok < need then wait = math.max(wait, (need - tok) * 60000 / tpm) end
end
local behind = least(KEYS[3])
if class == 'b' then
  local b = least(KEYS[4])
  if b and (not behind or b < behind) then behind = b end
end
local waiting = redis.call('ZSCORE', KEYS[3], tenant) or redis.call('ZSCORE', KEYS[4], tenant)
if behind and not waiting and used / weight < behind then used = behind * weight end
local yielded = 0
if wait <= 0 and behind and behind < used / weight then
  -- contended, and another tenant is further behind: it goes first
  yielded = 1
  -- it tries again once the buckets have refilled by one call, as a caller that found no room does
  if tpm > 0 then wait = est * 60000 / tpm end
  if rpm > 0 then wait = math.max(wait, 60000 / rpm) end
  wait = math.min(1000, math.max(5, wait))
end
if wait > 0 then
  local ms = math.max(1, math.ceil(wait))
  redis.call('ZADD', wait_key(class), used / weight, tenant)
  -- it waits until its next try (a caller sleeps at most 1 s at a time), and a little longer
  redis.call('ZADD', KEYS[5], 'GT', now + math.min(ms, 1000) + 1000, class .. ':' .. tenant)
  remember(false)
  return {ms, yielded}
end
if rpm > 0 then req = req - 1 end
if tpm > 0 then tok = tok - est end
save()
if tpm > 0 then used = used + est else used = used + 1 end
remember(true)
return {0, 0}
"""

# KEYS as RATE; ARGV rpm, tpm, token correction (actual - estimated), unused, unused, tenant,
# its weight, the half-life in ms -> tokens left. The tenant's use is corrected by as much.
RATE_RECONCILE = NOW + BUCKETS + FAIR + """
if tpm > 0 then
  local delta = tonumber(ARGV[3])
  tok = math.max(-tpm, math.min(tpm, tok - delta))
  save()
  used = math.max(0, used + delta)
  remember(true)
end
return math.floor(tok)
"""

# A tenant's hard token budget per period, across replicas. A call reserves its estimated tokens
# before it is made, atomically, so concurrent calls can never together go over the budget; the
# reservation is corrected with the tokens the endpoint reported once it answered. Periods are
# aligned to the epoch on the server's clock (a day of 86400 s is a UTC day), so every replica
# counts in the same period. Fields: period (its number), used (tokens reserved or spent in it).
# KEYS[1] the tenant's budget hash; ARGV budget, period ms, estimated tokens
# -> {granted, period, used, wait_ms}: granted 1 (reserved), 0 (over: wait_ms to the next period),
# -1 (the call alone is more than the whole budget: it can never go).
BUDGET_RESERVE = NOW + """
local limit, period_ms, est = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local period = math.floor(now / period_ms)
local h = redis.call('HMGET', KEYS[1], 'period', 'used')
local used = 0
if tonumber(h[1]) == period then used = tonumber(h[2]) or 0 end
local left_ms = (period + 1) * period_ms - now
if est > limit then return {-1, period, used, left_ms} end
if used + est > limit then return {0, period, used, left_ms} end
used = used + est
redis.call('HSET', KEYS[1], 'period', period, 'used', used)
redis.call('PEXPIRE', KEYS[1], 2 * period_ms + 60000)
return {1, period, used, 0}
"""

# KEYS[1] the tenant's budget hash; ARGV the period of the reservation, the correction (actual -
# reserved) -> tokens used in the current period. A correction for a period that has ended is
# dropped: the new period starts from what it reserved itself.
BUDGET_SETTLE = """
local h = redis.call('HMGET', KEYS[1], 'period', 'used')
if h[1] ~= ARGV[1] then return -1 end
local used = math.max(0, (tonumber(h[2]) or 0) + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'used', used)
return used
"""
