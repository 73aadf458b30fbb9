"""A task's place in its delegation tree, as ``task show``, ``GET /tasks/{id}`` and the console show it.

``parent``: the task that delegated it (``parent``, ``parent_step``, ``parent_n`` in its ledger
hash, kept by the child's first claim from its headers, wherever the parent's own ledger is; else
the task of this ledger whose journaled plan holds its id), or None for a root. ``children``: each delegating step's plan (``d:<step>`` in the
task's tools hash), in declared order, each child with its state: the reply folded into the parent
when there is one (``succeeded`` or ``dead``, with its result or reason), else the child's own state
in the ledger (``running``, ``waiting_children``...), or ``pending`` when no worker has claimed it yet.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger
from service.pipeline.delegation import place_of

__all__ = ["PLAN_PREFIX", "parent_of", "planned_parent", "task_tree"]

PLAN_PREFIX = "d:"
_CHILD_FIELDS = ("n", "id", "kind", "topic")


def parent_of(fields: dict[str, str]) -> dict[str, Any] | None:
    """The task's parent as its ledger hash's fields name it, or None."""
    parent = fields.get("parent")
    if not parent:
        return None
    named: dict[str, Any] = {"id": parent, "step": fields.get("parent_step") or None}
    n = place_of(fields.get("parent_n"))
    if n is not None:
        named["n"] = n
    return named


def _candidates(task_key: str) -> list[tuple[str, str]]:
    """The (parent, step) a child id ``<parent>/<step>/<n>`` or ``<parent>/g<g>/<step>/<n>`` may name."""
    parts = task_key.split("/")
    if len(parts) < 3 or place_of(parts[-1]) is None:
        return []
    found = [("/".join(parts[:-2]), parts[-2])]
    if len(parts) >= 4 and re.fullmatch(r"g[0-9]+", parts[-3]):
        found.append(("/".join(parts[:-3]), parts[-2]))
    return found


async def planned_parent(ledger: Ledger, task_key: str) -> dict[str, Any] | None:
    """The parent whose journaled plan holds ``task_key`` as a child (a child whose parent is in this
    ledger, when its own hash does not name it), or None."""
    for parent, step in _candidates(task_key):
        if not parent or not is_valid_task_key(parent):
            continue
        plan = _plans(await ledger.effects.journal(parent)).get(step, [])
        if any(entry.get("id") == task_key for entry in plan):
            return {"id": parent, "step": step}
    return None


def _plans(journal: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each delegating step's plan, by step, in the order the steps' plans are stored."""
    plans: dict[str, list[dict[str, Any]]] = {}
    for name, raw in journal.items():
        if not name.startswith(PLAN_PREFIX):
            continue
        plan = json.loads(raw) if isinstance(raw, str) else raw
        if isinstance(plan, list):
            plans[name[len(PLAN_PREFIX):]] = [e for e in plan if isinstance(e, dict)]
    return plans


async def _child(ledger: Ledger, step: str, entry: dict[str, Any], folded: dict[str, Any] | None) -> dict[str, Any]:
    child: dict[str, Any] = {"step": step, **{k: entry.get(k) for k in _CHILD_FIELDS}}
    if folded is not None:
        child["state"] = folded.get("state")
        for name in ("result", "reason", "error"):
            if name in folded:
                child[name] = folded[name]
        return child
    child_id = entry.get("id")
    record = await ledger.get(child_id) if isinstance(child_id, str) and is_valid_task_key(child_id) else None
    child["state"] = record.state if record is not None else "pending"
    return child


async def task_tree(ledger: Ledger, task_key: str, fields: dict[str, str]) -> dict[str, Any]:
    """``{"parent": {...} | None, "children": [...]}`` of the task whose hash holds ``fields``."""
    plans = _plans(await ledger.effects.journal(task_key))
    children: list[dict[str, Any]] = []
    for step, plan in plans.items():
        folded = await ledger.children.outcomes(task_key, step)
        children += await asyncio.gather(*(_child(ledger, step, entry, folded.get(int(entry.get("n", -1))))
                                           for entry in plan))
    return {"parent": parent_of(fields) or await planned_parent(ledger, task_key), "children": children}
