"""A delegating parent's side of the ledger: its plan, its wait, its children's replies, their cancel.

A step that hands work to other kinds journals its **plan** (``d:<step>`` in the parent's tools
hash: ``[{"n", "id", "kind", "topic"}]``, first writer wins, under the holder's fence), so a crash
re-sends the same child ids and a replay never plans anew. The parent then **parks**
(``running`` -> ``waiting_children``, listed in ``agent:parked`` by the wait's deadline) unless every
child of the plan has replied already (a child that finished before its parent parked): then the
answer is ``ended`` and the holder goes on at once. Each child's reply is **folded** once
(``k:<step>:<n>``, first writer wins); the fold that brings the last reply while the parent waits on
that step moves it to ``resuming`` (the parked table's ``children_ended`` -> ``decided``: still
listed until its record is produced again) and returns its source record, which the caller produces
again. A parent that ends dead **cancels** its children: a mark ``agent:{<child id>}:cancel``
that a claim of a child not started yet finds, and ends it ``dead(cancelled)`` without running
(:data:`dedup.scripts.CLAIM`).

The moves are the tables' (:data:`~dedup.lifecycles.task.TASK` through the ledger's moves,
:data:`~dedup.lifecycles.parked.PARKED`); the scripts are :mod:`dedup.children_scripts`. Beyond
docs/DELEGATION.md: :meth:`Children.plan` takes the record that carried the parent (``source``,
kept once as :mod:`dedup.effects` keeps it) for the last fold to return, and :meth:`Children.park`
fills the wait's ``what``, ``step``, ``fence`` and ``ordinal`` (0: its expiry is journaled at
``w:<step>:0``, :func:`dedup.effects.decision_field`) when the caller left them out.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from redis.commands.core import AsyncScript

from dedup import children_scripts
from dedup.client import RedisClient
from dedup.effects import PARK_MARGIN_S, listing_score
from dedup.errors import StaleFence
from dedup.keys import Keys, is_valid_task_key
from dedup.lifecycles.parked import PARKED, WAITING

T = TypeVar("T")

Parking = Literal["parked", "ended", "stale"]
Folding = Literal["folded", "again", "unplanned"]

__all__ = ["Children", "Folding", "Parking", "plan_field", "reply_field"]


class Moves(Protocol):
    def __call__(self, *events: str) -> list[str]: ...

    def sources(self, event: str) -> str: ...


class Ledger(Protocol):
    """What the children's side uses of :class:`dedup.ledger.Ledger`."""

    client: RedisClient
    keys: Keys

    @property
    def moves(self) -> Moves: ...

    async def redis_call(self, op: Callable[[], Awaitable[T]]) -> T: ...

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any: ...


def plan_field(step: str) -> str:
    """Where a step's plan is journaled in the tools hash."""
    return f"d:{step}"


