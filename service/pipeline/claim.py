"""Claiming a task in the ledger, and what each decision of the claim does.

- ``claimed``: this worker holds the task under a fresh fence; the processor runs it.
- ``succeeded`` / ``dead``: done before: never call the model again; re-emit the stored outcome,
  byte for byte, if it was not acknowledged yet.
- ``busy``: another worker holds a live lease: wait until it finishes or its lease expires; past the
  task's deadline, end it ``expired`` through the ledger (a higher fence refuses the holder's result).
- ``conflict``: the same key with a different input: dead-letter, the first result stays.
- ``crashed``: the task's holders died with a call of it under way ``max_deaths`` times; the claim
  ended it ``dead(crashed)``: dead-letter it.
- ``cancelled``: a child task whose parent ended dead before it started; the claim ended it
  ``dead(cancelled)``: dead-letter it, no model call.

A child task's first claim keeps its parent, step and place (headers ``agent.parent``,
``agent.parent_step``, ``agent.child``) in its ledger hash. A child task (its record carries
``agent.reply_to``) sends its parent a reply inside the same
publishing block as each outcome here (:meth:`Outcomes.reply <service.pipeline.outcomes.Outcomes.reply>`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime

from consumers.producers import Outputs
from consumers.records import Record
from dedup.keys import is_valid_task_key
from dedup.ledger import Claim, Ledger, LedgerUnavailable
from service.agents.tasks import Task, header
from service.core.metrics import Metrics
from service.pipeline.base import CHILD, PARENT, PARENT_STEP, ProcessorConfig, current_span, deadline_of
from service.pipeline.delegation import place_of
from service.pipeline.outcomes import Outcomes
from service.pipeline.screen import DuplicateShare
from service.pipeline.sessions import SessionGate

log = logging.getLogger(__name__)


FINISHED = ("succeeded", "dead", "parked")  # the decisions of a task done before (or parked)


def parent_of(record: Record) -> tuple[str, str, int] | None:
    """A child task's parent (id, step, n) from its record's headers, kept in its ledger hash by its
    first claim; None for a root or headers that do not name a valid parent and place."""
    parent, step = header(record.headers, PARENT), header(record.headers, PARENT_STEP)
    n = place_of(header(record.headers, CHILD))
    if not parent or not is_valid_task_key(parent) or not step or len(step) > 200 or n is None:
        return None
    return parent, step, n


class Claims:
    """The stage that claims a task: asks the ledger, waits while another worker holds it, and hands
    the decisions that end the record (done before, conflict, crashed, expired) to ``outcomes``.

    Owns ``duplicates``: how many recent claims found their task done, which the replay screen reads."""

    def __init__(self, *, ledger: Ledger, outcomes: Outcomes, outputs: Outputs, metrics: Metrics,
                 config: ProcessorConfig, worker_id: str, clock: Callable[[], datetime],
                 sessions: SessionGate | None = None) -> None:
        self.ledger = ledger
        self.sessions = sessions  # a session's update applied, or its queue left, by a stored outcome
        self.outcomes = outcomes
        self.outputs = outputs  # a stored outcome is re-emitted on it
        self.metrics = metrics
        self.config = config
        self.worker_id = worker_id
        self.clock = clock
        self.duplicates = DuplicateShare()

    async def claim(self, record: Record, task: Task, ctx: str,
                    first_attempt: tuple[str, int] | None = None) -> Claim | None:
        """The ledger's claim when this worker holds the task now; None when the record is done
        (the decision's outcome written and published). ``first_attempt`` (step, max attempts): the
        claim counts that step's first attempt with it (:meth:`Ledger.claim <dedup.ledger.Ledger.claim>`)."""
        seen = self.ledger.seen.key(record.value, record.headers)  # a replay of it then needs no decoding
        while True:
            claim = await self.ledger.claim(task.key, task.fingerprint, self.worker_id, task.kind,
                                            parent=parent_of(record), first_attempt=first_attempt, seen=seen)
            decision = claim.decision
            if decision != "busy":
                self.duplicates.note(decision in FINISHED, 1)
            span = current_span()
            span.set_decision(decision)
            span.set_fence(claim.fence)
            if decision == "claimed":
                log.debug("%s: claimed with fence %d", ctx, claim.fence)
                return claim
            if decision == "conflict":
                self.metrics.tasks.labels(outcome="conflict").inc()
                await self.outcomes.dead_letter(
                    record, task.key, "conflict",
                    f"task {task.key} exists with another input (fingerprint {task.fingerprint} differs)",
                    claim.attempts, count_outcome=False, announced=False,
                )
                return None
            if decision == "parked":  # waits for a person: the ledger holds it, this record is done
                self.metrics.tasks.labels(outcome="duplicate").inc()
                log.info("%s: parked before; skipped", ctx)
                return None
            if decision in ("succeeded", "dead"):
                await self._duplicate(record, task, decision, claim, ctx)
                return None
            if decision == "crashed":
                error = (f"the workers holding task {task.key} stopped {self.ledger.max_deaths} times "
                         "with a call of it under way")
                await self._ended(record, task, "crashed", error, claim.attempts)
                return None
            if decision == "cancelled":
                await self._ended(record, task, "cancelled", "the parent task ended before this child started",
                                  claim.attempts)
                return None
            # busy: another worker holds a live lease
            if task.expired(self.clock()):
                error = "deadline passed while another worker held the task"
                state, _fence = await self.ledger.expire(task.key, claim.fence, error)
                if state == "ok":  # the holder's result, should it come, is refused by the fence
                    await self._ended(record, task, "expired", error, claim.attempts)
                    return None
                continue  # the holder finished (or let go) meanwhile: claim again and see
            wait_s = min(self.config.busy_poll_s, max(claim.lease_remaining_ms, 10) / 1000)
            await asyncio.sleep(wait_s)

    async def _ended(self, record: Record, task: Task, reason: str, error: str, attempts: int) -> None:
        """Dead-letter a task the ledger ended dead for ``reason`` (and reply to its parent)."""
        if reason != "cancelled":  # before publishing: once published, a redelivery skips the task
            await self.outcomes.cancel_children(task.key)
        if self.sessions is not None:  # a dead end: out of its session's queue, before publishing
            await self.sessions.leave(task)
        async with self.outcomes.publishing(record, task.key, "dead"):
            await self.outcomes.dead_letter(record, task.key, reason, error, attempts, kind=task.kind)
            await self.outcomes.reply(record, task.key, task.kind, "dead", reason=reason, error=error)

    async def _duplicate(self, record: Record, task: Task, state: str, claim: Claim, ctx: str) -> None:
        self.metrics.task_outcome["duplicate"].inc()
        current_span().set_outcome("duplicate")
        if claim.published and not (self.outputs.transactional and claim.published_by == record.coordinates):
            log.info("%s: %s before; skipped", ctx, state)
            return
        stored = await self.ledger.get(task.key)
        if stored is None:  # expired from the ledger between the two reads: run it as new
            raise LedgerUnavailable(f"task {task.key} vanished between claim and read")
        if state == "succeeded":  # stored by an attempt whose WAIT may have failed: replicas first
            await self.ledger.confirm_replicated(task.key)
        else:  # ended dead by a worker that stopped before publishing (and perhaps before cancelling)
            await self.outcomes.cancel_children(task.key)
        await self._session(task, state, claim, stored.event)
        async with self.outcomes.publishing(record, task.key, state):
            if state == "succeeded" and stored.event is not None:
                await self.outputs.result(record, task.key, stored.event, self.outcomes.traceparent(task.traceparent),
                                          deadline_of(task))
                await self.outcomes.reply(record, task.key, task.kind, "succeeded",
                                          result=json.loads(stored.event).get("result"))
                self.metrics.results_published.inc()
            elif state == "dead":
                reason = stored.fields.get("dead_reason", "permanent")
                if await self.outcomes.send_dead_letter(record, task.key, reason, stored.fields.get("error", ""),
                                                        stored.attempts, traceparent=None, kind=task.kind):
                    self.metrics.dead_letters.labels(reason=reason).inc()
                await self.outcomes.reply(record, task.key, task.kind, "dead", reason=reason,
                                          error=stored.fields.get("error", ""))
        log.info("%s: %s before; re-emitted the stored outcome", ctx, state)

    async def _session(self, task: Task, state: str, claim: Claim, event: bytes | None) -> None:
        """Before a stored outcome is re-emitted: a result's session update applied (once per task
        id: a crash between the ledger's DONE and the apply), a dead end's session left."""
        if self.sessions is None:
            return
        if state == "succeeded" and event is not None:
            await self.sessions.apply(task, claim.fence, json.loads(event).get("result"))
        elif state == "dead":
            await self.sessions.leave(task)
