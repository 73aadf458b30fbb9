"""The side-effect journal of a task: tool-call decisions, intents, results, approvals, undos, audit.

Beside a task's hash (``agent:{k}:task``) and step journal live, in the same slot:

- ``agent:{k}:tools`` (hash): ``source`` (the record that carried the task, to resume it),
  ``generation`` bumps live in the task hash; fields ``r:<step>:<round>`` (the model's tool calls
  of one round, as it asked for them), ``c:<step>:<ordinal>`` (one call: intent, then result),
  ``a:<step>:<ordinal>`` (the decision on its approval: approved, rejected, expired),
  ``o:<step>:<ordinal>`` (an operator's answer to whether it landed: landed, absent, expired),
  ``u:<step>:<ordinal>`` (its undo), ``seq`` (calls so far);
- ``agent:{k}:audit`` (list): one JSON entry per side effect and decision, append-only; entries
  past ``exported`` in the tools hash are still to be sent to the audit topic.

Records written before ``o:`` existed hold a reconcile answer at ``a:`` (overwriting the call's
approval): :func:`approval_of` and :func:`answer_of` read both layouts, each field for one meaning.

Every write a worker makes carries its fence and is refused for an older one; the audit entry of a
result is appended even then, because the effect happened whoever reports it. A task waiting for a
person is in state ``waiting_approval`` (``waiting`` holds what it waits for), listed in the sorted
set ``agent:parked`` (by deadline), and becomes ``resuming`` (claimable) once decided. The moves of
a parked task (:data:`~dedup.lifecycles.parked.PARKED`) and of a call's result
(:data:`~dedup.lifecycles.tool_call.TOOL_CALL`) are the tables': each script below that makes one
is handed, as arguments, the states its move may start from and the one it leads to.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from redis.commands.core import AsyncScript

from dedup.client import RedisClient
from dedup.keys import Keys
from dedup.lifecycles.machine import IllegalTransition
from dedup.lifecycles.parked import DECISIONS, LEDGER_STATE, PARKED, WAITING, ledger_states
from dedup.lifecycles.task import TASK
from dedup.lifecycles.tool_call import OUTCOME_EVENT, TOOL_CALL

T = TypeVar("T")


class Ledger(Protocol):
    """What the journal uses of :class:`dedup.ledger.Ledger`: its client, keys and error translation."""

    client: RedisClient
    keys: Keys

    async def redis_call(self, op: Callable[[], Awaitable[T]]) -> T: ...

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any: ...


_FENCED = """
local h = redis.call('HMGET', KEYS[1], 'state', 'fence')
local held = h[1] == 'running' and tonumber(h[2]) == tonumber(ARGV[1])
"""

_KEEP = """
local function keep(key)
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
"""

# KEYS task, tools; ARGV fence, field, value, source (JSON or '') -> {'ok'|'had'|'stale', value}
# First writer wins: a round the model already decided, or a call already intended, is never
# replaced; the holder continues with what is recorded.
FIRST = _FENCED + _KEEP + """
if not held then return {'stale', ''} end
local had = redis.call('HGET', KEYS[2], ARGV[2])
if had then return {'had', had} end
local value = ARGV[3]
if string.sub(ARGV[2], 1, 2) == 'c:' then
  local record = cjson.decode(value)
  record['seq'] = redis.call('HINCRBY', KEYS[2], 'seq', 1)
  value = cjson.encode(record)
end
redis.call('HSET', KEYS[2], ARGV[2], value)
if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[2], 'source', ARGV[4]) end
keep(KEYS[2])
return {'ok', value}
"""

# KEYS task, tools, audit; ARGV fence, field, record (JSON), audit entry (JSON), journal states the
# result may follow... -> 'ok'|'stale'|'illegal' (the call is in none of those states: nothing written)
# The audit entry is appended in every case (a stale holder's call happened too), accepted only when written.
DONE = _FENCED + _KEEP + """
local had = redis.call('HGET', KEYS[2], ARGV[2])
local from = had and cjson.decode(had)['state'] or ''
local allowed = false
for i = 5, #ARGV do if from == ARGV[i] then allowed = true end end
local entry = cjson.decode(ARGV[4])
entry['accepted'] = held and allowed
redis.call('RPUSH', KEYS[3], cjson.encode(entry))
keep(KEYS[3])
if not held then return 'stale' end
if not allowed then return 'illegal' end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
keep(KEYS[2])
return 'ok'
"""

# KEYS task, steps, tools, audit; ARGV fence, waiting (JSON), keep_s, state (the wait's) -> 'ok'|'stale'
# A parked task's keys live at least keep_s (its wait and a margin): a wait longer than the
# ledger's TTL must not let the task vanish before its deadline decides it.
PARK = _FENCED + """
if not held then return 'stale' end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'waiting', ARGV[2], 'lease_until', 0)
local keep = tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  local ttl = redis.call('TTL', key)
  if ttl > 0 and ttl < keep then redis.call('EXPIRE', key, keep) end
