"""Every move of a task's table made through the real Ledger on a real redis-server, every move the
table does not list refused (the task left as it was), a table without a move refusing it, and a
task stored by the previous version (one field ``published``) read by this one. A claimed task
plans one child (``<key>/s/0``) for the moves of a parent waiting for its children."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from dedup.lifecycles import Lifecycle
from dedup.lifecycles.task import DEAD, SUCCEEDED, TASK

pytestmark = pytest.mark.integration

FP = "sha256:aaa"
LEASE_MS = 1000


@dataclass
class Task:
    """One task driven through the table: its key, the fence it is held under, its generation."""

    ledger: Ledger
    key: str
    fence: int = 0
    generation: int = 1
    waiting: dict[str, Any] = field(default_factory=dict)

    async def state(self) -> str:
        stored = await self.ledger.get(self.key)
        return stored.state if stored is not None else TASK.initial

    async def claim(self) -> bool:
        claim = await self.ledger.claim(self.key, FP, "w1", "classify")
        if claim.decision != "claimed":
            return False
        self.fence = claim.fence
        # the record that carried the task, for a rerun to produce again
        await self.ledger.effects.first(self.key, self.fence, "r:s:0", {"calls": []}, source={"topic": "t"})
        await self.ledger.children.plan(self.key, self.fence, "s", [self.child])
        return True

    @property
    def child(self) -> dict[str, Any]:
        return {"n": 0, "id": f"{self.key}/s/0", "kind": "research", "topic": "t"}

    async def cancel(self) -> bool:
        """A child whose parent cancelled it before it started: its claim ends it, unrun."""
        await self.ledger.children.cancel([self.key], "the parent was rejected", 60)
        claim = await self.ledger.claim(self.key, FP, "w1", "classify")
        return claim.decision == "cancelled"

    async def park_children(self) -> bool:
        now = time.time() * 1000
        self.waiting = {"what": "children", "step": "s", "since_ms": now, "deadline_ms": now + 60_000,
                        "reason": "waiting for 1 child", "fence": self.fence, "pending": [0]}
        return await self.ledger.children.park(self.key, self.fence, "s", self.waiting) == "parked"

    async def children_ended(self) -> bool:
        """The child's reply folded (a second time from a task it resumed already): resumed with its record."""
        reply = {"parent": self.key, "step": "s", "n": 0, "task_id": self.child["id"], "kind": "research",
                 "state": "succeeded", "result": {}}
        status, source = await self.ledger.children.fold(self.key, "s", 0, reply)
        return status != "unplanned" and source != ""

    async def take_over(self) -> bool:
        await asyncio.sleep(LEASE_MS * 1.2 / 1000)
        return await self.claim()

    async def crash(self) -> bool:
        await self.ledger.begin_attempt(self.key, self.fence, "s", 3)  # a call under way
        await asyncio.sleep(LEASE_MS * 1.2 / 1000)
        # another process (its own ledger: another holder), for which one death is the last
        other = Ledger(self.ledger.client, keys=self.ledger.keys, lease_ms=LEASE_MS, ttl_s=600, max_deaths=1)
        return (await other.claim(self.key, FP, "w2", "classify")).decision == "crashed"

    async def complete(self) -> bool:
        done = await self.ledger.complete(self.key, self.fence, result='{"a":1}', digest="d", event=b'{"a":1}',
                                          model="m", prompt_version="p1")
        return done.status == "ok"

    async def fail(self) -> bool:
        return await self.ledger.fail(self.key, self.fence, "boom")

    async def die(self) -> bool:
        return await self.ledger.fail(self.key, self.fence, "boom", "permanent")

    async def expire(self) -> bool:
        status, fence = await self.ledger.expire(self.key, self.fence, "past its deadline")
        if status == "ok":
            self.fence = fence
        return status == "ok"

    async def park(self) -> bool:
        now = time.time() * 1000
        self.waiting = {"what": "approval", "step": "s", "ordinal": 0, "since_ms": now, "deadline_ms": now + 60_000}
        return await self.ledger.effects.park(self.key, self.fence, self.waiting)

    async def decide(self) -> bool:
        stored = await self.ledger.get(self.key)
        raw = stored.fields.get("waiting") if stored is not None else None
        if raw is None:  # not waiting: ask with the wait this task would have had
            raw = json.dumps({"what": "approval", "step": "s", "ordinal": 0, "since_ms": 0, "deadline_ms": 1})
        # a person approves a call; a wait for children is decided by its deadline only (the sweeper)
        decision = "expired" if json.loads(raw)["what"] == "children" else "approved"
        status, _source = await self.ledger.effects.resolve(self.key, raw, {"decision": decision}, {})
        return status == "ok"

    async def publish(self) -> bool:
        return await self.ledger.mark_published(self.key, await self.state(), "t[0]@7", "acked")

    async def revive(self) -> bool:
        return await self.ledger.revive(self.key)

    async def rerun(self) -> bool:
        status, _source = await self.ledger.effects.rerun(self.key, self.generation)
        if status == "ok":
            self.generation += 1
        return status == "ok"

    def do(self, event: str) -> Callable[[], Awaitable[bool]]:
        method: Callable[[], Awaitable[bool]] = getattr(self, event)
        return method


