"""Lua snippets the ledger's scripts share: the server's clock, a state among a table's sources,
and who published a task's outcome."""

from __future__ import annotations

# ``now``: milliseconds on the server's clock, never a worker's
NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ``among(states, state)``: whether ``state`` is one of ``states``, the space-joined states an event
# may start from (:meth:`dedup.lifecycles.Lifecycle.sources`, handed in as an argument)
AMONG = """
local function among(states, state)
  if not state then return false end
  for s in string.gmatch(states, '%S+') do
    if s == state then return true end
  end
  return false
end
"""

# ``among_set(states)``: the space-joined states of :data:`AMONG` as a set (``set[state]`` true), for a
# script that asks about many tasks: split once, not once per task
AMONG_SET = """
local function among_set(states)
  local set = {}
  for s in string.gmatch(states, '%S+') do set[s] = true end
  return set
end
"""

# ``published(by, how, legacy)``: who published the outcome and how, from the fields published_by,
# published_how and the previous version's published ('0' or absent: not published; else who).
# This version writes published beside published_by with the same value; where they differ, a
# worker of the previous version wrote published after: it is the newer and wins.
# '' for none (a nil would cut a reply short).
PUBLICATION = """
local function published(by, how, legacy)
  if legacy and legacy ~= by then
    if legacy == '0' or legacy == '' then return '', '' end
    return legacy, ''
  end
  if not by then return '', '' end
  return by, how or ''
end
"""

# the task is not published (any more): its outcome is new, or it has none
UNPUBLISH = """
redis.call('HDEL', KEYS[1], 'published', 'published_by', 'published_how')
"""
