"""Delegation by kinds declared in a file, run by a real worker process on Apache Kafka and
redis-server with the fault-injecting model; and a parent that ends dead after it planned children
that had not started.

A parent cannot be rejected while it waits for its children: a wait for children accepts only the
last child's reply (``children_ended``) or the sweeper's ``expired`` (:data:`dedup.lifecycles.parked.PARKED`),
and a step of the same task that parks for an approval cancels its sibling steps (the first step of
a graph run that parks ends the run). So a person's rejection never meets planned, unstarted
children; the tests show the refusal of such a decision, and end a parent dead after its plan by a
child whose topic cannot be written (dead letter ``delegation``) while an earlier child waits on a
topic no worker consumes yet.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.agents.registry import AgentRegistry
from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM, FaultRule
from service.pipeline.parking import NotDecidable, decide
from service.runtime.wiring import Service, ensure_topics
from tests.support import Msg, produce, read_topic, spawn_worker, stop_workers, succeeded, task_value, wait_for
from tests.support.delegation_kinds import fleet
from tests.support.fleet import deployment, ending, ledger_of, records, replying_to, serving, wait_ended

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer s3cret"}

TEXT_INPUT = ('{ type = "object", required = ["text"], additionalProperties = false, '
              'properties.text = { type = "string", minLength = 1 } }')

KINDS = f"""
[[kinds]]
name = "dd_brief"
version = "v1"
input_schema = {{ type = "object", required = ["question"], properties.question = {{ type = "string" }}, properties.note = {{ type = "string" }} }}

[[kinds.steps]]
name = "gather"
needs = []
mode = "optional"
delegate = [
  {{ kind = "dd_research", input = {{ text = "Research: {{question}}" }} }},
  {{ kind = "dd_critique", input = {{ text = "{{question}}" }} }},
]

[[kinds]]
name = "dd_unknown"
version = "v1"
input_schema = {{ type = "object", required = ["question"], properties.question = {{ type = "string" }} }}

[[kinds.steps]]
name = "gather"
needs = []
delegate = [
  {{ kind = "dd_research", input = {{ text = "{{question}}" }} }},
  {{ kind = "dd_nowhere", input = {{ text = "{{question}}" }} }},
]

[[kinds]]
name = "dd_gap"
version = "v1"
input_schema = {{ type = "object", required = ["question"], properties.question = {{ type = "string" }}, properties.note = {{ type = "string" }} }}

[[kinds.steps]]
name = "gather"
needs = []
delegate = [{{ kind = "dd_critique", input = {{ text = "{{note}}" }} }}]

[[kinds]]
name = "dd_research"
version = "v1"
input_schema = {TEXT_INPUT}

[[kinds.steps]]
name = "answer"
prompt = "Find out: {{text}}"
output_schema = {{ type = "object", required = ["answer"], properties.answer = {{ type = "string" }} }}

[[kinds]]
name = "dd_critique"
version = "v1"
input_schema = {TEXT_INPUT}

[[kinds.steps]]
name = "answer"
prompt = "Criticise: {{text}}"
output_schema = {{ type = "object", required = ["answer"], properties.answer = {{ type = "string" }} }}
"""

# a child's input naming a field the kind does not declare: the loader refuses the file
UNDECLARED = """
[[kinds]]
name = "dd_astray"
version = "v1"
input_schema = { type = "object", required = ["question"], properties.question = { type = "string" } }