def path_to(state: str) -> list[str]:
    """The shortest list of events that leads a new task to ``state`` (moves in table order), through
    a claim: a task cancelled before it ran has no journal (nothing to rerun)."""
    paths: dict[str, list[str]] = {TASK.initial: []}
    queue = deque([TASK.initial])
    while queue:
        at = queue.popleft()
        for t in TASK.transitions:
            if t.source == at and t.target not in paths and t.event != "cancel":
                paths[t.target] = [*paths[at], t.event]
                queue.append(t.target)
    return paths[state]


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"t{uuid.uuid4().hex[:8]}"), lease_ms=LEASE_MS, ttl_s=600, **kwargs))
        finally:
            await close(client)

    asyncio.run(main())


async def driven_to(ledger: Ledger, state: str) -> Task:
    task = Task(ledger, f"k{uuid.uuid4().hex[:10]}")
    for event in path_to(state):
        assert await task.do(event)(), f"{event} on the way to {state}"
    assert await task.state() == state
    return task


def test_every_transition_of_the_table_is_made_by_the_ledger(redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        for t in TASK.transitions:
            task = await driven_to(ledger, t.source)
            assert await task.do(t.event)(), f"{t.event} from {t.source} refused"
            assert await task.state() == t.target, f"{t.event} from {t.source}"
            stored = await ledger.get(task.key)
            assert stored is not None
            if t.event == "publish":
                assert (stored.published_by, stored.published_how) == ("t[0]@7", "acked")
            if t.target in (SUCCEEDED, DEAD) and t.event != "publish":  # a new outcome: not published yet
                assert stored.published_by is None and not {"published", "published_by"} & set(stored.fields)

    with_ledger(redis_url, body)


REFUSABLE = ("claim", "complete", "fail", "die", "expire", "park", "decide", "publish", "revive", "rerun",
             "park_children", "children_ended", "cancel")


def test_every_move_the_table_does_not_list_is_refused(redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        refused = 0
        for state in TASK.states:
            for event in REFUSABLE:
                if TASK.allows(state, event):
                    continue
                task = await driven_to(ledger, state)
                before = await ledger.get(task.key)
                assert not await task.do(event)(), f"{event} from {state} was made"
                after = await ledger.get(task.key)
                assert before is not None and after is not None
                if event == "cancel":  # the mark is read by a claim, whose own moves go on: never a cancel
                    assert after.fields.get("dead_reason") == before.fields.get("dead_reason"), state
                    assert after.attempts == before.attempts
                else:
                    assert (after.state, after.fence) == (before.state, before.fence), f"{event} from {state}"
                refused += 1
        assert refused >= 60  # e.g. complete on a dead task, park on a succeeded one, revive a running one

    with_ledger(redis_url, body)


def test_a_move_the_ledgers_table_leaves_out_is_refused(redis_url: str) -> None:
    without_revive = Lifecycle(TASK.name, TASK.initial, TASK.states,
                               tuple(t for t in TASK.transitions if t.event != "revive"), TASK.final)
    without_claim_of_failed = Lifecycle(TASK.name, TASK.initial, TASK.states,
                                        tuple(t for t in TASK.transitions
                                              if (t.source, t.event) != ("failed", "claim")), TASK.final)

    async def body(ledger: Ledger) -> None:
        dead = await driven_to(ledger, DEAD)
        strict = Ledger(ledger.client, keys=ledger.keys, lease_ms=LEASE_MS, ttl_s=600, lifecycle=without_revive)
        assert not await strict.revive(dead.key)
        assert await dead.state() == DEAD
        assert await ledger.revive(dead.key)  # the service's table has it
        other = Ledger(ledger.client, keys=ledger.keys, lease_ms=LEASE_MS, ttl_s=600,
                       lifecycle=without_claim_of_failed)
        claim = await other.claim(dead.key, FP, "w1", "classify")
        assert str(claim.decision) == "failed" and await dead.state() == "failed"  # answered, not moved
        assert (await ledger.claim(dead.key, FP, "w1", "classify")).decision == "claimed"

    with_ledger(redis_url, body)


def _previous_version(state: str, published: str) -> dict[Any, str | int]:
    """A task hash as the previous version's scripts left it (CLAIM, COMPLETE, PUBLISHED)."""
    now = int(time.time() * 1000)
    fields: dict[Any, str | int] = {"state": state, "fence": 1, "owner": "w1", "lease_until": 0, "fingerprint": FP,
                              "kind": "classify", "attempts": 1, "claims": 1, "published": published,
                              "created_at": now, "updated_at": now, "holder": "old", "attempts:s": 1}
    if state == SUCCEEDED:
        fields.update(result='{"a":1}', result_digest="d", event='{"a":1}', model="m", prompt_version="p1",
                      completed_at=now)
    return fields


def test_a_task_stored_by_the_previous_version_is_read_by_this_one(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        client, keys = ledger.client, ledger.keys
        for key, state, published in (("by-record", SUCCEEDED, "t[0]@3"), ("by-one", DEAD, "1"),
                                      ("not", SUCCEEDED, "0"), ("failed", "failed", "0")):
            await client.hset(keys.task(key), mapping=_previous_version(state, published))

        claim = await ledger.claim("by-record", FP, "w2", "classify")
        assert (claim.decision, claim.published, claim.published_by, claim.published_how) == (
            "succeeded", True, "t[0]@3", None)
        stored = await ledger.get("by-record")
        assert stored is not None and stored.published and stored.published_by == "t[0]@3"
        assert stored.to_json()["published"] is True and stored.to_json()["published_by"] == "t[0]@3"
        assert (await ledger.claim("by-one", FP, "w2", "classify")).published_by == "1"
        not_yet = await ledger.claim("not", FP, "w2", "classify")
        assert not_yet.decision == "succeeded" and not not_yet.published and not_yet.published_by is None
        # the replay screen's batch read: done, published by another record than the one asking
        assert await ledger.finished([("by-record", FP, ""), ("by-record", FP, "t[0]@3"), ("by-one", FP, "t[0]@3"),
                                      ("not", FP, ""), ("failed", FP, "")]) == [True, False, True, False, False]

        # marked by this version: the two fields, and the previous version's one with the same value,
        # which its workers read during a rolling upgrade (their CLAIM: published unless '0' or absent)
        assert await ledger.mark_published("not", SUCCEEDED, "t[0]@5", "staged")
        marked = await ledger.get("not")
        assert marked is not None
        fields = marked.fields
        assert (fields["published_by"], fields["published_how"]) == ("t[0]@5", "staged")
        assert fields["published"] == "t[0]@5"
        assert (marked.published_by, marked.published_how) == ("t[0]@5", "staged")
        assert await ledger.finished([("not", FP, "t[0]@5"), ("not", FP, "t[0]@9")]) == [False, True]
        # a previous version's worker writing after it (a rolling upgrade): its field is the newer
        await client.hset(keys.task("not"), "published", "0")
        assert not (await ledger.claim("not", FP, "w2", "classify")).published
        assert await ledger.finished([("not", FP, "")]) == [False]
        await client.hset(keys.task("not"), "published", "t[0]@9")  # and one publishing it again
        again = await ledger.claim("not", FP, "w2", "classify")
        assert (again.published_by, again.published_how) == ("t[0]@9", None)

        # a task the previous version released runs on, and its new outcome starts unpublished
        claimed = await ledger.claim("failed", FP, "w2", "classify")
        assert (claimed.decision, claimed.fence, claimed.attempts) == ("claimed", 2, 1)
        assert (await ledger.complete("failed", 2, result="{}", digest="d", event=b"{}", model="m",
                                      prompt_version="p1")).status == "ok"
        stored = await ledger.get("failed")
        assert stored is not None and stored.state == SUCCEEDED and not stored.published
        assert not {"published", "published_by", "published_how"} & set(stored.fields)
        assert await ledger.mark_published("failed", SUCCEEDED, "t[1]@2")  # how not said: not guessed
        stored = await ledger.get("failed")
        assert stored is not None and (stored.published_by, stored.published_how) == ("t[1]@2", None)

    with_ledger(any_redis_url, body)
