"""The fleet window's memory through whole workers: one worker finds a provider's concurrency limit,
and a worker started after it went idle opens at the window the first remembered (its window metric
says so at its first call, where it used to say 4), then a 429 at it steps it back one slot."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from dedup.keys import Keys
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from service.llm.tags import endpoint_tag
from tests.support import classify, metric, produce, running, wait_for

pytestmark = pytest.mark.integration

ALLOWED = 8  # the provider's concurrent calls; one more is answered 429 at once


def test_a_worker_started_after_the_fleet_learned_opens_at_the_remembered_window(make_settings: Any) -> None:
    with FakeLLM(latency_s=0.2, max_concurrency=ALLOWED) as fake:
        s: Settings = make_settings(max_in_flight=32, llm={"base_url": fake.base_url, "max_attempts": 8,
                                                           "window_memory_s": 3600})
        client = redis.Redis.from_url(s.redis.url.get_secret_value())
        keys, tag = Keys(s.redis.key_prefix), endpoint_tag(fake.base_url)

        def remembered() -> int:
            return int(float(client.hget(keys.endpoint(tag, "memory"), "safe") or 0))

        async def scenario() -> tuple[int, float, float, float, int]:
            async with running(s, fake.base_url) as first:
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                        [(f"warm-{i}".encode(), classify(f"warm-{i}")) for i in range(300)])
                await wait_for(lambda: remembered() >= ALLOWED - 1, 60, what="the fleet remembering a window",
                               service=first)
                await wait_for(lambda: metric(first, "agent_tasks_total", {"outcome": "succeeded"}) == 300, 120,
                               what="the warm-up", service=first)
            learned = remembered()
            # the window's own keys expire after idle_s; the memory outlives them
            client.delete(keys.endpoint(tag, "window"), keys.endpoint(tag, "slots"))
            second_settings = s.model_copy(update={"worker_id": f"{s.worker_id}-second"})
            async with running(second_settings, fake.base_url) as second:
                window = {"endpoint": "primary"}
                before = metric(second, "agent_llm_window", window)
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"after", classify("after"))])
                await wait_for(lambda: metric(second, "agent_tasks_total", {"outcome": "succeeded"}) == 1, 30,
                               what="the first task of the second worker", service=second)
                resumed = metric(second, "agent_llm_window", window)
                fake.add_fault(FaultRule("rate_limit", match="refused", times=1, retry_after_s=0.2))
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"refused", classify("refused"))])
                await wait_for(lambda: metric(second, "agent_tasks_total", {"outcome": "succeeded"}) == 2, 30,
                               what="the refused task, retried", service=second)
                cut = metric(second, "agent_llm_window", window)
                cuts = metric(second, "agent_llm_window_cuts_total", {**window, "reason": "rate_limited"})
            return learned, before, resumed, cut, int(cuts)

        try:
            learned, before, resumed, cut, cuts = asyncio.run(scenario())
            after_cut = remembered()
        finally:
            client.close()
    assert learned >= ALLOWED - 1
    assert before == s.llm.window_initial  # what a worker says before it has heard from the fleet
    assert resumed == learned  # not 4: the remembered window, at the first call
    assert cuts == 1
    assert cut == learned - 1  # at the fresh remembered window a 429 steps back one slot
    assert after_cut == learned  # and the memory stands
