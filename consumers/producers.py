"""Producers for results and dead letters: idempotent, acks=all, awaited until acknowledged.

One confluent-kafka producer per process; a daemon thread serves its delivery callbacks and hands
the acknowledgements to the asyncio loop, all those one ``poll`` served in one wake-up of the loop. ``send`` returns only when the broker acknowledged the
record, or raises :class:`ProduceFailed` (the broker is unreachable or failing: try again later) or
:class:`RecordRejected` (this record can never be written: too large or invalid); callers commit
offsets only after it returns. A dead letter is cut to fit the size limits, so it always writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from consumers.encoding import Encoding
from consumers.records import Record

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
Placed = tuple[int, int]  # where the broker wrote a record: (partition, offset)
# a task's ``failed`` event for the results topic, given where its dead letter was written (topic, placed)
Announce = Callable[[str, Placed], bytes]
# a delivery report handed to the loop: the record's future, the broker's error, where it was written
Ack = tuple["asyncio.Future[Placed]", KafkaError | None, Placed | None]
DLQ_HEADER_PREFIX = "dlq."


# librdkafka's defaults for the limits a record must fit in
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
DEFAULT_QUEUE_MAX_KBYTES = 1_048_576
DEFAULT_BATCH_BYTES = 1_000_000  # batch.size
# what a record costs beyond key, value and header bytes: the batch header (61 bytes), the record's
# varints and attributes, and per header two length varints; generous on purpose
RECORD_OVERHEAD_BYTES = 512
HEADER_OVERHEAD_BYTES = 16
# the second, last attempt at a dead letter the broker still refused fits in this many bytes
# (the dlq.* headers take up to about 2 KiB, the key at most a quarter) with at most 1 KiB of value
DLQ_FALLBACK_BUDGET = 4096
DLQ_FALLBACK_VALUE_BYTES = 1024


class ProduceFailed(Exception):
    """The broker did not acknowledge a record: unreachable, timed out or failing. Transient:
    the same record may be sent again later (callers retry it, without committing its offset).
    ``code``: librdkafka's error code, when it said one (a caller that names the topic, as a
    delegation to another deployment's, tells a topic that does not exist from an outage by it)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


# the codes of a topic that cannot be written: it does not exist, or this client may not write it
MISSING_TOPIC_CODES = frozenset({
    KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED,
})


class RecordRejected(Exception):
    """The producer or the broker refused *this* record for good (too large, invalid record).

    Sending it again cannot succeed. Deliberately not a :class:`ProduceFailed`: that one is retried
    for ever, this one must be handled (dead-lettered, or cut down and sent again).
    """


# Errors that condemn the record, not the connection: raised by produce() or reported on delivery.
REJECTED_CODES = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,  # local (message.max.bytes) or the broker's (max.message.bytes)
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
    KafkaError.INVALID_MSG_SIZE,
    KafkaError._INVALID_ARG,
    KafkaError._BAD_MSG,
})


def _rejected(err: KafkaError | None) -> bool:
    return err is not None and err.code() in REJECTED_CODES and not err.fatal()


def headers_size(headers: Headers) -> int:
    return sum(len(k.encode()) + (len(v) if v is not None else 0) for k, v in headers)


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """Key, value and header bytes, without the record's framing."""
    return len(key or b"") + len(value or b"") + headers_size(headers)


