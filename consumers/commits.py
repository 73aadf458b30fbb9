"""Commits: offsets only below each partition's first unfinished record, in a transaction with
the outcomes staged below them when transactions are on; and the lag, from local state."""

from __future__ import annotations

import asyncio
import logging

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumers.partitions import TP, PartitionState, RunnerCore, fmt
from consumers.transactions import Staged, TransactionFailed

log = logging.getLogger(__name__)


class Commits(RunnerCore):
    """The runner's commits and lag; a part of :class:`~consumers.runner.Runner`."""

    _lags: dict[TP, int | None]  # per partition, as last reported

    def _commit_now(self, consumer: Consumer, offsets: list[TopicPartition], why: str) -> list[TopicPartition]:
        """Commit synchronously; returns the offsets the broker accepted (the rest are retried later)."""
        if not offsets:
            return []
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - never let a commit error stop the consumer
            err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET:
                return list(offsets)  # nothing new to store: the broker already has these
            self.last_error = f"commit failed: {exc}"
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
            self.metrics.committed()
            log.info("committed on %s: %s", why, fmt(done))
        return done


    def _pending_commits(self) -> list[tuple[PartitionState, TopicPartition]]:
        offsets = []
        for (topic, partition), part in self._partitions.items():
            offset = part.tracker.take_commit()
            if offset is not None:
                offsets.append((part, TopicPartition(topic, partition, offset)))
        return offsets


    async def commit(self) -> None:
        """Commit what finished; an offset is marked committed only once the broker accepted it."""
        pending = self._pending_commits()
        if not pending or self._consumer is None:
            return
        if self.transactions is not None:
            await self._call(self._transaction_round, self._consumer)
            return
        done = await self._call(self._commit_now, self._consumer, [tp for _p, tp in pending], "interval")
        accepted = {(tp.topic, tp.partition, tp.offset) for tp in done}
        for part, tp in pending:
            if (tp.topic, tp.partition, tp.offset) in accepted:
                part.tracker.committed(tp.offset)


    def _transaction_round(self, consumer: Consumer) -> None:
        """On the consumer thread, between polls, so no revoke runs in the middle: take the offsets
        and the outcomes staged below them, write them in one transaction, then confirm (or put the
        outcomes back to be written again)."""
        assert self._loop is not None
        loop = self._loop
        taken = asyncio.run_coroutine_threadsafe(self._take_for_transaction(), loop).result()
        if not taken:
            return
        items = [item for _part, _tp, staged in taken for items in staged.values() for item in items]
        ok = self._transact(consumer, items, [tp for _part, tp, _staged in taken], "interval")
        asyncio.run_coroutine_threadsafe(self._settle_transaction(taken, ok), loop).result()


    async def _take_for_transaction(self) -> list[tuple[PartitionState, TopicPartition, dict[int, list[Staged]]]]:
        return [(part, tp, part.take_staged(tp.offset)) for part, tp in self._pending_commits()]


    async def _settle_transaction(
        self, taken: list[tuple[PartitionState, TopicPartition, dict[int, list[Staged]]]], ok: bool,
    ) -> None:
        if not ok:
            for part, _tp, staged in taken:  # aborted: written again at the next commit
                if not part.revoked:
                    part.staged.update(staged)
            return
        for part, tp, _staged in taken:
            part.tracker.committed(tp.offset)


    def _transact(self, consumer: Consumer, items: list[Staged], offsets: list[TopicPartition], why: str) -> bool:
        """On the consumer thread: one transaction; False when it was aborted (nothing is visible)."""
        assert self.transactions is not None
        try:
            self.transactions.commit(items, offsets, consumer.consumer_group_metadata())
        except TransactionFailed as exc:
            self.last_error = f"transaction failed: {exc}"
            log.warning("transaction on %s failed (written again later): %s", why, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - never let a commit error stop the consumer
            self.last_error = f"transaction failed: {exc}"
            log.exception("transaction on %s failed (written again later)", why)
            return False
        self.metrics.committed()
        log.info("committed on %s in a transaction: %d outcomes, %s", why, len(items), fmt(offsets))
        return True


    async def _report_lag(self) -> None:
        """Lag per partition, from local state only: no broker round trip on the consumer thread.

        The high watermark is librdkafka's cached one (fetch responses update it); the position is
        the tracker's commit mark, else the consumer's local fetch position.
        """
        if self._consumer is None:
            return
        consumer = self._consumer
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

        for (topic, partition), lag in await self._call(read):
            self.metrics.lag(topic, partition, lag)
            if (topic, partition) in self._partitions:
                self._lags[(topic, partition)] = lag
