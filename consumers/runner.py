"""The consumer-group runner: key-ordered concurrency, backpressure and safe offset commits.

- Every call on the confluent-kafka consumer goes through one single-thread executor, so calls
  never overlap; rebalance callbacks run on that thread and hop to the event loop for state.
- Records with the same key run one after another in offset order; different keys run
  concurrently, inside one partition too.
- A partition commits only the first offset whose record is not finished (:class:`OffsetTracker`):
  the outcome of every earlier record is durable before its offset is.
- When the in-flight window is full the runner stops taking records and waits for room; librdkafka
  keeps what it prefetched (bounded by ``queued.max.messages.kbytes``). If the window stays full
  for ``pause_after_s`` it pauses its partitions and keeps polling (so it stays in the group and
  serves rebalances), and resumes them below the low-water mark. Pausing at once on every fill
  would throw the prefetched records away: librdkafka purges a paused partition's queue and
  fetches it again only after the resume, a gap of 0.5-1 s each time.
- A partition over its own limit is paused at once while others still have room (its records
  would otherwise keep arriving).
- On revoke it stops starting that partition's records and commits what finished; records still
  running finish under their ledger fences, and the new owner takes what is left.
- ``stop()`` drains: no new records, in-flight ones finish (bounded by ``drain_timeout_s``), final
  commit, leave the group.

The handler owns each record's outcome (result or dead letter) and returns when it is durable.
If it raises, the record is retried after a capped, jittered backoff, without limit: an outage of
Redis or the broker never loses a record and never commits past it. A retrying record holds up
only its own key (later records of that key wait behind it) and its partition's commit mark;
other keys and partitions go on.

An optional ``gate`` (e.g. "the LLM endpoint is usable") pauses every assigned partition while it
returns False; the runner keeps polling so it stays in the group, and resumes when it is True.

With a :class:`~consumers.transactions.TransactionalProducer` the handler stages its outcomes
instead of sending them, and every commit writes the staged outcomes of the records below each
partition's commit mark together with those offsets in one transaction (see
:mod:`consumers.transactions`). Outcomes staged by records above the mark wait for a later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumers.offsets import OffsetTracker
from consumers.records import Record
from consumers.transactions import Staged, TransactionalProducer, TransactionFailed, staging

log = logging.getLogger(__name__)

Handler = Callable[[Record], Awaitable[None]]
TP = tuple[str, int]


@dataclass(slots=True)
class RunnerConfig:
    topic: str
    max_in_flight: int = 256
    max_in_flight_per_partition: int = 256
    resume_ratio: float = 0.5
    pause_after_s: float = 1.0
    commit_interval_s: float = 1.0
    lag_interval_s: float = 5.0
    poll_timeout_s: float = 0.1
    max_batch: int = 500
    drain_timeout_s: float = 30.0
    retry_base_s: float = 0.2
    retry_max_s: float = 10.0


@dataclass(slots=True)
class _Partition:
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    held: int = 0
    paused: bool = False
    revoked: bool = False
    # transactions on: outcomes staged by finished records, by offset, until their transaction
    staged: dict[int, list[Staged]] = field(default_factory=dict)

    def take_staged(self, below: int) -> dict[int, list[Staged]]:
        """Remove and return the outcomes staged by records below offset ``below``."""
        taken = {offset: items for offset, items in self.staged.items() if offset < below}
        for offset in taken:
            del self.staged[offset]
        return taken


class RunnerMetrics:
    """The gauges and counters the runner moves; a no-op by default."""

    def consumed(self, n: int) -> None: ...
    def inflight(self, n: int) -> None: ...
    def paused(self, n: int) -> None: ...
    def assigned(self, n: int) -> None: ...
    def committed(self) -> None: ...
    def lag(self, topic: str, partition: int, lag: int | None) -> None: ...


class Runner:
    def __init__(
        self,
        consumer_config: dict[str, Any],
        handler: Handler,
        config: RunnerConfig,
        metrics: RunnerMetrics | None = None,
        gate: Callable[[], bool] | None = None,
        transactions: TransactionalProducer | None = None,
    ) -> None:
        self._conf = dict(consumer_config)
        self.transactions = transactions
        self._handler = handler
        self.config = config
        self.metrics = metrics or RunnerMetrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-consumer")
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._partitions: dict[TP, _Partition] = {}
        self._keys: dict[tuple[TP, bytes | int], deque[tuple[Record, _Partition]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = 0
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set whenever a record leaves the window
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate = gate
        self._gate_closed = False  # the gate said no at the last check: every partition is paused
        self._retrying = 0
        self._full_since: float | None = None
        self.started = asyncio.Event()
        self.last_error: str | None = None

    # ------------------------------------------------------------------ public state

    @property
    def assignment(self) -> list[TP]:
        return [tp for tp, p in self._partitions.items() if not p.revoked]

    @property
    def in_flight(self) -> int:
        return self._held

    def stop(self) -> None:
        """Begin a graceful drain; ``run()`` returns when it is done."""
        self._stopping.set()
        self._room.set()

    @property
    def healthy(self) -> bool:
        """Kept for compatibility: True unless stopping. One record's retries never change it."""
        return not self._stopping.is_set()

    @property
    def retrying(self) -> int:
        """How many records are between failed attempts of their handler right now."""
        return self._retrying

    @property
    def gated(self) -> bool:
        """True while the gate holds every partition paused."""
        return self._gate_closed

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ------------------------------------------------------------------ consumer thread

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._assigned(partitions), self._loop).result()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        offsets, staged = asyncio.run_coroutine_threadsafe(self._revoked(partitions), self._loop).result()
        if self.transactions is None:
            self._commit_now(consumer, offsets, "revoke")  # the partitions are gone: nothing to confirm
            return
        # aborted: the next owner reads those records again and stages their outcomes anew
        self._transact(consumer, [item for items in staged for item in items], offsets, "revoke")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._revoked(partitions), self._loop).result()
        log.warning("partitions lost without a clean revoke: %s", _fmt(partitions))

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
                log.warning("commit on %s failed for %s (retried at the next commit)", why, _fmt(failed))
                bad = {(tp.topic, tp.partition) for tp in failed}
                done = [tp for tp in offsets if (tp.topic, tp.partition) not in bad]
        if done:
            self.metrics.committed()
            log.info("committed on %s: %s", why, _fmt(done))
        return done

    # ------------------------------------------------------------------ loop-side state

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[(tp.topic, tp.partition)] = _Partition()
        self.metrics.assigned(len(self.assignment))
        log.info("assigned: %s", _fmt(partitions))

    async def _revoked(self, partitions: list[TopicPartition]) -> tuple[list[TopicPartition], list[list[Staged]]]:
        """Forget the partitions; returns their offsets to commit and the outcomes staged below them."""
        offsets = []
        staged: list[list[Staged]] = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            part = self._partitions.pop(key, None)
            if part is None:
                continue
            part.revoked = True
            offset = part.tracker.take_commit()
            if offset is not None:
                offsets.append(TopicPartition(tp.topic, tp.partition, offset))
                staged.extend(part.take_staged(offset).values())
            part.staged.clear()  # above the mark: the next owner handles those records again
            self.metrics.lag(tp.topic, tp.partition, None)
        # Queued records of revoked partitions are not started: the new owner reads them again.
        # The head of each queue is running (or retrying: it stops at its next attempt).
        for k in [k for k in self._keys if k[0] not in self._partitions]:
            queue = self._keys[k]
            while len(queue) > 1:
                _record, owner = queue.pop()
                owner.held -= 1
                self._release(1)
        self.metrics.assigned(len(self.assignment))
        self._update_paused_metric()
        log.info("revoked: %s", _fmt(partitions))
        return offsets, staged

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        conf = dict(self._conf)
        self._consumer = await self._call(Consumer, conf)
        await self._call(
            self._consumer.subscribe, [self.config.topic],
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
        )
        self.started.set()
        next_commit = monotonic() + self.config.commit_interval_s
        next_lag = monotonic() + self.config.lag_interval_s
        try:
            while not self._stopping.is_set():
                room = await self._backpressure()
                if room > 0:
                    msgs = await self._call(self._fetch, min(room, self.config.max_batch))
                    self._dispatch(msgs)
                else:  # full, not yet paused: wait for room, keeping librdkafka's prefetched records
                    msgs = []
                    await self._wait_for_room()
                now = monotonic()
                if now >= next_commit:
                    await self.commit()
                    next_commit = now + self.config.commit_interval_s
                if now >= next_lag:
                    await self._report_lag()
                    next_lag = now + self.config.lag_interval_s
                if not msgs:
                    await asyncio.sleep(0)
        finally:
            await self._drain()

    def _fetch(self, n: int) -> list[Any]:
        """Up to ``n`` records: what is ready at once, else wait (``poll_timeout_s``) for the first.

        ``consume(n, timeout)`` alone would wait the whole timeout whenever fewer than ``n`` are
        ready; this returns as soon as there is anything to start.
        """
        assert self._consumer is not None
        msgs: list[Any] = self._consumer.consume(n, 0)
        if msgs:
            return msgs
        msgs = self._consumer.consume(1, self.config.poll_timeout_s)
        if msgs and n > 1:
            msgs.extend(self._consumer.consume(n - 1, 0))
        return msgs

    async def _wait_for_room(self) -> None:
        self._room.clear()
        since = self._full_since if self._full_since is not None else monotonic()
        timeout = max(0.0, since + self.config.pause_after_s - monotonic()) + 0.001
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._room.wait()

    def _dispatch(self, msgs: list[Any]) -> None:
        """Start or queue each record; never raises, whatever a record looks like."""
        consumed = 0
        for msg in msgs:
            try:
                record = self._record_of(msg)
            except Exception:  # noqa: BLE001 - one odd record must not stop the run loop
                log.exception("cannot read a fetched record; skipped")
                continue
            if record is None:
                continue
            tp = (record.topic, record.partition)
            part = self._partitions.get(tp)
            if part is None:  # a record fetched before its partition was revoked
                continue
            consumed += 1
            try:
                part.tracker.add(record.offset)
            except ValueError:  # already held: a re-fetch after a position reset
                log.warning("record %s is already in flight; not started twice", record.coordinates)
                continue
            part.held += 1
            self._held += 1
            self._idle.clear()
            key = (tp, record.key if record.key is not None else record.offset)
            queue = self._keys.get(key)
            if queue is not None:
                queue.append((record, part))
            else:
                self._keys[key] = deque([(record, part)])
                self._start(key, record, part)
        if consumed:
            self.metrics.consumed(consumed)
            self.metrics.inflight(self._held)

    def _record_of(self, msg: Any) -> Record | None:
        """The record of a fetched message, or None for an error event (logged)."""
        err = msg.error()
        if err is not None:
            code = err.code() if hasattr(err, "code") else None
            if code != KafkaError._PARTITION_EOF:
                text = err.str() if hasattr(err, "str") else str(err)
                self.last_error = text
                log.warning("consumer error: %s", text)
            return None
        return Record.from_message(msg)

    def _start(self, key: tuple[TP, bytes | int], record: Record, part: _Partition) -> None:
        task = asyncio.create_task(self._process(key, record, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _owns(self, tp: TP, part: _Partition) -> bool:
        """True while ``part`` is still the live state of ``tp`` (not revoked, not replaced)."""
        return not part.revoked and self._partitions.get(tp) is part

    async def _process(self, key: tuple[TP, bytes | int], record: Record, part: _Partition) -> None:
        """Run the handler until it succeeds or the partition this record came from is gone.

        ``part`` is the partition state the record was dispatched into. After a revoke (and maybe
        a re-assign of the same partition, which makes a new state) the record is not retried or
        finished: the new owner, or the new assignment, reads it again.
        """
        tp = key[0]
        delay = self.config.retry_base_s
        retrying = False
        try:
            while self._owns(tp, part):
                staged: list[Staged] = []
                try:
                    if self.transactions is None:
                        await self._handler(record)
                    else:
                        with staging(staged):
                            await self._handler(record)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the handler could not make the outcome durable
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if not retrying:
                        retrying = True
                        self._retrying += 1
                    wait = delay * random.uniform(0.5, 1.0)
                    log.warning("record %s not finished, retrying in %.1fs: %s", record.coordinates, wait, exc)
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, self.config.retry_max_s)
                    continue
                if self._owns(tp, part):
                    if staged:
                        part.staged[record.offset] = staged
                    part.tracker.finish(record.offset)
                if retrying:
                    log.info("record %s finished after retries", record.coordinates)
                break
        finally:
            if retrying:
                self._retrying -= 1
        self._finish(key, part)

    def _finish(self, key: tuple[TP, bytes | int], part: _Partition) -> None:
        """Release one dispatched record (exactly once) and start the next of its key."""
        queue = self._keys.get(key)
        if queue is not None:
            queue.popleft()
            if queue:
                nxt, owner = queue[0]
                self._start(key, nxt, owner)
            else:
                del self._keys[key]
        part.held -= 1
        self._release(1)

    def _release(self, n: int) -> None:
        self._held -= n
        self._room.set()
        self.metrics.inflight(self._held)
        if self._held == 0:
            self._idle.set()

    # ------------------------------------------------------------------ backpressure

    def _gate_open(self) -> bool:
        """Ask the gate (no gate: open); logs each change. A gate that raises counts as open."""
        if self._gate is None:
            return True
        try:
            is_open = bool(self._gate())
        except Exception:  # noqa: BLE001 - a broken gate must not stop consumption for good
            log.exception("the consumer gate failed; treated as open")
            is_open = True
        if is_open == self._gate_closed:  # a transition
            self._gate_closed = not is_open
            if is_open:
                log.info("consumer gate open again: resuming partitions")
            else:
                log.warning("consumer gate closed: pausing all %d partitions", len(self._partitions))
        return is_open

    async def _backpressure(self) -> int:
        """Pause and resume partitions; returns how many records may be taken now (0: wait).

        A full window first waits for room (``pause_after_s``) before it pauses: see the module
        docstring. A closed gate pauses every partition at once.
        """
        assert self._consumer is not None
        cfg = self.config
        now = monotonic()
        gate_closed = not self._gate_open()
        room = cfg.max_in_flight - self._held
        if room > 0:
            self._full_since = None
        elif self._full_since is None:
            self._full_since = now
        full_for = 0.0 if self._full_since is None else now - self._full_since
        pause_all = gate_closed or (room <= 0 and full_for >= cfg.pause_after_s)
        low_total = int(cfg.max_in_flight * cfg.resume_ratio)
        low_part = int(cfg.max_in_flight_per_partition * cfg.resume_ratio)
        to_pause, to_resume = [], []
        open_partitions = 0
        for (topic, partition), part in self._partitions.items():
            part_full = part.held >= cfg.max_in_flight_per_partition
            if (pause_all or (part_full and room > 0)) and not part.paused:
                part.paused = True
                to_pause.append(TopicPartition(topic, partition))
            elif part.paused and not gate_closed and self._held <= low_total and part.held <= low_part:
                part.paused = False
                to_resume.append(TopicPartition(topic, partition))
            if not part.paused and not part_full:
                open_partitions += 1
        if to_pause:
            await self._call(self._consumer.pause, to_pause)
            log.debug("paused %d partitions (in flight %d)", len(to_pause), self._held)
        if to_resume:
            await self._call(self._consumer.resume, to_resume)
            log.debug("resumed %d partitions (in flight %d)", len(to_resume), self._held)
        if to_pause or to_resume:
            self._update_paused_metric()
        if room > 0 and (open_partitions or not self._partitions):
            return room
        if all(p.paused for p in self._partitions.values()):
            return 1  # nothing will arrive: poll to serve rebalances and stay in the group
        return 0

    def _update_paused_metric(self) -> None:
        self.metrics.paused(sum(1 for p in self._partitions.values() if p.paused))

    # ------------------------------------------------------------------ commits and lag

    def _pending_commits(self) -> list[tuple[_Partition, TopicPartition]]:
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

    async def _take_for_transaction(self) -> list[tuple[_Partition, TopicPartition, dict[int, list[Staged]]]]:
        return [(part, tp, part.take_staged(tp.offset)) for part, tp in self._pending_commits()]

    async def _settle_transaction(
        self, taken: list[tuple[_Partition, TopicPartition, dict[int, list[Staged]]]], ok: bool,
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
        log.info("committed on %s in a transaction: %d outcomes, %s", why, len(items), _fmt(offsets))
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

    # ------------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            if self._partitions:
                await self._call(consumer.pause, [TopicPartition(t, p) for t, p in self._partitions])
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.config.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timed out with %d records in flight; they stay uncommitted", self._held)
            await self.commit()
            await self._call(consumer.close)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._executor.shutdown(wait=False)
            log.info("consumer closed")


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]" + (f"@{tp.offset}" if tp.offset >= 0 else "") for tp in partitions
    ) or "-"
