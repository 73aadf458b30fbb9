"""A delegating step, the parent's side: limits and cycles refused before any child is sent, the
children's ids, deadlines, headers and events, the output in declared order whatever order the
children ended in, a required child's failure as the parent's dead letter, and the reply a child
sends its parent. ``ledger.children`` is stood in for by a small in-memory object with its methods
(docs/DELEGATION.md, "The ledger"); Redis and Kafka are not involved here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from consumers.records import Record
from service.agents.base import Agent
from service.agents.registry import AgentRegistry
from service.agents.tasks import decode_task
from service.cli.kinds import render
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.pipeline.base import Parked, ProcessorConfig, ToDeadLetter
from service.pipeline.delegation import (
    Delegation,
    Lineage,
    build_output,
    check_plan,
    child_deadline,
    child_headers,
    child_id,
    lineage_of,
    parent_source,
    place_of,
    reply_of,
)
from service.sdk import Delegate, DelegateStep, Messages, Step, StrictInput, system_message

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
CONFIG = ProcessorConfig(max_children=3, max_depth=2, replies_topic="p.replies", input_topic="p.tasks")


class In(StrictInput):
    question: str


class Out(BaseModel):
    answer: str


class Gather(DelegateStep):
    name, needs = "gather", ()

    def __init__(self, kinds: tuple[str, ...] = ("research", "critique"), mode: str = "required",
                 topic: str | None = None, budget_s: float | None = None) -> None:
        self.kinds, self.mode, self.topic, self.budget_s = kinds, mode, topic, budget_s

    def children(self, task_input: BaseModel, previous: Mapping[str, Any]) -> list[Delegate]:
        assert isinstance(task_input, In)
        return [Delegate(kind, {"q": f"{task_input.question} {n}"},
                         topic=self.topic if n == 1 else None, budget_s=self.budget_s)
                for n, kind in enumerate(self.kinds)]


class Synth(Step):
    name, prompt_version, output_model, needs = "synth", "synth-v1", Out, ("gather",)

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        return [system_message(json.dumps(previous["gather"]))]


class Children:
    """``ledger.children`` as the design names it, in memory: plans first writer wins, replies folded."""

    def __init__(self) -> None:
        self.plans: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.replies: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        self.parked: list[tuple[str, int, str, dict[str, Any]]] = []
        self.end_before_park: dict[int, dict[str, Any]] | None = None
        self.sources: dict[str, dict[str, Any] | None] = {}

    async def plan_once(self, task_key: str, fence: int, step: str, plan: list[dict[str, Any]], *,
                        source: dict[str, Any] | None = None) -> tuple[bool, list[dict[str, Any]]]:
        self.sources.setdefault(task_key, source)
        journaled = (task_key, step) not in self.plans
        return journaled, self.plans.setdefault((task_key, step), plan)

    async def outcomes(self, task_key: str, step: str) -> dict[int, dict[str, Any]]:
        return dict(self.replies.get((task_key, step), {}))

    async def park(self, task_key: str, fence: int, step: str, waiting: dict[str, Any]) -> str:
        if self.end_before_park is not None:  # the children end between the producing and the park
            self.replies[(task_key, step)] = self.end_before_park
            return "ended"
        self.parked.append((task_key, fence, step, waiting))
        return "parked"


class Effects:
    """``ledger.effects.journal``: the decisions journaled in the tools hash (a wait's expiry)."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}

    async def journal(self, task_key: str) -> dict[str, Any]:
        return dict(self.fields)


class Ledger:
    def __init__(self) -> None:
        self.children = Children()
        self.effects = Effects()
        self.generations: dict[str, int] = {}

    async def generation(self, task_key: str) -> int:
        return self.generations.get(task_key, 1)


def parent_record(task_id: str = "t1", headers: list[tuple[str, bytes]] | None = None, deadline: str | None = None,
                  tenant: str | None = None) -> Record:
    event: dict[str, Any] = {"task_id": task_id, "kind": "plan", "input": {"question": "why"},
                             "priority": "interactive"}
    if deadline:
        event["deadline"] = deadline
    if tenant:
        event["tenant"] = tenant
    return Record("p.tasks", 0, 7, task_id.encode(), json.dumps(event).encode(), list(headers or []))


class Run:
    def __init__(self, record: Record | None = None, step: Gather | None = None) -> None:
        self.record = record or parent_record()
        self.task = decode_task(self.record.value, self.record.headers, 1 << 20)
        self.ledger = Ledger()
        self.sent: list[tuple[str, bytes | None, Any, dict[str, Any]]] = []
        self.step = step or Gather()
        self.metrics = Metrics()
        self.now = NOW

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        self.sent.append((topic, key, json.loads(value or b"null"), dict(headers)))

    def __call__(self) -> dict[str, Any]:
        return asyncio.run(self.delegate())

    async def delegate(self) -> dict[str, Any]:
        run = Delegation(ledger=self.ledger, send=self.send, config=CONFIG, clock=lambda: self.now,  # type: ignore[arg-type]
                         traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01", task=self.task, fence=5,
                         record=self.record, attempts=1, metrics=self.metrics)
        return await run.run(self.step, In(question="why"), {})


# -- plans refused before anything is sent ---------------------------------------------------------


@pytest.mark.parametrize(("kinds", "headers", "why"), [
    (("a", "b", "c", "d"), [], "4 children, at most 3"),
    (("a",), [("agent.depth", b"2"), ("agent.path", b"x,y")], "depth 3, at most 2"),
    (("a", "plan"), [], "a cycle: kind plan"),
    (("a", "x"), [("agent.depth", b"1"), ("agent.path", b"x")], "a cycle: kind x"),
    (("Not-A-Kind",), [], "not a kind name"),
])
def test_a_plan_past_the_limits_or_with_a_cycle_is_refused_and_no_child_is_sent(
        kinds: tuple[str, ...], headers: list[tuple[str, bytes]], why: str) -> None:
    run = Run(parent_record(headers=headers), Gather(kinds))
    with pytest.raises(ToDeadLetter) as refused:
        run()
    assert refused.value.reason == "delegation" and why in refused.value.error
    assert run.sent == [] and run.ledger.children.plans == {}


def test_a_parent_id_too_long_for_its_children_is_refused() -> None:
    run = Run(parent_record("p" * 195))
    with pytest.raises(ToDeadLetter) as refused:
        run()
    assert refused.value.reason == "delegation" and "not a valid task key" in refused.value.error
    assert run.sent == []


def test_a_depth_header_that_does_not_read_is_refused() -> None:
    assert lineage_of(None) == Lineage(0, ())
    assert lineage_of([("agent.depth", b"3"), ("agent.path", b"a,b")]) == Lineage(3, ("a", "b"))
    for bad in (b"x", b"-1"):
        with pytest.raises(ToDeadLetter, match="agent.depth"):
            lineage_of([("agent.depth", bad)])


# -- the children on the wire ------------------------------------------------------------------------


def test_child_ids_are_the_parent_the_step_and_the_place_and_aware_of_the_generation() -> None:
    assert child_id("t1", 1, "gather", 0) == "t1/gather/0"
    assert child_id("t1", 3, "gather", 2) == "t1/g3/gather/2"


def test_a_childs_deadline_is_the_earlier_of_the_parents_and_its_budget() -> None:
    later, sooner = NOW + timedelta(hours=1), NOW + timedelta(seconds=30)
    assert child_deadline(None, NOW, None) is None
    assert child_deadline(later, NOW, None) == later
    assert child_deadline(None, NOW, 30) == sooner
    assert child_deadline(later, NOW, 30) == sooner
    assert child_deadline(sooner, NOW, 3600) == sooner


def test_children_are_produced_with_ids_headers_and_deadlines_then_the_parent_parks() -> None:
    record = parent_record(headers=[("agent.depth", b"1"), ("agent.path", b"root"), ("agent.parent", b"r"),
                                    ("agent.parent_step", b"s"), ("agent.child", b"0"),
                                    ("agent.reply_to", b"r.replies")],
                           deadline="2026-01-02T04:04:05Z", tenant="acme")
    run = Run(record, Gather(topic="team-b.tasks", budget_s=60))
    with pytest.raises(Parked) as parked:
        run()
    (t0, k0, v0, h0), (t1, k1, v1, h1) = run.sent
    assert (t0, k0, t1, k1) == ("p.tasks", b"t1/gather/0", "team-b.tasks", b"t1/gather/1")
    assert v0 == {"task_id": "t1/gather/0", "kind": "research", "input": {"q": "why 0"},
                  "deadline": "2026-01-02T03:05:05.000Z", "priority": "interactive", "tenant": "acme"}
    assert v1["kind"] == "critique" and v1["task_id"] == "t1/gather/1"
    assert h1 == {"agent.parent": b"t1", "agent.parent_step": b"gather", "agent.child": b"1",
                  "agent.reply_to": b"p.replies", "agent.depth": b"2", "agent.path": b"root,plan",
                  "traceparent": ("00-" + "a" * 32 + "-" + "b" * 16 + "-01").encode(), "tenant": b"acme"}
    waiting = parked.value.waiting
    assert waiting["what"] == "children" and waiting["step"] == "gather"
    assert waiting["children"] == ["t1/gather/0", "t1/gather/1"]
    assert waiting["deadline_ms"] == int(datetime(2026, 1, 2, 4, 4, 5, tzinfo=UTC).timestamp() * 1000)
    assert run.ledger.children.parked[0][:3] == ("t1", 5, "gather")
    # the resumption keeps the parent's own place in its tree (it replies to its parent in turn)
    source = run.ledger.children.sources["t1"]
    assert source is not None
    kept = {name for name, _ in source["headers"]}
    assert {"agent.parent", "agent.reply_to", "agent.depth", "agent.path"} <= kept


def test_a_parent_without_a_deadline_waits_at_most_the_limit_and_a_replay_resends_the_same_ids() -> None:
    run = Run()
    for _ in range(2):
        with pytest.raises(Parked) as parked:
            run()
    assert parked.value.waiting["deadline_ms"] == int((NOW + timedelta(seconds=86_400)).timestamp() * 1000)
    assert [s[1] for s in run.sent] == [b"t1/gather/0", b"t1/gather/1"] * 2
    assert all(s[2]["deadline"] is None for s in run.sent)


def test_a_parent_read_again_later_sends_its_children_the_deadline_planned_and_waits_no_longer() -> None:
    """A budget and the parent's wait count from when the step planned its children, not from each
    run: a parent taken over an hour later sends the same deadlines and keeps its wait's end."""
    run = Run(step=Gather(budget_s=60))
    with pytest.raises(Parked) as first:
        run()
    run.now = NOW + timedelta(hours=1)
    with pytest.raises(Parked) as again:
        run()
    assert [s[2]["deadline"] for s in run.sent] == ["2026-01-02T03:05:05.000Z"] * 4  # NOW + 60 s
    assert first.value.waiting["deadline_ms"] == again.value.waiting["deadline_ms"] == int(
        (NOW + timedelta(seconds=86_400)).timestamp() * 1000)


@pytest.mark.parametrize("budget", [0, -1, float("inf"), float("nan"), 1e300])
def test_a_budget_that_is_no_finite_positive_time_is_refused(budget: float) -> None:
    assert Delegate("research", {}, budget_s=budget).problem() is not None
    run = Run(step=Gather(budget_s=budget))
    with pytest.raises(ToDeadLetter) as refused:
        run()
    assert refused.value.reason == "delegation" and "budget_s" in refused.value.error and run.sent == []


def test_children_started_and_the_fanout_are_counted_once_per_plan_not_per_replay() -> None:
    run = Run(step=Gather(("research", "critique", "research")))
    for _ in range(2):  # the replay sends the same children again: they are not started again
        with pytest.raises(Parked):
            run()
    assert len(run.sent) == 6
    registry = run.metrics.registry
    assert registry.get_sample_value("agent_children_started_total", {"kind": "research"}) == 2
    assert registry.get_sample_value("agent_children_started_total", {"kind": "critique"}) == 1
    assert registry.get_sample_value("agent_fanout_count", {"kind": "plan"}) == 1
    assert registry.get_sample_value("agent_fanout_sum", {"kind": "plan"}) == 3
    refused = Run(step=Gather(("a", "b", "c", "d")))
    with pytest.raises(ToDeadLetter):
        refused()
    assert refused.metrics.registry.get_sample_value("agent_fanout_count", {"kind": "plan"}) is None


def test_only_children_without_a_reply_are_produced_again() -> None:
    run = Run()
    run.ledger.children.replies[("t1", "gather")] = {1: {"state": "succeeded", "result": {"a": 1}}}
    with pytest.raises(Parked):
        run()
    assert [s[1] for s in run.sent] == [b"t1/gather/0"]


# -- the output ----------------------------------------------------------------------------------------


def test_the_output_lists_children_in_declared_order_whatever_order_they_ended_in() -> None:
    run = Run()
    run.ledger.children.replies[("t1", "gather")] = {  # the second child ended first
        1: {"state": "succeeded", "result": {"second": True}}, 0: {"state": "succeeded", "result": {"first": True}}}
    output = run()
    assert output == {"children": [
        {"n": 0, "id": "t1/gather/0", "kind": "research", "state": "succeeded", "result": {"first": True}},
        {"n": 1, "id": "t1/gather/1", "kind": "critique", "state": "succeeded", "result": {"second": True}}],
        "degraded": False}
    assert run.sent == [] and run.ledger.children.parked == []


def test_children_that_end_before_the_parent_parks_are_read_at_once() -> None:
    run = Run()
    run.ledger.children.end_before_park = {0: {"state": "succeeded", "result": {}},
                                           1: {"state": "succeeded", "result": {}}}
    output = run()
    assert [c["state"] for c in output["children"]] == ["succeeded", "succeeded"]


def test_a_required_childs_failure_is_the_parents_dead_letter_and_an_optional_ones_degrades() -> None:
    plan = [{"n": 1, "id": "t1/g/1", "kind": "critique"}, {"n": 0, "id": "t1/g/0", "kind": "research"}]
    replies: dict[int, dict[str, Any]] = {0: {"state": "succeeded", "result": {"ok": 1}},
               1: {"state": "dead", "reason": "expired", "error": "deadline passed"}}
    with pytest.raises(ToDeadLetter) as dead:
        build_output(Gather(mode="required"), plan, replies)
    assert dead.value.reason == "child"
    assert dead.value.error == "t1/g/1 (critique): expired: deadline passed"
    output = build_output(Gather(mode="optional"), plan, replies)
    assert output["degraded"] is True
    assert output["children"][1] == {"n": 1, "id": "t1/g/1", "kind": "critique", "state": "dead",
                                     "reason": "expired", "error": "deadline passed"}


def test_a_parent_whose_wait_expired_is_dead_lettered_expired_and_sends_no_child_again() -> None:
    run = Run()
    with pytest.raises(Parked):
        run()
    later = Run(run.record)
    later.ledger = run.ledger
    run.ledger.effects.fields["w:gather:0"] = json.dumps({"decision": "expired", "by": "deadline"})
    with pytest.raises(ToDeadLetter) as dead:
        later()
    assert dead.value.reason == "expired" and later.sent == []


# -- replies ------------------------------------------------------------------------------------------


def test_a_child_replies_to_its_parent_and_a_task_that_is_no_child_does_not() -> None:
    assert reply_of(parent_record(), "t1", "plan", "succeeded", result={}) is None
    headers = child_headers(decode_task(parent_record().value, [], 1 << 20), None, "gather", 1, Lineage(0, ()),
                            "p.replies", None)
    child = Record("p.tasks", 0, 1, b"t1/gather/1", b"{}", [(k, v) for k, v in headers if isinstance(v, bytes)])
    allowed = frozenset({"p.replies"})
    topic, key, value = reply_of(child, "t1/gather/1", "critique", "dead", reason="expired", error="late",
                                 reply_topics=allowed) or ("", b"", b"")
    assert (topic, key) == ("p.replies", b"t1")
    assert json.loads(value) == {"parent": "t1", "step": "gather", "n": 1, "task_id": "t1/gather/1",
                                 "kind": "critique", "state": "dead", "reason": "expired", "error": "late"}
    _, _, ok = reply_of(child, "t1/gather/1", "critique", "succeeded", result={"a": 1},
                        reply_topics=allowed) or ("", b"", b"")
    assert json.loads(ok)["result"] == {"a": 1} and "reason" not in json.loads(ok)
    # a record's header cannot make the service write to a topic it does not allow
    assert reply_of(child, "t1/gather/1", "critique", "succeeded", result={}, reply_topics=frozenset()) is None


def test_a_child_place_is_plain_ascii_digits() -> None:
    """``int()`` reads a superscript or Arabic-Indic digit; a header carrying one names no place (it
    raised in the claim and in the reply before)."""
    assert [place_of(t) for t in ("0", "12", "²", "٣", "-1", "", None, "1" * 10)] == [0, 12, *[None] * 6]
    headers = [("agent.parent", b"t1"), ("agent.parent_step", b"gather"), ("agent.child", "²".encode()),
               ("agent.reply_to", b"p.replies")]
    child = Record("p.tasks", 0, 1, b"t1/gather/1", b"{}", headers)
    assert reply_of(child, "t1/gather/1", "critique", "succeeded", result={},
                    reply_topics=frozenset({"p.replies"})) is None


def test_the_resumption_source_drops_the_resumed_mark_and_keeps_the_lineage() -> None:
    record = parent_record(headers=[("agent.resumed", b"x"), ("agent.depth", b"1"), ("traceparent", b"tp")])
    names = [name for name, _ in parent_source(record)["headers"]]
    assert sorted(names) == ["agent.depth", "traceparent"]


# -- the step in a kind ---------------------------------------------------------------------------------


def test_a_delegating_step_is_a_step_of_the_graph_listed_without_a_prompt() -> None:
    from service.agents.loading import describe

    agent = Agent("plan", In, (Gather(), Synth()))
    assert agent.graph == {"gather": (), "synth": ("gather",)}
    registry = AgentRegistry([agent])
    item = describe(registry)[0]
    assert [s["name"] for s in item["steps"]] == ["gather", "synth"]
    assert "gather" in render(item)
    with pytest.raises(TypeError, match="delegates"):
        Gather().messages(In(question="q"), {})


def test_a_delegating_step_names_a_known_mode() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        type("Bad", (DelegateStep,), {"mode": "sometimes"})


def test_delegation_settings_and_their_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.delegation.max_children, s.delegation.max_depth, s.delegation.max_wait_s) == (32, 5, 86_400)
    assert s.kafka.replies_topic == "agent.replies"
    monkeypatch.setenv("AGENT_DELEGATION__MAX_CHILDREN", "4")
    monkeypatch.setenv("AGENT_KAFKA__REPLIES_TOPIC", "team.replies")
    s = Settings()
    assert s.delegation.max_children == 4 and s.kafka.replies_topic == "team.replies"


def test_check_plan_accepts_a_plan_within_the_limits() -> None:
    check_plan("plan", "gather", [Delegate("research", {})], Lineage(1, ("root",)), ["t1/gather/0"], CONFIG)


def test_a_child_that_parks_for_a_tool_keeps_its_place_in_the_tree_when_it_resumes() -> None:
    """The tool journal keeps the record that resumes a task parked for an approval or a reconcile
    answer (``source_of``): a child's lineage must survive it, or the resumed child never replies
    and its parent waits out its deadline."""
    from service.pipeline.tools import source_of

    lineage = [("agent.parent", b"t1"), ("agent.parent_step", b"gather"), ("agent.child", b"1"),
               ("agent.reply_to", b"p.replies"), ("agent.depth", b"1"), ("agent.path", b"plan")]
    record = Record("p.tasks", 0, 7, b"t1/gather/1", b"{}", [*lineage, ("agent.resumed", b"x"), ("tenant", b"acme")])
    kept = [name for name, _ in source_of(record)["headers"]]
    assert kept == [name for name, _ in lineage] + ["tenant"]
