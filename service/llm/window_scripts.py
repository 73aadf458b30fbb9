"""The Redis scripts of the fleet's window (:mod:`service.llm.window`): ``ACQUIRE`` and ``SETTLE``.

Both take ``KEYS[1]`` the window hash, ``KEYS[2]`` its slots, ``KEYS[3]`` the processes refused a slot
in the last second (a sorted set scored by when) and ``KEYS[4]`` the window's memory: the hash
``safe`` (the largest window that ran a round trip full without a 429 or a timeout), ``at`` (when it
last did, in Redis time) and ``n`` (answers counted towards the next proof). The memory outlives the
window, which expires when idle, and every worker and restart reads it:

- a cold window opens at the remembered window, trusted whole while younger than ``fresh`` ms, then
  halved for every further ``fresh`` ms (never below ``initial``); its ``ssthresh`` is the
  remembered window, so a stale memory slow-starts back to it instead of from ``initial``;
- a window proves itself when as many answers as its size come back while it was full (the most
  calls open at once over the last 5 s) with no cut meanwhile: the memory becomes that window, now;
- a 429 or a timeout on a window above the trusted memory cuts it back to the memory (the probe above
  it failed, the memory stands); one at the memory while it is fresh (trusted whole) steps the
  window back one slot below it, the memory standing too (it ran a round trip full a moment ago:
  one 429 there says the window is at the limit, not that the memory is wrong);
  below the memory, or at a stale one, it is an ordinary cut, and the memory becomes the window
  after the cut. Every cut starts the count of the next proof over.

``fresh`` 0 turns the memory off: the scripts then neither read nor write ``KEYS[4]``.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "SETTLE"]

# the remembered window as trusted at ``now`` (0: nothing remembered, or the memory is off) and
# whether it is fresh (trusted whole), and remembering ``safe`` as proven at ``now``; the memory is
# kept for ten ``fresh`` periods
_MEMORY = """
local function trusted(now, fresh)
  if fresh <= 0 then return 0, false end
  local m = redis.call('HMGET', KEYS[4], 'safe', 'at')
  local safe, at = tonumber(m[1]) or 0, tonumber(m[2]) or now
  local age = now - at
  if age <= fresh then return safe, true end
  return math.floor(safe * 0.5 ^ ((age - fresh) / fresh)), false
end
local function remember(safe, now, fresh)
  redis.call('HSET', KEYS[4], 'safe', safe, 'at', now, 'n', 0)
  redis.call('PEXPIRE', KEYS[4], fresh * 10)
end
"""

# ARGV: slots' id prefix, lease ms, initial, ceiling, idle ms, the asking process, slots wanted, ramp
# ms, memory fresh ms. Grants what the window has room for, as ``<prefix>:1`` and on; in slow start a
# window without room for them grows to twice what the last ramp (or cut) left if ``ramp`` has passed
# since then: answers in between count towards that doubling, not on top of it. Keeps ``peak``, the
# most slots open at once over the last 5 s, which says whether the window is in use. A refusal adds
# the process to KEYS[3]. Returns {slots granted, cwnd as a string, open slots, now ms, 1 when another
# process was refused a slot in the last second, when the window was last cut, ms until the slow start
# may ramp again when it had no room (-1: not in a ramp)}. A cut the processes must act on (``told``) is every
# cut but a failed probe one slot above the memory.
ACQUIRE = _MEMORY + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local cwnd = tonumber(redis.call('HGET', KEYS[1], 'cwnd'))
if not cwnd then
  local ceiling = tonumber(ARGV[4])
  local ssthresh = ceiling
  cwnd = tonumber(ARGV[3])
  local fresh = tonumber(ARGV[9])
  local safe = 0
  if fresh > 0 then safe = tonumber(redis.call('HGET', KEYS[4], 'safe')) or 0 end
  if safe > 0 then
    cwnd = math.max(math.min(trusted(now, fresh), ceiling), cwnd)
    ssthresh = math.max(math.min(safe, ceiling), cwnd)
  end
  redis.call('HSET', KEYS[1], 'cwnd', cwnd, 'ssthresh', ssthresh, 'cut', 0, 'grown', now, 'base', cwnd)
end
local open = redis.call('ZCARD', KEYS[2])
local wanted = tonumber(ARGV[7])
local ramp = tonumber(ARGV[8])
local due = -1
if open + wanted > math.floor(cwnd) and ramp > 0 then
  local h = redis.call('HMGET', KEYS[1], 'ssthresh', 'cut', 'grown', 'base')
  local ssthresh, cut, grown = tonumber(h[1]) or tonumber(ARGV[4]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if cwnd < ssthresh then
    if now - math.max(cut, grown) >= ramp then
      -- at least double since the last ramp; answers counted meanwhile are part of it, not added on top
      local base = math.max(math.min(tonumber(h[4]) or cwnd, cwnd) * 2, cwnd)
      cwnd = math.min(base, ssthresh, tonumber(ARGV[4]))
      redis.call('HSET', KEYS[1], 'cwnd', tostring(cwnd), 'grown', now, 'base', cwnd)
      due = ramp
    else
      due = ramp - (now - math.max(cut, grown))
    end
  end
end
local granted = math.max(0, math.min(wanted, math.floor(cwnd) - open))
for i = 1, granted do
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1] .. ':' .. i)
end
open = open + granted
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 1000)
if granted < wanted then
  redis.call('ZADD', KEYS[3], now, ARGV[6])
end
local peak = tonumber(redis.call('HGET', KEYS[1], 'peak')) or 0
local peak_ms = tonumber(redis.call('HGET', KEYS[1], 'peak_ms')) or 0
if open > peak or now - peak_ms > 5000 then
  redis.call('HSET', KEYS[1], 'peak', open, 'peak_ms', now)
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], 2000)
local others = redis.call('ZCARD', KEYS[3])
if redis.call('ZSCORE', KEYS[3], ARGV[6]) then others = others - 1 end
local contended = 0
if others > 0 then contended = 1 end
return {granted, tostring(cwnd), open, now, contended, redis.call('HGET', KEYS[1], 'told') or '0', due}
"""

