"""A delegating parent's side of the ledger (``ledger.children``) on a real Redis, one server and a
cluster: its plan journaled once, its wait (listed by deadline, answered ``parked`` to a claim),
its children's replies folded once each in any order, the last one resuming it with its record,
a reply folded before the parent parked (``ended``), and a cancelled child that never runs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.effects import listing_score
from dedup.errors import StaleFence
from dedup.keys import Keys
from dedup.ledger import Ledger
from dedup.lifecycles import Lifecycle
from dedup.lifecycles.task import TASK

pytestmark = pytest.mark.integration

FP = "sha256:parent"
SOURCE = {"topic": "tasks", "partition": 0, "offset": 7, "key": None, "value": "e30=", "headers": []}


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"c{uuid.uuid4().hex[:8]}"), ttl_s=600, **kwargs))
        finally:
            await close(client)

    asyncio.run(main())


def plan_of(parent: str, count: int, step: str = "gather") -> list[dict[str, Any]]:
    return [{"n": n, "id": f"{parent}/{step}/{n}", "kind": f"kind{n}", "topic": "tasks"} for n in range(count)]


def reply(parent: str, n: int, step: str = "gather", state: str = "succeeded") -> dict[str, Any]:
    out: dict[str, Any] = {"parent": parent, "step": step, "n": n, "task_id": f"{parent}/{step}/{n}",
                           "kind": f"kind{n}", "state": state}
    if state == "succeeded":
        out["result"] = {"answer": n}
    else:
        out.update(reason="expired", error="past its deadline")
    return out


def waiting(step: str = "gather", pending: list[int] | None = None, wait_ms: int = 60_000) -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {"what": "children", "step": step, "since_ms": now, "deadline_ms": now + wait_ms,
            "reason": "waiting for its children", "pending": pending or []}


async def planned(ledger: Ledger, count: int, step: str = "gather") -> tuple[str, int]:
    """A claimed parent with its plan journaled: (its key, its fence)."""
    parent = f"p{uuid.uuid4().hex[:10]}"
    claim = await ledger.claim(parent, FP, "w1", "orchestrate")
    assert claim.decision == "claimed"
    await ledger.children.plan(parent, claim.fence, step, plan_of(parent, count, step), source=SOURCE)
    return parent, claim.fence


async def state(ledger: Ledger, key: str) -> str:
    stored = await ledger.get(key)
    return stored.state if stored is not None else "new"


def test_a_plan_is_journaled_once_under_the_holders_fence(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        parent, fence = await planned(ledger, 2)
        children = ledger.children
        # a replay plans again (another list, even): what was journaled first stands
        assert await children.plan(parent, fence, "gather", plan_of(parent, 3)) == plan_of(parent, 2)
        with pytest.raises(StaleFence):
            await children.plan(parent, fence + 1, "other", plan_of(parent, 1, "other"))
        assert await children.outcomes(parent, "other") == {}
        journal = await ledger.effects.journal(parent)
        assert journal["source"] == SOURCE and "d:other" not in journal
        # a taken-over parent's new holder plans under its own fence; the old one is refused
        await ledger.fail(parent, fence, "released")
        again = await ledger.claim(parent, FP, "w2", "orchestrate")
        assert await children.plan(parent, again.fence, "gather", plan_of(parent, 2)) == plan_of(parent, 2)
        with pytest.raises(StaleFence):
            await children.plan(parent, fence, "late", plan_of(parent, 1, "late"))
        for bad in ([{"n": 0, "id": "a b", "kind": "k", "topic": "t"}], [{"n": 0, "id": "x", "kind": "k"}],
                    [{"n": 0, "id": "x", "kind": "k", "topic": "t"}, {"n": 0, "id": "y", "kind": "k", "topic": "t"}]):
            with pytest.raises(ValueError):
                await children.plan(parent, again.fence, "bad", bad)

    with_ledger(any_redis_url, body)


def test_a_parent_waits_listed_and_its_last_childs_reply_resumes_it(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        children = ledger.children
        parent, fence = await planned(ledger, 3)
        wait = waiting(pending=[0, 1, 2])
        assert await children.park(parent, fence, "gather", wait) == "parked"
        stored = await ledger.get(parent)
        assert stored is not None and stored.state == "waiting_children"
        shown = json.loads(stored.fields["waiting"])
        assert {k: shown[k] for k in wait} == wait and shown["fence"] == fence
        assert await ledger.effects.listed_at(parent) == listing_score(wait["deadline_ms"], fence)
        assert (await ledger.claim(parent, FP, "w2", "orchestrate")).decision == "parked"
        assert await ledger.renew(parent, fence) == "done"  # parked by its holder: nothing lost
        # replies in reverse order, one of them twice, and replies nobody planned
        assert await children.fold(parent, "gather", 2, reply(parent, 2)) == ("folded", "")
        assert await children.fold(parent, "gather", 2, reply(parent, 2, state="dead")) == ("again", "")
        assert await children.fold(parent, "gather", 1, reply(parent, 1, state="dead")) == ("folded", "")
        assert await children.fold(parent, "gather", 7, reply(parent, 7)) == ("unplanned", "")
        assert await children.fold(parent, "other", 0, reply(parent, 0, "other")) == ("unplanned", "")
        stale_generation = {**reply(parent, 0), "task_id": f"{parent}/g2/gather/0"}
        assert await children.fold(parent, "gather", 0, stale_generation) == ("unplanned", "")
        assert await state(ledger, parent) == "waiting_children"
        status, source = await children.fold(parent, "gather", 0, reply(parent, 0))
        assert status == "folded" and json.loads(source) == SOURCE
        assert await state(ledger, parent) == "resuming"
        assert await ledger.effects.listed_at(parent) is not None  # the caller unlists once it resumed it
        assert await children.fold(parent, "gather", 0, reply(parent, 0)) == ("again", "")
        outcomes = await children.outcomes(parent, "gather")
        assert sorted(outcomes) == [0, 1, 2]
        assert outcomes[1] == reply(parent, 1, state="dead") and outcomes[2] == reply(parent, 2)
        claim = await ledger.claim(parent, FP, "w2", "orchestrate")
        assert (claim.decision, claim.fence) == ("claimed", fence + 1)
        # resumed and running: every reply is in, so the holder goes on at once
        assert await children.park(parent, claim.fence, "gather", waiting()) == "ended"
        assert await state(ledger, parent) == "running" and await ledger.effects.listed_at(parent) is None

    with_ledger(any_redis_url, body)


def test_replies_folded_before_the_parent_parks_end_its_wait_at_once(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        children = ledger.children
        parent, fence = await planned(ledger, 2)
        assert await children.fold(parent, "gather", 0, reply(parent, 0)) == ("folded", "")
        assert await children.park(parent, fence, "gather", waiting(pending=[1])) == "parked"
        status, source = await children.fold(parent, "gather", 1, reply(parent, 1))
        assert status == "folded" and json.loads(source) == SOURCE
        # both came before it parked: it never waits
        other, other_fence = await planned(ledger, 2)
        for n in (1, 0):
            assert await children.fold(other, "gather", n, reply(other, n)) == ("folded", "")
        assert await children.park(other, other_fence, "gather", waiting()) == "ended"
        assert await state(ledger, other) == "running" and await ledger.effects.listed_at(other) is None
        # a step that delegates to nobody has nothing to wait for
        none, none_fence = await planned(ledger, 0, "empty")
        assert await children.park(none, none_fence, "empty", waiting("empty")) == "ended"
        # a step that planned nothing cannot wait
        with pytest.raises(ValueError):
            await children.park(none, none_fence, "unplanned", waiting("unplanned"))

    with_ledger(any_redis_url, body)


def test_a_parent_parked_again_with_its_fixed_deadline_stays_listed_when_its_first_wait_ends(
        any_redis_url: str) -> None:
    """The resumption of the first wait unlists the listing it read before the fold; a parent that
    ran on and parked for its next step meanwhile, with the same deadline, is listed at another
    score and stays listed (else the sweeper could never expire its second wait)."""
    async def body(ledger: Ledger) -> None:
        children = ledger.children
        parent, fence = await planned(ledger, 1)
        wait = waiting(pending=[0])
        assert await children.park(parent, fence, "gather", wait) == "parked"
        listed_before_fold = await ledger.effects.listed_at(parent)
        assert listed_before_fold is not None
        status, _source = await children.fold(parent, "gather", 0, reply(parent, 0))
        assert status == "folded"
        claim = await ledger.claim(parent, FP, "w2", "orchestrate")
        assert claim.decision == "claimed"
        await children.plan(parent, claim.fence, "review", plan_of(parent, 1, "review"))
        again = {**waiting("review", pending=[0]), "deadline_ms": wait["deadline_ms"]}  # the same deadline
        assert await children.park(parent, claim.fence, "review", again) == "parked"
        assert not await ledger.effects.unlist_at(parent, listed_before_fold)  # the first wait's end, late
        assert await ledger.effects.listed_at(parent) == listing_score(wait["deadline_ms"], claim.fence)
        assert int(await ledger.effects.listed_at(parent) or 0) == wait["deadline_ms"]  # within its millisecond

    with_ledger(any_redis_url, body)


def test_park_and_the_last_fold_racing_resume_the_parent_once(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        children = ledger.children
        outcomes: dict[str, int] = {"parked": 0, "ended": 0}

        async def later(turns: int, call: Awaitable[Any]) -> Any:
            for _ in range(turns):  # the loop's turns before the call: a different interleaving each round
                await asyncio.sleep(0)
            return await call

        for i in range(25):
            parent, fence = await planned(ledger, 3)
            parked, *folds = await asyncio.gather(
                later(i % 5, children.park(parent, fence, "gather", waiting(pending=[0, 1, 2]))),
                *(later((i * n) % 7, children.fold(parent, "gather", n, reply(parent, n))) for n in (2, 0, 1)))
            sources = [source for status, source in folds if source]
            assert all(status == "folded" for status, _ in folds)
            outcomes[parked] += 1
            if parked == "parked":  # resumed by exactly one fold, with its record
                assert len(sources) == 1 and json.loads(sources[0]) == SOURCE
                assert await state(ledger, parent) == "resuming"
            else:  # every reply came first: the holder goes on, nobody resumes it
                assert parked == "ended" and sources == [] and await state(ledger, parent) == "running"
        assert sum(outcomes.values()) == 25

    with_ledger(any_redis_url, body)


def test_a_stale_holder_does_not_park_and_a_wait_of_another_step_is_not_ended(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        children = ledger.children
        parent, fence = await planned(ledger, 1)
        assert await children.park(parent, fence + 1, "gather", waiting()) == "stale"
        assert await state(ledger, parent) == "running"
        await children.plan(parent, fence, "later", plan_of(parent, 1, "later"))
        assert await children.park(parent, fence, "later", waiting("later")) == "parked"
        assert await children.park(parent, fence, "later", waiting("later")) == "stale"  # parked already
        # a late reply of the earlier step is folded, and the wait for the later one goes on
        assert await children.fold(parent, "gather", 0, reply(parent, 0)) == ("folded", "")
        assert await state(ledger, parent) == "waiting_children"
        status, source = await children.fold(parent, "later", 0, reply(parent, 0, "later"))
        assert status == "folded" and source and await state(ledger, parent) == "resuming"

    with_ledger(any_redis_url, body)


def test_a_cancelled_child_ends_dead_without_running(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        parent = f"p{uuid.uuid4().hex[:10]}"
        unstarted, started = f"{parent}/gather/0", f"{parent}/gather/1"
        running = await ledger.claim(started, "fp-child", "w1", "research")
        await ledger.children.cancel([unstarted, started], "the parent expired", 60)
        assert 0 < await ledger.client.ttl(ledger.keys.cancel(unstarted)) <= 60
        claim = await ledger.claim(unstarted, "fp-child", "w1", "research")
        assert claim.decision == "cancelled"
        stored = await ledger.get(unstarted)
        assert stored is not None and stored.state == "dead" and not stored.published
        assert (stored.fields["dead_reason"], stored.fields["error"]) == ("cancelled", "the parent expired")
        assert stored.attempts == 0 and stored.fields["kind"] == "research"
        again = await ledger.claim(unstarted, "fp-child", "w2", "research")  # its record read again
        assert again.decision == "dead"
        assert await ledger.mark_published(unstarted, "dead", "t[0]@3", "acked")
        # one that had started finishes
        assert running.decision == "claimed"
        assert (await ledger.claim(started, "fp-child", "w2", "research")).decision == "busy"
        done = await ledger.complete(started, running.fence, result="{}", digest="d", event=b"{}", model="m",
                                     prompt_version="p1")
        assert done.status == "ok" and await state(ledger, started) == "succeeded"
        # a ledger whose table has no cancel runs it
        without = Lifecycle(TASK.name, TASK.initial, TASK.states,
                            tuple(t for t in TASK.transitions if t.event != "cancel"), TASK.final)
        strict = Ledger(ledger.client, keys=ledger.keys, ttl_s=600, lifecycle=without)
        other = f"{parent}/gather/2"
        await ledger.children.cancel([other], "the parent was rejected", 60)
        assert (await strict.claim(other, "fp-child", "w1", "research")).decision == "claimed"

    with_ledger(any_redis_url, body)