end
return 'ok'
"""

# KEYS parked; ARGV task key, score -> 1 removed, 0 (listed at another score, or not listed)
UNLIST_AT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""

def listing_score(deadline_ms: float, fence: int) -> float:
    """Where a wait is listed in ``agent:parked``: its deadline, plus a fraction of a millisecond
    that the holder's fence sets (k/1024, exact in a double at today's epoch milliseconds). Two waits
    of one task with one deadline (a parent parked again with its fixed deadline) are listed at two
    scores, so the end of the first (:meth:`Effects.unlist_at`) never unlists the second."""
    return float(deadline_ms) + (fence % 1023 + 1) / 1024


# how much longer than its wait a parked task's keys live (the sweeper's turn, an outage of it)
PARK_MARGIN_S = 24 * 3600

# KEYS task, tools, audit; ARGV waiting (as read), field, decision (JSON), audit entry (JSON), state
# (the decision's), states it may be taken in... -> {'ok', source} | {'not_waiting', state}.
# Once: a second decision finds the task resuming.
RESOLVE = _KEEP + """
local h = redis.call('HMGET', KEYS[1], 'state', 'waiting')
local waiting = false
for i = 6, #ARGV do if h[1] == ARGV[i] then waiting = true end end
if not waiting or h[2] ~= ARGV[1] then return {'not_waiting', h[1] or ''} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'state', ARGV[5])
redis.call('HDEL', KEYS[1], 'waiting')
redis.call('RPUSH', KEYS[3], ARGV[4])
keep(KEYS[3])
return {'ok', redis.call('HGET', KEYS[2], 'source') or ''}
"""

# KEYS task, tools, audit; ARGV field, state ('intent'|'done'), record (JSON), audit entry (JSON or ''),
# the task's busy states... -> 'ok' | 'done' (the undo finished before) | 'busy' (the task runs or is
# parked: compensate it once it ended)
UNDO = _KEEP + """
local state = redis.call('HGET', KEYS[1], 'state')
for i = 5, #ARGV do if state == ARGV[i] then return 'busy' end end
local had = redis.call('HGET', KEYS[2], ARGV[1])
if had and cjson.decode(had)['state'] == 'done' then return 'done' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[4])
  keep(KEYS[3])
end
return 'ok'
"""

# KEYS task, steps, tools, archive; ARGV state (the rerun's), ended states... -> {'ok', source} |
# {'not_ended', state}
# A compensated task runs again as a new generation: its step journal is dropped, its tool journal
# kept under the archive key, and its tool calls get new keys (the generation is part of them).
RERUN = """
local state = redis.call('HGET', KEYS[1], 'state')
local ended = false
for i = 2, #ARGV do if state == ARGV[i] then ended = true end end
if not ended then return {'not_ended', state or ''} end
local source = redis.call('HGET', KEYS[3], 'source')
if not source then return {'not_ended', 'no source'} end
redis.call('HSET', KEYS[1], 'generation', tonumber(redis.call('HGET', KEYS[1], 'generation') or '1') + 1)
redis.call('DEL', KEYS[2])
redis.call('RENAME', KEYS[3], KEYS[4])
redis.call('HSET', KEYS[3], 'source', source)
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'lease_until', 0)
redis.call('HDEL', KEYS[1], 'published', 'published_by', 'published_how')  -- the new generation's outcome is not
redis.call('HDEL', KEYS[1], 'result', 'result_digest', 'event', 'error', 'dead_reason', 'completed_at')
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 9) == 'attempts:' then redis.call('HDEL', KEYS[1], f) end
end
return {'ok', source}
"""

# KEYS tools; ARGV count: moves ``exported`` forward, never back (exporters may race)
EXPORTED = """
if tonumber(redis.call('HGET', KEYS[1], 'exported') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'exported', ARGV[1])
end
return 1
"""


# the task's states in which its side effects must not be compensated: it runs, or it is parked
BUSY = ("running", *ledger_states(PARKED.states))
# a tool call's state as its journal record holds it (``state``), where a result may be written over it
JOURNAL_STATE = {"intended": "intent", "unknown": "intent"}
# the field of a decision, by what the call waited for (``waiting.what``); a parent's wait for its
# children is decided by the fold of the last reply (:mod:`dedup.children`) or, past its deadline,
# ``expired`` at ``w:<step>:0``
DECISION_PREFIX = {"approval": "a:", "reconcile": "o:", "children": "w:", "batch": "b:"}


def decision_field(what: str, step: str, ordinal: int) -> str:
    """Where the decision on a call that waited for ``what`` is journaled."""
    return f"{DECISION_PREFIX[what]}{step}:{ordinal}"


def approval_of(journal: dict[str, Any], step: str, ordinal: int) -> dict[str, Any] | None:
    """The decision on the call's approval (approved, rejected, expired), or None."""
    decision = journal.get(decision_field("approval", step, ordinal))
    return decision if isinstance(decision, dict) and decision.get("decision") in DECISIONS["approval"] else None


