"""The scheduler's tick, on a clock the test moves and an in-memory stand-in of ``ledger.schedules``
that keeps its contract (a lease per schedule, ``advance`` only for the holder and from the value
read; the real one is tests/integration/test_ledger_schedules.py): each due slot is produced with its
id and headers before ``last`` advances; a send that fails leaves ``last`` behind and the slot is
produced next tick; a replica without the lease produces nothing; errors never end the loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dedup.schedules import Advance, ScheduleState
from service.core.metrics import Metrics
from service.core.schedule_spec import to_ms
from service.core.settings import Settings
from service.runtime.scheduler import Scheduler

T0 = datetime(2026, 12, 6, 10, 0, 0, tzinfo=UTC)


@dataclass
class MemorySchedules:
    states: dict[str, ScheduleState] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)
    down: bool = False

    def _up(self) -> None:
        if self.down:
            raise ConnectionError("redis away")

    async def lease(self, name: str, worker: str, ttl_ms: int) -> bool:
        self._up()
        return self.leases.setdefault(name, worker) == worker

    async def release(self, name: str, worker: str) -> bool:
        self._up()
        return self.leases.get(name) == worker and self.leases.pop(name) == worker

    async def status(self, name: str) -> ScheduleState | None:
        self._up()
        return self.states.get(name)

    async def start(self, name: str, at_ms: int) -> bool:
        self._up()
        return self.states.setdefault(name, ScheduleState(at_ms, None, 0, 0)).last_ms == at_ms

    async def advance(self, name: str, worker: str, from_ms: int, to_ms: int, produced: int, skipped: int,
                      last_fired_ms: int | None) -> Advance:
        self._up()
        if self.leases.get(name) != worker:
            return "lost"
        state = self.states.get(name)
        if (state.last_ms if state else -1) != from_ms:
            return "moved"
        state = state or ScheduleState(-1, None, 0, 0)
        self.states[name] = replace(state, last_ms=to_ms, produced=state.produced + produced,
                                    skipped=state.skipped + skipped,
                                    last_fired_ms=last_fired_ms if last_fired_ms is not None else state.last_fired_ms)
        return "ok"


@dataclass
class Ledger:
    schedules: MemorySchedules = field(default_factory=MemorySchedules)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Sends:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.failing = False

    async def __call__(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        if self.failing:
            raise ConnectionError("broker away")
        self.sent.append((topic, key, value, list(headers)))

    def ids(self) -> list[str]:
        return [key.decode() for _, key, _, _ in self.sent if key is not None]


def make(catch_up: str = "all", **spec: Any) -> tuple[Scheduler, Ledger, Sends, Clock, Metrics]:
    body = {"name": "beat", "kind": "classify", "every_s": 1, "catch_up": catch_up,
            "input": {"text": "at {slot}", "labels": ["a", "b"]}, **spec}
    settings = Settings(kafka={"input_topic": "tasks"}, scheduler={"tick_s": 0.01, "schedules": [body]})
    ledger, sends, clock, metrics = Ledger(), Sends(), Clock(), Metrics()
    scheduler = Scheduler(settings.scheduler.schedules, ledger, sends, metrics, settings,  # type: ignore[arg-type]
                          "w1", clock)
    return scheduler, ledger, sends, clock, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return float(metrics.registry.get_sample_value(name, labels) or 0.0)


def test_each_due_slot_is_produced_with_its_id_and_headers_then_last_advances() -> None:
    scheduler, ledger, sends, clock, metrics = make()
    asyncio.run(scheduler.tick())  # first sight: starts at now - grace (1 s): the slot at now is due
    assert sends.ids() == ["beat@2026-12-06T10:00:00Z"]
    topic, key, value, headers = sends.sent[0]
    assert topic == "tasks" and headers == [("agent.schedule", b"beat"), ("agent.slot", b"2026-12-06T10:00:00Z")]
    assert value is not None and b'"task_id":"beat@2026-12-06T10:00:00Z"' in value
    assert ledger.schedules.states["beat"] == ScheduleState(to_ms(T0), to_ms(T0), 1, 0)
    asyncio.run(scheduler.tick())  # nothing new is due
    assert len(sends.sent) == 1
    clock.now = T0 + timedelta(seconds=3.5)
    asyncio.run(scheduler.tick())
    assert sends.ids()[1:] == [f"beat@2026-12-06T10:00:0{n}Z" for n in (1, 2, 3)]
    assert sample(metrics, "agent_schedule_slots_total", schedule="beat", outcome="produced") == 4
    assert sample(metrics, "agent_schedule_lag_seconds_count", schedule="beat") == 4
    assert sample(metrics, "agent_schedule_last_slot_timestamp_seconds", schedule="beat") == to_ms(T0) / 1000 + 3
    assert sample(metrics, "agent_schedule_next_fire_timestamp_seconds", schedule="beat") == to_ms(T0) / 1000 + 4


def test_a_failed_send_leaves_last_behind_and_the_slot_is_produced_next_tick() -> None:
    scheduler, ledger, sends, clock, metrics = make()
    asyncio.run(scheduler.tick())
    sends.failing = True
    clock.now = T0 + timedelta(seconds=1)
    asyncio.run(scheduler.tick())
    assert ledger.schedules.states["beat"].last_ms == to_ms(T0)
    assert sample(metrics, "agent_schedule_errors_total", schedule="beat") == 1
    sends.failing = False
    ledger.schedules.down = True  # Redis away next: counted, nothing lost either
    clock.now = T0 + timedelta(seconds=5)
    asyncio.run(scheduler.tick())
    assert sample(metrics, "agent_schedule_errors_total", schedule="beat") == 2
    ledger.schedules.down = False
    asyncio.run(scheduler.tick())  # the missed slots, caught up (all)
    assert sends.ids() == [f"beat@2026-12-06T10:00:0{n}Z" for n in range(6)]
    assert ledger.schedules.states["beat"] == ScheduleState(to_ms(clock.now), to_ms(clock.now), 6, 0)


def test_missed_slots_follow_the_catch_up_policy_and_are_counted_skipped() -> None:
    scheduler, ledger, sends, clock, metrics = make(catch_up="latest")
    asyncio.run(scheduler.tick())
    clock.now = T0 + timedelta(seconds=10)
    asyncio.run(scheduler.tick())
    assert sends.ids() == ["beat@2026-12-06T10:00:00Z", "beat@2026-12-06T10:00:10Z"]
    assert ledger.schedules.states["beat"].skipped == 9
    assert sample(metrics, "agent_schedule_slots_total", schedule="beat", outcome="skipped") == 9


def test_a_replica_without_the_lease_produces_nothing_but_shows_the_ledgers_state() -> None:
    scheduler, ledger, sends, clock, metrics = make()
    ledger.schedules.leases["beat"] = "w2"
    ledger.schedules.states["beat"] = ScheduleState(to_ms(T0) - 5000, None, 0, 0)
    asyncio.run(scheduler.tick())
    assert sends.sent == [] and ledger.schedules.states["beat"].last_ms == to_ms(T0) - 5000
    assert sample(metrics, "agent_schedule_next_fire_timestamp_seconds", schedule="beat") == to_ms(T0) / 1000 - 4


def test_run_outlives_errors_and_gives_its_lease_up_when_cancelled() -> None:
    scheduler, ledger, sends, clock, metrics = make()
    sends.failing = True

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        while sample(metrics, "agent_schedule_errors_total", schedule="beat") < 3:
            await asyncio.sleep(0.01)
        assert not task.done() and ledger.schedules.leases == {"beat": "w1"}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 30))
    assert ledger.schedules.leases == {}


def test_the_scheduler_runs_only_enabled_schedules_of_kinds_this_deployment_runs() -> None:
    from service.agents.loading import AgentsNotLoaded, agents_from_settings
    from service.runtime.scheduler import scheduler_for

    beat = {"name": "beat", "kind": "classify", "every_s": 60}

    def built(**scheduler: Any) -> Scheduler | None:
        settings = Settings(worker_id="w7", scheduler=scheduler)
        ledger = type("L", (), {"holder": "p1", "schedules": MemorySchedules()})()
        return scheduler_for(settings, agents_from_settings(settings), ledger, Sends(), Metrics())

    assert built() is None
    assert built(schedules=[beat], enabled=False) is None
    scheduler = built(schedules=[beat])
    assert scheduler is not None and [s.name for s in scheduler.specs] == ["beat"]
    assert scheduler.worker_id == "w7/p1" and scheduler.lease_ms == 10_000
    with pytest.raises(AgentsNotLoaded, match="nope"):
        built(schedules=[{**beat, "kind": "nope"}], enabled=False)
