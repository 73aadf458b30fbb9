"""The consumer's view of a Kafka record: plain data, decoupled from confluent-kafka's Message."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

log = logging.getLogger(__name__)


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
    # what a stage before the handler learned of the record (a screen's decoded task), or None
    memo: Any = None

    @classmethod
    def from_message(cls, msg: Any) -> Record:
        """Never raises for a message with coordinates, whatever its key, value, headers or timestamp.

        A header with no value is read as ``b""``; a header name that is not text is decoded with
        replacement characters; headers that cannot be read at all are dropped (and logged).
        """
        topic = str(msg.topic())
        partition = int(msg.partition())
        offset = int(msg.offset())
        try:  # the common case: bytes or nothing, no headers
            key, value, headers = msg.key(), msg.value(), msg.headers()
        except Exception:  # noqa: BLE001 - read again below, one part at a time
            headers = True
        if not headers and (key is None or type(key) is bytes) and (value is None or type(value) is bytes):
            return cls(topic, partition, offset, key, value, [], _timestamp(msg))
        where = f"{topic}[{partition}]@{offset}"
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=_bytes_or_none(_safe(msg.key, where, "key")),
            value=_bytes_or_none(_safe(msg.value, where, "value")),
            headers=_headers(msg, where),
            timestamp_ms=_timestamp(msg),
        )

    @property
    def coordinates(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def _safe(fn: Any, where: str, what: str) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a record must never stop the consumer
        log.warning("record %s: cannot read its %s (%s); read as empty", where, what, exc)
        return None


def _bytes_or_none(v: Any) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")
    try:
        return bytes(v)
    except Exception:  # noqa: BLE001
        return None


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "replace")
    return "" if v is None else str(v)


def _headers(msg: Any, where: str) -> list[tuple[str, bytes]]:
    raw = _safe(msg.headers, where, "headers")  # confluent-kafka raises on a name that is not UTF-8
    if not raw:
        return []
    out: list[tuple[str, bytes]] = []
    try:
        for item in raw:
            try:
                name, value = item
            except (TypeError, ValueError):
                continue
            out.append((_text(name), _bytes_or_none(value) or b""))
    except Exception as exc:  # noqa: BLE001
        log.warning("record %s: cannot read its headers (%s); dropped", where, exc)
    return out


def _timestamp(msg: Any) -> int | None:
    try:
        ts_type, ts = msg.timestamp()
    except Exception:  # noqa: BLE001 - missing or odd: no timestamp
        return None
    if not ts_type or not isinstance(ts, int) or ts < 0:
        return None
    return ts
