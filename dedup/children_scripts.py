"""Lua scripts of a delegating parent's side of the ledger (:mod:`dedup.children`).

They keep, in the parent's tools hash (``agent:{k}:tools``, the slot of its task): ``d:<step>``, the
step's plan (``[{"n", "id", "kind", "topic"}]``, first writer wins) and ``k:<step>:<n>``, the folded
reply of child ``n`` (first writer wins); ``source`` is the record that carried the parent (kept
as :mod:`dedup.effects` keeps it). A script that moves the parent's ``state`` is handed the states
its event may start from and the one it leads to, from :data:`dedup.lifecycles.task.TASK`.
"""

from __future__ import annotations

from dedup.lua import AMONG, NOW

__all__ = ["FOLD", "PARK", "PLAN"]

# ``keep(key)``: the key lives as long as the task's hash (KEYS[1])
_KEEP = """
local function keep(key)
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
"""

# ``ended(tools, step, plan)``: whether every child of the plan (decoded) has a folded reply
_ENDED = """
local function ended(tools, step, plan)
  for _, child in ipairs(plan) do
    if redis.call('HEXISTS', tools, 'k:' .. step .. ':' .. tostring(child['n'])) == 0 then return false end
  end
  return true
end
"""

# KEYS task, tools; ARGV fence, step, plan (JSON), source (JSON or ''), the states a holder plans in
# -> {'ok'|'had'|'stale', the plan journaled}
# The holder's plan, first writer wins: a crash or a replay finds the plan it sent before.
PLAN = _KEEP + AMONG + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if not among(ARGV[5], h[1]) or tonumber(h[2]) ~= tonumber(ARGV[1]) then return {'stale', ''} end
local field = 'd:' .. ARGV[2]
local had = redis.call('HGET', KEYS[2], field)
if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[2], 'source', ARGV[4]) end
if had then return {'had', had} end
redis.call('HSET', KEYS[2], field, ARGV[3])
keep(KEYS[2])
return {'ok', ARGV[3]}
"""

# KEYS task, steps, tools, audit; ARGV fence, step, waiting (JSON), keep_s, the sources and target
# of 'park_children' -> 'parked' | 'ended' (every child of the plan has a folded reply: the task
# stays as it is) | 'stale' (not held under this fence in a state it parks from) | 'unplanned'
# A parked task's keys live at least keep_s (its wait and a margin), as dedup.effects.PARK's.
PARK = NOW + AMONG + _ENDED + """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
if not among(ARGV[5], h[1]) or tonumber(h[2]) ~= tonumber(ARGV[1]) then return 'stale' end
local plan = redis.call('HGET', KEYS[3], 'd:' .. ARGV[2])
if not plan then return 'unplanned' end
if ended(KEYS[3], ARGV[2], cjson.decode(plan)) then return 'ended' end
redis.call('HSET', KEYS[1], 'state', ARGV[6], 'waiting', ARGV[3], 'lease_until', 0, 'updated_at', now)
local keep = tonumber(ARGV[4])
for _, key in ipairs(KEYS) do
  local ttl = redis.call('TTL', key)
  if ttl > 0 and ttl < keep then redis.call('EXPIRE', key, keep) end
end
return 'parked'
"""

# KEYS task, tools; ARGV step, n, child id, reply (JSON), the sources and target of 'children_ended'
# -> {'folded'|'again'|'unplanned', the parent's source record when this fold ended its wait, else ''}
# A reply is folded once (first writer wins), and only for a child of the step's plan with that id
# (a reply of a child of an earlier generation is not). When every child of the plan has a reply and
# the parent waits on that very step, it moves on (decided: still listed until its record is produced).
FOLD = NOW + AMONG + _KEEP + _ENDED + """
local plan = redis.call('HGET', KEYS[2], 'd:' .. ARGV[1])
if not plan then return {'unplanned', ''} end
plan = cjson.decode(plan)
local known = false
for _, child in ipairs(plan) do
  if tostring(child['n']) == ARGV[2] and child['id'] == ARGV[3] then known = true end
end
if not known then return {'unplanned', ''} end
local status = 'again'
if redis.call('HSETNX', KEYS[2], 'k:' .. ARGV[1] .. ':' .. ARGV[2], ARGV[4]) == 1 then
  status = 'folded'
  keep(KEYS[2])
end
local h = redis.call('HMGET', KEYS[1], 'state', 'waiting')
if not among(ARGV[5], h[1]) or not h[2] then return {status, ''} end
if cjson.decode(h[2])['step'] ~= ARGV[1] or not ended(KEYS[2], ARGV[1], plan) then return {status, ''} end
redis.call('HSET', KEYS[1], 'state', ARGV[6], 'updated_at', now)
redis.call('HDEL', KEYS[1], 'waiting')
return {status, redis.call('HGET', KEYS[2], 'source') or ''}
"""
