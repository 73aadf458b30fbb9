"""A session's side of the ledger (``ledger.sessions``) on a real Redis, one server and a cluster:
tickets in arrival order and only the queue's head enters; a holder's own redelivery takes over
and a head that stalls is passed over; an update is applied once per task id, under a version CAS
that loses no update among concurrent writers, and refused to a stale fence; ``leave`` frees the
queue; an operator's ``put`` with a stale version changes nothing; ``delete`` erases the content and
the listing, moves the epoch on so no update read before it is written back, and keeps a live
holder's turn and the waiters' places; every write refreshes the kind's TTL on every key; Redis
away is the ledger's outage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger, LedgerUnavailable, StaleFence
from dedup.sessions import Applied, Entered, Sessions, Summary, Waiting, WrongKind, WrongTenant
from service.devtools import local

pytestmark = pytest.mark.integration


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]]) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"s{uuid.uuid4().hex[:8]}"), ttl_s=600))
        finally:
            await close(client)

    asyncio.run(main())


def turn(task_id: str, text: str) -> dict[str, Any]:
    return {"task_id": task_id, "input": {"text": text}, "result": {"answer": text.upper()}, "at": 1}


async def entered(sessions: Sessions, sid: str, task_id: str, fence: int = 1, **kwargs: Any) -> Entered:
    answer = await sessions.enter(sid, "support", task_id, fence, 60_000, **kwargs)
    assert isinstance(answer, Entered), answer
    return answer


def test_tickets_follow_arrival_and_only_the_head_enters(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        first = await entered(sessions, "s1", "t1")
        assert (first.version, first.state, first.summary, first.turns, first.first_turn) == (0, None, None, [], 0)
        assert await sessions.enter("s1", "support", "t2", 1, 60_000) == Waiting(head="t1", ahead=1, ticket=2)
        assert await sessions.enter("s1", "support", "t3", 1, 60_000) == Waiting(head="t1", ahead=2, ticket=3)
        # t2 asks again (a poll, or its redelivery): the same ticket, still behind t1
        assert await sessions.enter("s1", "support", "t2", 2, 60_000) == Waiting(head="t1", ahead=1, ticket=2)
        assert await sessions.apply("s1", "t1", 1, 0, turn("t1", "hello")) == "ok"
        # t3 is not the head: t2 arrived first
        assert await sessions.enter("s1", "support", "t3", 1, 60_000) == Waiting(head="t2", ahead=1, ticket=3)
        second = await entered(sessions, "s1", "t2", 2)
        assert (second.version, second.turns, second.ticket) == (1, [turn("t1", "hello")], 2)
        record = await sessions.get("s1")
        assert record is not None
        assert (record.kind, record.holder, record.holder_fence, record.queue) == ("support", "t2", 2, ["t2", "t3"])
        assert await sessions.enter("s1", "planner", "t9", 1, 60_000) == WrongKind(kind="support")
        assert (await sessions.get("s1")).queue == ["t2", "t3"]  # type: ignore[union-attr]  # no ticket taken

    with_ledger(any_redis_url, body)


def test_a_session_belongs_to_the_tenant_of_its_first_task(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions, keys, client = ledger.sessions, ledger.keys, ledger.client
        await entered(sessions, "s1", "t1", tenant="acme")
        before = await client.hgetall(keys.session("s1"))
        assert await sessions.enter("s1", "support", "x1", 1, 60_000, tenant="globex") == WrongTenant(tenant="acme")
        # another tenant learns nothing of the session's kind, and nothing is written
        assert await sessions.enter("s1", "planner", "x2", 1, 60_000, tenant="globex") == WrongTenant(tenant="acme")
        assert await sessions.enter("s1", "support", "x3", 1, 60_000) == WrongTenant(tenant="acme")
        assert await client.hgetall(keys.session("s1")) == before
        assert await sessions.enter("s1", "support", "t2", 1, 60_000, tenant="acme") == Waiting("t1", 1, 2)
        record = await sessions.get("s1")
        assert record is not None and (record.tenant, record.queue) == ("acme", ["t1", "t2"])
        # a task that names no tenant is the tenant default's
        await entered(sessions, "s2", "d1")
        assert await sessions.enter("s2", "support", "a1", 1, 60_000, tenant="acme") == WrongTenant(tenant="default")
        # an erased session begins again with the tenant of its next first task
        assert await sessions.apply("s2", "d1", 1, 0, turn("d1", "x")) == "ok"
        assert await sessions.delete("s2")
        await entered(sessions, "s2", "a1", tenant="acme")
        assert (await sessions.get("s2")).tenant == "acme"  # type: ignore[union-attr]

    with_ledger(any_redis_url, body)


def test_a_holders_redelivery_takes_over_and_a_stalled_head_is_passed(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await sessions.enter("s1", "support", "t1", 1, 200)
        assert isinstance(await sessions.enter("s1", "support", "t2", 1, 60_000), Waiting)
        # t1's own redelivery (a newer fence) takes over at once; its old fence is refused after
        assert (await entered(sessions, "s1", "t1", 2)).ticket == 1
        with pytest.raises(StaleFence):
            await sessions.enter("s1", "support", "t1", 1, 60_000)
        assert not await sessions.renew("s1", "t1", 1, 60_000)
        assert await sessions.renew("s1", "t1", 2, 200)
        assert await sessions.apply("s1", "t1", 1, 0, turn("t1", "old")) == "stale"
        # t1's lease runs out and nothing comes back: t2 waits while the head may yet return ...
        await asyncio.sleep(0.3)
        assert await sessions.enter("s1", "support", "t2", 1, 60_000, stall_ms=60_000) == Waiting("t1", 1, 2)
        # ... and passes it once the session stood idle for stall_ms
        deadline = time.monotonic() + 30
        while not isinstance(answer := await sessions.enter("s1", "support", "t2", 1, 60_000, stall_ms=500), Entered):
            assert answer == Waiting("t1", 1, 2)
            assert time.monotonic() < deadline, "the stalled head was never passed"
            await asyncio.sleep(0.1)
        # t1's result, accepted before it stalled, still counts: applied once, no update lost
        assert await sessions.apply("s1", "t1", 2, 0, turn("t1", "late")) == "ok"
        assert await sessions.apply("s1", "t2", 1, 0, turn("t2", "next")) == "moved"
        assert await sessions.apply("s1", "t2", 1, 1, turn("t2", "next")) == "ok"
        record = await sessions.get("s1")
        assert record is not None
        assert [t["task_id"] for t in record.turns] == ["t1", "t2"]
        assert (record.version, record.holder, record.queue) == (2, None, [])

    with_ledger(any_redis_url, body)


def test_a_returning_head_keeps_its_place(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await sessions.enter("s1", "support", "t1", 1, 100)
        await sessions.enter("s1", "support", "t2", 1, 60_000)
        await sessions.enter("s1", "support", "t3", 1, 60_000)
        await asyncio.sleep(0.2)
        assert isinstance(await sessions.enter("s1", "support", "t2", 1, 60_000, stall_ms=1), Entered)
        # t1 comes back (its redelivery): behind the live holder, ahead of t3
        assert await sessions.enter("s1", "support", "t1", 2, 60_000) == Waiting(head="t2", ahead=0, ticket=1)
        assert await sessions.leave("s1", "t2", 1) == "left"
        assert await sessions.enter("s1", "support", "t3", 1, 60_000) == Waiting(head="t1", ahead=1, ticket=3)
        assert isinstance(await sessions.enter("s1", "support", "t1", 2, 60_000), Entered)

    with_ledger(any_redis_url, body)


def test_an_update_is_applied_once_per_task_id(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await entered(sessions, "s1", "t1")
        assert await sessions.apply("s1", "t1", 1, 0, turn("t1", "once")) == "ok"
        assert await sessions.apply("s1", "t1", 1, 0, turn("t1", "once")) == "again"
        assert await sessions.apply("s1", "t1", 1, 1, turn("t1", "twice")) == "again"  # even at the new version
        assert await sessions.enter("s1", "support", "t1", 2, 60_000) == Applied(version=1)  # a replay: re-emit
        assert await sessions.leave("s1", "t1") == "again"
        record = await sessions.get("s1")
        assert record is not None
        assert (record.version, record.turns, record.queue) == (1, [turn("t1", "once")], [])

    with_ledger(any_redis_url, body)


def test_applied_marks_are_capped_and_leaving_marks_nothing(any_redis_url: str) -> None:
    """Applied marks live in the session's ``applied`` zset (task -> version), the newest kept; a
    replay older than the cap runs as a new arrival; ``leave`` leaves no mark behind."""
    async def body(ledger: Ledger) -> None:
        sessions, keys, client = ledger.sessions, ledger.keys, ledger.client
        sessions.marks_max = 3
        for n in range(5):
            await entered(sessions, "s1", f"t{n}")
            assert await sessions.apply("s1", f"t{n}", 1, n, turn(f"t{n}", str(n))) == "ok"
        assert await client.zrange(keys.session_applied("s1"), 0, -1, withscores=True) == [
            (b"t2", 3.0), (b"t3", 4.0), (b"t4", 5.0)]
        assert await sessions.enter("s1", "support", "t2", 2, 60_000) == Applied(version=5)
        assert await sessions.apply("s1", "t3", 1, 5, turn("t3", "again")) == "again"
        assert await sessions.enter("s1", "support", "gone", 1, 60_000) != Applied(version=5)
        assert await sessions.leave("s1", "gone") == "left"
        # t0 applied longer ago than the marks keep: its replay is a new arrival, as past the ledger's retention
        assert (await entered(sessions, "s1", "t0", 2)).version == 5
        fields = [f.decode() if isinstance(f, bytes) else f for f in await client.hkeys(keys.session("s1"))]
        assert not [f for f in fields if f.startswith("a:")], fields

    with_ledger(any_redis_url, body)


def test_applied_marks_of_a_session_stored_before_the_zset_still_count(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions, keys, client = ledger.sessions, ledger.keys, ledger.client
        await entered(sessions, "s1", "t1")
        assert await sessions.apply("s1", "t1", 1, 0, turn("t1", "x")) == "ok"
        await client.hset(keys.session("s1"), mapping={"a:old": "turn", "a:gone": "left"})  # as stored before
        assert await sessions.enter("s1", "support", "old", 1, 60_000) == Applied(version=1)
        assert await sessions.apply("s1", "old", 1, 1, turn("old", "twice")) == "again"
        assert isinstance(await sessions.enter("s1", "support", "gone", 1, 60_000), Entered)
        assert await sessions.leave("s1", "gone") == "left"
        assert not await client.hexists(keys.session("s1"), "a:gone")
        assert await sessions.delete("s1")
        assert not await client.exists(keys.session_applied("s1"))

    with_ledger(any_redis_url, body)


def test_concurrent_writers_reducing_a_counter_lose_no_update(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await entered(sessions, "s1", "t0")
        assert await sessions.apply("s1", "t0", 1, 0, None, {"count": 0}) == "ok"
        moved = 0

        async def writer(n: int) -> None:
            nonlocal moved
            while True:
                record = await sessions.get("s1")
                assert record is not None
                answer = await sessions.apply("s1", f"w{n}", 1, record.version, None,
                                              {"count": record.state["count"] + 1})
                if answer == "ok":
                    return
                assert answer == "moved"
                moved += 1

        await asyncio.gather(*(writer(n) for n in range(20)))
        record = await sessions.get("s1")
        assert record is not None
        assert (record.state, record.version) == ({"count": 20}, 21)
        assert moved > 0  # they did race

    with_ledger(any_redis_url, body)


def test_leave_frees_the_queue(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await entered(sessions, "s1", "t1", 3)
        assert isinstance(await sessions.enter("s1", "support", "t2", 1, 60_000), Waiting)
        assert await sessions.leave("s1", "t1", 2) == "stale"  # an older run of t1 cannot free it
        assert await sessions.leave("s1", "t1", 3) == "left"
        assert await sessions.leave("s1", "t1", 3) == "again"
        await entered(sessions, "s1", "t2")
        # t1 replayed after its dead letter: a new arrival, behind t2
        assert await sessions.enter("s1", "support", "t1", 4, 60_000) == Waiting(head="t2", ahead=1, ticket=3)
        assert await sessions.leave("s1", "t2") == "left"  # no fence: the dead end of whoever holds it
        assert (await entered(sessions, "s1", "t1", 4)).version == 0

    with_ledger(any_redis_url, body)


def test_a_task_that_left_comes_back_at_any_fence_as_a_new_arrival(any_redis_url: str) -> None:
    """A dead end's leave forgets the task's fence: its dead letter replayed after its ledger record
    expired claims again at fence 1, and must queue as a new arrival, never be refused as stale."""
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await entered(sessions, "s1", "h")
        assert isinstance(await sessions.enter("s1", "support", "t", 2, 60_000), Waiting)
        assert await sessions.leave("s1", "t", 2) == "left"  # session_busy: out of the queue
        assert await sessions.enter("s1", "support", "t", 1, 60_000) == Waiting(head="h", ahead=1, ticket=3)
        assert await sessions.apply("s1", "h", 1, 0, turn("h", "hi")) == "ok"
        assert (await entered(sessions, "s1", "t", 1)).version == 1

    with_ledger(any_redis_url, body)


def test_summaries_grow_and_put_answers_conflict_for_a_stale_version(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        for n in range(3):
            await entered(sessions, "s1", f"t{n}")
            assert await sessions.apply("s1", f"t{n}", 1, n, turn(f"t{n}", str(n))) == "ok"
        assert await sessions.summarize("s1", 2, "two turns", 3)
        assert not await sessions.summarize("s1", 1, "one turn", 3)  # covers less than the stored one
        assert not await sessions.summarize("s1", 3, "moved", 2)  # the version read is not the session's
        assert not await sessions.summarize("s1", 4, "too far", 3)  # no fourth turn to summarise
        view = await entered(sessions, "s1", "t3")
        assert (view.summary, view.first_turn, view.turns, view.version) == (
            Summary(upto=2, text="two turns"), 2, [turn("t2", "2")], 3)
        assert await sessions.put("s1", 2, turns=[turn("x", "edited")]) == "conflict"
        assert await sessions.put("nobody", 0, state={"a": 1}) == "missing"
        record = await sessions.get("s1")
        assert record is not None and record.version == 3 and len(record.turns) == 3  # the conflict changed nothing
        assert await sessions.put("s1", 3, turns=[turn("x", "edited")]) == "ok"
        record = await sessions.get("s1")
        assert record is not None
        assert (record.version, record.turns, record.summary) == (4, [turn("x", "edited")], None)
        assert await sessions.apply("s1", "t3", 1, 3, turn("t3", "3")) == "moved"  # the operator's edit moved it
        assert await sessions.put("s1", 4, state={"board": ["a"]}) == "ok"
        assert (await sessions.get("s1")).state == {"board": ["a"]}  # type: ignore[union-attr]

    with_ledger(any_redis_url, body)


def test_turns_the_summary_covers_are_trimmed_to_a_cap_and_indices_stay_absolute(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        sessions.turns_max = 2
        for n in range(6):
            await entered(sessions, "s1", f"t{n}")
            assert await sessions.apply("s1", f"t{n}", 1, n, turn(f"t{n}", str(n))) == "ok"
        record = await sessions.get("s1")
        assert record is not None and (record.first_turn, len(record.turns)) == (0, 6)  # nothing summarised
        assert await sessions.summarize("s1", 5, "five turns", 6)
        # the newest 2 of the 5 summarised turns stay, and every turn after the summary
        record = await sessions.get("s1")
        assert record is not None
        assert (record.first_turn, [t["task_id"] for t in record.turns]) == (3, ["t3", "t4", "t5"])
        view = await entered(sessions, "s1", "t6")
        assert (view.summary, view.first_turn, view.turns, view.version) == (
            Summary(upto=5, text="five turns"), 5, [turn("t5", "5")], 6)
        assert not await sessions.summarize("s1", 7, "too far", 6)  # six turns in all, three of them dropped
        assert await sessions.summarize("s1", 6, "six turns", 6)
        record = await sessions.get("s1")
        assert record is not None
        assert (record.first_turn, [t["task_id"] for t in record.turns]) == (4, ["t4", "t5"])
        assert await sessions.apply("s1", "t6", 1, 6, turn("t6", "6")) == "ok"
        assert (await entered(sessions, "s1", "t7")).turns == [turn("t6", "6")]
        assert await sessions.put("s1", 7, turns=[turn("x", "edited")]) == "ok"  # the whole history, from 0
        record = await sessions.get("s1")
        assert record is not None and (record.first_turn, record.turns, record.summary) == (
            0, [turn("x", "edited")], None)

    with_ledger(any_redis_url, body)


def test_delete_of_a_quiet_session_leaves_no_content_and_a_late_apply_writes_nothing(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions, keys, client = ledger.sessions, ledger.keys, ledger.client
        await entered(sessions, "s1", "t1", ttl_s=5_000)
        assert await sessions.apply("s1", "t1", 1, 0, turn("t1", "x"), {"n": 1}) == "ok"
        await entered(sessions, "s2", "u1")
        assert [entry.id for entry in await sessions.list(10)] == ["s2", "s1"]
        assert await sessions.delete("s1")
        assert not await sessions.delete("s1")
        assert not await client.exists(keys.session_queue("s1"), keys.session_turns("s1"), keys.session_applied("s1"))
        # a tombstone keeps the epoch and the version moving on, nothing of the content, for the kind's TTL
        assert set(await client.hkeys(keys.session("s1"))) == {b"epoch", b"version", b"erased_ms"}
        assert 4_900 < await client.ttl(keys.session("s1")) <= 5_000
        assert await sessions.get("s1") is None
        assert await sessions.put("s1", 2, state={"n": 9}) == "missing"
        assert [entry.id for entry in await sessions.list(10)] == ["s2"]
        # t1's duplicate path (it applied before the erasure) writes nothing back
        assert await sessions.apply("s1", "t1", 1, 2, turn("t1", "x"), {"n": 1}) == "stale"
        assert not await client.exists(keys.session_turns("s1"))
        fresh = await entered(sessions, "s1", "t2")
        assert (fresh.version, fresh.state, fresh.turns, fresh.summary, fresh.first_turn) == (2, None, [], None, 0)

    with_ledger(any_redis_url, body)


def test_an_erasure_under_a_holder_keeps_its_turn_and_refuses_its_update(any_redis_url: str) -> None:
    """A waiter polling right after the erasure does not enter beside the live holder, and the holder's
    update (read before the erasure) is never written into the session that follows."""
    async def body(ledger: Ledger) -> None:
        sessions, keys, client = ledger.sessions, ledger.keys, ledger.client
        await entered(sessions, "s1", "t0")
        assert await sessions.apply("s1", "t0", 1, 0, turn("t0", "old")) == "ok"
        assert await sessions.summarize("s1", 1, "old turns", 1)
        held = await entered(sessions, "s1", "h")
        assert await sessions.enter("s1", "support", "w", 1, 60_000) == Waiting(head="h", ahead=1, ticket=3)
        assert await sessions.delete("s1")
        assert await sessions.get("s1") is None
        assert await sessions.put("s1", held.version + 1, state={"x": 1}) == "missing"
        assert not await client.exists(keys.session_turns("s1"))
        # the waiter still waits behind the holder, at its place; the holder keeps its turn
        assert await sessions.enter("s1", "support", "w", 1, 60_000) == Waiting(head="h", ahead=1, ticket=3)
        assert await sessions.enter("s1", "support", "late", 1, 60_000) == Waiting(head="h", ahead=2, ticket=4)
        assert await sessions.renew("s1", "h", 1, 60_000)
        # the holder's update was read before the erasure: stale, nothing written, the session freed
        assert await sessions.apply("s1", "h", 1, held.version, turn("h", "erased")) == "stale"
        assert not await client.exists(keys.session_turns("s1"))
        after = await entered(sessions, "s1", "w")
        assert after.version > held.version
        assert (after.state, after.turns, after.summary, after.first_turn) == (None, [], None, 0)
        assert await sessions.apply("s1", "w", 1, after.version, turn("w", "new")) == "ok"
        record = await sessions.get("s1")
        assert record is not None
        assert (record.turns, record.queue, record.summary) == ([turn("w", "new")], ["late"], None)

    with_ledger(any_redis_url, body)


def test_a_passed_over_heads_late_apply_after_an_erasure_is_stale(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await sessions.enter("s1", "support", "p", 1, 100)
        await sessions.enter("s1", "support", "w", 1, 60_000)
        await asyncio.sleep(0.2)
        assert isinstance(await sessions.enter("s1", "support", "w", 1, 60_000, stall_ms=1), Entered)
        assert await sessions.delete("s1")
        assert await sessions.enter("s1", "support", "x", 1, 60_000) == Waiting(head="w", ahead=1, ticket=3)
        assert await sessions.apply("s1", "w", 1, 0, turn("w", "erased")) == "stale"  # frees the session
        fresh = await entered(sessions, "s1", "x")
        assert await sessions.apply("s1", "x", 1, fresh.version, turn("x", "new")) == "ok"
        # p's result was accepted before it stalled, but it read the erased session: never written back
        record = await sessions.get("s1")
        assert record is not None
        assert await sessions.apply("s1", "p", 1, record.version, turn("p", "erased")) == "stale"
        record = await sessions.get("s1")
        assert record is not None
        assert (record.turns, record.holder, record.queue) == ([turn("x", "new")], None, [])

    with_ledger(any_redis_url, body)


def test_every_write_refreshes_the_kinds_ttl_on_every_key(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions, keys, client = ledger.sessions, ledger.keys, ledger.client
        every = (keys.session("s1"), keys.session_queue("s1"), keys.session_turns("s1"), keys.session_applied("s1"))
        await entered(sessions, "s1", "t1", ttl_s=5_000)
        await sessions.enter("s1", "support", "t2", 1, 60_000, ttl_s=5_000)
        assert await sessions.apply("s1", "t1", 1, 0, turn("t1", "x")) == "ok"
        for key in every:
            assert 4_900 < await client.ttl(key) <= 5_000, key
        for key in every:
            await client.expire(key, 100)
        assert await sessions.put("s1", 1, turns=[turn("t1", "y")]) == "ok"
        for key in every:
            assert 4_900 < await client.ttl(key) <= 5_000, key
        for key in every:
            await client.expire(key, 100)
        assert await sessions.renew("s1", "t2", 1, 60_000) is False  # t2 never entered: nothing written
        await entered(sessions, "s1", "t2", ttl_s=9_000)  # the kind's ttl as it is now
        for key in every:
            assert 8_900 < await client.ttl(key) <= 9_000, key

    with_ledger(any_redis_url, body)


def test_bad_arguments_are_refused_before_redis(redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        with pytest.raises(ValueError, match="invalid session id"):
            await sessions.get("a{b}")
        with pytest.raises(ValueError, match="task id"):
            await sessions.enter("s1", "support", "t 1", 1, 60_000)
        with pytest.raises(ValueError, match="lease_ms must be a whole number from 1"):
            await sessions.enter("s1", "support", "t1", 1, 0)
        with pytest.raises(ValueError, match="state or turns"):
            await sessions.put("s1", 0)
        with pytest.raises(ValueError, match="a turn or a state"):
            await sessions.apply("s1", "t1", 1, 0)

    with_ledger(redis_url, body)


def test_redis_away_is_the_ledgers_outage(tmp_path: Any) -> None:
    server = local.start_redis(tmp_path / "redis")

    async def body(ledger: Ledger) -> None:
        sessions = ledger.sessions
        await entered(sessions, "s1", "t1")
        await asyncio.to_thread(server.stop)
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: sessions.enter("s1", "support", "t2", 1, 60_000), lambda: sessions.renew("s1", "t1", 1, 60_000),
            lambda: sessions.apply("s1", "t1", 1, 0, turn("t1", "x")), lambda: sessions.leave("s1", "t1"),
            lambda: sessions.summarize("s1", 1, "x", 1), lambda: sessions.get("s1"),
            lambda: sessions.put("s1", 0, state={}), lambda: sessions.delete("s1"), lambda: sessions.list(5)]
        for call in calls:
            with pytest.raises(LedgerUnavailable):
                await call()

    try:
        with_ledger(f"redis://{server.address}/0", body)
    finally:
        server.stop()
