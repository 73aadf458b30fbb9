"""A new prompt version in rollout, on the broker: a stable half of the task keys runs the candidate,
results and metrics say which version answered, and duplicates compare the two in shadow."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from service.agents.base import Agent
from service.agents.kinds import ClassifyInput, ClassifyStep
from service.agents.registry import AgentRegistry
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from tests.support import classify, metric, produce, read_topic, running, succeeded, wait_for

pytestmark = [pytest.mark.integration]


class ClassifyV2(ClassifyStep):
    prompt_version = "classify-v2"


def test_half_the_keys_run_the_candidate_and_duplicates_compare_the_versions(make_settings: Any,
                                                                            fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={"shadow_sample_rate": 1.0})
    candidate = Agent("classify", ClassifyInput, (ClassifyV2(),))
    agent = Agent("classify", ClassifyInput, (ClassifyStep(),), candidate=candidate, candidate_share=0.5)
    agents = AgentRegistry([agent])
    ids = [f"ro-{i}" for i in range(60)]
    records = [(t.encode(), classify(t, f"text {t}")) for t in ids]

    async def scenario() -> dict[str, float]:
        async with running(s, fake_llm.base_url, agents=agents) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(ids), 60,
                           what="every task", service=svc)
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)  # each task once more
            await wait_for(lambda: sum(metric(svc, "agent_rollout_divergence_total",
                                              {"kind": "classify", "outcome": o}) for o in ("same", "different"))
                           == len(ids), 60, what="a shadow run of the other version for every duplicate", service=svc)
            return {v: metric(svc, "agent_task_versions_total",
                              {"kind": "classify", "version": v, "outcome": "succeeded"})
                    for v in ("classify@classify-v1", "classify@classify-v2")}

    by_version = asyncio.run(scenario())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids)))
    answered = {m.json()["task_id"]: m.json()["prompt_version"] for m in results}
    assert answered == {t: agent.version_for(t).prompt_version for t in ids}  # the stable hash decided
    counts = Counter(answered.values())
    assert set(counts) == {"classify@classify-v1", "classify@classify-v2"} and min(counts.values()) >= 15
    assert by_version == {v: float(n) for v, n in counts.items()}
    for t in ids:  # each task ran once for real, and once in shadow on the version that did not answer
        assert fake_llm.calls_for(f"{t}:classify") == 2
        assert fake_llm.calls_for(f"{t}:classify:shadow") == 1
