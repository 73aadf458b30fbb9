"""Whose fault a failure is, decided by breadth, on Apache Kafka with the fault-injecting model.

Some inputs make a provider fail every time. Tasks whose every call gets a 5xx, beside healthy
ones the endpoint serves, must spend their own attempts and end ``exhausted``: they may not hold
the breaker open, and with it the worker, however the breaker's probes fall."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import classify, committed, metric, produce, read_topic, running, wait_for

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 4


def _calls_of(stats: dict[str, Any], task_id: str) -> int:
    """Model calls that reached the endpoint for one task (every attempt has a key of its own)."""
    return sum(n for key, n in stats["by_key"].items() if key.startswith(f"{task_id}:"))


def test_tasks_that_always_fail_end_exhausted_and_the_others_are_served(make_settings: Any,
                                                                        fake_llm: FakeLLM) -> None:
    poison = [f"poison-{i}" for i in range(20)]
    healthy = [f"healthy-{i}" for i in range(15)]
    s: Settings = make_settings(llm={"max_attempts": MAX_ATTEMPTS, "breaker_failures": 5, "breaker_open_s": 2.0,
                                     "backoff_base_s": 0.05, "backoff_max_s": 0.5})
    for task_id in poison:  # the provider fails every call of these tasks, and only of these
        fake_llm.add_fault(FaultRule("error", match=f"{task_id}:", status=500))
    order = [t for pair in itertools.zip_longest(poison, healthy) for t in pair if t]
    records = [(t.encode(), classify(t, f"text of {t}")) for t in order]

    async def scenario() -> float:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            # well inside the old failure mode, where after 240 s most records were not committed
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(healthy)
                           and metric(svc, "agent_dead_letters_total", {"reason": "exhausted"}) == len(poison),
                           120, what="every healthy task served and every failing one exhausted", service=svc)
            ends = committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic,
                             s.kafka.topic_partitions)
            await wait_for(lambda: sum(committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic,
                                                 s.kafka.topic_partitions).values()) == len(records),
                           60, what=f"every partition committed to its end (now {ends})", service=svc)
            return metric(svc, "agent_llm_breaker_opens_total")

    asyncio.run(scenario())
    stats = fake_llm.stats()
    over = {t: _calls_of(stats, t) for t in poison if _calls_of(stats, t) > MAX_ATTEMPTS}
    assert not over, f"tasks called the model more than max_attempts={MAX_ATTEMPTS} times: {over}"
    assert all(_calls_of(stats, t) == 1 for t in healthy)
    letters = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=len(poison))
    assert {m.key.decode() for m in letters if m.key} == set(poison)
    assert {m.headers["dlq.reason"] for m in letters} == {b"exhausted"}
