"""The two background loops of parked tasks in every replica: the sweeper (deadlines, resumptions
not yet produced) and the consumer of the approvals topic."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumers.producers import ProduceFailed
from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger, LedgerUnavailable
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.pipeline.base import utcnow
from service.pipeline.parking import NotDecidable, Send, decide, sweep

log = logging.getLogger(__name__)

_RETRY_S = 1.0


async def sweep_forever(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> None:
    """Sweep the parked list every ``tools.sweep_interval_s`` until cancelled; failures wait a turn."""
    while True:
        try:
            acted = await sweep(ledger, send, metrics, utcnow(), settings.kafka.audit_topic)
            if acted:
                log.info("parked tasks: %d expired or resumed", acted)
        except Exception as exc:  # noqa: BLE001 - Redis or the broker away: the next turn tries again
            log.warning("parked tasks not swept: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(settings.tools.sweep_interval_s)


MAX_APPROVAL_BYTES = 64 * 1024
# why a record of the approvals topic was skipped (the metric's label: a closed set)
SKIP_REASONS = ("tombstone", "oversize", "encoding", "json", "schema", "task_key", "unknown_task", "not_waiting",
                "refused", "internal")
_RETRY_MAX_S = 30.0
_FAILURES_PER_RECORD = 3  # a record that failed the loop this often (unexpected errors) is skipped
_SLICE_S = 0.5


class BadApproval(ValueError):
    """A record of the approvals topic that is no decision: ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _text(value: Any) -> bool:
    """A string that can be stored (no lone surrogate from a ``\\ud800`` escape)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_approval(value: bytes | None) -> tuple[str, str, str, str]:
    """``{"task_id", "approve": bool, "reason"?, "by"?}`` -> (task id, decision, by, reason); raises
    :class:`BadApproval` (a ``ValueError``) with the reason it is no decision."""
    if value is None:
        raise BadApproval("tombstone", "a tombstone (no value)")
    if len(value) > MAX_APPROVAL_BYTES:
        raise BadApproval("oversize", f"{len(value)} bytes, more than {MAX_APPROVAL_BYTES}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadApproval("encoding", f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise BadApproval("json", f"not JSON: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("task_id"), str) or not isinstance(
            data.get("approve"), bool):
        raise BadApproval("schema", 'expected {"task_id": str, "approve": bool, "reason": str?, "by": str?}')
    by, reason = data.get("by", "approvals topic"), data.get("reason", "")
    if not isinstance(by, str) or not isinstance(reason, str):
        raise BadApproval("schema", "by and reason must be strings")
    task_id = data["task_id"]
    if not all(_text(v) for v in (task_id, by, reason)):
        raise BadApproval("encoding", "a string holds a lone surrogate")
    if not is_valid_task_key(task_id):
        raise BadApproval("task_key", f"invalid task id {task_id[:80]!r}")
    return task_id, "approved" if data["approve"] else "rejected", by[:200], reason[:500]


class _Stopped(Exception):
    """The consumer stops: the record in hand is left uncommitted."""


class ApprovalsConsumer:
    """Reads the approvals topic in its own thread (one consumer group for the whole fleet) and
    applies each decision on the service's loop; an offset is committed once its decision is in
    the ledger, and never for a decision a stop interrupted. A record that is no decision
    (:data:`SKIP_REASONS`), or one the ledger refuses (already decided, unknown task), is logged,
    counted (``agent_approvals_skipped_total``) and skipped: a dead letter would not fit, since a
    replay of the dead-letter topic sends records to the input topic. The thread never ends on an
    error: an unexpected one restarts its loop after a backoff, from the record that failed (skipped
    as ``internal`` once it failed the loop :data:`_FAILURES_PER_RECORD` times)."""

    def __init__(self, settings: Settings, apply: Callable[[str, str, str, str], Any],
                 loop: asyncio.AbstractEventLoop, metrics: Metrics | None = None) -> None:
        k = settings.kafka
        self._consumer = Consumer({
            **k.common_config(), "group.id": f"{k.group_id}.approvals", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": k.session_timeout_ms,
        })
        self._topic, self._apply, self._loop, self._metrics = k.approvals_topic, apply, loop, metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="approvals", daemon=True)
        self._failing: tuple[int, int] | None = None  # the record that failed the loop, and how often
        self._failures = 0
        self.restarts = 0

    def start(self) -> None:
        self._consumer.subscribe([self._topic])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._consumer.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = _RETRY_S
        while not self._stop.is_set():
            held: Message | None = None
            try:
                for message in self._messages():
                    held = message
                    self._handle_message(message)
                    held, backoff = None, _RETRY_S
                return
            except _Stopped:
                return
            except Exception as exc:  # noqa: BLE001 - the loop goes on; the record is read again
                self.restarts += 1
                log.error("approvals topic: consumer loop failed (%s: %s); restarting in %.1fs",
                          type(exc).__name__, str(exc)[:300], backoff, exc_info=exc)
                if held is not None:
                    self._rewind(held)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _RETRY_MAX_S)

    def _messages(self) -> Iterator[Message]:
        while not self._stop.is_set():
            try:
                message = self._consumer.poll(_SLICE_S)
            except KafkaException as exc:
                log.warning("approvals topic: %s", exc)
                continue
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("approvals topic: %s", error)
                continue
            yield message

    def _handle_message(self, message: Message) -> None:
        where = (message.partition() or 0, message.offset() or 0)
        if self._failing == where and self._failures >= _FAILURES_PER_RECORD:
            self._skip(message, "internal", f"failed the consumer {self._failures} times")
        else:
            try:
                self._handle(message)
            except _Stopped:
                raise
            except Exception:
                self._failures = self._failures + 1 if self._failing == where else 1
                self._failing = where
                raise
        self._failing, self._failures = None, 0
        try:
            self._consumer.commit(message=message, asynchronous=False)
        except KafkaException as exc:  # applied again after a rebalance: the ledger decides once
            log.warning("approvals topic: offset not committed: %s", exc)

    def _rewind(self, message: Message) -> None:
        """Read ``message`` again (its offset was not committed)."""
        try:
            self._consumer.seek(TopicPartition(message.topic() or self._topic, message.partition() or 0,
                                               message.offset() or 0))
        except KafkaException as exc:  # not assigned any more: its next owner reads it from the commit
            log.warning("approvals topic: cannot read partition %s offset %s again: %s",
                        message.partition(), message.offset(), exc)

    def _skip(self, message: Message, reason: str, detail: str) -> None:
        log.warning("approvals topic: record at partition %s offset %s skipped (%s): %s",
                    message.partition(), message.offset(), reason, detail)
        if self._metrics is not None:
            self._metrics.approvals_skipped.labels(reason=reason).inc()

    def _handle(self, message: Message) -> None:
        """Apply the record's decision, or skip it; raises :class:`_Stopped` when a stop comes first."""
        try:
            task_id, decision, by, reason = parse_approval(message.value())
        except BadApproval as exc:
            self._skip(message, exc.reason, str(exc))
            return
        wait = _RETRY_S
        while not self._stop.is_set():
            try:
                self._apply_now(task_id, decision, by, reason)
                return
            except KeyError:
                self._skip(message, "unknown_task", f"task_id={task_id}: {decision}: no such task")
                return
            except NotDecidable as exc:
                self._skip(message, "not_waiting", f"task_id={task_id}: {decision} not applied: {exc}")
                return
            except (ValueError, TypeError) as exc:  # the ledger refused what the record holds
                self._skip(message, "refused", f"task_id={task_id}: {type(exc).__name__}: {str(exc)[:200]}")
                return
            except (LedgerUnavailable, ProduceFailed, TimeoutError, OSError, KafkaException) as exc:
                log.warning("approvals topic: task_id=%s: retrying in %.1fs: %s", task_id, wait, exc)
                self._stop.wait(wait)
                wait = min(wait * 2, _RETRY_MAX_S)
        raise _Stopped

    def _apply_now(self, task_id: str, decision: str, by: str, reason: str) -> None:
        """Run the decision on the service's loop and wait for it, a slice at a time so a stop is heard."""
        future = asyncio.run_coroutine_threadsafe(self._apply(task_id, decision, by, reason), self._loop)
        deadline = time.monotonic() + 60
        while True:
            try:
                future.result(timeout=_SLICE_S)
                return
            except concurrent.futures.TimeoutError:
                if future.done():  # the decision itself raised TimeoutError
                    raise
                if self._stop.is_set():
                    future.cancel()
                    raise _Stopped from None
                if time.monotonic() >= deadline:
                    future.cancel()
                    raise TimeoutError(f"the decision on {task_id} took more than 60s") from None


def approval_applier(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> Callable[..., Any]:
    async def apply(task_id: str, decision: str, by: str, reason: str) -> None:
        await decide(ledger, send, metrics, utcnow(), task_id, decision, by=by, reason=reason,
                     audit_topic=settings.kafka.audit_topic)

    return apply
