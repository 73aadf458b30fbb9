"""The batch lane's journal: model calls queued by group, sealed into numbered batches, each batch
submitted once and polled by one worker at a time.

A group is the calls that may share a provider batch (one endpoint and model); its keys share one
hash tag (``agent:batch:{<group>}:...``), so every script below runs unchanged on Redis Cluster:

- ``open`` (zset): the calls waiting for a batch, ``custom_id -> queued at (ms)``;
- ``lines`` (hash): ``custom_id -> {"task", "step", "line"}``: the call's task and step, and its JSONL
  request;
- ``where`` (hash): ``custom_id -> n``: the batch a sealed call went into (a call queued again after a
  crash finds its batch, and is not queued twice);
- ``sealed`` (hash): ``n -> {"ids", "state", "batch_id", "file_id", "sealed_ms", "left"}``: batch ``n``
  of the group. ``state`` is ``sealed`` (not submitted yet), ``submitted`` (its provider id journaled,
  first writer wins) or ``ended`` (every call decided);
- ``pending`` (set): the batches not ended; ``seq``: the last ``n``;
- ``lease:<n>`` (string): the worker that submits and polls batch ``n`` now (one across the fleet).

The provider never sees a batch twice for one ``n``: its name (``<group>:<n>``) goes into the batch's
metadata, and a worker that finds no id journaled asks the provider for a batch of that name first
(the crash between the provider's answer and the journal); the custom ids of its lines are the
calls' own keys, so even a second batch would answer the same calls, decided once each by the ledger.
All group names are listed in ``agent:batch:groups``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dedup.ledger import Ledger

# how long a group's keys live after their last write (a batch's window is 24 h, and a margin)
KEEP_S = 3 * 24 * 3600

_KEEP = """
local function keep(key) redis.call('EXPIRE', key, tonumber(ARGV[#ARGV])) end
"""

# KEYS open, lines, where; ARGV custom id, entry (JSON), now ms, keep s -> {'queued'|'had'|'sealed', n}
ENQUEUE = _KEEP + """
local n = redis.call('HGET', KEYS[3], ARGV[1])
if n then return {'sealed', n} end
local added = redis.call('ZADD', KEYS[1], 'NX', ARGV[3], ARGV[1])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
keep(KEYS[1]) keep(KEYS[2])
if added == 1 then return {'queued', ''} end
return {'had', ''}
"""

# KEYS open, where, sealed, pending, seq; ARGV max size, max age ms, now ms, keep s -> n | 0 (nothing due)
# Due when the group holds max size calls, or its oldest waited max age.
SEAL = _KEEP + """
local size = redis.call('ZCARD', KEYS[1])
if size == 0 then return 0 end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local max = tonumber(ARGV[1])
if size < max and tonumber(ARGV[3]) - tonumber(oldest[2]) < tonumber(ARGV[2]) then return 0 end
local ids = redis.call('ZRANGE', KEYS[1], 0, max - 1)
local n = redis.call('INCR', KEYS[5])
for _, id in ipairs(ids) do
  redis.call('HSET', KEYS[2], id, n)
  redis.call('ZREM', KEYS[1], id)
end
redis.call('HSET', KEYS[3], n, cjson.encode({ids = ids, state = 'sealed', batch_id = '', file_id = '',
  sealed_ms = tonumber(ARGV[3]), left = ids}))
redis.call('SADD', KEYS[4], n)
for i = 2, 5 do keep(KEYS[i]) end
return n
"""

# KEYS sealed; ARGV n, batch id, file id, keep s -> the batch id journaled (the first one written wins)
SUBMITTED = _KEEP + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return '' end
local b = cjson.decode(raw)
if b['batch_id'] ~= '' then return b['batch_id'] end
b['batch_id'] = ARGV[2]
b['file_id'] = ARGV[3]
b['state'] = 'submitted'
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(b))
keep(KEYS[1])
return ARGV[2]
"""

# KEYS sealed, pending, lines; ARGV n, decided custom ids (JSON list), keep s -> calls left undecided
# Once every call is decided the batch ends: it leaves ``pending`` and its request lines are dropped.
DECIDED = _KEEP + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local b = cjson.decode(raw)
local done = {}
for _, id in ipairs(cjson.decode(ARGV[2])) do done[id] = true end
local left = {}
for _, id in ipairs(b['left']) do if not done[id] then table.insert(left, id) end end
b['left'] = left
if #left == 0 then
  b['state'] = 'ended'
  redis.call('SREM', KEYS[2], ARGV[1])
  for _, id in ipairs(b['ids']) do redis.call('HDEL', KEYS[3], id) end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(b))
keep(KEYS[1])
return #left
"""

# KEYS lease; ARGV owner, ttl ms -> 1 held (taken or renewed by its owner), 0 another holds it
LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS lease; ARGV owner -> 1 released
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Sealed:
    """Batch ``n`` of a group as journaled."""

    group: str
    n: int
    ids: tuple[str, ...]
    state: str  # sealed | submitted | ended
    batch_id: str
    file_id: str
    sealed_ms: int
    left: tuple[str, ...]

    @property
    def name(self) -> str:
        """What the provider's batch carries in its metadata: how a resubmission finds it."""
        return f"{self.group}:{self.n}"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _list(value: Any) -> tuple[str, ...]:
    # cjson writes an empty table as {}
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


class Batches:
    """The batch lane's journal in one ledger's Redis."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        client = ledger.client
        self._enqueue = client.register_script(ENQUEUE)
        self._seal = client.register_script(SEAL)
        self._submitted = client.register_script(SUBMITTED)
        self._decided = client.register_script(DECIDED)
        self._lease = client.register_script(LEASE)
        self._release = client.register_script(RELEASE)

    def _key(self, group: str, suffix: str) -> str:
        return f"{self.ledger.keys.prefix}:batch:{{{group}}}:{suffix}"

    def _groups(self) -> str:
        return f"{self.ledger.keys.prefix}:batch:groups"

    async def enqueue(self, group: str, custom_id: str, task_key: str, step: str, line: str,
                      now_ms: int) -> tuple[str, int]:
        """Queue a call for the group's next batch: ('queued'|'had', 0) or ('sealed', n) when a batch
        holds it already (queued before a crash)."""
        await self.ledger.redis_call(lambda: self.ledger.client.sadd(self._groups(), group))
        raw = await self.ledger.run_script(self._enqueue, [self._key(group, s) for s in ("open", "lines", "where")],
                                           [custom_id, json.dumps({"task": task_key, "step": step, "line": line}), now_ms, KEEP_S])
        status, n = _s(raw[0]), _s(raw[1])
        return status, int(n) if n else 0

    async def groups(self) -> list[str]:
        raw = await self.ledger.redis_call(lambda: self.ledger.client.smembers(self._groups()))
        return sorted(_s(g) for g in raw)

    async def seal(self, group: str, max_size: int, max_age_ms: int, now_ms: int) -> int:
        """Seal the group's oldest calls (up to ``max_size``) into its next batch when it is due (full,
        or its oldest call waited ``max_age_ms``): its number, or 0."""
        keys = [self._key(group, s) for s in ("open", "where", "sealed", "pending", "seq")]
        return int(await self.ledger.run_script(self._seal, keys, [max_size, max_age_ms, now_ms, KEEP_S]))

    async def queued(self, group: str) -> int:
        """The group's calls not sealed into a batch yet."""
        return int(await self.ledger.redis_call(lambda: self.ledger.client.zcard(self._key(group, "open"))))

    async def where(self, group: str, custom_id: str) -> int:
        """The batch a call was sealed into; 0 while it is queued (or unknown)."""
        raw = await self.ledger.redis_call(lambda: self.ledger.client.hget(self._key(group, "where"), custom_id))
        return int(_s(raw)) if raw is not None else 0

    async def pending(self, group: str) -> list[int]:
        raw = await self.ledger.redis_call(lambda: self.ledger.client.smembers(self._key(group, "pending")))
        return sorted(int(_s(n)) for n in raw)

    async def sealed(self, group: str, n: int) -> Sealed | None:
        raw = await self.ledger.redis_call(lambda: self.ledger.client.hget(self._key(group, "sealed"), str(n)))
        if raw is None:
            return None
        b = json.loads(_s(raw))
        return Sealed(group, n, _list(b["ids"]), str(b["state"]), str(b["batch_id"]), str(b["file_id"]),
                      int(b["sealed_ms"]), _list(b["left"]))

    async def lines(self, group: str, ids: tuple[str, ...]) -> dict[str, dict[str, str]]:
        """The queued entries (``task``, ``step``, ``line``) of ``ids`` still held."""
        if not ids:
            return {}
        raw = await self.ledger.redis_call(lambda: self.ledger.client.hmget(self._key(group, "lines"), list(ids)))
        return {i: json.loads(_s(v)) for i, v in zip(ids, raw, strict=True) if v is not None}

    async def submitted(self, group: str, n: int, batch_id: str, file_id: str) -> str:
        """Journal batch ``n``'s provider id, first writer wins: the id journaled ('' for no batch ``n``)."""
        return _s(await self.ledger.run_script(self._submitted, [self._key(group, "sealed")],
                                               [n, batch_id, file_id, KEEP_S]))

    async def decided(self, group: str, n: int, ids: list[str]) -> int:
        """Mark calls of batch ``n`` decided; the calls left (0: the batch ended)."""
        keys = [self._key(group, s) for s in ("sealed", "pending", "lines")]
        return int(await self.ledger.run_script(self._decided, keys, [n, json.dumps(ids), KEEP_S]))

    async def lease(self, group: str, n: int, owner: str, ttl_ms: int) -> bool:
        """Take or renew the lease on batch ``n`` (one worker submits and polls it)."""
        return bool(int(await self.ledger.run_script(self._lease, [self._key(group, f"lease:{n}")], [owner, ttl_ms])))

    async def release(self, group: str, n: int, owner: str) -> None:
        await self.ledger.run_script(self._release, [self._key(group, f"lease:{n}")], [owner])
