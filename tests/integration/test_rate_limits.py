"""Requests and tokens per minute shared through Redis, with a reserved share for interactive work;
and replay divergence measured in shadow."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from dedup.client import close, connect
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.llm.guard import RateLimiter
from tests.support import classify, metric, produce, running, wait_for

pytestmark = pytest.mark.integration


def with_limiter(redis_url: str, body: Any, **limits: Any) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            prefix = f"t{uuid.uuid4().hex[:8]}"
            a = RateLimiter(client, "http://llm/v1", Metrics(), key_prefix=prefix, **limits)
            b = RateLimiter(client, "http://llm/v1", Metrics(), key_prefix=prefix, **limits)  # another replica
            await body(a, b)
        finally:
            await close(client)

    asyncio.run(main())


def test_requests_per_minute_keep_a_share_for_interactive_work(any_redis_url: str) -> None:
    async def body(a: RateLimiter, b: RateLimiter) -> None:
        granted = [await (a if i % 2 else b).try_acquire("batch", 1) == 0 for i in range(5)]
        assert granted == [True, True, True, False, False]  # batch may use 60% of 5
        assert await a.try_acquire("interactive", 1) == 0
        assert await b.try_acquire("interactive", 1) == 0
        wait = await a.try_acquire("interactive", 1)
        assert 0 < wait <= 60  # the window is spent for everyone: wait for the next one

    with_limiter(any_redis_url, body, rpm=5, interactive_reserve=0.4)


def test_budget_refills_continuously_so_no_burst_crosses_a_minute_edge(any_redis_url: str) -> None:
    """A spent budget of 3 per minute frees one call every 20 s, whatever the wall clock's minute."""

    async def body(a: RateLimiter, b: RateLimiter) -> None:
        assert [await a.try_acquire("batch", 1) for _ in range(3)] == [0, 0, 0]
        waits = [await (a if i % 2 else b).try_acquire("batch", 1) for i in range(4)]
        # a fixed minute window would answer "until the minute ends" (0-60 s), or 0 right after it
        assert all(19 < w <= 20 for w in waits), waits

    with_limiter(any_redis_url, body, rpm=3, interactive_reserve=0.0)


def test_tokens_are_estimated_then_reconciled(any_redis_url: str) -> None:
    async def body(a: RateLimiter, b: RateLimiter) -> None:
        assert await a.try_acquire("interactive", 40) == 0
        assert await b.try_acquire("interactive", 40) == 0
        assert await a.try_acquire("interactive", 40) > 0  # 120 > 100
        await a.reconcile(40, 10)  # the endpoint reported 10, not 40
        await b.reconcile(40, 10)
        assert await a.try_acquire("interactive", 40) == 0  # 20 + 40 fits again

    with_limiter(any_redis_url, body, tpm=100, interactive_reserve=0.0)


def test_spent_budget_holds_tasks_instead_of_calling(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={"rpm": 3, "interactive_reserve": 0.0}, drain_timeout_s=1, max_in_flight=4)

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(f"rl-{i}".encode(), classify(f"rl-{i}", f"t{i}")) for i in range(8)])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 3, what="three calls")
            await wait_for(lambda: metric(svc, "agent_rate_limit_waits_total", {"priority": "batch"}) > 0, what="waits")
            await wait_for(lambda: metric(svc, "agent_paused_partitions") > 0, what="backpressure")
            await asyncio.sleep(1.0)
            assert fake_llm.stats()["requests"] == 3  # waiting, not spinning against the endpoint

    asyncio.run(scenario())


def test_shadow_runs_measure_replay_divergence_without_writing(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={"shadow_sample_rate": 1.0})

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            value = classify("sh-1")
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"sh-1", value)])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="first")
            before = await svc.ledger.get("sh-1")
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"sh-1", value)] * 5)
            await wait_for(lambda: sum(metric(svc, "agent_shadow_runs_total", {"outcome": o})
                                       for o in ("same", "different", "failed")) == 5, what="shadow runs")
            after = await svc.ledger.get("sh-1")
            assert before is not None and after is not None and after.fields == before.fields  # nothing written
            # the fake model answers differently almost every time: most shadow answers differ
            assert metric(svc, "agent_shadow_runs_total", {"outcome": "different"}) >= 3

    asyncio.run(scenario())
