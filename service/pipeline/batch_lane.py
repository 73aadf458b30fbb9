"""The batch lane: a model call that can wait goes through the provider's Batch API, at its lower
price, as a parked wait.

Which calls: those of a kind with ``batch = True`` (a step without tools), and, with
``AGENT_BATCH__PRIORITY``, of a task whose event says ``"priority": "batch"``; never a task that says
``interactive``. Such a call is not sent: its request line (the body :meth:`LLMClient.chat` would
send, with the call's own key as its ``custom_id``) is queued in its group (endpoint and model:
:mod:`dedup.batches`) and the task parks (``waiting.what = "batch"``: the ledger's ``park``, listed for
the sweeper at the wait's deadline, its offset committed) exactly as a task waiting for an approval.
The wait's deadline is the task's share of the time it has left (``AGENT_BATCH__DEADLINE_SHARE``), or
``AGENT_BATCH__MAX_WAIT_S`` without a deadline.

The poller (:mod:`service.pipeline.batch_poller`) decides the wait once its batch ended: ``batch_done``
with the call's output line, or ``batch_failed``; the sweeper decides ``expired`` at the deadline.
Each resumes the task the ordinary way (its record produced again), and the step, run again, reads
the decision here: a line the step's schema accepts is its output, recorded and published by the
normal completion path; anything else (a failed, expired or cancelled batch, a line that is missing,
refused or invalid) sends the call online, with the task's attempts and the rest of its deadline.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from consumers.records import Record
from dedup.batches import Batches
from dedup.effects import decision_field
from dedup.ledger import Ledger
from service.agents.base import Agent, Previous, Step
from service.agents.tasks import Task
from service.core.batch_settings import BatchSettings
from service.core.errors import InvalidOutput
from service.llm.batch_api import request_line
from service.pipeline.base import LostFence, Parked, iso
from service.pipeline.calls import CallLoop
from service.pipeline.tools import source_of

CHAT_URL = "/v1/chat/completions"
QUEUED_PREFIX = "q:"  # the journal's mark of a call queued for a batch (with its group and custom id)

_journals: weakref.WeakKeyDictionary[Ledger, Batches] = weakref.WeakKeyDictionary()


def journal_of(ledger: Ledger) -> Batches:
    """The batch journal of ``ledger`` (its scripts registered once)."""
    found = _journals.get(ledger)
    if found is None:
        found = _journals[ledger] = Batches(ledger)
    return found


def wants_batch(settings: BatchSettings, agent: Agent[Any], task: Task) -> bool:
    """Whether the task's calls go through the batch lane."""
    if not settings.enabled:
        return False
    said = "priority" in task.event.model_fields_set
    if said and task.event.priority == "interactive":
        return False
    return agent.batch or (settings.priority and said and task.event.priority == "batch")


def group_name(endpoint: str, model: str) -> str:
    """The calls that may share a batch: one endpoint, one model."""
    return f"{endpoint}:{model}"


def custom_id(task_key: str, step: str) -> str:
    """The call's key in its batch: the work (task, step), never the attempt, so a call queued again
    after a crash is the same line; a digest, as task ids and step names may both hold any separator."""
    return "call-" + hashlib.sha256(json.dumps([task_key, step]).encode()).hexdigest()[:40]


def wait_until(settings: BatchSettings, now: datetime, deadline: datetime | None) -> datetime:
    """How long the call may wait for its batch: its share of the time the task has left, or the
    lane's longest wait; never past the deadline."""
    if deadline is None:
        return now + timedelta(seconds=settings.max_wait_s)
    left = (deadline - now).total_seconds()
    return now + timedelta(seconds=max(0.0, min(settings.max_wait_s, left * settings.deadline_share)))


def answer_of(decision: dict[str, Any]) -> dict[str, Any] | None:
    """The chat completion's body a ``batch_done`` decision carries (its line answered 200), or None."""
    if decision.get("decision") != "batch_done":
        return None
    line = decision.get("result")
    if not isinstance(line, dict) or line.get("status") != 200 or not isinstance(line.get("body"), dict):
        return None
    body: dict[str, Any] = line["body"]
    return body


async def batched(calls: CallLoop, task: Task, step: Step, task_input: BaseModel, previous: Previous, fence: int,
                  attempts: int, record: Record | None, answered: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The step's output from its batch; raises :class:`Parked` while the call waits for one; None:
    the call goes online (its batch ended without a valid answer, or it cannot wait)."""
    decision = (await calls.ledger.effects.journal(task.key)).get(decision_field("batch", step.name, 0))
    if isinstance(decision, dict):
        return _decided(calls, task, step, task_input, decision, answered)
    endpoint = calls.capacity.primary
    payload = getattr(endpoint.client, "payload", None)
    now = calls.clock()
    until = wait_until(calls.config.batch, now, task.deadline)
    if payload is None or record is None or until <= now:  # no Batch API, no record to resume, no time
        return None
    messages, schema, _ = calls.request_size(step, task_input, previous, attempts)
    body = payload(calls.request(task, step, messages, schema, None, False, endpoint, 0))
    group, key = group_name(endpoint.name, str(body.get("model", ""))), custom_id(task.key, step.name)
    queued = {"group": group, "custom_id": key, "at": iso(now)}
    status, _ = await calls.ledger.effects.first(task.key, fence, f"{QUEUED_PREFIX}{step.name}:0", queued,
                                                 source_of(record))
    if status == "stale":
        raise LostFence(f"task {task.key}: fence {fence} no longer holds the task")
    now_ms = int(now.timestamp() * 1000)
    await journal_of(calls.ledger).enqueue(group, key, task.key, step.name, request_line(key, CHAT_URL, body), now_ms)
    calls.metrics.batch_tasks.labels(state="queued").inc()
    raise Parked({"what": "batch", "step": step.name, "ordinal": 0, "key": key, "tool": "", "group": group,
                  "reason": f"its call waits for a batch of {group}", "since_ms": now_ms,
                  "deadline_ms": int(until.timestamp() * 1000)})


def _decided(calls: CallLoop, task: Task, step: Step, task_input: BaseModel, decision: dict[str, Any],
             answered: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The output a decided wait gives: its line's answer, valid for the step; else None (online)."""
    body = answer_of(decision)
    endpoint = calls.capacity.primary
    read = getattr(endpoint.client, "read_answer", None)
    if body is None or read is None:
        calls.metrics.batch_tasks.labels(state="online").inc()
        return None
    try:
        answer = read(body, task.kind)
        output: dict[str, Any] = step.parse(task_input, answer.content)
    except InvalidOutput:
        calls.metrics.batch_tasks.labels(state="invalid").inc()
        return None
    answered.append((endpoint.answers_as, answer.model))
    calls.metrics.batch_tasks.labels(state="done").inc()
    return output
