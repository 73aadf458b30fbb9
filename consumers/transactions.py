"""Exactly-once output: outcomes and the offsets they complete, written in one Kafka transaction.

With transactions off, a handler sends its outcome (result or dead letter) and waits for the
broker's acknowledgement; the offset is committed later. A crash between the two sends the outcome
again after the restart: the same bytes (the ledger hands back the stored result), but twice.

With transactions on, a handler does not send. It *stages* its outcomes (:func:`stage`), tagged by
the runner with the record being handled. At every commit (the interval, a revoke, the end of a
drain) the runner takes, per partition, the offset it may commit and the outcomes staged by the
records below it, and writes both in one transaction (consume-transform-produce, KIP-98):
``send_offsets_to_transaction`` with the consumer group's metadata, then ``commit_transaction``.
A ``read_committed`` reader of the output topics sees an outcome if and only if the offset of the
record that produced it is committed, so it sees every outcome once. A crash or an aborted
transaction leaves both out; the records are read again and the ledger hands back the stored
outcome (never a new model run), which is staged again.

Zombie fencing (KIP-447): one transactional producer per worker process; the group metadata sent
with the offsets makes the group coordinator refuse a worker whose partitions have moved on (its
generation is old). The ``transactional.id`` only has to be unique per live worker. Keeping it
stable across restarts of the same replica (a StatefulSet ordinal, a container's name) lets the
restarted worker abort at once what its predecessor left open; otherwise the coordinator aborts it
after ``transaction.timeout.ms``, and until then ``read_committed`` readers and the partitions' next
owner wait.

An outcome the broker refuses for good (too large for its topic) would abort every transaction it
is in. It is replaced by its fallback (a result by a dead letter of its task, a dead letter by a
smaller cut of itself) and the transaction is tried again; an outcome with no fallback left is
dropped with an error log, so one record never stops its partition's commits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from consumers.producers import (
    MISSING_TOPIC_CODES,
    REJECTED_CODES,
    Announce,
    Headers,
    Outputs,
    Placed,
    RecordRejected,
    dead_letter_headers,
    record_size,
    result_headers,
)
from consumers.records import Record

log = logging.getLogger(__name__)

# how often a retriable failure of commit_transaction is tried again before the transaction is aborted
COMMIT_RETRIES = 3


@dataclass(slots=True)
class Staged:
    """One outcome record waiting for its transaction.

    ``fallback`` is asked for a replacement when the broker refuses this record for good; it gets
    the broker's reason and returns the replacement, or None to drop the outcome. The replacement
    happens in place (:meth:`fall_back`), so a transaction tried again holds the replacement.
    """

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    fallback: Callable[[str], Staged | None] | None = None
    # a topic that does not exist or may not be written refuses this record for good, as too
    # large a record would (a child's reply to an allowed replies topic: a deployment's mistake);
    # else it fails the transaction, to be tried again as an outage
    missing_ok: bool = False
    dropped: bool = False
    # a record written after this one, in the same transaction, that names where this one was
    # written (a task's ``failed`` event naming its dead letter); kept when this one falls back
    then: Callable[[Placed], Staged] | None = None

    def fall_back(self, reason: str) -> None:
        """Become this outcome's fallback; with none left, be dropped (logged)."""
        replacement = self.fallback(reason) if self.fallback is not None else None
        if replacement is None:
            self.dropped = True
            log.error("outcome for %s (key %r) refused by the broker and has no fallback; dropped: %s",
                      self.topic, (self.key or b"")[:64], reason)
            return
        log.warning("outcome for %s refused by the broker (%s); its fallback is written instead", self.topic, reason)
        self.topic, self.key, self.value = replacement.topic, replacement.key, replacement.value
        self.headers, self.fallback = replacement.headers, replacement.fallback
        self.then = replacement.then or self.then


_staging: ContextVar[list[Staged] | None] = ContextVar("staging", default=None)


@contextlib.contextmanager
def staging(into: list[Staged]) -> Iterator[None]:
    """Outcomes staged inside this block (and in tasks it starts) are appended to ``into``."""
    token = _staging.set(into)
    try:
        yield
    finally:
        _staging.reset(token)


