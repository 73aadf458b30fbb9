"""Prompt caching across endpoints serving one model: the tasks of one kind go to the endpoint
their prompt cache key prefers (so its cache holds their prefix and the cached prompt tokens rise),
and with that endpoint failing they go to the other and all succeed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.agents.registry import default_agents
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from service.llm.affinity import prompt_cache_key, rendezvous
from tests.support import metric, produce, running, task_value, wait_for

pytestmark = pytest.mark.integration

LABELS = ["complaint", "praise", "question"]


def tasks(ids: list[str]) -> list[tuple[bytes, bytes]]:
    return [(t.encode(), task_value("classify", {"text": f"the parcel {t} arrived broken", "labels": LABELS}, t))
            for t in ids]


@pytest.fixture
def replica_llm() -> Any:
    with FakeLLM() as fake:
        yield fake


def test_a_kind_sticks_to_one_endpoint_and_moves_when_it_fails(
        make_settings: Any, fake_llm: FakeLLM, replica_llm: FakeLLM) -> None:
    # a window wide enough for every task at once: a full window would (rightly) spill calls to the other
    s: Settings = make_settings(llm={"breaker_failures": 2, "breaker_open_s": 30.0, "window_initial": 32,
                                     "replicas": [{"base_url": replica_llm.base_url}]})
    step = default_agents().get("classify").steps[0]
    key = prompt_cache_key("classify", step.name, step.prompt_version)
    home_name, other_name = rendezvous(["primary", "replica-1"], key)
    servers = {"primary": fake_llm, "replica-1": replica_llm}
    home, other = servers[home_name], servers[other_name]
    first = [f"stick-{i}" for i in range(8)]
    then = [f"moved-{i}" for i in range(8)]

    def calls(fake: FakeLLM, prefix: str) -> int:
        return sum(n for step, n in fake.stats()["by_step"].items() if step.startswith(prefix))

    def cached(endpoint: str, svc: Any) -> float:
        return metric(svc, "agent_llm_cached_prompt_tokens_total", {"kind": "classify", "endpoint": endpoint})

    async def scenario() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, tasks(first))
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) >= len(first), 60,
                           what="the first tasks", service=svc)
            sticky = {"home": calls(home, "stick-"), "other": calls(other, "stick-"),
                      "cached": cached(home_name, svc),
                      "prompt": metric(svc, "agent_llm_prompt_tokens_total", {"kind": "classify", "endpoint": home_name})}
            home.add_fault(FaultRule("error", status=500))  # every call to it fails from now on
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, tasks(then))
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"})
                           >= len(first) + len(then), 90, what="the tasks after the failure", service=svc)
            await asyncio.sleep(0.5)
            return {"sticky": sticky, "succeeded": metric(svc, "agent_tasks_total", {"outcome": "succeeded"}),
                    "dead": metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"}),
                    "degraded": metric(svc, "agent_degraded_answers_total", {"kind": "classify"}),
                    "other_answers": sum(n for step, n in other.stats()["completions_by_step"].items()
                                         if step.startswith("moved-")),
                    "other_cached": cached(other_name, svc)}

    got = asyncio.run(scenario())
    print("prompt cache across replicas:", got)  # the figures, with -s
    sticky = got["sticky"]
    assert sticky["home"] == len(first) and sticky["other"] == 0  # one kind, one prefix: one endpoint
    assert 0 < sticky["cached"] < sticky["prompt"]  # its repeated prefix was read from the cache
    assert got["succeeded"] == len(first) + len(then) and got["dead"] == 0
    assert got["degraded"] == 0  # a replica serves the primary's model: its answers are not degraded
    assert got["other_answers"] >= len(then)  # the failing endpoint's share went to the other
    assert got["other_cached"] > 0
