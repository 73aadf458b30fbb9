"""What the demo reads back from its topics: every record up to the end of each partition, and a
wait until every task the demo produced has its outcome there.

The reader assigns the partitions itself (no consumer group): on a broker that has just started, a
group's first join can take longer than the demo waits, which once left the printed sections empty.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition


def read_topic(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[Message]:
    """Every record of ``topic``, from the beginning of each partition to its end as of now."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-reader",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        ends: dict[int, int] = {}
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
            if high > low:
                ends[partition] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        return _until(consumer, ends, time.monotonic() + timeout_s)
    finally:
        consumer.close()


def _until(consumer: Consumer, ends: dict[int, int], deadline: float) -> list[Message]:
    out: list[Message] = []
    left = dict(ends)
    while left and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None or msg.error() is not None:
            continue
        partition, offset = msg.partition(), msg.offset()
        if partition in left and offset is not None and offset < left[partition]:
            out.append(msg)
            if offset + 1 >= left[partition]:
                del left[partition]
    return out


@dataclass
class Outcomes:
    """The results and dead letters on the topics, and the tasks that have no outcome yet."""

    results: list[Message] = field(default_factory=list)
    dead: list[Message] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dead_missing: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing and self.dead_missing == 0


def read_outcomes(bootstrap: str, results_topic: str, dlq_topic: str, task_ids: Collection[str],
                  dead_letters: int) -> Outcomes:
    results = read_topic(bootstrap, results_topic)
    dead = read_topic(bootstrap, dlq_topic)
    ended = {_task_id(m) for m in results}
    return Outcomes(results, dead, [t for t in task_ids if t not in ended], max(0, dead_letters - len(dead)))


def await_outcomes(bootstrap: str, results_topic: str, dlq_topic: str, task_ids: Collection[str],
                   dead_letters: int, deadline: float) -> Outcomes:
    """Read the topics until every task in ``task_ids`` has its outcome on the results topic and
    the dead-letter topic holds at least ``dead_letters`` records, or until ``deadline``."""
    while True:
        outcomes = read_outcomes(bootstrap, results_topic, dlq_topic, task_ids, dead_letters)
        if outcomes.complete or time.monotonic() >= deadline:
            return outcomes
        time.sleep(0.5)


def _task_id(message: Message) -> Any:
    try:
        return json.loads(message.value() or b"{}").get("task_id")
    except ValueError:
        return None
