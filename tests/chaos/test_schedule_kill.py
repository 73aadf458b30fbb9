"""Three replicas run a 1-second schedule for a minute while they are SIGKILLed at random moments
(each restarted at once, but one, the lease's holder, kept down for 10 s): every slot of the run's
window becomes exactly one task, with no gap. A slot's id may be on the input topic twice (a holder
killed after producing and before advancing leaves ``last`` behind, and the next holder produces the
same id again), but it has one result, and the model was asked once for it (again only where the
worker running it died). No slot is produced before its fire time (the slot plus its jitter); each is
produced within the jitter and a tolerance of its slot, unless the lease's holder had just been
killed (the slots falling due until another replica takes the lease over come in its catch-up); the
fire times are spread over the jitter.

``SCHEDULE_CHAOS_SEED`` replays a run's kills; ``SCHEDULE_CHAOS_S`` sets its length. Run with ``-s``
for the figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from service.core.schedule_spec import ScheduleSpec, from_ms, parse_slot, to_ms
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import ensure_topics
from tests.support import Msg, kill_worker, read_topic, spawn_worker, stop_workers, succeeded, wait_for
from tests.support.fleet import deployment, ledger_of, records, wait_ended

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

NAME = "beat"
JITTER_S = 0.999  # jitter_s must stay below the period (1 s): the largest whose jitter, in ms, does
TOLERANCE_S = 5.0  # a busy machine's delay on top of the jitter and the tick
RUN_S = float(os.environ.get("SCHEDULE_CHAOS_S", "60"))
DOWN_S = 10.0
WORKERS = 3
LONG_DOWN = 2  # from this kill on (counted from 1), the first that finds a live holder takes it down DOWN_S
SCHEDULE = {
    "name": NAME, "kind": "classify", "every_s": 1, "jitter_s": JITTER_S,
    "catch_up": "all", "max_catch_up": 100,  # the slots that fall due while the holder is dead are caught up
    "deadline_s": 600,  # and must not expire before they run
    "input": {"text": "the check at {slot} ({schedule})", "labels": ["ok", "late", "broken"]},
}


@dataclass
class Kill:
    at_s: float  # epoch seconds
    victim: int
    held: bool  # the victim held the schedule's lease
    down_s: float


@dataclass
class Fleet:
    settings: Settings
    logs: Path
    procs: list[Any] = field(default_factory=list)
    spawned: int = 0

    def spawn(self, index: int) -> Any:
        """A replica of its own worker id (the lease's holder names it)."""
        self.spawned += 1
        worker_id = f"{self.settings.worker_id}-r{index}g{self.spawned}"
        proc = spawn_worker(self.settings.model_copy(update={"worker_id": worker_id}),
                            str(self.logs / f"{worker_id}.log"))
        proc.worker_id = worker_id
        return proc


def holder_now(s: Settings) -> str | None:
    async def read() -> str | None:
        async with ledger_of(s) as ledger:
            return await ledger.schedules.holder(NAME)

    return asyncio.run(read())


def kill_at_random(fleet: Fleet, rng: random.Random) -> list[Kill]:
    """SIGKILL a random live replica every 3 to 8 s for ``RUN_S``, each restarted at once; but once,
    from the ``LONG_DOWN``-th kill on, the lease's live holder is the victim and comes back ``DOWN_S``
    later."""
    kills: list[Kill] = []
    down: dict[int, float] = {}  # replica -> when it comes back (monotonic)
    ends = time.monotonic() + RUN_S
    next_kill = time.monotonic() + rng.uniform(3, 8)
    while time.monotonic() < ends:
        time.sleep(max(0.0, min(next_kill, *down.values(), ends) - time.monotonic()))
        for index, back in list(down.items()):
            if time.monotonic() >= back:
                fleet.procs[index] = fleet.spawn(index)
                del down[index]
        if time.monotonic() < next_kill or time.monotonic() >= ends:
            continue
        holder = holder_now(fleet.settings) or ""
        up = [i for i in range(WORKERS) if i not in down]
        held = [i for i in up if holder.startswith(fleet.procs[i].worker_id + "/")]
        long_down = bool(held) and len(kills) + 1 >= LONG_DOWN and not any(k.down_s for k in kills)
        victim = held[0] if long_down else rng.choice(up)
        kill_worker(fleet.procs[victim])  # the kill's time is after it: nothing it produced comes later
        kills.append(Kill(time.time(), victim, victim in held, DOWN_S if long_down else 0.0))
        if long_down:
            down[victim] = time.monotonic() + DOWN_S
        else:
            fleet.procs[victim] = fleet.spawn(victim)
        next_kill = time.monotonic() + rng.uniform(3, 8)
    for index in down:
        fleet.procs[index] = fleet.spawn(index)
    return kills


async def wait_fleet_started(s: Settings) -> None:
    async with ledger_of(s) as ledger:
        async def producing() -> bool:
            state = await ledger.schedules.status(NAME)
            return state is not None and state.produced >= 2

        await wait_for(producing, 120, 0.2, what="the schedule's first slots produced")


async def settle(s: Settings, end_ms: int) -> tuple[Any, list[Msg], dict[str, int]]:
    """Wait until the ledger's ``last`` reached the window's end (no slot up to it is produced again
    after that) and every task up to it ended: the ledger's state, the tasks on the input topic and
    the deaths of each task up to the end."""
    async with ledger_of(s) as ledger:
        async def reached() -> bool:
            state = await ledger.schedules.status(NAME)
            return state is not None and state.last_ms >= end_ms

        await wait_for(reached, 120, 0.2, what="the slots up to the window's end produced")
        state = await ledger.schedules.status(NAME)
        assert state is not None
        tasks = [m for m in await asyncio.to_thread(read_topic, s.kafka.bootstrap_servers, s.kafka.input_topic,
                                                    expect=state.produced, timeout_s=60, idle_s=0.5)
                 if m.key is not None]
        keys = {(m.key or b"").decode() for m in tasks}
        ids = sorted(k for k in keys if to_ms(slot_of(k)) <= end_ms)
        await wait_ended(ledger, ids, timeout_s=120, what="every slot's task to end")
        got = await records(ledger, ids)
        return state, tasks, {t: r.to_json()["deaths"] or 0 for t, r in got.items() if r is not None}


def slot_of(task_id: str) -> datetime:
    name, _, text = task_id.partition("@")
    assert name == NAME, task_id
    return parse_slot(text)


def takeovers(kills: list[Kill], stamps: list[int]) -> list[tuple[float, int]]:
    """For each kill of the lease's holder: the kill (epoch s) and the first production after it (ms)."""
    ordered = sorted(stamps)
    return [(k.at_s, next((t for t in ordered if t > k.at_s * 1000), 2**62)) for k in kills if k.held]


@pytest.mark.evicts_killed_members
def test_three_replicas_under_sigkills_one_task_per_slot_no_gap_fired_within_the_jitter(
        make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s = deployment(make_settings, "sched-kill", scheduler={"schedules": [SCHEDULE], "tick_s": 0.2},
                   ledger={"lease_ms": 2000, "max_deaths": 20})
    spec = s.scheduler.schedules[0]
    fake_llm.latency_s = 0.3  # so that kills land inside tasks too
    seed = int(os.environ.get("SCHEDULE_CHAOS_SEED", str(time.time_ns() % 2**31)))
    started = datetime.now(UTC)
    ensure_topics(s)
    fleet = Fleet(s, tmp_path)
    fleet.procs = [fleet.spawn(i) for i in range(WORKERS)]
    try:
        asyncio.run(wait_fleet_started(s))
        kills = kill_at_random(fleet, random.Random(seed))
        end_ms = (int(time.time()) + 3) * 1000  # the window's last slot: a few seconds after the last kill
        state, tasks, deaths = asyncio.run(settle(s, end_ms))
    finally:
        stop_workers(fleet.procs, grace_s=30)
    check_window(s, spec, tasks, started, end_ms, state, deaths, fake_llm, kills, seed)


def check_window(s: Settings, spec: ScheduleSpec, tasks: list[Msg], started: datetime, end_ms: int, state: Any,
                 deaths: dict[str, int], fake_llm: FakeLLM, kills: list[Kill], seed: int) -> None:
    sent = Counter(m.key.decode() for m in tasks if m.key is not None)
    first = min(slot_of(t) for t in sent)
    window = [spec.task_id(slot) for slot in [first, *spec.slots_between(first, from_ms(end_ms), 10_000)]]
    assert to_ms(first) >= to_ms(started) - 2000, "a slot from before the fleet's first sight was produced"
    assert len(window) >= RUN_S * 0.9, "the window is shorter than the run"
    missing = [t for t in window if t not in sent]
    assert missing == [], f"{len(missing)} slots have no task (a gap): {missing[:10]}"
    assert {t for t in sent if to_ms(slot_of(t)) <= end_ms} == set(window)
    assert state.skipped == 0, "the ledger skipped a slot"
    assert any(k.held for k in kills), "no kill took the lease's holder: no takeover was exercised"
    assert set(deaths) == set(window), "a slot's task is not in the ledger"

    by_id = one_result_each(s, window)
    assert set(by_id) == set(window)
    calls = fake_llm.stats()["by_step"]
    per_slot = {t: calls.get(f"{t}:classify", 0) for t in window}
    assert all(n >= 1 for n in per_slot.values()), "a slot's task never asked the model"
    assert {t: n for t, n in per_slot.items() if n > 1 and not deaths[t]} == {}, \
        "the model was asked twice for a slot no worker death interrupted"

    caught_up = check_fire_times(spec, tasks, window, kills)
    lags = {t: first_ms - to_ms(slot_of(t)) for t, first_ms in first_stamps(tasks).items() if t in window}
    waits = [lags[t] - spec.jitter_ms(slot_of(t)) for t in window if t not in caught_up]
    print(f"\nschedule chaos (seed {seed}): {len(window)} slots of a 1 s schedule (jitter {JITTER_S} s) over "
          f"{(end_ms - to_ms(first)) / 1000:.0f} s, {WORKERS} replicas, {len(kills)} SIGKILLs "
          f"({sum(k.held for k in kills)} of the lease's holder; one replica down {DOWN_S:.0f} s); "
          f"{sum(sent[t] for t in window)} records for them on the input topic ({sum(sent[t] - 1 for t in window)} "
          f"duplicates); one result per slot; model calls per slot {dict(sorted(Counter(per_slot.values()).items()))}, "
          f"{sum(1 for t in window if deaths[t])} tasks taken over from a killed worker; "
          f"{len(window) - len(caught_up)} slots produced by a live holder, {min(lags[t] for t in window):.0f}-"
          f"{max(lags[t] for t in window if t not in caught_up):.0f} ms after the slot ({max(waits):.0f} ms at most "
          f"after the fire time), {len(set(spec.jitter_ms(slot_of(t)) for t in window))} distinct jitters; "
          f"{len(caught_up)} caught up after a holder's kill, at most {max(caught_up.values(), default=0) / 1000:.1f} s "
          f"after the slot")


def first_stamps(tasks: list[Msg]) -> dict[str, int]:
    """Each task id's first record's timestamp (ms)."""
    first_ms: dict[str, int] = {}
    for m in tasks:
        assert m.timestamp_ms is not None and m.key is not None
        key = m.key.decode()
        first_ms[key] = min(first_ms.get(key, m.timestamp_ms), m.timestamp_ms)
    return first_ms


def one_result_each(s: Settings, window: list[str]) -> dict[str, set[bytes | None]]:
    by_id: dict[str, set[bytes | None]] = {}
    wanted = set(window)
    for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(window), timeout_s=90,
                        idle_s=3)):
        key = (m.key or b"").decode()
        if key in wanted:
            by_id.setdefault(key, set()).add(m.value)
    assert set(by_id) == wanted, f"slots without a result: {sorted(wanted - set(by_id))[:10]}"
    assert {t: len(v) for t, v in by_id.items() if len(v) > 1} == {}, "a slot's task has two different results"
    return by_id


