"""A parent kind that delegates to two children in one deployment, on the broker, Redis and the fake
model: the parent ends with one result, its delegating step's output lists both children in the
declared order although the second finished first, each child runs the model once, and the parent
waited parked (its offset committed) without a model call of its own for the delegating step."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from service.agents.registry import AgentRegistry
from service.agents.tasks import decode_task
from service.devtools.fakellm import FakeLLM
from service.devtools.fakellm.faults import FaultRule
from service.runtime.replies import start_replies
from service.sdk import Agent, Delegate, DelegateStep, Messages, Step, StrictInput, system_message, user_message
from tests.support import metric, produce, read_topic, running, succeeded, task_value, wait_for

pytestmark = [pytest.mark.integration]


class Text(StrictInput):
    text: str = Field(min_length=1, max_length=500)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(min_length=1)


def _text(task_input: BaseModel) -> str:
    assert isinstance(task_input, Text)
    return task_input.text


class Reply(Step):
    name, prompt_version, output_model, needs = "answer", "dp-answer-v1", Answer, ()

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        return [system_message("Answer in one sentence."), user_message(_text(task_input))]


class Gather(DelegateStep):
    name, needs, mode = "gather", (), "required"

    def children(self, task_input: BaseModel, previous: Mapping[str, Any]) -> list[Delegate]:
        return [Delegate("dp_research", {"text": f"research {_text(task_input)}"}),
                Delegate("dp_critique", {"text": f"critique {_text(task_input)}"})]


class Synthesis(Step):
    name, prompt_version, output_model, needs = "synthesis", "dp-synthesis-v1", Answer, ("gather",)

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        lines = [f"child {c['n']} {c['id']} {c['kind']} {c['state']}" for c in previous["gather"]["children"]]
        return [system_message("Combine the answers."), user_message("\n".join(lines))]


def kinds() -> AgentRegistry:
    return AgentRegistry([
        Agent("dp_parent", Text, (Gather(), Synthesis())),
        Agent("dp_research", Text, (Reply(),)),
        Agent("dp_critique", Text, (Reply(),)),
    ])


def test_a_parent_gets_both_children_in_declared_order_each_child_run_once(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    run = uuid.uuid4().hex[:8]
    s = make_settings(kafka={"replies_topic": f"r-{run}.replies"})
    parent = f"dp-{run}"
    first, second = f"{parent}/gather/0", f"{parent}/gather/1"
    # the first child is slow: the second ends (and replies) first
    fake_llm.add_fault(FaultRule("latency", match=f"{first}:", delay_s=4.0, times=1))

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            replies = start_replies(svc.ledger, svc.publisher.send, svc.metrics, s)
            try:
                produce(kafka_bootstrap, s.kafka.input_topic,
                        [(parent.encode(), task_value("dp_parent", {"text": "tides"}, parent))])

                async def parent_done() -> bool:
                    record = await svc.ledger.get(parent)
                    return record is not None and record.state == "succeeded"

                await wait_for(parent_done, 90, what="the parent's result", service=svc)
                journal = await svc.ledger.steps(parent)
                gather = journal["gather"]["output"]
                assert [(c["n"], c["id"], c["kind"], c["state"]) for c in gather["children"]] == [
                    (0, first, "dp_research", "succeeded"), (1, second, "dp_critique", "succeeded")]
                assert gather["degraded"] is False
                assert all(set(c["result"]) == {"answer"} for c in gather["children"])
                # each child's hash names its parent, step and place, kept by its first claim
                for n, cid in enumerate((first, second)):
                    child = await svc.ledger.get(cid)
                    assert child is not None
                    assert (child.fields.get("parent"), child.fields.get("parent_step"),
                            child.fields.get("parent_n")) == (parent, "gather", str(n))
                # each child counted started once, the step's fan-out observed once
                assert metric(svc, "agent_children_started_total", {"kind": "dp_research"}) == 1
                assert metric(svc, "agent_children_started_total", {"kind": "dp_critique"}) == 1
                assert metric(svc, "agent_fanout_count", {"kind": "dp_parent"}) == 1
                assert metric(svc, "agent_fanout_sum", {"kind": "dp_parent"}) == 2
            finally:
                await asyncio.to_thread(replies.stop)

    asyncio.run(scenario())

    results = succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=3, timeout_s=60))
    by_task: dict[str, set[bytes | None]] = {}
    for m in results:
        by_task.setdefault((m.key or b"").decode(), set()).add(m.value)
    assert set(by_task) == {parent, first, second}
    assert all(len(values) == 1 for values in by_task.values()), "a task has two different results"
    steps = fake_llm.stats()["completions_by_step"]
    assert steps.get(f"{first}:answer") == 1 and steps.get(f"{second}:answer") == 1
    assert steps.get(f"{parent}:synthesis") == 1
    assert not any(key.startswith(f"{parent}:gather") for key in fake_llm.stats()["by_key"])  # no model call
    # the synthesis (the parent's result) saw the children in the declared order
    synthesis = fake_llm.last_request(f"{parent}:synthesis")
    assert synthesis is not None
    told = synthesis["messages"][-1]["content"]
    assert told.index(first) < told.index(second)
    # the second child finished first
    completed = {(m.key or b"").decode(): json.loads(m.value or b"{}")["completed_at"] for m in results}
    assert completed[second] < completed[first]


class Astray(DelegateStep):
    name, needs, mode = "gather", (), "required"

    def children(self, task_input: BaseModel, previous: Mapping[str, Any]) -> list[Delegate]:
        return [Delegate("dp_research", {"text": _text(task_input)}),
                Delegate("dp_research", {"text": _text(task_input)}, topic=_text(task_input))]


def test_a_child_for_a_topic_that_does_not_exist_dead_letters_its_parent_and_holds_nothing(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """The broker does not create topics here: the second child's topic never exists. The parent is
    dead-lettered ``delegation`` naming it (not retried for ever as an outage, its partition held),
    its first child, sent and unstarted or running, is cancelled or finishes, and the next record of
    the same key runs."""
    run = uuid.uuid4().hex[:8]
    s = make_settings(kafka={"replies_topic": f"r-{run}.replies"})
    parent, after = f"dp-astray-{run}", f"dp-after-{run}"
    registry = AgentRegistry([Agent("dp_astray", Text, (Astray(),)), Agent("dp_research", Text, (Reply(),))])

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=registry) as svc:
            produce(kafka_bootstrap, s.kafka.input_topic, [
                (b"same-key", task_value("dp_astray", {"text": f"nowhere-{run}"}, parent)),
                (b"same-key", task_value("dp_research", {"text": "after"}, after))])

            async def both_ended() -> bool:
                first, second = await svc.ledger.get(parent), await svc.ledger.get(after)
                return (first is not None and first.state in ("dead", "failed")
                        and second is not None and second.state == "succeeded")

            await wait_for(both_ended, 120, what="the parent dead, the next record of its key done", service=svc)

    asyncio.run(scenario())
    dead = [m for m in read_topic(kafka_bootstrap, s.kafka.dlq_topic, expect=1, timeout_s=60)
            if m.headers.get("dlq.task_id") == parent.encode()]
    assert [m.headers["dlq.reason"] for m in dead] == [b"delegation"]
    assert f"nowhere-{run}".encode() in dead[0].headers["dlq.error"]


class Broken(Step):
    """A child's step whose own code fails every time: the service dead-letters it ``internal``."""

    name, prompt_version, output_model, needs = "answer", "dp-broken-v1", Answer, ()

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        raise ZeroDivisionError("a bug in the child's step")


