"""The two background loops of parked tasks in every replica: the sweeper (deadlines, resumptions
not yet produced) and the consumer of the approvals topic."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException

from consumers.producers import ProduceFailed
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


def parse_approval(value: bytes | None) -> tuple[str, str, str, str]:
    """``{"task_id", "approve": bool, "reason"?, "by"?}`` -> (task id, decision, by, reason); ValueError."""
    try:
        data = json.loads(value or b"")
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("task_id"), str) or not isinstance(
            data.get("approve"), bool):
        raise ValueError('expected {"task_id": str, "approve": bool, "reason": str?, "by": str?}')
    by, reason = data.get("by", "approvals topic"), data.get("reason", "")
    if not isinstance(by, str) or not isinstance(reason, str):
        raise ValueError("by and reason must be strings")
    return data["task_id"], "approved" if data["approve"] else "rejected", by[:200], reason[:500]


class ApprovalsConsumer:
    """Reads the approvals topic in its own thread (one consumer group for the whole fleet) and
    applies each decision on the service's loop; an offset is committed once its decision is in
    the ledger. A decision the ledger refuses (already decided, unknown task) is logged and skipped."""

    def __init__(self, settings: Settings, apply: Callable[[str, str, str, str], Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        k = settings.kafka
        self._consumer = Consumer({
            **k.common_config(), "group.id": f"{k.group_id}.approvals", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": k.session_timeout_ms,
        })
        self._topic, self._apply, self._loop = k.approvals_topic, apply, loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="approvals", daemon=True)

    def start(self) -> None:
        self._consumer.subscribe([self._topic])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._consumer.poll(0.5)
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
            self._handle(message.value())
            try:
                self._consumer.commit(message=message, asynchronous=False)
            except KafkaException as exc:  # applied again after a rebalance: the ledger decides once
                log.warning("approvals topic: offset not committed: %s", exc)

    def _handle(self, value: bytes | None) -> None:
        try:
            task_id, decision, by, reason = parse_approval(value)
        except ValueError as exc:
            log.warning("approvals topic: record skipped: %s", exc)
            return
        while not self._stop.is_set():
            future = asyncio.run_coroutine_threadsafe(self._apply(task_id, decision, by, reason), self._loop)
            try:
                future.result(timeout=60)
                return
            except (KeyError, NotDecidable) as exc:
                log.info("approvals topic: task_id=%s: %s not applied: %s", task_id, decision, exc)
                return
            except (LedgerUnavailable, ProduceFailed, TimeoutError, OSError, KafkaException) as exc:
                log.warning("approvals topic: task_id=%s: retrying: %s", task_id, exc)
                self._stop.wait(_RETRY_S)


def approval_applier(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> Callable[..., Any]:
    async def apply(task_id: str, decision: str, by: str, reason: str) -> None:
        await decide(ledger, send, metrics, utcnow(), task_id, decision, by=by, reason=reason,
                     audit_topic=settings.kafka.audit_topic)

    return apply
