"""An in-memory stand-in for the part of the ledger that one run of a step graph uses, for
:mod:`service.sdk.testing` only: a task claimed once, its attempts counted per step, its steps
journaled, its tool calls journaled with their audit entries.

The operations behave as the Redis ledger's scripts do (``dedup/scripts.py``: ATTEMPT, REFUND,
END, STEP, HEARTBEAT; ``dedup/effects.py``: FIRST, DONE) for one process and one holder, with no
lease that runs out, no TTL and no concurrency beyond one event loop;
``tests/integration/test_memory_ledger.py`` runs the same calls against both and compares.
Nothing else of :class:`dedup.ledger.Ledger` is here: a call of anything else is an
:class:`AttributeError`, so a pipeline path that needs more cannot pass silently.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from dedup.effects import JOURNAL_STATE
from dedup.errors import AttemptsExhausted, StaleFence
from dedup.lifecycles import IllegalTransition
from dedup.lifecycles.tool_call import OUTCOME_EVENT, TOOL_CALL
from dedup.records import Attempt


@dataclass
class _TaskState:
    state: str = "running"
    fence: int = 1
    attempts: int = 0
    step_attempts: dict[str, int] = field(default_factory=dict)
    open: set[str] = field(default_factory=set)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0


class MemoryEffects:
    """The tool-call journal of a :class:`MemoryLedger` (``first``, ``done``, ``journal``, ``audit``)."""

    def __init__(self, ledger: MemoryLedger) -> None:
        self.ledger = ledger

    async def first(self, task_key: str, fence: int, field: str, value: dict[str, Any],
                    source: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Record ``value`` at ``field`` unless something is there: ('ok'|'had', what is recorded),
        or ('stale', {}) when the fence does not hold the task."""
        task = self.ledger.held(task_key, fence)
        if task is None:
            return "stale", {}
        if field in task.tools:
            return "had", copy.deepcopy(task.tools[field])
        recorded = copy.deepcopy(value)
        if field.startswith("c:"):  # the journal counts its calls, as the Redis hash does (field ``seq``)
            task.seq += 1
            recorded["seq"] = task.seq
            task.tools["seq"] = str(task.seq)
        task.tools[field] = recorded
        if source is not None:
            task.tools.setdefault("source", copy.deepcopy(source))
        return "ok", copy.deepcopy(recorded)

    async def done(self, task_key: str, fence: int, field: str, record: dict[str, Any],
                   audit: dict[str, Any]) -> bool:
        """Record a call's result and append its audit entry (always, with ``accepted``); False: stale;
        :class:`IllegalTransition` when the call is in no state its outcome may follow."""
        event = OUTCOME_EVENT[str(record.get("outcome"))]
        sources = {JOURNAL_STATE[s] for s in TOOL_CALL.sources(event) if s in JOURNAL_STATE}
        task = self.ledger.tasks.setdefault(task_key, _TaskState(state="", fence=0))
        had = task.tools.get(field)
        was = had["state"] if isinstance(had, dict) else ""
        held = task.state == "running" and task.fence == fence
        allowed = was in sources
        task.audit.append({**copy.deepcopy(audit), "accepted": held and allowed})
        if not held:
            return False
        if not allowed:
            raise IllegalTransition(TOOL_CALL.name, f"the record at {field}", event)
        task.tools[field] = copy.deepcopy(record)
        return True

    async def journal(self, task_key: str) -> dict[str, Any]:
        task = self.ledger.tasks.get(task_key)
        return copy.deepcopy(task.tools) if task is not None else {}

    async def audit(self, task_key: str, start: int = 0) -> list[dict[str, Any]]:
        task = self.ledger.tasks.get(task_key)
        return copy.deepcopy(task.audit[start:]) if task is not None else []


class MemoryLedger:
    """See the module docstring. :meth:`claim` starts a task running under fence 1."""

    def __init__(self) -> None:
        self.tasks: dict[str, _TaskState] = {}
        self.effects = MemoryEffects(self)

    def claim(self, task_key: str) -> int:
        """The task running under a fence one higher than any before (1 for a new task); its fence."""
        task = self.tasks.setdefault(task_key, _TaskState(fence=0))
        task.state, task.fence = "running", task.fence + 1
        task.open.clear()
        return task.fence

    def held(self, task_key: str, fence: int) -> _TaskState | None:
        """The task when ``fence`` holds it running, else None."""
        task = self.tasks.get(task_key)
        return task if task is not None and task.state == "running" and task.fence == fence else None

    def step_attempts(self, task_key: str, step: str) -> int:
        """The attempts counted for ``step`` of the task."""
        task = self.tasks.get(task_key)
        return task.step_attempts.get(step, 0) if task is not None else 0

    async def heartbeat(self, task_key: str, fence: int) -> bool:
        return self.held(task_key, fence) is not None

    async def begin_attempt(self, task_key: str, fence: int, step: str, max_attempts: int) -> Attempt:
        task = self.held(task_key, fence)
        if task is None:
            raise StaleFence(f"task {task_key}: fence {fence} no longer holds the task")
        if task.step_attempts.get(step, 0) >= max_attempts:
            raise AttemptsExhausted(task.attempts)
        task.open.add(step)
        task.attempts += 1
        task.step_attempts[step] = task.step_attempts.get(step, 0) + 1
        return Attempt(step=task.step_attempts[step], total=task.attempts)

    async def refund_attempt(self, task_key: str, fence: int, step: str) -> bool:
        task = self.held(task_key, fence)
        if task is None:
            return False
        if step not in task.open:
            return True  # given back already (or never counted): never twice
        task.open.discard(step)
        if task.step_attempts.get(step, 0) > 0:
            task.step_attempts[step] -= 1
        task.attempts = max(0, task.attempts - 1)
        return True

    async def end_attempt(self, task_key: str, fence: int, step: str) -> bool:
        task = self.held(task_key, fence)
        if task is None:
            return False
        task.open.discard(step)
        return True

    async def record_step(self, task_key: str, fence: int, name: str, record: dict[str, Any]) -> None:
        task = self.held(task_key, fence)
        if task is None:
            raise StaleFence(f"task {task_key}: step {name} refused for fence {fence}")
        task.open.discard(name)
        task.steps[name] = copy.deepcopy(record)

    async def generation(self, task_key: str) -> int:
        return 1

    async def steps(self, task_key: str) -> dict[str, dict[str, Any]]:
        task = self.tasks.get(task_key)
        return copy.deepcopy(task.steps) if task is not None else {}
