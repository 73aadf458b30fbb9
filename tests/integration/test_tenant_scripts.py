"""The tenants' Redis scripts on a real redis-server (and a Redis Cluster): weighted shares of a
contended quota, the interactive reserve kept, bounded state, and hard budgets reserved atomically."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from dedup.client import close, connect
from service.core.metrics import Metrics
from service.core.settings import TenancySettings
from service.llm.guard import RateLimiter
from service.llm.tenancy import OverBudget, Tenancy, TenantBudgets

pytestmark = pytest.mark.integration


def run(redis_url: str, body: Any) -> Any:
    async def main() -> Any:
        client = connect(redis_url)
        try:
            return await body(client, f"t{uuid.uuid4().hex[:8]}")
        finally:
            await close(client)

    return asyncio.run(main())


async def drain(limiter: RateLimiter) -> None:
    """Empty the buckets, as a fleet that has been busy for a while finds them."""
    server_s, micros = await limiter.redis.time()
    await limiter.redis.hset(limiter.key, mapping={"ts": server_s * 1000 + micros // 1000, "req": 0, "tok": 0})


def test_a_lone_tenant_may_use_the_whole_quota(any_redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        limiter = RateLimiter(client, "http://llm/v1", Metrics(), rpm=10, interactive_reserve=0.0, key_prefix=prefix)
        other = RateLimiter(client, "http://llm/v1", Metrics(), rpm=10, interactive_reserve=0.0, key_prefix=prefix)
        grants = [await (limiter if i % 2 else other)._try("batch", 1, "acme", 3.0) for i in range(12)]
        assert [w == 0 for w, _ in grants] == [True] * 10 + [False] * 2
        assert not any(y for _, y in grants)  # it never yields to itself

    run(any_redis_url, body)


def test_a_tenant_ahead_yields_room_to_a_tenant_behind_that_waits(any_redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        limiter = RateLimiter(client, "http://llm/v1", Metrics(), rpm=600, interactive_reserve=0.0,
                              key_prefix=prefix)
        for _ in range(20):  # acme has used 20 of the quota, alone
            assert await limiter.try_acquire("batch", 1, "acme") == 0
        await drain(limiter)
        wait, yielded = await limiter._try("batch", 1, "beta", 1.0)  # beta finds no room: it waits
        assert wait > 0 and not yielded
        await asyncio.sleep(0.3)  # room for a few calls again (one per 100 ms)
        wait, yielded = await limiter._try("batch", 1, "acme", 1.0)
        assert wait > 0 and yielded  # acme is ahead of beta, which waits: acme yields the room
        assert await limiter.try_acquire("batch", 1, "beta") == 0  # and beta takes it

    run(any_redis_url, body)


def test_interactive_work_keeps_its_reserve_over_a_batch_tenant_behind(any_redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        limiter = RateLimiter(client, "http://llm/v1", Metrics(), rpm=10, interactive_reserve=0.5, key_prefix=prefix)
        for _ in range(5):  # acme's batch work uses the batch share
            assert await limiter.try_acquire("batch", 1, "acme") == 0
        wait, _ = await limiter._try("batch", 1, "beta", 1.0)
        assert wait > 0  # beta (batch, behind acme) waits: only the reserve is left
        # acme's interactive work takes the reserve: beta's batch work could not use it anyway
        assert await limiter.try_acquire("interactive", 1, "acme") == 0
        wait, _ = await limiter._try("batch", 1, "beta", 1.0)
        assert wait > 0

    run(any_redis_url, body)


def test_contended_tenants_share_the_quota_by_weight(redis_url: str) -> None:
    """Two replicas' callers, four per tenant, poll a drained 6000-per-minute quota for 4 s."""

    async def body(client: Any, prefix: str) -> Counter[str]:
        replicas = [RateLimiter(client, "http://llm/v1", Metrics(), rpm=6000, interactive_reserve=0.0,
                                key_prefix=prefix, half_life_s=5) for _ in range(2)]
        await drain(replicas[0])
        grants: Counter[str] = Counter()
        stop = time.monotonic() + 4.0

        async def caller(limiter: RateLimiter, tenant: str, weight: float) -> None:
            while time.monotonic() < stop:
                await limiter.acquire("batch", 1, tenant, weight)
                if time.monotonic() < stop:
                    grants[tenant] += 1

        await asyncio.gather(*(caller(replicas[i % 2], t, w) for i in range(4) for t, w in (("a", 3.0), ("b", 1.0))))
        return grants

    grants = run(redis_url, body)
    ratio = grants["a"] / grants["b"]
    print(f"grants {dict(grants)}, ratio {ratio:.2f}")
    assert 300 <= sum(grants.values()) <= 420  # the quota was used, not more: 100/s for 4 s
    assert 2.5 <= ratio <= 3.5, grants


