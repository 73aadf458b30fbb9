"""Producers for results and dead letters: idempotent, acks=all, awaited until acknowledged.

One confluent-kafka producer per process; a daemon thread serves its delivery callbacks and hands
the acknowledgements to the asyncio loop, all those one ``poll`` served in one wake-up of the loop. ``send`` returns only when the broker acknowledged the
record, or raises :class:`ProduceFailed`; callers commit offsets only after it returns.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from consumers.records import Record

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
DLQ_HEADER_PREFIX = "dlq."


class ProduceFailed(Exception):
    """The broker did not acknowledge a record."""


class Publisher:
    def __init__(self, config: dict[str, Any], *, poll_interval_s: float = 0.05) -> None:
        self._producer = Producer(config)
        self._closed = threading.Event()
        self._poll_interval_s = poll_interval_s
        # (future, error) of acknowledged records, appended by delivery callbacks on any thread
        self._acks: deque[tuple[asyncio.Future[None], KafkaError | None]] = deque()
        self._thread = threading.Thread(target=self._serve, name="producer-poll", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(self._poll_interval_s)
            self._hand_over()
        self._hand_over()

    def _hand_over(self) -> None:
        """Settle the acknowledged records' futures: one loop wake-up per loop, not per record."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], KafkaError | None]]] = {}
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
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acks = self._acks

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            acks.append((future, err))

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
                break
            except BufferError:  # local queue full: let deliveries drain
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                raise ProduceFailed(f"produce to {topic} refused: {exc}") from exc
        await future

    def flush(self, timeout_s: float = 10.0) -> int:
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 10.0) -> None:
        remaining = self.flush(timeout_s)
        if remaining:
            log.warning("producer closed with %d undelivered records", remaining)
        self._closed.set()
        self._thread.join(timeout=2)


def _settle_all(batch: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, err in batch:
        if future.done():
            continue
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(ProduceFailed(f"delivery failed: {err.str()}"))


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
    ]


class Outputs:
    """Where the pipeline writes outcomes: the results topic and the dead-letter topic."""

    def __init__(self, publisher: Publisher, results_topic: str, dlq_topic: str) -> None:
        self.publisher = publisher
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic

    async def result(
        self, task_key: str, event: bytes, traceparent: str | None, deadline: str | None = None
    ) -> None:
        """``deadline`` passes the task's time budget on to whoever consumes the result."""
        headers: Headers = [("traceparent", traceparent.encode())] if traceparent else []
        if deadline:
            headers.append(("deadline", deadline.encode()))
        await self.publisher.send(self.results_topic, task_key.encode(), event, headers)

    async def dead_letter(
        self, record: Record, *, reason: str, error: str, attempts: int, task_id: str | None,
        traceparent: str | None = None,
    ) -> None:
        headers = dead_letter_headers(record, reason=reason, error=error, attempts=attempts, task_id=task_id,
                                      traceparent=traceparent)
        await self.publisher.send(self.dlq_topic, record.key, record.value, headers)
