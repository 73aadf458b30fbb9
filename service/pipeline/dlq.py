"""Dead-letter tooling: read the dead-letter topic and redrive chosen records.

Reads never join or commit for the service's consumer group: each call uses its own throwaway
``group.id``, ``assign()``s partitions at explicit offsets and never commits. A partition is read
until the broker reports its end (``enable.partition.eof``) or the call's time runs out.

A replay sends the original key, value and headers (every ``dlq.*`` header dropped) back to the
input topic with ``dlq.replayed_from = <dlq topic>:<partition>:<offset>``. A task that succeeded
in the meantime is skipped; a task the ledger marked ``dead`` is revived first so it can run again.

Copies of one dead letter (a worker that died after the broker acknowledged it and before the ledger
noted it) carry the same ``dlq.id``: a listing shows the first of them (``copies`` counts them), and
a replay by reason sends one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import BaseModel, Field

from consumers.producers import DLQ_HEADER_PREFIX, Headers
from consumers.records import Record
from consumers.watermarks import watermarks
from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger
from service.core.settings import KafkaSettings

log = logging.getLogger(__name__)
# librdkafka's own log lines go through logging (not straight to stderr) under this name
KAFKA_LOGGER = "librdkafka"

MAX_VALUE_CHARS = 64 * 1024
REPLAYED_FROM = "dlq.replayed_from"
Coordinates = tuple[int, int]
Decision = Literal["replayed", "already_succeeded", "not_found", "failed"]


class DeadLetter(BaseModel):
    """One record of the dead-letter topic, as operators see it."""

    partition: int
    offset: int
    timestamp_ms: int | None = None
    key: str | None = None
    value: str | None = None
    value_truncated: bool = False
    value_bytes: int = 0
    headers: dict[str, str] = Field(default_factory=dict, description="every header except dlq.*")
    reason: str | None = None
    error: str | None = None
    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    attempts: int | None = None
    task_id: str | None = None
    failed_at: str | None = None
    id: str | None = Field(None, description="dlq.id: the same for every copy of one dead letter")
    copies: int = Field(1, description="records read with this dlq.id (copies left by a crash)")

    @classmethod
    def from_record(cls, record: Record) -> DeadLetter:
        dlq: dict[str, str] = {}
        headers: dict[str, str] = {}
        for name, raw in record.headers:
            text = _text(raw) or ""
            if name.startswith(DLQ_HEADER_PREFIX):
                dlq[name.removeprefix(DLQ_HEADER_PREFIX)] = text
            else:
                headers[name] = text
        value = record.value
        return cls(
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
            key=_text(record.key),
            value=_text(value[:MAX_VALUE_CHARS]) if value is not None else None,
            value_truncated=value is not None and len(value) > MAX_VALUE_CHARS,
            value_bytes=len(value) if value is not None else 0,
            headers=headers,
            reason=dlq.get("reason") or None,
            error=dlq.get("error") or None,
            original_topic=dlq.get("original.topic") or None,
            original_partition=_int(dlq.get("original.partition")),
            original_offset=_int(dlq.get("original.offset")),
            attempts=_int(dlq.get("attempts")),
            task_id=dlq.get("task_id") or None,
            failed_at=dlq.get("failed_at") or None,
            id=dlq.get("id") or None,
        )


class ReplayItem(BaseModel):
    partition: int
    offset: int
    decision: Decision
    task_id: str | None = None
    reason: str | None = None
    revived: bool = False
    detail: str | None = None


class ReplayReport(BaseModel):
    replayed: int = 0
    already_succeeded: int = 0
    not_found: int = 0
    failed: int = 0
    items: list[ReplayItem] = Field(default_factory=list)


def _text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------- reading


class _Reader:
    """A consumer outside every group: assign, read, never commit."""

    def __init__(self, kafka: KafkaSettings, *, reset: str = "earliest") -> None:
        self.topic = kafka.dlq_topic
        self._consumer = Consumer({
            **kafka.common_config("consumer"),
            "group.id": f"agent-dlq-peek-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": reset,
            "fetch.wait.max.ms": 100,
            "logger": logging.getLogger(KAFKA_LOGGER),
        })

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._consumer.close()

    def partitions(self, timeout_s: float) -> list[int]:
        """The topic's partitions; none when the topic does not exist (yet)."""
        metadata = self._consumer.list_topics(self.topic, timeout=timeout_s)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            return []
        return sorted(topic.partitions)

    def watermarks(self, partition: int, timeout_s: float) -> tuple[int, int]:
        """The partition's low and high offsets (through a leader election: :mod:`consumers.watermarks`)."""
        return watermarks(self._consumer, TopicPartition(self.topic, partition), timeout_s)

    def read(self, partition: int, start: int, deadline: float, stop_at: int | None = None) -> Iterator[Message]:
        """Records of one partition from ``start`` on, until its end, ``stop_at`` or the deadline."""
        self._consumer.assign([TopicPartition(self.topic, partition, start)])
        while (left := deadline - time.monotonic()) > 0:
            for msg in self._consumer.consume(500, min(left, 0.05)):
                if msg.partition() != partition:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._AUTO_OFFSET_RESET:  # asked for an offset it does not have
                        log.debug("dead-letter read of partition %d: %s", partition, err.str())
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("dead-letter read of partition %d stopped: %s", partition, err.str())
                    return
                yield msg
                offset = msg.offset()
                if stop_at is not None and offset is not None and offset >= stop_at:
                    return
        log.warning("dead-letter read of partition %d timed out", partition)