[[kinds.steps]]
name = "gather"
delegate = [{ kind = "dd_research", input = { text = "{missing}" } }]
"""


def by_key(messages: list[Msg]) -> dict[str, Msg]:
    """The records by key; a key with two different values fails."""
    out: dict[str, Msg] = {}
    for m in messages:
        key = (m.key or b"").decode()
        assert key not in out or out[key].value == m.value, f"{key} has two different records"
        out[key] = m
    return out


def show(port: int, task_id: str) -> dict[str, Any]:
    """``GET /tasks/{task_id}`` of the worker's own API."""
    got = httpx.get(f"http://127.0.0.1:{port}/tasks/{task_id}", headers=AUTH, timeout=10)
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def test_a_declared_kind_delegates_to_declared_kinds_in_a_worker_process(
        make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    """``dd_brief`` hands its question to ``dd_research`` (slow, so it ends second) and ``dd_critique``;
    its result lists them in declared order, each run once. A child of a kind nobody runs, and a
    child whose input field the task left out, end the parent as a dead letter ``child`` naming them."""
    kinds = tmp_path / "kinds.toml"
    kinds.write_text(KINDS)
    port = local.free_port()
    s = deployment(make_settings, "dd", kinds_file=kinds, http={"enabled": True, "port": port})
    run = uuid.uuid4().hex[:6]
    brief, unknown, gap = f"dd-brief-{run}", f"dd-unknown-{run}", f"dd-gap-{run}"
    research, critique = f"{brief}/gather/0", f"{brief}/gather/1"
    ran = [brief, research, critique, unknown, f"{unknown}/gather/0", gap]  # in the ledger; the rest never claimed
    refused = [f"{unknown}/gather/1", f"{gap}/gather/0"]  # dead-lettered as they were read: no ledger entry
    fake_llm.add_fault(FaultRule("latency", match=f"{research}:", delay_s=3))
    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "worker.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [
            (brief.encode(), task_value("dd_brief", {"question": "why tides"}, brief)),
            (unknown.encode(), task_value("dd_unknown", {"question": "why moons"}, unknown)),
            (gap.encode(), task_value("dd_gap", {"question": "why stars"}, gap))])

        async def scenario() -> dict[str, str | None]:
            async with ledger_of(s) as ledger:
                await wait_ended(ledger, ran, what="every parent and child to end")
                got = await records(ledger, ran + refused)
                for n, cid in enumerate((research, critique)):  # each child's entry names its place
                    record = got[cid]
                    fields = record.fields if record is not None else {}
                    assert (fields.get("parent"), fields.get("parent_step"), fields.get("parent_n")) == (
                        brief, "gather", str(n))
                return {t: ending(r) for t, r in got.items()}

        assert asyncio.run(scenario()) == {
            brief: "succeeded", research: "succeeded", critique: "succeeded", unknown: "dead(child)",
            f"{unknown}/gather/0": "succeeded", gap: "dead(child)", **dict.fromkeys(refused)}
        tree, child = show(port, brief), show(port, critique)
    finally:
        stop_workers([worker])
    results = by_key(succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=4)))
    assert set(results) == {brief, research, critique, f"{unknown}/gather/0"}
    first, second = results[research].json(), results[critique].json()
    assert second["completed_at"] < first["completed_at"], "the children did not finish reversed"
    assert results[brief].json()["result"] == {"degraded": False, "children": [
        {"n": 0, "id": research, "kind": "dd_research", "state": "succeeded", "result": first["result"]},
        {"n": 1, "id": critique, "kind": "dd_critique", "state": "succeeded", "result": second["result"]}]}
    steps = fake_llm.stats()["by_step"]
    assert {k: n for k, n in steps.items() if k.startswith(brief)} == {f"{research}:answer": 1,
                                                                       f"{critique}:answer": 1}
    asked = fake_llm.last_request(f"{research}:answer")
    assert asked is not None and asked["messages"][-1]["content"] == "Find out: Research: why tides"
    assert fake_llm.calls_for(f"{unknown}/gather/1") == 0 and fake_llm.calls_for(gap) == 0
    assert [(c["id"], c["kind"], c["step"], c["state"]) for c in tree["children"]] == [
        (research, "dd_research", "gather", "succeeded"), (critique, "dd_critique", "gather", "succeeded")]
    assert tree["parent"] is None and child["parent"]["id"] == brief and child["parent"]["step"] == "gather"
    dead_children_name_themselves(s, unknown, gap)


def dead_children_name_themselves(s: Settings, unknown: str, gap: str) -> None:
    """The parents' dead letters ``child`` name the child, its kind and its own reason."""
    dead = {k: (m.headers["dlq.reason"].decode(), m.headers["dlq.error"].decode())
            for k, m in by_key(read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=4)).items()}
    assert dead.keys() == {unknown, f"{unknown}/gather/1", gap, f"{gap}/gather/0"}
    assert dead[f"{unknown}/gather/1"] == ("schema", "unknown kind 'dd_nowhere'")
    assert dead[unknown] == ("child", f"{unknown}/gather/1 (dd_nowhere): schema: unknown kind 'dd_nowhere'")
    assert dead[f"{gap}/gather/0"][0] == "schema"
    assert dead[gap] == ("child", f"{gap}/gather/0 (dd_critique): schema: {dead[f'{gap}/gather/0'][1]}")


def test_a_kinds_file_whose_child_input_names_an_undeclared_field_refuses_the_start(
        make_settings: Any, tmp_path: Path) -> None:
    kinds = tmp_path / "astray.toml"
    kinds.write_text(UNDECLARED)
    s = deployment(make_settings, "astray", kinds_file=kinds)
    log = tmp_path / "worker.log"
    worker = spawn_worker(s, str(log))
    try:
        code = worker.wait(60)
    finally:
        stop_workers([worker])
    said = log.read_text()
    assert code != 0, said[-4000:]
    assert "refusing to start" in said and str(kinds) in said and "dd_astray" in said and "missing" in said, \
        said[-4000:]


