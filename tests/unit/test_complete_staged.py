"""A completion that marks its outcome staged by the record that carries it, in the same script (for
an outcome published in a Kafka transaction, whose mark comes before the send anyway), on a real
redis-server and a Redis Cluster: marked only when the result is written under the holder's fence."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Completion, Ledger

FP = "sha256:staged"
AT = "t.tasks[2]@41"


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]]) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"c{uuid.uuid4().hex[:8]}"), lease_ms=300, ttl_s=600))
        finally:
            await close(client)

    asyncio.run(main())


async def complete(ledger: Ledger, key: str, fence: int, result: str = '{"a":1}') -> Completion:
    return await ledger.complete(key, fence, result=result, digest=f"d-{result}", event=result.encode(),
                                 model="m", prompt_version="p1", staged_by=AT)


def test_the_completion_marks_the_outcome_staged_by_its_record_in_one_script(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        claim = await ledger.claim("t1", FP, "w1", "classify")
        calls = ledger.batcher.calls
        done = await complete(ledger, "t1", claim.fence)
        assert (done.status, done.marked) == ("ok", True)
        assert ledger.batcher.calls == calls + 1
        again = await ledger.claim("t1", FP, "w2", "classify")
        assert (again.decision, again.published_by, again.published_how) == ("succeeded", AT, "staged")
        record = await ledger.get("t1")
        assert record is not None and record.fields["published"] == AT  # the previous version reads it too

    with_ledger(any_redis_url, body)


def test_a_refused_or_repeated_completion_marks_nothing(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        other = Ledger(ledger.client, keys=ledger.keys, lease_ms=300, ttl_s=600)
        a = await other.claim("t2", FP, "wa", "classify")
        await asyncio.sleep(0.4)  # a's lease runs out
        b = await ledger.claim("t2", FP, "wb", "classify")
        stale = await complete(other, "t2", a.fence, '{"old":1}')
        assert (stale.status, stale.marked) == ("stale", False)
        assert (await ledger.get("t2")) is not None
        assert (await ledger.claim("t2", FP, "wc", "classify")).decision == "busy"  # b holds it, unmarked
        assert (await ledger.complete("t2", b.fence, result="{}", digest="d", event=b"{}", model="m",
                                      prompt_version="p1")).marked is False  # not asked: not marked
        assert not (await ledger.claim("t2", FP, "wc", "classify")).published
        repeated = await complete(ledger, "t2", b.fence)
        assert (repeated.status, repeated.marked) == ("already", False)  # the publishing block marks it
        assert not (await ledger.claim("t2", FP, "wc", "classify")).published

    with_ledger(any_redis_url, body)
