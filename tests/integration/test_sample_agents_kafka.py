"""The sample user package's typed kinds give the same results on Apache Kafka and Redis, through a
service built the normal way, as in-process under ``service.sdk.testing``: the same scripted answers
(a tool call, an answer the step refuses, then one it accepts), the same result, the same tool call
made once under the same idempotency key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sample_agents import agents as triage_agents
from sample_agents.filing import Tracker
from sample_agents.filing import agents as filing_agents

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.llm.client import ChatRequest
from service.sdk import default_agents
from service.sdk.testing import ScriptedModel, run, tool_call
from tests.support import metric, produce, read_topic, running, task_value, wait_for

pytestmark = pytest.mark.integration

TASKS = {
    "tt-typed-1": ("ticket_triage", {"subject": "Refund", "body": "I was charged twice for order 1182."}),
    "tf-typed-1": ("ticket_filing", {"customer": "Ana", "text": "Charged twice; I want my money back."}),
}


def script() -> Callable[[ChatRequest], Any]:
    """Answers by the step asked (its schema's name), each in turn: one task of each kind at a time."""
    answers: dict[str, list[Any]] = {
        "ticket_triage_summarize": [{"summary": "Charged twice for order 1182."}],
        "ticket_triage_route": ["not JSON", {"queue": "billing", "urgent": False}],
        "ticket_filing_understand": [{"problem": "Charged twice.", "wants_refund": True}],
        "ticket_filing_file": [tool_call("open_ticket", {"title": "Charged twice", "priority": "high"}),
                               {"ticket_id": "T-1", "reply": "Filed as T-1."},  # does not name Ana: refused
                               {"ticket_id": "T-1", "reply": "Ana, we filed T-1."}],
    }
    return lambda request: answers[request.schema_name].pop(0)


def test_the_typed_sample_kinds_give_the_same_results_on_kafka_as_in_process(
        make_settings: Any, fake_llm: FakeLLM) -> None:
    local_tracker = Tracker()
    local = {"ticket_triage": triage_agents()[0], "ticket_filing": filing_agents(local_tracker)[0]}
    model = script()
    in_process = {task_id: run(local[kind], task_input, model=ScriptedModel(model), task_id=task_id)
                  for task_id, (kind, task_input) in TASKS.items()}
    assert all(outcome.ok for outcome in in_process.values()), [o.error for o in in_process.values()]

    tracker = Tracker()
    registry = default_agents()
    for agent in (*triage_agents(), *filing_agents(tracker)):
        registry.register(agent)
    s: Settings = make_settings()

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, llm=ScriptedModel(script()), agents=registry) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(task_id.encode(), task_value(kind, task_input, task_id))
                     for task_id, (kind, task_input) in TASKS.items()])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(TASKS),
                           timeout_s=120, what="both typed tasks to succeed", service=svc)
            assert metric(svc, "agent_dead_letters_total") == 0

    asyncio.run(scenario())
    results = {m.key.decode(): m.json() for m in read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic,
                                                            expect=len(TASKS), timeout_s=60)
               if m.key is not None}
    assert set(results) == set(TASKS)
    for task_id, outcome in in_process.items():
        assert results[task_id]["status"] == "succeeded"
        assert results[task_id]["result"] == outcome.result, task_id
    assert results["tf-typed-1"]["result"] == {"ticket_id": "T-1", "reply": "Ana, we filed T-1."}
    # the tool ran once on each path, under the same key: the work's, never the attempt's
    assert list(tracker.tickets) == list(local_tracker.tickets) == ["tf-typed-1/file/1"]
    assert tracker.tickets["tf-typed-1/file/1"].priority == "high"
