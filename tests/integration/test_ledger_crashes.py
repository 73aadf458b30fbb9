"""A worker's death is not the task's failure: the ledger gives back the attempt it cut short and
counts the death apart, with its own bound. Real redis-server (and Redis Cluster)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.leases import LeaseKeeper
from dedup.ledger import Attempt, Ledger, StaleFence

pytestmark = pytest.mark.integration

FP = "sha256:ccc"
LEASE_MS = 300
PAST_LEASE_S = 0.45  # longer than a lease: the holder is taken for dead


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]], **kwargs: int) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"t{uuid.uuid4().hex[:8]}"), lease_ms=LEASE_MS, ttl_s=600,
                              **kwargs))
        finally:
            await close(client)

    asyncio.run(main())


def process(ledger: Ledger) -> Ledger:
    """The ledger of another worker process: on the same Redis, with claims of its own."""
    return Ledger(ledger.client, keys=ledger.keys, lease_ms=ledger.lease_ms, ttl_s=ledger.ttl_s,
                  max_deaths=ledger.max_deaths)


def test_an_attempt_cut_short_by_a_death_is_given_back(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("c1", FP, "wa", "classify")
        assert await ledger.begin_attempt("c1", a.fence, "s", 2) == Attempt(step=1, total=1)
        # the first call failed (the task's fault); the second is under way when the worker dies
        assert await ledger.begin_attempt("c1", a.fence, "s", 2) == Attempt(step=2, total=2)
        await asyncio.sleep(PAST_LEASE_S)
        b = await process(ledger).claim("c1", FP, "wb", "classify")
        assert (b.decision, b.fence, b.attempts) == ("claimed", a.fence + 1, 1)  # the cut-short one given back
        # the step has its second attempt still: the death did not spend it
        assert await ledger.begin_attempt("c1", b.fence, "s", 2) == Attempt(step=2, total=2)
        record = await ledger.get("c1")
        assert record is not None and record.to_json()["deaths"] == 1
        with pytest.raises(StaleFence):  # the dead holder, were it only frozen, writes nothing
            await ledger.begin_attempt("c1", a.fence, "s", 2)

    with_ledger(any_redis_url, body)


def test_a_task_that_keeps_killing_its_workers_ends_crashed(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        fence = (await ledger.claim("c2", FP, "w0", "classify")).fence
        for death in range(1, 3):
            await ledger.begin_attempt("c2", fence, "s", 4)
            await asyncio.sleep(PAST_LEASE_S)
            again = await process(ledger).claim("c2", FP, f"w{death}", "classify")
            assert (again.decision, again.attempts) == ("claimed", 0)
            fence = again.fence
        # a holder that dies with no call under way (waiting for the endpoint) cut nothing short
        await asyncio.sleep(PAST_LEASE_S)
        idle = await process(ledger).claim("c2", FP, "w3", "classify")
        assert idle.decision == "claimed"
        record = await ledger.get("c2")
        assert record is not None and record.to_json()["deaths"] == 2
        await ledger.begin_attempt("c2", idle.fence, "s", 4)
        await asyncio.sleep(PAST_LEASE_S)
        third = await process(ledger).claim("c2", FP, "w4", "classify")  # the third death: the bound
        assert third.decision == "crashed" and third.attempts == 0
        record = await ledger.get("c2")
        assert record is not None
        assert (record.state, record.fields["dead_reason"], record.to_json()["deaths"]) == ("dead", "crashed", 3)
        assert (await process(ledger).claim("c2", FP, "w5", "classify")).decision == "dead"  # ends once
        assert not await ledger.heartbeat("c2", idle.fence)
        assert await ledger.revive("c2")  # an operator redrives it: its deaths start over with its steps
        fresh = await process(ledger).claim("c2", FP, "w6", "classify")
        assert fresh.decision == "claimed"
        record = await ledger.get("c2")
        assert record is not None and record.to_json()["deaths"] == 0

    with_ledger(any_redis_url, body, max_deaths=3)


def test_an_attempt_whose_outcome_is_known_is_not_given_back(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        # failed (the task's fault), then the worker dies while it backs off: the attempt stays spent
        a = await ledger.claim("c3", FP, "wa", "classify")
        await ledger.begin_attempt("c3", a.fence, "s", 3)
        assert await ledger.end_attempt("c3", a.fence, "s")
        await asyncio.sleep(PAST_LEASE_S)
        b = await process(ledger).claim("c3", FP, "wb", "classify")
        assert (b.decision, b.attempts) == ("claimed", 1)
        # refunded (the endpoint's fault), then the worker dies: nothing to give back twice
        await ledger.begin_attempt("c3", b.fence, "s", 3)
        assert await ledger.refund_attempt("c3", b.fence, "s")
        await asyncio.sleep(PAST_LEASE_S)
        c = await process(ledger).claim("c3", FP, "wc", "classify")
        assert (c.decision, c.attempts) == ("claimed", 1)
        # released as failed: a reclaim is no death, and the attempt it made is spent
        await ledger.begin_attempt("c3", c.fence, "s", 3)
        assert await ledger.fail("c3", c.fence, "gave up for now")
        d = await process(ledger).claim("c3", FP, "wd", "classify")
        assert (d.decision, d.attempts) == ("claimed", 2)
        record = await ledger.get("c3")
        assert record is not None and record.to_json()["deaths"] == 0
        assert not await ledger.end_attempt("c3", c.fence, "s")  # an older fence closes nothing

    with_ledger(any_redis_url, body)


def test_concurrent_steps_each_get_their_cut_short_attempt_back(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("c4", FP, "wa", "prior_auth")
        await ledger.begin_attempt("c4", a.fence, "left", 2)
        await ledger.begin_attempt("c4", a.fence, "right", 2)
        await ledger.record_step("c4", a.fence, "left", {"output": {}})  # left answered and is journaled
        await asyncio.sleep(PAST_LEASE_S)
        b = await process(ledger).claim("c4", FP, "wb", "prior_auth")
        assert (b.decision, b.attempts) == ("claimed", 1)  # only right's call was cut short
        assert await ledger.begin_attempt("c4", b.fence, "right", 1) == Attempt(step=1, total=2)

    with_ledger(any_redis_url, body)


def test_a_renewal_racing_the_holders_own_completion_is_no_lost_lease(
    any_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(ledger: Ledger) -> None:
        keeper = LeaseKeeper(ledger)
        a = await ledger.claim("c5", FP, "wa", "classify")
        b = await ledger.claim("c6", FP, "wa", "classify")
        with keeper.hold("c5", a.fence, 0.02), keeper.hold("c6", b.fence, 0.02):
            done = await ledger.complete("c5", a.fence, result="{}", digest="d", event=b"{}", model="m",
                                         prompt_version="p")
            assert done.status == "ok"
            assert await ledger.fail("c6", b.fence, "no", dead_reason="permanent")
            await asyncio.sleep(0.3)  # renewals fall due many times over
        lost = [r for r in caplog.records if "lease lost" in r.getMessage() and r.levelno >= logging.INFO]
        assert lost == []

    caplog.set_level(logging.DEBUG, logger="dedup.leases")
    with_ledger(any_redis_url, body)


def test_a_renewal_refused_for_a_newer_fence_is_still_a_lost_lease(
    any_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(ledger: Ledger) -> None:
        keeper = LeaseKeeper(ledger)
        a = await ledger.claim("c7", FP, "wa", "classify")
        with keeper.hold("c7", a.fence, 0.2):  # the first renewal falls due after the takeover
            await ledger.client.hset(ledger.keys.task("c7"), mapping={"lease_until": 0})  # as if expired
            assert (await process(ledger).claim("c7", FP, "wb", "classify")).decision == "claimed"
            await asyncio.sleep(0.6)
        assert any("lease lost" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    caplog.set_level(logging.DEBUG, logger="dedup.leases")
    with_ledger(any_redis_url, body)


def test_the_same_worker_claiming_again_is_alive_and_its_call_stays_counted(any_redis_url: str) -> None:
    """A worker that retries its own record (a failure of its own code, an outage) did not die; a
    process started anew under the same worker id did."""
    async def body(ledger: Ledger) -> None:
        a = await ledger.claim("c8", FP, "wa", "classify")
        await ledger.begin_attempt("c8", a.fence, "s", 3)
        await asyncio.sleep(PAST_LEASE_S)
        again = await ledger.claim("c8", FP, "wa", "classify")
        assert (again.decision, again.fence, again.attempts) == ("claimed", a.fence + 1, 1)
        record = await ledger.get("c8")
        assert record is not None and record.to_json()["deaths"] == 0
        await ledger.begin_attempt("c8", again.fence, "s", 3)
        await asyncio.sleep(PAST_LEASE_S)
        after = await process(ledger).claim("c8", FP, "wa", "classify")  # started anew, same worker id
        assert (after.decision, after.attempts) == ("claimed", 1)
        record = await ledger.get("c8")
        assert record is not None and record.to_json()["deaths"] == 1

    with_ledger(any_redis_url, body)
