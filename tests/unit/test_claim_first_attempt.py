"""A claim that counts the first attempt of a step with it (one script, one round trip), on a real
redis-server and a Redis Cluster: the attempt counted is the one the step's first call then takes,
under the same fence and with the same accounting as a separate count; a claim that does not hold
the task counts nothing; an attempt no call took is given back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Attempt, AttemptsExhausted, Ledger, StaleFence

FP = "sha256:first"


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]], lease_ms: int = 300) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"f{uuid.uuid4().hex[:8]}"), lease_ms=lease_ms, ttl_s=600))
        finally:
            await close(client)

    asyncio.run(main())


async def fields(ledger: Ledger, key: str) -> dict[str, str]:
    raw = await ledger.client.hgetall(ledger.keys.task(key))
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


def test_the_claim_counts_the_first_attempt_and_the_first_call_takes_it(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        claim = await ledger.claim("t1", FP, "w1", "classify", first_attempt=("s", 3))
        assert (claim.decision, claim.fence, claim.attempts) == ("claimed", 1, 0)
        assert ledger.batcher.calls == 1  # claim and count: one script
        stored = await fields(ledger, "t1")
        assert (stored["attempts"], stored["attempts:s"], stored["open:s"]) == ("1", "1", "1")
        assert await ledger.begin_attempt("t1", 1, "s", 3) == Attempt(step=1, total=1)
        assert ledger.batcher.calls == 1  # counted by the claim: no second script
        assert await ledger.begin_attempt("t1", 1, "s", 3) == Attempt(step=2, total=2)  # the next is counted
        assert ledger.batcher.calls == 2
        assert (await fields(ledger, "t1"))["attempts"] == "2"

    with_ledger(any_redis_url, body)


def test_a_claim_that_does_not_hold_the_task_counts_nothing(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        holder = Ledger(ledger.client, keys=ledger.keys, lease_ms=300, ttl_s=600)  # another worker
        await holder.claim("t2", FP, "w1", "classify", first_attempt=("s", 3))
        busy = await ledger.claim("t2", FP, "w2", "classify", first_attempt=("s", 3))
        conflict = await ledger.claim("t2", "sha256:other", "w2", "classify", first_attempt=("s", 3))
        assert (busy.decision, conflict.decision) == ("busy", "conflict")
        assert (await fields(ledger, "t2"))["attempts"] == "1"  # the holder's only
        with pytest.raises(AttemptsExhausted):  # nothing kept here for the holder's fence: Redis answers
            await ledger.begin_attempt("t2", 1, "s", 1)

    with_ledger(any_redis_url, body)


def test_a_stale_holder_cannot_count_again_and_the_new_claim_gives_its_open_attempt_back(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        other = Ledger(ledger.client, keys=ledger.keys, lease_ms=300, ttl_s=600)  # another worker
        a = await other.claim("t3", FP, "wa", "classify", first_attempt=("s", 3))
        await asyncio.sleep(0.4)  # a died in its call: its lease (300 ms) runs out
        b = await ledger.claim("t3", FP, "wb", "classify", first_attempt=("s", 3))
        assert (b.decision, b.fence) == ("claimed", a.fence + 1)
        stored = await fields(ledger, "t3")
        # a's open attempt given back and its death counted; b's first attempt counted
        assert (stored["attempts"], stored["attempts:s"], stored["deaths"]) == ("1", "1", "1")
        assert await ledger.begin_attempt("t3", b.fence, "s", 3) == Attempt(step=1, total=1)
        with pytest.raises(StaleFence):  # its kept attempt is older than a lease renewal: Redis answers
            await other.begin_attempt("t3", a.fence, "s", 3)
        assert (await other.complete("t3", a.fence, result="{}", digest="d", event=b"{}", model="m",
                                     prompt_version="p")).status == "stale"  # its result is refused

    with_ledger(any_redis_url, body)


def test_an_exhausted_step_counts_nothing_at_the_claim(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("t4", FP, "w1", "classify", first_attempt=("s", 2))
        await ledger.begin_attempt("t4", a.fence, "s", 2)
        await ledger.begin_attempt("t4", a.fence, "s", 2)
        assert await ledger.fail("t4", a.fence, "boom")
        b = await ledger.claim("t4", FP, "w1", "classify", first_attempt=("s", 2))
        assert (b.decision, b.attempts) == ("claimed", 2)
        assert (await fields(ledger, "t4"))["attempts"] == "2"
        with pytest.raises(AttemptsExhausted) as raised:
            await ledger.begin_attempt("t4", b.fence, "s", 2)
        assert raised.value.total == 2

    with_ledger(any_redis_url, body)


def test_an_attempt_no_call_took_is_given_back(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("t5", FP, "w1", "classify", first_attempt=("s", 3))
        await ledger.give_back_first_attempt("t5", a.fence)
        stored = await fields(ledger, "t5")
        assert (stored["attempts"], stored["attempts:s"]) == ("0", "0") and "open:s" not in stored
        await ledger.give_back_first_attempt("t5", a.fence)  # once only
        assert (await fields(ledger, "t5"))["attempts"] == "0"
        assert await ledger.begin_attempt("t5", a.fence, "s", 3) == Attempt(step=1, total=1)  # counted anew

    with_ledger(any_redis_url, body)


def test_an_attempt_for_another_step_is_not_taken(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("t6", FP, "w1", "classify", first_attempt=("s", 3))
        assert await ledger.begin_attempt("t6", a.fence, "other", 3) == Attempt(step=1, total=2)
        await ledger.give_back_first_attempt("t6", a.fence)  # the one for "s" no call took
        stored = await fields(ledger, "t6")
        assert (stored["attempts"], stored["attempts:s"], stored["attempts:other"]) == ("1", "0", "1")

    with_ledger(any_redis_url, body)
