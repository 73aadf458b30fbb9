"""A three-node Apache Kafka cluster failing under load: a partition leader SIGKILLed and restarted, a
rolling restart of every broker, a broker frozen (SIGSTOP) for longer than its session.

Topics have replication factor 3 and ``min.insync.replicas=2``; unclean leader election is off. While
thousands of tasks flow through one service, each fault happens once. Then the truth is read from
the outside: every task has exactly one result value (a re-emission of the same bytes is counted,
not refused), no task ran the model twice, nothing was dead-lettered, and the group's committed
offsets reach the end of every partition.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.devtools.kraft import KafkaCluster, KafkaNode
from tests.support import assert_one_result_each, classify, committed, metric, produce, running, succeeded, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

PARTITIONS = 6
TASKS = int(os.environ.get("CLUSTER_TASKS", "3000"))
FREEZE_S = 8.0  # longer than the brokers' session (broker.session.timeout.ms=4000) and the group's (6 s)


def _leaders(cluster: KafkaCluster, topic: str) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": ",".join(n.address for n in cluster.running())})
    metadata = admin.list_topics(topic, timeout=10)
    return {p: int(m.leader) for p, m in metadata.topics[topic].partitions.items()}


def _in_sync(cluster: KafkaCluster, topic: str) -> bool:
    admin = AdminClient({"bootstrap.servers": ",".join(n.address for n in cluster.running())})
    metadata = admin.list_topics(topic, timeout=10)
    return all(len(m.isrs) == len(cluster.nodes) for m in metadata.topics[topic].partitions.values())


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - metadata from a cluster in the middle of a failover
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _kill_leader(cluster: KafkaCluster, topic: str, events: list[str]) -> None:
    node = cluster.node(_leaders(cluster, topic)[0])
    node.kill()
    events.append(f"SIGKILL node {node.node_id} (leader of partition 0)")
    _wait(lambda: _leaders(cluster, topic)[0] not in (node.node_id, -1), 60, "a new leader of partition 0")
    events.append(f"partition 0 led by node {_leaders(cluster, topic)[0]}")
    node.start()
    events.append(f"node {node.node_id} restarted")
    _wait(lambda: _in_sync(cluster, topic), 90, "every replica back in sync")


def _rolling_restart(cluster: KafkaCluster, topic: str, events: list[str]) -> None:
    for node in cluster.nodes:
        node.restart()
        events.append(f"node {node.node_id} restarted (SIGTERM)")
        _wait(lambda: _in_sync(cluster, topic), 90, "every replica back in sync")


def _freeze_leader(cluster: KafkaCluster, topic: str, events: list[str]) -> None:
    node: KafkaNode = cluster.node(_leaders(cluster, topic)[0])
    node.proc.send_signal(signal.SIGSTOP)
    events.append(f"SIGSTOP node {node.node_id} for {FREEZE_S}s")
    try:
        _wait(lambda: _leaders(cluster, topic)[0] not in (node.node_id, -1), 60, "a new leader of partition 0")
        events.append(f"partition 0 led by node {_leaders(cluster, topic)[0]}")
        time.sleep(FREEZE_S)
    finally:
        node.proc.send_signal(signal.SIGCONT)
    events.append(f"SIGCONT node {node.node_id}")
    _wait(lambda: _in_sync(cluster, topic), 90, "every replica back in sync")


FAULTS = {"leader-sigkill": _kill_leader, "rolling-restart": _rolling_restart, "frozen-broker": _freeze_leader}


def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
    finally:
        consumer.close()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_cluster_faults_under_load_lose_nothing_and_give_no_task_two_results(
    kafka_cluster: KafkaCluster, make_cluster_settings: Any, fake_llm: FakeLLM, fault: str
) -> None:
    s: Settings = make_cluster_settings(kafka={"topic_partitions": PARTITIONS}, drain_timeout_s=30)
    fake_llm.latency_s = 0.005
    records = [(f"cl-{i}".encode(), classify(f"cl-{i}", f"text {i}")) for i in range(TASKS)]
    events: list[str] = []
    figures: dict[str, Any] = {}

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) >= TASKS // 4, 120,
                           what="a quarter of the tasks")
            figures["done_at_fault"] = metric(svc, "agent_tasks_total", {"outcome": "succeeded"})
            await asyncio.to_thread(FAULTS[fault], kafka_cluster, s.kafka.input_topic, events)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) >= TASKS, 240,
                           interval_s=0.5, what="every task", service=svc)
            await wait_for(lambda: committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic,
                                             PARTITIONS) == _end_offsets(s.kafka.bootstrap_servers, s.kafka.input_topic),
                           60, interval_s=0.5, what="committed offsets at the end of every partition")
            figures["dead_letters"] = metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"})
            figures["duplicates_skipped"] = metric(svc, "agent_tasks_total", {"outcome": "duplicate"})
            svc.runner.config.lag_interval_s = 0.2

            def lag() -> float:
                return sum(metric(svc, "agent_consumer_lag", {"topic": s.kafka.input_topic, "partition": str(p)})
                           for p in range(PARTITIONS))

            await wait_for(lambda: lag() == 0, 30, interval_s=0.2, what="agent_consumer_lag 0 after the run")
            figures["lag"] = lag()

    asyncio.run(scenario())
    ends = _end_offsets(s.kafka.bootstrap_servers, s.kafka.input_topic)
    assert sum(ends.values()) == TASKS  # the test's own producer wrote each task once (idempotent)
    assert committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, PARTITIONS) == ends
    calls = fake_llm.stats()["by_step"]
    results = assert_one_result_each(s.kafka.bootstrap_servers, s.kafka.results_topic,
                                     [f"cl-{i}" for i in range(TASKS)], calls)
    print(f"\n{fault}: tasks {TASKS}, events {events}, succeeded before the fault {figures['done_at_fault']:.0f}, "
          f"results {len(results)} ({len(results) - TASKS} re-emitted with the same bytes), "
          f"duplicates skipped {figures['duplicates_skipped']:.0f}, model calls {sum(calls.values())}, "
          f"dead letters {figures['dead_letters']:.0f}, lag after the run {figures['lag']:.0f}")
    assert figures["dead_letters"] == 0
    assert figures["lag"] == 0


KILLS = int(os.environ.get("CLUSTER_KILLS", "5"))
WORKERS = 3


def _worker_settings(s: Settings, slot: int) -> Settings:
    """One replica's settings: its transactional.id stays with its slot across restarts (as a
    StatefulSet ordinal would), so a restarted worker aborts its predecessor's open transaction."""
    kafka = s.kafka.model_copy(update={"transactional_id": f"{s.kafka.group_id}-{slot}"})
    return s.model_copy(update={"kafka": kafka, "worker_id": f"{s.worker_id}-{slot}"})


