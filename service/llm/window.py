"""How many model calls the whole fleet has open on one endpoint: a window that starts small and
follows the endpoint's answers, the way TCP shares a link (slow start, then AIMD).

Every replica takes a slot from one window per endpoint, kept in Redis, before each call and gives
it back after. The window is in the hash ``<prefix>:endpoint:{<digest>}:window`` (``cwnd``,
``ssthresh``, ``cut``: when it was last cut, in Redis time); the open calls in the sorted set
``...:slots`` (a slot per call, scored by when its lease ends, so a replica that dies mid-call
frees its slots when their leases run out):

- **slow start**: a cold window (none in Redis, or idle for ``idle_s``) opens ``initial`` slots and
  grows by one per answered call, doubling every round trip, up to ``ssthresh``;
- **additive increase**: above ``ssthresh`` it grows by ``1/cwnd`` per answer, one slot per round
  trip;
- **multiplicative decrease**: a 429 or a timeout cuts it to ``backoff`` times its size (and sets
  ``ssthresh`` there). Only calls that started after the last cut can cut it again: the calls
  already open when the endpoint said "too many" answer with the same news, and one cut per
  round trip is what TCP does too;
- **after an outage** (the breaker opened, or the endpoint cannot serve: a revoked key, nothing
  listening) the window starts over at ``initial``, below a ``ssthresh`` of half its size, so a
  fleet coming back ramps up instead of opening every slot at once;
- a window grows only while it is at least half used (the most calls open at once over the last
  5 s), so a quiet hour does not leave a window
  of thousands that a sudden backlog would open all at once.

Calls a worker may have open are still capped by its own limit (``AGENT_MAX_IN_FLIGHT``, see
:mod:`service.runtime.limits`); ``maximum`` caps the fleet's window (0: no fleet-wide cap).

While the window has room every call asks Redis for its slot at once. Once one has to wait, the
calls of the process queue and only the first asks Redis again (when a slot of the process is freed,
or after a short, growing pause), so a full window costs one Redis call per freed slot or poll, not
one per waiting task. Interactive calls queue apart and go first: a batch call asks only while no
interactive call of its process waits (across replicas the window has no priorities).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Literal

from redis.exceptions import RedisError

from dedup.client import RedisClient
from dedup.keys import Keys
from dedup.ledger import LedgerUnavailable
from service.core.metrics import Metrics
from service.llm.guard import endpoint_tag

log = logging.getLogger(__name__)

NO_CEILING = 1_000_000

# KEYS[1] window hash, KEYS[2] slots; ARGV: slot, lease ms, initial, ceiling, idle ms. Keeps ``peak``,
# the most slots open at once over the last 5 s, which says whether the window is in use.
# Returns {granted 0|1, cwnd as a string, open slots, now ms}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local cwnd = tonumber(redis.call('HGET', KEYS[1], 'cwnd'))
if not cwnd then
  cwnd = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'cwnd', cwnd, 'ssthresh', ARGV[4], 'cut', 0)
end
local open = redis.call('ZCARD', KEYS[2])
local granted = 0
if open < math.floor(cwnd) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  open = open + 1
  granted = 1
end
local peak = tonumber(redis.call('HGET', KEYS[1], 'peak')) or 0
local peak_ms = tonumber(redis.call('HGET', KEYS[1], 'peak_ms')) or 0
if open > peak or now - peak_ms > 5000 then
  redis.call('HSET', KEYS[1], 'peak', open, 'peak_ms', now)
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {granted, tostring(cwnd), open, now}
"""

# KEYS as above; ARGV: slot, outcome (ok|cut|reset|none), when the call started (ms, Redis time),
# initial, ceiling, floor, backoff, idle ms. Returns {cwnd as a string, 1 when this call cut it}.
RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[2], ARGV[1])
local peak = tonumber(redis.call('HGET', KEYS[1], 'peak')) or 0
local initial, ceiling, floor = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cwnd = tonumber(redis.call('HGET', KEYS[1], 'cwnd')) or initial
local ssthresh = tonumber(redis.call('HGET', KEYS[1], 'ssthresh')) or ceiling
local cut = tonumber(redis.call('HGET', KEYS[1], 'cut')) or 0
local outcome = ARGV[2]
local changed = 0
if outcome == 'ok' then
  if peak * 2 >= math.floor(cwnd) then
    if cwnd < ssthresh then cwnd = cwnd + 1 else cwnd = cwnd + 1 / cwnd end
    if cwnd > ceiling then cwnd = ceiling end
  end
elseif (outcome == 'cut' or outcome == 'reset') and tonumber(ARGV[3]) > cut then
  ssthresh = math.max(math.floor(cwnd * tonumber(ARGV[7])), floor)
  if outcome == 'cut' then cwnd = ssthresh else cwnd = math.min(initial, ssthresh) end
  cut = now
  changed = 1
