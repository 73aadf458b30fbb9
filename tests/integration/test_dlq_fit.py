"""A dead letter always fits the dead-letter topic, and a record the broker refuses for good is
told apart from a broker that cannot be reached."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumers.producers import (
    HEADER_OVERHEAD_BYTES,
    Outputs,
    Publisher,
    RecordRejected,
    record_size,
    topic_max_message_bytes,
)
from consumers.records import Record
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.pipeline import dlq
from service.runtime.wiring import build, ensure_topics
from tests.support import Broker, read_topic

pytestmark = pytest.mark.integration

DLQ_LIMIT = 20_000


def create_topic(s: Settings, topic: str, config: dict[str, str] | None = None) -> AdminClient:
    admin = AdminClient(s.kafka.common_config())
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1, config=config or {})])[topic].result(15)
    return admin


def failed_record(value: bytes, headers: list[tuple[str, bytes]] | None = None) -> Record:
    return Record("tasks", 0, 7, b"task-key", value, headers or [])


async def dead_letter(outputs: Outputs, record: Record) -> None:
    try:
        await outputs.dead_letter(record, reason="too_large", error="task of 100000 bytes", attempts=0,
                                  task_id="task-1")
    finally:
        await asyncio.to_thread(outputs.publisher.close)


def test_a_dead_letter_is_cut_to_the_dlq_topic_limit(make_settings: Any, broker: Broker) -> None:
    s: Settings = make_settings()
    admin = create_topic(s, s.kafka.dlq_topic, {"max.message.bytes": str(DLQ_LIMIT)})
    learnt = topic_max_message_bytes(admin, s.kafka.dlq_topic)
    assert learnt in (DLQ_LIMIT, None)  # a stand-in broker may not report it
    outputs = Outputs(Publisher(s.kafka.producer_config()), s.kafka.results_topic, s.kafka.dlq_topic)
    outputs.set_dlq_limit(DLQ_LIMIT)  # what the broker said, or what we told it
    value = bytes(range(256)) * 400  # 100 KiB
    asyncio.run(dead_letter(outputs, failed_record(value, [("origin", b"web"), ("bulky", b"b" * 30_000)])))

    [msg] = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    h = msg.headers
    assert msg.value is not None and 0 < len(msg.value) < DLQ_LIMIT and value.startswith(msg.value)
    assert record_size(msg.key, msg.value, list(h.items())) + HEADER_OVERHEAD_BYTES * len(h) <= DLQ_LIMIT
    assert h["dlq.value.truncated"] == b"true"
    assert h["dlq.value.size"] == str(len(value)).encode()
    assert h["dlq.value.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert h["dlq.reason"] == b"too_large" and h["dlq.task_id"] == b"task-1" and h["dlq.original.offset"] == b"7"
    assert h["origin"] == b"web" and "bulky" not in h and h["dlq.headers.dropped"] == b"1"
    assert msg.key == b"task-key"


def test_a_dead_letter_the_broker_refuses_is_sent_again_small(make_settings: Any, broker: Broker) -> None:
    """The limit unknown to us: a broker that enforces it refuses the record, the small retry lands."""
    s: Settings = make_settings()
    create_topic(s, s.kafka.dlq_topic, {"max.message.bytes": str(DLQ_LIMIT)})
    outputs = Outputs(Publisher(s.kafka.producer_config()), s.kafka.results_topic, s.kafka.dlq_topic)
    value = os.urandom(100_000)  # lz4 cannot shrink it under the limit
    asyncio.run(dead_letter(outputs, failed_record(value)))

    [msg] = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    if "dlq.value.truncated" in msg.headers:  # the broker enforced its limit
        assert msg.value is not None and 0 < len(msg.value) <= 1024
        assert msg.headers["dlq.value.size"] == b"100000"
        assert msg.headers["dlq.value.sha256"] == hashlib.sha256(value).hexdigest().encode()
    else:  # a stand-in broker that ignores max.message.bytes took it whole
        assert msg.value == value
    assert msg.headers["dlq.reason"] == b"too_large"


def test_a_result_over_the_producer_limit_is_rejected_not_failed(make_settings: Any) -> None:
    s: Settings = make_settings()
    create_topic(s, s.kafka.results_topic)
    outputs = Outputs(Publisher(s.kafka.producer_config()), s.kafka.results_topic, s.kafka.dlq_topic)

    async def main() -> None:
        try:
            with pytest.raises(RecordRejected):
                await asyncio.wait_for(outputs.result(failed_record(b"{}"), "task-1", b"r" * 1_100_000, None), 30)
        finally:
            await asyncio.to_thread(outputs.publisher.close)

    asyncio.run(main())


def test_ensure_topics_gives_the_dlq_topic_room_and_build_learns_it(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()
    ensure_topics(s)
    admin = AdminClient(s.kafka.common_config())
    limit = topic_max_message_bytes(admin, s.kafka.dlq_topic)
    assert limit is not None and limit >= 1_048_588 + 65_536

    async def main() -> None:
        service = build(s, llm_base_url=fake_llm.base_url)
        try:
            assert service.outputs.dlq_limit == limit
        finally:
            await service.aclose()

    asyncio.run(main())


def test_dead_letters_of_topics_just_made_read_at_once(make_settings: Any) -> None:
    """GET /dlq's peek straight after ensure_topics finds no dead letter, where its watermark read
    could answer NOT_LEADER_FOR_PARTITION while the new partitions' leaders were being elected."""
    for attempt in range(5):
        run = uuid.uuid4().hex[:8]
        s: Settings = make_settings(kafka={f"{name}_topic": f"fresh-{attempt}-{run}.{name}"
                                           for name in ("input", "results", "dlq", "audit", "approvals")})
        ensure_topics(s)
        assert dlq.peek(s.kafka, limit=10) == []
