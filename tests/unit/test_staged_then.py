"""A staged outcome's ``then``: the record that names where the outcome was written (a task's
``failed`` event naming its dead letter), produced in the same transaction once the broker placed
the outcome; kept when the outcome falls back."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError

from consumers.transactions import Staged, TransactionalProducer


class Msg:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class FakeProducer:
    """Places each record at the next offset of partition 5 when flushed; ``refuse`` topics are refused."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.pending: list[tuple[str, Any]] = []
        self.written: list[tuple[str, bytes | None, bytes | None, int]] = []
        self.calls: list[str] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None,
                on_delivery: Any = None) -> None:
        self.pending.append((topic, (key, value, on_delivery)))

    def flush(self, timeout: float = 0) -> int:
        for topic, (key, value, on_delivery) in self.pending:
            if topic in self.refuse:
                if on_delivery is not None:
                    on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
                continue
            offset = 100 + len(self.written)
            self.written.append((topic, key, value, offset))
            if on_delivery is not None:
                on_delivery(None, Msg(5, offset))
        self.pending.clear()
        return 0

    def send_offsets_to_transaction(self, *args: Any) -> None:
        self.calls.append("offsets")

    def commit_transaction(self, timeout: float = 0) -> None:
        self.flush()
        self.calls.append("commit")


def producer(fake: FakeProducer) -> TransactionalProducer:
    tp = TransactionalProducer({"transactional.id": "t", "bootstrap.servers": "127.0.0.1:1"})
    tp._producer = fake  # type: ignore[assignment]  # noqa: SLF001 - the producer under test
    return tp


def naming(topic: str) -> Any:
    def then(placed: tuple[int, int]) -> Staged:
        return Staged(topic, b"task-1", f"{placed[0]}@{placed[1]}".encode(), [])
    return then


def test_then_follows_its_outcome_in_the_same_transaction_naming_where_it_was_written() -> None:
    fake = FakeProducer()
    items = [Staged("results", b"a", b"r", []), Staged("dlq", b"k", b"letter", [], then=naming("results"))]
    producer(fake).commit(items, [], None)
    assert [(t, k, v) for t, k, v, _ in fake.written] == [
        ("results", b"a", b"r"), ("dlq", b"k", b"letter"), ("results", b"task-1", b"5@101")]
    assert fake.calls == ["begin", "commit"]


def test_a_refused_outcome_names_its_fallback_in_the_transaction_tried_again() -> None:
    fake = FakeProducer(refuse=frozenset({"dlq"}))
    cut = Staged("dlq-small", b"k", b"cut", [])
    item = Staged("dlq", b"k", b"letter", [], fallback=lambda _why: cut, then=naming("results"))
    producer(fake).commit([item], [], None)
    assert [t for t, *_ in fake.written] == []  # refused: nothing named
    assert (item.topic, item.value, item.then is not None) == ("dlq-small", b"cut", True)
    fake.refuse = frozenset()
    producer(fake).commit([item], [], None)
    assert [(t, v) for t, _k, v, _o in fake.written] == [("dlq-small", b"cut"), ("results", b"5@100")]
