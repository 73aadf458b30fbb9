"""The two background loops of parked tasks in every replica: the sweeper (deadlines, resumptions
not yet produced) and the consumer of the approvals topic."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message

from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.llm.batch_api import BatchAPI
from service.pipeline.base import utcnow
from service.pipeline.batch_poller import BatchPoller
from service.pipeline.parking import NotDecidable, Send, decide, sweep
from service.runtime.side_topics import SideTopicConsumer

log = logging.getLogger(__name__)


async def sweep_forever(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> None:
    """Sweep the parked list every ``tools.sweep_interval_s`` until cancelled, and take the batch
    lane's turn (its waits are parked waits); failures wait a turn."""
    poller = batch_poller(ledger, send, metrics, settings)
    try:
        while True:
            try:
                acted = await sweep(ledger, send, metrics, utcnow(), settings.kafka.audit_topic)
                if acted:
                    log.info("parked tasks: %d expired or resumed", acted)
            except Exception as exc:  # noqa: BLE001 - Redis or the broker away: the next turn tries again
                log.warning("parked tasks not swept: %s: %s", type(exc).__name__, exc)
            try:
                if poller is not None:
                    await poller.turn(utcnow())
            except Exception as exc:  # noqa: BLE001 - Redis, the broker or the Batch API away: next turn
                log.warning("batch lane: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(settings.tools.sweep_interval_s)
    finally:
        if poller is not None:
            await poller.api.aclose()


def batch_poller(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> BatchPoller | None:
    """The batch lane's poller: None when the lane is off or the model is the embedded one (no Batch API)."""
    if not settings.batch.enabled or settings.llm.base_url is None:
        return None
    api = BatchAPI(settings.llm.base_url, settings.llm.api_key.get_secret_value(), settings.llm.timeout_s)
    owner = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    return BatchPoller(ledger, send, metrics, settings.batch, api, owner, settings.kafka.audit_topic)


MAX_APPROVAL_BYTES = 64 * 1024
# why a record of the approvals topic was skipped (the metric's label: a closed set)
SKIP_REASONS = ("tombstone", "oversize", "encoding", "json", "schema", "task_key", "unknown_task", "not_waiting",
                "refused", "internal")

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


class ApprovalsConsumer(SideTopicConsumer):
    """Reads the approvals topic (:class:`~service.runtime.side_topics.SideTopicConsumer`) and
    applies each decision on the service's loop; an offset is committed once its decision is in
    the ledger. A record that is no decision (:data:`SKIP_REASONS`), or one the ledger refuses
    (already decided, unknown task), is logged, counted (``agent_approvals_skipped_total``) and
    skipped."""

    def __init__(self, settings: Settings, apply: Callable[[str, str, str, str], Any],
                 loop: asyncio.AbstractEventLoop, metrics: Metrics | None = None) -> None:
        super().__init__(settings, "approvals", settings.kafka.approvals_topic, loop)
        self._apply, self._metrics = apply, metrics

    def count_skip(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.approvals_skipped.labels(reason=reason).inc()

    def handle(self, message: Message) -> None:
        """Apply the record's decision, or skip it; raises :class:`~service.runtime.side_topics.Stopped` when a stop comes first."""
        try:
            task_id, decision, by, reason = parse_approval(message.value())
        except BadApproval as exc:
            self.skip(message, exc.reason, str(exc))
            return
        try:
            self.on_loop(lambda: self._apply(task_id, decision, by, reason), f"task_id={task_id}")
        except KeyError:
            self.skip(message, "unknown_task", f"task_id={task_id}: {decision}: no such task")
        except NotDecidable as exc:
            self.skip(message, "not_waiting", f"task_id={task_id}: {decision} not applied: {exc}")
        except (ValueError, TypeError) as exc:  # the ledger refused what the record holds
            self.skip(message, "refused", f"task_id={task_id}: {type(exc).__name__}: {str(exc)[:200]}")


def approval_applier(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> Callable[..., Any]:
    async def apply(task_id: str, decision: str, by: str, reason: str) -> None:
        await decide(ledger, send, metrics, utcnow(), task_id, decision, by=by, reason=reason,
                     audit_topic=settings.kafka.audit_topic)

    return apply