def test_a_parent_dead_after_its_plan_cancels_its_child_not_started(make_settings: Any, fake_llm: FakeLLM) -> None:
    """``dl_orchestrate`` plans a leaf on a lane no worker consumes yet and a middle on a topic that
    does not exist: the leaf is sent, the middle cannot be, and the parent is dead-lettered
    ``delegation``. Once the lane's workers start, the leaf ends ``cancelled`` without a model call."""
    a = deployment(make_settings, "a")
    lane = replying_to(deployment(make_settings, "lane", key_prefix=a.redis.key_prefix), a)
    root = f"dc-{uuid.uuid4().hex[:6]}"
    leaf, middle = f"{root}/fanout/0", f"{root}/fanout/1"
    absent = f"absent-{uuid.uuid4().hex[:8]}.tasks"
    ensure_topics(lane)  # the lane is deployed; its workers are not running yet
    agents = AgentRegistry([k for k in fleet({"dl_leaf": lane.kafka.input_topic, "dl_middle": absent})
                            if k.kind == "dl_orchestrate"])

    async def scenario() -> dict[str, str | None]:
        async with serving(a, fake_llm.base_url, agents=agents) as sa:
            produce(a.kafka.bootstrap_servers, a.kafka.input_topic,
                    [(root.encode(), task_value("dl_orchestrate", {"text": "tides"}, root))])
            await wait_ended(sa.ledger, [root], what="the parent to be dead-lettered")
        async with serving(lane, fake_llm.base_url, agents=AgentRegistry(fleet())) as sl:
            await wait_ended(sl.ledger, [leaf], what="the lane to reach the leaf")
            return {t: ending(r) for t, r in (await records(sl.ledger, [root, leaf, middle])).items()}

    assert asyncio.run(scenario()) == {root: "dead(delegation)", leaf: "dead(cancelled)", middle: None}
    assert fake_llm.calls_for(root) == 0  # neither the leaf nor the parent's synthesis
    (dead,) = read_topic(a.kafka.bootstrap_servers, a.kafka.dlq_topic, expect=1)
    assert (dead.key, dead.headers["dlq.reason"]) == (root.encode(), b"delegation")
    assert absent.encode() in dead.headers["dlq.error"]
    (cancelled,) = read_topic(lane.kafka.bootstrap_servers, lane.kafka.dlq_topic, expect=1)
    assert (cancelled.key, cancelled.headers["dlq.reason"]) == (leaf.encode(), b"cancelled")
    (reply,) = read_topic(a.kafka.bootstrap_servers, a.kafka.replies_topic, expect=1)
    assert {k: reply.json()[k] for k in ("parent", "task_id", "n", "state", "reason")} == {
        "parent": root, "task_id": leaf, "n": 0, "state": "dead", "reason": "cancelled"}


def test_a_person_cannot_reject_a_parent_waiting_for_its_children(make_settings: Any, fake_llm: FakeLLM) -> None:
    """The decision is refused, naming what the parent waits for; the parent keeps waiting."""
    a = deployment(make_settings, "a")
    lane = f"lane-{uuid.uuid4().hex[:8]}.tasks"
    a_lane = a.model_copy(update={"kafka": a.kafka.model_copy(update={"input_topic": lane})})
    ensure_topics(a_lane)  # a topic no worker consumes
    root = f"dw-{uuid.uuid4().hex[:6]}"
    agents = AgentRegistry([k for k in fleet({"dl_leaf": lane, "dl_middle": lane}) if k.kind == "dl_orchestrate"])

    async def scenario() -> None:
        async with serving(a, fake_llm.base_url, agents=agents) as sa:
            produce(a.kafka.bootstrap_servers, a.kafka.input_topic,
                    [(root.encode(), task_value("dl_orchestrate", {"text": "tides"}, root))])
            await wait_for(lambda: _waiting(sa, root), 60, interval_s=0.2, what="the parent to wait")
            with pytest.raises(NotDecidable, match="waits for children"):
                await decide(sa.ledger, sa.publisher.send, sa.metrics, datetime.now(UTC), root, "rejected", by="ana")
            record = await sa.ledger.get(root)
            assert record is not None and json.loads(record.fields["waiting"])["what"] == "children"

    asyncio.run(scenario())
    assert len(read_topic(a.kafka.bootstrap_servers, lane, expect=2)) == 2
    assert read_topic(a.kafka.bootstrap_servers, a.kafka.dlq_topic, timeout_s=3) == []


async def _waiting(service: Service, task_id: str) -> bool:
    record = await service.ledger.get(task_id)
    return record is not None and "waiting" in record.fields
