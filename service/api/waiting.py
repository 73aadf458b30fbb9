"""Answering when a task ends: ``POST /tasks?wait=`` and ``GET /tasks/{id}?wait=`` read the ledger
until the task is ``succeeded`` or ``dead`` (its outcome), or the wait runs out.

A task ``failed`` is not ended: it was released to be run again (a later record of it may
succeed). The ledger is read every :data:`POLL_S` seconds, so an answer comes at most that long
after the task ended; the outcome event on the results topic may land a moment later (it is
published after the ledger's write).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dedup.ledger import Ledger
from dedup.records import TaskRecord
from service.pipeline.parking import side_effects
from service.pipeline.tree import task_tree

ENDED = {"succeeded": "succeeded", "dead": "failed"}  # ledger state -> the task's outcome
MAX_WAIT_S = 120.0
POLL_S = 0.1


def outcome_of(state: str) -> str | None:
    """``succeeded`` or ``failed`` for a task that ended; None while it may still run."""
    return ENDED.get(state)


async def wait_ended(ledger: Ledger, task_id: str, wait_s: float) -> TaskRecord | None:
    """The task's record once it ended, or as it is when ``wait_s`` runs out (None: still unknown)."""
    deadline = time.monotonic() + min(wait_s, MAX_WAIT_S)
    while True:
        record = await ledger.get(task_id)
        if record is not None and record.state in ENDED:
            return record
        left = deadline - time.monotonic()
        if left <= 0:
            return record
        await asyncio.sleep(min(POLL_S, left))


async def view_of(ledger: Ledger, task_id: str, record: TaskRecord) -> dict[str, Any]:
    """What ``GET /tasks/{id}`` shows: the ledger record, its side effects and tree, its outcome."""
    return {**record.to_json(), **await side_effects(ledger, task_id),
            **await task_tree(ledger, task_id, record.fields), "outcome": outcome_of(record.state)}
