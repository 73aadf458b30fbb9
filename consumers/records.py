"""The consumer's view of a Kafka record: plain data, decoupled from confluent-kafka's Message."""

from __future__ import annotations

from dataclasses import dataclass, field
from time import monotonic
from typing import Any


@dataclass(slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int | None = None
    received_at: float = field(default_factory=monotonic)

    @classmethod
    def from_message(cls, msg: Any) -> Record:
        ts_type, ts = msg.timestamp()
        return cls(
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            key=msg.key(),
            value=msg.value(),
            headers=[(k, v) for k, v in (msg.headers() or [])],
            timestamp_ms=ts if ts_type else None,
        )

    @property
    def coordinates(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"