def check_fire_times(spec: ScheduleSpec, tasks: list[Msg], window: list[str], kills: list[Kill]) -> dict[str, int]:
    """No slot before its fire time; each within the jitter and the tolerance of its slot, unless it
    fell due while the lease's holder was dead and came in the catch-up of the replica that took over;
    the fire times spread over the jitter. The slots caught up so, each with its lag after the slot."""
    first_ms = first_stamps(tasks)
    fire = {t: to_ms(spec.fire_time(slot_of(t))) for t in window}
    early = {t: first_ms[t] - fire[t] for t in window if first_ms[t] < fire[t] - 5}
    assert early == {}, f"slots produced before their fire time (ms early): {early}"
    lags = {t: first_ms[t] - to_ms(slot_of(t)) for t in window}
    outages = takeovers(kills, list(first_ms.values()))
    caught_up = {t for t in window if any((k - TOLERANCE_S) * 1000 <= fire[t] <= back <= first_ms[t] <= back
                                          + TOLERANCE_S * 1000 for k, back in outages)}
    late = {t: lag for t, lag in lags.items() if t not in caught_up and lag > (JITTER_S + TOLERANCE_S) * 1000}
    assert late == {}, f"slots produced later than jitter + {TOLERANCE_S} s with no holder's kill to explain " \
        f"it (ms after the slot): {late}"
    on_time = sorted(lag for t, lag in lags.items() if t not in caught_up)
    assert len(on_time) >= 10, "hardly any slot was produced by a live holder"
    assert len(set(on_time)) > 1 and on_time[-1] - on_time[0] >= JITTER_S * 1000 * 0.3, \
        f"the fire times are not spread over the jitter: {on_time}"
    return {t: lags[t] for t in caught_up}