def answer_of(journal: dict[str, Any], step: str, ordinal: int) -> dict[str, Any] | None:
    """An operator's answer to whether the call landed (landed, absent, expired), or None.

    A record written before ``o:`` existed holds it at ``a:``, over the call's approval. Read where
    only an intended call is (an approval's expiry or rejection never lets a call be intended), an
    answer's decision tells it from the approval (``approved``) it replaced."""
    answer = journal.get(decision_field("reconcile", step, ordinal))
    if answer is None:
        answer = journal.get(decision_field("approval", step, ordinal))
    return answer if isinstance(answer, dict) and answer.get("decision") in DECISIONS["reconcile"] else None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Effects:
    """The journal of one ledger's side effects (its client, keys and error translation)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        client = ledger.client
        self._first = client.register_script(FIRST)
        self._done = client.register_script(DONE)
        self._park = client.register_script(PARK)
        self._resolve = client.register_script(RESOLVE)
        self._undo = client.register_script(UNDO)
        self._rerun = client.register_script(RERUN)
        self._exported = client.register_script(EXPORTED)
        self._unlist_at = client.register_script(UNLIST_AT)

    def _keys(self, task_key: str) -> list[str]:
        keys = self.ledger.keys
        return [keys.task(task_key), keys.tools(task_key), keys.audit(task_key)]

    async def first(self, task_key: str, fence: int, field: str, value: dict[str, Any],
                    source: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Record ``value`` at ``field`` unless something is there: ('ok'|'had', what is recorded),
        or ('stale', {}) when a newer claim holds the task."""
        raw = await self.ledger.run_script(self._first, self._keys(task_key)[:2], [
            fence, field, _dumps(value), _dumps(source) if source is not None else ""])
        status, recorded = _s(raw[0]), _s(raw[1])
        return status, (json.loads(recorded) if recorded else {})

    async def done(self, task_key: str, fence: int, field: str, record: dict[str, Any],
                   audit: dict[str, Any]) -> bool:
        """Record a call's result under ``fence`` and append its audit entry (always); False: stale.

        The result's outcome is a move of :data:`TOOL_CALL`: a call in none of the states it may start
        from (not intended) keeps its record, and :class:`IllegalTransition` is raised."""
        event = OUTCOME_EVENT[str(record.get("outcome"))]
        sources = [JOURNAL_STATE[s] for s in TOOL_CALL.sources(event) if s in JOURNAL_STATE]
        raw = await self.ledger.run_script(self._done, self._keys(task_key), [fence, field, _dumps(record),
                                                                            _dumps(audit), *dict.fromkeys(sources)])
        if _s(raw) == "illegal":
            raise IllegalTransition(TOOL_CALL.name, f"the record at {field}", event)
        return _s(raw) == "ok"

    async def park(self, task_key: str, fence: int, waiting: dict[str, Any]) -> bool:
        """Park the task until ``waiting`` is decided; listed by deadline. False: a newer claim holds it.

        Its keys are kept until its deadline and :data:`PARK_MARGIN_S` after, whatever the ledger's TTL.
        ``waiting["what"]`` names the move of :data:`PARKED` (``park_approval``, ``park_reconcile``)."""
        state = LEDGER_STATE[PARKED.move(PARKED.initial, f"park_{waiting['what']}")]
        keys = self.ledger.keys
        deadline = float(waiting.get("deadline_ms", 0))
        wait_s = max(0.0, deadline - float(waiting.get("since_ms", deadline))) / 1000
        keep_s = math.ceil(wait_s) + PARK_MARGIN_S
        # listed first: a listed task that is not waiting is skipped (and dropped) by the sweeper,
        # a waiting task that is not listed would never expire
        score = listing_score(deadline, fence)
        await self.ledger.redis_call(lambda: self.ledger.client.zadd(keys.parked(), {task_key: score}))
        raw = await self.ledger.run_script(self._park, [keys.task(task_key), keys.steps(task_key), keys.tools(task_key),
                                                     keys.audit(task_key)], [fence, _dumps(waiting), keep_s,
                                                                             state])
        return _s(raw) == "ok"

    async def resolve(self, task_key: str, waiting_raw: str, decision: dict[str, Any],
                      audit: dict[str, Any]) -> tuple[str, str]:
        """Decide what a parked task waits for (``waiting_raw``, as read), once: ('ok', its source) or
        ('not_waiting', its state). ``decision["decision"]`` is a move of :data:`PARKED` from the wait's
        state (:class:`IllegalTransition` when the table has none); it is journaled at the field of
        what the task waits for (:func:`decision_field`)."""
        waiting = json.loads(waiting_raw)
        event = str(decision["decision"])
        target = PARKED.move(WAITING.get(str(waiting["what"]), str(waiting["what"])), event)
        field = decision_field(waiting["what"], waiting["step"], waiting["ordinal"])
        raw = await self.ledger.run_script(self._resolve, self._keys(task_key), [
            waiting_raw, field, _dumps(decision), _dumps(audit), LEDGER_STATE[target],
            *ledger_states(PARKED.sources(event))])
        return _s(raw[0]), _s(raw[1])

    async def parked(self, limit: int = 1000, until_ms: float | None = None) -> list[tuple[str, float]]:
        """Listed parked tasks with their deadlines (ms), earliest first; up to ``until_ms`` if given."""
        key = self.ledger.keys.parked()
        high: float | str = until_ms if until_ms is not None else "+inf"
        raw: list[Any] = await self.ledger.redis_call(lambda: self.ledger.client.zrangebyscore(
            key, "-inf", high, start=0, num=limit, withscores=True))
        return [(_s(item[0]), float(item[1])) for item in raw]

    async def parked_count(self) -> int:
        return int(await self.ledger.redis_call(lambda: self.ledger.client.zcard(self.ledger.keys.parked())))

    async def relist(self, task_key: str, at_ms: float, *, keep: bool = False) -> None:
        """List the task for the sweeper at ``at_ms`` (a decision whose resumption was not produced);
        with ``keep``, a task listed already keeps its time (a parked task, its deadline)."""
        await self.ledger.redis_call(lambda: self.ledger.client.zadd(self.ledger.keys.parked(), {task_key: at_ms},
                                                                nx=keep))

    async def unlist_at(self, task_key: str, at_ms: float) -> bool:
        """Unlist the task only if it is still listed at ``at_ms``: one listed again meanwhile (parked
        with its deadline) stays."""
        raw = await self.ledger.run_script(self._unlist_at, [self.ledger.keys.parked()], [task_key, at_ms])
        return bool(int(raw))

    async def listed_at(self, task_key: str) -> float | None:
        """The time the task is listed at for the sweeper (ms), or None when it is not listed."""
        raw = await self.ledger.redis_call(lambda: self.ledger.client.zscore(self.ledger.keys.parked(), task_key))
        return float(raw) if raw is not None else None

    async def unlist(self, task_key: str) -> None:
        await self.ledger.redis_call(lambda: self.ledger.client.zrem(self.ledger.keys.parked(), task_key))

    async def journal(self, task_key: str) -> dict[str, Any]:
        """The tools hash, JSON fields decoded."""
        raw = await self.ledger.redis_call(lambda: self.ledger.client.hgetall(self.ledger.keys.tools(task_key)))
        out: dict[str, Any] = {}
        for k, v in raw.items():
            name, text = _s(k), _s(v)
            out[name] = json.loads(text) if name[:2] in ("r:", "c:", "a:", "o:", "u:", "w:", "b:") or name == "source" else text
        return out

    async def audit(self, task_key: str, start: int = 0) -> list[dict[str, Any]]:
        raw = await self.ledger.redis_call(lambda: self.ledger.client.lrange(self.ledger.keys.audit(task_key), start, -1))
        return [json.loads(_s(item)) for item in raw]

    async def exported(self, task_key: str) -> int:
        raw = await self.ledger.redis_call(lambda: self.ledger.client.hget(self.ledger.keys.tools(task_key), "exported"))
        return int(_s(raw)) if raw is not None else 0

    async def mark_exported(self, task_key: str, count: int) -> None:
        """Note that the first ``count`` audit entries reached the topic (only ever forward)."""
        await self.ledger.run_script(self._exported, [self.ledger.keys.tools(task_key)], [count])

    async def undo(self, task_key: str, field: str, record: dict[str, Any], audit: dict[str, Any] | None) -> str:
        raw = await self.ledger.run_script(self._undo, self._keys(task_key), [
            field, record.get("state", ""), _dumps(record), _dumps(audit) if audit is not None else "", *BUSY])
        return _s(raw)

    async def rerun(self, task_key: str, generation: int) -> tuple[str, str]:
        """Start the task again as generation ``generation + 1``: ('ok', source) or ('not_ended', state)."""
        keys = self.ledger.keys
        raw = await self.ledger.run_script(self._rerun, [
            keys.task(task_key), keys.steps(task_key), keys.tools(task_key),
            f"{keys.tools(task_key)}:g{generation}"], [LEDGER_STATE[PARKED.move(PARKED.initial, "rerun")],
                                                       *TASK.sources("rerun")])
        return _s(raw[0]), _s(raw[1])


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
