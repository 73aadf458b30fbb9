"""``service.sdk.testing`` runs a kind in-process through the service's own pipeline: the built-in
kinds and the sample user package (``tests/agents_pkg``), with retries after invalid answers, tool
calls with their journal and audit entries, dead letters with the service's reasons, and the kinds
it refuses."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sample_agents import agents as sample_agents

from service.agents.kinds import SummarizeOutput
from service.agents.registry import default_agents
from service.agents.support import support_agent
from service.core.errors import LLMTimeout
from service.sdk import Agent, Delegate, DelegateStep, Session, Step, StrictInput, ToolCall, ToolError
from service.sdk.testing import ScriptedModel, ScriptExhausted, TrialRefused, run, tool_call

TICKET = {"subject": "Refund", "body": "I was charged twice for my plan this month."}


def triage() -> Agent:
    (agent,) = sample_agents()
    return agent


def test_sample_kind_runs_its_two_steps_and_journals_each() -> None:
    model = ScriptedModel([{"summary": "Charged twice this month."}, {"queue": "billing", "urgent": False}])

    outcome = run(triage(), TICKET, model=model)

    assert outcome.ok, outcome.error
    assert outcome.result == {"queue": "billing", "urgent": False}
    assert [(s.name, s.attempts) for s in outcome.steps] == [("summarize", 1), ("route", 1)]
    assert outcome.step("summarize").output == {"summary": "Charged twice this month."}
    assert outcome.step("summarize").input_digest == ""  # reads no other step
    assert outcome.step("route").input_digest != ""  # computed from the summary's digest
    assert outcome.attempts == 2
    # the second step was asked with the first one's output, as the service asks it
    assert "Charged twice this month." in model.requests[1].messages[-1]["content"]
    assert model.requests[1].schema_name == "ticket_triage_route"


def test_an_invalid_answer_is_retried_and_the_retry_is_counted() -> None:
    model = ScriptedModel([
        {"summary": "Charged twice."},
        {"queue": "shipping", "urgent": False},  # not a queue of the output model
        "not json at all",
        {"queue": "billing", "urgent": True},
    ])

    outcome = run(triage(), TICKET, model=model)

    assert outcome.ok, outcome.error
    assert outcome.result == {"queue": "billing", "urgent": True}
    assert outcome.step("route").attempts == 3
    assert outcome.attempts == 4
    assert model.left == 0


def test_invalid_answers_past_the_attempts_end_as_the_services_dead_letter() -> None:
    model = ScriptedModel([{"summary": "Charged twice."}] + [{"queue": "shipping", "urgent": False}] * 3)

    outcome = run(triage(), TICKET, model=model, max_attempts=3)

    assert outcome.status == "dead_lettered"
    assert outcome.reason == "invalid_output"
    assert outcome.error is not None and "route, 3 attempts" in outcome.error
    assert outcome.result is None
    assert [(s.name, s.output is not None, s.attempts) for s in outcome.steps] == [
        ("summarize", True, 1), ("route", False, 3)]


def test_a_timeout_is_retried_as_the_service_retries_it() -> None:
    model = ScriptedModel([LLMTimeout("no answer in time"), {"label": "bug", "confidence": 0.9}])

    outcome = run("classify", {"text": "It crashes on start.", "labels": ["bug", "question"]}, model=model)

    assert outcome.ok, outcome.error
    assert outcome.result == {"label": "bug", "confidence": 0.9}
    assert outcome.step("classify").attempts == 2


def test_input_refused_by_the_kind_is_the_dead_letter_schema() -> None:
    outcome = run("classify", {"text": "x", "labels": ["only-one"]}, model=ScriptedModel([]))

    assert (outcome.status, outcome.reason) == ("dead_lettered", "schema")
    assert outcome.steps == []


@pytest.mark.parametrize(("kind", "task_input", "answer"), [
    ("extract", {"document": "Invoice 7, due 2026-01-31", "fields": ["due_date"]}, {"fields": {"due_date": "2026-01-31"}}),
    ("classify", {"text": "Where is my order?", "labels": ["bug", "question"]}, {"label": "question", "confidence": 0.8}),
    ("summarize", {"text": "A long story about a cat.", "max_words": 5}, {"summary": "A cat story."}),
])
def test_each_built_in_single_step_kind(kind: str, task_input: dict[str, Any], answer: dict[str, Any]) -> None:
    model = ScriptedModel([answer])

    outcome = run(kind, task_input, model=model, agents=default_agents())

    assert outcome.ok, outcome.error
    assert outcome.result == answer
    assert model.requests[0].schema is not None


def test_the_built_in_check_refuses_an_answer_the_schema_allows() -> None:
    # extract's check: the answer names exactly the fields asked for
    model = ScriptedModel([{"fields": {"other": "x"}}, {"fields": {"total": "12"}}])

    outcome = run("extract", {"document": "Total 12", "fields": ["total"]}, model=model)

    assert outcome.ok and outcome.result == {"fields": {"total": "12"}}
    assert outcome.step("extract").attempts == 2


def test_summarize_long_runs_its_pieces_and_the_reduce() -> None:
    text = "\n\n".join(f"Paragraph {n}. " + "words " * 150 for n in range(4))
    model = ScriptedModel(lambda request: {"summary": f"part of {len(request.messages[-1]['content'])} chars"})

    outcome = run("summarize_long", {"text": text, "max_words": 10}, model=model, context_tokens=3600)  # tokens counted as UTF-8 bytes: a paragraph is ~900

    assert outcome.ok, outcome.error
    pieces = [s.name for s in outcome.steps if s.name.startswith("summarize-part-")]
    assert len(pieces) >= 2
    assert len(model.requests) == len(pieces) + 1  # each piece, then the reduce


def test_a_tool_call_runs_the_in_memory_tool_once_and_is_journaled_and_audited() -> None:
    filed: list[ToolCall] = []

    def open_ticket(call: ToolCall) -> dict[str, Any]:
        filed.append(call)
        return {"id": f"T-{len(filed)}"}

    model = ScriptedModel([
        tool_call("open_ticket", {"title": "Charged twice", "priority": "normal", "refund": 20}),
        {"reply": "We filed ticket T-1.", "status": "filed"},
    ])

    outcome = run(support_agent("http://tickets.invalid"), {"customer": "Ann", "message": "Charged twice."},
                  model=model, tools={"open_ticket": open_ticket})

    assert outcome.ok, outcome.error
    assert outcome.result == {"reply": "We filed ticket T-1.", "status": "filed"}
    assert [c.arguments for c in filed] == [{"title": "Charged twice", "priority": "normal", "refund": 20}]
    assert filed[0].key == "trial-1/file/1"
    assert [(c["tool"], c["outcome"], c["result"]) for c in outcome.tool_calls] == [
        ("open_ticket", "executed", {"id": "T-1"})]
    assert [(a["tool"], a["outcome"], a["accepted"]) for a in outcome.audit] == [("open_ticket", "executed", True)]
    # the tool's result went back to the model in the conversation of the next round
    assert model.requests[1].messages[-1] == {"role": "tool", "tool_call_id": "call_1_1", "content": '{"id":"T-1"}'}
    assert outcome.step("file").attempts == 2  # a round and the answer


def test_invalid_tool_arguments_are_told_to_the_model_and_nothing_runs() -> None:
    ran: list[ToolCall] = []
    model = ScriptedModel([
        tool_call("open_ticket", {"title": "x", "priority": "someday", "refund": 0}),
        {"reply": "Noted.", "status": "not_filed"},
    ])

    outcome = run(support_agent("http://tickets.invalid"), {"customer": "Ann", "message": "Hi"}, model=model,
                  tools={"open_ticket": ran.append})

    assert outcome.ok and ran == []
    assert [(c["outcome"], "priority" in c["result"]["error"]) for c in outcome.tool_calls] == [("invalid", True)]
    assert outcome.audit == []  # a refused call never ran: no audit entry


def test_a_tool_refusal_goes_back_to_the_model() -> None:
    def refuse(call: ToolCall) -> None:
        raise ToolError("the ticket system is read-only today")

    model = ScriptedModel([tool_call("open_ticket", {"title": "x", "priority": "low", "refund": 0}),
                           {"reply": "Try tomorrow.", "status": "not_filed"}])

    outcome = run(support_agent("http://tickets.invalid"), {"customer": "Ann", "message": "Hi"}, model=model,
                  tools={"open_ticket": refuse})

    assert outcome.ok
    assert outcome.tool_calls[0]["outcome"] == "refused"
    assert "read-only" in model.requests[1].messages[-1]["content"]


def test_a_call_that_needs_approval_parks_the_task() -> None:
    model = ScriptedModel([tool_call("open_ticket", {"title": "Refund", "priority": "urgent", "refund": 500})])

    outcome = run(support_agent("http://tickets.invalid"), {"customer": "Ann", "message": "Refund 500"},
                  model=model, tools={"open_ticket": lambda call: {"id": "T-9"}})

    assert outcome.status == "parked"
    assert outcome.waiting is not None and outcome.waiting["what"] == "approval"
    assert "refund of 500" in outcome.waiting["reason"]


def test_a_tool_the_kind_does_not_offer_is_refused() -> None:
    with pytest.raises(ValueError, match="offers no tool named 'send_mail'"):
        run(triage(), TICKET, model=ScriptedModel([]), tools={"send_mail": lambda call: None})


def test_a_model_asked_past_its_script_fails_the_test() -> None:
    with pytest.raises(ScriptExhausted, match="asked 2 times and has 1 answers"):
        run(triage(), TICKET, model=ScriptedModel([{"summary": "Charged twice."}]))


class _Text(StrictInput):
    text: str


class _Answer(Step):
    output_model = SummarizeOutput

    def messages(self, task_input: Any, previous: Any) -> list[dict[str, str]]:
        return []


class _Fan(DelegateStep):
    name = "fan"

    def children(self, task_input: Any, previous: Any) -> list[Delegate]:
        return [Delegate("summarize", {"text": "x", "max_words": 3})]


def test_kinds_with_sessions_or_delegation_are_refused_with_the_reason() -> None:
    with pytest.raises(TrialRefused, match="has sessions"):
        run(Agent("chat", _Text, (_Answer(),), session=Session()), {"text": "hi"}, model=ScriptedModel([]))
    with pytest.raises(TrialRefused, match="step 'fan' delegates to other kinds"):
        run(Agent("fan_out", _Text, (_Fan(),)), {"text": "hi"}, model=ScriptedModel([]))



def test_every_exported_name_is_there_and_documented() -> None:
    import service.sdk.testing as testing

    assert [name for name in testing.__all__ if not hasattr(testing, name)] == []
    documented = set(re.findall(r"^- ``(\w+)``: \S", testing.__doc__ or "", flags=re.M))
    assert documented == set(testing.__all__)


class _Broken(Step):
    name, output_model = "broken", SummarizeOutput

    def messages(self, task_input: Any, previous: Any) -> list[dict[str, str]]:
        raise KeyError("no such field")


def test_a_bug_in_the_kinds_code_is_the_internal_dead_letter_with_its_exception() -> None:
    outcome = run(Agent("broken", _Text, (_Broken(),)), {"text": "hi"}, model=ScriptedModel([]))

    assert (outcome.status, outcome.reason) == ("dead_lettered", "internal")
    assert outcome.error == "KeyError: 'no such field'"
    assert isinstance(outcome.exception, KeyError)
