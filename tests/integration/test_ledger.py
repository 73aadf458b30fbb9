"""The ledger's Lua scripts against a real redis-server: claims, leases, fences, first writer wins."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.leases import LeaseKeeper
from dedup.ledger import Attempt, AttemptsExhausted, Ledger, StaleFence

pytestmark = pytest.mark.integration

FP = "sha256:aaa"


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]], lease_ms: int = 300) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"t{uuid.uuid4().hex[:8]}"), lease_ms=lease_ms, ttl_s=600))
        finally:
            await close(client)

    asyncio.run(main())


async def complete(ledger: Ledger, key: str, fence: int, result: str = '{"a":1}') -> Any:
    return await ledger.complete(key, fence, result=result, digest=f"d-{result}", event=result.encode(),
                                 model="m", prompt_version="p1")


def test_claim_lifecycle(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        first = await ledger.claim("t1", FP, "w1", "classify")
        assert (first.decision, first.fence) == ("claimed", 1)
        busy = await ledger.claim("t1", FP, "w2", "classify")
        assert busy.decision == "busy" and 0 < busy.lease_remaining_ms <= 300
        assert (await ledger.claim("t1", "sha256:other", "w2", "classify")).decision == "conflict"
        assert (await ledger.begin_attempt("t1", 1, "s", 3)).step == 1
        done = await complete(ledger, "t1", 1)
        assert done.status == "ok"
        again = await ledger.claim("t1", FP, "w2", "classify")
        assert again.decision == "succeeded" and not again.published
        assert await ledger.mark_published("t1", "succeeded")
        assert (await ledger.claim("t1", FP, "w3", "classify")).published
        rec = await ledger.get("t1")
        assert rec is not None and rec.state == "succeeded" and rec.event == b'{"a":1}'
        assert rec.to_json()["result"] == {"a": 1}
        assert await ledger.get("nope") is None

    with_ledger(any_redis_url, body)


def test_expired_lease_is_reclaimed_with_a_higher_fence_and_the_stale_write_is_refused(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("t2", FP, "wa", "classify")
        await asyncio.sleep(0.4)  # a's lease (300 ms) runs out
        b = await ledger.claim("t2", FP, "wb", "classify")
        assert (b.decision, b.fence) == ("claimed", a.fence + 1)
        assert not await ledger.heartbeat("t2", a.fence)
        with pytest.raises(StaleFence):
            await ledger.begin_attempt("t2", a.fence, "s", 3)
        with pytest.raises(StaleFence):
            await ledger.record_step("t2", a.fence, "s", {"output": 1})
        assert (await complete(ledger, "t2", a.fence, '{"a":"old"}')).status == "stale"
        assert (await complete(ledger, "t2", b.fence, '{"b":"new"}')).status == "ok"
        late = await complete(ledger, "t2", b.fence, '{"b":"again"}')
        assert late.status == "already" and late.digest == 'd-{"b":"new"}'  # first writer wins
        rec = await ledger.get("t2")
        assert rec is not None and rec.fields["result"] == '{"b":"new"}' and rec.fence == 2

    with_ledger(any_redis_url, body)


def test_heartbeat_keeps_the_lease(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("t3", FP, "wa", "classify")
        for _ in range(4):
            await asyncio.sleep(0.15)
            assert await ledger.heartbeat("t3", a.fence)
        assert (await ledger.claim("t3", FP, "wb", "classify")).decision == "busy"

    with_ledger(any_redis_url, body)


def test_attempts_survive_reclaims_and_failures(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("t4", FP, "wa", "classify")
        assert await ledger.begin_attempt("t4", a.fence, "s1", 2) == Attempt(step=1, total=1)
        assert await ledger.begin_attempt("t4", a.fence, "s1", 2) == Attempt(step=2, total=2)
        with pytest.raises(AttemptsExhausted):
            await ledger.begin_attempt("t4", a.fence, "s1", 2)
        assert await ledger.begin_attempt("t4", a.fence, "s2", 2) == Attempt(step=1, total=3)
        assert await ledger.fail("t4", a.fence, "gave up for now")
        b = await ledger.claim("t4", FP, "wb", "classify")
        assert (b.decision, b.fence, b.attempts) == ("claimed", 2, 3)  # a redelivery does not reset it
        with pytest.raises(AttemptsExhausted):
            await ledger.begin_attempt("t4", b.fence, "s1", 2)
        assert await ledger.fail("t4", b.fence, "boom", dead_reason="exhausted")
        dead = await ledger.claim("t4", FP, "wc", "classify")
        assert dead.decision == "dead"
        assert not await ledger.fail("t4", b.fence, "again", dead_reason="exhausted")  # not running
        assert await ledger.revive("t4")
        c = await ledger.claim("t4", FP, "wc", "classify")
        assert (c.decision, c.fence, c.attempts) == ("claimed", 3, 3)
        assert await ledger.begin_attempt("t4", c.fence, "s1", 2) == Attempt(step=1, total=4)  # fresh budget

    with_ledger(any_redis_url, body)


def test_steps_are_journaled_under_the_fence(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("t5", FP, "wa", "prior_auth")
        await ledger.record_step("t5", a.fence, "extract", {"output": {"x": 1}, "digest": "d"})
        assert await ledger.steps("t5") == {"extract": {"output": {"x": 1}, "digest": "d"}}
        rec = await ledger.get("t5")
        assert rec is not None and rec.to_json()["steps"]["extract"]["digest"] == "d"

    with_ledger(any_redis_url, body)


def test_finished_names_only_done_published_tasks_of_the_same_input(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        for key in ("done", "dead", "unpublished", "running"):
            assert (await ledger.claim(key, FP, "w1", "classify")).fence == 1
        await complete(ledger, "done", 1)
        assert await ledger.mark_published("done", "succeeded", "t[0]@3")
        assert await ledger.fail("dead", 1, "no", dead_reason="permanent")
        assert await ledger.mark_published("dead", "dead", "t[1]@4")
        await complete(ledger, "unpublished", 1)
        asked = [("done", FP, ""), ("dead", FP, "t[0]@3"), ("unpublished", FP, ""), ("running", FP, ""),
                 ("never", FP, ""), ("done", "sha256:other", ""), ("done", FP, "t[0]@3")]
        # the last: published by the very record asking (read again after its transaction aborted)
        assert await ledger.finished(asked) == [True, True, False, False, False, False, False]
        many = [(f"m-{i}", FP, f"t[2]@{i}") for i in range(300)]  # a whole fetched batch at once
        for key, _fp, _at in many[::3]:
            await ledger.claim(key, FP, "w1", "classify")
            await complete(ledger, key, 1)
            await ledger.mark_published(key, "succeeded", "t[2]@0")
        assert await ledger.finished(many) == [i % 3 == 0 and i > 0 for i in range(300)]
        assert await ledger.finished([]) == []

    with_ledger(any_redis_url, body)


def test_marks_asked_in_one_turn_each_mark_their_own_task(any_redis_url: str) -> None:
    """One script for the turn's marks on one server (one per task on a cluster), each checked alone."""

    async def body(ledger: Ledger) -> None:
        for key in ("a", "b", "c", "d"):
            assert (await ledger.claim(key, FP, "w1", "classify")).fence == 1
        await complete(ledger, "a", 1)
        await complete(ledger, "b", 1)
        assert await ledger.fail("c", 1, "no", dead_reason="permanent")
        commands, batches = ledger.batcher.commands, ledger.batcher.batches
        marked = await asyncio.gather(
            ledger.mark_published("a", "succeeded", "t[0]@1", "acked"),
            ledger.mark_published("b", "succeeded", "t[0]@2"),
            ledger.mark_published("c", "dead", "t[0]@3", "staged"),
            ledger.mark_published("d", "succeeded", "t[0]@4", "acked"),  # still running: not marked
            ledger.mark_published("c", "succeeded", "t[0]@5", "acked"),  # dead, not succeeded: not marked
        )
        assert marked == [True, True, True, False, False]
        grouped = not isinstance(ledger.client, RedisCluster)
        assert ledger.batcher.batches - batches == 1  # one round trip
        assert ledger.batcher.commands - commands == (1 if grouped else 5)
        published = {}
        for key in ("a", "b", "c"):
            claim = await ledger.claim(key, FP, "w2", "classify")
            published[key] = (claim.published_by, claim.published_how)
        assert published == {"a": ("t[0]@1", "acked"), "b": ("t[0]@2", None), "c": ("t[0]@3", "staged")}
        assert await ledger.client.hget(ledger.keys.task("d"), "published_by") is None
        assert await ledger.mark_published("d", "running") is False  # alone: the one-task script, same answer

    with_ledger(any_redis_url, body)


