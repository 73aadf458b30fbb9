"""A multi-step agent journals each step; a resumed task calls the model only for the rest."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.agents.tasks import canonical_json, digest
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import metric, produce, read_topic, running, succeeded, task_value, wait_for

pytestmark = pytest.mark.integration

STEPS = ["extract", "benefit_check", "policy_match", "draft", "review"]


def prior_auth(task_id: str) -> bytes:
    return task_value("prior_auth", {
        "document": "Jane Roe, 54, rheumatoid arthritis since 2019, failed methotrexate. Dr. Liu requests "
                    "adalimumab 40 mg every other week.",
        "payer": "Acme Health", "drug": "adalimumab",
    }, task_id)


def test_prior_auth_resumes_from_its_journal(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={"max_attempts": 3})
    fake_llm.add_fault(FaultRule("error", match="pa-1:policy_match", status=503))

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"pa-1", prior_auth("pa-1"))])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "exhausted"}) == 1,
                           what="the third step to exhaust its attempts")
            dead = await svc.ledger.get("pa-1")
            assert dead is not None and dead.state == "dead"
            assert sorted(dead.steps) == ["benefit_check", "extract"]  # the finished steps are journaled
            first = dead.to_json()
            # the endpoint is fixed; an operator redrives the dead letter
            fake_llm.clear_faults()
            assert await svc.ledger.revive("pa-1")
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"pa-1", prior_auth("pa-1"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="resume")
            assert metric(svc, "agent_steps_reused_total") == 2
            done = await svc.ledger.get("pa-1")
            assert done is not None
            return first, done.to_json()

    first, done = asyncio.run(scenario())
    stats = fake_llm.stats()["by_step"]
    assert stats["pa-1:extract"] == 1 and stats["pa-1:benefit_check"] == 1  # not called again
    assert stats["pa-1:policy_match"] == 4  # three refused attempts, then the one that worked
    assert stats["pa-1:draft"] == 1 and stats["pa-1:review"] == 1
    assert done["state"] == "succeeded" and done["fence"] == 2
    assert sorted(done["steps"]) == sorted(STEPS)
    assert done["steps"]["extract"] == first["steps"]["extract"]
    prev = ""
    for name in STEPS:  # every step is digested and chained to the one before
        rec = done["steps"][name]
        assert rec["digest"] == digest(canonical_json(rec["output"]))
        assert rec["input_digest"] == prev
        prev = rec["digest"]
    result = done["result"]
    assert result["decision"] == done["steps"]["review"]["output"]["decision"]
    assert result["letter"] == done["steps"]["draft"]["output"]["letter"]
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert len(results) == 1 and results[0].json()["prompt_version"].startswith("extract@pa-extract-v1+")
