"""Commits: offsets only below each partition's first unfinished record, in a transaction with
the outcomes staged below them when transactions are on; and the lag, from local state."""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumers.partitions import TP, Partitions, PartitionState, RunnerMetrics, fmt
from consumers.progress import Progress
from consumers.thread import ConsumerThread
from consumers.transactions import Staged, TransactionalProducer, TransactionFailed

log = logging.getLogger(__name__)

Taken = list[tuple[PartitionState, TopicPartition, dict[int, list[Staged]]]]


class Commits:
    """The runner's commits and lag reports.

    Owns no state of its own: an offset's commit mark lives in its partition's tracker (taken,
    then confirmed only once the broker accepted it), staged outcomes in the partition's
    ``staged`` until their transaction. Writes each partition's ``lag``. Calls the consumer only
    through the consumer thread; ``note_error`` is told of every failed commit, ``progress`` of
    every transaction that made staged outcomes durable. ``failing``: the last transaction failed
    (a record that stages its outcomes meanwhile is no progress, see :class:`Dispatcher`).
    """

    def __init__(self, partitions: Partitions, thread: ConsumerThread, metrics: RunnerMetrics,
                 note_error: Callable[[str], None], transactions: TransactionalProducer | None = None,
                 progress: Progress | None = None) -> None:
        self._partitions = partitions
        self._thread = thread
        self._metrics = metrics
        self._note_error = note_error
        self._transactions = transactions
        self._progress = progress or Progress()
        self.failing = False

    def commit_now(self, consumer: Consumer, offsets: list[TopicPartition], why: str) -> list[TopicPartition]:
        """Commit synchronously; returns the offsets the broker accepted (the rest are retried later)."""
        if not offsets:
            return []
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - never let a commit error stop the consumer
            err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET:
                return list(offsets)  # nothing new to store: the broker already has these
            self._note_error(f"commit failed: {exc}")
            log.warning("commit on %s failed (retried at the next commit): %s", why, exc)
            return []
        done = list(offsets)
        if isinstance(result, list):
            failed = [tp for tp in result if getattr(tp, "error", None) is not None]
            if failed:
                log.warning("commit on %s failed for %s (retried at the next commit)", why, fmt(failed))
                bad = {(tp.topic, tp.partition) for tp in failed}
                done = [tp for tp in offsets if (tp.topic, tp.partition) not in bad]
        if done:
            self._metrics.committed()
            log.info("committed on %s: %s", why, fmt(done))
        return done

    def commit_revoked(self, consumer: Consumer, offsets: list[TopicPartition], staged: list[list[Staged]]) -> None:
        """On the consumer thread, in the revoke callback: the revoked partitions' last commit."""
        if self._transactions is None:
            self.commit_now(consumer, offsets, "revoke")  # the partitions are gone: nothing to confirm
            return
        # aborted: the next owner reads those records again and stages their outcomes anew
        self.transact(consumer, [item for items in staged for item in items], offsets, "revoke")

    async def commit(self) -> None:
        """Commit what finished; an offset is marked committed only once the broker accepted it."""
        pending = self._partitions.commit_marks()
        consumer = self._thread.consumer
        if not pending or consumer is None:
            return
        if self._transactions is not None:
            await self._thread.call(self._transaction_round, consumer)
            return
        done = await self._thread.call(self.commit_now, consumer, [tp for _p, tp in pending], "interval")
        accepted = {(tp.topic, tp.partition, tp.offset) for tp in done}
        for part, tp in pending:
            if (tp.topic, tp.partition, tp.offset) in accepted:
                part.tracker.committed(tp.offset)

    def _transaction_round(self, consumer: Consumer) -> None:
        """On the consumer thread, between polls, so no revoke runs in the middle: take the offsets
        and the outcomes staged below them, write them in one transaction, then confirm (or put the
        outcomes back to be written again)."""
        taken = self._thread.on_loop(self._take_for_transaction())
        if not taken:
            return
        items = [item for _part, _tp, staged in taken for items in staged.values() for item in items]
        ok = self.transact(consumer, items, [tp for _part, tp, _staged in taken], "interval")
        self._thread.on_loop(self._settle_transaction(taken, ok))

    async def _take_for_transaction(self) -> Taken:
        return [(part, tp, part.take_staged(tp.offset)) for part, tp in self._partitions.commit_marks()]

    async def _settle_transaction(self, taken: Taken, ok: bool) -> None:
        self.failing = not ok
        if not ok:
            for part, _tp, staged in taken:  # aborted: written again at the next commit
                if not part.revoked:
                    part.staged.update(staged)
            return
        for part, tp, _staged in taken:
            part.tracker.committed(tp.offset)
        if any(staged for _part, _tp, staged in taken):
            self._progress.finished()

    def transact(self, consumer: Consumer, items: list[Staged], offsets: list[TopicPartition], why: str) -> bool:
        """On the consumer thread: one transaction; False when it was aborted (nothing is visible)."""
        assert self._transactions is not None
        try:
            self._transactions.commit(items, offsets, consumer.consumer_group_metadata())
        except TransactionFailed as exc:
            self._note_error(f"transaction failed: {exc}")
            log.warning("transaction on %s failed (written again later): %s", why, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - never let a commit error stop the consumer
            self._note_error(f"transaction failed: {exc}")
            log.exception("transaction on %s failed (written again later)", why)
            return False
        self._metrics.committed()
        log.info("committed on %s in a transaction: %d outcomes, %s", why, len(items), fmt(offsets))
        return True

    async def report_lag(self) -> None:
        """Lag per partition, from local state only: no broker round trip on the consumer thread.

        The high watermark is librdkafka's cached one (fetch responses update it); the position is
        the tracker's commit mark, else the consumer's local fetch position.
        """
        consumer = self._thread.consumer
        if consumer is None:
            return
        parts = {tp: p.tracker.committable() for tp, p in self._partitions.items()}

        def read() -> list[tuple[TP, int | None]]:
            out: list[tuple[TP, int | None]] = []
            for (topic, partition), position in parts.items():
                tp = TopicPartition(topic, partition)
                try:
                    _low, high = consumer.get_watermark_offsets(tp, cached=True)
                    if position is None:
                        pos = consumer.position([tp])
                        position = pos[0].offset if pos and pos[0].offset >= 0 else None
                except Exception:  # noqa: BLE001 - lag is best effort
                    continue
                if high is None or high < 0 or position is None:
                    out.append(((topic, partition), None))
                else:
                    out.append(((topic, partition), max(0, high - position)))
            return out

        for (topic, partition), lag in await self._thread.call(read):
            self._metrics.lag(topic, partition, lag)
            part = self._partitions.get((topic, partition))
            if part is not None:
                part.lag = lag