def test_fairness_state_stays_bounded_whatever_tenants_producers_send(redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        limiter = RateLimiter(client, "http://llm/v1", Metrics(), rpm=60, interactive_reserve=0.0,
                              key_prefix=prefix, half_life_s=0.02)
        for i in range(300):
            await limiter.try_acquire("batch", 1, f"t{i}")
        fair, wait_i, wait_b, expiry, seen = limiter.keys[1:]
        assert await client.zcard(seen) == 300
        await asyncio.sleep(2.5)  # 20 half-lives idle, and every waiter's expiry passed
        for _ in range(6):
            await limiter.try_acquire("batch", 1, "acme")
        assert await client.zcard(seen) <= 1
        assert await client.hlen(fair) <= 2
        assert await client.zcard(wait_b) <= 1 and await client.zcard(expiry) <= 1

    run(redis_url, body)


def budgets(client: Any, prefix: str, **tenancy: Any) -> TenantBudgets:
    return TenantBudgets(client, Tenancy(TenancySettings.model_validate(tenancy)), key_prefix=prefix)


def test_a_budget_is_reserved_exactly_under_concurrency(any_redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        replicas = [budgets(client, prefix, tenants={"acme": {"budget_tokens": 1000}, "default": {"budget_tokens": 0}})
                    for _ in range(3)]

        async def one(i: int) -> bool:
            try:
                await replicas[i % 3].reserve("acme", 100)
                return True
            except OverBudget:
                return False

        granted = await asyncio.gather(*(one(i) for i in range(50)))
        assert sum(granted) == 10  # 10 x 100 = the budget, never 11
        assert await replicas[0].used("acme") == 1000
        # the default tenant is named with no budget: neither it nor a tenant not named reserves anything
        assert await replicas[0].reserve("other-tenant", 10**9) is None

    run(any_redis_url, body)


def test_a_task_of_no_tenant_or_of_a_tenant_not_named_spends_the_default_budget(any_redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        b = budgets(client, prefix, tenants={"acme": {"budget_tokens": 1000}, "default": {"budget_tokens": 300}})
        assert b.applies("zeta") and b.applies("") and b.applies("default")
        first = await b.reserve("zeta", 100)
        assert first is not None and first.tenant == "default"
        assert await b.reserve("", 100) is not None
        assert await b.reserve("default", 100) is not None
        assert await b.used("zeta") == await b.used("default") == 300
        for tenant in ("zeta", "", "omega", "default"):  # every tenant without a budget of its own: spent
            with pytest.raises(OverBudget):
                await b.reserve(tenant, 1)
        assert await b.reserve("acme", 1000) is not None  # a named tenant's own budget is apart
        await b.settle(first, 40)
        assert await b.used("omega") == 240

    run(any_redis_url, body)


def test_a_reservation_is_corrected_with_what_the_call_used(any_redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        b = budgets(client, prefix, default_budget_tokens=300)
        first = await b.reserve("acme", 200)
        with pytest.raises(OverBudget) as over:
            await b.reserve("acme", 200)
        assert not over.value.never and 0 < over.value.wait_s <= 86_400
        await b.settle(first, 50)  # the endpoint reported 50
        assert await b.used("acme") == 50
        assert await b.reserve("acme", 200) is not None  # 250 fits now
        with pytest.raises(OverBudget) as never:
            await b.reserve("acme", 301)
        assert never.value.never  # more than the whole budget: it can never go

    run(any_redis_url, body)


def test_a_budget_starts_over_each_period(redis_url: str) -> None:
    async def body(client: Any, prefix: str) -> None:
        b = budgets(client, prefix, default_budget_tokens=100, budget_period_s=1)
        while True:  # start early in a period
            first = await b.reserve("acme", 100)
            with pytest.raises(OverBudget) as over:
                await b.reserve("acme", 1)
            if over.value.wait_s > 0.3:
                break
            await asyncio.sleep(over.value.wait_s + 0.01)
        await asyncio.sleep(over.value.wait_s + 0.05)
        assert await b.reserve("acme", 100) is not None  # a new period
        await b.settle(first, 0)  # a correction of an ended period does not touch the new one
        assert await b.used("acme") == 100

    run(redis_url, body)
