"""How many model calls the whole fleet has open on one endpoint: a window that starts small and
follows the endpoint's answers, the way TCP shares a link (slow start, then AIMD).

Every replica takes a slot from one window per endpoint, kept in Redis, before each call and gives
it back after. The window is in the hash ``<prefix>:endpoint:{<digest>}:window`` (``cwnd``,
``ssthresh``, ``cut``: when it was last cut, in Redis time); the open calls in the sorted set
``...:slots`` (a slot per call, scored by when its lease ends, so a replica that dies mid-call
frees its slots when their leases run out):

- **slow start**: a cold window (none in Redis, or idle for ``idle_s``) opens ``initial`` slots and
  grows by one per answered call, doubling every round trip, up to ``ssthresh``. A full window that
  calls are waiting for also doubles every ``ramp_s`` (100 ms) while no 429 or timeout cuts it: a
  provider refuses at once a call above its concurrency limit, so the ramp need not wait for answers
  that take seconds; the overshoot stays one doubling, as in TCP;
- **additive increase**: above ``ssthresh`` it grows by ``1/cwnd`` per answer, one slot per round
  trip;
- **multiplicative decrease**: a 429 or a timeout cuts it to ``backoff`` times its size (and sets
  ``ssthresh`` there). Only calls that started after the last cut can cut it again: the calls
  already open when the endpoint said "too many" answer with the same news, and one cut per
  round trip is what TCP does too;
- **after an outage** (the breaker opened, or the endpoint cannot serve: a revoked key, nothing
  listening) the window starts over at ``initial``, below a ``ssthresh`` of half its size, so a
  fleet coming back ramps up instead of opening every slot at once;
- **memory**: the largest window that ran a round trip full without a 429 or a timeout is kept
  apart (``...:memory``, with when it last did) for ``memory_s`` and longer, so a cold window (a
  fleet back from idle, a restart) opens at it instead of at ``initial``, and a 429 above it cuts
  back to it; a memory older than ``memory_s`` halves per ``memory_s`` and is slow-started back
  to. See :mod:`service.llm.window_scripts` for the rules;
- a window grows only while it is at least half used (the most calls open at once over the last
  5 s), so a quiet hour does not leave a window
  of thousands that a sudden backlog would open all at once.

Calls a worker may have open are still capped by its own limit (``AGENT_MAX_IN_FLIGHT``, see
:mod:`service.runtime.limits`); ``maximum`` caps the fleet's window (0: no fleet-wide cap).

While the window has room a call that finds no kept slot (below) asks Redis for one at once; the
calls of a process that ask in the same turn of the event loop share one script call. Once one has
to wait, the calls of the process queue and only the first asks Redis again (when a slot of the
process is freed, or after a short, growing pause), so a full window costs one Redis call per freed
slot or poll, not one per waiting task. Interactive calls queue apart and go first: a batch call
asks only while no interactive call of its process waits (across replicas the window has no
priorities).

A slot given back after an answered call is not handed to Redis at once: the process keeps it for
its next calls and hands back, every ``linger_s`` (20 ms), the slots it kept that long without a
call to take them, together with how many calls were answered (one ``SETTLE`` script call). A busy
process so makes tens of Redis calls a second for the window instead of two per model call. A slot
is kept only while no other process waits for one (a refused ``ACQUIRE`` puts its process in the
window's waiters for a second, and every answer from Redis says whether another process is there), only
while its lease is young, and never after a 429, a timeout or an outage: those are told to the
window at once, with every kept slot. A process learns that another waits at its next call to
Redis, within ``linger_s`` while it is busy.

Who holds a slot at each moment (the batch that asked for it, a call, the kept or stale slots of the
process, nobody) is the table :data:`service.llm.slots.SLOT`, each move made in one place; the calls
waiting in line and the linger tick are :mod:`service.llm.waiters`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Literal

from redis.exceptions import RedisError

from dedup.client import RedisClient
from dedup.keys import Keys
from dedup.ledger import LedgerUnavailable
from service.core.metrics import Metrics
from service.llm.slots import Batch, KeptSlots, Slot
from service.llm.tags import endpoint_tag
from service.llm.waiters import Linger, Waiters
from service.llm.window_scripts import ACQUIRE, SETTLE

__all__ = ["ACQUIRE", "NO_CEILING", "SETTLE", "AdaptiveWindow", "Outcome", "Slot"]

log = logging.getLogger(__name__)

NO_CEILING = 1_000_000

Outcome = Literal["ok", "rate_limited", "timeout", "outage", "none"]
_SCRIPT_OUTCOME = {"ok": "ok", "rate_limited": "cut", "timeout": "cut", "outage": "reset", "none": "none"}


class AdaptiveWindow:
    """The fleet's window of open calls on one endpoint (see the module docstring).

    Owns what this process knows of the window (its size, Redis's clock, the last cut, whether
    another process waits) and the answers it has not told yet; hands a slot's life to its
    collaborators (see :mod:`service.llm.slots` for who holds a slot when): the :class:`Batch` of
    the calls asking Redis at this turn of the loop, :class:`KeptSlots` for the slots kept and stale,
    :class:`Waiters` for the calls waiting in line, :class:`Linger` for the settle tick."""

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
        linger_s: float = 0.02,
        ramp_s: float = 0.1,
        memory_s: float = 0.0,
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
        self.linger_s = linger_s
        self.ramp_ms = int(ramp_s * 1000)
        self.memory_ms = int(memory_s * 1000)  # how long the remembered window is trusted whole (0: off)
        keys = Keys(key_prefix)
        tag = endpoint_tag(endpoint)
        self.keys = [keys.endpoint(tag, "window"), keys.endpoint(tag, "slots"), keys.endpoint(tag, "waiters"),
                     keys.endpoint(tag, "memory")]
        self._acquire = redis.register_script(ACQUIRE)
        self._settle = redis.register_script(SETTLE)
        # the children every call updates, looked up once (labels() validates and locks on each call)
        self._size_gauge = metrics.llm_window.labels(endpoint=label)
        self._waiters = Waiters(self._try, metrics.llm_window_waits.labels(endpoint=label))
        self._slots = KeptSlots()
        self._linger = Linger(linger_s, self._tick, lambda: self._slots.pending or bool(self._answered))
        self._answered = 0  # answered calls the window has not been told of
        self._contended = False  # another process was refused a slot lately: keep none
        self._batch: Batch | None = None  # the calls that will ask Redis together, at the next turn of the loop
        self._me = uuid.uuid4().hex[:12]  # this process, as the window's waiters set knows it
        self._clock = (0, 0.0)  # (Redis time in ms, the event loop's time) at the last answer from Redis
        self._last_cut = 0  # Redis time of the last cut this process heard of
        self.size = float(initial)  # the window as this process last saw it
        self._size_gauge.set(initial)

    @property
    def full(self) -> bool:
        """Calls of this process wait for a slot now (a caller with another endpoint may go there)."""
        return self._waiters.waiting

    async def acquire(self, priority: str = "batch") -> Slot:
        """Wait for a slot in the fleet's window; the caller must :meth:`release` it. While calls of
        this process wait, ``interactive`` ones get the slots before ``batch`` ones."""
        return await self._waiters.acquire(priority)

    def kept_slot(self) -> Slot | None:
        """A kept slot at once, the one :meth:`acquire` would hand out first while no call of this
        process waits in line; None: :meth:`acquire` asks Redis or waits."""
        return None if self._waiters.waiting else self._reuse()

    async def _try(self) -> Slot | None:
        """A kept slot if there is one, else one from Redis if the window has room. The calls of
        the process that ask at the same moment share one call to Redis."""
        kept = self._reuse()
        if kept is not None:
            return kept
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch()
            asyncio.get_running_loop().call_soon(self._send_batch, batch)
        batch.join()
        try:
            await batch.done.wait()
        except asyncio.CancelledError:  # its slot, if Redis granted one, goes to the process's next call
            orphan = batch.leave()
            if orphan is not None:
                self._keep([orphan])
            raise
        return batch.take()

    def _send_batch(self, batch: Batch) -> None:
        self._batch = None  # calls that ask from now on make the next batch
        self._linger.spawn(self._ask(batch))

    async def _ask(self, batch: Batch) -> None:
        prefix = uuid.uuid4().hex
        try:
            granted, size, _open, now_ms, contended, cut, due = await self._acquire(keys=self.keys, args=[
                prefix, self.lease_ms, self.initial, self.ceiling, self.idle_ms, self._me, batch.wanted,
                self.ramp_ms, self.memory_ms])
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            batch.fail(LedgerUnavailable(f"adaptive window: {exc}") if isinstance(exc, RedisError) else exc)
            return
        loop_now = self._heard(size, now_ms, contended, cut)
        self._waiters.ramp_at = loop_now + int(due) / 1000 if int(due) >= 0 else None
        orphans = batch.answer([Slot(f"{prefix}:{i}", int(now_ms), loop_now) for i in range(1, int(granted) + 1)])
        if orphans:  # their callers were cancelled meanwhile
            self._keep(orphans)

    def _keep(self, slots: list[Slot]) -> bool:
        """Keep ``slots`` for the next calls of the process (handed back when the linger ends); True
        when that woke a call waiting in line."""
        if not self._slots.keep(slots, asyncio.get_running_loop().time()):
            return False
        self._linger.arm()
        return self._waiters.freed()

    def _reuse(self) -> Slot | None:
        """A kept slot whose lease is still young, as a new call's: its start is now, in Redis time."""
        if self._contended:  # another process waits: the kept slots go back at the next tick
            return None
        loop_now = asyncio.get_running_loop().time()
        kept, aged = self._slots.reuse(loop_now, self.lease_ms / 2)
        if aged:
            self._linger.arm()
        if kept is None:
            return None
        redis_ms, at = self._clock
        return Slot(kept.id, redis_ms + int((loop_now - at) * 1000), kept.granted_at)

    async def release(self, slot: Slot, outcome: Outcome) -> None:
        """Give the slot back, telling the window how the call went: ``ok`` (the endpoint
        answered, whatever the answer), ``rate_limited`` or ``timeout`` (cut it), ``outage``
        (start over), ``none`` (the call never reached the endpoint's judgement).

        After an answer the slot is kept for the next call of this process (see the module
        docstring) unless another replica waits; when it wakes a call waiting in line, this returns
        after that call went out (:meth:`Waiters.behind_woken`). Every other outcome reaches the
        window at once."""
        if outcome == "ok":
            self._answered += 1
            if self.linger_s > 0 and not self._contended and slot.started_ms > self._last_cut:
                if self._keep([slot]):  # the call it woke goes first, the rest of this one's task after
                    await self._waiters.behind_woken()
                return
        await self.settle(outcome, slot)

    async def _tick(self) -> None:
        """Every ``linger_s`` while slots are kept or answers untold: tell the answers, and hand back
        the slots kept for longer than ``linger_s`` (the process had no call for them)."""
        await self.settle(idle_s=0.0 if self._contended else self.linger_s)

    async def settle(self, outcome: Outcome = "none", slot: Slot | None = None, idle_s: float = 0.0) -> None:
        """Hand back the kept slots (those kept for ``idle_s`` at least) and ``slot``, and tell the
        window the answers counted since the last time and ``outcome`` of the call ``slot`` held."""
        ids = self._slots.hand_back(asyncio.get_running_loop().time() - idle_s)
        answered, self._answered = self._answered, 0
        if slot is not None:
            ids.append(slot.id)
        if not ids and not answered and outcome == "none":
            return
        try:
            size, changed, now_ms, contended, cut = await self._settle(keys=self.keys, args=[
                _SCRIPT_OUTCOME[outcome], slot.started_ms if slot is not None else 0, answered, self.initial, self.ceiling, 1,
                self.backoff, self.idle_ms, self._me, self.memory_ms, *ids])
        except RedisError as exc:  # the leases free the slots in time; the answers are told next time
            self._answered += answered
            log.debug("window slots not handed back: %s", exc)
            return
        finally:
            self._waiters.freed()
        self._heard(size, now_ms, contended, cut)
        if int(changed):
            self.metrics.llm_window_cuts.labels(endpoint=self.label, reason=outcome).inc()
            log.info("endpoint %s: %s, the fleet's window is now %.1f calls", self.label, outcome, self.size)

    def _heard(self, size: bytes | str, now_ms: int, contended: int, cut: bytes | str) -> float:
        """What every answer of the scripts says: the window, Redis's clock, whether another process
        waits, the last cut. Returns the event loop's time it was heard at."""
        loop_now = asyncio.get_running_loop().time()
        self._clock = (int(now_ms), loop_now)
        self._contended = bool(int(contended))
        self._seen(size)
        self._learn_cut(cut)
        return loop_now

    def _learn_cut(self, cut: bytes | str) -> None:
        """A cut (by any process) since the last one seen: the kept slots go back at the next tick,
        and slots of calls that started before it are not kept, so the process shrinks to the window
        within one call instead of reusing what it held."""
        cut_ms = int(float(cut))
        if cut_ms <= self._last_cut:
            return
        self._last_cut = cut_ms
        if self._slots.cut():
            self._linger.arm()

    async def aclose(self) -> None:
        """Hand back the kept slots now rather than when their leases run out."""
        self._slots.close()
        await self._linger.close()
        await self.settle()

    def _seen(self, size: bytes | str) -> None:
        self.size = float(size)
        self._size_gauge.set(self.size)
