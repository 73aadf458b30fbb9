"""Lua scripts of the shared model quotas: per-endpoint rate limits with weighted fairness between
tenants, and each tenant's hard token budget. Each runs atomically on the Redis server, on its clock.
"""

from __future__ import annotations

from dedup.lua import NOW

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