class Doomed(DelegateStep):
    """Two children that end in the service's own code: one whose step has a bug, one whose input
    is larger than the deployment takes (its value does not decode: the reply names it by its key)."""

    name, needs, mode = "gather", (), "required"

    def children(self, task_input: BaseModel, previous: Mapping[str, Any]) -> list[Delegate]:
        if _text(task_input) == "bug":
            return [Delegate("dp_broken", {"text": "anything"})]
        return [Delegate("dp_research", {"text": "x" * 6000})]


def test_a_child_that_ends_in_the_services_own_code_replies_and_its_parent_ends_before_its_deadline(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """Neither parent has a deadline of its own: without a reply each would wait a day."""
    run = uuid.uuid4().hex[:8]
    s = make_settings(kafka={"replies_topic": f"r-{run}.replies"}, max_task_bytes=4096, internal_retries=1)
    bug, big = f"dp-bug-{run}", f"dp-big-{run}"
    registry = AgentRegistry([Agent("dp_doomed", Text, (Doomed(),)), Agent("dp_broken", Text, (Broken(),)),
                              Agent("dp_research", Text, (Reply(),))])

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=registry) as svc:
            replies = start_replies(svc.ledger, svc.publisher.send, svc.metrics, s)
            try:
                produce(kafka_bootstrap, s.kafka.input_topic, [
                    (bug.encode(), task_value("dp_doomed", {"text": "bug"}, bug)),
                    (big.encode(), task_value("dp_doomed", {"text": "big"}, big))])

                async def both_dead() -> bool:
                    records = [await svc.ledger.get(key) for key in (bug, big)]
                    return all(r is not None and r.state == "dead" for r in records)

                await wait_for(both_dead, 120, what="both parents dead", service=svc)
            finally:
                await asyncio.to_thread(replies.stop)

    asyncio.run(scenario())
    dead = {m.headers["dlq.task_id"]: m for m in read_topic(kafka_bootstrap, s.kafka.dlq_topic, expect=4,
                                                              timeout_s=60) if "dlq.task_id" in m.headers}
    assert dead[f"{bug}/gather/0".encode()].headers["dlq.reason"] == b"internal"
    assert dead[bug.encode()].headers["dlq.reason"] == b"child"
    assert b"internal" in dead[bug.encode()].headers["dlq.error"]
    assert dead[big.encode()].headers["dlq.reason"] == b"child"
    assert b"oversize" in dead[big.encode()].headers["dlq.error"]
    assert not any(key.startswith(f"{big}/gather/0") for key in fake_llm.stats()["by_key"])  # never ran