# ARGV: outcome (ok|cut|reset|none), when the call that brings it started (ms, Redis time), answered
# calls to count, initial, ceiling, floor, backoff, idle ms, the process, memory fresh ms, then the
# slots handed back. Answers grow the window one by one, as if released one at a time. Returns
# {cwnd as a string, 1 when this call cut it, now ms, 1 when another process was refused a slot in
# the last second, when the window was last cut (``told``)}.
SETTLE = _MEMORY + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local open = redis.call('ZCARD', KEYS[2])
for i = 11, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
local h = redis.call('HMGET', KEYS[1], 'peak', 'peak_ms', 'cwnd', 'ssthresh', 'cut', 'told')
local peak, peak_ms = tonumber(h[1]) or 0, tonumber(h[2]) or 0
local initial, ceiling, floor = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local fresh, answered = tonumber(ARGV[10]), tonumber(ARGV[3])
local cwnd = tonumber(h[3]) or initial
local ssthresh = tonumber(h[4]) or ceiling
local cut = tonumber(h[5]) or 0
local told = tonumber(h[6]) or 0
if open > peak or now - peak_ms > 5000 then
  peak = open
  redis.call('HSET', KEYS[1], 'peak', open, 'peak_ms', now)
end
local outcome = ARGV[1]
local changed = 0
local before = math.floor(cwnd)
for _ = 1, answered do
  if peak * 2 < math.floor(cwnd) then break end
  if cwnd < ssthresh then cwnd = cwnd + 1 else cwnd = cwnd + 1 / cwnd end
  if cwnd >= ceiling then cwnd = ceiling break end
end
if (outcome == 'cut' or outcome == 'reset') and tonumber(ARGV[2]) > cut then
  local memo, whole = trusted(now, fresh)
  if outcome == 'cut' and memo > 0 and math.floor(cwnd) > memo then
    -- the probe above the remembered window failed: back to it, the memory stands. One slot back
    -- is not news the processes must act on (hand back their kept slots); more is
    if math.floor(cwnd) > memo + 1 then told = now end
    ssthresh = math.max(math.min(memo, ceiling), floor)
    cwnd = ssthresh
  elseif outcome == 'cut' and whole and math.floor(cwnd) == memo and memo > floor then
    -- at the fresh memory: one slot back, then a slot per round trip up to it again; the memory
    -- stands, and a 429 below it is an ordinary cut
    ssthresh = memo - 1
    cwnd = ssthresh
  else
    ssthresh = math.max(math.floor(cwnd * tonumber(ARGV[7])), floor)
    if outcome == 'cut' then cwnd = ssthresh else cwnd = math.min(initial, ssthresh) end
    if outcome == 'cut' and memo > 0 then remember(ssthresh, now, fresh) end
    told = now
  end
  if fresh > 0 then
    redis.call('HSET', KEYS[4], 'n', 0)
    redis.call('PEXPIRE', KEYS[4], fresh * 10)
  end
  cut = now
  changed = 1
elseif fresh > 0 and answered > 0 and outcome ~= 'cut' and outcome ~= 'reset' and peak >= before then
  -- answers of a full window: once as many as its size came back, the window ran a round trip
  if redis.call('HINCRBY', KEYS[4], 'n', answered) >= before then
    if before >= trusted(now, fresh) then remember(before, now, fresh) else redis.call('HSET', KEYS[4], 'n', 0) end
  end
  redis.call('PEXPIRE', KEYS[4], fresh * 10)
end
redis.call('HSET', KEYS[1], 'cwnd', tostring(cwnd), 'ssthresh', ssthresh, 'cut', cut, 'told', told)
if changed == 1 then redis.call('HSET', KEYS[1], 'base', tostring(cwnd)) end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 1000)
local others = redis.call('ZCARD', KEYS[3])
if redis.call('ZSCORE', KEYS[3], ARGV[9]) then others = others - 1 end
local contended = 0
if others > 0 then contended = 1 end
return {tostring(cwnd), changed, now, contended, tostring(told)}
"""