def peek(
    kafka: KafkaSettings,
    limit: int = 50,
    partition: int | None = None,
    offset_from: int | None = None,
    *,
    timeout_s: float = 10.0,
) -> list[DeadLetter]:
    """The newest ``limit`` dead letters (or, with ``offset_from``, the first ``limit`` from there).

    ``timeout_s`` bounds the whole peek (metadata, watermarks and reads, over every partition),
    not each call: partitions not reached in time are left out. Blocking: call it from a thread.
    """
    if limit < 1:
        return []
    deadline = time.monotonic() + timeout_s
    picked: list[Record] = []
    with _Reader(kafka) as reader:
        for p in reader.partitions(timeout_s):
            if partition is not None and p != partition:
                continue
            if (left := deadline - time.monotonic()) <= 0:
                log.warning("dead-letter peek ran out of time before partition %d", p)
                break
            low, high = reader.watermarks(p, left)
            start = max(low, high - limit) if offset_from is None else max(low, offset_from)
            if start >= high:
                continue
            kept: deque[Record] = deque(maxlen=limit if offset_from is None else None)
            for msg in reader.read(p, start, deadline):
                kept.append(Record.from_message(msg))
                if offset_from is not None and len(kept) >= limit:
                    break
            picked.extend(kept)
    letters = _once(sorted((DeadLetter.from_record(r) for r in picked), key=lambda d: (d.partition, d.offset)))
    if offset_from is None:
        letters.sort(key=lambda d: (d.timestamp_ms or 0, d.partition, d.offset))
        letters = letters[-limit:]
    else:
        letters = letters[:limit]
    return sorted(letters, key=lambda d: (d.partition, d.offset))


def _once(letters: list[DeadLetter]) -> list[DeadLetter]:
    """The first of each ``dlq.id`` (in the order given), counting its copies; letters without one
    (written before the header existed) all stay."""
    first: dict[str, DeadLetter] = {}
    out: list[DeadLetter] = []
    for letter in letters:
        if letter.id is None:
            out.append(letter)
        elif letter.id in first:
            first[letter.id].copies += 1
        else:
            first[letter.id] = letter
            out.append(letter)
    return out


def _fetch_exact(
    kafka: KafkaSettings, selection: Iterable[Coordinates], timeout_s: float, item_timeout_s: float = 3.0
) -> tuple[list[Record], list[tuple[Coordinates, str]]]:
    """The records at exactly these coordinates, and why the others were not found.

    Watermarks only rule out offsets below the low one: some brokers under-report the high
    watermark, and some never answer a fetch past the end, so each lookup has its own time limit.
    """
    found: list[Record] = []
    missing: list[tuple[Coordinates, str]] = []
    deadline = time.monotonic() + timeout_s
    with _Reader(kafka, reset="error") as reader:
        partitions = set(reader.partitions(timeout_s))
        lows: dict[int, int] = {}
        for p, o in sorted(set(selection)):
            if p not in partitions:
                missing.append(((p, o), f"{kafka.dlq_topic} has no partition {p}"))
                continue
            if p not in lows:
                lows[p] = reader.watermarks(p, timeout_s)[0]
            if o < lows[p]:
                missing.append(((p, o), f"offset {o} is below the first one kept ({lows[p]})"))
                continue
            now = time.monotonic()
            if now >= deadline:
                missing.append(((p, o), "not looked up: the replay ran out of time"))
                continue
            msg = next(reader.read(p, o, min(deadline, now + item_timeout_s), stop_at=o), None)
            if msg is not None and msg.offset() == o:
                found.append(Record.from_message(msg))
            else:
                missing.append(((p, o), "no record at this offset"))
    return found, missing