@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
def test_workers_sigkilled_on_the_cluster_and_the_results_read_committed(
    kafka_cluster: KafkaCluster, make_cluster_settings: Any, fake_llm: FakeLLM, tmp_path: Any, transactional: bool
) -> None:
    """Worker processes SIGKILLed at random while thousands of tasks flow. Without transactions a
    killed worker's published-but-uncommitted results are published again (same bytes); with them,
    a ``read_committed`` reader sees every task's result exactly once."""
    import random

    from service.runtime.wiring import ensure_topics
    from tests.support import kill_worker, read_topic, spawn_worker, stop_workers

    s: Settings = make_cluster_settings(kafka={"topic_partitions": PARTITIONS, "transactional": transactional},
                                        ledger={"lease_ms": 2000}, commit_interval_s=1.0, max_in_flight=16)
    fake_llm.latency_s = 0.25  # 3 workers, 16 tasks each in flight: about 190 tasks/s, so the kills land mid-run
    rng = random.Random(11)
    ids = [f"kx-{i}" for i in range(TASKS)]
    ensure_topics(s)
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = [spawn_worker(_worker_settings(s, i), str(logs / f"w{i}.log")) for i in range(WORKERS)]
    kills = 0
    progress: list[int] = []  # offsets committed at each kill
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), classify(t, f"text {t}")) for t in ids])
        for _ in range(KILLS):
            progress.append(sum(max(o, 0) for o in committed(s.kafka.bootstrap_servers, s.kafka.group_id,
                                                             s.kafka.input_topic, PARTITIONS).values()))
            time.sleep(rng.uniform(2.0, 4.0))
            victim = rng.randrange(WORKERS)
            kill_worker(workers[victim])  # SIGKILL its process group, and reap it
            kills += 1
            workers[victim] = spawn_worker(_worker_settings(s, victim), str(logs / f"w{victim}.log"))
        ends = _end_offsets(s.kafka.bootstrap_servers, s.kafka.input_topic)
        _wait(lambda: committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, PARTITIONS) == ends,
              240, "committed offsets at the end of every partition")
    finally:
        stop_workers(workers, grace_s=30)  # SIGTERM, SIGKILL after 30 s, and every one reaped
    read = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=TASKS, timeout_s=120, idle_s=3))
    everything = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=TASKS, timeout_s=120, idle_s=3,
                            isolation="read_uncommitted"))
    copies: dict[str, int] = {}
    values: dict[str, set[bytes | None]] = {}
    for m in read:
        key = (m.key or b"").decode()
        copies[key] = copies.get(key, 0) + 1
        values.setdefault(key, set()).add(m.value)
    calls = fake_llm.stats()["by_step"]
    model_calls = sum(calls.get(f"{t}:classify", 0) for t in ids)
    print(f"\n{'exactly-once' if transactional else 'at-least-once'}: tasks {TASKS}, workers {WORKERS}, "
          f"SIGKILLs {kills} (offsets committed at each: {progress}), results read_committed {len(read)} (tasks with more than one copy "
          f"{sum(1 for c in copies.values() if c > 1)}), records incl. aborted {len(everything)}, "
          f"model calls {model_calls}")
    assert kills == KILLS and progress[-1] < TASKS, "the kills did not land while tasks were flowing"
    assert set(copies) == set(ids), "a task has no result"
    assert all(len(v) == 1 for v in values.values()), "a task has two different results"
    if transactional:
        assert sorted(copies.values()) == [1] * TASKS, "a read_committed reader saw a result twice"
