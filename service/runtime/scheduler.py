"""The scheduler every replica runs: each tick, each schedule's due slots become task events.

Per schedule and tick (docs/SCHEDULES.md): take or extend the schedule's lease; read its ``last``
slot from the ledger (a schedule seen for the first time starts at ``now - grace_s``); when this
replica holds the lease, produce each slot the catch-up policy selects (key: the task id
``<schedule>@<slot>``, headers ``agent.schedule`` and ``agent.slot``) and wait for the broker's
acknowledgement, then advance ``last`` past every due slot. A replica that dies between the two
leaves ``last`` behind: the next holder produces the same task ids again and the ledger runs each
once. Every replica sets the schedule's gauges from the ledger, holder or not.

Redis or the broker away, a schedule's tick is logged and counted (``agent_schedule_errors_total``)
and tried again next tick; ``last`` did not move, so no slot is lost. :meth:`Scheduler.run` raises
only on cancellation, when it gives its leases up (another replica takes over at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from consumers.producers import Headers
from dedup.ledger import Ledger
from dedup.schedules import ScheduleState
from service.agents.loading import schedules_from_settings
from service.agents.registry import AgentRegistry
from service.core.metrics import Metrics
from service.core.schedule_spec import ScheduleSpec, due, from_ms, slot_text, to_ms
from service.core.settings import Settings
from service.pipeline.base import utcnow
from service.pipeline.parking import Send

log = logging.getLogger(__name__)

__all__ = ["SCHEDULE_HEADER", "SLOT_HEADER", "Scheduler", "scheduler_for"]

SCHEDULE_HEADER, SLOT_HEADER = "agent.schedule", "agent.slot"
_RELEASE_TIMEOUT_S = 2.0


class Scheduler:
    """Produces the slots of ``specs`` to the input topic, once per slot across the fleet."""

    def __init__(self, specs: Sequence[ScheduleSpec], ledger: Ledger, send: Send, metrics: Metrics,
                 settings: Settings, worker_id: str, clock: Callable[[], datetime] = utcnow) -> None:
        self.specs = list(specs)
        self.ledger, self.send, self.metrics, self.worker_id, self.clock = ledger, send, metrics, worker_id, clock
        self.topic = settings.kafka.input_topic
        self.tick_s = settings.scheduler.tick_s
        self.lease_ms = int(max(10 * self.tick_s, 10.0) * 1000)
        for spec in self.specs:  # every schedule shows from the start, at 0
            for outcome in ("produced", "skipped"):
                metrics.schedule_slots.labels(schedule=spec.name, outcome=outcome)
            metrics.schedule_errors.labels(schedule=spec.name)

    async def run(self) -> None:
        """Tick every ``tick_s`` until cancelled; gives this replica's leases up on the way out."""
        try:
            while True:
                await self.tick()
                await asyncio.sleep(self.tick_s)
        finally:
            await self.release()

    async def tick(self) -> None:
        """Handle each schedule once; a schedule that fails is counted and logged, the others go on."""
        await asyncio.gather(*(self._guarded(spec) for spec in self.specs))

    async def release(self) -> None:
        """Give up the leases this replica holds (best effort: a lease not given up expires)."""
        async def one(name: str) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ledger.schedules.release(name, self.worker_id), _RELEASE_TIMEOUT_S)

        await asyncio.gather(*(one(spec.name) for spec in self.specs))

    async def _guarded(self, spec: ScheduleSpec) -> None:
        try:
            await self.handle(spec)
        except Exception as exc:  # noqa: BLE001 - Redis or the broker away, or a bug: next tick tries again
            self.metrics.schedule_errors.labels(schedule=spec.name).inc()
            log.warning("schedule %s: tick failed, tried again next tick: %s: %s", spec.name, type(exc).__name__, exc)

    async def handle(self, spec: ScheduleSpec) -> None:
        """One tick of one schedule."""
        schedules = self.ledger.schedules
        held = await schedules.lease(spec.name, self.worker_id, self.lease_ms)
        now = self.clock()
        state = await self._state(spec, now)
        last_ms = state.last_ms
        if held:
            last_ms = await self._produce(spec, state, now)
        self._gauges(spec, last_ms)

    async def _state(self, spec: ScheduleSpec, now: datetime) -> ScheduleState:
        """The schedule as the ledger keeps it; on its first sight, started at ``now - grace_s``."""
        schedules = self.ledger.schedules
        state = await schedules.status(spec.name)
        if state is None:
            await schedules.start(spec.name, to_ms(now - timedelta(seconds=spec.effective_grace_s)))
            state = await schedules.status(spec.name)
            if state is None:  # an operator deleted it in between: next tick starts it again
                raise RuntimeError(f"schedule {spec.name}: its ledger entry vanished right after its start")
        return state

    async def _produce(self, spec: ScheduleSpec, state: ScheduleState, now: datetime) -> int:
        """Produce the selected due slots, then advance past every due one: the ``last`` slot now."""
        name = spec.name
        chosen = due(spec, from_ms(state.last_ms), now)
        if chosen.newest is None:
            return state.last_ms
        for slot in chosen.produce:
            text = slot_text(slot)
            headers: Headers = [(SCHEDULE_HEADER, name.encode()), (SLOT_HEADER, text.encode())]
            await self.send(self.topic, spec.task_id(slot).encode(), spec.task_value(slot, now), headers)
            lag = (self.clock() - spec.fire_time(slot)).total_seconds()
            self.metrics.schedule_lag.labels(schedule=name).observe(max(0.0, lag))
        fired = to_ms(spec.fire_time(chosen.produce[-1])) if chosen.produce else None
        newest = to_ms(chosen.newest)
        answer = await self.ledger.schedules.advance(name, self.worker_id, state.last_ms, newest,
                                                     len(chosen.produce), chosen.skipped, fired)
        if answer != "ok":  # another replica advanced it, or took the lease: its slots are its own
            log.info("schedule %s: not advanced (%s): another replica handles it", name, answer)
            return state.last_ms
        if chosen.produce:
            self.metrics.schedule_slots.labels(schedule=name, outcome="produced").inc(len(chosen.produce))
        if chosen.skipped:
            self.metrics.schedule_slots.labels(schedule=name, outcome="skipped").inc(chosen.skipped)
            log.warning("schedule %s: %d missed slots skipped (catch_up %s)", name, chosen.skipped, spec.catch_up)
        return newest

    def _gauges(self, spec: ScheduleSpec, last_ms: int) -> None:
        """The newest slot handled and when the next one fires, from the ledger's ``last``."""
        self.metrics.schedule_last_slot.labels(schedule=spec.name).set(last_ms / 1000)
        following = spec.next_slot(from_ms(last_ms))
        if following is not None:
            self.metrics.schedule_next_fire.labels(schedule=spec.name).set(to_ms(spec.fire_time(following)) / 1000)


def scheduler_for(settings: Settings, agents: AgentRegistry, ledger: Ledger, send: Send,
                  metrics: Metrics) -> Scheduler | None:
    """The deployment's scheduler over its schedules (``AGENT_SCHEDULER__SCHEDULES`` and the kinds
    file's), or None when it has none or ``AGENT_SCHEDULER__ENABLED`` is false. Raises
    :class:`~service.agents.loading.AgentsNotLoaded` when a schedule cannot run here (enabled or not).
    Its lease holder is this process: the worker id and the ledger's per-process holder."""
    specs = schedules_from_settings(settings, agents)
    if not specs or not settings.scheduler.enabled:
        return None
    holder = f"{settings.worker_id or socket.gethostname()}/{ledger.holder}"
    return Scheduler(specs, ledger, send, metrics, settings, holder)