def stage(item: Staged) -> None:
    """Stage an outcome for the record being handled. Raises RuntimeError outside a handler."""
    into = _staging.get()
    if into is None:
        raise RuntimeError("an outcome was staged outside a record's handler: nothing would ever commit it")
    into.append(item)


class TransactionFailed(Exception):
    """The transaction did not commit (it was aborted, or the producer is being replaced): nothing
    of it is visible to ``read_committed`` readers; its outcomes and offsets must be written again."""


def _refuses(item: Staged, err: KafkaError) -> bool:
    """Whether ``err`` refuses this record for good (it falls back), rather than failing the transaction."""
    return not err.fatal() and (err.code() in REJECTED_CODES or (item.missing_ok and err.code() in MISSING_TOPIC_CODES))


def _error_of(exc: KafkaException) -> KafkaError | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


class TransactionalProducer:
    """A transactional producer driven by blocking calls from one thread (the consumer's).

    :meth:`commit` writes staged outcomes and offsets in one transaction, or raises
    :class:`TransactionFailed` having aborted it. A fatal error (fenced by a newer worker with the
    same ``transactional.id``, or a broken producer state) closes the producer; the next commit
    makes a new one and calls ``init_transactions`` again.
    """

    def __init__(self, config: dict[str, Any], *, timeout_s: float = 30.0) -> None:
        if not config.get("transactional.id"):
            raise ValueError("a transactional producer needs a transactional.id")
        self._config = dict(config)
        self._timeout_s = timeout_s
        self._producer: Producer | None = None
        self.transactions = 0
        self.aborts = 0
        self.replacements = 0

    @property
    def transactional_id(self) -> str:
        return str(self._config["transactional.id"])

    def _ready(self) -> Producer:
        if self._producer is None:
            producer = Producer(self._config)
            try:
                producer.init_transactions(self._timeout_s)
            except KafkaException as exc:
                raise TransactionFailed(f"init_transactions: {exc}") from exc
            self._producer = producer
            log.info("transactional producer %s ready", self.transactional_id)
        return self._producer

    def commit(self, items: list[Staged], offsets: list[TopicPartition], group_metadata: Any) -> None:
        """One transaction holding ``items`` and ``offsets``. An item the broker refused for good
        falls back (:meth:`Staged.fall_back`), so a retry with the same items no longer holds it."""
        if not items and not offsets:
            return
        producer = self._ready()
        refused: dict[int, str] = {}
        try:
            producer.begin_transaction()
            placed = self._produce_all(producer, items, refused)
            self._produce_then(producer, items, placed, refused)
            if offsets:
                producer.send_offsets_to_transaction(offsets, group_metadata, self._timeout_s)
            self._commit_transaction(producer)
        except KafkaException as exc:
            self._abort(producer, exc)
            raise TransactionFailed(str(exc)) from exc
        finally:
            for index, reason in refused.items():
                items[index].fall_back(reason)
        self.transactions += 1

    def _produce_all(self, producer: Producer, items: list[Staged], refused: dict[int, str]) -> dict[int, Placed]:
        """Produce every item; where each was written fills in as the broker acknowledges it."""
        placed: dict[int, Placed] = {}
        for index, item in enumerate(items):

            def delivered(err: KafkaError | None, msg: Any, index: int = index, item: Staged = item) -> None:
                if err is not None and _refuses(item, err):
                    refused[index] = err.str()
                elif err is None:
                    placed[index] = (int(msg.partition()), int(msg.offset()))

            while not item.dropped:
                try:
                    producer.produce(item.topic, value=item.value, key=item.key, headers=item.headers,
                                     on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let it drain into the transaction
                    producer.poll(0.05)
                except KafkaException as exc:
                    err = _error_of(exc)
                    if err is None or not _refuses(item, err):
                        raise
                    item.fall_back(err.str())  # refused before it left: its fallback goes instead
        return placed

    def _produce_then(self, producer: Producer, items: list[Staged], placed: dict[int, Placed],
                      refused: dict[int, str]) -> None:
        """The records that name where an item was written, once the broker said it (same transaction)."""
        if not any(item.then is not None and not item.dropped for item in items):
            return
        if producer.flush(self._timeout_s) > 0:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "staged outcomes not acknowledged in time"))
        for index, item in enumerate(items):
            if item.then is None or item.dropped or index in refused or index not in placed:
                continue  # a refused item falls back and names itself in the transaction tried again
            follow = item.then(placed[index])
            producer.produce(follow.topic, value=follow.value, key=follow.key, headers=follow.headers)

    def _commit_transaction(self, producer: Producer) -> None:
        for attempt in range(COMMIT_RETRIES + 1):
            try:
                producer.commit_transaction(self._timeout_s)
                return
            except KafkaException as exc:
                err = _error_of(exc)
                if err is None or not err.retriable() or attempt == COMMIT_RETRIES:
                    raise
                log.warning("commit_transaction: %s; trying again", err.str())

    def _abort(self, producer: Producer, exc: KafkaException) -> None:
        err = _error_of(exc)
        self.aborts += 1
        if err is not None and err.fatal():
            log.error("transactional producer %s failed for good (%s): a new one takes over",
                      self.transactional_id, err.str())
            self._discard(producer)
            return
        log.warning("transaction aborted (%s): its outcomes and offsets are written again", exc)
        try:
            producer.abort_transaction(self._timeout_s)
        except KafkaException as abort_exc:
            log.error("abort_transaction failed (%s): a new producer takes over", abort_exc)
            self._discard(producer)

    def _discard(self, producer: Producer) -> None:
        if self._producer is producer:
            self._producer = None
            self.replacements += 1
        with contextlib.suppress(Exception):
            producer.flush(0)

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.flush(1)