end
redis.call('HSET', KEYS[1], 'cwnd', tostring(cwnd), 'ssthresh', ssthresh, 'cut', cut)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return {tostring(cwnd), changed}
"""

Outcome = Literal["ok", "rate_limited", "timeout", "outage", "none"]
_SCRIPT_OUTCOME = {"ok": "ok", "rate_limited": "cut", "timeout": "cut", "outage": "reset", "none": "none"}


@dataclass(frozen=True, slots=True)
class Slot:
    id: str
    started_ms: int


class AdaptiveWindow:
    """The fleet's window of open calls on one endpoint (see the module docstring)."""

    def __init__(
        self,
        redis: RedisClient,
        endpoint: str,
        metrics: Metrics,
        *,
        label: str,
        initial: int = 4,
        maximum: int = 0,
        backoff: float = 0.7,
        lease_s: float = 60.0,
        idle_s: float = 600.0,
        key_prefix: str = "agent",
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.label = label
        self.initial = initial
        self.ceiling = maximum or NO_CEILING
        self.backoff = backoff
        self.lease_ms = max(1, int(lease_s * 1000))
        self.idle_ms = max(self.lease_ms, int(idle_s * 1000))
        keys = Keys(key_prefix)
        tag = endpoint_tag(endpoint)
        self.keys = [keys.endpoint(tag, "window"), keys.endpoint(tag, "slots")]
        self._acquire = redis.register_script(ACQUIRE)
        self._release = redis.register_script(RELEASE)
        self._head = asyncio.Lock()  # the one batch waiter in this process that asks Redis
        self._urgent_head = asyncio.Lock()  # the one interactive waiter that asks Redis
        self._urgent = 0  # interactive calls waiting here: batch waiters let them go first
        self._no_urgent = asyncio.Event()
        self._freed = asyncio.Event()  # a slot of this process was given back
        self.size = float(initial)  # the window as this process last saw it
        # the children every call updates, looked up once (labels() validates and locks on each call)
        self._size_gauge = metrics.llm_window.labels(endpoint=label)
        self._waits = metrics.llm_window_waits.labels(endpoint=label)
        self._size_gauge.set(initial)

    async def acquire(self, priority: str = "batch") -> Slot:
        """Wait for a slot in the fleet's window; the caller must :meth:`release` it. While calls of
        this process wait, ``interactive`` ones get the slots before ``batch`` ones."""
        slot_id = uuid.uuid4().hex
        if priority == "interactive":
            if not self._urgent_head.locked():  # no other interactive call waits: ask at once
                slot = await self._try(slot_id)
                if slot is not None:
                    return slot
            self._urgent += 1
            try:
                async with self._urgent_head:
                    return await self._poll(slot_id, urgent=True)
            finally:
                self._urgent -= 1
                if not self._urgent:
                    self._no_urgent.set()
        if not self._head.locked() and not self._urgent:  # nobody here waits: ask at once
            slot = await self._try(slot_id)
            if slot is not None:
                return slot
        async with self._head:
            return await self._poll(slot_id, urgent=False)

    async def _poll(self, slot_id: str, *, urgent: bool) -> Slot:
        """Ask Redis when a slot of this process is freed, or after a short, growing pause."""
        pause = 0.005
        while True:
            while not urgent and self._urgent:
                self._no_urgent.clear()
                await self._no_urgent.wait()
            self._freed.clear()
            slot = await self._try(slot_id)
            if slot is not None:
                return slot
            self._waits.inc()
            try:
                await asyncio.wait_for(self._freed.wait(), pause)
            except TimeoutError:
                pause = min(pause * 2, 0.2)

    async def _try(self, slot_id: str) -> Slot | None:
        try:
            granted, size, _open, now_ms = await self._acquire(
                keys=self.keys, args=[slot_id, self.lease_ms, self.initial, self.ceiling, self.idle_ms])
        except RedisError as exc:
            raise LedgerUnavailable(f"adaptive window: {exc}") from exc
        self._seen(size)
        return Slot(slot_id, int(now_ms)) if int(granted) else None

    async def release(self, slot: Slot, outcome: Outcome) -> None:
        """Give the slot back, telling the window how the call went: ``ok`` (the endpoint
        answered, whatever the answer), ``rate_limited`` or ``timeout`` (cut it), ``outage``
        (start over), ``none`` (the call never reached the endpoint's judgement)."""
        try:
            size, changed = await self._release(keys=self.keys, args=[
                slot.id, _SCRIPT_OUTCOME[outcome], slot.started_ms, self.initial, self.ceiling, 1,
                self.backoff, self.idle_ms])
        except RedisError as exc:  # the lease frees the slot in time
            log.debug("window slot not released: %s", exc)
            return
        finally:
            self._freed.set()
        self._seen(size)
        if int(changed):
            self.metrics.llm_window_cuts.labels(endpoint=self.label, reason=outcome).inc()
            log.info("endpoint %s: %s, the fleet's window is now %.1f calls", self.label, outcome, self.size)

    def _seen(self, size: bytes | str) -> None:
        self.size = float(size)
        self._size_gauge.set(self.size)