def reply_field(step: str, n: int) -> str:
    """Where child ``n``'s folded reply is journaled in the tools hash."""
    return f"k:{step}:{n}"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _checked(plan: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The plan as journaled: each child's ``n`` (distinct), ``id`` (a valid task key), ``kind`` and
    ``topic``, and when it was planned (``planned_ms``, optional); ``ValueError`` otherwise."""
    out: list[dict[str, Any]] = []
    for child in plan:
        missing = {"n", "id", "kind", "topic"} - set(child)
        if missing:
            raise ValueError(f"a planned child lacks {sorted(missing)}")
        n, child_id = child["n"], child["id"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"a planned child's n must be a whole number from 0, not {n!r}")
        if not isinstance(child_id, str) or not is_valid_task_key(child_id):
            raise ValueError(f"a planned child's id is no valid task key: {str(child_id)[:80]!r}")
        entry = {"n": n, "id": child_id, "kind": str(child["kind"]), "topic": child["topic"]}
        planned = child.get("planned_ms")
        if planned is not None:
            if not isinstance(planned, int) or isinstance(planned, bool):
                raise ValueError(f"a planned child's planned_ms must be whole milliseconds, not {planned!r}")
            entry["planned_ms"] = planned
        out.append(entry)
    if len({c["n"] for c in out}) != len(out):
        raise ValueError("two planned children share an n")
    return out


class Children:
    """The children of a ledger's delegating tasks (its client, keys, moves and error translation)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        client = ledger.client
        self._plan = client.register_script(children_scripts.PLAN)
        self._park = client.register_script(children_scripts.PARK)
        self._fold = client.register_script(children_scripts.FOLD)

    async def plan(self, task_key: str, fence: int, step: str, plan: Sequence[Mapping[str, Any]], *,
                   source: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Journal the step's plan under the holder's ``fence``, unless one is journaled: returns
        what is. ``source`` (the record that carried the task) is kept once, for the fold that ends
        the wait to return. :class:`StaleFence` when ``fence`` does not hold the task."""
        return (await self.plan_once(task_key, fence, step, plan, source=source))[1]

    async def plan_once(self, task_key: str, fence: int, step: str, plan: Sequence[Mapping[str, Any]], *,
                        source: Mapping[str, Any] | None = None) -> tuple[bool, list[dict[str, Any]]]:
        """:meth:`plan`, and whether this call journaled it (False: a plan was journaled before)."""
        keys = self.ledger.keys
        held = self.ledger.moves.sources("park_children")  # a holder plans where it may park from
        raw = await self.ledger.run_script(self._plan, [keys.task(task_key), keys.tools(task_key)], [
            fence, step, _dumps(_checked(plan)), _dumps(source) if source is not None else "", held])
        if _s(raw[0]) == "stale":
            raise StaleFence(f"task {task_key}: the plan of step {step} refused for fence {fence}")
        recorded: list[dict[str, Any]] = json.loads(_s(raw[1]))
        return _s(raw[0]) == "ok", recorded

    async def outcomes(self, task_key: str, step: str) -> dict[int, dict[str, Any]]:
        """The step's folded replies, by child ``n``."""
        raw = await self.ledger.redis_call(lambda: self.ledger.client.hgetall(self.ledger.keys.tools(task_key)))
        prefix = reply_field(step, 0)[:-1]
        out: dict[int, dict[str, Any]] = {}
        for name, value in raw.items():
            field = _s(name)
            if field.startswith(prefix) and field[len(prefix):].isdigit():
                out[int(field[len(prefix):])] = json.loads(_s(value))
        return dict(sorted(out.items()))

    async def park(self, task_key: str, fence: int, step: str, waiting: Mapping[str, Any]) -> Parking:
        """Park the holder's task until every child of the step's plan has replied: ``parked``
        (``waiting_children``, listed in ``agent:parked`` at ``waiting["deadline_ms"]``), ``ended``
        (they all have: the task stays running, the holder goes on), ``stale`` (``fence`` does not
        hold it running). ``ValueError`` when the step has no plan journaled.

        Its keys are kept until its deadline and :data:`~dedup.effects.PARK_MARGIN_S` after."""
        event = "park_children"
        PARKED.transition(PARKED.initial, event)  # the parked table lists the move
        wait = {"what": "children", "step": step, "fence": fence, "ordinal": 0, **waiting}
        if wait["what"] != "children" or wait["step"] != step:
            raise ValueError(f"a wait for the children of {step} says it waits for {wait['what']} of {wait['step']}")
        deadline = float(wait["deadline_ms"])
        keep_s = math.ceil(max(0.0, deadline - float(wait.get("since_ms", deadline))) / 1000) + PARK_MARGIN_S
        keys = self.ledger.keys
        parked = keys.parked()
        # listed first (as dedup.effects parks): a listed task that is not waiting is dropped by the
        # sweeper; a waiting task not listed would never expire
        score = listing_score(deadline, fence)
        await self.ledger.redis_call(lambda: self.ledger.client.zadd(parked, {task_key: score}))
        raw = await self.ledger.run_script(self._park, [
            keys.task(task_key), keys.steps(task_key), keys.tools(task_key), keys.audit(task_key)], [
            fence, step, _dumps(wait), keep_s, *self.ledger.moves(event)])
        answer = _s(raw)
        if answer == "parked":
            return "parked"
        if answer == "ended":  # the holder goes on: no wait to list (it holds the task: none listed since)
            await self.ledger.redis_call(lambda: self.ledger.client.zrem(parked, task_key))
            return "ended"
        if answer == "unplanned":
            raise ValueError(f"task {task_key}: step {step} has no plan journaled to wait for")
        return "stale"  # another holds it, or it is parked: its listing is the sweeper's to drop

    async def fold(self, parent_key: str, step: str, n: int, reply: Mapping[str, Any]) -> tuple[Folding, str]:
        """Fold child ``n``'s reply into the parent, once: ``folded`` (first), ``again`` (a reply was
        folded before: it stands), ``unplanned`` (no child ``n`` with the reply's ``task_id`` in the
        step's plan: nothing written). With the source record (JSON) of the parent when this fold
        ended its wait (``waiting_children`` -> ``resuming``, still listed until the caller produces
        the record again and unlists it), else ``""``."""
        PARKED.transition(WAITING["children"], "children_ended")  # the parked table lists the move
        keys = self.ledger.keys
        raw = await self.ledger.run_script(self._fold, [keys.task(parent_key), keys.tools(parent_key)], [
            step, int(n), str(reply.get("task_id", "")), _dumps(dict(reply)), *self.ledger.moves("children_ended")])
        status: Folding = _s(raw[0])  # type: ignore[assignment]
        return status, _s(raw[1])

    async def cancel(self, child_ids: Iterable[str], reason: str, ttl_s: int) -> None:
        """Mark each child cancelled for ``ttl_s`` (one call per child: children live in other
        slots). A child not started yet ends ``dead(cancelled)`` when claimed; one running finishes."""
        client, keys = self.ledger.client, self.ledger.keys

        async def mark(child_id: str) -> None:
            key = keys.cancel(child_id)
            await self.ledger.redis_call(lambda: client.set(key, reason[:500], ex=max(1, int(ttl_s))))

        await asyncio.gather(*(mark(child_id) for child_id in child_ids))