class TransactionalOutputs(Outputs):
    """Outputs for transactions on: outcomes are staged (:func:`stage`) for the transaction that
    also commits their record's offset, never sent on their own. What the broker refuses for good
    is replaced inside the transaction: a result by a dead letter of its task (reason
    ``internal``), a dead letter by its 4 KiB cut."""

    transactional = True

    async def result(
        self, record: Record, task_key: str, event: bytes, traceparent: str | None, deadline: str | None = None,
    ) -> None:
        await self.ready_to_encode()
        event = self.encoded(event)
        size = record_size(task_key.encode(), event, [])
        if size > min(self.publisher.max_message_bytes, self.publisher.queue_max_bytes):
            raise RecordRejected(f"result of {size} bytes exceeds the producer's limit")

        def instead(why: str) -> Staged | None:
            error = f"the broker refused the outcome record: {why}"
            return self._dead_letter_item(record, reason="internal", error=error, attempts=0, task_id=task_key,
                                          traceparent=traceparent, announce=self.announcing(record, task_key, error))

        stage(Staged(self.results_topic, task_key.encode(), event, result_headers(traceparent, deadline),
                     fallback=instead))

    async def dead_letter(
        self, record: Record, *, reason: str, error: str, attempts: int, task_id: str | None,
        traceparent: str | None = None, announce: Announce | None = None,
    ) -> Placed | None:
        """Staged; ``announce``'s event follows it on the results topic in the same transaction."""
        if announce is not None and task_id is not None:
            await self.ready_to_encode()
        stage(self._dead_letter_item(record, reason=reason, error=error, attempts=attempts, task_id=task_id,
                                     traceparent=traceparent, announce=announce))
        return None

    def _dead_letter_item(
        self, record: Record, *, reason: str, error: str, attempts: int, task_id: str | None, traceparent: str | None,
        announce: Announce | None = None,
    ) -> Staged:
        headers = dead_letter_headers(record, reason=reason, error=error, attempts=attempts, task_id=task_id,
                                      traceparent=traceparent)

        def cut(_why: str) -> Staged:
            return Staged(self.dlq_topic, *self._cut(record, headers))

        def then(placed: Placed) -> Staged:
            assert announce is not None and task_id is not None
            return Staged(self.results_topic, task_id.encode(), self.encoded(announce(self.dlq_topic, placed)),
                          result_headers(traceparent, None))

        return Staged(self.dlq_topic, *self._fitted(record, headers), fallback=cut,
                      then=then if announce is not None and task_id is not None else None)
