"""The publisher replaces a producer that failed for good, and its unacknowledged records fail to be retried."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from consumers import producers
from consumers.producers import ProduceFailed, Publisher


class FakeProducer:
    """Acknowledges nothing; the first one fails for good at its first poll after a produce."""

    made: list[FakeProducer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.sent: list[Any] = []
        self.fail = not FakeProducer.made  # only the first producer breaks
        self.lock = threading.Lock()
        FakeProducer.made.append(self)

    def produce(self, topic: str, *, value: Any, key: Any, headers: Any, on_delivery: Any) -> None:
        with self.lock:
            self.sent.append(on_delivery)

    def poll(self, timeout: float) -> int:
        with self.lock:
            if self.fail and self.sent:
                self.fail = False
                raise KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence desync",
                                                fatal=True))
            if not self.fail and self is not FakeProducer.made[0]:  # the new one acknowledges
                for callback in self.sent:
                    callback(None, None)
                self.sent.clear()
        threading.Event().wait(timeout)
        return 0

    def flush(self, timeout: float) -> int:
        return 0


def test_a_fatal_producer_error_fails_the_unacknowledged_records_and_the_retry_goes_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeProducer.made = []
    monkeypatch.setattr(producers, "Producer", FakeProducer)

    async def scenario() -> None:
        publisher = Publisher({"bootstrap.servers": "unused"}, poll_interval_s=0.01)
        try:
            first = await asyncio.wait_for(asyncio.gather(*(publisher.send("t", b"k", b"v", []) for _ in range(3)),
                                                          return_exceptions=True), 5)
            assert all(isinstance(r, ProduceFailed) and "sequence desync" in str(r) for r in first), first
            assert publisher.replacements == 1 and len(FakeProducer.made) == 2
            await asyncio.wait_for(publisher.send("t", b"k", b"v", []), 5)  # the retry, on the new producer
        finally:
            publisher.close(1)

    asyncio.run(scenario())
