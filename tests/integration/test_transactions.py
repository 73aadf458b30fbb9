"""Exactly-once output (``AGENT_KAFKA__TRANSACTIONAL=true``) on Apache Kafka: each outcome and the
offset of its record commit in one transaction, so a ``read_committed`` reader of the results topic
sees every task's result once, duplicates of a task in the input included.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import (
    classify,
    committed,
    failed,
    metric,
    produce,
    read_topic,
    running,
    succeeded,
    task_value,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]

PARTITIONS = 3


def _transactional(make_settings: Any, **overrides: Any) -> Settings:
    kafka = {"topic_partitions": PARTITIONS, "transactional": True, "transactional_id": f"tx-{uuid.uuid4().hex[:8]}",
             **overrides.pop("kafka", {})}
    return make_settings(kafka=kafka, **overrides)  # type: ignore[no-any-return]


def _end_offsets(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        consumer.close()


def test_each_result_and_dead_letter_is_read_committed_exactly_once(make_settings: Any, fake_llm: FakeLLM) -> None:
    s = _transactional(make_settings)
    n = 150
    tasks = [(f"tx-{i}".encode(), classify(f"tx-{i}", f"text {i}")) for i in range(n)]
    repeats = tasks[:30]  # the same tasks again: their results were published already
    poison = [(b"tx-bad-json", b"{nope"), (b"tx-bad-schema", task_value("classify", {"text": "x"}, "tx-bad-schema")),
              (b"tx-fail-1", classify("tx-fail-1"))]
    fake_llm.add_fault(FaultRule("error", match="tx-fail-1", status=400))  # permanent: its dead letter

    async def scenario() -> dict[str, float]:
        async with running(s, fake_llm.base_url) as svc:
            assert svc.runner.transactions is not None
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, tasks + poison)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == n, 60,
                           what="every task")
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, repeats)
            ends = await asyncio.to_thread(_end_offsets, s.kafka.bootstrap_servers, s.kafka.input_topic)
            await wait_for(lambda: committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic,
                                             PARTITIONS) == ends, 60, interval_s=0.3,
                           what="the offsets of every record committed in transactions")
            stored = await svc.ledger.get("tx-0")
            # marked before the send, inside the transaction that carries the result and the offset
            assert stored is not None and stored.published_how == "staged"
            return {"transactions": svc.runner.transactions.transactions,
                    "aborts": svc.runner.transactions.aborts,
                    "duplicates": metric(svc, "agent_tasks_total", {"outcome": "duplicate"})}

    figures = asyncio.run(scenario())
    events = read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n + 2, idle_s=2)
    per_task = Counter((m.key or b"").decode() for m in succeeded(events))
    assert set(per_task) == {k.decode() for k, _ in tasks}
    assert set(per_task.values()) == {1}, [k for k, c in per_task.items() if c > 1]
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=3, idle_s=2)
    assert sorted(m.headers["dlq.reason"] for m in dead) == [b"decode", b"permanent", b"schema"]
    # each dead letter of a task id and its failed event committed together, once: the event names it
    letters = {m.headers["dlq.task_id"].decode(): m for m in dead if m.headers["dlq.task_id"]}
    failures = {m.json()["task_id"]: m.json() for m in failed(events)}
    assert len(failed(events)) == 2 and set(failures) == set(letters) == {"tx-bad-schema", "tx-fail-1"}
    for task_id, letter in letters.items():
        assert failures[task_id]["dead_letter"] == {"topic": s.kafka.dlq_topic, "partition": letter.partition,
                                                    "offset": letter.offset, "id": letter.headers["dlq.id"].decode()}
    assert figures["duplicates"] == len(repeats) and figures["transactions"] >= 1
    assert sum(fake_llm.stats()["by_key"].values()) == n + 1


def test_a_result_too_large_for_its_topic_is_dead_lettered_inside_the_transaction(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """The broker refuses the record for good: every transaction holding it would abort. It is
    replaced by a dead letter of its task, and the partition's other results commit."""
    s = _transactional(make_settings, kafka={"topic_partitions": 1})
    admin = AdminClient(s.kafka.common_config())
    topic = NewTopic(s.kafka.results_topic, num_partitions=1, replication_factor=1,
                     config={"max.message.bytes": "1200", "compression.type": "uncompressed"})
    admin.create_topics([topic])[s.kafka.results_topic].result(30)
    fields = [f"field-{uuid.uuid4().hex}" for _ in range(40)]  # the result names every field asked for
    big = task_value("extract", {"document": "a short document", "fields": fields}, "tx-big")
    small = [(f"tx-s{i}".encode(), classify(f"tx-s{i}")) for i in range(10)]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic,
                                    small[:5] + [(b"tx-big", big)] + small[5:])
            ends = await asyncio.to_thread(_end_offsets, s.kafka.bootstrap_servers, s.kafka.input_topic, 1)
            await wait_for(lambda: committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic,
                                             1) == ends, 60, interval_s=0.3, what="every offset committed")
            assert svc.runner.transactions is not None and svc.runner.transactions.aborts >= 1

    asyncio.run(scenario())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=10, idle_s=2))
    assert sorted((m.key or b"").decode() for m in results) == sorted(k.decode() for k, _ in small)
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1, idle_s=2)
    assert [(m.key, m.headers["dlq.reason"]) for m in dead] == [(b"tx-big", b"internal")]
    assert b"refused the outcome record" in dead[0].headers["dlq.error"]
    # the task's outcome is still one event on the results topic: failed, naming that dead letter
    (event,) = [m.json() for m in failed(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=11))]
    assert (event["task_id"], event["reason"], event["error"]) == ("tx-big", "internal",
                                                                   dead[0].headers["dlq.error"].decode())
    assert event["dead_letter"] == {"topic": s.kafka.dlq_topic, "partition": 0, "offset": dead[0].offset,
                                    "id": dead[0].headers["dlq.id"].decode()}


def test_a_reply_to_an_allowed_replies_topic_that_does_not_exist_is_dropped_not_every_transaction(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """A child names a replies topic this deployment may write (AGENT_DELEGATION__REPLY_TOPICS) that
    does not exist: a deployment's mistake. As without transactions, its reply is dropped (the
    parent's deadline ends the parent); it must not fail every transaction of the worker."""
    missing = f"replies-missing-{uuid.uuid4().hex[:8]}"
    s = _transactional(make_settings, kafka={"topic_partitions": 1}, delegation={"reply_topics": [missing]})
    child = (b"tx-child", classify("tx-child"), [("agent.reply_to", missing.encode()), ("agent.parent", b"tx-parent"),
                                                 ("agent.parent_step", b"ask"), ("agent.child", b"0")])
    others = [(f"tx-o{i}".encode(), classify(f"tx-o{i}")) for i in range(6)]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url):
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic,
                                    [*others[:3], child, *others[3:]])
            ends = await asyncio.to_thread(_end_offsets, s.kafka.bootstrap_servers, s.kafka.input_topic, 1)
            await wait_for(lambda: committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic,
                                             1) == ends, 120, interval_s=0.5, what="every offset committed")

    asyncio.run(scenario())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=7, idle_s=2))
    assert sorted((m.key or b"").decode() for m in results) == sorted(["tx-child", *(f"tx-o{i}" for i in range(6))])
