"""The batch lane's journal (``dedup.batches``) on a real Redis, one server and a cluster: calls
queued once by custom id, sealed into numbered batches when a group is full or old, a sealed call
found again instead of queued twice, the provider's batch id journaled first writer wins, one
lease holder per batch, and a batch ended (its lines dropped) once every call is decided."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from dedup.batches import Batches
from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger

pytestmark = pytest.mark.integration

T0 = 1_800_000_000_000


def with_batches(redis_url: str, body: Callable[[Batches], Awaitable[None]]) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Batches(Ledger(client, keys=Keys(f"b{uuid.uuid4().hex[:8]}"), ttl_s=600)))
        finally:
            await close(client)

    asyncio.run(main())


def test_a_group_is_sealed_when_full_or_old_and_each_call_goes_into_one_batch(any_redis_url: str) -> None:
    async def body(b: Batches) -> None:
        for i in range(5):
            assert await b.enqueue("g", f"c{i}", f"t{i}", "answer", f"line{i}", T0 + i) == ("queued", 0)
        assert await b.enqueue("g", "c0", "t0", "answer", "line0", T0 + 9) == ("had", 0), "queued twice"
        assert await b.seal("g", max_size=10, max_age_ms=1000, now_ms=T0 + 500) == 0, "neither full nor old"
        assert await b.seal("g", max_size=3, max_age_ms=1000, now_ms=T0 + 500) == 1, "full"
        assert await b.seal("g", max_size=3, max_age_ms=1000, now_ms=T0 + 500) == 0, "two left: not full"
        assert await b.seal("g", max_size=3, max_age_ms=1000, now_ms=T0 + 1003) == 2, "its oldest is old"
        assert await b.seal("g", max_size=3, max_age_ms=1000, now_ms=T0 + 5000) == 0, "nothing left"
        first, second = await b.sealed("g", 1), await b.sealed("g", 2)
        assert first is not None and second is not None
        assert first.ids == ("c0", "c1", "c2") and second.ids == ("c3", "c4"), "oldest first, each once"
        assert first.state == "sealed" and first.batch_id == "" and first.name == "g:1"
        assert await b.enqueue("g", "c1", "t1", "answer", "line1", T0 + 6000) == ("sealed", 1), \
            "a call queued again after a crash finds its batch"
        assert await b.seal("g", max_size=1, max_age_ms=0, now_ms=T0 + 7000) == 0
        assert await b.pending("g") == [1, 2]
        assert await b.groups() == ["g"]
        lines = await b.lines("g", first.ids)
        assert lines["c2"] == {"task": "t2", "step": "answer", "line": "line2"}

    with_batches(any_redis_url, body)


def test_the_batch_id_is_journaled_once_and_a_batch_ends_when_every_call_is_decided(any_redis_url: str) -> None:
    async def body(b: Batches) -> None:
        for i in range(3):
            await b.enqueue("g", f"c{i}", f"t{i}", "answer", f"line{i}", T0)
        n = await b.seal("g", max_size=3, max_age_ms=0, now_ms=T0)
        assert await b.submitted("g", n, "batch-1", "file-1") == "batch-1"
        assert await b.submitted("g", n, "batch-2", "file-2") == "batch-1", "the first id written wins"
        assert await b.submitted("g", 99, "batch-3", "file-3") == "", "no such batch"
        sealed = await b.sealed("g", n)
        assert sealed is not None and sealed.state == "submitted" and sealed.file_id == "file-1"
        assert await b.decided("g", n, ["c1"]) == 2
        assert await b.decided("g", n, ["c1"]) == 2, "a call decided twice counts once"
        sealed = await b.sealed("g", n)
        assert sealed is not None and sealed.left == ("c0", "c2")
        assert await b.decided("g", n, ["c0", "c2"]) == 0
        ended = await b.sealed("g", n)
        assert ended is not None and ended.state == "ended" and ended.left == ()
        assert await b.pending("g") == []
        assert await b.lines("g", ended.ids) == {}, "an ended batch's request lines are dropped"

    with_batches(any_redis_url, body)


def test_one_worker_holds_a_batch_at_a_time(any_redis_url: str) -> None:
    async def body(b: Batches) -> None:
        assert await b.lease("g", 1, "w1", 60_000)
        assert not await b.lease("g", 1, "w2", 60_000), "another worker holds it"
        assert await b.lease("g", 1, "w1", 60_000), "its holder renews it"
        assert await b.lease("g", 2, "w2", 60_000), "another batch is free"
        await b.release("g", 1, "w2")  # not the holder: nothing happens
        assert not await b.lease("g", 1, "w2", 60_000)
        await b.release("g", 1, "w1")
        assert await b.lease("g", 1, "w2", 200)
        await asyncio.sleep(0.5)
        assert await b.lease("g", 1, "w3", 60_000), "a lease its holder stopped renewing runs out"

    with_batches(any_redis_url, body)