def test_keys_are_hash_tagged_and_refuse_escapes() -> None:
    keys = Keys("agent")
    assert keys.task("t-1") == "agent:{t-1}:task" and keys.steps("t-1") == "agent:{t-1}:steps"
    for bad in ("a}b", "a{b", "", "a b", "x" * 201):
        with pytest.raises(ValueError):
            keys.task(bad)


def test_concurrent_claims_hand_out_one_fence(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        claims = await asyncio.gather(*(ledger.claim("t6", FP, f"w{i}", "classify") for i in range(20)))
        assert sum(c.decision == "claimed" for c in claims) == 1
        assert {c.decision for c in claims} == {"claimed", "busy"}

    with_ledger(any_redis_url, body, lease_ms=5000)


def test_calls_made_together_share_one_pipeline_and_keep_their_own_outcomes(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        n = 100
        claims = await asyncio.gather(*(ledger.claim(f"b{i}", FP, "w1", "classify") for i in range(n)))
        assert [c.decision for c in claims] == ["claimed"] * n
        assert ledger.batcher.batches == 1 and ledger.batcher.calls == n  # one round trip for all
        # a refused write (stale fence) fails only its own call in a shared pipeline
        outcomes = await asyncio.gather(
            *(ledger.begin_attempt(f"b{i}", 1 if i % 2 else 99, "s", 3) for i in range(n)),
            return_exceptions=True,
        )
        assert all(isinstance(o, StaleFence) for o in outcomes[0::2])
        assert all(isinstance(o, Attempt) and o.step == 1 for o in outcomes[1::2])

    with_ledger(any_redis_url, body)


def test_scripts_flushed_by_a_redis_restart_are_loaded_again(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("f0", FP, "w1", "classify")).decision == "claimed"
        await ledger.client.script_flush()
        claims = await asyncio.gather(*(ledger.claim(f"f{i}", FP, "w1", "classify") for i in range(1, 5)))
        assert [c.decision for c in claims] == ["claimed"] * 4
        await ledger.client.script_flush()
        assert (await ledger.claim("f0", FP, "w2", "classify")).decision == "busy"

    with_ledger(any_redis_url, body)


def test_lease_keeper_renews_every_held_task_and_stops_on_release(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:  # leases of 300 ms
        keeper = LeaseKeeper(ledger)
        for i in range(20):
            assert (await ledger.claim(f"l{i}", FP, "w1", "classify")).fence == 1
        with contextlib.ExitStack() as held:
            for i in range(20):
                held.enter_context(keeper.hold(f"l{i}", 1, 0.1))
            await asyncio.sleep(1.0)  # three leases long: only renewals keep the tasks
            busy = await asyncio.gather(*(ledger.claim(f"l{i}", FP, "w2", "classify") for i in range(20)))
            assert {c.decision for c in busy} == {"busy"}
            assert keeper.renewals >= 20 * 5
        assert len(keeper) == 0
        await asyncio.sleep(0.5)  # released: the leases run out and another worker reclaims
        again = await ledger.claim("l0", FP, "w2", "classify")
        assert (again.decision, again.fence) == ("claimed", 2)
        with keeper.hold("l1", 1, 0.05):  # a newer fence holds l1 now: its renewal is refused
            assert (await ledger.claim("l1", FP, "w2", "classify")).fence == 2
            renewed = keeper.renewals
            await asyncio.sleep(0.3)
            assert keeper.renewals == renewed

    with_ledger(any_redis_url, body)


def test_wait_replicas_holds_a_result_back_until_replicas_have_it(any_redis_url: str) -> None:
    """With AGENT_LEDGER__WAIT_REPLICAS and too few replicas, COMPLETE stores but is not reported done."""
    from dedup.ledger import LedgerUnavailable

    async def body(ledger: Ledger) -> None:
        # a lone redis-server has no replica, a primary of the test cluster has one: neither has two
        ledger.wait_replicas, ledger.wait_timeout_ms = 2, 100
        claim = await ledger.claim("w-1", FP, "me", "classify")
        with pytest.raises(LedgerUnavailable, match=r"WAIT: [01] of 2 replicas"):
            await complete(ledger, "w-1", claim.fence)
        stored = await ledger.get("w-1")
        assert stored is not None and stored.state == "succeeded"  # kept: a retry re-emits it, no model call
        ledger.wait_replicas = 0
        again = await complete(ledger, "w-1", claim.fence)
        assert (again.status, again.fence) == ("already", claim.fence)

    with_ledger(any_redis_url, body)


def test_wait_sent_to_a_demoted_primary_is_an_outage_and_reloads_the_slot_map(redis_cluster: Any) -> None:
    """After a failover a slot map not yet reloaded sends WAIT to the old primary, now a replica,
    which refuses it: that is the cluster changing (retried), not a fault of the task."""
    import redis as sync_redis
    from redis.asyncio.cluster import REPLICA, ClusterNode, RedisCluster

    from dedup.ledger import LedgerUnavailable

    def is_replica(port: int) -> bool:
        with sync_redis.Redis(port=port, decode_responses=True) as node:
            return str(node.execute_command("ROLE")[0]) == "slave"

    port = next(n.port for n in redis_cluster.nodes if is_replica(n.port))

    async def body(ledger: Ledger) -> None:
        client = ledger.client
        assert isinstance(client, RedisCluster)
        ledger.wait_replicas, ledger.wait_timeout_ms = 1, 1000
        claim = await ledger.claim("demoted-1", FP, "me", "classify")
        replica = ClusterNode("127.0.0.1", port, REPLICA, **client.nodes_manager.connection_kwargs)
        owner = client.get_node_from_key
        client.get_node_from_key = lambda *_a, **_k: replica  # type: ignore[method-assign] # the stale map
        reloads = ledger.batcher._refreshed_at
        with pytest.raises(LedgerUnavailable, match="replica"):
            await complete(ledger, "demoted-1", claim.fence)
        assert ledger.batcher._refreshed_at > reloads  # the slot map was asked for again
        client.get_node_from_key = owner  # type: ignore[method-assign]
        await replica.disconnect()
        again = await complete(ledger, "demoted-1", claim.fence)  # the retry, on the fresh map
        assert (again.status, again.fence) == ("already", claim.fence)

    with_ledger(redis_cluster.url, body)


def test_a_redis_refusal_of_one_call_is_not_an_outage(any_redis_url: str) -> None:
    """A script error for one key (here: a key of the wrong type) is the caller's fault, not Redis being down."""
    from dedup.ledger import LedgerRefused

    async def body(ledger: Ledger) -> None:
        await ledger.client.set(ledger.keys.task("wrongtype"), "not a hash")
        with pytest.raises(LedgerRefused):
            await ledger.claim("wrongtype", FP, "me", "classify")

    with_ledger(any_redis_url, body)


def test_a_fresh_cluster_client_takes_many_commands_at_once(redis_cluster: Any) -> None:
    """A replica that starts under a backlog sends its first commands all at once. redis-py's cluster
    client routes a command before it has learned the slots, and fifty scripts at once from a fresh
    client used to fail now and then inside the library (``AttributeError``, about one client in
    twelve on a loaded machine). Sixty fresh clients, fifty scripts each: every call is answered."""

    async def one_client() -> list[int]:
        client = connect(redis_cluster.url)
        try:
            count = client.register_script("return redis.call('INCR', KEYS[1])")
            key = f"{{t{uuid.uuid4().hex[:8]}}}:n"
            return sorted(await asyncio.gather(*(count(keys=[key]) for _ in range(50))))
        finally:
            await close(client)

    async def main() -> None:
        for _ in range(60):
            assert await one_client() == list(range(1, 51))

    asyncio.run(main())