def _fetch_matching(
    kafka: KafkaSettings, accept: Callable[[Record], bool], limit: int, timeout_s: float
) -> list[Record]:
    found: list[Record] = []
    seen: set[str] = set()  # dlq.id of those found: a copy is not sent twice
    deadline = time.monotonic() + timeout_s
    with _Reader(kafka) as reader:
        for p in reader.partitions(timeout_s):
            low, high = reader.watermarks(p, timeout_s)
            if low >= high:
                continue
            for msg in reader.read(p, low, deadline):
                record = Record.from_message(msg)
                if accept(record):
                    letter_id = _header(record, "dlq.id")
                    if letter_id is not None:
                        if letter_id in seen:
                            continue
                        seen.add(letter_id)
                    found.append(record)
                    if len(found) >= limit:
                        return found
    return found


def _reason(record: Record) -> str | None:
    return _header(record, "dlq.reason")


def _header(record: Record, wanted: str) -> str | None:
    for name, raw in record.headers:
        if name == wanted:
            return _text(raw)
    return None


# ---------------------------------------------------------------------------- replay


def replay_headers(record: Record, dlq_topic: str) -> Headers:
    """The original headers without any ``dlq.*`` one, plus where the replay came from."""
    kept: Headers = [(k, v) for k, v in record.headers if not k.startswith(DLQ_HEADER_PREFIX)]
    return [*kept, (REPLAYED_FROM, f"{dlq_topic}:{record.partition}:{record.offset}".encode())]


def _produce(kafka: KafkaSettings, records: list[Record], timeout_s: float) -> list[str | None]:
    """Send each record to the input topic; one error (or None) per record, in order."""
    if not records:
        return []
    conf: dict[str, Any] = {
        **kafka.producer_config(),
        "message.timeout.ms": max(1000, int(timeout_s * 1000)),
        "logger": logging.getLogger(KAFKA_LOGGER),
    }
    producer = Producer(conf)
    errors: list[str | None] = ["not acknowledged"] * len(records)

    def on_delivery(index: int) -> Callable[[KafkaError | None, Any], None]:
        def done(err: KafkaError | None, _msg: Any) -> None:
            errors[index] = err.str() if err is not None else None
        return done

    for i, record in enumerate(records):
        headers: list[tuple[str, str | bytes | None]] = [*replay_headers(record, kafka.dlq_topic)]
        while True:
            try:
                producer.produce(
                    kafka.input_topic, key=record.key, value=record.value, headers=headers,
                    on_delivery=on_delivery(i),
                )
                break
            except BufferError:
                producer.poll(0.05)
            except KafkaException as exc:
                errors[i] = str(exc)
                break
        producer.poll(0)
    remaining = producer.flush(timeout_s + 5)
    if remaining:
        log.warning("replay: %d records not acknowledged", remaining)
    return errors


async def replay(
    kafka: KafkaSettings,
    ledger: Ledger,
    selection: list[Coordinates] | None,
    reasons: set[str] | None,
    limit: int = 100,
    *,
    timeout_s: float = 30.0,
) -> ReplayReport:
    """Redrive dead letters: every one at ``selection``, or else the first ``limit`` whose reason is
    one of ``reasons`` (any reason when ``reasons`` is None).
    """
    report = ReplayReport()
    if selection is not None:
        found, missing = await asyncio.to_thread(_fetch_exact, kafka, selection, timeout_s)
        for (p, o), why in missing:
            report.items.append(ReplayItem(partition=p, offset=o, decision="not_found", detail=why))
            report.not_found += 1
    else:
        def accept(record: Record) -> bool:
            return reasons is None or _reason(record) in reasons
        found = await asyncio.to_thread(_fetch_matching, kafka, accept, limit, timeout_s)

    to_send: list[tuple[Record, ReplayItem]] = []
    for record in found:
        letter = DeadLetter.from_record(record)
        item = ReplayItem(
            partition=record.partition, offset=record.offset, decision="replayed",
            task_id=letter.task_id, reason=letter.reason,
        )
        if letter.task_id is not None and is_valid_task_key(letter.task_id):
            stored = await ledger.get(letter.task_id)
            if stored is not None and stored.state == "succeeded":
                item.decision = "already_succeeded"
                report.already_succeeded += 1
                report.items.append(item)
                continue
            if stored is not None and stored.state == "dead":
                item.revived = await ledger.revive(letter.task_id)
        to_send.append((record, item))

    errors = await asyncio.to_thread(_produce, kafka, [r for r, _ in to_send], timeout_s)
    for (record, item), error in zip(to_send, errors, strict=True):
        if error is None:
            report.replayed += 1
            log.info("replayed %s[%d]@%d (task_id=%s) to %s", kafka.dlq_topic, record.partition,
                     record.offset, item.task_id or "-", kafka.input_topic)
        else:
            item.decision = "failed"
            item.detail = error
            report.failed += 1
        report.items.append(item)
    report.items.sort(key=lambda i: (i.partition, i.offset))
    return report
