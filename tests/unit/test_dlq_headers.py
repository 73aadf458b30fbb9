"""Dead letters always fit: header building and truncation, and the produce-error classification."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from confluent_kafka import KafkaError

from consumers.producers import (
    HEADER_OVERHEAD_BYTES,
    Headers,
    Outputs,
    ProduceFailed,
    Publisher,
    RecordRejected,
    _rejected,
    _settle_all,
    dead_letter_headers,
    fit_dead_letter,
    record_size,
)
from consumers.records import Record


def rec(value: bytes | None = b"v", key: bytes | None = b"k", headers: list[tuple[str, bytes]] | None = None) -> Record:
    return Record("tasks", 2, 41, key, value, headers or [])


def dlq_headers(record: Record, error: str = "boom") -> Headers:
    return dead_letter_headers(record, reason="schema", error=error, attempts=3, task_id="t-1")


def framed(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    return record_size(key, value, headers) + HEADER_OVERHEAD_BYTES * len(headers)


def hmap(headers: Headers) -> dict[str, Any]:
    return dict(headers)


def test_a_dead_letter_within_the_budget_is_unchanged() -> None:
    r = rec(b"x" * 100, headers=[("a", b"1")])
    headers = dlq_headers(r)
    assert fit_dead_letter(r.key, r.value, headers, 20_000) == (r.key, r.value, headers)
    assert "dlq.value.truncated" not in hmap(headers)


def test_a_large_value_is_cut_to_the_budget_and_noted() -> None:
    value = bytes(range(256)) * 400  # 100 KiB
    r = rec(value, headers=[("origin", b"web")])
    key, cut, headers = fit_dead_letter(r.key, r.value, dlq_headers(r), 20_000)
    h = hmap(headers)
    assert framed(key, cut, headers) <= 20_000
    assert cut is not None and 15_000 < len(cut) < 20_000 and value.startswith(cut)
    assert h["dlq.value.truncated"] == b"true"
    assert h["dlq.value.size"] == str(len(value)).encode()
    assert h["dlq.value.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert h["origin"] == b"web" and h["dlq.reason"] == b"schema" and h["dlq.original.offset"] == b"41"
    assert key == b"k" and "dlq.key.truncated" not in h


def test_huge_original_headers_go_first_and_dlq_headers_stay() -> None:
    r = rec(b"small", headers=[("small", b"1"), ("huge", b"h" * 50_000), ("traceparent", b"00-abc-def-01")])
    key, value, headers = fit_dead_letter(r.key, r.value, dlq_headers(r), 20_000)
    h = hmap(headers)
    assert framed(key, value, headers) <= 20_000
    assert "huge" not in h and h["small"] == b"1" and h["traceparent"] == b"00-abc-def-01"
    assert h["dlq.headers.dropped"] == b"1"
    assert value == b"small" and "dlq.value.truncated" not in h
    assert {k for k in h if k.startswith("dlq.")} >= {
        "dlq.reason", "dlq.error", "dlq.original.topic", "dlq.original.partition", "dlq.original.offset",
        "dlq.attempts", "dlq.task_id", "dlq.failed_at"}


def test_a_huge_key_is_cut_and_noted() -> None:
    r = rec(b"v" * 30_000, key=b"K" * 30_000)
    key, value, headers = fit_dead_letter(r.key, r.value, dlq_headers(r), 20_000)
    h = hmap(headers)
    assert framed(key, value, headers) <= 20_000
    assert key is not None and len(key) <= 5_000 and h["dlq.key.truncated"] == b"true"
    assert h["dlq.key.size"] == b"30000" and h["dlq.value.truncated"] == b"true"


def test_a_tombstone_and_a_zero_budget_never_fail() -> None:
    r = rec(None, key=None, headers=[("x", b"y" * 100)])
    key, value, headers = fit_dead_letter(r.key, r.value, dlq_headers(r), 0)
    assert key is None and value is None and "dlq.reason" in hmap(headers)
    r = rec(b"v" * 1000)
    _, value, headers = fit_dead_letter(r.key, r.value, dlq_headers(r), 0)
    assert value == b"" and hmap(headers)["dlq.value.size"] == b"1000"


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE,
                                  KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
                                  KafkaError._INVALID_ARG])
def test_size_and_invalid_record_errors_reject_the_record(code: int) -> None:
    assert _rejected(KafkaError(code))


@pytest.mark.parametrize("code", [KafkaError._TRANSPORT, KafkaError._MSG_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION,
                                  KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                  KafkaError._ALL_BROKERS_DOWN])
def test_other_errors_stay_produce_failed(code: int) -> None:
    assert not _rejected(KafkaError(code))


def test_record_rejected_is_no_produce_failed() -> None:
    assert not issubclass(RecordRejected, ProduceFailed) and not issubclass(ProduceFailed, RecordRejected)


def test_delivery_errors_settle_as_what_they_are() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rejected, failed = loop.create_future(), loop.create_future()
        _settle_all([(rejected, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None),
                     (failed, KafkaError(KafkaError._MSG_TIMED_OUT), None)])
        with pytest.raises(RecordRejected):
            await rejected
        with pytest.raises(ProduceFailed):
            await failed

    asyncio.run(main())


def _publisher(**conf: Any) -> Publisher:
    # nothing listens there: produce() still runs its local checks
    return Publisher({"bootstrap.servers": "127.0.0.1:1", "log_level": 0, **conf})


def test_a_record_over_the_producer_limit_is_rejected_at_once() -> None:
    publisher = _publisher(**{"message.max.bytes": 10_000})
    try:
        with pytest.raises(RecordRejected):
            asyncio.run(asyncio.wait_for(publisher.send("t", b"k", b"x" * 20_000, []), 5))
    finally:
        publisher.close(0.1)


def test_a_record_over_the_whole_queue_never_waits_for_room() -> None:
    publisher = _publisher(**{"queue.buffering.max.kbytes": 4})
    try:
        with pytest.raises(RecordRejected):
            asyncio.run(asyncio.wait_for(publisher.send("t", b"k", b"x" * 8_000, []), 5))
    finally:
        publisher.close(0.1)


class FakePublisher:
    def __init__(self, refusals: int = 0, max_message_bytes: int = 1_000_000) -> None:
        self.refusals = refusals
        self.max_message_bytes = max_message_bytes
        self.queue_max_bytes = 1 << 30
        self.sent: list[tuple[str, bytes | None, bytes | None, Headers]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        await self.send_at(topic, key, value, headers)

    async def send_at(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> tuple[int, int]:
        self.sent.append((topic, key, value, headers))
        if self.refusals:
            self.refusals -= 1
            raise RecordRejected("Broker: Message size too large")
        return (3, 40 + len(self.sent))


def test_a_delivered_record_settles_as_where_it_was_written() -> None:
    async def main() -> None:
        future = asyncio.get_running_loop().create_future()
        _settle_all([(future, None, (2, 17))])
        assert await future == (2, 17)

    asyncio.run(main())


def test_a_dead_letter_of_a_task_is_followed_by_its_failed_event_naming_it() -> None:
    fake = FakePublisher(refusals=1)  # refused whole, written cut: the event names the cut one
    outputs = Outputs(fake, "results", "dlq")  # type: ignore[arg-type]
    named: list[tuple[str, tuple[int, int]]] = []

    def announce(topic: str, placed: tuple[int, int]) -> bytes:
        named.append((topic, placed))
        return b'{"outcome":"failed"}'

    placed = asyncio.run(outputs.dead_letter(rec(b"v"), reason="permanent", error="e", attempts=2, task_id="t-1",
                                             announce=announce))
    assert placed == (3, 42) and named == [("dlq", (3, 42))]
    assert [(topic, key, value) for topic, key, value, _ in fake.sent[1:]] == [
        ("dlq", b"k", b"v"), ("results", b"t-1", b'{"outcome":"failed"}')]
    fake.sent.clear()
    asyncio.run(outputs.dead_letter(rec(b"v"), reason="poison", error="e", attempts=0, task_id=None, announce=announce))
    assert [topic for topic, *_ in fake.sent] == ["dlq"]  # no task id: no results event


def test_dead_letter_fits_the_dlq_topic_limit() -> None:
    fake = FakePublisher()
    outputs = Outputs(fake, "results", "dlq")  # type: ignore[arg-type]
    outputs.set_dlq_limit(20_000)
    value = b"z" * 100_000
    asyncio.run(outputs.dead_letter(rec(value), reason="too_large", error="big", attempts=0, task_id=None))
    [(topic, key, cut, headers)] = fake.sent
    assert topic == "dlq" and framed(key, cut, headers) <= outputs.dlq_budget < 20_000
    assert hmap(headers)["dlq.value.sha256"] == hashlib.sha256(value).hexdigest().encode()


def test_dead_letter_refused_anyway_is_sent_once_more_small_then_gives_up() -> None:
    fake = FakePublisher(refusals=1)
    outputs = Outputs(fake, "results", "dlq")  # type: ignore[arg-type]
    value = b"z" * 100_000
    record = rec(value, headers=[("orig", b"o" * 10)])
    asyncio.run(outputs.dead_letter(record, reason="too_large", error="big", attempts=0, task_id=None))
    assert len(fake.sent) == 2
    first, (_, key, cut, headers) = fake.sent
    assert first[2] == value  # under the producer's limit: sent whole the first time
    h = hmap(headers)
    assert cut is not None and 0 < len(cut) <= 1_024 and framed(key, cut, headers) <= 4_096
    assert h["dlq.value.truncated"] == b"true" and h["dlq.value.size"] == b"100000"
    assert h["dlq.value.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert "orig" not in h and h["dlq.headers.dropped"] == b"1" and h["dlq.reason"] == b"too_large"

    fake = FakePublisher(refusals=5)
    outputs = Outputs(fake, "results", "dlq")  # type: ignore[arg-type]
    with pytest.raises(RecordRejected):
        asyncio.run(outputs.dead_letter(record, reason="too_large", error="big", attempts=0, task_id=None))
    assert len(fake.sent) == 2  # never loops