class Publisher:
    """One idempotent producer, replaced by a new one when librdkafka reports a fatal error (for
    example a sequence desynchronization after a broker lost its producer state): the records it
    had not acknowledged fail with :class:`ProduceFailed`, so their callers retry them on the new one.
    """

    def __init__(self, config: dict[str, Any], *, poll_interval_s: float = 0.05) -> None:
        self._config = dict(config)
        self._producer = Producer(config)
        self._swap = threading.Lock()
        self._outstanding: set[asyncio.Future[Placed]] = set()  # sent, not yet acknowledged
        self.replacements = 0
        # the largest record the producer accepts (librdkafka refuses larger ones in produce())
        self.max_message_bytes = int(config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))
        # a record larger than the whole local queue would wait on BufferError for ever
        self.queue_max_bytes = int(config.get("queue.buffering.max.kbytes", DEFAULT_QUEUE_MAX_KBYTES)) * 1024
        self._closed = threading.Event()
        self._poll_interval_s = poll_interval_s
        # (future, error) of acknowledged records, appended by delivery callbacks on any thread
        self._acks: deque[Ack] = deque()
        self._thread = threading.Thread(target=self._serve, name="producer-poll", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            producer = self._producer
            try:
                producer.poll(self._poll_interval_s)
            except KafkaException as exc:  # a fatal error surfaces here: the producer is unusable
                self._replace_if_fatal(exc, producer)
            self._hand_over()
        self._hand_over()

    def _replace_if_fatal(self, exc: KafkaException, failed: Producer) -> None:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if err is None or not err.fatal():
            log.warning("producer: %s", exc)
            return
        with self._swap:
            if self._producer is not failed:
                return  # replaced already
            self._producer = Producer(self._config)
            lost, self._outstanding = self._outstanding, set()
            self.replacements += 1
        log.error("producer failed for good (%s): replaced by a new one; %d unacknowledged records are retried",
                  err.str(), len(lost))
        self._acks.extend((future, err, None) for future in lost)

    def _hand_over(self) -> None:
        """Settle the acknowledged records' futures: one loop wake-up per loop, not per record."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Ack]] = {}
        acks = self._acks
        while acks:
            ack = acks.popleft()
            by_loop.setdefault(ack[0].get_loop(), []).append(ack)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, batch)
            except RuntimeError:  # that loop is closed: nobody waits for these any more
                log.debug("dropped %d acknowledgements for a closed event loop", len(batch))

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        await self.send_at(topic, key, value, headers)

    async def send_at(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> Placed:
        """Send one record; once the broker acknowledged it, where it was written: (partition, offset)."""
        future: asyncio.Future[Placed] = asyncio.get_running_loop().create_future()
        acks = self._acks

        def delivered(err: KafkaError | None, msg: Any) -> None:
            outstanding.discard(future)
            acks.append((future, err, _placed(msg) if err is None else None))

        size = record_size(key, value, headers)
        if size > self.queue_max_bytes:
            raise RecordRejected(f"record of {size} bytes for {topic} exceeds the producer queue "
                                 f"({self.queue_max_bytes} bytes)")
        while True:
            try:
                with self._swap:
                    outstanding, producer = self._outstanding, self._producer
                    outstanding.add(future)
                    producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
                break
            except BufferError:  # local queue full: let deliveries drain (the record fits once it is empty)
                outstanding.discard(future)
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                outstanding.discard(future)
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if _rejected(err):
                    raise RecordRejected(f"produce to {topic} refused record of {size} bytes: {exc}") from exc
                self._replace_if_fatal(exc, producer)
                raise ProduceFailed(f"produce to {topic} refused: {exc}", err.code() if err else None) from exc
        return await future

    def flush(self, timeout_s: float = 10.0) -> int:
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 10.0) -> None:
        remaining = self.flush(timeout_s)
        if remaining:
            log.warning("producer closed with %d undelivered records", remaining)
        self._closed.set()
        self._thread.join(timeout=2)


def _placed(msg: Any) -> Placed:
    """The (partition, offset) a delivered message was written at ((-1, -1) when not reported)."""
    try:
        partition, offset = msg.partition(), msg.offset()
    except AttributeError:
        return (-1, -1)
    return (int(partition) if partition is not None else -1, int(offset) if offset is not None else -1)


def _settle_all(batch: list[Ack]) -> None:
    for future, err, placed in batch:
        if future.done():
            continue
        if err is None:
            future.set_result(placed or (-1, -1))
        elif _rejected(err):
            future.set_exception(RecordRejected(f"record refused: {err.str()}"))
        else:
            future.set_exception(ProduceFailed(f"delivery failed: {err.str()}", err.code()))


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter_headers(
    record: Record, *, reason: str, error: str, attempts: int, task_id: str | None,
    traceparent: str | None = None,
) -> Headers:
    """The original headers (earlier ``dlq.*`` ones dropped) plus the contract's ``dlq.*`` headers.

    With ``traceparent`` the dead letter joins the task's trace (the original one is replaced).
    """
    kept: Headers = [(k, v) for k, v in record.headers
                     if not k.startswith(DLQ_HEADER_PREFIX) and not (traceparent and k == "traceparent")]
    if traceparent:
        kept.append(("traceparent", traceparent.encode()))
    return kept + [
        ("dlq.reason", reason.encode()),
        ("dlq.error", error[:1000].encode("utf-8", "replace")),
        ("dlq.original.topic", record.topic.encode()),
        ("dlq.original.partition", str(record.partition).encode()),
        ("dlq.original.offset", str(record.offset).encode()),
        ("dlq.attempts", str(attempts).encode()),
        ("dlq.task_id", (task_id or "").encode()),
        ("dlq.failed_at", _now_iso().encode()),
        ("dlq.id", dead_letter_id(record, reason).encode()),
    ]


def dead_letter_id(record: Record, reason: str) -> str:
    """The same for every copy of one record's dead letter for one reason (a crash can leave copies):
    its original coordinates and the reason, digested. A reader keeps one record per ``dlq.id``."""
    text = f"{record.topic}\x00{record.partition}\x00{record.offset}\x00{reason}"
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]


def _is_ours(header: tuple[str, str | bytes | None]) -> bool:
    """The headers a dead letter always keeps: ``dlq.*`` and a (sane) ``traceparent``."""
    name, value = header
    return name.startswith(DLQ_HEADER_PREFIX) or (name == "traceparent" and len(value or b"") <= 512)


def fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: Headers, budget: int, *, max_value: int | None = None,
) -> tuple[bytes | None, bytes | None, Headers]:
    """Key, value and headers cut to ``budget`` bytes (framing excluded), noting every cut in ``dlq.*``.

    ``headers`` are :func:`dead_letter_headers`' output. Within the budget nothing changes.
    Otherwise: original headers that alone take more than a quarter of the budget are thinned
    (the ``dlq.*`` ones and ``traceparent`` always stay; ``dlq.headers.dropped`` counts the rest),
    a key over a quarter of the budget is cut (``dlq.key.truncated``, ``dlq.key.size``), and the
    value gets what is left (``dlq.value.truncated``, ``dlq.value.size``, ``dlq.value.sha256`` of
    the original value). ``max_value`` caps the value further.
    """
    def cost(hs: Headers) -> int:
        return headers_size(hs) + HEADER_OVERHEAD_BYTES * len(hs)

    fits = record_size(key, value, headers) + HEADER_OVERHEAD_BYTES * len(headers) <= budget
    if fits and (max_value is None or len(value or b"") <= max_value):
        return key, value, headers
    ours = [h for h in headers if _is_ours(h)]
    original = [h for h in headers if not _is_ours(h)]
    notes: Headers = []
    quarter = max(budget // 4, 0)
    if cost(original) > quarter:
        kept: Headers = []
        room = quarter
        for h in original:
            if cost([h]) <= room:
                kept.append(h)
                room -= cost([h])
        if len(kept) < len(original):
            notes.append(("dlq.headers.dropped", str(len(original) - len(kept)).encode()))
        original = kept
    if key is not None and len(key) > quarter:
        notes += [("dlq.key.truncated", b"true"), ("dlq.key.size", str(len(key)).encode())]
        key = key[:quarter]
    if value is not None:
        # reserve the value notes (a sha256 is 64 hex digits, a size at most 20)
        value_notes: Headers = [("dlq.value.truncated", b"true"), ("dlq.value.size", b"0" * 20),
                                ("dlq.value.sha256", b"0" * 64)]
        room = budget - len(key or b"") - cost(original + ours + notes + value_notes)
        if max_value is not None:
            room = min(room, max_value)
        if len(value) > room:
            notes += [("dlq.value.truncated", b"true"), ("dlq.value.size", str(len(value)).encode()),
                      ("dlq.value.sha256", hashlib.sha256(value).hexdigest().encode())]
            value = value[:max(room, 0)]
    return key, value, original + ours + notes


def topic_max_message_bytes(admin: Any, topic: str, timeout_s: float = 5.0) -> int | None:
    """A topic's ``max.message.bytes`` via ``admin`` (an AdminClient); None when it cannot be learnt."""
    from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

    try:
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)], request_timeout=timeout_s)
        for future in futures.values():
            entry = future.result(timeout_s).get("max.message.bytes")
            if entry is not None and entry.value is not None:
                return int(entry.value)
    except Exception as exc:  # noqa: BLE001 - unknown is an answer: the producer's limit then rules
        log.warning("max.message.bytes of topic %s unknown: %s", topic, exc)
    return None


KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


def broker_message_max_bytes(admin: Any, metadata: Any, timeout_s: float) -> int:
    """The broker's ``message.max.bytes`` (a new topic's default limit); Kafka's default if unknown."""
    from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

    try:
        broker_id = next(iter(metadata.brokers))
        futures = admin.describe_configs([ConfigResource(ResourceType.BROKER, str(broker_id))],
                                         request_timeout=timeout_s)
        for future in futures.values():
            entry = future.result(timeout_s).get("message.max.bytes")
            if entry is not None and entry.value is not None:
                return int(entry.value)
    except Exception as exc:  # noqa: BLE001 - the default is a fine answer
        log.debug("broker message.max.bytes unknown: %s", exc)
    return KAFKA_DEFAULT_MAX_MESSAGE_BYTES


class Outputs(Encoding):
    """Where the pipeline writes outcomes: the results topic (through its :class:`Encoding`) and
    the dead-letter topic."""

    def __init__(self, publisher: Publisher, results_topic: str, dlq_topic: str) -> None:
        self.publisher = publisher
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.dlq_limit: int | None = None  # the DLQ topic's max.message.bytes, when known
        # (record, task key, error) -> the ``failed`` event of a task whose result the broker refused for good
        self.announce_refused: Callable[[Record, str, str], Announce | None] | None = None

    def set_dlq_limit(self, nbytes: int | None) -> None:
        """The dead-letter topic's ``max.message.bytes`` (None: unknown, the producer's limit rules)."""
        self.dlq_limit = nbytes if nbytes and nbytes > 0 else None

    @property
    def dlq_budget(self) -> int:
        """Bytes of key, value and headers a dead letter may take: the smaller limit, less framing."""
        limits = [self.publisher.max_message_bytes, self.publisher.queue_max_bytes]
        if self.dlq_limit:
            limits.append(self.dlq_limit)
        return max(min(limits) - RECORD_OVERHEAD_BYTES, 0)

    # outcomes are sent on their own (True: staged for the transaction that commits their offsets)
    transactional = False

    async def result(
        self, record: Record, task_key: str, event: bytes, traceparent: str | None, deadline: str | None = None,
    ) -> None:
        """``deadline`` passes the task's time budget on to whoever consumes the result; ``record``
        is the record that produced it.

        Raises :class:`RecordRejected` when the broker refuses this result for good (the caller
        dead-letters the task) and :class:`ProduceFailed` when it cannot be reached.
        """
        await self.ready_to_encode()
        await self.publisher.send(self.results_topic, task_key.encode(), self.encoded(event),
                                  result_headers(traceparent, deadline))

    def announcing(self, record: Record, task_key: str, error: str) -> Announce | None:
        """The ``failed`` event of a task whose result the broker refused (set by the pipeline)."""
        return self.announce_refused(record, task_key, error) if self.announce_refused is not None else None

    async def dead_letter(
        self, record: Record, *, reason: str, error: str, attempts: int, task_id: str | None,
        traceparent: str | None = None, announce: Announce | None = None,
    ) -> Placed | None:
        """Always fits: cut to the size limits (see :func:`fit_dead_letter`). Should the broker still
        refuse it, it is sent once more cut to 4 KiB (1 KiB of the value at most) with only the ``dlq.*``
        headers and ``traceparent``; a second refusal raises :class:`RecordRejected`. Raises
        :class:`ProduceFailed` when the broker cannot be reached.

        Returns where the dead letter was written (partition, offset). With ``announce`` and a
        ``task_id``, the task's ``failed`` event (``announce`` given the dead letter's topic and
        place) follows it on the results topic, keyed by the task id."""
        headers = dead_letter_headers(record, reason=reason, error=error, attempts=attempts, task_id=task_id,
                                      traceparent=traceparent)
        if announce is not None and task_id is not None:
            await self.ready_to_encode()  # before the dead letter: none is written without its event
        try:
            placed = await self.publisher.send_at(self.dlq_topic, *self._fitted(record, headers))
        except RecordRejected as exc:
            log.warning("dead letter for %s refused (%s): sending it cut to %d bytes",
                        record.coordinates, exc, self._fallback_budget)
            placed = await self.publisher.send_at(self.dlq_topic, *self._cut(record, headers))
        if announce is not None and task_id is not None:
            await self.publisher.send(self.results_topic, task_id.encode(), self.encoded(announce(self.dlq_topic, placed)),
                                      result_headers(traceparent, None))
        return placed

    def _fitted(self, record: Record, headers: Headers) -> tuple[bytes | None, bytes | None, Headers]:
        return fit_dead_letter(record.key, record.value, headers, self.dlq_budget)

    @property
    def _fallback_budget(self) -> int:
        return min(self.dlq_budget // 2, DLQ_FALLBACK_BUDGET)

    def _cut(self, record: Record, headers: Headers) -> tuple[bytes | None, bytes | None, Headers]:
        """The last resort: only the ``dlq.*`` headers and ``traceparent``, 1 KiB of the value at most."""
        ours = [h for h in headers if _is_ours(h)]
        if len(ours) < len(headers):
            ours.append(("dlq.headers.dropped", str(len(headers) - len(ours)).encode()))
        return fit_dead_letter(record.key, record.value, ours, self._fallback_budget,
                               max_value=DLQ_FALLBACK_VALUE_BYTES)


def result_headers(traceparent: str | None, deadline: str | None) -> Headers:
    headers: Headers = [("traceparent", traceparent.encode())] if traceparent else []
    if deadline:
        headers.append(("deadline", deadline.encode()))
    return headers
