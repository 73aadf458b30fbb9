"""An endpoint outage opens the breaker: tasks wait instead of burning attempts, then all succeed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import classify, metric, produce, running, wait_for

pytestmark = pytest.mark.integration


def test_outage_opens_the_breaker_and_no_task_is_lost(make_settings: Any, fake_llm: FakeLLM) -> None:
    n = 20
    s: Settings = make_settings(llm={"max_attempts": 6, "breaker_failures": 5, "breaker_open_s": 1.0,
                                     "backoff_base_s": 0.05})
    fake_llm.add_fault(FaultRule("error", status=503))  # every call fails until the outage ends

    async def scenario() -> tuple[int, float]:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(f"storm-{i}".encode(), classify(f"storm-{i}", f"t{i}")) for i in range(n)])
            await wait_for(lambda: metric(svc, "agent_llm_breaker_opens_total") >= 1, what="the breaker to open")
            await asyncio.sleep(3.0)  # the outage goes on
            during = fake_llm.stats()["requests"]
            fake_llm.clear_faults()
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == n, 30,
                           what="every task after the outage")
            assert sum(metric(svc, "agent_dead_letters_total", {"reason": r}) for r in ("exhausted", "permanent")) == 0
            return during, metric(svc, "agent_llm_breaker_opens_total")

    during, opens = asyncio.run(scenario())
    # The first wave (one call per task, all in flight together) reaches the endpoint; after that
    # only one probe per open period does. Without the breaker, 20 tasks x 6 attempts = 120 calls.
    assert during <= n + 5, f"{during} calls reached the failing endpoint"
    assert opens >= 2  # failed probes re-opened it
