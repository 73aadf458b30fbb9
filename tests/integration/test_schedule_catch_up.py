"""Catch-up after the whole fleet was down, on the broker and Redis, one deployment with three
1-second schedules, one per policy: two replicas' schedulers produce the first slots, the fleet stops
(each gives its leases up), eight slots go by, one replica starts. With ``catch_up = "all"`` and
``max_catch_up = 3`` the newest three missed slots are produced and the five older ones are counted
skipped; with ``"latest"`` only the newest missed slot; with ``"none"`` none of them; every policy
produces the next slot, due on time. The skipped counts are the ledger's and the new replica's
metric; every slot produced is one task with one result, and a skipped slot never becomes a task.

The schedulers run on a clock the test sets (the slots' fire times are exact, whatever the
machine's load); the tasks run on a real service beside them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.core.metrics import Metrics
from service.core.schedule_spec import slot_text, to_ms
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.scheduler import Scheduler
from service.runtime.wiring import Service
from tests.support import read_topic, succeeded
from tests.support.fleet import deployment, serving, wait_ended

pytestmark = pytest.mark.integration

MAX_CATCH_UP = 3
DOWN_SLOTS = 8  # slots 4 to 11 fall due while the fleet is down
COMMON = {"kind": "classify", "every_s": 1, "grace_s": 0.5, "deadline_s": 600,
          "input": {"text": "the check at {slot} ({schedule})", "labels": ["ok", "late", "broken"]}}
SCHEDULES = [
    {"name": "every-all", "catch_up": "all", "max_catch_up": MAX_CATCH_UP, **COMMON},
    {"name": "every-latest", "catch_up": "latest", **COMMON},
    {"name": "every-none", "catch_up": "none", **COMMON},
]
# after the restart (slots, counted from the first): produced at the restart and the next tick, skipped
EXPECTED = {
    "every-all": ([9, 10, 11], [12], 5),  # the newest MAX_CATCH_UP missed ones; 4 to 8 skipped
    "every-latest": ([11], [12], 7),  # the newest missed one; 4 to 10 skipped
    "every-none": ([], [12], 8),  # none of the missed; 4 to 11 skipped; the slot due on time next
}


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def replica(service: Service, worker: str, clock: Clock) -> Scheduler:
    """A replica's scheduler: the deployment's schedules, its own worker id and metrics."""
    return Scheduler(service.settings.scheduler.schedules, service.ledger, service.publisher.send, Metrics(),
                     service.settings, worker, clock)


def slots_metric(scheduler: Scheduler, name: str, outcome: str = "skipped") -> float:
    value = scheduler.metrics.registry.get_sample_value("agent_schedule_slots_total",
                                                        {"schedule": name, "outcome": outcome})
    return float(value or 0.0)


async def scenario(service: Service, s0: datetime) -> Scheduler:
    """Replicas A and B for slots 0 to 3, the fleet down for DOWN_SLOTS slots, then replica C alone."""
    clock = Clock(s0)
    a, b = replica(service, "A", clock), replica(service, "B", clock)
    for k in range(4):  # each tick 0.3 s after its slot: on time (grace 0.5 s)
        clock.at = s0 + timedelta(seconds=k, milliseconds=300)
        await a.tick()
        await b.tick()
    for spec in a.specs:
        state = await service.ledger.schedules.status(spec.name)
        assert state is not None and (state.last_ms, state.produced, state.skipped) == (
            to_ms(s0 + timedelta(seconds=3)), 4, 0), spec.name
        assert slots_metric(b, spec.name, "produced") == 0, "the replica without the lease produced"
    await a.release()  # the fleet stops: each replica gives its leases up
    await b.release()
    c = replica(service, "C", clock)
    clock.at = s0 + timedelta(seconds=3 + DOWN_SLOTS, milliseconds=800)  # slot 11 is 0.8 s old: missed
    await c.tick()
    for spec in c.specs:
        missed, _, skipped = EXPECTED[spec.name]
        state = await service.ledger.schedules.status(spec.name)
        assert state is not None and (state.last_ms, state.produced, state.skipped) == (
            to_ms(s0 + timedelta(seconds=11)), 4 + len(missed), skipped), spec.name
    clock.at = s0 + timedelta(seconds=12, milliseconds=300)  # slot 12, due on time
    await c.tick()
    return c


def test_after_the_fleet_was_down_each_policy_catches_up_as_declared(
        make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = deployment(make_settings, "catch-up", scheduler={"schedules": SCHEDULES, "enabled": False})
    s0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    slot = {k: slot_text(s0 + timedelta(seconds=k)) for k in range(13)}
    expected = {name: [f"{name}@{slot[k]}" for k in [0, 1, 2, 3, *missed, *due]]
                for name, (missed, due, _) in EXPECTED.items()}
    produced = [t for ids in expected.values() for t in ids]

    async def run() -> None:
        async with serving(s, fake_llm.base_url) as service:
            c = await scenario(service, s0)
            for name, (missed, due, skipped) in EXPECTED.items():
                state = await service.ledger.schedules.status(name)
                assert state is not None
                assert (state.last_ms, state.produced, state.skipped) == (
                    to_ms(s0 + timedelta(seconds=12)), 4 + len(missed) + len(due), skipped), name
                assert slots_metric(c, name) == skipped, f"{name}: the skipped slots were not counted"
                assert slots_metric(c, name, "produced") == len(missed) + len(due), name
            await wait_ended(service.ledger, produced, timeout_s=60, what="every produced slot's task to end")
            never = [f"{name}@{slot[k]}" for name in EXPECTED for k in range(4, 13)
                     if f"{name}@{slot[k]}" not in produced]
            assert [t for t in never if await service.ledger.get(t) is not None] == [], "a skipped slot ran"

    asyncio.run(run())
    tasks = read_topic(s.kafka.bootstrap_servers, s.kafka.input_topic, expect=len(produced), timeout_s=60)
    sent = Counter((m.key or b"").decode() for m in tasks)
    assert {name: sorted(t for t in sent if t.startswith(name + "@")) for name in expected} == expected
    assert {t: n for t, n in sent.items() if n > 1} == {}, "a slot was produced twice"
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(produced), timeout_s=60))
    values: dict[str, set[bytes | None]] = {}
    for m in results:
        values.setdefault((m.key or b"").decode(), set()).add(m.value)
    assert set(values) == set(produced), "a produced slot has no result, or a skipped one has"
    assert all(len(v) == 1 for v in values.values()), "a slot's task has two different results"
