"""Sessions with worker processes SIGKILLed throughout (docs/SESSIONS.md): every turn once in its
session, in each producer's order; a counting reduce that loses and doubles nothing.

Three workers run the kinds of :mod:`tests.support.session_kinds` (``AGENT_AGENTS``). Each kill is
aimed: at a worker whose task **holds** a session (its model call under way), one whose task
**waits** for its turn, or one whose task is **between the ledger's DONE and the session's apply**
(a holder whose record succeeded and whose update is not applied yet). That window is the worker's
loop latency: wide enough to aim at with hundreds of ``sk_count`` tasks in flight, whose reducer
pauses (blocking the loop, long for a few tasks); whether a kill landed there is read after it
(the apply still missing once the worker is dead). ``sk_chat``'s run has two tasks in flight: no
kill is aimed there. The victim is restarted at once. A kill that
finds no such moment within a while hits a random worker. The session lease is short
(``lease_ms``), a free session's head that does not come is passed over quickly (``stall_s``), and
no task waits long enough to be ``session_busy`` (``max_wait_s``).

A producer "sees its result" when the ledger marks the task published: the mark is written after
the broker acknowledged the result on the results topic (and after the session's apply). Run with
``-s`` for the figures; ``SESSION_CHAOS_SEED`` replays a run's choices.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from dedup.ledger import Ledger
from dedup.records import TaskRecord
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import ensure_topics
from tests.support import (
    committed,
    kill_worker,
    produce,
    read_topic,
    spawn_worker,
    stop_workers,
    succeeded,
    task_value,
    wait_for,
)
from tests.support.fleet import deployment, ledger_of, records
from tests.support.session_kinds import SLOW_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

WORKERS = 3
TURNS = int(os.environ.get("SESSION_CHAOS_TURNS", "10"))  # per producer
COUNTED = int(os.environ.get("SESSION_CHAOS_TASKS", "500"))
SEED = int(os.environ.get("SESSION_CHAOS_SEED", str(time.time_ns() % 2**31)))
SETTINGS: dict[str, Any] = {
    "agents": "tests.support.session_kinds:agents",
    "ledger": {"lease_ms": 1500, "max_deaths": 10},
    "sessions": {"poll_s": 0.2, "stall_s": 2.0, "max_wait_s": 900},
    "max_in_flight": 1024,  # every counted task in flight at once on one worker, should two die
    "llm": {"timeout_s": 30},
}


@dataclass
class Kill:
    aim: str  # holding, waiting, applying; "any" when no such moment came in time
    worker: str
    task: str | None = None
    landed: bool | None = None  # applying: the session's apply had still not run once the worker was dead


@dataclass
class Fleet:
    settings: Settings
    logs: Path
    procs: list[Any] = field(default_factory=list)
    spawned: int = 0

    def spawn(self, index: int) -> Any:
        """A worker of its own worker id (a task's ledger record names its owner)."""
        self.spawned += 1
        worker_id = f"{self.settings.worker_id}-r{index}g{self.spawned}"
        proc = spawn_worker(self.settings.model_copy(update={"worker_id": worker_id}),
                            str(self.logs / f"{worker_id}.log"))
        proc.worker_id = worker_id
        return proc

    def start(self) -> None:
        self.procs = [self.spawn(i) for i in range(WORKERS)]

    def kill(self, index: int) -> str:
        """SIGKILL worker ``index`` (reaped) and start another in its place: the dead one's id."""
        victim = self.procs[index]
        kill_worker(victim)
        self.procs[index] = self.spawn(index)
        return str(victim.worker_id)

    def index_of(self, owner: str | None) -> int | None:
        return next((i for i, p in enumerate(self.procs) if owner and p.worker_id == owner), None)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Watch:
    """The sessions sampled from the ledger during the run: when each task was first seen queued and
    first seen holding its session (its wait, to the sampling's precision)."""

    def __init__(self, ledger: Ledger, sessions: list[str]) -> None:
        self.ledger, self.sessions = ledger, sessions
        self.queued: dict[str, float] = {}
        self.entered: dict[str, float] = {}

    async def sample(self) -> list[tuple[str, dict[str, str], list[str]]]:
        """Each session's hash and queue, now."""
        keys, client = self.ledger.keys, self.ledger.client
        async with client.pipeline(transaction=False) as pipe:
            for sid in self.sessions:
                pipe.hgetall(keys.session(sid))
                pipe.zrange(keys.session_queue(sid), 0, -1)
            raw = await pipe.execute()
        now = time.monotonic()
        out = []
        for n, sid in enumerate(self.sessions):
            fields = {_s(k): _s(v) for k, v in raw[2 * n].items()}
            queue = [_s(t) for t in raw[2 * n + 1]]
            for task in queue:
                self.queued.setdefault(task, now)
            if fields.get("holder"):
                self.entered.setdefault(fields["holder"], now)
            out.append((sid, fields, queue))
        return out

    async def run(self, stop: asyncio.Event) -> None:
        while not await stopped(stop, 0.1):
            await self.sample()

    def longest_wait_s(self) -> float:
        return max((self.entered[t] - q for t, q in self.queued.items() if t in self.entered), default=0.0)

    async def passed(self) -> int:
        """Heads passed over, every session together."""
        client, keys = self.ledger.client, self.ledger.keys
        return sum([int(await client.hget(keys.session(sid), "passed") or 0) for sid in self.sessions])


async def stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` unless ``stop`` is set first: whether it is."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def aimed(aim: str, task: str, holder: str, fields: dict[str, str], record: TaskRecord) -> bool:
    """Whether ``task`` (queued in, or holding, its session) is at the moment ``aim`` names."""
    if aim == "holding":
        return task == holder and record.state == "running"
    if aim == "applying":  # an apply frees its holder in the same script: a holder has not applied yet
        return task == holder and record.state == "succeeded"
    return task != holder and record.state == "running"  # waiting


async def find_victim(ledger: Ledger, watch: Watch, fleet: Fleet, aim: str,
                      timeout_s: float) -> tuple[int, str, str] | None:
    """A live worker whose task is at the moment ``aim`` names: (its index, the session, the task)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for sid, fields, queue in await watch.sample():
            holder = fields.get("holder", "")
            for task in ([holder] if holder else []) if aim != "waiting" else queue:
                record = await ledger.get(task)
                index = None if record is None else fleet.index_of(record.fields.get("owner"))
                if record is not None and index is not None and aimed(aim, task, holder, fields, record):
                    return index, sid, task
        await asyncio.sleep(0.01 if aim == "applying" else 0.1)
    return None


async def kill_throughout(fleet: Fleet, ledger: Ledger, watch: Watch, aims: list[str], stop: asyncio.Event,
                          rng: random.Random) -> list[Kill]:
    """One kill per aim, 2 to 4 s apart, until ``stop``."""
    kills: list[Kill] = []
    for aim in aims:
        if await stopped(stop, rng.uniform(2.0, 4.0)):
            break
        found = await find_victim(ledger, watch, fleet, aim, 15)
        if found is None:
            kills.append(Kill("any", await asyncio.to_thread(fleet.kill, rng.randrange(WORKERS))))
            continue
        index, sid, task = found
        kill = Kill(aim, await asyncio.to_thread(fleet.kill, index), task)
        if aim == "applying":  # the worker is dead: no apply comes from it any more
            kill.landed = await ledger.client.zscore(ledger.keys.session_applied(sid), task) is None
        kills.append(kill)
    return kills


def all_consumed(s: Settings) -> bool:
    """Whether the group committed every record of the input topic (each one was handled)."""
    topic, partitions = s.kafka.input_topic, s.kafka.topic_partitions
    reader = Consumer({"bootstrap.servers": s.kafka.bootstrap_servers, "group.id": f"w-{uuid.uuid4().hex}"})
    try:
        ends = {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        reader.close()
    got = committed(s.kafka.bootstrap_servers, s.kafka.group_id, topic, partitions)
    return all(high == 0 or got.get(p, -1) >= high for p, high in ends.items())


async def published(ledger: Ledger, task_id: str) -> bool:
    """Ended: its result published (after its session's apply), or dead."""
    record = await ledger.get(task_id)
    return record is not None and (record.published or record.state in ("dead", "failed"))


def one_result_each(s: Settings, ids: list[str]) -> dict[str, Any]:
    """Every task has one distinct result event on the results topic: the events, by task."""
    values: dict[str, set[bytes | None]] = {}
    for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids), timeout_s=120, idle_s=3)):
        values.setdefault((m.key or b"").decode(), set()).add(m.value)
    assert set(values) == set(ids), "a task has no result, or a result under an id nobody sent"
    assert {t: len(v) for t, v in values.items() if len(v) > 1} == {}, "a task has two different results"
    return {t: json.loads(next(iter(v)) or b"null") for t, v in values.items()}


def model_calls(fake_llm: FakeLLM, ids: list[str], deaths: dict[str, int]) -> str:
    """Model calls per task (the distribution, and the deaths of each task called more than once);
    at most one more than the deaths of the workers running it (each death costs at most the call
    it interrupted)."""
    calls = fake_llm.stats()["by_step"]
    per_task = {t: calls.get(f"{t}:answer", 0) for t in ids}
    assert all(n >= 1 for n in per_task.values()), "a task never asked the model"
    assert {t: (n, deaths[t]) for t, n in per_task.items() if n > deaths[t] + 1} == {}, \
        "the model was asked more often than once plus once per worker death of the task (calls, deaths)"
    again = ", ".join(f"{n} calls after {deaths[t]} deaths" for t, n in per_task.items() if n > 1)
    return f"{dict(sorted(Counter(per_task.values()).items()))} ({again or 'none called again'})"


def describe(kills: list[Kill]) -> str:
    aims = Counter(k.aim for k in kills)
    landed = sum(1 for k in kills if k.landed)
    return (f"{len(kills)} SIGKILLs of {WORKERS} workers ({', '.join(f'{n} {a}' for a, n in sorted(aims.items()))}"
            f"{f'; {landed} landed between DONE and apply' if aims['applying'] else ''})")


# -- 1. two producers, interleaved turns of two sessions ------------------------------------------

@dataclass
class Turns:
    sessions: list[str]
    sent: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {"p1": [], "p2": []})  # (id, session)
    text: dict[str, str] = field(default_factory=dict)
    again: list[str] = field(default_factory=list)  # finished task ids produced again on purpose


async def producer(s: Settings, ledger: Ledger, run: Turns, name: str, rng: random.Random) -> None:
    """``TURNS`` turns, each to one of the two sessions at random (so that the two producers meet in
    one session, and drift apart, at any point), each sent once the one before is published; now
    and then a finished turn produced again (the same key and value)."""
    values: list[tuple[bytes, bytes]] = []
    for i in range(TURNS):
        session = rng.choice(run.sessions)
        task_id = uuid.uuid4().hex  # a random key: any partition
        run.text[task_id] = f"{name} says {i} in {session[-6:]} ({task_id[:6]})"
        values.append((task_id.encode(), task_value("sk_chat", {"text": run.text[task_id]}, task_id, session=session)))
        await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, [values[-1]])
        run.sent[name].append((task_id, session))
        await wait_for(lambda t=task_id: published(ledger, t), 180, 0.1, what=f"{name}'s turn {i} published")
        if i % 4 == 3:
            record = rng.choice(values[:-1])
            run.again.append(record[0].decode())
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, [record])


async def turns_under_kills(s: Settings, fleet: Fleet, run: Turns, rng: random.Random) -> tuple[list[Kill], Watch]:
    async with ledger_of(s) as ledger:
        watch, stop = Watch(ledger, run.sessions), asyncio.Event()
        sampler = asyncio.create_task(watch.run(stop))
        killer = asyncio.create_task(kill_throughout(fleet, ledger, watch, ["holding", "waiting", "holding"], stop,
                                                     rng))
        try:
            await asyncio.gather(producer(s, ledger, run, "p1", random.Random(rng.random())),
                                 producer(s, ledger, run, "p2", random.Random(rng.random())))
        finally:
            stop.set()
            kills = await killer
            await sampler
        await wait_for(lambda: asyncio.to_thread(all_consumed, s), 120, 0.5, what="every record handled")
        await check_turns(ledger, run)
        return kills, watch


async def check_turns(ledger: Ledger, run: Turns) -> None:
    """Each turn once in its session, each producer's in its order, nothing queued or held."""
    for session in run.sessions:
        record = await ledger.sessions.get(session)
        assert record is not None
        ids = [t["task_id"] for t in record.turns]
        assert {t: n for t, n in Counter(ids).items() if n > 1} == {}, "a turn appended twice"
        assert sorted(ids) == sorted(t for who in run.sent.values() for t, sid in who if sid == session)
        for who, sent in run.sent.items():
            theirs = [t for t, sid in sent if sid == session]
            assert [t for t in ids if t in theirs] == theirs, f"{who}'s turns out of order in {session}"
        assert [t["input"] for t in record.turns] == [{"text": run.text[t]} for t in ids]
        assert record.version == len(ids)
        assert record.queue == [] and record.holder is None, (record.queue, record.holder)


@pytest.mark.evicts_killed_members
def test_two_producers_interleaved_turns_under_sigkills_each_turn_once_in_order(
        make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s = deployment(make_settings, "sess-turns", **SETTINGS)
    fake_llm.latency_s = 0.8  # kills land inside a holder's model call, and a waiter waits that long
    rng = random.Random(SEED)
    run = Turns([f"s-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex}"])
    ensure_topics(s)
    fleet = Fleet(s, tmp_path)
    fleet.start()
    try:
        kills, watch = asyncio.run(turns_under_kills(s, fleet, run, rng))
        passed = asyncio.run(passed_over(s, run.sessions))
    finally:
        stop_workers(fleet.procs, grace_s=30)
    ids = [t for sent in run.sent.values() for t, _ in sent]
    events = one_result_each(s, ids)
    for t in ids:  # the turn kept in the session is the published result
        assert events[t]["status"] == "succeeded" and events[t]["session"]["id"] in run.sessions
    deaths = asyncio.run(deaths_of(s, ids))
    calls = model_calls(fake_llm, ids, deaths)
    assert kills, "no worker was killed"
    print(f"\nsession chaos, turns (seed {SEED}): {len(ids)} turns of 2 producers over 2 sessions, {describe(kills)}; "
          f"{len(run.again)} finished turns produced again, none appended twice; {sum(1 for n in deaths.values() if n)} "
          f"tasks taken over from a killed worker; {passed} heads passed over; model calls per turn "
          f"{calls}; longest session wait {watch.longest_wait_s():.1f}s")


async def passed_over(s: Settings, sessions: list[str]) -> int:
    async with ledger_of(s) as ledger:
        return await Watch(ledger, sessions).passed()


async def deaths_of(s: Settings, ids: list[str]) -> dict[str, int]:
    async with ledger_of(s) as ledger:
        got = await records(ledger, ids)
    assert {t: (r.state if r else None) for t, r in got.items() if r is None or r.state != "succeeded"} == {}
    return {t: int(r.to_json()["deaths"] or 0) for t, r in got.items() if r is not None}


# -- 2. a counting reduce, many tasks at once -----------------------------------------------------

async def counted_under_kills(s: Settings, fleet: Fleet, tasks: list[tuple[str, str]], sessions: list[str],
                              rng: random.Random) -> tuple[list[Kill], Watch, int]:
    values = [(t.encode(), task_value("sk_count", {"text": t}, t, session=sid)) for t, sid in tasks]
    async with ledger_of(s) as ledger:
        watch, stop = Watch(ledger, sessions), asyncio.Event()
        sampler = asyncio.create_task(watch.run(stop))
        await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, values)
        aims = ["applying", "waiting", "applying", "holding"]
        killer = asyncio.create_task(kill_throughout(fleet, ledger, watch, aims, stop, rng))

        async def all_published() -> bool:
            return all([await published(ledger, t) for t, _ in tasks])

        try:
            await wait_for(all_published, 300, 1.0, what=f"{len(tasks)} counted tasks published")
        finally:
            stop.set()
            kills = await killer
            await sampler
        for sid in sessions:
            mine = sorted(t for t, s_id in tasks if s_id == sid)
            record = await ledger.sessions.get(sid)
            assert record is not None and record.turns == []
            assert record.state["n"] == len(mine) == record.version, (sid, record.state["n"], len(mine), record.version)
            assert sorted(record.state["seen"]) == mine, "a task counted twice, or not at all"
            assert record.queue == [] and record.holder is None, (record.queue, record.holder)
        return kills, watch, await watch.passed()


@pytest.mark.evicts_killed_members
def test_a_counting_reduce_under_sigkills_counts_each_task_once(
        make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s = deployment(make_settings, "sess-count", **SETTINGS)
    fake_llm.latency_s = 0.05
    rng = random.Random(SEED + 1)
    sessions = [f"c-{uuid.uuid4().hex}" for _ in range(5)]
    # one task in twenty pauses in its reducer, between the ledger's DONE and the session's apply
    tasks = [(f"{SLOW_PREFIX if rng.random() < 0.05 else ''}{uuid.uuid4().hex}", rng.choice(sessions))
             for _ in range(COUNTED)]
    ensure_topics(s)
    fleet = Fleet(s, tmp_path)
    fleet.start()
    try:
        kills, watch, passed = asyncio.run(counted_under_kills(s, fleet, tasks, sessions, rng))
    finally:
        stop_workers(fleet.procs, grace_s=30)
    ids = [t for t, _ in tasks]
    events = one_result_each(s, ids)
    seen = Counter((e["session"]["id"], e["session"]["version"]) for e in events.values())
    deaths = asyncio.run(deaths_of(s, ids))
    calls = model_calls(fake_llm, ids, deaths)
    assert kills, "no worker was killed"
    print(f"\nsession chaos, count (seed {SEED + 1}): {len(ids)} tasks over {len(sessions)} sessions "
          f"({sorted(Counter(sid for _, sid in tasks).values())}), {describe(kills)}; "
          f"{sum(1 for n in deaths.values() if n)} tasks taken over from a killed worker; {passed} heads passed over; "
          f"{sum(n - 1 for n in seen.values())} tasks saw a version another task of their session saw too; model "
          f"calls per task {calls}; longest session wait {watch.longest_wait_s():.1f}s")