def test_a_parent_ended_dead_by_a_worker_that_stopped_before_publishing_cancels_its_children_when_read_again(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """The ledger holds the parent ``dead`` with its plan journaled; the worker that ended it stopped
    before it published, and before it cancelled anything. Its record read again re-emits the dead
    letter and cancels the children not started: each then ends ``cancelled`` without a model call."""
    run = uuid.uuid4().hex[:8]
    s = make_settings(kafka={"replies_topic": f"r-{run}.replies"})
    parent = f"dp-stopped-{run}"
    value = task_value("dp_parent", {"text": "tides"}, parent)
    children = [(f"{parent}/gather/{n}", kind) for n, kind in enumerate(("dp_research", "dp_critique"))]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            fingerprint = decode_task(value, [], s.max_task_bytes).fingerprint
            claim = await svc.ledger.claim(parent, fingerprint, "gone", "dp_parent")
            await svc.ledger.children.plan(parent, claim.fence, "gather", [
                {"n": n, "id": cid, "kind": kind, "topic": s.kafka.input_topic}
                for n, (cid, kind) in enumerate(children)])
            assert await svc.ledger.fail(parent, claim.fence, "the step failed", dead_reason="permanent")
            produce(kafka_bootstrap, s.kafka.input_topic, [(parent.encode(), value)])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "permanent"}) == 1, 60,
                           what="the parent's dead letter re-emitted", service=svc)
            produce(kafka_bootstrap, s.kafka.input_topic,
                    [(cid.encode(), task_value(kind, {"text": "late"}, cid)) for cid, kind in children])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "cancelled"}) == 2, 60,
                           what="both children cancelled", service=svc)

    asyncio.run(scenario())
    assert not any(key.startswith(f"{parent}/") for key in fake_llm.stats()["by_key"])
    reasons = {m.headers["dlq.task_id"]: m.headers["dlq.reason"]
               for m in read_topic(kafka_bootstrap, s.kafka.dlq_topic, expect=3, timeout_s=60)}
    assert reasons == {parent.encode(): b"permanent", **{cid.encode(): b"cancelled" for cid, _ in children}}
