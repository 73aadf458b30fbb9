"""A schedule's side of the ledger (``ledger.schedules``) on a real Redis, one server and a cluster:
its lease is one worker's at a time and expires; ``advance`` moves ``last_ms`` only for the lease's
holder and only from the value read (``lost``, ``moved`` otherwise, nothing written); the counts add
up; ``start`` sets ``last_ms`` once; and Redis away is the ledger's outage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger, LedgerUnavailable
from dedup.schedules import ScheduleState
from service.devtools import local

pytestmark = pytest.mark.integration


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"s{uuid.uuid4().hex[:8]}"), ttl_s=600, **kwargs))
        finally:
            await close(client)

    asyncio.run(main())


def test_the_lease_is_one_workers_at_a_time_and_expires(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        schedules = ledger.schedules
        assert await schedules.lease("nightly", "w1", 800)
        assert not await schedules.lease("nightly", "w2", 800)  # w1 holds it
        assert await schedules.lease("nightly", "w1", 800)  # its holder extends it
        assert await schedules.holder("nightly") == "w1"
        assert await schedules.lease("hourly", "w2", 800)  # another schedule, another lease
        deadline = time.monotonic() + 30
        while not await schedules.lease("nightly", "w2", 60_000):  # w1 stops extending: it expires
            assert time.monotonic() < deadline, "the lease never expired"
            await asyncio.sleep(0.1)
        assert await schedules.holder("nightly") == "w2"
        assert not await schedules.release("nightly", "w1")  # not its lease any more: left alone
        assert await schedules.holder("nightly") == "w2"
        assert await schedules.release("nightly", "w2")
        assert await schedules.holder("nightly") is None
        assert await schedules.lease("nightly", "w1", 60_000)  # free again: anyone takes it

    with_ledger(any_redis_url, body)


def test_start_sets_the_first_sight_once(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        schedules = ledger.schedules
        assert await schedules.status("nightly") is None
        assert await schedules.start("nightly", 1_000)
        assert not await schedules.start("nightly", 5_000)  # HSETNX: another replica's first sight loses
        assert await schedules.status("nightly") == ScheduleState(last_ms=1_000, last_fired_ms=None, produced=0,
                                                                   skipped=0)

    with_ledger(any_redis_url, body)


def test_advance_needs_the_lease_and_the_last_slot_read(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        schedules = ledger.schedules
        await schedules.start("nightly", 1_000)
        # nobody holds the lease: lost, nothing written
        assert await schedules.advance("nightly", "w1", 1_000, 2_000, 1, 0, 2_100) == "lost"
        assert await schedules.lease("nightly", "w1", 60_000)
        # another worker, with the right last slot: lost
        assert await schedules.advance("nightly", "w2", 1_000, 2_000, 1, 0, 2_100) == "lost"
        # the holder with a stale last slot (another holder advanced since it read): moved
        assert await schedules.advance("nightly", "w1", 500, 2_000, 1, 0, 2_100) == "moved"
        assert await schedules.status("nightly") == ScheduleState(1_000, None, 0, 0)
        assert await schedules.advance("nightly", "w1", 1_000, 2_000, 1, 3, 2_100) == "ok"
        assert await schedules.advance("nightly", "w1", 1_000, 3_000, 1, 0, 3_100) == "moved"  # read before: stale
        assert await schedules.advance("nightly", "w1", 2_000, 5_000, 2, 1, 5_050) == "ok"
        assert await schedules.advance("nightly", "w1", 5_000, 9_000, 0, 4, None) == "ok"  # skips only
        assert await schedules.status("nightly") == ScheduleState(last_ms=9_000, last_fired_ms=5_050, produced=3,
                                                                   skipped=8)

    with_ledger(any_redis_url, body)


def test_advance_from_no_last_slot_counts_it_as_minus_one(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        schedules = ledger.schedules
        assert await schedules.lease("fresh", "w1", 60_000)
        assert await schedules.advance("fresh", "w1", 0, 1_000, 1, 0, 1_000) == "moved"
        assert await schedules.advance("fresh", "w1", -1, 1_000, 1, 0, 1_000) == "ok"
        assert await schedules.status("fresh") == ScheduleState(1_000, 1_000, 1, 0)

    with_ledger(any_redis_url, body)


def test_holders_racing_on_one_slot_advance_it_once(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        schedules = ledger.schedules
        await schedules.start("busy", 0)
        assert await schedules.lease("busy", "w1", 60_000)
        answers = await asyncio.gather(*(schedules.advance("busy", "w1", 0, 1_000, 1, 0, 1_000) for _ in range(10)))
        assert sorted(answers) == ["moved"] * 9 + ["ok"]
        assert await schedules.status("busy") == ScheduleState(1_000, 1_000, 1, 0)

    with_ledger(any_redis_url, body)


def test_bad_arguments_are_refused_before_redis(redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        schedules = ledger.schedules
        with pytest.raises(ValueError, match="never back"):
            await schedules.advance("nightly", "w1", 2_000, 1_000, 0, 0, None)
        with pytest.raises(ValueError, match="negative"):
            await schedules.advance("nightly", "w1", 0, 1_000, -1, 0, None)
        with pytest.raises(ValueError, match="at least 1 ms"):
            await schedules.lease("nightly", "w1", 0)
        with pytest.raises(ValueError, match="invalid schedule name"):
            await schedules.status("a{b}")

    with_ledger(redis_url, body)


def test_redis_away_is_the_ledgers_outage(tmp_path: Any) -> None:
    server = local.start_redis(tmp_path / "redis")

    async def body(ledger: Ledger) -> None:
        schedules = ledger.schedules
        assert await schedules.lease("nightly", "w1", 60_000)
        await asyncio.to_thread(server.stop)
        for call in (lambda: schedules.lease("nightly", "w1", 60_000), lambda: schedules.status("nightly"),
                     lambda: schedules.start("nightly", 0), lambda: schedules.release("nightly", "w1"),
                     lambda: schedules.advance("nightly", "w1", -1, 1_000, 1, 0, 1_000)):
            with pytest.raises(LedgerUnavailable):
                await call()

    try:
        with_ledger(f"redis://{server.address}/0", body, wait_timeout_ms=500)
    finally:
        server.stop()
