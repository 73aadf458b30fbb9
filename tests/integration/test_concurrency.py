"""Key-ordered concurrency, backpressure and rebalances under load, on a real broker."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from consumers.partitions import RunnerConfig, RunnerMetrics
from consumers.records import Record
from consumers.runner import Runner
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from tests.support import (
    Broker,
    assert_one_result_each,
    classify,
    committed,
    metric,
    produce,
    read_topic,
    running,
    succeeded,
    task_value,
    wait_for,
)

pytestmark = pytest.mark.integration


def new_topic(bootstrap: str, partitions: int) -> str:
    topic = f"c-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result(15)
    return topic


def consumer_conf(broker: Broker) -> dict[str, Any]:
    return {
        "bootstrap.servers": broker.bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False, "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500, "partition.assignment.strategy": broker.assignment_strategy,
    }


class Gauges(RunnerMetrics):
    def __init__(self) -> None:
        self.max_inflight = 0
        self.max_paused = 0
        self.now_paused = 0

    def inflight(self, n: int) -> None:
        self.max_inflight = max(self.max_inflight, n)

    def paused(self, n: int) -> None:
        self.max_paused = max(self.max_paused, n)
        self.now_paused = n


@pytest.mark.parametrize("seed", [1, 2])
def test_same_key_in_offset_order_other_keys_concurrently(broker: Broker, seed: int) -> None:
    rng = random.Random(seed)
    topic = new_topic(broker.bootstrap, 1)
    keys = [f"key-{i}".encode() for i in range(rng.randint(5, 40))]
    n = 400
    produce(broker.bootstrap, topic, [(rng.choice(keys), str(i).encode()) for i in range(n)], partition=0)
    seen: dict[bytes | None, list[int]] = defaultdict(list)
    running_now: dict[bytes | None, int] = defaultdict(int)
    state = {"active": 0, "max_active": 0, "done": 0}

    async def handler(record: Record) -> None:
        running_now[record.key] += 1
        assert running_now[record.key] == 1, "two records of one key ran at once"
        state["active"] += 1
        state["max_active"] = max(state["max_active"], state["active"])
        await asyncio.sleep(rng.uniform(0, 0.01))
        seen[record.key].append(record.offset)
        state["active"] -= 1
        running_now[record.key] -= 1
        state["done"] += 1

    async def scenario() -> None:
        runner = Runner(consumer_conf(broker), handler, RunnerConfig(topic=topic, max_in_flight=64))
        task = asyncio.create_task(runner.run())
        await wait_for(lambda: state["done"] == n or task.done(), 60, what="every record")
        runner.stop()
        await task

    asyncio.run(scenario())
    for key, offsets in seen.items():
        assert offsets == sorted(offsets), f"{key!r} out of offset order"
    assert sum(len(v) for v in seen.values()) == n
    assert state["max_active"] > 1  # different keys did run together in one partition


def test_full_window_pauses_and_resumes_with_bounded_memory(broker: Broker) -> None:
    topic = new_topic(broker.bootstrap, 2)
    n = 200
    produce(broker.bootstrap, topic, [(f"k{i}".encode(), b"x") for i in range(n)])
    gauges = Gauges()
    done: list[int] = []

    async def handler(record: Record) -> None:  # slow enough that the window stays full
        await asyncio.sleep(0.2)
        done.append(record.offset)

    async def scenario() -> None:
        runner = Runner(consumer_conf(broker), handler,
                        RunnerConfig(topic=topic, max_in_flight=20, max_in_flight_per_partition=15, max_batch=500,
                                     pause_after_s=0.05),
                        gauges)
        task = asyncio.create_task(runner.run())
        await wait_for(lambda: len(done) == n or task.done(), 60, what="every record")
        runner.stop()
        await task

    asyncio.run(scenario())
    assert len(done) == n
    assert gauges.max_paused >= 1  # the window filled and partitions were paused
    assert gauges.max_inflight <= 20  # never more records held than the window allows


def test_a_partition_paused_when_it_left_is_fetched_again_when_it_returns(broker: Broker) -> None:
    """Both partitions paused by a full window; another member joins (taking one of them) and leaves
    (giving it back). librdkafka keeps an application's pause through a revoke: the runner must open
    the returned partition itself, or its records are never fetched and its offset never moves."""
    topic = new_topic(broker.bootstrap, 2)
    per_partition = 40
    for partition in (0, 1):
        produce(broker.bootstrap, topic, [(f"k{i}".encode(), b"x") for i in range(per_partition)], partition=partition)
    conf = consumer_conf(broker)
    gauges = Gauges()
    release = asyncio.Event()
    done: set[tuple[int, int]] = set()

    async def handler(record: Record) -> None:  # held until the partition has left and come back
        await release.wait()
        done.add((record.partition, record.offset))

    def visit() -> list[int]:
        """A second member: joins, polls until it holds a partition, leaves without committing."""
        member = Consumer(conf)
        member.subscribe([topic])
        try:
            deadline = time.monotonic() + 60
            while not member.assignment() and time.monotonic() < deadline:
                member.poll(0.1)
            return [tp.partition for tp in member.assignment()]
        finally:
            member.close()

    async def scenario() -> None:
        runner = Runner(conf, handler, RunnerConfig(topic=topic, max_in_flight=10, max_in_flight_per_partition=10,
                                                    pause_after_s=0.05), gauges)
        task = asyncio.create_task(runner.run())
        try:
            await wait_for(lambda: gauges.now_paused == 2, 60, what="both partitions paused by the full window")
            taken = await asyncio.to_thread(visit)
            assert taken, "the second member never held a partition"
            await wait_for(lambda: sorted(p for _t, p in runner.assignment) == [0, 1], 60,
                           what="both partitions back with the runner")
            release.set()
            await wait_for(lambda: len(done) == 2 * per_partition, 60, what="every record of both partitions")
            await wait_for(lambda: committed(broker.bootstrap, conf["group.id"], topic, 2) == {0: per_partition,
                                                                                               1: per_partition},
                           60, interval_s=0.5, what="both partitions committed to the end")
        finally:
            release.set()
            runner.stop()
            await task

    asyncio.run(scenario())
    assert done == {(p, o) for p in (0, 1) for o in range(per_partition)}


@pytest.mark.parametrize("protocol", ["classic", pytest.param("consumer", marks=pytest.mark.kafka_only)])
def test_rebalances_with_tasks_in_flight_lose_nothing_and_run_nothing_twice(
    make_settings: Any, fake_llm: FakeLLM, protocol: str
) -> None:
    """Workers join and leave while tasks run, under cooperative-sticky and under KIP-848."""
    s: Settings = make_settings(kafka={"topic_partitions": 6, "group_protocol": protocol})
    fake_llm.latency_s = 0.03
    n = 300
    records = [(f"rb-{i}".encode(), classify(f"rb-{i}", f"text {i}")) for i in range(n)]
    assignments: dict[str, list[int]] = {}

    async def scenario() -> None:
        b_settings = s.model_copy(update={"worker_id": "worker-b"})
        c_settings = s.model_copy(update={"worker_id": "worker-c"})
        async with running(s, fake_llm.base_url) as a:
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(lambda: fake_llm.stats()["requests"] >= 40, what="load on A")
            # B, then C join: partitions move under load
            async with running(b_settings, fake_llm.base_url) as b, running(c_settings, fake_llm.base_url) as c:
                await wait_for(lambda: fake_llm.stats()["requests"] >= 150, 60, what="load on three")
                assignments.update({w.settings.worker_id: sorted(p for _t, p in w.runner.assignment)
                                    for w in (a, b, c)})
            # B and C left in the middle: their partitions go back to A

            async def all_done() -> bool:
                recs = [await a.ledger.get(f"rb-{i}") for i in range(n)]
                return all(r is not None and r.state == "succeeded" for r in recs)

            await wait_for(all_done, 90, interval_s=0.5, what="every task")
            await a.runner.commit()

    asyncio.run(scenario())
    # each of the three held a share of the six partitions at once, and no partition twice
    held = [p for parts in assignments.values() for p in parts]
    assert all(assignments.values()) and sorted(held) == sorted(set(held)), assignments
    assert_one_result_each(s.kafka.bootstrap_servers, s.kafka.results_topic, [f"rb-{i}" for i in range(n)],
                           fake_llm.stats()["by_step"])
    assert sum(committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, 6).values()) == n


@pytest.mark.parametrize(("kind", "in_flight", "cap", "peak"), [
    ("classify", 100, None, 100),  # above the 64 calls the client used to allow whatever the window
    ("review", 12, None, 36),  # research, summary and critique of every task in flight at once
    ("classify", 40, 10, 10),  # AGENT_LLM__MAX_CONCURRENCY set on purpose: a cap
])
def test_model_calls_open_follow_max_in_flight(
    make_settings: Any, fake_llm: FakeLLM, kind: str, in_flight: int, cap: int | None, peak: int,
) -> None:
    """One partition, a slow model: the calls the model sees open at once reach what AGENT_MAX_IN_FLIGHT
    allows (times the calls one task opens at once), or the cap set on purpose, and never more."""
    s: Settings = make_settings(kafka={"topic_partitions": 1}, max_in_flight=in_flight,
                                llm={"max_concurrency": cap, "timeout_s": 30})
    fake_llm.latency_s = 1.0
    n = 2 * in_flight if cap is None else 3 * cap
    ids = [f"open-{kind}-{i}" for i in range(n)]
    value = (lambda t: classify(t)) if kind == "classify" else (lambda t: task_value("review", {"document": t}, t))

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic,
                                    [(t.encode(), value(t)) for t in ids])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) >= n, 90,
                           what="every task", service=svc)

    asyncio.run(scenario())
    assert fake_llm.stats()["peak_open"] == peak


def test_a_replay_while_a_worker_joins_and_leaves_reaches_new_work_and_ends_each_record_once(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """A new group replays a processed topic in small fetches (its batches screened whole, the next
    read queued before the last one's answer), a second worker joins and leaves meanwhile, and the
    topic ends in new work, another input under a finished id and a record that does not decode:
    no finished task runs or publishes again, each new task runs once, both bad records are dead
    letters, and the group commits to the end."""
    s: Settings = make_settings(kafka={"topic_partitions": 6}, max_in_flight=32)
    n, m = 3000, 60
    first = [(f"rp-{i}".encode(), classify(f"rp-{i}", f"text {i}")) for i in range(n)]
    later = [(f"rn-{i}".encode(), classify(f"rn-{i}", f"new {i}")) for i in range(m)]
    bad = [(b"rp-7", classify("rp-7", "another text")),
           (b"rp-bad", b'{"task_id": "rp-bad", "kind": "classify", "input": {"text": "\\ud800"}}')]

    async def first_run() -> None:
        async with running(s, fake_llm.base_url) as svc:
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, first)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == n, 120,
                           what="the first pass", service=svc)

    asyncio.run(first_run())
    produce(s.kafka.bootstrap_servers, s.kafka.input_topic, later + bad)
    fake_llm.latency_s = 0.2  # the new work at the end keeps the group busy while the members move
    replay = s.model_copy(update={"kafka": s.kafka.model_copy(update={"group_id": s.kafka.group_id + "-replay"})})
    screened: list[float] = []

    async def replay_run() -> None:
        async with running(replay, fake_llm.base_url) as a:
            async with running(replay.model_copy(update={"worker_id": "worker-b"}), fake_llm.base_url) as b:
                await wait_for(lambda: b.runner.assignment, 60, what="B holding partitions")
                await asyncio.sleep(0.5)
                screened.append(metric(b, "agent_replay_screened_total"))
            # B left: its partitions go back to A
            await wait_for(lambda: sum(max(o, 0) for o in committed(
                s.kafka.bootstrap_servers, replay.kafka.group_id, s.kafka.input_topic, 6).values()) == n + m + 2,
                120, interval_s=0.5, what="the replay group's commits to the end", service=a)
            screened.append(metric(a, "agent_replay_screened_total"))

    asyncio.run(replay_run())
    calls = fake_llm.stats()["by_step"]
    assert all(calls.get(f"rp-{i}:classify") == 1 for i in range(n)), "a finished task ran again"
    assert_one_result_each(s.kafka.bootstrap_servers, s.kafka.results_topic,
                           [f"rp-{i}" for i in range(n)] + [f"rn-{i}" for i in range(m)], calls)
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n + m))
    assert len(results) == n + m  # every finished task's result was published once, and not again
    assert sum(screened) >= n / 2  # most of the replay was screened, not claimed record by record
    dlq = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=2)
    assert {m.headers["dlq.reason"] for m in dlq} == {b"conflict", b"decode"}
    # a record dead-lettered twice (read again after a rebalance) is the same record both times
    assert len({(m.headers["dlq.original.partition"], m.headers["dlq.original.offset"]) for m in dlq}) == 2
