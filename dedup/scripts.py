"""Lua scripts of the ledger. Each runs atomically on the Redis server.

Time comes from the server (``TIME``), never from the workers, so leases do not depend on the
workers' clocks agreeing. Every write that a worker makes under a claim carries the fence it was
given; a write with an older fence is refused (the script answers ``stale``).

Task hash fields: state, fence, owner, lease_until (ms), fingerprint, kind, attempts, claims,
result, result_digest, event, published, error, dead_reason, model, prompt_version, created_at,
updated_at, completed_at.
"""

from __future__ import annotations

NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] task hash, KEYS[2] steps hash
# ARGV fingerprint, owner, lease_ms, kind, ttl_s
# -> {decision, fence, attempts, lease_remaining_ms, published} (published: '0', or who published)
CLAIM = NOW + """
local fp = ARGV[1]
local lease = tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], 'state', 'running', 'fence', 1, 'owner', ARGV[2],
             'lease_until', now + lease, 'fingerprint', fp, 'kind', ARGV[4],
             'attempts', 0, 'claims', 1, 'published', 0, 'created_at', now, 'updated_at', now)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {'claimed', 1, 0, lease, '0'}
end
local h = redis.call('HMGET', KEYS[1], 'fingerprint', 'fence', 'attempts', 'lease_until', 'published')
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
redis.call('HSET', KEYS[1], 'state', 'running', 'fence', fence, 'owner', ARGV[2],
           'lease_until', now + lease, 'updated_at', now)
redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {'claimed', fence, attempts, lease, published}
"""

# KEYS[1] task; ARGV fence, lease_ms -> 1 extended, 0 lost
HEARTBEAT = NOW + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]), 'updated_at', now)
return 1
"""

# KEYS[1] task; ARGV fence, lease_ms, step, max_attempts
# -> {step attempts after increment, task attempts}; {-1, n} when the fence is stale;
#    {-2, n} when the step has used all of its attempts (nothing is counted then).
# Counts one model call against the task and its step, durably, before it is made: a redelivery
# or a restart does not reset the count.
ATTEMPT = NOW + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence', 'attempts:' .. ARGV[3], 'attempts')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return {-1, tonumber(h[4]) or 0}
end
if (tonumber(h[3]) or 0) >= tonumber(ARGV[4]) then
  return {-2, tonumber(h[4]) or 0}
end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]), 'updated_at', now)
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
if (tonumber(h[3]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'attempts:' .. ARGV[2], -1)
end
if (tonumber(h[4]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
return 1
"""

# KEYS[1] task, KEYS[2] steps; ARGV fence, step name, step record (JSON) -> 'ok' | 'stale'
STEP = """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(ARGV[1]) then
  return 'stale'
end
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
# step with a fresh attempt budget (the task's total count stays), after an operator redrives its
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
redis.call('HDEL', KEYS[1], 'dead_reason')
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 9) == 'attempts:' then
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

# KEYS[1] rate-limit hash of one endpoint
# ARGV rpm, tpm (0 = no limit), estimated tokens, reserved share for interactive work, priority
# -> 0 when the call may go now (and it is counted), else milliseconds until it may be tried again.
# Batch work must leave the reserved share in each bucket, so interactive work always finds room;
# an estimate larger than a whole bucket goes once the bucket is full.
RATE = NOW + BUCKETS + """
local est = tonumber(ARGV[3])
local reserve = 0.0
if ARGV[5] ~= 'interactive' then reserve = tonumber(ARGV[4]) end
local wait = 0
if rpm > 0 then
  local need = math.min(rpm, 1 + reserve * rpm)
  if req < need then wait = math.max(wait, (need - req) * 60000 / rpm) end
end
if tpm > 0 then
  local need = math.min(tpm, est + reserve * tpm)
  if tok < need then wait = math.max(wait, (need - tok) * 60000 / tpm) end
end
if wait > 0 then return math.max(1, math.ceil(wait)) end
if rpm > 0 then req = req - 1 end
if tpm > 0 then tok = tok - est end
save()
return 0
"""

# KEYS[1] rate-limit hash; ARGV rpm, tpm, token correction (actual - estimated) -> tokens left
RATE_RECONCILE = NOW + BUCKETS + """
if tpm > 0 then
  tok = math.max(-tpm, math.min(tpm, tok - tonumber(ARGV[3])))
  save()
end
return math.floor(tok)
"""
